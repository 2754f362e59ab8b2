"""`Repo`: the Python API of mpstore, a thin facade that the CLI wraps and the tests call.

It ties the store, the model folder code and the merge engine together and owns every ref
update: a verb validates all of its input first, writes chunks, then makes its objects and moves
its ref in one final transaction (`_commit` for new commits, `_move` for branches and tags), so a
reader sees the old commit or the new one, never half of one. The merge engine imports torch,
which takes seconds: it is imported inside the verbs that compute on tensors, so `import mpstore`
and `mp log` never load it.
"""

from __future__ import annotations

import functools
import getpass
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from contextlib import closing, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Concatenate, ParamSpec, TypeVar

from .errors import (
    BadMerge,
    BadRefName,
    CorruptData,
    MpError,
    NotARepository,
    Rejected,
    RepositoryExists,
    TargetExists,
    UnknownRef,
)
from .merge.request import check_threads
from .model import checkout as _checkout
from .model import hub, ingest
from .model.diff import DiffResult, diff_snapshots
from .model.revert import revert as _revert
from .progress import Progress, Silent
from .results import (
    AddResult,
    CommitInfo,
    GcResult,
    LineageNode,
    MergeResult,
    PullResult,
    ReflogResult,
    RefRow,
    ReplayResult,
    ShowResult,
    StatusResult,
    TensorRow,
)
from .store import filecache
from .store import gc as _gc
from .store.chunks import META_KEY as COMPRESS_KEY
from .store.chunks import POLICIES, ChunkSink, policy
from .store.derived import CatalogRules
from .store.dtypes import MAX_ITEMSIZE
from .store.env import DEFAULT_MAP_SIZE, Store, Txn
from .store.fsck import FsckResult
from .store.fsck import fsck as _fsck
from .store.ids import short
from .store.objects import Chunked, Commit, Plan, Shard, Snapshot, StoredObject, Tensor, timestamp
from .store.refs import BRANCH_PREFIX, TAG_PREFIX, check_name, resolve
from .store.space import usage

if TYPE_CHECKING:
    from .merge.catalog import AnalyzeResult, Recorder
    from .merge.planner import Selector
    from .merge.request import MergeRequest
    from .remote.sync import Moved
    from .remote.transport import Transport

STORE_DIR = ".mp"
REMOTE_KEY = b"remote/"  # meta key prefix: remote name -> URL
DEFAULT_CHUNK_SIZE = 1 << 20  # see docs/architecture.md, "Chunk size", for the measurement
DEFAULT_COMPRESS = "delta"  # see docs/benchmarks.md, "Compression (issue 14)"
MIN_CHUNK_SIZE = 4096
MAX_CHUNK_SIZE = 64 << 20

P = ParamSpec("P")
R = TypeVar("R")


def _pairs(r: Txn, tensors: dict[str, bytes], base: Snapshot,
           known: dict[bytes, Tensor]) -> list[tuple[Tensor, Tensor]]:
    """(expert tensor, base tensor) by name; `known`: tensors not stored yet (an add in progress)."""
    return [(known.get(tid) or r.tensor(tid), r.tensor(base.tensors[n]))
            for n, tid in tensors.items() if n in base.tensors]


@dataclass
class _Read:
    """What `Repo.add` got from a source folder: the objects it made, the snapshot's maps, and
    the file-identity cache entries to record."""

    objects: list[StoredObject] = field(default_factory=list)
    tensors: dict[str, bytes] = field(default_factory=dict)  # name -> tensor id
    known: dict[bytes, Tensor] = field(default_factory=dict)  # tensors read now, by id
    files: dict[str, bytes] = field(default_factory=dict)  # relative path -> blob id
    shards: list[Shard] = field(default_factory=list)
    seen: list[filecache.Entry] = field(default_factory=list)


def _read_source(txn: Txn, sink: ChunkSink, src: ingest.Source, recorder: Recorder | None,
                 base: dict[str, Tensor] | None) -> _Read:
    """Read every file the file-identity cache does not vouch for (a header is always hashed:
    it is small, and a cached entry must name the same header blob). `base`: the tensors a new
    chunk may be stored as a delta against."""
    out = _Read()
    for file, header in src.weights.items():
        path = src.root / file
        hblob = sink.blob(header.raw, "header")  # the raw header: checkout rewrites it exactly
        out.objects.append(hblob)
        out.shards.append(ingest.shard_record(file, header, hblob.id))
        names = [t.name for t in header.tensors]
        now = ingest.identity(path)
        ids = filecache.lookup(txn, now, filecache.WEIGHTS)
        if ids is not None and ids[0] == hblob.id and len(ids) == 1 + len(names):
            out.tensors.update(zip(names, ids[1:]))
            sink.progress.advance(now.size - len(header.raw))
            continue
        tensors, seen = ingest.read_weights(sink, path, header, recorder.watch if recorder is not None else None,
                                            base)
        for tname, tensor in tensors.items():
            out.objects.append(tensor)
            out.tensors[tname] = tensor.id
            out.known[tensor.id] = tensor
        if seen is not None:
            out.seen.append(filecache.Entry(seen.identity, seen.began_ns, filecache.WEIGHTS,
                                            (hblob.id, *(tensors[n].id for n in names))))
    for rel in src.files:
        now = ingest.identity(src.root / rel)
        ids = filecache.lookup(txn, now, filecache.BLOB)
        if ids is not None and len(ids) == 1:
            out.files[rel] = ids[0]
            sink.progress.advance(now.size)
            continue
        blob, seen = ingest.read_blob(sink, src.root / rel, rel)
        out.objects.append(blob)
        out.files[rel] = blob.id
        if seen is not None:
            out.seen.append(filecache.Entry(seen.identity, seen.began_ns, filecache.BLOB, (blob.id,)))
    return out


