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
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from . import methods as M
from . import params as P
from .checkout import chunk_views
from .chunks import ChunkSink
from .dtypes import ITEMSIZE, torch_dtype
from .ids import short
from .objects import Blob, Plan, Shard, Snapshot, Tensor, encode, object_id
from .progress import Progress
from .safetensors_header import build_header
from .store import Store, Txn

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


@dataclass
class Realized:
    """What a merge really did, for `mp show` and the benchmarks."""

    base_bytes: int = 0
    expert_bytes: int = 0
    chunks_skipped: int = 0
    tensors_copied: int = 0

    def to_json(self) -> dict:
        return dict(self.__dict__)


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


def _tasks(txn: Txn, plan: Plan, method: M.Method, template: Snapshot,
           base: Snapshot | None, models: list[Snapshot]) -> list[Task]:
    """Validate every tensor and resolve every parameter before anything is computed."""
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


class Executor:
    def __init__(self, store: Store, txn: Txn, sink: ChunkSink, threads: int, memory_limit: int,
                 plan: Plan, progress: Progress):
        self.store, self.txn, self.sink = store, txn, sink
        self.chunk_size, seed = plan.chunk_size, plan.seed
        self.threads, self.memory_limit, self.seed = threads, memory_limit, seed
        self.progress = progress
        self.realized = Realized()
        self.pool: ThreadPoolExecutor | None = None

    # reading -----------------------------------------------------------------------------
    def _read(self, t: Tensor, a: int, b: int, source: str) -> bytearray:
        """Elements [a, b) of a stored tensor as raw bytes (chunks hash-checked)."""
        isz = ITEMSIZE[t.dtype]
        per = t.chunk_size // isz
        out = bytearray((b - a) * isz)
        pos = 0
        for c in range(a // per, (b - 1) // per + 1 if b > a else a // per):
            view = self.txn.chunk(t.chunks[c])
            lo, hi = max(a, c * per) - c * per, min(b, (c + 1) * per) - c * per
            out[pos: pos + (hi - lo) * isz] = view[lo * isz: hi * isz]
            pos += (hi - lo) * isz
        self.store.touched(len(out))
        if source == "base":
            self.realized.base_bytes += len(out)
        else:
            self.realized.expert_bytes += len(out)
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

    def _block(self, task: Task, method: M.Method, a: int, b: int, changed: list[int]) -> Callable[[], M.Block]:
        """Read a block's inputs now; build the tensors later, in a worker. `changed`: the
        inputs whose chunks differ from the base's here (only those are read for methods with
        sparse inputs)."""
        present = changed if method.sparse_inputs else list(range(len(task.models)))
        raw_base = self._read(task.base, a, b, "base") if task.base else None
        raw_models = [self._read(task.models[i], a, b, "expert") for i in present]
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

    def _cache(self, task: Task, method: M.Method, blocks: list, changed: list[list[int]],
               sweeps: list[M.Pass]) -> list | None:
        """Build every block once when the whole tensor fits in half the memory limit, so the
        passes and the combine reuse them instead of reading and decoding again. Blocks where
        every input is the base stay None when nothing needs their values."""
        ref = task.base or task.models[0]
        numel = ref.size // ITEMSIZE[ref.dtype]
        # inputs and their deltas (a block keeps both once a pass has asked for the deltas)
        need = numel * torch_dtype(task.compute).itemsize * (2 * len(task.models) + 1)
        if not any(p.measure for p in sweeps) or need > self.memory_limit // 2:
            return None
        skip_equal = (task.base is not None and all(p.zero is not None for p in sweeps if p.measure)
                      and method.local_identity(task.g, True))

        def jobs():
            for (a, b), ch in zip(blocks, changed):
                yield None if skip_equal and not ch else self._block(task, method, a, b, ch)

        return list(self._ordered(task, jobs()))

    def _sweep(self, task: Task, method: M.Method, blocks: list, changed: list[list[int]],
               pas: M.Pass, stats: dict, cache: list | None) -> dict:
        def jobs():
            for n, (a, b) in enumerate(blocks):
                if cache is not None:
                    blk = cache[n]
                    yield pas.zero(b - a, stats, len(task.models)) if blk is None else (
                        lambda blk=blk: pas.measure(blk, stats))
                elif pas.zero is not None and task.base is not None and not changed[n]:
                    yield pas.zero(b - a, stats, len(task.models))
                else:
                    build = self._block(task, method, a, b, changed[n])
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
        blocks = self._blocks(task, method)
        stats: dict = {"inputs": len(task.models), "block_of": {a: n for n, (a, _) in enumerate(blocks)}}
        changed = [self._changed(task, a, b) for a, b in blocks]
        sweeps = [p for p in method.passes if p.needed(task.p, task.g)]
        cache = self._cache(task, method, blocks, changed, sweeps)
        for pas in sweeps:
            totals = self._sweep(task, method, blocks, changed, pas, stats, cache) if pas.measure else {}
            pas.finish(stats, totals, task.p, task.g, numel)
        identity = method.local_identity(task.g, task.base is not None or method.base == "none")
        same_dtype = task.out == ref.dtype
        per_chunk = ref.chunk_size // ITEMSIZE[ref.dtype]
        asm = _Assembler(self.sink, self.chunk_size)

        def jobs():
            for n, (a, b) in enumerate(blocks):
                if method.sparse_inputs:
                    self.realized.chunks_skipped += len(task.models) - len(changed[n])
                if identity and not changed[n]:
                    if not method.sparse_inputs:
                        self.realized.chunks_skipped += len(task.models)
                    if same_dtype and a % per_chunk == 0 and (b - a == per_chunk or b == numel):
                        yield ("digest", ref.chunks[a // per_chunk], (b - a) * ITEMSIZE[ref.dtype])
                        continue
                    raw = self._read(ref, a, b, "base")
                    yield lambda raw=raw: _to_bytes(_values(raw, ref.dtype, task.compute), task.out)
                    continue
                blk = cache[n] if cache is not None else None
                if blk is not None:
                    yield lambda blk=blk: _to_bytes(method.combine(blk, stats), task.out)
                else:
                    build = self._block(task, method, a, b, changed[n])
                    yield lambda build=build: _to_bytes(method.combine(build(), stats), task.out)

        for item in self._ordered(task, jobs()):
            if isinstance(item, tuple):
                asm.digest(item[1], item[2])
                self.progress.advance(item[2])
            else:
                asm.data(item)
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
    with store.read() as txn:
        base = txn.object(txn.object(plan.base).snapshot) if plan.base and method.base != "none" else None
        models = [txn.object(txn.object(m).snapshot) for m in plan.models]
        template = base or (txn.object(txn.object(plan.base).snapshot) if plan.base else models[0])
        tasks = _tasks(txn, plan, method, template, base, models)
        ex = Executor(store, txn, sink, threads, memory_limit, plan, progress)
        progress.start(f"merge {plan.method}", sum(_out_size(t) for t in tasks))
        old_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(max_workers=threads) as pool:
                ex.pool = pool
                outputs = {t.name: ex.run(t, method) for t in tasks}
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
    return Result(snapshot, objects, ex.realized)


def _out_size(task: Task) -> int:
    ref = task.base or task.models[0]
    return ref.size // ITEMSIZE[ref.dtype] * ITEMSIZE[task.out]
