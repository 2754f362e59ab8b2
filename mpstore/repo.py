"""`Repo`: the Python API of mpstore, which the CLI wraps and the tests call.

It ties the store, objects, refs, ingest, checkout and diff together and owns every ref update:
a verb validates all of its input first, writes chunks, then makes its objects and moves its
ref in one final transaction, so a reader sees the old commit or the new one, never half of one.
"""

from __future__ import annotations

import functools
import getpass
import math
import os
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from .model import checkout as _checkout
from .model import ingest
from .store.chunks import ChunkSink
from .model.diff import DiffResult, diff_snapshots
from .model.revert import revert as _revert
from .store.dtypes import MAX_ITEMSIZE
from .errors import BadMerge, BadRefName, MpError, NotARepository, RepositoryExists, UnknownRef
from .store.ids import short
from .store.objects import Blob, Commit, Plan, Snapshot, Tensor, encode, object_id
from .progress import Progress, Silent

# The merge engine (executor, methods, mergeconfig) imports torch, which takes seconds: it is
# imported where a merge needs it, so add/checkout/log stay fast to start.
from .store.refs import BRANCH_PREFIX, TAG_PREFIX, check_name, resolve
from .store.env import DEFAULT_MAP_SIZE, Store, Txn

if TYPE_CHECKING:
    from .merge.request import MergeRequest
    from .merge.catalog import AnalyzeResult
    from .merge.planner import Selector

STORE_DIR = ".mp"
DEFAULT_CHUNK_SIZE = 1 << 20  # see docs/architecture.md, "Chunk size", for the measurement
MIN_CHUNK_SIZE = 4096
MAX_CHUNK_SIZE = 64 << 20


@dataclass(frozen=True)
class AddResult:
    commit: bytes
    new_bytes: int
    total_bytes: int
    analyzed: "AnalyzeResult | None" = None  # the delta catalog work, with --base


def _pairs(r: Txn, tensors: dict[str, bytes], base: Snapshot, known: dict[bytes, Tensor]) -> list[tuple[Tensor, Tensor]]:
    """(expert tensor, base tensor) by name; `known`: tensors not stored yet (an add in progress)."""
    return [(known.get(tid) or r.object(tid), r.object(base.tensors[n]))
            for n, tid in tensors.items() if n in base.tensors]


@dataclass(frozen=True)
class MergeResult:
    commit: bytes
    plan: Plan
    realized: dict  # as stored in the commit's stats
    commit_seconds: float = 0.0  # the commit transaction and sync, after the stats were written


@dataclass(frozen=True)
class ReplayResult:
    commit: bytes
    identical: bool
    differing: list[str]  # tensor names (and file names) whose content differs


@dataclass(frozen=True)
class CommitInfo:
    id: bytes
    commit: Commit

    def to_json(self) -> dict:
        c = self.commit
        return {
            "id": self.id.hex(),
            "parents": [p.hex() for p in c.parents],
            "base": c.base.hex() if c.base else None,
            "plan": c.plan.hex() if c.plan else None,
            "message": c.message,
            "author": c.author,
            "time": c.time,
            "new_bytes": c.new_bytes,
            "stats": c.stats,
        }


def _writes(fn):
    """Run a command that writes chunks under the store's writer lock (see Store.writing), so a
    concurrent gc can neither delete its chunks before its commit nor be confused by them."""

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        with self.store.writing():
            return fn(self, *args, **kwargs)

    return wrapper


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _author() -> str:
    return os.environ.get("MP_AUTHOR") or getpass.getuser()