def _writes(fn: Callable[Concatenate[Repo, P], R]) -> Callable[Concatenate[Repo, P], R]:
    """Run a command that writes chunks under the store's writer lock (see Store.writing), so a
    concurrent gc can neither delete its chunks before its commit nor be confused by them."""

    @functools.wraps(fn)
    def wrapper(self: Repo, *args: P.args, **kwargs: P.kwargs) -> R:
        with self.store.writing():
            return fn(self, *args, **kwargs)

    return wrapper


def _merged_inputs(r: Txn, plan: Plan) -> list[bytes]:
    """The merge commits among a plan's inputs and, recursively, theirs: deepest first, each once."""
    out: list[bytes] = []

    def visit(p: Plan) -> None:
        for cid in [p.base, *p.models, *(p.adapters or [])]:
            if cid is None or cid in out:
                continue
            c = r.commit(cid)
            if c.plan is not None:
                visit(r.plan(c.plan))
                if cid not in out:
                    out.append(cid)

    visit(plan)
    return out


def _workers(threads: int | None) -> int:
    """Worker threads for a verb that computes: as asked (checked before any work), else every core."""
    return check_threads(threads) or os.cpu_count() or 1


def _author() -> str:
    return os.environ.get("MP_AUTHOR") or getpass.getuser()


def _import_root() -> str:
    """Where this mpstore package is imported from, for a child interpreter to import the same."""
    return str(Path(__file__).resolve().parent.parent)


def _catalog_rules() -> CatalogRules:
    """The merge layer's rules for catalog entries (numpy only, no torch)."""
    from .merge.catalog import RULES

    return RULES


