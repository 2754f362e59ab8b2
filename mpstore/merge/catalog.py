"""The delta catalog: statistics of each expert chunk's difference from its base chunk.

A budgeted merge must decide which expert chunks to read without reading them, and a method
with a tensor-global step (a top-k magnitude threshold) must know that quantity over chunks it
leaves unread. So at add time (or `mp analyze`) every chunk whose digest differs from the base's
chunk at the same position is measured once, in float32: its delta's L2 norm, largest
magnitude, number of changed elements, the base chunk's largest magnitude (what bounds output
rounding), and a histogram of |delta| over the top 16 bits of the float32 pattern — exactly the
first radix pass of the executor's top-k selection, so summed histograms place a threshold.
Entries are keyed by (expert chunk digest, base chunk digest, dtype): any model or merge that
meets the same pair shares them, and gc drops them with their chunks.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import msgpack
import numpy as np

from ..errors import CorruptData
from ..progress import Progress
from ..store.chunks import FOLIO_BYTES, ChunkSink, Decoded, Watch
from ..store.derived import catalog_chunks, catalog_dtype, catalog_key
from ..store.dtypes import FLOATS, ITEMSIZE
from ..store.env import Store, Txn, delta_reference
from ..store.objects import Tensor

FORMAT = 2  # 1: before base_l2 (entries of that layout are outdated: gc removes them)
NUMPY = {"F16": np.float16, "F32": np.float32, "F64": np.float64}
BINS = 1 << 16
WRITE_BATCH = 2048  # entries per write transaction
WINDOW = 16  # chunk pairs in flight per worker thread
ENTRY_BOUND = 6 * BINS + 128  # bytes of the largest entry: every bin used (uint16 bin, uint32 count)
Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True)
class DeltaStats:
    dtype: str  # of both chunks: the statistics depend on how their bytes are read
    l2: float  # ||expert - base||_2 over the chunk (float32 differences, float64 sum)
    max_abs: float  # largest |expert - base|
    changed: int  # elements whose delta is not zero
    base_max: float  # largest |base| in the chunk
    base_l2: float  # ||base||_2 over the chunk (bounds output rounding, see planner._bound)
    bins: bytes  # uint16: high 16 bits of float32 |delta| that occur, ascending
    counts: bytes  # uint32: how many elements fall in each of those bins

    def encode(self) -> bytes:
        return msgpack.packb([FORMAT, self.dtype, self.l2, self.max_abs, self.changed, self.base_max,
                              self.base_l2, self.bins, self.counts], use_bin_type=True)

    @classmethod
    def decode(cls, data: bytes | memoryview, key: bytes) -> DeltaStats:
        try:
            fmt, dtype, l2, mx, changed, base_max, base_l2, bins, counts = msgpack.unpackb(data, raw=False)
            if fmt != FORMAT or dtype not in FLOATS or len(bins) * 2 != len(counts):
                raise ValueError("unexpected layout")
            return cls(dtype, float(l2), float(mx), int(changed), float(base_max), float(base_l2),
                       bytes(bins), bytes(counts))
        except Exception as e:  # stored bytes that are not what we wrote
            raise CorruptData(f"catalog entry {key.hex()} does not decode: {e}") from None


key = catalog_key


def _current(k: bytes, value: bytes | memoryview) -> DeltaStats | None:
    """The entry if it has this version's key and layout; None for outdated (or damaged)
    entries, which are derived data: gc removes them and `mp analyze` measures them again."""
    try:
        st = DeltaStats.decode(value, k)
    except CorruptData:
        return None
    return st if catalog_dtype(k) == st.dtype.encode() else None


def current(k: bytes, value: bytes | memoryview) -> bool:
    return _current(k, value) is not None


def verify(txn: Txn, k: bytes, value: bytes | memoryview) -> str | None:
    """What is wrong with a stored entry, or None: it must decode and equal a fresh measurement
    of its two chunks (an entry whose chunks are gone is stale, not wrong: gc removes it)."""
    st = _current(k, value)
    if st is None:
        return f"catalog entry {k.hex()} is outdated or damaged (`mp gc` removes it)"
    expert, base = catalog_chunks(k)
    if not (txn.has_chunk(expert) and txn.has_chunk(base)):
        return None
    try:
        again = measure(bytearray(txn.chunk(expert)), bytearray(txn.chunk(base)), st.dtype)
    except (CorruptData, ValueError):
        return None  # a damaged chunk is reported by the chunk check
    return None if same(again, st) else f"catalog entry {k.hex()} does not match its chunks"


def same(a: DeltaStats, b: DeltaStats) -> bool:
    """Equal statistics, NaN equal to NaN: a chunk holding NaN measures NaN norms every time
    (whatever the NaN's sign or payload), and `==` would call that entry damaged forever."""
    def eq(x: object, y: object) -> bool:
        return x == y or (isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y))

    return all(eq(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__)


class _Rules:
    """The catalog's rules for the store's gc and fsck (see store.derived)."""

    def current(self, key: bytes, value: bytes | memoryview) -> bool:
        return current(key, value)

    def verify(self, txn: Txn, key: bytes, value: bytes | memoryview) -> str | None:
        return verify(txn, key, value)


RULES = _Rules()


def lookup(txn: Txn, expert_chunk: bytes, base_chunk: bytes, dtype: str) -> DeltaStats | None:
    k = key(expert_chunk, base_chunk, dtype)
    value = txn.catalog(k)
    return None if value is None else _current(k, value)  # an outdated entry: analyze measures it again


def _float32(raw: Buffer, dtype: str) -> np.ndarray:
    """Chunk bytes as float32 values (numpy: `mp add` need not import torch)."""
    if dtype == "BF16":  # bfloat16 is the top half of a float32
        return (np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
    if dtype in NUMPY:
        return np.frombuffer(raw, dtype=NUMPY[dtype]).astype(np.float32)
    import torch  # float8: only torch knows the encodings

    from ..store.dtypes import torch_dtype
    return torch.frombuffer(bytearray(raw), dtype=torch_dtype(dtype)).to(torch.float32).numpy()


_buffers = threading.local()


def _scratch(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """This thread's histogram, |Δ| and two float32 conversion buffers for n elements, reused from
    chunk to chunk: fresh arrays for every chunk cost more in page faults than the measurement."""
    held = getattr(_buffers, "held", None)
    if held is None or held[1].size < n:
        held = _buffers.held = (np.empty(BINS, dtype=np.int64), np.empty(n, dtype=np.float32),
                                np.empty((2, n), dtype=np.uint32))
    return held


def measure(expert: Buffer, base: Buffer, dtype: str) -> DeltaStats:
    """The statistics of one chunk pair's delta, computed in float32 like the executor's passes
    (one compiled pass, `deltakernel`; releases the GIL, so threads measure in parallel)."""
    from .deltakernel import bf16_to_float32, delta_stats

    n = len(expert) // ITEMSIZE[dtype]
    hist, mag, bf16 = _scratch(n)

    def values(raw: Buffer, room: np.ndarray) -> np.ndarray:
        return bf16_to_float32(np.frombuffer(raw, dtype=np.uint16), room) if dtype == "BF16" else _float32(raw, dtype)

    sq, max_abs, changed, base_max, base_sq = delta_stats(values(expert, bf16[0]), values(base, bf16[1]), hist, mag)
    used = np.flatnonzero(hist)
    return DeltaStats(
        dtype=dtype,
        l2=float(np.sqrt(np.float64(sq))),
        max_abs=float(max_abs),
        changed=int(changed),
        base_max=float(base_max),
        base_l2=float(np.sqrt(np.float64(base_sq))),
        bins=used.astype(np.uint16).tobytes(),
        counts=hist[used].astype(np.uint32).tobytes(),
    )


def comparable(expert: Tensor, base: Tensor | None) -> bool:
    """Chunks line up element for element and the values are numbers with a delta."""
    return (base is not None and expert.dtype == base.dtype and expert.shape == base.shape
            and expert.chunk_size == base.chunk_size and expert.dtype in FLOATS)


@dataclass
class AnalyzeResult:
    pairs: int = 0  # differing (expert chunk, base chunk) pairs seen
    measured: int = 0  # of them, newly measured and stored
    bytes_read: int = 0  # expert and base chunk bytes read to measure them
    seconds: float = 0.0
    keys: set[bytes] = field(default_factory=set, repr=False)  # entries a Recorder wrote

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "keys"}


def differing(tensors: Iterable[tuple[Tensor, Tensor]]) -> Iterable[tuple[bytes, bytes, str]]:
    """(expert chunk, base chunk, dtype) for every position where the digests differ."""
    for t, b in tensors:
        if comparable(t, b) and t.chunks != b.chunks:
            for e, c in zip(t.chunks, b.chunks):
                if e != c:
                    yield e, c, t.dtype


def analyze(store: Store, pairs: list[tuple[Tensor, Tensor]], progress: Progress,
            threads: int, measured: AnalyzeResult | None = None) -> AnalyzeResult:
    """Measure every differing chunk pair the catalog lacks, and store the entries.

    The main thread reads (LMDB stays on one thread) and workers measure; entries are written in
    batches of their own transactions: an entry only describes two chunks, so one written before
    the commit that needs it (or by a process that dies) is harmless, and gc removes it with them.
    `measured`: what a `Recorder` measured while the expert was added; those pairs are counted,
    not measured again."""
    start = time.perf_counter()
    result = AnalyzeResult()
    known = measured.keys if measured is not None else frozenset()
    todo = list(dict.fromkeys(differing(pairs)))  # (expert, base, dtype), each once
    result.pairs = len(todo)
    if measured is not None:
        result.measured, result.bytes_read = measured.measured, measured.bytes_read
        todo = [p for p in todo if key(*p) not in known]
    progress.start("analyze", len(todo))
    done: list[tuple[bytes, bytes]] = []

    def write() -> None:
        batch = list(done)
        done.clear()
        store.write(lambda txn: sum(txn.put_catalog(k, v) for k, v in batch),  # outdated ones replaced
                    reserve=sum(len(v) + 64 for _, v in batch))

    def collect() -> None:
        k, fut = pending.popleft()
        done.append((k, fut.result().encode()))
        result.measured += 1
        progress.advance(1)

    pending: deque[tuple[bytes, Future]] = deque()
    store.reserve(len(todo) * ENTRY_BOUND)  # entries are written while chunks are read: no map growth then
    try:
        with store.read() as txn, ThreadPoolExecutor(max_workers=threads) as pool:
            for e, b, dtype in todo:
                k = key(e, b, dtype)
                old = txn.catalog(k)
                if old is not None and current(k, old):
                    progress.advance(1)
                    continue
                ev, bv = txn.chunk(e), txn.chunk(b)
                ebytes, bbytes = bytearray(ev), bytearray(bv)
                result.bytes_read += len(ebytes) + len(bbytes)
                store.touched(len(ebytes) + len(bbytes))
                pending.append((k, pool.submit(measure, ebytes, bbytes, dtype)))
                while len(pending) >= WINDOW * threads:
                    collect()
                if len(done) >= WRITE_BATCH:
                    write()
            while pending:
                collect()
        if done:
            write()
    finally:
        progress.finish()
    result.seconds = time.perf_counter() - start + (measured.seconds if measured is not None else 0.0)
    return result


def _load_kernel() -> None:
    from . import deltakernel  # noqa: F401


class Recorder:
    """Measures the catalog while `mp add --base` reads the expert: each chunk is measured as it
    is hashed, from the bytes in hand and the base chunk at the same position, on a thread pool
    (the kernel releases the GIL), so the expert is read once. A worker reads the base chunk
    itself with `pread` at the offset the read transaction gives (`Txn.extent`; the pages stay
    put while it is open) and hash-checks it: faulting 1 MiB of the map in, page by page, on
    the reading thread cost more than the measurement. Entries ride in the sink's batch
    transactions (`ChunkSink.attach`), and a chunk's buffer goes back to the sink when measured
    (`ChunkSink.release`). `finish` says what was measured; `analyze(..., measured=)` then
    measures only what the add did not read (files the file-identity cache answered for)."""

    def __init__(self, txn: Txn, sink: ChunkSink, base: dict[str, Tensor], threads: int):
        self._txn = txn  # open for the whole add (ChunkSink.pipelined)
        self._sink = sink
        self._base = base
        self._threads = threads
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="mp-catalog")
        self._pool.submit(_load_kernel)  # numba's import and cache load overlap the first reads
        self._file = open(sink.store.path / "data.mdb", "rb", buffering=0)  # noqa: SIM115 (closed in finish)
        # entry key, measurement, expert chunk bytes, base chunk digest, dtype
        self._pending: deque[tuple[bytes, Future[DeltaStats | None], memoryview, bytes, str]] = deque()
        self.result = AnalyzeResult()  # seconds: time the add waited for measurements

    def watch(self, name: str, dtype: str, shape: tuple[int, ...]) -> Watch | None:
        """What the sink calls with each chunk of tensor `name` (None: nothing to measure)."""
        base = self._base.get(name)
        if base is None or not (base.dtype == dtype and base.shape == shape and dtype in FLOATS
                                and base.chunk_size == self._sink.chunk_size):
            return None

        def chunk(c: int, digest: bytes, data: memoryview) -> bool:
            b = base.chunks[c]
            k = key(digest, b, dtype)
            if digest == b or k in self.result.keys:
                return False
            self.result.keys.add(k)
            old = self._txn.catalog(k)
            if old is not None and current(k, old):
                return False
            at = self._txn.extent(b"chunks", b)
            self._sink.store.touched(FOLIO_BYTES)  # the B-tree leaf's page cache folio got mapped
            task: Future[DeltaStats | None]
            if at is None:  # a layout the extent lookup does not know: the map
                task = self._pool.submit(measure, data, self._base_chunk(b), dtype)
            else:
                task = self._pool.submit(_measure_stored, self._file.fileno(), at, b, data, dtype,
                                         self._sink.decoded)
            self.result.bytes_read += 2 * len(data)
            self._pending.append((k, task, data, b, dtype))
            while len(self._pending) >= WINDOW * self._threads:
                self._collect()
            return True

        return chunk

    def _base_chunk(self, key: bytes) -> memoryview:
        data = self._txn.chunk(key)
        self._sink.store.touched(len(data))
        return data

    def _collect(self) -> None:
        k, fut, data, b, dtype = self._pending.popleft()
        began = time.perf_counter()
        stats = fut.result()
        if stats is None:  # a base chunk stored as a delta: its reference is read in the transaction
            stats = measure(data, self._base_chunk(b), dtype)
        value = stats.encode()
        self.result.seconds += time.perf_counter() - began
        self._sink.release(data)
        self._sink.attach(lambda txn: txn.put_catalog(k, value), len(value) + 64)
        self.result.measured += 1

    def finish(self) -> AnalyzeResult:
        """Wait for every measurement and hand its entry to the sink (before its last flush)."""
        try:
            while self._pending:
                self._collect()
        finally:
            self._pool.shutdown(cancel_futures=True)
            self._file.close()
        return self.result


def _measure_stored(fd: int, at: tuple[int, int], base_key: bytes, expert: memoryview, dtype: str,
                    decoded: Decoded) -> DeltaStats | None:
    """measure(), the base chunk read from the data file at `at` (offset, length of its stored
    value), decoded (once for this worker and the sink's encoder, which stores the expert chunk
    as a delta against it: `Decoded`) and hash-checked here, on the worker. None for a base chunk
    stored as a delta itself: its reference is found in the transaction (Recorder._collect)."""
    offset, length = at
    value = memoryview(os.pread(fd, length, offset))
    if delta_reference(value) is not None:
        return None
    return measure(expert, decoded.checked(base_key, value), dtype)


def elements(t: Tensor, c: int) -> int:
    """Elements in chunk c of tensor t."""
    return t.chunk_len(c) // ITEMSIZE[t.dtype]


def covers(txn: Txn, expert: Tensor, base: Tensor) -> bool:
    """Whether every chunk of `expert` that differs from `base`'s has an entry."""
    return all(e == b or lookup(txn, e, b, expert.dtype) is not None for e, b in zip(expert.chunks, base.chunks))


def tensor_histogram(txn: Txn, expert: Tensor, base: Tensor,
                     only: frozenset[int] | None = None) -> np.ndarray | None:
    """Sum of the catalog histograms of `expert`'s chunks that differ from `base`'s (of those
    in `only`, if given); unchanged chunks count as zeros (bin 0) unless `only` is given.
    None when an entry is missing."""
    hist = np.zeros(BINS, dtype=np.int64)
    for c, (e, b) in enumerate(zip(expert.chunks, base.chunks)):
        if only is not None and c not in only:
            continue
        if e == b:
            hist[0] += elements(expert, c)
            continue
        st = lookup(txn, e, b, expert.dtype)
        if st is None:
            return None
        hist[np.frombuffer(st.bins, dtype=np.uint16)] += np.frombuffer(st.counts, dtype=np.uint32)  # bins distinct
    return hist
