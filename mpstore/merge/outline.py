"""What merging one tensor reads, in what order, and the account of it.

A `Task` is one output tensor with its inputs and parameters. Its `Outline` decides every read of
its merge: the blocks, which inputs differ from the base in each, which passes sweep and which
come from the delta catalog, whether blocks are cached, and what each block's output takes
(`Step`). `Executor.run` follows the outline decision for decision, and `Accountant` walks the
same decisions without reading, both counting through one `ReadAccount` into a `Realized`: the
planner's estimate and what execution realizes come from one type, so they cannot disagree.

Nothing here reads a chunk's bytes or does merge arithmetic; the catalog is asked only whether its
entries exist (when counting) or for their histograms (when running).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from ..errors import BadMerge
from ..store.dtypes import ITEMSIZE, holds
from ..store.env import Txn
from ..store.objects import Tensor
from . import catalog
from .methods.base import MergeMethod, Params, Pass


@dataclass
class Task:
    """One output tensor: its inputs, resolved parameters and dtypes."""

    name: str
    base: Tensor | None
    models: list[Tensor]
    p: list[Params]
    g: Params
    compute: str
    out: str
    copy: Tensor | None = None  # output is this stored tensor as it is
    stored: list[Tensor] = field(default_factory=list)  # the inputs as stored (before omission)
    omitted: list[frozenset[int]] = field(default_factory=list)  # per input: chunks read as the base's

    @property
    def ref(self) -> Tensor:
        """The tensor unchanged blocks are taken from: the base, else the first input."""
        return self.base or self.models[0]

    @property
    def numel(self) -> int:
        return self.ref.size // ITEMSIZE[self.ref.dtype]

    @property
    def per_chunk(self) -> int:
        """Elements per chunk of the inputs."""
        return self.ref.chunk_size // ITEMSIZE[self.ref.dtype]


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
    # time per phase: execute (wall), read and write (the main thread's), workers (the sum of
    # every worker job's time: workers / (threads * execute) is how busy the cores were)
    seconds: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return {k: (dict(v) if isinstance(v, dict) else v) for k, v in self.__dict__.items()}


def chunk_range(t: Tensor, a: int, b: int) -> range:
    """The chunks of stored tensor t that hold its elements [a, b)."""
    per = t.chunk_size // ITEMSIZE[t.dtype]
    return range(a // per, (b - 1) // per + 1 if b > a else a // per)


class ReadAccount:
    """Accounts for reads by source, counting each distinct chunk once: what a budget bounds.
    Execution and the planner's estimate count through this one class."""

    def __init__(self, realized: Realized):
        self.realized = realized
        self.seen: set[bytes] = set()

    def read(self, task: Task, t: Tensor, a: int, b: int) -> list[tuple[int, int, int]]:
        """Account for elements [a, b) of input tensor t; returns (chunk, lo, hi) element spans."""
        isz = ITEMSIZE[t.dtype]
        per = t.chunk_size // isz
        spans = []
        for c in chunk_range(t, a, b):
            lo, hi = max(a, c * per) - c * per, min(b, (c + 1) * per) - c * per
            spans.append((c, lo, hi))
            key = t.chunks[c]
            if key not in self.seen:
                self.seen.add(key)
                n = t.chunk_len(c)
                base = task.base
                if base is None or base.dtype != t.dtype or base.chunks[c] != key:
                    self.realized.expert_bytes += n
                else:
                    self.realized.base_bytes += n
        self.realized.read_bytes += (b - a) * isz
        return spans


class Step(Enum):
    """What producing one block of the output takes."""

    REUSE = "reuse"  # the reference's chunk digest as it is: nothing read, computed or written
    COPY = "copy"  # the reference's values, read and converted to the output dtype
    COMBINE = "combine"  # the method's combine over the block's inputs


@dataclass
class Outline:
    """What decides every read of one tensor's merge: `Executor.run` follows it and `Accountant`
    counts it, through the same methods, so the planner's estimate is what execution does."""

    task: Task
    blocks: list[tuple[int, int]]
    changed: list[list[int]]  # per block: inputs whose chunks differ from the base's there
    needed: list[Pass]  # passes this tensor needs, in order
    swept: list[Pass]  # of them, those that sweep the blocks (the others come from the catalog)
    hist: dict[int, np.ndarray | None] | None  # per input: catalog histogram of |delta| (None: counting)
    cached: bool  # every block is read once and kept for the passes and the combine
    skip_equal: bool  # with a cache, blocks where every input is the base are not even read
    identity: bool  # a block where every input is the base is the base
    sparse_inputs: bool  # the method reads only the inputs that differ from the base in a block

    def present(self, n: int) -> list[int]:
        """The inputs block n reads: those that differ there, or all of them."""
        return self.changed[n] if self.sparse_inputs else list(range(len(self.task.models)))

    def inputs_read(self, n: int) -> list[Tensor]:
        """The stored tensors reading block n touches, in read order (base first)."""
        task = self.task
        return ([task.base] if task.base else []) + [task.models[i] for i in self.present(n)]

    def cache_reads(self, n: int) -> bool:
        """With a cache: block n is read into it (else it stays empty, its deltas all zero)."""
        return self.cached and not (self.skip_equal and not self.changed[n])

    def sweep_reads(self, pas: Pass, n: int) -> bool:
        """Without a cache: pass `pas` reads block n (else it adds the pass's zero-block sums)."""
        return not (pas.zero is not None and self.task.base is not None and not self.changed[n])

    def chunks_read(self) -> Iterator[bytes]:
        """The digests of the chunks this merge reads, block by block (each block's tensors in
        `inputs_read` order, the reference's for a copied block): what a prefetcher fetches ahead.
        A cached tensor's blocks are read before any is copied; that order differs from this one
        only in when a chunk is fetched, not in which."""
        for n, (a, b) in enumerate(self.blocks):
            step = self.step(n)
            swept = self.cache_reads(n) if self.cached else any(self.sweep_reads(p, n) for p in self.swept)
            tensors = self.inputs_read(n) if swept or step is Step.COMBINE else []
            for t in tensors + ([self.task.ref] if step is Step.COPY else []):
                yield from (t.chunks[c] for c in chunk_range(t, a, b))

    def step(self, n: int) -> Step:
        if not (self.identity and not self.changed[n]):
            return Step.COMBINE
        return Step.REUSE if self.reusable(n) else Step.COPY

    def reusable(self, n: int) -> bool:
        """An unchanged block that is a whole chunk of the output dtype: its digest is reused."""
        task, (a, b) = self.task, self.blocks[n]
        return (task.out == task.ref.dtype and holds(task.compute, task.ref.dtype)
                and a % task.per_chunk == 0
                and (b - a == task.per_chunk or (b == task.numel and b - a < task.per_chunk)))