class Repo:
    """A repository: a directory holding `.mp/`, the LMDB store."""

    def __init__(self, root: Path, store: Store):
        self.root = root
        self.store = store
        with store.read() as r:
            self.chunk_size = int(r.meta("chunk_size") or 0)
            self._lazy = r.meta("lazy")  # a lazy clone: the remote its missing chunks come from
        self._lazy_remote: Transport | None = None
        self._fetched: dict[bytes, bytes] = {}  # chunks read from the remote one by one, to keep
        if self._lazy is not None:
            store.fallback = self._lazy_chunk

    # opening ------------------------------------------------------------------------------
    @classmethod
    def init(
        cls, path: Path | str = ".", chunk_size: int = DEFAULT_CHUNK_SIZE, map_size: int = DEFAULT_MAP_SIZE,
        compress: str = DEFAULT_COMPRESS,
    ) -> Repo:
        """Create an empty repository in `path` (its `.mp/` must not exist yet). `compress`: how
        new chunks are stored (store.chunks.policy: none, planes or delta)."""
        root = Path(path)
        if (root / STORE_DIR).exists():
            raise RepositoryExists(f"{root / STORE_DIR} already exists")
        if type(chunk_size) is not int:  # 4096.0 would be stored as "4096.0", which no open can read
            raise MpError(f"invalid chunk size {chunk_size!r}: must be an int (a whole number of bytes)")
        if chunk_size % MAX_ITEMSIZE or not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
            raise MpError(
                f"invalid chunk size {chunk_size}: must be a multiple of {MAX_ITEMSIZE} "
                f"between {MIN_CHUNK_SIZE} and {MAX_CHUNK_SIZE} bytes"
            )
        if compress not in POLICIES:
            raise MpError(f"invalid compression {compress!r}: choose one of {', '.join(POLICIES)}")
        store = Store.create(root / STORE_DIR, {"chunk_size": str(chunk_size), COMPRESS_KEY: compress}, map_size)
        return cls(root, store)

    @classmethod
    def open(cls, path: Path | str = ".") -> Repo:
        """Open the repository at `path` or in the nearest folder above it that has one."""
        start = Path(path).absolute()
        problem = _checkout.too_long(start)
        if problem:
            raise NotARepository(f"{start}: {problem}")
        for folder in (start, *start.parents):
            try:
                found = (folder / STORE_DIR / "data.mdb").is_file()
            except OSError as e:  # a folder on the way that cannot be looked into
                raise NotARepository(f"{folder}: {e.strerror or e}") from None
            if found:
                return cls(folder, Store.open(folder / STORE_DIR))
        raise NotARepository(f"not an mpstore repository (no {STORE_DIR} in {start} or above); run `mp init`")

    def close(self) -> None:
        try:
            self._keep_fetched()
        finally:
            if self._lazy_remote is not None:
                self._lazy_remote.close()
            self.store.close()

    def __enter__(self) -> Repo:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # refs ---------------------------------------------------------------------------------
    def resolve(self, spec: str) -> bytes:
        with self.store.read() as r:
            return resolve(r, spec)

    def current_branch(self) -> str | None:
        """The branch last written to: what `mp log` shows when given no ref."""
        with self.store.read() as r:
            return r.meta("HEAD")

    def branches(self) -> dict[str, bytes]:
        with self.store.read() as r:
            return {k[len(BRANCH_PREFIX):]: v for k, v in r.refs(BRANCH_PREFIX).items()}

    def tags(self) -> dict[str, bytes]:
        with self.store.read() as r:
            return {k[len(TAG_PREFIX):]: v for k, v in r.refs(TAG_PREFIX).items()}

    def branch_rows(self) -> list[RefRow]:
        current = self.current_branch()
        with self.store.read() as r:
            return [RefRow(n, cid, r.commit(cid).message, n == current) for n, cid in sorted(self.branches().items())]

    def tag_rows(self) -> list[RefRow]:
        with self.store.read() as r:
            return [RefRow(n, cid, r.commit(cid).message) for n, cid in sorted(self.tags().items())]

    def reflog(self, branch: str) -> ReflogResult:
        """Every move of a branch, oldest first: old and new ids, time, command. A branch whose
        entries gc expired has none (`head` says where it is); one that neither exists nor has
        entries is unknown."""
        with self.store.read() as r:
            entries = r.reflog(BRANCH_PREFIX + branch)  # kept after a delete, until gc expires it
            head = r.ref(BRANCH_PREFIX + branch)
        if not entries and head is None:
            raise UnknownRef(f"unknown branch {branch!r}")
        return ReflogResult(branch, entries, head)  # a live branch whose history gc expired: none

    def _move(self, ref: str, target: str | None, command: str, must_exist: bool | None) -> bytes | None:
        """Point `ref` at `target`'s commit (None: delete it) in one transaction, with a reflog
        entry; returns where it pointed before. must_exist: True (the ref must exist), False (must
        not), None (either)."""
        cid = self.resolve(target) if target is not None else None
        kind = "tag" if ref.startswith(TAG_PREFIX) else "branch"
        short_name = ref.split("/", 1)[1]

        def move(txn: Txn) -> bytes | None:
            old = txn.ref(ref)
            if must_exist is True and old is None:
                raise UnknownRef(f"unknown {kind} {short_name!r}")
            if must_exist is False and old is not None:
                raise BadRefName(f"{kind} {short_name!r} already exists")
            if cid is not None and not txn.has_object(cid):  # gc deletes whole closures at once
                raise UnknownRef(f"commit {short(cid)} is gone (collected by gc)")
            txn.set_ref_if_equals(ref, old, cid, command, timestamp())  # old was read in this txn
            if cid is None and kind == "branch" and txn.meta("HEAD") == short_name:
                txn.delete_meta("HEAD")
            return old

        old = self.store.write(move)
        self.store.sync()
        return old

    def create_branch(self, name: str, ref: str) -> bytes:
        check_name(name)
        self._move(BRANCH_PREFIX + name, ref, f"branch {name} {ref}", must_exist=False)
        return self.resolve(name)

    def delete_branch(self, name: str) -> bytes:
        old = self._move(BRANCH_PREFIX + name, None, f"branch -d {name}", must_exist=True)
        assert old is not None  # must_exist
        return old

    def reset(self, branch: str, ref: str) -> bytes:
        """Move an existing branch to `ref` (the old head stays reachable through the reflog)."""
        self._move(BRANCH_PREFIX + branch, ref, f"reset {branch} {ref}", must_exist=True)
        return self.resolve(branch)

    def tag(self, name: str, ref: str) -> bytes:
        """Tags never move: creating one that exists is an error."""
        check_name(name, "tag")
        self._move(TAG_PREFIX + name, ref, f"tag {name} {ref}", must_exist=False)
        return self.resolve(TAG_PREFIX + name)

    def delete_tag(self, name: str) -> bytes:
        old = self._move(TAG_PREFIX + name, None, f"tag -d {name}", must_exist=True)
        assert old is not None  # must_exist
        return old

    # committing ---------------------------------------------------------------------------
    def _commit(self, branch: str, snapshot: Snapshot, objects: list[StoredObject], message: str, command: str,
                parents: Callable[[bytes | None], list[bytes]], expect: bytes | None = None,
                base: bytes | None = None, plan: Plan | None = None, new_bytes: int = 0,
                stats: dict | None = None, source: dict | None = None) -> bytes:
        """The one way a commit becomes visible: its objects, the commit and the branch move in
        one write transaction. `parents` gets the branch's head as found in that transaction;
        with `expect`, the branch must still be there (a revert computed against it), else
        nothing is written."""

        def commit(txn: Txn) -> bytes:
            head = txn.ref(BRANCH_PREFIX + branch)
            if expect is not None and head != expect:
                raise BadMerge(f"branch {branch!r} moved while the commit was prepared; run it again")
            for obj in objects:
                txn.put_object(obj)
            c = Commit(txn.put_object(snapshot), tuple(parents(head)), message, _author(), timestamp(),
                       base=base, plan=txn.put_object(plan) if plan else None, new_bytes=new_bytes, stats=stats,
                       source=source)
            cid = txn.put_object(c)
            txn.set_ref_if_equals(BRANCH_PREFIX + branch, head, cid, command, c.time)  # head read here
            txn.set_meta("HEAD", branch)
            return cid

        cid = self.store.write(commit, reserve=sum(len(o.encoded) for o in objects) + (1 << 20))
        self.store.sync()
        return cid

    # add ----------------------------------------------------------------------------------
    @_writes
    def add(
        self,
        source: Path | str,
        name: str,
        base: str | None = None,
        message: str | None = None,
        progress: Progress | None = None,
    ) -> AddResult:
        """Store a model folder (or one .safetensors file, or `hf://ORG/NAME[@REVISION]` from the
        Hugging Face cache) as a new commit on branch `name`.

        Files the file-identity cache vouches for are not read (store/filecache.py); the others
        are read once, and with `base` the delta catalog is measured in that same pass."""
        progress = progress or Silent()
        check_name(name)
        base_id = self.resolve(base) if base else None
        folder, origin = hub.locate(source)  # hf://…: its snapshot folder in the HF cache, and provenance
        src = ingest.scan(folder, store=self.store.path)  # never the repository's own store
        total = ingest.total_bytes(src)
        sink = ChunkSink(self.store, self.chunk_size, progress)
        threads = os.cpu_count() or 1
        progress.start(f"add {name}", total)
        try:
            with sink.pipelined(reserve=total + total // 8) as txn:
                recorder = None
                base_tensors = None
                if base_id is not None:  # the catalog of this expert's deltas, measured as it is read
                    from .merge.catalog import Recorder

                    base_snap = txn.snapshot_of(base_id)
                    base_tensors = {n: txn.tensor(t) for n, t in base_snap.tensors.items()}
                    recorder = Recorder(txn, sink, base_tensors, threads)
                try:
                    got = _read_source(txn, sink, src, recorder, base_tensors)
                finally:
                    measured = recorder.finish() if recorder is not None else None
        finally:
            progress.finish()
        snapshot = Snapshot(got.tensors, got.files, tuple(got.shards))
        analyzed = None
        if base_id is not None:  # what the add did not read (cached files) is measured from the store
            from .merge.catalog import analyze

            with self.store.read() as r:
                pairs = _pairs(r, snapshot.tensors, r.snapshot_of(base_id), got.known)
            analyzed = analyze(self.store, pairs, progress, threads, measured)
        # `mp add .`: the folder's real name; hf://ORG/NAME as given
        folder_name = source if hub.is_reference(source) else Path(os.path.abspath(source)).name or str(source)
        cid = self._commit(name, snapshot, got.objects, message if message is not None else f"add {folder_name}",
                           f"add {source}", lambda head: [head] if head else [], base=base_id,
                           new_bytes=sink.new_bytes, source=origin.to_fields() if origin else None)
        if got.seen:  # after the commit: an entry names objects that exist (a lost one is a miss)
            self.store.write(lambda txn: filecache.record(txn, got.seen))
        return AddResult(cid, sink.new_bytes, total, analyzed)

    # reading ------------------------------------------------------------------------------
    def commit(self, spec: str) -> CommitInfo:
        with self.store.read() as r:
            cid = resolve(r, spec)
            return CommitInfo(cid, r.commit(cid))

    def _default_ref(self, spec: str | None) -> str:
        """`spec`, or the branch last written (HEAD). Without either, say what there is to ask
        for: the branches (HEAD's was deleted), the tags, or truly nothing."""
        if spec:
            return spec
        with self.store.read() as r:
            head = r.meta("HEAD")
            if head is not None and r.ref(BRANCH_PREFIX + head) is not None:
                return head
            branches = sorted(k[len(BRANCH_PREFIX):] for k in r.refs(BRANCH_PREFIX))
            tags = sorted(k[len(TAG_PREFIX):] for k in r.refs(TAG_PREFIX))
            history = r.entries(b"reflog") > 0

        def listed(names: list[str]) -> str:
            return ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")

        if branches:
            raise UnknownRef(f"no current branch (the branch last written was deleted): give a ref, "
                             f"e.g. one of the branches {listed(branches)}")
        if tags:
            raise UnknownRef(f"no branch left: give a ref, e.g. one of the tags {listed(tags)}")
        if history:
            raise UnknownRef("no branch or tag left (deleted branches keep their history: mp reflog NAME)")
        raise UnknownRef("nothing to log: the repository has no commits yet")

    def log(self, spec: str | None = None) -> list[CommitInfo]:
        """Every commit reachable from `spec` (default: HEAD's branch), newest first."""
        ref = self._default_ref(spec)
        with self.store.read() as r:
            seen: dict[bytes, Commit] = {}
            todo = [resolve(r, ref)]
            while todo:
                cid = todo.pop()
                if cid not in seen:
                    seen[cid] = r.commit(cid)
                    todo.extend(seen[cid].parents)
        return [CommitInfo(k, v) for k, v in sorted(seen.items(), key=lambda kv: kv[1].time, reverse=True)]

    def ls(self, spec: str) -> list[TensorRow]:
        """The tensors of a commit in file order: name, dtype, shape, bytes, file."""
        with self.store.read() as r:
            snap = r.snapshot_of(resolve(r, spec))
            rows = []
            for shard in snap.shards:
                for name in shard.tensors:
                    t = r.tensor(snap.tensors[name])
                    rows.append(TensorRow(name, t.dtype, list(t.shape), t.size, shard.file))
            return rows

    def show(self, spec: str) -> ShowResult:
        """A commit with what people ask of a model: size, parameters, dtypes, dedup, files."""
        info = self.commit(spec)
        rows = self.ls(info.id.hex())
        params: Counter[str] = Counter()
        for row in rows:
            params[row.dtype] += math.prod(row.shape)
        with self.store.read() as r:
            snap = r.snapshot(info.commit.snapshot)
            size = _checkout.snapshot_size(r, snap)
            plan = r.plan(info.commit.plan) if info.commit.plan else None
            space = usage(r, self._chunks_of([info.id], tensors=True))
        return ShowResult(info, size, sum(row.bytes for row in rows), len(rows), sum(params.values()), dict(params),
                          sorted([*snap.files, *(s.file for s in snap.shards)]), plan, space)

    def checkout(self, spec: str, out: Path | str, force: bool = False, progress: Progress | None = None) -> bytes:
        """Rebuild the commit's folder at `out`, byte-identical to what was added."""
        info = self.commit(spec)
        if self._lazy is not None:
            self._prefill(self._chunks_of([info.id], tensors=True))
        _checkout.checkout(self.store, info.commit.snapshot, Path(out), force, progress or Silent())
        return info.id

    def diff(self, a: str, b: str) -> DiffResult:
        if self._lazy is not None:
            self._prefill(self._differing_chunks(a, b))
        with self.store.read() as r:
            ca, cb = resolve(r, a), resolve(r, b)
            tensors = diff_snapshots(self.store, r, r.commit(ca).snapshot, r.commit(cb).snapshot)
        return DiffResult(ca, cb, tensors)

    def _differing_chunks(self, a: str, b: str) -> list[bytes]:
        """The chunks a diff of `a` and `b` reads: where tensors of one name and layout differ."""
        with self.store.read() as r:
            sa, sb = r.snapshot_of(resolve(r, a)), r.snapshot_of(resolve(r, b))
            keys: list[bytes] = []
            for name, tid in sa.tensors.items():
                other = sb.tensors.get(name)
                if other is None or other == tid:
                    continue
                ta, tb = r.tensor(tid), r.tensor(other)
                if (ta.dtype, ta.shape) == (tb.dtype, tb.shape):
                    keys += [k for pair in zip(ta.chunks, tb.chunks) if pair[0] != pair[1] for k in pair]
            return keys

    def describe(self, cid: bytes) -> str:
        """`short-id message` for listings."""
        with self.store.read() as r:
            return f"{short(cid)} {r.commit(cid).message}"

    # merging ------------------------------------------------------------------------------
    def plan(self, request: MergeRequest, budget: str | None = None, select: str | Selector = "greedy",
             memory_limit: int = 1 << 30) -> Plan:
        """The plan a merge request resolves to, with the reads a budget allows ('10%' of the
        experts' differing bytes, or a size) and the estimate of what executing it will cost.
        Validates refs, method, parameters and every tensor; reads no chunk."""
        from .merge.executor import ENGINE_VERSION
        from .merge.planner import parse_budget
        from .merge.planner import plan as make_plan
        from .merge.request import to_plan

        # A budget's plan looks up catalog entries scattered through the file: read-ahead off,
        # or each cold lookup reads the device's whole window around it (docs/benchmarks.md).
        with self.store.read() as r, (self.store.no_read_ahead() if budget is not None else nullcontext()):
            resolved = to_plan(request, lambda spec: resolve(r, spec), self.chunk_size, ENGINE_VERSION)
            return make_plan(r, resolved, parse_budget(budget) if budget is not None else None,
                             select, memory_limit)

    def analyze(self, spec: str, base: str, threads: int | None = None,
                progress: Progress | None = None) -> AnalyzeResult:
        """Record the delta catalog of `spec` against `base` (what `add --base` does at add time)."""
        with self.store.read() as r:
            expert = r.snapshot_of(resolve(r, spec))
            pairs = _pairs(r, expert.tensors, r.snapshot_of(resolve(r, base)), {})
        from .merge.catalog import analyze

        with self.store.writing():
            return analyze(self.store, pairs, progress or Silent(), _workers(threads))

    @_writes
    def merge(
        self,
        request: MergeRequest,
        branch: str,
        message: str | None = None,
        threads: int | None = None,
        memory_limit: int = 1 << 30,
        progress: Progress | None = None,
        budget: str | None = None,
        select: str | Selector = "greedy",
    ) -> MergeResult:
        """Execute a merge and commit it, with its plan, on `branch` in one transaction.

        Parents are [base, inputs...] (plus the branch's previous head, last, when it is not
        already one of them), so the lineage of every merged model stays in the store."""
        from .merge.executor import execute

        check_name(branch)
        workers = _workers(threads)
        began = time.perf_counter()
        plan = self.plan(request, budget, select, memory_limit)
        planned = time.perf_counter() - began
        if self._lazy is not None:
            from .merge.executor import chunks_read

            inputs = [*([plan.base] if plan.base else []), *plan.models, *(a for a in plan.adapters or [] if a)]
            self._prefill(chunks_read(self.store, plan, memory_limit) + self._chunks_of(inputs, tensors=False))
        sink = ChunkSink(self.store, self.chunk_size, progress or Silent())
        result = execute(self.store, plan, sink, progress or Silent(), workers, memory_limit)
        result.realized.seconds = {"plan": round(planned, 3), **result.realized.seconds}
        inputs = [plan.base] if plan.base else []
        inputs += [m for m in [*plan.models, *(plan.adapters or [])] if m and m not in inputs]

        def parents(head: bytes | None) -> list[bytes]:
            return inputs + [head] if head is not None and head not in inputs else inputs

        began = time.perf_counter()
        cid = self._commit(branch, result.snapshot, result.objects,
                           message if message is not None else f"merge {plan.method} of {len(plan.models)} models",
                           f"merge {plan.method}", parents, base=plan.base, plan=plan, new_bytes=sink.new_bytes,
                           stats=result.realized.to_json())
        return MergeResult(cid, plan, result.realized.to_json(), round(time.perf_counter() - began, 3))

    def merge_stages(self, requests: list[MergeRequest], branch: str | None, threads: int | None = None,
                     memory_limit: int = 1 << 30, progress: Progress | None = None) -> list[MergeResult]:
        """Run a multi-stage config: each stage commits on the branch its `name:` gives (the last
        on `branch` when given), so later stages name earlier ones as refs. Every stage is checked
        against its method before the first runs; stages commit one by one, so a stage that fails
        while merging leaves the earlier stages' commits."""
        from .merge.executor import ENGINE_VERSION
        from .merge.request import to_plan

        names = {r.name for r in requests if r.name}
        with self.store.read() as r:

            def early(spec: str) -> bytes:  # a later stage's reference to an earlier one's branch
                return bytes(16) if spec in names else resolve(r, spec)

            for req in requests:
                to_plan(req, early, self.chunk_size, ENGINE_VERSION)
        out = []
        for i, req in enumerate(requests):
            target = branch if i == len(requests) - 1 and branch else req.name
            if target is None:
                raise BadMerge("the last stage has no `name:`: give -b BRANCH to commit it on")
            out.append(self.merge(req, target, threads=threads, memory_limit=memory_limit, progress=progress))
        return out

    def replay(self, spec: str, threads: int | None = None, memory_limit: int = 1 << 30,
               progress: Progress | None = None, chain: bool = True) -> ReplayResult:
        """Re-execute a merge commit's stored plan from its stored inputs; write nothing. With
        `chain`, the merges its inputs came from are replayed first (a multi-stage config's
        earlier stages), so the whole chain is shown to reproduce."""
        from .merge.executor import ENGINE_VERSION, execute

        info = self.commit(spec)
        if info.commit.plan is None:
            raise BadMerge(f"{short(info.id)} is not a merge: it has no plan to replay")
        with self.store.read() as r:
            plan = r.plan(info.commit.plan)
            stored = r.snapshot(info.commit.snapshot)
            earlier = _merged_inputs(r, plan) if chain else []
        done = [self.replay(c.hex(), threads, memory_limit, progress, chain=False) for c in earlier]
        sink = ChunkSink(self.store, self.chunk_size, progress or Silent(), dry=True)
        result = execute(self.store, plan, sink, progress or Silent(), _workers(threads),
                         memory_limit)
        again = result.snapshot
        engine = plan.engine if plan.engine != ENGINE_VERSION else None
        if again.id == info.commit.snapshot:
            return ReplayResult(info.id, True, [], done, engine)
        differing = sorted(
            {n for n in stored.tensors.keys() | again.tensors.keys() if stored.tensors.get(n) != again.tensors.get(n)}
            | {f for f in stored.files.keys() | again.files.keys() if stored.files.get(f) != again.files.get(f)}
        )
        return ReplayResult(info.id, False, differing or ["(shard headers)"], done, engine)

    @_writes
    def revert(self, spec: str, branch: str | None = None, force: bool = False,
               message: str | None = None) -> bytes:
        """A new commit on `branch` (default: HEAD's) undoing `spec`'s changes tensor by tensor."""
        branch = branch or self.current_branch()
        if branch is None:
            raise UnknownRef("no branch to revert on: pass -b BRANCH")
        check_name(branch)
        sink = ChunkSink(self.store, self.chunk_size, Silent())
        with self.store.read() as r:
            cid = resolve(r, spec)
            c = r.commit(cid)
            if not c.parents:
                raise BadMerge(f"{short(cid)} has no parent: there is nothing to revert it to")
            head_id = r.ref(BRANCH_PREFIX + branch)
            if head_id is None:
                raise UnknownRef(f"unknown branch {branch!r}")
            new, objects, conflicts, reverted = _revert(
                r, sink, r.snapshot_of(c.parents[0]), r.snapshot_of(cid), r.snapshot_of(head_id), force)
        if conflicts:
            shown = ", ".join(n if n.isprintable() else repr(n) for n in conflicts[:5])  # one line, always
            shown += f" and {len(conflicts) - 5} more" if len(conflicts) > 5 else ""
            raise BadMerge(f"revert conflicts: changed again since {short(cid)}: {shown} (use --force)")
        if not reverted:
            raise BadMerge(f"nothing to revert: {short(cid)} changed nothing relative to its parent")
        sink.flush()
        return self._commit(branch, new, list(objects), message or f"revert {short(cid)}: {c.message}",
                            f"revert {short(cid)}", lambda head: [head_id], expect=head_id, base=c.base)

    def lineage(self, spec: str | None = None, depth: int = 6) -> LineageNode:
        """A commit and, recursively, its parents: what `mp log --graph` draws."""
        seen: set[bytes] = set()
        ref = self._default_ref(spec)
        with self.store.read() as r:
            def node(cid: bytes, level: int) -> LineageNode:
                c = r.commit(cid)
                method = r.plan(c.plan).method if c.plan else None
                if cid in seen:
                    return LineageNode(cid, c.message, c.time, method, seen=True)
                seen.add(cid)
                parents = [node(p, level + 1) for p in c.parents] if level < depth else []
                return LineageNode(cid, c.message, c.time, method, parents=parents)

            return node(resolve(r, ref), 0)

    # integrity and space ------------------------------------------------------------------
    def fsck(self, isolate: bool = False) -> FsckResult:
        """Every problem in the store, one line each, and counts of what was checked.

        LMDB meets some damage to its B-trees (a zeroed page) with an assertion that aborts the
        process. With `isolate` (what `mp fsck` does) the check runs in a child interpreter, so
        such damage becomes a problem line instead of killing the caller."""
        if not isolate:
            return _fsck(self.store, _catalog_rules())
        path = os.pathsep.join(filter(None, (_import_root(), os.environ.get("PYTHONPATH"))))
        child = subprocess.run(
            [sys.executable, "-c", "import json, sys; from mpstore import Repo; r = Repo.open(sys.argv[1]); "
             "print(json.dumps(r.fsck().to_json()))", str(self.root.absolute())],
            capture_output=True, text=True, cwd=_import_root(),  # `-c` imports from the working folder first
            env={**os.environ, "PYTHONPATH": path},
        )
        if child.returncode == 0:
            return FsckResult.from_json(json.loads(child.stdout))
        last = (child.stderr.strip().splitlines() or ["no message"])[-1]
        if child.returncode < 0:
            what = f"LMDB stopped on it with signal {signal.Signals(-child.returncode).name} ({last})"
        else:
            what = last.removeprefix("mp: error: ")
        return FsckResult([f"{self.store.path / 'data.mdb'}: the file is damaged: {what}; check out what "
                           "you need (`mp checkout`) and restore .mp from a backup"])

    def gc(self, expire: str = "30d", compact: bool = False, recompress: str | None = None,
           progress: Progress | None = None) -> GcResult:
        """Delete what nothing live reaches; with `recompress`, store every chunk again under
        that compression policy (which new chunks follow from then on); with `compact`, give
        the space back to the disk."""
        if recompress is not None and recompress not in POLICIES:
            raise MpError(f"invalid compression {recompress!r}: choose one of {', '.join(POLICIES)}")
        freed = _gc.collect(self.store, _gc.parse_expire(expire), _catalog_rules())
        redone = None
        if recompress is not None:
            from .store.recompress import recompress as _recompress

            redone = _recompress(self.store, recompress, progress or Silent())
        if not compact:
            return GcResult(freed, recompressed=redone)
        before, after = self.store.compact()
        return GcResult(freed, before, after, redone)

    def status(self, expire: str = "30d") -> StatusResult:
        """Branches, tags, store size, entry counts and what gc could reclaim."""
        with self.store.read() as r:
            counts = {db: r.entries(db.encode()) for db in ("chunks", "objects", "reflog", "catalog")}
            space = usage(r)
        return StatusResult(
            self.current_branch(), self.branch_rows(), self.tag_rows(), self.store.file_bytes(),
            self.store.used_bytes(), counts, self.chunk_size,
            _gc.reclaimable(self.store, _gc.parse_expire(expire), _catalog_rules()), space, policy(self.store),
        )

    # remotes ------------------------------------------------------------------------------
    def remotes(self) -> dict[str, str]:
        """Remote name -> URL. Only the URL is kept: credentials come from the environment."""
        with self.store.read() as r:
            return {k[len(REMOTE_KEY):].decode(): bytes(v).decode() for k, v in r.meta_items(REMOTE_KEY)}

    def remote_add(self, name: str, url: str) -> str:
        """Name a remote; a path is kept absolute, so the name works from any folder."""
        from .remote.connect import normal_url

        check_name(name, "remote")
        if "/" in name:
            raise BadRefName(f"invalid remote name {name!r}: contains '/'")
        url = normal_url(url)
        key = REMOTE_KEY + name.encode()

        def add(t: Txn) -> None:
            if t.meta_bytes(key) is not None:
                raise BadRefName(f"remote {name!r} already exists")
            t.set_meta_bytes(key, url.encode())

        self.store.write(add)
        self.store.sync()
        return url

    def remote_remove(self, name: str) -> None:
        """Forget a remote, its remote-tracking refs and its cached pack indexes."""
        from .store.refs import REMOTES_PREFIX

        self._remote_url(name)
        prefix = f"{REMOTES_PREFIX}{name}/"

        def remove(t: Txn) -> None:
            t.delete(b"meta", REMOTE_KEY + name.encode())
            for ref, cid in t.refs(prefix).items():
                t.set_ref_if_equals(ref, cid, None, f"remote remove {name}", timestamp())

        self.store.write(remove)
        self.store.sync()
        shutil.rmtree(self.store.path / "remotes" / name, ignore_errors=True)

    def _remote_url(self, name: str) -> str:
        url = self.remotes().get(name)
        if url is None:
            raise UnknownRef(f"no remote named {name!r} (see `mp remote -v`)")
        return url

    def _connect(self, name: str) -> Transport:
        from .remote.connect import open_transport

        return open_transport(self._remote_url(name), self.store.path / "remotes" / name)

    def fetch(self, remote: str = "origin") -> Moved:
        """Bring the remote's branches (as `REMOTE/BRANCH`) and tags, with what they reach that
        this repository lacks (in a lazy clone, objects only)."""
        from .remote import sync

        with closing(self._connect(remote)) as t, self.store.writing():
            return sync.fetch(self.store, t, remote, lazy=self._lazy is not None)

    def push(self, remote: str = "origin", refs: list[str] | None = None, force: bool = False) -> Moved:
        """Send branches and tags (default: the current branch) and what they reach that the
        remote lacks, then move the remote's refs by compare-and-swap."""
        from .remote import sync

        names = [self._push_name(n) for n in refs or [self._current_or_fail("push")]]
        with closing(self._connect(remote)) as t:
            return sync.push(self.store, t, remote, names, force,
                             self._lazy_transport() if self._lazy is not None else None)

    def _push_name(self, spec: str) -> str:
        if spec.startswith(TAG_PREFIX):
            return spec
        with self.store.read() as r:
            if r.ref(BRANCH_PREFIX + spec) is not None:
                return BRANCH_PREFIX + spec
            if r.ref(TAG_PREFIX + spec) is not None:
                return TAG_PREFIX + spec
        raise UnknownRef(f"nothing to push: no branch or tag {spec!r}")

    def _current_or_fail(self, verb: str) -> str:
        current = self.current_branch()
        if current is None:
            raise UnknownRef(f"no current branch to {verb}: name the branch")
        return current

    def pull(self, remote: str = "origin", branch: str | None = None) -> PullResult:
        """Fetch, then fast-forward `branch` (default: the current one) to `REMOTE/BRANCH`;
        a branch with commits the remote's lacks is refused, nothing moved."""
        from .remote.sync import is_fast_forward, tracking

        branch = branch or self._current_or_fail("pull")
        check_name(branch)
        moved = self.fetch(remote)
        with self.store.read() as r:
            target = r.ref(tracking(remote, BRANCH_PREFIX + branch))
            old = r.ref(BRANCH_PREFIX + branch)
        if target is None:
            raise UnknownRef(f"remote {remote!r} has no branch {branch!r}")
        if old != target and not is_fast_forward(self.store, old, target):
            raise Rejected(f"not a fast-forward: {branch} has commits {remote}/{branch} lacks; "
                           f"merge them (mp merge) or move the branch (mp reset {branch} {remote}/{branch})")

        def move(t: Txn) -> None:
            if not t.set_ref_if_equals(BRANCH_PREFIX + branch, old, target, f"pull {remote}", timestamp()):
                raise Rejected(f"{branch} moved during the pull; run it again")
            t.set_meta("HEAD", branch)

        if old != target:
            self.store.write(move)
            self.store.sync()
        return PullResult(branch, old, target, moved)

    @classmethod
    def clone(cls, url: str, path: Path | str, lazy: bool = False) -> tuple[Repo, Moved]:
        """A new repository at `path` holding the remote's history as `origin`, its HEAD branch
        checked out as the current branch; `lazy`: objects only, chunks fetched when read."""
        from .remote.connect import normal_url, open_transport

        root = Path(path)
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise TargetExists(f"{root} exists and is not an empty folder")
        url = normal_url(url)
        with closing(open_transport(url, None)) as t:
            info = t.info()  # a wrong URL fails here, before anything is written
        made = not root.exists()
        try:
            repo = cls.init(root, chunk_size=info.chunk_size or DEFAULT_CHUNK_SIZE)
            try:
                repo.remote_add("origin", url)
                if lazy:
                    repo.store.write(lambda t: t.set_meta("lazy", "origin"))
                    repo._lazy = "origin"
                    repo.store.fallback = repo._lazy_chunk
                moved = repo.fetch("origin")
                branches = repo.branches_of("origin")
                head = next((b for b in (info.head, "main") if b in branches), min(branches, default=None))
                if head is not None and (cid := branches.get(head)) is not None:
                    def start(t: Txn) -> None:
                        t.add_ref_if_new(BRANCH_PREFIX + head, cid, f"clone {url}", timestamp())
                        t.set_meta("HEAD", head)

                    repo.store.write(start)
                    repo.store.sync()
            except BaseException:
                repo.close()
                raise
        except BaseException:
            shutil.rmtree(root / STORE_DIR if not made else root, ignore_errors=True)
            raise
        return repo, moved

    def branches_of(self, remote: str) -> dict[str, bytes]:
        """The remote-tracking branches of `remote`: branch name -> commit id."""
        from .store.refs import REMOTES_PREFIX

        prefix = f"{REMOTES_PREFIX}{remote}/"
        with self.store.read() as r:
            return {k[len(prefix):]: v for k, v in r.refs(prefix).items()}

    # lazy clones: chunks come from the remote when first read, and stay ---------------------
    def _lazy_transport(self) -> Transport:
        if self._lazy_remote is None:
            assert self._lazy is not None
            self._lazy_remote = self._connect(self._lazy)
        return self._lazy_remote

    def _lazy_chunk(self, key: bytes) -> bytes:
        """A chunk this lazy clone lacks, from its remote, checked; kept when the verb ends."""
        from .remote.transport import CHUNK
        from .store.env import checked_stored

        if key in self._fetched:
            return self._fetched[key]
        t = self._lazy_transport()
        got = dict(t.get(CHUNK, [key]))
        if key not in got:
            raise CorruptData(f"chunk {key.hex()} is missing, here and on {t.url}")
        with self.store.read() as r:  # a delta's reference: here, or fetched the same way
            checked_stored(key, got[key], r.reference)
        self._fetched[key] = got[key]
        return got[key]

    def _chunks_of(self, commits: list[bytes], tensors: bool) -> list[bytes]:
        """The chunks of the commits' files and shard headers, and of their tensors if asked."""
        with self.store.read() as r:
            keys: list[bytes] = []
            for cid in commits:
                snap = r.snapshot_of(cid)
                objects = [*snap.files.values(), *(s.header for s in snap.shards)]
                for oid in [*(snap.tensors.values() if tensors else ()), *objects]:
                    keys += r.object_of(oid, Chunked).chunks
            return keys

    def _prefill(self, keys: list[bytes]) -> int:
        """In a lazy clone, fetch the chunks among `keys` not here yet (in batches, ranged reads
        of the remote's packs) before a verb reads them; returns the bytes downloaded."""
        if self._lazy is None:
            return 0
        from .remote.sync import fill

        return fill(self.store, self._lazy_transport(), keys).wire_bytes

    def _keep_fetched(self) -> None:
        """Store the chunks a lazy read fetched one by one, so they are never fetched again."""
        if not self._fetched or self.store.readonly:
            return
        fetched, self._fetched = self._fetched, {}

        def keep(t: Txn) -> None:
            for key, data in fetched.items():
                t.put_stored_chunk(key, data)

        with self.store.writing():
            self.store.write(keep, reserve=sum(map(len, fetched.values())) + (1 << 20))
        self.store.sync()

    def network_bytes(self, plan: Plan, memory_limit: int = 1 << 30) -> int | None:
        """Bytes a merge of `plan` would download (a lazy clone: the chunks it reads that are
        not here yet, as the remote stores them), or None in a full repository."""
        if self._lazy is None:
            return None
        from .merge.executor import chunks_read
        from .remote.transport import CHUNK

        reads = chunks_read(self.store, plan, memory_limit)
        with self.store.read() as r:
            missing = [k for k in dict.fromkeys(reads) if not r.has_chunk(k)]
        return sum(self._lazy_transport().sizes(CHUNK, missing).values())