class Repo:
    """A repository: a directory holding `.mp/`, the LMDB store."""

    def __init__(self, root: Path, store: Store):
        self.root = root
        self.store = store
        with store.read() as r:
            self.chunk_size = int(r.meta("chunk_size"))

    # opening ------------------------------------------------------------------------------
    @classmethod
    def init(
        cls, path: Path | str = ".", chunk_size: int = DEFAULT_CHUNK_SIZE, map_size: int = DEFAULT_MAP_SIZE
    ) -> Repo:
        """Create an empty repository in `path` (its `.mp/` must not exist yet)."""
        root = Path(path)
        if (root / STORE_DIR).exists():
            raise RepositoryExists(f"{root / STORE_DIR} already exists")
        if chunk_size % MAX_ITEMSIZE or not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
            raise MpError(
                f"invalid chunk size {chunk_size}: must be a multiple of {MAX_ITEMSIZE} "
                f"between {MIN_CHUNK_SIZE} and {MAX_CHUNK_SIZE} bytes"
            )
        store = Store.create(root / STORE_DIR, {"chunk_size": str(chunk_size)}, map_size)
        return cls(root, store)

    @classmethod
    def open(cls, path: Path | str = ".") -> Repo:
        """Open the repository at `path` or in the nearest folder above it that has one."""
        start = Path(path).absolute()
        for folder in (start, *start.parents):
            if (folder / STORE_DIR / "data.mdb").is_file():
                return cls(folder, Store.open(folder / STORE_DIR))
        raise NotARepository(f"not an mpstore repository (no {STORE_DIR} in {start} or above); run `mp init`")

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Repo:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # refs ---------------------------------------------------------------------------------
    def resolve(self, spec: str) -> bytes:
        with self.store.read() as r:
            return resolve(r, spec)

    def head(self) -> str | None:
        """The branch last written to: what `mp log` shows when given no ref."""
        with self.store.read() as r:
            return r.meta("HEAD")

    def branches(self) -> dict[str, bytes]:
        with self.store.read() as r:
            return {k[len(BRANCH_PREFIX):]: v for k, v in r.refs(BRANCH_PREFIX).items()}

    def reflog(self, branch: str) -> list[dict]:
        """Every move of a branch, oldest first: old and new ids, time, command."""
        with self.store.read() as r:
            entries = r.reflog(BRANCH_PREFIX + branch)  # kept after a delete, until gc expires it
        if not entries:
            raise UnknownRef(f"unknown branch {branch!r}")
        return entries

    def tags(self) -> dict[str, bytes]:
        with self.store.read() as r:
            return {k[len(TAG_PREFIX):]: v for k, v in r.refs(TAG_PREFIX).items()}

    def _move(self, ref: str, target: str | None, command: str, must_exist: bool | None) -> bytes | None:
        """Point `ref` at `target`'s commit (None: delete it) in one transaction, with a reflog
        entry. must_exist: True (the ref must exist), False (must not), None (either)."""
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
                raise UnknownRef(f"commit {cid.hex()[:12]} is gone (collected by gc)")
            if cid is None:
                txn.delete_ref(ref, command, _now())
                if kind == "branch" and txn.meta("HEAD") == short_name:
                    txn.delete_meta("HEAD")
            else:
                txn.set_ref(ref, cid, command, _now())
            return old

        old = self.store.write(move)
        self.store.sync()
        return old

    def create_branch(self, name: str, ref: str) -> bytes:
        check_name(name)
        self._move(BRANCH_PREFIX + name, ref, f"branch {name} {ref}", must_exist=False)
        return self.resolve(name)

    def delete_branch(self, name: str) -> bytes:
        return self._move(BRANCH_PREFIX + name, None, f"branch -d {name}", must_exist=True)

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
        return self._move(TAG_PREFIX + name, None, f"tag -d {name}", must_exist=True)

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
        """Store a model folder (or one .safetensors file) as a new commit on branch `name`."""
        progress = progress or Silent()
        check_name(name)
        base_id = self.resolve(base) if base else None
        src = ingest.scan(Path(source))
        total = ingest.total_bytes(src)
        sink = ChunkSink(self.store, self.chunk_size, progress)
        progress.start(f"add {name}", total)
        try:
            objects: list[Blob | Tensor] = []
            tensors: dict[str, bytes] = {}
            shards = []
            for file, header in src.weights.items():
                hblob = sink.blob(header.raw, "header")  # the raw header: checkout rewrites it exactly
                objects.append(hblob)
                shards.append(ingest.shard_record(file, header, object_id(encode(hblob))))
                for tname, tensor in ingest.read_weights(sink, src.root / file, header).items():
                    objects.append(tensor)
                    tensors[tname] = object_id(encode(tensor))
            files = {}
            for rel in src.files:
                blob = ingest.read_blob(sink, src.root / rel, rel)
                objects.append(blob)
                files[rel] = object_id(encode(blob))
            sink.flush()
        finally:
            progress.finish()
        snapshot = Snapshot(tensors, files, tuple(shards))
        msg = message if message is not None else f"add {Path(source).name}"
        analyzed = None
        if base_id is not None:  # the catalog of this expert's deltas: a one-time cost per model
            from .merge.catalog import analyze

            with self.store.read() as r:
                new = {object_id(encode(o)): o for o in objects if isinstance(o, Tensor)}
                pairs = _pairs(r, tensors, r.object(r.object(base_id).snapshot), new)
            analyzed = analyze(self.store, pairs, progress, os.cpu_count() or 1)

        def commit(txn: Txn) -> bytes:
            for obj in objects:
                txn.put_object(obj)
            parent = txn.ref(BRANCH_PREFIX + name)
            c = Commit(
                txn.put_object(snapshot), (parent,) if parent else (), msg, _author(), _now(),
                base=base_id, new_bytes=sink.new_bytes,
            )
            cid = txn.put_object(c)
            txn.set_ref(BRANCH_PREFIX + name, cid, f"add {source}", c.time)
            txn.set_meta("HEAD", name)
            return cid

        cid = self.store.write(commit, reserve=sum(len(encode(o)) for o in objects) + (1 << 20))
        self.store.sync()
        return AddResult(cid, sink.new_bytes, total, analyzed)

    # reading ------------------------------------------------------------------------------
    def commit(self, spec: str) -> CommitInfo:
        with self.store.read() as r:
            cid = resolve(r, spec)
            return CommitInfo(cid, r.object(cid))

    def log(self, spec: str | None = None) -> list[CommitInfo]:
        """Every commit reachable from `spec` (default: HEAD's branch), newest first."""
        spec = spec or self.head()
        if spec is None:
            raise UnknownRef("nothing to log: the repository has no commits yet")
        with self.store.read() as r:
            seen: dict[bytes, Commit] = {}
            todo = [resolve(r, spec)]
            while todo:
                cid = todo.pop()
                if cid not in seen:
                    seen[cid] = r.object(cid)
                    todo.extend(seen[cid].parents)
        return [CommitInfo(k, v) for k, v in sorted(seen.items(), key=lambda kv: kv[1].time, reverse=True)]

    def ls(self, spec: str) -> list[dict]:
        """The tensors of a commit in file order: name, dtype, shape, bytes, file."""
        with self.store.read() as r:
            snap: Snapshot = r.object(r.object(resolve(r, spec)).snapshot)
            rows = []
            for shard in snap.shards:
                for name in shard.tensors:
                    t: Tensor = r.object(snap.tensors[name])
                    rows.append({"name": name, "dtype": t.dtype, "shape": list(t.shape), "bytes": t.size, "file": shard.file})
            return rows

    def show(self, spec: str) -> dict:
        """A commit with what people ask of a model: size, parameters, dtypes, dedup, files."""
        info = self.commit(spec)
        rows = self.ls(info.id.hex())
        params: Counter[str] = Counter()
        for row in rows:
            params[row["dtype"]] += math.prod(row["shape"])
        with self.store.read() as r:
            snap: Snapshot = r.object(info.commit.snapshot)
            size = _checkout.snapshot_size(r, snap)
        return {
            **info.to_json(),
            "snapshot": info.commit.snapshot.hex(),
            "size": size,
            "tensor_bytes": sum(row["bytes"] for row in rows),
            "tensors": len(rows),
            "parameters": sum(params.values()),
            "dtypes": dict(params),
            "files": sorted([*snap.files, *(s.file for s in snap.shards)]),
            "merge_plan": self._stored_plan(info.commit.plan),
        }

    def _stored_plan(self, plan_id: bytes | None) -> dict | None:
        if plan_id is None:
            return None
        with self.store.read() as r:
            return self.plan_json(r.object(plan_id))

    @staticmethod
    def plan_json(plan: Plan) -> dict:
        """A plan as JSON: ids in hex, omission bitmaps as the omitted chunk numbers."""
        fields = plan.fields()
        fields["base"] = fields["base"].hex() if fields["base"] else None
        fields["models"] = [m.hex() for m in fields["models"]]
        if plan.omit:
            fields["omit"] = {name: [None if bits is None else
                                     [c for c in range(len(bits) * 8) if bits[c >> 3] >> (c & 7) & 1]
                                     for bits in per_input] for name, per_input in plan.omit.items()}
        return fields

    def checkout(self, spec: str, out: Path | str, force: bool = False, progress: Progress | None = None) -> bytes:
        """Rebuild the commit's folder at `out`, byte-identical to what was added."""
        info = self.commit(spec)
        _checkout.checkout(self.store, info.commit.snapshot, Path(out), force, progress or Silent())
        return info.id

    def diff(self, a: str, b: str) -> DiffResult:
        with self.store.read() as r:
            ca, cb = resolve(r, a), resolve(r, b)
            tensors = diff_snapshots(self.store, r, r.object(ca).snapshot, r.object(cb).snapshot)
        return DiffResult(ca, cb, tensors)

    def describe(self, cid: bytes) -> str:
        """`short-id message` for listings."""
        with self.store.read() as r:
            return f"{short(cid)} {r.object(cid).message}"

    # merging ------------------------------------------------------------------------------
    def plan(self, request: "MergeRequest", budget: str | None = None, select: "str | Selector" = "greedy",
             memory_limit: int = 1 << 30) -> Plan:
        """The plan a merge request resolves to, with the reads a budget allows ('10%' of the
        experts' differing bytes, or a size) and the estimate of what executing it will cost.
        Validates refs, method, parameters and every tensor; reads no chunk."""
        from .merge.executor import ENGINE_VERSION
        from .merge.request import to_plan
        from .merge.planner import parse_budget, plan as make_plan

        with self.store.read() as r:
            resolved = to_plan(request, lambda spec: resolve(r, spec), self.chunk_size, ENGINE_VERSION)
            return make_plan(r, resolved, parse_budget(budget) if budget is not None else None,
                             select, memory_limit)

    def analyze(self, spec: str, base: str, threads: int | None = None,
                progress: Progress | None = None) -> AnalyzeResult:
        """Record the delta catalog of `spec` against `base` (what `add --base` does at add time)."""
        with self.store.read() as r:
            expert = r.object(r.object(resolve(r, spec)).snapshot)
            base_snap = r.object(r.object(resolve(r, base)).snapshot)
            pairs = _pairs(r, expert.tensors, base_snap, {})
        from .merge.catalog import analyze

        with self.store.writing():
            return analyze(self.store, pairs, progress or Silent(), threads or os.cpu_count() or 1)

    @_writes
    def merge(
        self,
        request: "MergeRequest",
        branch: str,
        message: str | None = None,
        threads: int | None = None,
        memory_limit: int = 1 << 30,
        progress: Progress | None = None,
        budget: str | None = None,
        select: "str | Selector" = "greedy",
    ) -> MergeResult:
        """Execute a merge and commit it, with its plan, on `branch` in one transaction.

        Parents are [base, inputs...] (plus the branch's previous head, last, when it is not
        already one of them), so the lineage of every merged model stays in the store."""
        from .merge.executor import execute

        check_name(branch)
        began = time.perf_counter()
        plan = self.plan(request, budget, select, memory_limit)
        planned = time.perf_counter() - began
        sink = ChunkSink(self.store, self.chunk_size, progress or Silent())
        result = execute(self.store, plan, sink, progress or Silent(), threads or os.cpu_count() or 1,
                         memory_limit)
        result.realized.seconds = {"plan": round(planned, 3), **result.realized.seconds}
        msg = message if message is not None else f"merge {plan.method} of {len(plan.models)} models"

        def commit(txn: Txn) -> bytes:
            for obj in result.objects:
                txn.put_object(obj)
            parents = [plan.base] if plan.base else []
            parents += [m for m in plan.models if m not in parents]
            head = txn.ref(BRANCH_PREFIX + branch)
            if head is not None and head not in parents:
                parents.append(head)
            c = Commit(txn.put_object(result.snapshot), tuple(parents), msg, _author(), _now(),
                       base=plan.base, plan=txn.put_object(plan), new_bytes=sink.new_bytes,
                       stats=result.realized.to_json())
            cid = txn.put_object(c)
            txn.set_ref(BRANCH_PREFIX + branch, cid, f"merge {plan.method}", c.time)
            txn.set_meta("HEAD", branch)
            return cid

        began = time.perf_counter()
        cid = self.store.write(commit, reserve=sum(len(encode(o)) for o in result.objects) + (1 << 20))
        self.store.sync()
        return MergeResult(cid, plan, result.realized.to_json(), round(time.perf_counter() - began, 3))

    def replay(self, spec: str, threads: int | None = None, memory_limit: int = 1 << 30,
               progress: Progress | None = None) -> ReplayResult:
        """Re-execute a merge commit's stored plan from its stored inputs; write nothing."""
        from .merge.executor import execute

        info = self.commit(spec)
        if info.commit.plan is None:
            raise BadMerge(f"{short(info.id)} is not a merge: it has no plan to replay")
        with self.store.read() as r:
            plan: Plan = r.object(info.commit.plan)
            stored: Snapshot = r.object(info.commit.snapshot)
        sink = ChunkSink(self.store, self.chunk_size, progress or Silent(), dry=True)
        result = execute(self.store, plan, sink, progress or Silent(), threads or os.cpu_count() or 1,
                         memory_limit)
        again = result.snapshot
        if object_id(encode(again)) == info.commit.snapshot:
            return ReplayResult(info.id, True, [])
        differing = sorted(
            {n for n in stored.tensors.keys() | again.tensors.keys() if stored.tensors.get(n) != again.tensors.get(n)}
            | {f for f in stored.files.keys() | again.files.keys() if stored.files.get(f) != again.files.get(f)}
        )
        return ReplayResult(info.id, False, differing or ["(shard headers)"])

    @_writes
    def revert(self, spec: str, branch: str | None = None, force: bool = False,
               message: str | None = None) -> bytes:
        """A new commit on `branch` (default: HEAD's) undoing `spec`'s changes tensor by tensor."""
        branch = branch or self.head()
        if branch is None:
            raise UnknownRef("no branch to revert on: pass -b BRANCH")
        check_name(branch)
        sink = ChunkSink(self.store, self.chunk_size, Silent())
        with self.store.read() as r:
            cid = resolve(r, spec)
            c: Commit = r.object(cid)
            if not c.parents:
                raise BadMerge(f"{short(cid)} has no parent: there is nothing to revert it to")
            head_id = r.ref(BRANCH_PREFIX + branch)
            if head_id is None:
                raise UnknownRef(f"unknown branch {branch!r}")
            snaps = [r.object(r.object(x).snapshot) for x in (c.parents[0], cid, head_id)]
            new, objects, conflicts, reverted = _revert(r, sink, *snaps, force)
        if conflicts:
            shown = ", ".join(conflicts[:5]) + (f" and {len(conflicts) - 5} more" if len(conflicts) > 5 else "")
            raise BadMerge(f"revert conflicts: changed again since {short(cid)}: {shown} (use --force)")
        if not reverted:
            raise BadMerge(f"nothing to revert: {short(cid)} changed nothing relative to its parent")
        sink.flush()
        msg = message or f"revert {short(cid)}: {c.message}"

        def commit(txn: Txn) -> bytes:
            if txn.ref(BRANCH_PREFIX + branch) != head_id:
                raise BadMerge(f"branch {branch!r} moved while reverting; run the revert again")
            for obj in objects:
                txn.put_object(obj)
            rc = Commit(txn.put_object(new), (head_id,), msg, _author(), _now(), base=c.base)
            rid = txn.put_object(rc)
            txn.set_ref(BRANCH_PREFIX + branch, rid, f"revert {short(cid)}", rc.time)
            txn.set_meta("HEAD", branch)
            return rid

        rid = self.store.write(commit, reserve=1 << 20)
        self.store.sync()
        return rid

    def lineage(self, spec: str, depth: int = 6) -> dict:
        """A commit and, recursively, its parents: what `mp log --graph` draws."""
        seen: set[bytes] = set()
        with self.store.read() as r:
            def node(cid: bytes, level: int) -> dict:
                c: Commit = r.object(cid)
                out = {"id": cid.hex(), "message": c.message, "time": c.time, "parents": []}
                if c.plan:
                    out["method"] = r.object(c.plan).method
                if cid in seen:
                    out["seen"] = True
                    return out
                seen.add(cid)
                if level < depth:
                    out["parents"] = [node(p, level + 1) for p in c.parents]
                return out

            return node(resolve(r, spec), 0)

    # integrity and space ------------------------------------------------------------------
    def fsck(self) -> tuple[list[str], dict]:
        """Every problem in the store, one line each, and counts of what was checked."""
        from .store.fsck import fsck

        return fsck(self.store)

    def gc(self, expire: str = "30d", compact: bool = False) -> dict:
        """Delete what nothing live reaches; with `compact`, give the space back to the disk."""
        from .store import gc

        freed = gc.collect(self.store, gc.parse_expire(expire)).to_json()
        if compact:
            freed["file_bytes_before"], freed["file_bytes_after"] = gc.compact(self.store)
        return freed

    def status(self, expire: str = "30d") -> dict:
        """Branches, tags, store size, entry counts and what gc could reclaim."""
        from .store import gc

        with self.store.read() as r:
            counts = {db: r.entries(db.encode()) for db in ("chunks", "objects", "reflog", "catalog")}
            info = self.store.env.info()
            used = (info["last_pgno"] + 1) * self.store.env.stat()["psize"]
        data = self.store.path / "data.mdb"
        return {
            "head": self.head(),
            "branches": {k: v.hex() for k, v in self.branches().items()},
            "tags": {k: v.hex() for k, v in self.tags().items()},
            "store_bytes": os.stat(data).st_blocks * 512,
            "used_bytes": used,
            "entries": counts,
            "chunk_size": self.chunk_size,
            "reclaimable": gc.reclaimable(self.store, gc.parse_expire(expire)).to_json(),
        }
