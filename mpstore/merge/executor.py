"""The merge executor: runs a Plan over stored models and returns the merged snapshot.

It streams tensor by tensor and block by block. The main thread does all store reads (LMDB is
touched from one thread only) and hands the arithmetic to a pool of workers (torch releases the
GIL), keeping at most `window` blocks in flight so memory stays bounded whatever the model size
or number of inputs. Results are taken in order, so chunking and every sum are deterministic.
A block where every input's chunks are the base's is the base: nothing is read or computed, and
when it is a whole chunk of the same dtype the base chunk's digest is reused as is.

Which blocks are read, by which pass, is the tensor's `outline.Outline`; the executor follows it
and counts every read through `outline.ReadAccount`, as the planner's `outline.Accountant` does.
Per-tensor statistics live in one `methods.base.TensorContext`, written by the passes' `finish`
and read by `combine`. The executor knows no method's math, and never moves refs: `Repo.merge`
commits what it returns.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Generic, TypeVar

import numpy as np

from ..errors import BadMerge
from ..model import tokenizer
from ..model.checkout import chunk_views
from ..model.header import build_header
from ..progress import Progress
from ..store.chunks import ChunkSink, MemorySink
from ..store.dtypes import FLOATS, ITEMSIZE, holds, torch_dtype
from ..store.env import Pending, Store, Txn, new_frame, payload
from ..store.ids import digest, short
from ..store.objects import Blob, Plan, Shard, Snapshot, StoredObject, Tensor, bitmap_members
from ..store.prefetch import Prefetcher
from . import catalog, layout, lazytorch, methods
from . import params as P
from .layout import Input
from .lazytorch import torch
from .methods import kernels
from .methods.base import STORED_BITS, Block, MergeMethod, Pass, Stored, TensorContext, Values
from .outline import Outline, ReadAccount, Realized, Step, Task, outline

ENGINE_VERSION = 2
BLOCK_OVERHEAD = 6  # working copies of a block's inputs a method may hold at once

R = TypeVar("R")


@dataclass
class Result:
    snapshot: Snapshot
    objects: list[StoredObject] = field(default_factory=list)  # blobs and tensors to store with the commit
    realized: Realized = field(default_factory=Realized)


def _inputs(txn: Txn, plan: Plan) -> tuple[Input, Input | None, list[Input]]:
    """The output's template (the base's layout, else the first input's), the plan's base (an
    ordinary input for methods without one) and the other inputs."""
    base = Input(plan.base, txn.snapshot_of(plan.base)) if plan.base else None
    inputs = [Input(m, txn.snapshot_of(m)) for m in plan.models]
    first = inputs[plan.slices[0]["sources"][0][0]] if plan.slices else inputs[0]
    return base or first, base, inputs


def tasks(txn: Txn, plan: Plan, method: MergeMethod) -> list[Task]:
    """Validate every tensor and resolve every parameter before anything is computed; inputs
    carry the plan's omissions (an omitted chunk's digest becomes the base's)."""
    return prepare(txn, plan, method, MemorySink(plan.chunk_size)).todo


def omit(task: Task, bitmaps: list[bytes | None] | None) -> Task:
    """A copy of `task` whose inputs read the chunks named in their bitmaps as the base's."""
    out = replace(task, models=list(task.models), stored=list(task.models),
                  omitted=[frozenset() for _ in task.models])
    if not bitmaps:
        return out
    if task.base is None or len(bitmaps) != len(task.models) or task.copy is not None:
        raise BadMerge(f"the plan's omissions do not fit tensor {task.name!r}")
    for i, bits in enumerate(bitmaps):
        if bits:
            t = task.models[i]
            if len(bits) != (len(t.chunks) + 7) // 8:
                raise BadMerge(f"the plan's omissions do not fit tensor {task.name!r}")
            gone = frozenset(c for c in bitmap_members(bits) if c < len(t.chunks))
            chunks = tuple(task.base.chunks[c] if c in gone else d for c, d in enumerate(t.chunks))
            out.models[i] = Tensor(t.size, t.chunk_size, chunks, t.dtype, t.shape)
            out.omitted[i] = gone
    return out


