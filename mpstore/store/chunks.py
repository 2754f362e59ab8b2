"""Writing chunks: hash bytes, keep only what the store lacks, commit them in batches.

Both `mp add` (bytes from files) and the merge executor (bytes it computes) produce chunks this
way. Batches are their own transactions, written before the objects that will reference them, so
a crash leaves only unreferenced chunks. A dry sink only computes digests (for replay).

`mp add` runs the sink `pipelined`: a writer thread commits each batch (LMDB copies it and
fsyncs, releasing the GIL) while the caller reads and hashes the next, so the disk's write
time overlaps the reading instead of following it; a compressing store's encoders compress a
batch as soon as it is complete, while the next is read and the previous one written. Frames the
writer is done with are reused, so a chunk's buffer is not allocated and zeroed again for every
chunk.
"""

from __future__ import annotations

import io
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Protocol

from ..errors import BadInput, CorruptData
from ..progress import Progress
from . import env
from .env import Store, Txn, framed, new_frame, payload
from .ids import digest
from .objects import Blob

BATCH_BYTES = 32 << 20  # chunk bytes per write transaction: bounds memory (three batches in flight), amortises fsync
# A presence check maps the page cache folio around the chunk's first page: up to 2 MiB with
# large folios, which is what it counts as touched.
FOLIO_BYTES = 2 << 20
SPARE_FRAMES = 32  # frames kept for reuse (one batch of 1 MiB chunks)

# What a reader of chunks may do with each chunk as it is hashed (the delta catalog measures it
# in the same pass): given its index in the stream, its digest and its bytes, it returns whether
# it keeps a reference to the bytes (then their buffer is not reused).
Watch = Callable[[int, bytes, memoryview], bool]
# digest, frame, whether the frame may be reused after the write, its element size, the digest of
# the chunk it may be stored as a delta against (the base's at the same position) or None, and
# that chunk's bytes where the producer holds them decoded and checked already (else None)
_Pending = tuple[bytes, bytearray, bool, int, bytes | None, memoryview | None]
_Derived = Callable[[Txn], object]  # a record derived from chunks, written with them (see attach)
# what one transaction writes, its bytes, and (pipelined) its chunks' values being encoded
_Batch = tuple[list[_Pending], list[_Derived], int, "dict[bytes, Future[bytes]] | None"]


class Readable(Protocol):
    def readinto(self, buffer: memoryview, /) -> int | None: ...


class _Writer:
    """The thread that commits a pipelined sink's batches, one at a time, in order. The first
    error stops it and is raised to the caller at its next hand-over or at the end."""

    def __init__(self, write: Callable[[_Batch], None]):
        self._write = write
        self._queue: queue.Queue[_Batch | None] = queue.Queue(1)
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="mp-chunk-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (batch := self._queue.get()) is not None:
            if self.error is None:
                try:
                    self._write(batch)
                except BaseException as e:  # handed to the caller's thread
                    self.error = e

    def submit(self, batch: _Batch) -> None:
        self.check()
        self._queue.put(batch)

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()


class Decoded:
    """Reference chunks decoded once for two readers that each need them (`mp add --base`: the
    catalog measures each expert chunk against the base chunk, and the encoder stores it as a
    delta against the same chunk). `get` decodes a chunk unless the other reader has or is
    decoding it, then waits for that; the second reader takes it away, so a chunk is kept only
    between the two. At most `limit` chunks are kept (the oldest go first: a chunk only one
    reader asks for, or one pushed out, is decoded by whoever asks later)."""

    def __init__(self, limit: int):
        self._limit = limit
        self._kept: dict[bytes, Future[memoryview]] = {}
        self._lock = threading.Lock()

    def get(self, key: bytes, decode: Callable[[], memoryview]) -> memoryview:
        with self._lock:
            found = self._kept.pop(key, None)
            if found is None:
                mine: Future[memoryview] = Future()
                self._kept[key] = mine
                while len(self._kept) > self._limit:
                    del self._kept[next(iter(self._kept))]
        if found is not None:
            return found.result()
        try:
            data = decode()
        except BaseException as e:
            mine.set_exception(e)
            with self._lock:
                if self._kept.get(key) is mine:
                    del self._kept[key]
            raise
        mine.set_result(data)
        return data

    def checked(self, key: bytes, stored: memoryview) -> memoryview:
        """Stored reference chunk `key`'s bytes, checked: a raw one is a view of its value, a
        compressed one is decoded once for every reader that needs it (`get`)."""
        if stored[0] == env.CODEC_RAW:
            return env.checked_stored(key, stored)
        return self.get(key, lambda: env.checked_stored(key, stored))


