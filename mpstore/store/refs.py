"""Names for commits: branch and tag names, their validation, and resolving what users type.

A ref spec is `NAME` (branch), `tags/NAME`, `REMOTE/NAME` (a remote-tracking branch), a hex commit
id or a unique prefix of at least six characters, each optionally followed by `~N` (the N-th first
parent). Branch and tag names are checked before any write, because they become keys and are typed
back on command lines.
"""

from __future__ import annotations

import re

from ..errors import AmbiguousRef, BadRefName, UnknownRef
from .env import Txn
from .ids import short
from .objects import Commit

BRANCH_PREFIX = "heads/"
TAG_PREFIX = "tags/"
REMOTES_PREFIX = "remotes/"  # remote-tracking branches: remotes/ORIGIN/BRANCH, typed ORIGIN/BRANCH
MIN_PREFIX = 6
# A name is an LMDB key (511 bytes at most, with its prefix and reflog suffix) and is typed back on
# command lines; git caps components at the file system's 255 too.
MAX_NAME = 255
_ALLOWED = re.compile(r"[A-Za-z0-9._/+@-]+")
_ANCESTRY = re.compile(r"^(.*?)((?:~\d*)+)$")
_HEX = re.compile(r"[0-9a-f]+")


def check_name(name: str, what: str = "branch") -> str:
    """Return `name` if it is a safe ref name, else raise BadRefName saying why."""
    problem = None
    if not name:
        problem = "is empty"
    elif len(name.encode("utf-8", "surrogatepass")) > MAX_NAME:
        problem = f"is longer than {MAX_NAME} bytes"
    elif any(ord(c) < 32 or ord(c) == 127 for c in name):
        problem = "contains a control character"
    elif name.startswith("-"):
        problem = "starts with '-'"
    elif name.startswith("/") or name.endswith("/"):
        problem = "starts or ends with '/'"
    elif ".." in name:
        problem = "contains '..'"
    elif "//" in name:
        problem = "contains '//'"
    elif name.endswith(".") or name.endswith(".lock") or "/." in name or name.startswith("."):
        problem = "has a component starting or ending with '.'"
    elif name.startswith(TAG_PREFIX) or name == "HEAD":
        problem = "is reserved"
    elif not _ALLOWED.fullmatch(name):
        problem = "may only use letters, digits and . _ / + @ -"
    if problem:
        raise BadRefName(f"invalid {what} name {name!r}: {problem}")
    return name


def _commit_by_prefix(txn: Txn, prefix: str) -> bytes | None:
    """The unique commit whose hex id starts with `prefix`; None when there is none."""
    start = bytes.fromhex(prefix + "0" * (len(prefix) % 2))
    found: list[bytes] = []
    for oid in txn.object_ids_from(start):
        if not oid.hex().startswith(prefix):
            break
        if isinstance(txn.object(oid), Commit):  # ids of other kinds share the key space
            found.append(oid)
    if len(found) > 1:
        listed = ", ".join(short(f) for f in found[:5])
        raise AmbiguousRef(f"id prefix {prefix!r} is ambiguous: matches commits {listed}")
    return found[0] if found else None


def _resolve_plain(txn: Txn, spec: str) -> bytes:
    for key in (BRANCH_PREFIX + spec, spec if spec.startswith(TAG_PREFIX) else None, REMOTES_PREFIX + spec):
        if key and (oid := txn.ref(key)) is not None:
            return oid
    lowered = spec.lower()
    if len(spec) >= MIN_PREFIX and _HEX.fullmatch(lowered):
        oid = _commit_by_prefix(txn, lowered)
        if oid is not None:
            return oid
    raise UnknownRef(f"unknown ref {spec!r}: no branch, tag or commit by that name")


def resolve(txn: Txn, spec: str) -> bytes:
    """The commit id `spec` names, or UnknownRef / AmbiguousRef naming what failed."""
    m = _ANCESTRY.match(spec)
    base, steps = (m.group(1), m.group(2)) if m else (spec, "")
    oid = _resolve_plain(txn, base)
    for step in steps.split("~")[1:]:
        for _ in range(int(step) if step else 1):
            commit = txn.commit(oid)
            if not commit.parents:
                raise UnknownRef(f"unknown ref {spec!r}: {short(oid)} has no parent")
            oid = commit.parents[0]
    return oid