def _tasks(plan: Plan, method: MergeMethod, made: list[layout.Wanted]) -> list[Task]:
    tasks = []
    for w in made:
        name, b, ms, t = w.name, w.base, w.models, w.t
        ref = b or ms[0]
        for i, m in enumerate(ms):
            # with a compute dtype every input is converted to it (as MergeKit does): only shapes must agree
            if m.shape != ref.shape or (m.dtype != ref.dtype and (plan.compute_dtype is None or
                                                                  FLOATS.isdisjoint({m.dtype, ref.dtype}) or
                                                                  not {m.dtype, ref.dtype} <= FLOATS)):
                raise BadMerge(
                    f"tensor {name!r}: input {i + 1} has {m.dtype}{list(m.shape)}, "
                    f"expected {ref.dtype}{list(ref.shape)}"
                )
        p = [{d.name: P.resolve(w.chains[i][d.name], name, t, d.kind, f"{d.name} of input {i + 1}")
              for d in method.model_params} for i in range(len(ms))]
        g = {d.name: P.resolve(w.globals[d.name], name, t, d.kind, d.name) for d in method.global_params}
        compute = plan.compute_dtype or ref.dtype
        task = Task(name, b, ms, p, g, compute, plan.out_dtype or compute)
        distinct = len({(x.dtype, x.shape, x.chunks) for x in [*([b] if b else []), *ms]})
        if ref.dtype not in FLOATS:
            if distinct > 1:
                raise BadMerge(f"tensor {name!r} is {ref.dtype} and differs between inputs: cannot merge it")
            task.copy, task.out = ref, ref.dtype
        else:
            numel = ref.size // ITEMSIZE[ref.dtype]
            weights = sum(float(q.get("weight", 0.0)) for q in p)
            if not math.isfinite(weights):  # each weight is finite (checked), their sum may not be
                raise BadMerge(f"tensor {name!r}: the weights sum to {weights}: too large to merge")
            method.check(p, g, name, numel)
            if distinct == 1 and method.equal_identity(p, g) and task.out == ref.dtype and holds(compute, ref.dtype):
                task.copy = ref
        tasks.append(task)
    return tasks


class _Assembler:
    """Cuts a tensor's output bytes into chunks, in order, through the sink."""

    def __init__(self, sink: ChunkSink, chunk_size: int, itemsize: int, references: tuple[bytes, ...] | None):
        self.sink, self.chunk_size, self.itemsize = sink, chunk_size, itemsize
        self.references = references  # the base's chunks at the same positions: a new chunk's delta reference
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

    def chunk(self, out: _Chunk) -> None:
        """A whole output chunk, framed and hashed by its worker."""
        assert not self.buf, "a whole chunk must start on a chunk boundary"
        ref = self._reference()
        self.sink.frame(out.key, out.frame, self.itemsize, ref, out.reference if ref is not None else None)
        self.chunks.append(out.key)
        self.size += len(out.frame) - 1

    def finish(self) -> tuple[bytes, ...]:
        if self.buf:
            self._emit(self.buf)
            self.buf = bytearray()
        return tuple(self.chunks)

    def _emit(self, data: bytearray) -> None:
        self.chunks.append(self.sink.data(data, self.itemsize, self._reference()))

    def _reference(self) -> bytes | None:
        """The base's chunk at the next output chunk's position (its delta reference), or None."""
        return self.references[len(self.chunks)] if self.references is not None else None


_Raw = Callable[..., "memoryview | bytearray"]  # Executor._read's result: call it on a worker


def _values(raw: memoryview | bytearray, dtype: str, compute: str) -> torch.Tensor:
    """Stored bytes as values in the compute dtype; a view into the map is copied first (torch
    keeps no tensor over read-only memory)."""
    if not raw:
        return torch.zeros(0, dtype=torch_dtype(compute))
    return torch.frombuffer(raw if isinstance(raw, bytearray) else bytearray(raw),
                            dtype=torch_dtype(dtype)).to(torch_dtype(compute))


def _out_bytes(values: Values, dtype: str) -> np.ndarray:
    """A block's values in the output dtype, as bytes (uint8). A fused kernel's float32 values
    become float32 or bfloat16 without torch (`kernels.to_bfloat16` rounds as torch does)."""
    if isinstance(values, np.ndarray):
        if dtype == "F32":
            return values.view(np.uint8)
        if dtype == "BF16" and (rounded := kernels.to_bfloat16(values)) is not None:
            return rounded.view(np.uint8)
        values = torch.from_numpy(values)
    return values.to(torch_dtype(dtype)).contiguous().view(torch.uint8).numpy()


