"""Relative file paths inside a model folder: the one rule used on the way in and the way out.

A snapshot's file names come from folders people download, so they are checked both when a
folder is added and again before checkout writes anything: a name that could escape the target
folder or confuse a terminal is refused.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import BadInput

# A first component `C:` names a drive on Windows, where `C:/x` is absolute and `C:x` is not (it
# is relative to drive C's current folder: still outside the target). Other colons (`a:b.txt`)
# are ordinary characters on POSIX systems and are accepted.
_WINDOWS_DRIVE = re.compile(r"[A-Za-z]:")


def utf8(text: str) -> bool:
    """False for strings holding lone surrogates: undecodable bytes of a file name, or escapes
    in JSON. Such a name can be neither stored nor written back."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_relpath(rel: str) -> str:
    """Return `rel` (a '/'-separated path) if it stays inside its folder, else raise BadInput.

    Refused: empty, '.' and '..' components, a leading '/', control characters, undecodable
    bytes, and what Windows would read as a path of its own: a backslash (a separator there) or
    a drive (`C:`) as the first component, so that no name escapes its folder on Windows either."""
    problem = None
    if not rel:
        problem = "is empty"
    elif not utf8(rel):
        problem = "is not valid UTF-8"
    elif any(ord(c) < 32 or ord(c) == 127 for c in rel):
        problem = "contains a control character"
    elif rel.startswith("/") or "\\" in rel or _WINDOWS_DRIVE.fullmatch(rel.split("/", 1)[0]):
        problem = "is absolute (or would be on Windows)"
    elif any(part in ("", ".", "..") for part in rel.split("/")):
        problem = "has an empty, '.' or '..' component"
    if problem:
        raise BadInput(f"file name {rel!r} {problem}")
    return rel


def inside(root: Path, rel: str) -> Path:
    """`root/rel`, guaranteed (after resolving) to lie within `root`."""
    target = (root / check_relpath(rel)).resolve()
    base = root.resolve()
    if target != base and base not in target.parents:
        raise BadInput(f"file name {rel!r} would be written outside {root}")
    return target
