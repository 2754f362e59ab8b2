"""Models from the Hugging Face cache: `hf://ORG/NAME[@REVISION]` → a snapshot folder + provenance.

A reference is resolved through huggingface_hub's own cache logic (`snapshot_download`): offline
(HF_HUB_OFFLINE=1) only from the local cache, online it may download into that cache first. The
result is an ordinary cache snapshot folder (`models--ORG--NAME/snapshots/<commit>/`, files linked
into `../../blobs/`), which `mp add` ingests like any folder, and the provenance a commit records:
the repository id and the 40-hex commit the revision resolved to. A snapshot folder of the cache
given as a path carries the same provenance (`locate`).

huggingface_hub is imported only while a reference is resolved, so `import mpstore` never loads it.
This module never writes to the store; every problem is one BadInput line, raised before `mp add`
writes anything.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadInput, quoted

SCHEME = "hf://"
MODELS_PREFIX = "models--"  # huggingface_hub's cache folder of a model repository: models--ORG--NAME
SEPARATOR = "--"  # stands for '/' in that folder name; repository ids may not contain it
COMMIT_HASH = re.compile(r"[0-9a-f]{40}")
# A branch, tag or commit hash (`refs/pr/1` included); no '..', so a revision can never name a
# file outside the cache repository's refs/ folder.
REVISION = re.compile(r"(?!.*\.\.)[A-Za-z0-9_.\-][A-Za-z0-9_.\-/]*")


@dataclass(frozen=True)
class HubSource:
    """Where a snapshot came from: a Hub model repository at one commit."""

    repo_id: str  # ORG/NAME (or a legacy NAME)
    revision: str  # the resolved commit hash, 40 hex characters

    def to_fields(self) -> dict[str, str]:
        """As a commit stores it (`Commit.source`)."""
        return {"hf": self.repo_id, "revision": self.revision}


def is_reference(source: object) -> bool:
    return isinstance(source, str) and source.startswith(SCHEME)


def parse(spec: str) -> tuple[str, str | None]:
    """`hf://ORG/NAME[@REVISION]` → (repository id, revision or None); malformed: one line."""
    repo_id, at, revision = spec[len(SCHEME):].partition("@")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise BadInput(f"{_shown(spec)}: not a Hugging Face model reference: expected "
                       f"hf://ORG/NAME[@REVISION] (letters, digits, '-', '_', '.'; no '--' or '..')") from None
    if at and not REVISION.fullmatch(revision):
        raise BadInput(f"{_shown(spec)}: not a revision after '@': give a branch, a tag or a commit hash")
    return repo_id, revision if at else None


def resolve(spec: str) -> tuple[Path, HubSource]:
    """The snapshot folder `spec` names in the Hugging Face cache (downloading it first when online
    and missing), and its provenance."""
    repo_id, revision = parse(spec)
    from huggingface_hub import constants, snapshot_download

    offline = constants.is_offline_mode()
    cache_repo = Path(constants.HF_HUB_CACHE) / (MODELS_PREFIX + repo_id.replace("/", SEPARATOR))
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, local_files_only=offline))
    except Exception as e:  # the Hub's boundary: any failure there is one line for the user
        raise _failure(spec, revision, cache_repo, offline, e) from None
    if not COMMIT_HASH.fullmatch(folder.name):  # a refs/ file holding something other than a commit hash
        raise BadInput(f"{_shown(spec)}: the Hugging Face cache resolved it to {folder}, "
                       "which is not a snapshot folder named by a commit hash")
    return folder, HubSource(repo_id, folder.name)


def _failure(spec: str, revision: str | None, cache_repo: Path, offline: bool, e: Exception) -> BadInput:
    """One actionable line for a failed resolution: what the Hub said, or what was searched where."""
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    where = f"{_shown(spec)}:"
    if isinstance(e, RevisionNotFoundError):  # only online: the Hub answered
        return BadInput(f"{where} unknown revision {revision or 'main'!r} on the Hub")
    if isinstance(e, RepositoryNotFoundError):
        return BadInput(f"{where} no such model repository on the Hub (or it is private or gated: "
                        "log in with `hf auth login`)")
    mode = "HF_HUB_OFFLINE=1; " if offline else ""
    cause = e.__cause__ if isinstance(e.__cause__, Exception) else e  # the connection error under a cache miss
    hub = "" if offline else f"; the Hub could not be asked: {type(cause).__name__}: {_first_line(cause)}"
    if not cache_repo.is_dir():
        return BadInput(f"{where} not in the Hugging Face cache ({mode}searched {cache_repo}){hub}")
    if not _cached(cache_repo, revision or "main"):
        return BadInput(f"{where} unknown revision {revision or 'main'!r} in the Hugging Face cache "
                        f"({mode}{cache_repo} has {_listing(cache_repo)}){hub}")
    return BadInput(f"{where} the Hugging Face cache at {cache_repo} cannot provide it "
                    f"({mode}{type(e).__name__}: {_first_line(e)})")


def _shown(text: str) -> str:
    """A name the user gave, as it goes into a one-line message (control characters escaped)."""
    return text if text.isprintable() and len(text) <= 200 else quoted(text)


def _cached(cache_repo: Path, revision: str) -> bool:
    """Whether the cache knows `revision`: a ref of that name or a snapshot of that commit."""
    return (cache_repo / "refs" / revision).is_file() or (cache_repo / "snapshots" / revision).is_dir()


def _listing(cache_repo: Path) -> str:
    """The revisions a cache repository holds, briefly: its ref names and how many snapshots."""
    def names(folder: Path) -> list[str]:
        try:
            return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        except OSError:
            return []

    refs = names(cache_repo / "refs")
    try:
        snapshots = len(os.listdir(cache_repo / "snapshots"))
    except OSError:
        snapshots = 0
    shown = ", ".join(refs[:5]) + (f" and {len(refs) - 5} more" if len(refs) > 5 else "")
    return f"refs {shown or 'none'}; {snapshots} snapshot(s)"


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else "no details"


def locate(source: Path | str) -> tuple[Path, HubSource | None]:
    """What `mp add SOURCE` reads: an `hf://` reference resolved in the cache, or the path itself;
    with the provenance of either when it is (exactly) a snapshot folder of a cached model."""
    if is_reference(source):
        return resolve(str(source))
    path = Path(source)
    return path, snapshot_source(path)


def snapshot_source(path: Path) -> HubSource | None:
    """`models--ORG--NAME/snapshots/<commit>` → its provenance; anything else → None."""
    try:
        real = path.resolve()
    except (OSError, RuntimeError):
        return None  # ingest says what is wrong with the path
    snapshots, cache_repo = real.parent, real.parent.parent
    if snapshots.name != "snapshots" or not COMMIT_HASH.fullmatch(real.name) \
            or not cache_repo.name.startswith(MODELS_PREFIX):
        return None
    return HubSource(cache_repo.name[len(MODELS_PREFIX):].replace(SEPARATOR, "/"), real.name)