def _to_bytes(values: Values, dtype: str) -> bytes:
    return _out_bytes(values, dtype).tobytes()


def _bytes_of(raw: memoryview | bytearray | None) -> memoryview | None:
    return None if raw is None else memoryview(raw)


def _to_chunk(values: Values, dtype: str, reference: memoryview | None) -> _Chunk:
    """A block's output that is one whole output chunk, framed and hashed here (on the worker)."""
    out = _out_bytes(values, dtype)
    frame = new_frame(out.size)
    np.frombuffer(frame, np.uint8)[1:] = out
    return _Chunk(digest(payload(frame)), frame, reference)


def _converted(read: _Raw, dtype: str, compute: str, out: str, whole: bool) -> bytes | _Chunk:
    """Stored values through the compute dtype into the output dtype (an unchanged block);
    `whole`: the block's output is one whole chunk (framed and hashed here)."""
    values = _values(read(), dtype, compute)
    return _to_chunk(values, out, None) if whole else _to_bytes(values, out)


def _measured(pas: Pass, ctx: TensorContext, blk: Block) -> torch.Tensor:
    return pas.measure(blk, ctx)


def _built(build: Callable[[], Block], then: Callable[[Block], R]) -> Callable[[], R]:
    """One worker job: build the block from the bytes read, then `then` of it."""

    def job() -> R:
        return then(build())

    return job


@dataclass(frozen=True)
class _Ready(Generic[R]):
    """A job's result known without work: passed through the window in order."""

    value: R


@dataclass(frozen=True)
class _Chunk:
    """A block's output that makes one whole output chunk: its digest, its frame (store.env's
    new_frame), and the base's chunk at its position, decoded, where the block read it (the
    encoder's delta reference, so it is not decoded again), else None."""

    key: bytes
    frame: bytearray
    reference: memoryview | None


@dataclass(frozen=True)
class _Digest:
    """An output chunk reused as it is: its digest and its length in bytes."""

    key: bytes
    nbytes: int