class ChunkSink:
    """Hashes byte streams into chunks and writes the ones the store lacks, in batches."""

    def __init__(self, store: Store, chunk_size: int, progress: Progress, dry: bool = False):
        self.store = store
        self.policy = policy(store)
        self._encoders: ThreadPoolExecutor | None = None
        self.chunk_size = chunk_size
        self.progress = progress
        self.dry = dry
        self.new_bytes = 0
        self.write_seconds = 0.0
        self._pending: list[_Pending] = []
        self._pending_bytes = 0
        self._derived: list[_Derived] = []
        self._queued: set[bytes] = set()
        self._spare: list[bytearray] = []
        # Frames a watcher holds: how many of {watcher, writer} still use each (by id), so the
        # last to let go puts it back for reuse (both threads do: hence the lock).
        self._claims: dict[int, int] = {}
        self._claims_lock = threading.Lock()
        self._writer: _Writer | None = None
        self._txn: Txn | None = None  # pipelined: the read transaction open throughout
        self.decoded = Decoded(max(64, 2 * BATCH_BYTES // chunk_size))

    @contextmanager
    def pipelined(self, reserve: int) -> Iterator[Txn]:
        """Commit batches on a writer thread while the caller goes on reading; at the end every
        batch is committed (or the first error raised). Yields a read transaction, open
        throughout, for reading the store (a chunk view stays valid until the end). `reserve`:
        bytes the batches may add; the map is grown for them first, as it cannot grow while the
        read transaction is open."""
        self.store.reserve(reserve)
        with self.store.read() as txn:
            self._writer = _Writer(self._commit)
            self._txn = txn
            try:
                yield txn
                self.flush()
            finally:
                writer, self._writer = self._writer, None
                writer.close()
                self._close_encoders()
                self._txn = None
            writer.check()

    def _frame(self) -> bytearray:
        return self._spare.pop() if self._spare else new_frame(self.chunk_size)

    def consume(self, f: Readable, size: int, where: str, watch: Watch | None = None, itemsize: int = 1,
                references: tuple[bytes, ...] | None = None) -> tuple[bytes, ...]:
        """Read `size` bytes from `f` as chunks; return their digests in order. `itemsize` (the
        element size) and `references` (the base's chunks at the same positions) say how a new
        chunk may be compressed (see `policy`)."""
        digests: list[bytes] = []
        frame = self._frame()
        remaining = size
        while remaining:
            n = min(self.chunk_size, remaining)
            if len(payload(frame)) != n:
                frame = new_frame(n)
            if f.readinto(payload(frame)) != n:
                raise BadInput(f"{where}: file ended early (changed while being added?)")
            key = digest(payload(frame))
            held = watch is not None and watch(len(digests), key, payload(frame))
            digests.append(key)
            if held:
                with self._claims_lock:
                    self._claims[id(frame)] = 1
            ref = references[len(digests) - 1] if references is not None else None
            if self._take(key, frame, claimed=held, itemsize=itemsize, ref=ref):
                frame = self._frame()
            elif held:
                frame = self._frame()
            remaining -= n
            self.progress.advance(n)
        if len(frame) == 1 + self.chunk_size and len(self._spare) < SPARE_FRAMES:
            self._spare.append(frame)
        return tuple(digests)

    def data(self, data: bytes | bytearray | memoryview, itemsize: int = 1, ref: bytes | None = None) -> bytes:
        """Bytes computed in memory (a merged tensor's output) as one chunk; returns its digest.
        `itemsize` and `ref` as for `consume`."""
        key = digest(data)
        self.frame(key, framed(data), itemsize, ref)
        return key

    def frame(self, key: bytes, frame: bytearray, itemsize: int = 1, ref: bytes | None = None,
              ref_bytes: memoryview | None = None) -> None:
        """A chunk framed and hashed by its producer (a merge worker), so the caller's thread
        neither copies nor hashes it. `ref_bytes`: the bytes of chunk `ref`, already decoded and
        checked by the producer (a merge block's base), so the encoder need not decode them again."""
        self._take(key, frame, recycle=False, itemsize=itemsize, ref=ref, ref_bytes=ref_bytes)

    def blob(self, data: bytes, where: str) -> Blob:
        """Bytes held in memory (a header, a rewritten config) as a blob."""
        return Blob(len(data), self.chunk_size, self.consume(io.BytesIO(data), len(data), where))

    def release(self, data: memoryview) -> None:
        """A watcher is done with the chunk bytes it held (`payload` of a frame of this sink)."""
        self._unclaim(data.obj)

    def _unclaim(self, frame: object) -> None:
        with self._claims_lock:
            left = self._claims.pop(id(frame)) - 1
            if left:
                self._claims[id(frame)] = left
        if not left:
            self._recycle(frame)

    def _recycle(self, frame: object) -> None:
        if isinstance(frame, bytearray) and len(frame) == 1 + self.chunk_size and len(self._spare) < SPARE_FRAMES:
            self._spare.append(frame)

    def attach(self, write: _Derived, nbytes: int) -> None:
        """Write a record derived from chunks (a catalog entry) in the next batch transaction;
        `write` must be safe to run again (a transaction that fills the map is rerun)."""
        self._derived.append(write)
        self._pending_bytes += nbytes

    def _take(self, key: bytes, frame: bytearray, recycle: bool = True, claimed: bool = False, itemsize: int = 1,
              ref: bytes | None = None, ref_bytes: memoryview | None = None) -> bool:
        """Queue the chunk unless the store has it; True if the frame was queued. `recycle`: the
        writer may reuse the frame once written; `claimed`: a watcher holds it too (the later
        of the two lets go of it, see release)."""
        # Pipelined, the writer's put decides (it finds a stored chunk in the same B-tree walk,
        # and LMDB commits nothing for a batch of chunks all present); checking here too would
        # map B-tree pages on this thread as well.
        if self.dry or key in self._queued or (self._writer is None and self._stored(key)):
            return False
        self._queued.add(key)
        if claimed:
            with self._claims_lock:
                self._claims[id(frame)] += 1
        if ref == key:
            ref = ref_bytes = None
        self._pending.append((key, frame, recycle, itemsize, ref, ref_bytes))
        self._pending_bytes += len(frame) - 1
        if self._pending_bytes >= BATCH_BYTES:
            self.flush()
        return True

    def _stored(self, key: bytes) -> bool:
        self.store.touched(FOLIO_BYTES)
        with self.store.read() as r:
            return r.has_chunk(key)

    def flush(self) -> None:
        """Commit the pending chunks in one transaction (rerunnable: it only puts what it holds);
        pipelined, hand them to the writer thread."""
        if not (self._pending or self._derived):
            return
        # Pipelined, the batch's chunks are handed to the encoders now, so they are compressed
        # while the next batch is read and the previous one written.
        encoding = self._encode(self._pending, self._txn) if self._txn is not None and self.policy != NONE else None
        batch = (self._pending, self._derived, self._pending_bytes, encoding)
        self._pending, self._derived, self._pending_bytes = [], [], 0
        if self._writer is not None:
            self._writer.submit(batch)
        else:
            self._commit(batch)

    def _commit(self, batch: _Batch) -> None:
        pending, derived, nbytes, encoding = batch
        values: dict[bytes, bytes] = {}
        if encoding is not None:
            values = {key: job.result() for key, job in encoding.items()}
        elif self.policy != NONE:  # not pipelined: encoded now, the references read in a transaction of its own
            with self.store.read() as r:
                values = {key: job.result() for key, job in self._encode(pending, r).items()}

        def put_all(txn: Txn) -> int:
            for write in derived:
                write(txn)
            return sum(len(frame) - 1 for key, frame, *_ in pending
                       if (txn.put_stored_chunk(key, values[key]) if key in values else txn.put_chunk(key, frame)))

        began = time.perf_counter()
        self.new_bytes += self.store.write(put_all, reserve=nbytes)
        self.store.release_pages()  # the B-tree pages the puts mapped (large folios: up to 2 MiB each)
        for _, frame, recycle, *_ in pending:
            if id(frame) in self._claims:
                self._unclaim(frame)
            elif recycle:
                self._recycle(frame)
        self.write_seconds += time.perf_counter() - began


    def _encode(self, pending: list[_Pending], r: Txn) -> dict[bytes, Future[bytes]]:
        """The stored values of the batch's chunks the store lacks, compressed as the policy says
        (store/codecs.py: a delta against the base's chunk where that is smallest), on a pool of
        encoders. `r`: a read transaction open until the values are taken (their references are
        views into it). A reference is decoded and checked on the pool, once for every reader
        (`decoded`); one that is a delta itself (chains have depth 1), missing or damaged leaves
        its chunk standalone."""
        from . import codecs

        if self._encoders is None:
            self._encoders = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="mp-encode")

        def encode(raw: memoryview, itemsize: int, ref: bytes | None, stored: memoryview | None,
                   ref_bytes: memoryview | None) -> bytes:
            reference = None
            if ref is not None and ref_bytes is not None:
                reference = (ref, ref_bytes)
            elif ref is not None and stored is not None:
                try:
                    reference = (ref, self.decoded.checked(ref, stored))
                except CorruptData:
                    reference = None  # fsck names the damage; this chunk is stored standalone
            return codecs.encode(raw, itemsize, reference)

        jobs = {}
        for key, frame, _, itemsize, ref, ref_bytes in pending:
            self.store.touched(FOLIO_BYTES)  # each lookup maps a B-tree leaf's folio: released in time
            if r.has_chunk(key):
                continue
            stored = None
            if ref is not None and self.policy == DELTA:
                self.store.touched(FOLIO_BYTES)
                stored = r.stored_chunk(ref)
            usable = stored is not None and len(stored) > 0 and stored[0] != env.XOR_CODEC
            jobs[key] = self._encoders.submit(encode, payload(frame), itemsize, ref if usable else None,
                                              stored if usable else None, ref_bytes)
        return jobs

    def _close_encoders(self) -> None:
        if self._encoders is not None:
            self._encoders.shutdown()
            self._encoders = None


NONE, PLANES, DELTA = "none", "planes", "delta"
POLICIES = (NONE, PLANES, DELTA)
META_KEY = "compress"


def policy(store: Store) -> str:
    """How new chunks are stored (`mp init --compress`): `none` (raw), `planes` (each chunk
    compressed on its own) or `delta` (also as a delta against the base model's chunk at the
    same position, where that is smaller). A store without the setting predates it: raw."""
    with store.read() as r:
        return r.meta(META_KEY) or NONE


class ChunkWriter(Protocol):
    """What code that cuts computed bytes into chunks needs of a sink."""

    chunk_size: int

    def data(self, data: bytes | bytearray | memoryview) -> bytes: ...


class MemorySink:
    """Keeps chunks in memory by digest instead of storing them: chunks of tensors a merge derives
    from its inputs (a LoRA adapter applied, a vocabulary permuted), which the merge reads from
    memory and stores only where its output keeps them."""

    def __init__(self, chunk_size: int):
        self.chunk_size = chunk_size
        self.kept: dict[bytes, bytes] = {}

    def data(self, data: bytes | bytearray | memoryview) -> bytes:
        key = digest(data)
        self.kept.setdefault(key, bytes(data))
        return key
