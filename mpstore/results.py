"""What `Repo`'s verbs return: dataclasses that are the Python API and, through `to_json()`,
every `--json` output of the CLI (which only prints them).

Results of plumbing live with their producers (`FsckResult`, `Garbage`, `DiffResult`,
`AnalyzeResult`, `Plan.to_json`); this module holds the ones `Repo` assembles.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .store.env import ReflogEntry
from .store.gc import Garbage
from .store.objects import Commit, Plan
from .store.recompress import Recompressed
from .store.space import Usage

if TYPE_CHECKING:
    from .merge.catalog import AnalyzeResult
    from .remote.sync import Moved


@dataclass(frozen=True)
class AddResult:
    commit: bytes
    new_bytes: int
    total_bytes: int
    analyzed: AnalyzeResult | None = None  # the delta catalog work, with --base


@dataclass(frozen=True)
class MergeResult:
    commit: bytes
    plan: Plan
    realized: dict[str, Any]  # as stored in the commit's stats
    commit_seconds: float = 0.0  # the commit transaction and sync, after the stats were written


@dataclass(frozen=True)
class ReplayResult:
    commit: bytes
    identical: bool
    differing: list[str]  # tensor names (and file names) whose content differs
    # The merges this one's inputs came from (a multi-stage config's earlier stages), replayed
    # first, each once, deepest first.
    chain: list[ReplayResult] = field(default_factory=list)
    engine: int | None = None  # the engine that recorded the plan, where it is not this one

    @property
    def all_identical(self) -> bool:
        return self.identical and all(r.identical for r in self.chain)


@dataclass(frozen=True)
class CommitInfo:
    """A commit and its id, as `mp log` lists it."""

    id: bytes
    commit: Commit

    def to_json(self) -> dict[str, Any]:
        c = self.commit
        return {
            "id": self.id.hex(),
            "parents": [p.hex() for p in c.parents],
            "base": c.base.hex() if c.base else None,
            "plan_id": c.plan.hex() if c.plan else None,
            "message": c.message,
            "author": c.author,
            "time": c.time,
            "new_bytes": c.new_bytes,
            "stats": c.stats,
            "source": c.source,  # e.g. {"hf": "ORG/NAME", "revision": commit hash}, or None
        }


@dataclass(frozen=True)
class TensorRow:
    """One tensor of a commit, as `mp ls` lists it (in file order)."""

    name: str
    dtype: str
    shape: list[int]
    bytes: int
    file: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": self.shape, "bytes": self.bytes, "file": self.file}


@dataclass(frozen=True)
class PullResult:
    branch: str
    old: bytes | None  # where the branch was (None: it did not exist)
    new: bytes
    fetched: Moved

    def to_json(self) -> dict[str, Any]:
        return {"branch": self.branch, "old": self.old.hex() if self.old else None, "new": self.new.hex(),
                "fetched": self.fetched.to_json()}


@dataclass(frozen=True)
class ShowResult:
    """A commit with what people ask of a model: size, parameters, dtypes, files, its plan."""

    info: CommitInfo
    size: int  # bytes of the folder a checkout writes
    tensor_bytes: int
    tensors: int
    parameters: int
    dtypes: dict[str, int]  # dtype -> parameters
    files: list[str]
    plan: Plan | None  # the merge plan, for a merge
    space: Usage  # the snapshot's distinct chunks: logical and stored bytes by codec

    def to_json(self) -> dict[str, Any]:
        return {
            **self.info.to_json(),
            "snapshot": self.info.commit.snapshot.hex(),
            "size": self.size,
            "tensor_bytes": self.tensor_bytes,
            "tensors": self.tensors,
            "parameters": self.parameters,
            "dtypes": self.dtypes,
            "files": self.files,
            "plan": self.plan.to_json() if self.plan else None,
            "space": self.space.to_json(),
        }


@dataclass(frozen=True)
class RefRow:
    """A branch or tag: its name, commit and that commit's message."""

    name: str
    id: bytes
    message: str
    current: bool | None = None  # branches: whether it is the branch last written; tags: None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "id": self.id.hex()}
        if self.current is not None:
            out["head"] = self.current
        return out


@dataclass(frozen=True)
class StatusResult:
    head: str | None
    branches: list[RefRow]
    tags: list[RefRow]
    store_bytes: int  # on disk
    used_bytes: int  # pages in use in the data file
    entries: dict[str, int]
    chunk_size: int
    reclaimable: Garbage
    space: Usage  # every chunk: logical and stored bytes by codec
    compress: str  # how new chunks are stored (mp init --compress)

    def to_json(self) -> dict[str, Any]:
        return {
            "head": self.head,
            "branches": {r.name: r.id.hex() for r in self.branches},
            "tags": {r.name: r.id.hex() for r in self.tags},
            "store_bytes": self.store_bytes,
            "used_bytes": self.used_bytes,
            "entries": self.entries,
            "chunk_size": self.chunk_size,
            "reclaimable": self.reclaimable.to_json(),
            "space": self.space.to_json(),
            "compress": self.compress,
        }


@dataclass(frozen=True)
class GcResult:
    freed: Garbage
    file_bytes_before: int | None = None  # with --compact: the data file's allocated bytes
    file_bytes_after: int | None = None
    recompressed: Recompressed | None = None  # with --recompress

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = self.freed.to_json()
        if self.file_bytes_before is not None:
            out["file_bytes_before"], out["file_bytes_after"] = self.file_bytes_before, self.file_bytes_after
        if self.recompressed is not None:
            out["recompressed"] = self.recompressed.to_json()
        return out


@dataclass(frozen=True)
class ReflogResult:
    branch: str
    entries: list[ReflogEntry] = field(default_factory=list)  # oldest first; [] once gc expired them all
    head: bytes | None = None  # where the branch points now (None: deleted)

    def to_json(self) -> list[dict[str, str | None]]:
        return [e.to_json() for e in self.entries]


@dataclass(frozen=True)
class LineageNode:
    """A commit and, recursively, its parents: what `mp log --graph` draws."""

    id: bytes
    message: str
    time: str
    method: str | None = None  # for a merge
    seen: bool = False  # drawn above already (its parents are not repeated)
    parents: list[LineageNode] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id.hex(), "message": self.message, "time": self.time,
                               "parents": [p.to_json() for p in self.parents]}
        if self.method:
            out["method"] = self.method
        if self.seen:
            out["seen"] = True
        return out