def _blocks(task: Task, method: MergeMethod) -> list[tuple[int, int]]:
    """One chunk's elements per block; for row-local methods, the whole rows within a chunk (at
    least one); for `whole_tensor` methods, one block."""
    numel, per = task.numel, task.per_chunk
    if method.whole_tensor(task.g):
        return [(0, numel)] if numel else []
    if method.row_local(task.g) and task.ref.shape:
        row = task.ref.shape[-1]  # a 1-D tensor is one line: one block
        per = max(1, per // row) * row
    return [(a, min(a + per, numel)) for a in range(0, numel, per)]


def _changed(task: Task, a: int, b: int) -> list[int]:
    """Inputs whose chunks over [a, b) are not all the reference input's (the base, if any)."""
    ref, per = task.ref, task.per_chunk
    span = range(a // per, (b - 1) // per + 1) if b > a else range(0)
    return [i for i, m in enumerate(task.models)
            if m.dtype != ref.dtype or any(m.chunks[c] != ref.chunks[c] for c in span)]


def _histograms(txn: Txn, task: Task, counting: bool) -> dict[int, np.ndarray | None] | None:
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
    hists: dict[int, np.ndarray | None] = {}
    for i, t in enumerate(task.stored):
        h = None
        if counting:
            found = catalog.covers(txn, t, ref)
        else:
            h = catalog.tensor_histogram(txn, t, ref)
            found = h is not None
        if not found:
            if task.omitted[i]:
                raise BadMerge(f"tensor {task.name!r}: input {i + 1} has chunks left out by the "
                               "budget but no catalog entries (run `mp analyze`)")
            return None
        hists[i] = h
    return hists


def outline(txn: Txn, task: Task, method: MergeMethod, memory_limit: int, counting: bool = False) -> Outline:
    """The outline of `task`'s merge. `counting`: for the estimate (catalog histograms are only
    looked up, not summed)."""
    blocks = _blocks(task, method)
    changed = [_changed(task, a, b) for a, b in blocks]
    needed = [p for p in method.passes if p.needed(task.p, task.g)]
    hist = _histograms(txn, task, counting) if any(p.from_catalog is not None for p in needed) else None
    swept = [p for p in needed if not (p.from_catalog is not None and hist is not None)]
    # inputs and their deltas (a block keeps both once a pass has asked for the deltas)
    need = task.numel * ITEMSIZE[task.compute] * (2 * len(task.models) + 1)
    cached = bool(swept) and need <= memory_limit // 2
    skip_equal = (task.base is not None and all(p.zero is not None for p in swept)
                  and method.local_identity(task.g, True))
    identity = method.local_identity(task.g, task.base is not None or method.base == "none")
    return Outline(task, blocks, changed, needed, swept, hist, cached, skip_equal, identity, method.sparse_inputs)


class Accountant:
    """Counts the reads, output and work `Executor.run` would make for each task, reading no chunk:
    the planner's estimate. It walks the same `Outline` decisions through the same `ReadAccount`."""

    def __init__(self, txn: Txn, memory_limit: int):
        self.txn, self.memory_limit = txn, memory_limit
        self.realized = Realized()
        self.reads = ReadAccount(self.realized)
        self.work = 0  # elements x inputs x sweeps to compute

    def account(self, task: Task, method: MergeMethod) -> None:
        if task.copy is not None:
            self.realized.tensors_copied += 1
            return
        o = outline(self.txn, task, method, self.memory_limit, counting=True)

        def block(n: int) -> None:
            a, b = o.blocks[n]
            for t in o.inputs_read(n):
                self.reads.read(task, t, a, b)

        if o.cached:
            for n in range(len(o.blocks)):
                if o.cache_reads(n):
                    block(n)
        else:
            for pas in o.swept:
                for n in range(len(o.blocks)):
                    if o.sweep_reads(pas, n):
                        block(n)
        for n, (a, b) in enumerate(o.blocks):
            step = o.step(n)
            if step is Step.REUSE:
                continue
            if step is Step.COPY:
                self.reads.read(task, task.ref, a, b)
            else:
                if not o.cached:
                    block(n)
                self.work += (b - a) * (1 + len(o.present(n))) * (1 + len(o.swept))
            self.realized.output_bytes += (b - a) * ITEMSIZE[task.out]
        self.realized.chunks_omitted += sum(len(g) for g in task.omitted)