class Executor:
    """Runs tasks one by one over a thread pool (see the module docstring)."""

    def __init__(self, store: Store, txn: Txn, sink: ChunkSink, pool: ThreadPoolExecutor, threads: int,
                 memory_limit: int, plan: Plan, progress: Progress, derived: dict[bytes, bytes],
                 prefetch: Prefetcher | None = None):
        self.store, self.txn, self.sink, self.pool = store, txn, sink, pool
        self.prefetch = prefetch  # told of every stored chunk read, to fetch further ahead
        self.derived = derived  # chunks of tensors derived from the inputs, in memory
        self.chunk_size, self.seed = plan.chunk_size, plan.seed
        self.threads, self.memory_limit = threads, memory_limit
        self.progress = progress
        self.realized = Realized()
        self.reads = ReadAccount(self.realized)
        self.read_seconds = 0.0
        self.busy: list[float] = []  # seconds of each worker job: how busy the cores were

    # reading -----------------------------------------------------------------------------
    def _read(self, task: Task, t: Tensor, a: int, b: int) -> _Raw:
        """Elements [a, b) of a stored tensor, found now (LMDB is used from this thread) and
        made raw bytes by the returned call, on a worker: compressed chunks are decoded there,
        every chunk hash-checked. A view into the map (or the derived chunk) when they lie in
        one raw chunk, so nothing is copied; the view stays valid for the executor's read
        transaction. Else the pieces joined."""
        began = time.perf_counter()
        isz = ITEMSIZE[t.dtype]
        pieces: list[tuple[Pending | memoryview, int, int]] = []
        whole = False  # [a, b) is exactly one stored chunk
        for c, lo, hi in self.reads.read(task, t, a, b):
            key = t.chunks[c]
            whole = lo == 0 and hi * isz == min(t.chunk_size, t.size - c * t.chunk_size) and hi - lo == b - a
            if key in self.derived:
                pieces.append((memoryview(self.derived[key]), lo * isz, hi * isz))
                continue
            if self.prefetch is not None:
                self.prefetch.reached(key)
            pieces.append((self.txn.pending(key), lo * isz, hi * isz))
            self.store.touched((hi - lo) * isz)
        self.read_seconds += time.perf_counter() - began

        def raw(decoded: dict[bytes, memoryview] | None = None, into: memoryview | None = None
                ) -> memoryview | bytearray:
            """The bytes; with `into` (b - a elements' room), there: a whole compressed chunk is
            decoded straight into it, anything else copied."""
            if into is not None and whole and isinstance(p := pieces[0][0], Pending) and not p.raw:
                return p.open(decoded, into)
            views = [(p if isinstance(p, memoryview) else p.open(decoded))[lo:hi] for p, lo, hi in pieces]
            if into is None:
                return views[0] if len(views) == 1 else bytearray().join(views)
            at = 0
            for v in views:
                into[at:at + len(v)] = v
                at += len(v)
            return into

        return raw

    def _block(self, task: Task, o: Outline, n: int) -> Callable[[], Block]:
        """Read block n's inputs now (`Outline.inputs_read`, in that order); build the tensors
        later, in a worker."""
        a, b = o.blocks[n]
        present = o.present(n)
        base = task.base
        read_base = self._read(task, base, a, b) if base else None
        read_models = [self._read(task, task.models[i], a, b) for i in present]
        ref = task.ref
        row = ref.shape[-1] if ref.shape else 1

        dtypes = {t.dtype for t in ([base] if base else []) + [task.models[i] for i in present]}
        bits = STORED_BITS.get(dtypes.pop()) if task.compute == "F32" and len(dtypes) == 1 and present else None

        def build() -> Block:
            decoded: dict[bytes, memoryview] = {}  # the base's chunks: its experts' deltas' reference
            raw_base = read_base(decoded) if read_base is not None else None
            args = (row, [task.p[i] for i in present], task.g, self.seed, present, len(ref.shape))
            if bits is not None:
                kind, shift = bits
                bits_of = np.empty((len(read_models), b - a), kind)  # each input decoded or copied into its row
                for r, out in zip(read_models, bits_of):
                    r(decoded, memoryview(out.view(np.uint8)))
                stored = Stored(np.frombuffer(raw_base, kind) if raw_base is not None else None, bits_of, shift)
                return Block(task.name, a, None, None, *args, stored=stored, reference=_bytes_of(raw_base))
            raw_models = [r(decoded) for r in read_models]
            values = _values(raw_base, base.dtype, task.compute) if base and raw_base is not None else None
            rows = [_values(r, task.models[i].dtype, task.compute) for r, i in zip(raw_models, present)]
            models = torch.stack(rows) if rows else torch.zeros(0, b - a, dtype=torch_dtype(task.compute))
            return Block(task.name, a, values, models, *args, reference=_bytes_of(raw_base))

        return build

    # streaming ----------------------------------------------------------------------------
    def _window(self, task: Task) -> int:
        ref = task.ref
        per_block = min(ref.chunk_size, ref.size) // ITEMSIZE[ref.dtype] * 8 * (len(task.models) + 1)
        return max(1, min(4 * self.threads, self.memory_limit // max(1, per_block * BLOCK_OVERHEAD)))

    def _ordered(self, task: Task, jobs: Iterator[Callable[[], R] | _Ready[R]]) -> Iterator[R]:
        """Run callables on the pool with a bounded window; yield every result in job order."""
        pending: deque[Future[R] | _Ready[R]] = deque()
        window = self._window(task)
        for job in jobs:
            pending.append(job if isinstance(job, _Ready) else self.pool.submit(self._timed, job))
            while len(pending) >= window:
                yield _result(pending.popleft())
        while pending:
            yield _result(pending.popleft())

    def _timed(self, job: Callable[[], R]) -> R:
        lazytorch.configure_thread()
        began = time.perf_counter()
        try:
            return job()
        finally:
            self.busy.append(time.perf_counter() - began)  # list.append is atomic: no lock

    def _cache(self, task: Task, o: Outline) -> list[Block | None] | None:
        """Build every block once when the whole tensor fits in half the memory limit, so the
        passes and the combine reuse them instead of reading and decoding again. Blocks where
        every input is the base stay None when nothing needs their values."""
        if not o.cached:
            return None

        def jobs() -> Iterator[Callable[[], Block | None] | _Ready[Block | None]]:
            for n in range(len(o.blocks)):
                yield self._block(task, o, n) if o.cache_reads(n) else _Ready(None)

        return list(self._ordered(task, jobs()))

    def _sweep(self, task: Task, o: Outline, pas: Pass, ctx: TensorContext,
               cache: list[Block | None] | None) -> torch.Tensor:
        """The pass's sums over every block, added elementwise in block order."""

        def jobs() -> Iterator[Callable[[], torch.Tensor] | _Ready[torch.Tensor]]:
            for n, (a, b) in enumerate(o.blocks):
                if cache is not None:
                    blk = cache[n]
                    yield _Ready(pas.zero_block(b - a, ctx)) if blk is None else partial(pas.measure, blk, ctx)
                elif not o.sweep_reads(pas, n):
                    yield _Ready(pas.zero_block(b - a, ctx))
                else:
                    yield _built(self._block(task, o, n), partial(_measured, pas, ctx))

        total: torch.Tensor | None = None
        for part in self._ordered(task, jobs()):
            total = part if total is None else total + part
        if total is None:
            raise AssertionError("a sweep over a tensor without blocks")
        return total

    def _measure(self, task: Task, method: MergeMethod, o: Outline) -> tuple[TensorContext, list[Block | None] | None]:
        """The tensor's context with every needed pass finished (sweeps, or the catalog), and the
        block cache if there is one."""
        ctx = TensorContext(len(task.models), task.compute, task.p, task.g, task.numel,
                            {a: n for n, (a, _) in enumerate(o.blocks)})
        if any(task.omitted):
            base = task.base
            assert base is not None  # omit() refuses omissions without a base
            for i, gone in enumerate(task.omitted):
                if gone:  # present: `outline` checked that the catalog covers this input
                    hist = catalog.tensor_histogram(self.txn, task.stored[i], base, gone)
                    if hist is None:
                        raise AssertionError(f"tensor {task.name!r}: catalog entries vanished after the outline")
                    ctx.omitted_hist[i] = hist
        method.prepare(ctx)
        cache = self._cache(task, o)
        if not o.blocks:
            return ctx, cache  # no elements: nothing to measure or combine
        for pas in o.needed:
            if pas in o.swept:
                total = self._sweep(task, o, pas, ctx, cache)
            else:
                assert pas.from_catalog is not None and o.hist is not None  # why it is not swept
                found = pas.from_catalog(ctx, o.hist.get)
                if found is None:
                    raise AssertionError(f"the catalog's sums for {pas.name} vanished after the outline")
                total = found
            pas.finish(ctx, total)
        return ctx, cache

    def run(self, task: Task, method: MergeMethod) -> Tensor:
        """The output tensor of `task`, following its outline (`outline.Outline`)."""
        ref = task.ref
        if task.copy is not None:
            self.realized.tensors_copied += 1
            self.realized.chunks_skipped += len(task.copy.chunks) * len(task.models)
            self.progress.advance(task.copy.size)
            return task.copy
        o = outline(self.txn, task, method, self.memory_limit)
        self.realized.chunks_omitted += sum(len(g) for g in task.omitted)
        ctx, cache = self._measure(task, method, o)
        base = task.base
        same = base is not None and (base.dtype, base.shape, base.chunk_size) == (task.out, task.ref.shape,
                                                                                 self.chunk_size)
        asm = _Assembler(self.sink, self.chunk_size, ITEMSIZE[task.out], base.chunks if same and base else None)

        osz, numel = ITEMSIZE[task.out], ref.size // ITEMSIZE[ref.dtype]

        def whole(a: int, b: int) -> bool:
            """Whether block [a, b)'s output is one whole output chunk (its worker frames and
            hashes it); blocks follow each other from 0, so where it starts is known here."""
            n = (b - a) * osz
            return a * osz % self.chunk_size == 0 and (n == self.chunk_size or (b == numel and n < self.chunk_size))

        def combined(blk: Block) -> bytes:
            return _to_bytes(method.combine(blk, ctx), task.out)

        def combined_chunk(blk: Block) -> _Chunk:
            return _to_chunk(method.combine(blk, ctx), task.out, blk.reference if same else None)

        def jobs() -> Iterator[Callable[[], bytes | _Chunk] | _Ready[bytes | _Chunk | _Digest]]:
            for n, (a, b) in enumerate(o.blocks):
                present = o.present(n)
                if method.sparse_inputs:
                    self.realized.chunks_skipped += len(task.models) - len(present)
                step = o.step(n)
                if step is not Step.COMBINE and not method.sparse_inputs:
                    self.realized.chunks_skipped += len(task.models)
                if step is Step.REUSE:
                    yield _Ready(_Digest(ref.chunks[a // task.per_chunk], (b - a) * ITEMSIZE[ref.dtype]))
                elif step is Step.COPY:
                    yield partial(_converted, self._read(task, ref, a, b), ref.dtype, task.compute, task.out,
                                  whole(a, b))
                else:
                    then = combined_chunk if whole(a, b) else combined
                    blk = cache[n] if cache is not None else None
                    yield partial(then, blk) if blk is not None else _built(self._block(task, o, n), then)

        for item in self._ordered(task, jobs()):
            if isinstance(item, _Digest):
                asm.digest(item.key, item.nbytes)
                nbytes = item.nbytes
            elif isinstance(item, _Chunk):
                asm.chunk(item)
                nbytes = len(item.frame) - 1
                self.realized.output_bytes += nbytes
            else:
                asm.data(item)
                nbytes = len(item)
                self.realized.output_bytes += nbytes
            self.progress.advance(nbytes)
        chunks = asm.finish()
        return Tensor(asm.size, self.chunk_size, chunks, task.out, ref.shape)


def _result(item: Future[R] | _Ready[R]) -> R:
    return item.value if isinstance(item, _Ready) else item.result()


@dataclass
class Prepared:
    """Everything a plan's execution needs decided before a byte is computed."""

    template: Input
    todo: list[Task]
    files: list[tuple[str, list[str], dict[str, str] | None]]  # output shards: file, tensors, metadata
    origins: list[int] | None  # per output layer, the template layer it stands in (slices only)
    derived: dict[bytes, bytes]  # chunks of derived inputs (adapters applied), by digest, in memory
    vocab: tokenizer.Vocabulary | None  # the merged tokenizer (tokenizer_source, chat_template)


def prepare(txn: Txn, plan: Plan, method: MergeMethod, memory: MemorySink) -> Prepared:
    """The plan's inputs, tasks and output layout, checked; nothing is written to the store
    (tensors derived from the inputs keep their chunks in `memory`)."""
    template, base, inputs = _inputs(txn, plan)
    if plan.adapters:
        from ..model import lora

        adapted = [(inp, txn.snapshot_of(adapter), short(adapter))
                   for inp, adapter in zip([base, *inputs], plan.adapters) if adapter is not None and inp is not None]
        for inp, adapter_snap, label in adapted:  # every adapter refused or accepted before any is computed
            lora.check(txn, inp.snapshot, adapter_snap, None, label)
        for inp, adapter_snap, label in adapted:
            inp.overrides = dict(lora.apply(txn, inp.snapshot, adapter_snap, memory, None, label).tensors)
    vocab = _vocabulary(txn, plan, method, base, inputs, memory, template)
    made = layout.wanted(txn, plan, method, template, base if method.base != "none" else None, inputs)
    todo = _tasks(plan, method, made)
    unknown = set(plan.omit or {}) - {t.name for t in todo}
    if unknown:
        raise BadMerge(f"the plan leaves out chunks of tensors it does not merge: {sorted(unknown)[:3]}")
    todo = [omit(t, (plan.omit or {}).get(t.name)) for t in todo]
    files = ([(s.file, list(s.tensors), s.metadata) for s in template.snapshot.shards] if plan.slices is None
             else layout.shards(template.snapshot, made))
    return Prepared(template, todo, files, layout.layer_origins(plan, template), memory.kept, vocab)


def _merged_inputs(plan: Plan, method: MergeMethod, base: Input | None, inputs: list[Input]) -> list[Input]:
    """The inputs every vocabulary tensor is merged from, in the order its task has them (the
    base first for methods with one). With slices, every slice must take the same models."""
    if plan.slices is None:
        return ([base] if base is not None and method.base != "none" else []) + inputs
    taken = {tuple(i for i, _, _ in sl["sources"]) for sl in plan.slices}
    if len(taken) > 1:
        raise BadMerge("a tokenizer merge with slices needs every slice to take the same models "
                       "(the embeddings come from the first slice's, the head from the last's)")
    sl = plan.slices[0]
    at = sl["base"] if method.base != "none" else None
    order = ([at] if at is not None else []) + [k for k in range(len(sl["sources"])) if k != at]
    return [inputs[sl["sources"][k][0]] for k in order]


def _vocabulary(txn: Txn, plan: Plan, method: MergeMethod, base: Input | None, inputs: list[Input],
                memory: MemorySink, template: Input) -> tokenizer.Vocabulary | None:
    """The merged tokenizer, and every input's vocabulary tensors put into its vocabulary (as
    derived tensors in `memory`, in the compute dtype, as MergeKit's loader gives them)."""
    if plan.tokenizer is None and plan.chat_template is None:
        return None
    ins = _merged_inputs(plan, method, base, inputs)
    first = 0 if base is not None and method.base != "none" else None
    base_no = first if first is not None else next(
        (k for k, inp in enumerate(ins) if plan.base is not None and inp.commit == plan.base), None)

    def number(commit: object) -> int:
        found = next((k for k, inp in enumerate(ins) if inp.commit == commit), None)
        if found is None:
            raise BadMerge(f"tokenizer source {short(bytes(commit)) if isinstance(commit, bytes) else commit!r} "
                           "is not one of the merge's inputs")
        return found

    spec = tokenizer.with_models(plan.tokenizer, number) if plan.tokenizer is not None else None
    files = [{rel: b"".join(chunk_views(txn, txn.blob(bid), rel)) for rel, bid in inp.snapshot.files.items()
              if tokenizer.is_tokenizer_file(rel) or rel == "config.json"} for inp in ins]
    vocab = tokenizer.build(files, base_no, spec, plan.chat_template, names=[short(inp.commit) for inp in ins])
    if not vocab.changed:
        return vocab
    for name in (n for n in template.names if tokenizer.is_vocab_tensor(n)):
        stored = [t for inp in ins if (t := inp.tensor(txn, name)) is not None]
        if len(stored) < len(ins):
            continue  # a tensor missing from an input is reported when the tasks are made
        compute = plan.compute_dtype or stored[0].dtype
        values = [_whole(txn, t, memory.kept).to(torch_dtype(compute)) for t in stored]
        for inp, aligned in zip(ins, tokenizer.align(values, vocab)):
            raw = _to_bytes(aligned, compute)
            chunks = tuple(memory.data(raw[i:i + plan.chunk_size]) for i in range(0, len(raw), plan.chunk_size))
            inp.overrides[name] = Tensor(len(raw), plan.chunk_size, chunks, compute, tuple(aligned.shape))
    return vocab


def _whole(txn: Txn, t: Tensor, kept: dict[bytes, bytes]) -> torch.Tensor:
    """A stored (or derived) tensor's values, whole, in its dtype."""
    raw = bytearray(b"".join(kept[k] if k in kept else txn.chunk(k) for k in t.chunks))
    return torch.frombuffer(raw, dtype=torch_dtype(t.dtype)).reshape(t.shape) if raw else \
        torch.zeros(t.shape, dtype=torch_dtype(t.dtype))


def _files(txn: Txn, prep: Prepared, tensors: dict[str, Tensor], out_dtype: str | None,
           sink: ChunkSink) -> tuple[dict[str, bytes], list[Blob]]:
    """The template's non-tensor files; config.json and the shard index follow the output."""
    files: dict[str, bytes] = {}
    blobs: list[Blob] = []
    vocab = prep.vocab
    for rel, bid in prep.template.snapshot.files.items():
        if vocab is not None and tokenizer.is_tokenizer_file(rel):
            continue  # the merged tokenizer's files replace the template's
        blob = txn.blob(bid)
        data = b"".join(chunk_views(txn, blob, rel))
        if rel == "config.json":
            new = _config(data, out_dtype, prep)
        elif rel.endswith(".safetensors.index.json"):
            new = layout.index_json(data, prep.files, sum(t.size for t in tensors.values()))
        else:
            new = None
        if new is not None and new != data:
            blob = sink.blob(new, rel)
            blobs.append(blob)
        files[rel] = blob.id
    for rel, data in (vocab.files if vocab is not None else {}).items():
        blob = sink.blob(data, rel)
        blobs.append(blob)
        files[rel] = blob.id
    return files, blobs


_TORCH_NAME = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def _config(data: bytes, out_dtype: str | None, prep: Prepared) -> bytes | None:
    """config.json naming the output's dtype (as MergeKit: out_dtype, else dtype) and layers."""
    try:
        doc = json.loads(data)
        keys = [k for k in ("torch_dtype", "dtype") if k in doc]
    except (ValueError, TypeError):
        return None  # not JSON we understand: keep the donor's bytes
    if not isinstance(doc, dict):
        return None
    changed = False
    if out_dtype in _TORCH_NAME and not all(doc[k] == _TORCH_NAME[out_dtype] for k in keys):
        for k in keys or ["torch_dtype"]:
            doc[k] = _TORCH_NAME[out_dtype]
        changed = True
    if prep.origins is not None:
        changed |= layout.rewrite_layers(doc, prep.origins, prep.template.layers)
    size = prep.vocab.size if prep.vocab is not None else None
    if size is not None and doc.get("vocab_size") != size:
        doc["vocab_size"] = size
        changed = True
    return (json.dumps(doc, indent=2) + "\n").encode() if changed else None


def execute(store: Store, plan: Plan, sink: ChunkSink, progress: Progress, threads: int,
            memory_limit: int) -> Result:
    """Compute the merged snapshot of `plan`; chunks go through `sink`, nothing else is written."""
    method = methods.get(plan.method)
    began = time.perf_counter()
    with store.read() as txn:  # the tasks hold decoded objects only: they outlive the transaction
        prep = prepare(txn, plan, method, MemorySink(plan.chunk_size))
    todo = prep.todo
    # The output is written (by the sink's writer thread) while the inputs are read; the map
    # cannot grow under an open read, so the sink reserves the output's room first.
    with sink.pipelined(sum(_out_size(t) for t in todo) + (16 << 20)) as txn:
        progress.start(f"merge {plan.method}", sum(_out_size(t) for t in todo))
        try:
            # A budget's chunks are scattered through the file: fetch them in runs, read-ahead off.
            # An exact merge reads every differing chunk, contiguous per input: the kernel's
            # read-ahead serves it as well (docs/benchmarks.md). MP_PREFETCH=0: off, to compare.
            reads = (key for t in todo if t.copy is None
                     for key in outline(txn, t, method, memory_limit, counting=True).chunks_read())
            prefetching = bool(plan.omit) and os.environ.get("MP_PREFETCH", "1") != "0"
            # one intra-op thread for torch in every worker, so sums do not depend on the machine's cores
            with (lazytorch.single_threaded(), ThreadPoolExecutor(max_workers=threads) as pool,
                  Prefetcher(store, txn, reads) if prefetching else nullcontext() as prefetch):
                ex = Executor(store, txn, sink, pool, threads, memory_limit, plan, progress, prep.derived, prefetch)
                outputs = {t.name: ex.run(t, method) for t in todo}
        finally:
            progress.finish()
        for key in {k for t in outputs.values() for k in t.chunks if k in prep.derived}:
            sink.data(prep.derived[key])  # derived chunks the output keeps as they are
        objects: list[StoredObject] = list(outputs.values())
        shards = []
        for file, names, metadata in prep.files:
            entries = [(n, outputs[n].dtype, outputs[n].shape, outputs[n].size) for n in names]
            hblob = sink.blob(build_header(entries, metadata), "header")
            objects.append(hblob)
            shards.append(Shard(file, hblob.id, tuple(names), metadata))
        files, blobs = _files(txn, prep, outputs, plan.out_dtype or plan.compute_dtype, sink)
        objects.extend(blobs)
    snapshot = Snapshot({n: t.id for n, t in outputs.items()}, files, tuple(shards))
    ex.realized.seconds = {"execute": round(time.perf_counter() - began, 3),
                           "read": round(ex.read_seconds, 3), "write": round(sink.write_seconds, 3),
                           "workers": round(sum(ex.busy), 3)}
    return Result(snapshot, objects, ex.realized)


def chunks_read(store: Store, plan: Plan, memory_limit: int) -> list[bytes]:
    """Every stored chunk of a tensor that executing `plan` reads, once each, in reading order:
    what a lazy clone fetches before it merges (a chunk the output takes from the base by
    digest is not among them)."""
    method = methods.get(plan.method)
    with store.read() as txn:
        prep = prepare(txn, plan, method, MemorySink(plan.chunk_size))
        keys = (key for t in prep.todo if t.copy is None
                for key in outline(txn, t, method, memory_limit, counting=True).chunks_read())
        return [k for k in dict.fromkeys(keys) if k not in prep.derived]


def _out_size(task: Task) -> int:
    return task.numel * ITEMSIZE[task.out]
