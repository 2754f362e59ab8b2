"""The merge executor: runs a Plan over stored models and returns the merged snapshot.

It streams tensor by tensor and block by block. The main thread does all store reads (LMDB is
touched from one thread only) and hands the arithmetic to a pool of workers (torch releases the
GIL), keeping at most `window` blocks in flight so memory stays bounded whatever the model size
or number of inputs. Results are taken in order, so chunking and every sum are deterministic.
A block where every input's chunks are the base's is the base: nothing is read or computed, and
when it is a whole chunk of the same dtype the base chunk's digest is reused as is.
The executor never moves refs; `Repo.merge` commits what it returns.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from . import catalog
from .methods import base as M
from . import params as P
from ..model.checkout import chunk_views
from ..store.chunks import ChunkSink
from ..store.dtypes import ITEMSIZE, torch_dtype
from ..store.ids import short
from ..store.objects import Blob, Plan, Shard, Snapshot, Tensor, encode, object_id
from ..progress import Progress, Silent
from ..model.header import build_header
from ..store.env import Store, Txn

ENGINE_VERSION = 1
FLOATS = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
TIED = ("lm_head.weight", "model.embed_tokens.weight")  # an untied head may come from a tied model
BLOCK_OVERHEAD = 6  # working copies of a block's inputs a method may hold at once


@dataclass
class Task:
    """One output tensor: its inputs, resolved parameters and dtypes."""

    name: str
    base: Tensor | None
    models: list[Tensor]
    p: list[dict]
    g: dict
    compute: str
    out: str
    copy: Tensor | None = None  # output is this stored tensor as it is
    stored: list[Tensor] = field(default_factory=list)  # the inputs as stored (before omission)
    omitted: list[frozenset[int]] = field(default_factory=list)  # per input: chunks read as the base's


@dataclass
class Realized:
    """What a merge really did, for `mp show` and the benchmarks."""

    base_bytes: int = 0  # distinct base chunks read, in bytes
    expert_bytes: int = 0  # distinct expert chunks read (never the base's), in bytes
    read_bytes: int = 0  # every read, passes reading a block again included
    output_bytes: int = 0  # output computed (chunks reused from the base are not)
    chunks_skipped: int = 0
    chunks_omitted: int = 0  # expert chunks a budget left out
    tensors_copied: int = 0
    seconds: dict = field(default_factory=dict)  # time per phase

    def to_json(self) -> dict:
        return {k: (dict(v) if isinstance(v, dict) else v) for k, v in self.__dict__.items()}


class Reads:
    """Accounts for reads by source, counting each distinct chunk once: what a budget bounds.
    The executor and the planner's estimate use the same account, so they agree."""

    def __init__(self, realized: Realized):
        self.realized = realized
        self.seen: set[bytes] = set()

    def read(self, task: Task, t: Tensor, a: int, b: int) -> list[tuple[int, int, int]]:
        """Account for elements [a, b) of input tensor t; returns (chunk, lo, hi) element spans."""
        isz = ITEMSIZE[t.dtype]
        per = t.chunk_size // isz
        spans = []
        for c in range(a // per, (b - 1) // per + 1 if b > a else a // per):
            lo, hi = max(a, c * per) - c * per, min(b, (c + 1) * per) - c * per
            spans.append((c, lo, hi))
            key = t.chunks[c]
            if key not in self.seen:
                self.seen.add(key)
                n = catalog.item_bytes(t, c)
                if task.base is None or task.base.chunks[c] != key:
                    self.realized.expert_bytes += n
                else:
                    self.realized.base_bytes += n
        self.realized.read_bytes += (b - a) * isz
        return spans


@dataclass
class Result:
    snapshot: Snapshot
    objects: list = field(default_factory=list)  # blobs and tensors to store with the commit
    realized: Realized = field(default_factory=Realized)


def _tensor_of(snap: Snapshot, txn: Txn, name: str) -> Tensor | None:
    tid = snap.tensors.get(name)
    if tid is None and name == TIED[0]:
        tid = snap.tensors.get(TIED[1])
    return None if tid is None else txn.object(tid)


def tasks(txn: Txn, plan: Plan, method: M.Method) -> list[Task]:
    """Validate every tensor and resolve every parameter before anything is computed; inputs
    carry the plan's omissions (an omitted chunk's digest becomes the base's)."""
    found = _tasks(txn, plan, method, *_snapshots(txn, plan, method))
    unknown = set(plan.omit or {}) - {t.name for t in found}
    if unknown:
        raise M.BadMerge(f"the plan leaves out chunks of tensors it does not merge: {sorted(unknown)[:3]}")
    return [omit(t, (plan.omit or {}).get(t.name)) for t in found]


def _snapshots(txn: Txn, plan: Plan, method: M.Method) -> tuple[Snapshot, Snapshot | None, list[Snapshot]]:
    """The output's template (the base's layout, else the first input's), the base, the inputs."""
    base = txn.object(txn.object(plan.base).snapshot) if plan.base and method.base != "none" else None
    models = [txn.object(txn.object(m).snapshot) for m in plan.models]
    template = base or (txn.object(txn.object(plan.base).snapshot) if plan.base else models[0])
    return template, base, models


def omit(task: Task, bitmaps: list[bytes | None] | None) -> Task:
    """`task` with each input's chunks named in its bitmap read as the base's chunks."""
    task.stored = list(task.models)
    task.omitted = [frozenset() for _ in task.models]
    if not bitmaps:
        return task
    if task.base is None or len(bitmaps) != len(task.models) or task.copy is not None:
        raise M.BadMerge(f"the plan's omissions do not fit tensor {task.name!r}")
    for i, bits in enumerate(bitmaps):
        if bits:
            t = task.models[i]
            if len(bits) != (len(t.chunks) + 7) // 8:
                raise M.BadMerge(f"the plan's omissions do not fit tensor {task.name!r}")
            gone = frozenset(c for c in range(len(t.chunks)) if bits[c >> 3] >> (c & 7) & 1)
            chunks = tuple(task.base.chunks[c] if c in gone else d for c, d in enumerate(t.chunks))
            task.models[i] = Tensor(t.size, t.chunk_size, chunks, t.dtype, t.shape)
            task.omitted[i] = gone
    return task


def bitmap(chunks: set[int] | frozenset[int], n: int) -> bytes:
    out = bytearray((n + 7) // 8)
    for c in chunks:
        out[c >> 3] |= 1 << (c & 7)
    return bytes(out)


def _tasks(txn: Txn, plan: Plan, method: M.Method, template: Snapshot,
           base: Snapshot | None, models: list[Snapshot]) -> list[Task]:
    names = [n for s in template.shards for n in s.tensors]
    layers = {i for n in names if (i := P.layer_index(n)) is not None}
    num_layers = max(layers) + 1 if layers else 0
    tasks = []
    for name in names:
        t = P.layer_position(name, num_layers)
        b = _tensor_of(base, txn, name) if base else None
        ms = []
        for i, snap in enumerate(models):
            m = _tensor_of(snap, txn, name)
            if m is None:
                raise M.BadMerge(f"tensor {name!r} is missing from input {i + 1} ({short(plan.models[i])})")
            ms.append(m)
        ref = b or ms[0]
        for i, m in enumerate(ms):
            if (m.dtype, m.shape) != (ref.dtype, ref.shape):
                raise M.BadMerge(
                    f"tensor {name!r}: input {i + 1} has {m.dtype}{list(m.shape)}, "
                    f"expected {ref.dtype}{list(ref.shape)}"
                )
        p = [{d.name: P.resolve(plan.model_params[i][d.name], name, t, d.kind, f"{d.name} of input {i + 1}")
              for d in method.model_params} for i in range(len(ms))]
        g = {d.name: P.resolve(plan.global_params[d.name], name, t, d.kind, d.name) for d in method.global_params}
        compute = plan.compute_dtype or ref.dtype
        task = Task(name, b, ms, p, g, compute, plan.out_dtype or compute)
        distinct = len({(x.dtype, x.shape, x.chunks) for x in [*([b] if b else []), *ms]})
        if ref.dtype not in FLOATS:
            if distinct > 1:
                raise M.BadMerge(f"tensor {name!r} is {ref.dtype} and differs between inputs: cannot merge it")
            task.copy, task.out = ref, ref.dtype
        else:
            numel = ref.size // ITEMSIZE[ref.dtype]
            method.check(p, g, name, numel)
            if distinct == 1 and method.equal_identity(g) and task.out == ref.dtype:
                task.copy = ref
        tasks.append(task)
    return tasks


class _Assembler:
    """Cuts a tensor's output bytes into chunks, in order, through the sink."""

    def __init__(self, sink: ChunkSink, chunk_size: int):
        self.sink, self.chunk_size = sink, chunk_size
        self.buf = bytearray()
        self.chunks: list[bytes] = []
        self.size = 0

    def digest(self, key: bytes, n: int) -> None:
        assert not self.buf, "a reused chunk must start on a chunk boundary"
        self.chunks.append(key)
        self.size += n

    def data(self, data: bytes) -> None:
        self.buf += data
        self.size += len(data)
        while len(self.buf) >= self.chunk_size:
            self._emit(self.buf[: self.chunk_size])
            del self.buf[: self.chunk_size]

    def finish(self) -> tuple[bytes, ...]:
        if self.buf:
            self._emit(self.buf)
            self.buf = bytearray()
        return tuple(self.chunks)

    def _emit(self, payload: bytearray) -> None:
        chunk = bytearray(1 + len(payload))
        chunk[1:] = payload
        key, _ = self.sink.offer(chunk)
        self.chunks.append(key)


def _values(raw: bytearray, dtype: str, compute: str) -> torch.Tensor:
    if not raw:
        return torch.zeros(0, dtype=torch_dtype(compute))
    return torch.frombuffer(raw, dtype=torch_dtype(dtype)).to(torch_dtype(compute))


def _to_bytes(values: torch.Tensor, dtype: str) -> bytes:
    out = values.to(torch_dtype(dtype)).contiguous()
    return out.view(torch.uint8).numpy().tobytes() if out.numel() else b""


@dataclass
class Outline:
    """What decides every read of one tensor's merge: `Executor.run` follows it and
    `Executor.account` counts it, so the planner's estimate is what execution does."""

    blocks: list[tuple[int, int]]
    changed: list[list[int]]  # per block: inputs whose chunks differ from the base's there
    needed: list[M.Pass]  # passes this tensor needs, in order
    swept: list[M.Pass]  # of them, those that sweep the blocks (the others: no measure, or catalog)
    hist: dict[int, torch.Tensor | None] | None  # per input: catalog histogram of |delta| (None: counting)
    cached: bool  # every block is read once and kept for the passes and the combine
    skip_equal: bool  # with a cache, blocks where every input is the base are not even read
    identity: bool  # a block where every input is the base is the base

    def present(self, method: M.Method, task: Task, n: int) -> list[int]:
        return self.changed[n] if method.sparse_inputs else list(range(len(task.models)))


class Executor:
    def __init__(self, store: Store, txn: Txn, sink: ChunkSink, threads: int, memory_limit: int,
                 plan: Plan, progress: Progress):
        self.store, self.txn, self.sink = store, txn, sink
        self.chunk_size, seed = plan.chunk_size, plan.seed
        self.threads, self.memory_limit, self.seed = threads, memory_limit, seed
        self.progress = progress
        self.realized = Realized()
        self.reads = Reads(self.realized)
        self.read_seconds = 0.0
        self.work = 0  # elements x inputs x sweeps to compute (counted by `account` only)
        self.pool: ThreadPoolExecutor | None = None

    # reading -----------------------------------------------------------------------------
    def _read(self, task: Task, t: Tensor, a: int, b: int) -> bytearray:
        """Elements [a, b) of a stored tensor as raw bytes (chunks hash-checked)."""
        began = time.perf_counter()
        isz = ITEMSIZE[t.dtype]
        out = bytearray((b - a) * isz)
        pos = 0
        for c, lo, hi in self.reads.read(task, t, a, b):
            view = self.txn.chunk(t.chunks[c])
            out[pos: pos + (hi - lo) * isz] = view[lo * isz: hi * isz]
            pos += (hi - lo) * isz
        self.store.touched(len(out))
        self.read_seconds += time.perf_counter() - began
        return out

    def _changed(self, task: Task, a: int, b: int) -> list[int]:
        """Inputs whose chunks over [a, b) are not all the reference input's (the base, if any)."""
        ref = task.base or task.models[0]
        per = ref.chunk_size // ITEMSIZE[ref.dtype]
        span = range(a // per, (b - 1) // per + 1) if b > a else range(0)
        return [i for i, m in enumerate(task.models) if any(m.chunks[c] != ref.chunks[c] for c in span)]

    def _blocks(self, task: Task, method: M.Method) -> list[tuple[int, int]]:
        ref = task.base or task.models[0]
        numel = ref.size // ITEMSIZE[ref.dtype]
        per = ref.chunk_size // ITEMSIZE[ref.dtype]
        if method.row_local(task.g) and ref.shape:
            row = ref.shape[-1]  # a 1-D tensor is one line: one block
            per = max(1, per // row) * row
        return [(a, min(a + per, numel)) for a in range(0, numel, per)]

    def _histograms(self, task: Task, counting: bool) -> dict[int, torch.Tensor | None] | None:
        """Each input's histogram of |delta| bits over the whole stored tensor, from the catalog.
        None when an entry is missing, or when the catalog's float32 deltas are not exactly the
        compute dtype's (then the exact merge sweeps) — unless chunks are omitted: a budgeted
        merge places its thresholds over the whole delta from the catalog in any dtype.
        `counting` (the planner's estimate): only whether they exist; the values are None."""
        ref = task.base
        if ref is None:
            return None
        exact = ITEMSIZE[task.compute] >= 4 and ITEMSIZE[ref.dtype] <= 4
        if not exact and not any(task.omitted):
            return None
        hists = {}
        for i, t in enumerate(task.stored):
            if counting:
                h = True if catalog.covers(self.txn, t, ref) else None
            else:
                h = catalog.tensor_histogram(self.txn, t, ref)
            if h is None:
                if task.omitted[i]:
                    raise M.BadMerge(f"tensor {task.name!r}: input {i + 1} has chunks left out by the "
                                     "budget but no catalog entries (run `mp analyze`)")
                return None
            hists[i] = None if counting else torch.from_numpy(h)
        return hists

    def outline(self, task: Task, method: M.Method, counting: bool = False) -> Outline:
        blocks = self._blocks(task, method)
        changed = [self._changed(task, a, b) for a, b in blocks]
        needed = [p for p in method.passes if p.needed(task.p, task.g)]
        hist = self._histograms(task, counting) if any(p.from_catalog for p in needed if p.measure) else None
        swept = [p for p in needed if p.measure and not (p.from_catalog and hist is not None)]
        ref = task.base or task.models[0]
        numel = ref.size // ITEMSIZE[ref.dtype]
        # inputs and their deltas (a block keeps both once a pass has asked for the deltas)
        need = numel * torch_dtype(task.compute).itemsize * (2 * len(task.models) + 1)
        cached = bool(swept) and need <= self.memory_limit // 2
        skip_equal = (task.base is not None and all(p.zero is not None for p in swept)
                      and method.local_identity(task.g, True))
        identity = method.local_identity(task.g, task.base is not None or method.base == "none")
        return Outline(blocks, changed, needed, swept, hist, cached, skip_equal, identity)

    def _reusable(self, task: Task, a: int, b: int) -> bool:
        """An unchanged block that is a whole chunk of the output dtype: its digest is reused."""
        ref = task.base or task.models[0]
        per_chunk = ref.chunk_size // ITEMSIZE[ref.dtype]
        numel = ref.size // ITEMSIZE[ref.dtype]
        return task.out == ref.dtype and a % per_chunk == 0 and (b - a == per_chunk or b == numel)

    def _block(self, task: Task, method: M.Method, a: int, b: int, present: list[int]) -> Callable[[], M.Block]:
        """Read a block's inputs now; build the tensors later, in a worker. `present`: the
        inputs to read (for methods with sparse inputs, those whose delta is not zero here)."""
        raw_base = self._read(task, task.base, a, b) if task.base else None
        raw_models = [self._read(task, task.models[i], a, b) for i in present]
        ref = task.base or task.models[0]
        row = ref.shape[-1] if ref.shape else 1
        weight_sum = sum(q.get("weight", 0.0) for q in task.p)

        def build() -> M.Block:
            base = _values(raw_base, task.base.dtype, task.compute) if raw_base is not None else None
            rows = [_values(r, task.models[i].dtype, task.compute) for r, i in zip(raw_models, present)]
            models = torch.stack(rows) if rows else torch.zeros(0, b - a, dtype=torch_dtype(task.compute))
            return M.Block(task.name, a, base, models, row, [task.p[i] for i in present], task.g,
                           self.seed, present, weight_sum, len(ref.shape))

        return build

    # counting (the planner's estimate) -----------------------------------------------------
    def account(self, task: Task, method: M.Method) -> None:
        """Count the reads and output `run` would make for `task`, reading no chunk."""
        if task.copy is not None:
            self.realized.tensors_copied += 1
            return
        o = self.outline(task, method, counting=True)
        ref = task.base or task.models[0]

        def block(n: int) -> None:
            a, b = o.blocks[n]
            for t in ([task.base] if task.base else []) + [task.models[i] for i in o.present(method, task, n)]:
                self.reads.read(task, t, a, b)

        if o.cached:
            for n in range(len(o.blocks)):
                if not (o.skip_equal and not o.changed[n]):
                    block(n)
        else:
            for pas in o.swept:
                for n in range(len(o.blocks)):
                    if not (pas.zero is not None and task.base is not None and not o.changed[n]):
                        block(n)
        for n, (a, b) in enumerate(o.blocks):
            if o.identity and not o.changed[n]:
                if self._reusable(task, a, b):
                    continue
                self.reads.read(task, ref, a, b)
            else:
                if not o.cached:
                    block(n)
                self.work += (b - a) * (1 + len(o.present(method, task, n))) * (1 + len(o.swept))
            self.realized.output_bytes += (b - a) * ITEMSIZE[task.out]
        self.realized.chunks_omitted += sum(len(g) for g in task.omitted)

    # streaming ----------------------------------------------------------------------------
    def _window(self, task: Task) -> int:
        ref = task.base or task.models[0]
        per_block = min(ref.chunk_size, ref.size) // ITEMSIZE[ref.dtype] * 8 * (len(task.models) + 1)
        return max(1, min(4 * self.threads, self.memory_limit // max(1, per_block * BLOCK_OVERHEAD)))

    def _ordered(self, task: Task, jobs: Iterator[Callable[[], object] | object]) -> Iterator[object]:
        """Run callables on the pool with a bounded window; yield every result in job order."""
        pending: deque[Future | tuple] = deque()
        window = self._window(task)
        for job in jobs:
            pending.append(self.pool.submit(job) if callable(job) else ("ready", job))
            while len(pending) >= window:
                yield _result(pending.popleft())
        while pending:
            yield _result(pending.popleft())

    def _cache(self, task: Task, method: M.Method, o: Outline) -> list | None:
        """Build every block once when the whole tensor fits in half the memory limit, so the
        passes and the combine reuse them instead of reading and decoding again. Blocks where
        every input is the base stay None when nothing needs their values."""
        if not o.cached:
            return None

        def jobs():
            for n, (a, b) in enumerate(o.blocks):
                skip = o.skip_equal and not o.changed[n]
                yield None if skip else self._block(task, method, a, b, o.present(method, task, n))

        return list(self._ordered(task, jobs()))

    def _sweep(self, task: Task, method: M.Method, o: Outline, pas: M.Pass, stats: dict,
               cache: list | None) -> dict:
        def jobs():
            for n, (a, b) in enumerate(o.blocks):
                if cache is not None:
                    blk = cache[n]
                    yield pas.zero(b - a, stats, len(task.models)) if blk is None else (
                        lambda blk=blk: pas.measure(blk, stats))
                elif pas.zero is not None and task.base is not None and not o.changed[n]:
                    yield pas.zero(b - a, stats, len(task.models))
                else:
                    build = self._block(task, method, a, b, o.present(method, task, n))
                    yield lambda build=build: pas.measure(build(), stats)

        totals: dict[str, torch.Tensor] = {}
        for part in self._ordered(task, jobs()):
            for k, v in part.items():
                totals[k] = totals[k] + v if k in totals else v
        return totals

    def run(self, task: Task, method: M.Method) -> Tensor:
        ref = task.base or task.models[0]
        shape = ref.shape
        if task.copy is not None:
            self.realized.tensors_copied += 1
            self.realized.chunks_skipped += len(task.copy.chunks) * len(task.models)
            self.progress.advance(task.copy.size)
            return task.copy
        numel = ref.size // ITEMSIZE[ref.dtype]
        o = self.outline(task, method)
        self.realized.chunks_omitted += sum(len(g) for g in task.omitted)
        stats: dict = {"inputs": len(task.models), "block_of": {a: n for n, (a, _) in enumerate(o.blocks)}}
        if any(task.omitted):
            stats["omitted_hist"] = {i: catalog.tensor_histogram(self.txn, task.stored[i], task.base, g)
                                     for i, g in enumerate(task.omitted) if g}  # present: checked above
        cache = self._cache(task, method, o)
        for pas in o.needed:
            if pas in o.swept:
                totals = self._sweep(task, method, o, pas, stats, cache)
            elif pas.measure is not None:
                totals = pas.from_catalog(stats, o.hist.get)
            else:
                totals = {}
            pas.finish(stats, totals, task.p, task.g, numel)
        asm = _Assembler(self.sink, self.chunk_size)

        def jobs():
            for n, (a, b) in enumerate(o.blocks):
                present = o.present(method, task, n)
                if method.sparse_inputs:
                    self.realized.chunks_skipped += len(task.models) - len(present)
                if o.identity and not o.changed[n]:
                    if not method.sparse_inputs:
                        self.realized.chunks_skipped += len(task.models)
                    if self._reusable(task, a, b):
                        yield ("digest", ref.chunks[a // (ref.chunk_size // ITEMSIZE[ref.dtype])],
                               (b - a) * ITEMSIZE[ref.dtype])
                        continue
                    raw = self._read(task, ref, a, b)
                    yield lambda raw=raw: _to_bytes(_values(raw, ref.dtype, task.compute), task.out)
                    continue
                blk = cache[n] if cache is not None else None
                if blk is not None:
                    yield lambda blk=blk: _to_bytes(method.combine(blk, stats), task.out)
                else:
                    build = self._block(task, method, a, b, present)
                    yield lambda build=build: _to_bytes(method.combine(build(), stats), task.out)

        for item in self._ordered(task, jobs()):
            if isinstance(item, tuple):
                asm.digest(item[1], item[2])
                self.progress.advance(item[2])
            else:
                asm.data(item)
                self.realized.output_bytes += len(item)
                self.progress.advance(len(item))
        chunks = asm.finish()
        return Tensor(asm.size, self.chunk_size, chunks, task.out, shape)


def _result(item: Future | tuple) -> object:
    return item[1] if isinstance(item, tuple) else item.result()


def _files(txn: Txn, template: Snapshot, tensors: dict[str, Tensor], out_dtype: str | None,
           sink: ChunkSink) -> tuple[dict[str, bytes], list[Blob]]:
    """The template's non-tensor files; config.json and the shard index follow the new dtype."""
    files: dict[str, bytes] = {}
    blobs: list[Blob] = []
    for rel, bid in template.files.items():
        blob: Blob = txn.object(bid)
        data = b"".join(chunk_views(txn, blob, rel))
        new = _rewrite(rel, data, tensors, out_dtype)
        if new is not None and new != data:
            blob = sink.blob(new, rel)
            blobs.append(blob)
        files[rel] = object_id(encode(blob))
    return files, blobs


_TORCH_NAME = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def _rewrite(rel: str, data: bytes, tensors: dict[str, Tensor], out_dtype: str | None) -> bytes | None:
    try:
        if rel == "config.json" and out_dtype in _TORCH_NAME:
            doc = json.loads(data)
            keys = [k for k in ("torch_dtype", "dtype") if k in doc]
            if all(doc[k] == _TORCH_NAME[out_dtype] for k in keys):
                return None
            for k in keys or ["torch_dtype"]:
                doc[k] = _TORCH_NAME[out_dtype]
            return (json.dumps(doc, indent=2) + "\n").encode()
        if rel.endswith(".safetensors.index.json"):
            doc = json.loads(data)
            total = sum(t.size for t in tensors.values())
            if doc.get("metadata", {}).get("total_size") == total:
                return None
            doc.setdefault("metadata", {})["total_size"] = total
            return (json.dumps(doc, indent=2) + "\n").encode()
    except (ValueError, AttributeError):
        return None  # not JSON we understand: keep the donor's bytes
    return None


def execute(store: Store, plan: Plan, sink: ChunkSink, progress: Progress, threads: int,
            memory_limit: int) -> Result:
    """Compute the merged snapshot of `plan`; chunks go through `sink`, nothing else is written."""
    method = M.get(plan.method)
    began = time.perf_counter()
    with store.read() as txn:
        template = _snapshots(txn, plan, method)[0]
        todo = tasks(txn, plan, method)
        ex = Executor(store, txn, sink, threads, memory_limit, plan, progress)
        progress.start(f"merge {plan.method}", sum(_out_size(t) for t in todo))
        old_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(max_workers=threads) as pool:
                ex.pool = pool
                outputs = {t.name: ex.run(t, method) for t in todo}
        finally:
            torch.set_num_threads(old_threads)
            progress.finish()
        objects: list = list(outputs.values())
        shards = []
        for shard in template.shards:
            entries = [(n, outputs[n].dtype, outputs[n].shape, outputs[n].size) for n in shard.tensors]
            hblob = sink.blob(build_header(entries, shard.metadata), "header")
            objects.append(hblob)
            shards.append(Shard(shard.file, object_id(encode(hblob)), shard.tensors, shard.metadata))
        files, blobs = _files(txn, template, outputs, plan.out_dtype, sink)
        objects.extend(blobs)
    sink.flush()
    snapshot = Snapshot({n: object_id(encode(t)) for n, t in outputs.items()}, files, tuple(shards))
    ex.realized.seconds = {"execute": round(time.perf_counter() - began, 3),
                           "read": round(ex.read_seconds, 3), "write": round(sink.write_seconds, 3)}
    return Result(snapshot, objects, ex.realized)


def account(txn: Txn, plan: Plan, memory_limit: int, todo: list[Task]) -> tuple[Realized, int]:
    """What executing `plan` would read, write and compute (elements x inputs x sweeps),
    counted without reading a chunk; `todo` is `tasks(txn, plan, ...)`."""
    method = M.get(plan.method)
    ex = Executor(None, txn, None, 1, memory_limit, plan, Silent())
    for task in todo:
        ex.account(task, method)
    return ex.realized, ex.work


def _out_size(task: Task) -> int:
    ref = task.base or task.models[0]
    return ref.size // ITEMSIZE[ref.dtype] * ITEMSIZE[task.out]
