"""Writing chunks: hash bytes, keep only what the store lacks, commit them in batches.

Both `mp add` (bytes from files) and the merge executor (bytes it computes) produce chunks this
way. Batches are their own transactions, written before the objects that will reference them, so
a crash leaves only unreferenced chunks. A dry sink only computes digests (for replay).
"""

from __future__ import annotations

import io
import time
from typing import Protocol

from ..errors import BadInput
from ..progress import Progress
from .env import Store, Txn, framed, new_frame, payload
from .ids import digest
from .objects import Blob

BATCH_BYTES = 64 << 20  # new chunk bytes per write transaction: bounds memory, amortises fsync
# A presence check maps the page cache folio around the chunk's first page: up to 2 MiB with
# large folios, which is what it counts as touched.
FOLIO_BYTES = 2 << 20


class Readable(Protocol):
    def readinto(self, buffer: memoryview, /) -> int | None: ...


class ChunkSink:
    """Hashes byte streams into chunks and writes the ones the store lacks, in batches."""

    def __init__(self, store: Store, chunk_size: int, progress: Progress, dry: bool = False):
        self.store = store
        self.chunk_size = chunk_size
        self.progress = progress
        self.dry = dry
        self.new_bytes = 0
        self.write_seconds = 0.0
        self._pending: list[tuple[bytes, bytearray]] = []
        self._pending_bytes = 0
        self._queued: set[bytes] = set()

    def consume(self, f: Readable, size: int, where: str) -> tuple[bytes, ...]:
        """Read `size` bytes from `f` as chunks; return their digests in order."""
        digests: list[bytes] = []
        frame = new_frame(self.chunk_size)
        remaining = size
        while remaining:
            n = min(self.chunk_size, remaining)
            if len(payload(frame)) != n:
                frame = new_frame(n)
            if f.readinto(payload(frame)) != n:
                raise BadInput(f"{where}: file ended early (changed while being added?)")
            key, kept = self.offer(frame)
            digests.append(key)
            if kept:
                frame = new_frame(self.chunk_size)
            remaining -= n
            self.progress.advance(n)
        return tuple(digests)

    def data(self, data: bytes | bytearray | memoryview) -> bytes:
        """Bytes computed in memory (a merged tensor's output) as one chunk; returns its digest."""
        key, _ = self.offer(framed(data))
        return key

    def blob(self, data: bytes, where: str) -> Blob:
        """Bytes held in memory (a header, a rewritten config) as a blob."""
        return Blob(len(data), self.chunk_size, self.consume(io.BytesIO(data), len(data), where))

    def offer(self, frame: bytearray) -> tuple[bytes, bool]:
        """Take a chunk as a store frame (see store.env.new_frame); returns its digest and whether
        the sink kept `frame` (then the caller must not reuse it)."""
        data = payload(frame)
        key = digest(data)
        if self.dry or key in self._queued or self._stored(key):
            return key, False
        self._queued.add(key)
        self._pending.append((key, frame))
        self._pending_bytes += len(data)
        if self._pending_bytes >= BATCH_BYTES:
            self.flush()
        return key, True

    def _stored(self, key: bytes) -> bool:
        self.store.touched(FOLIO_BYTES)
        with self.store.read() as r:
            return r.has_chunk(key)

    def flush(self) -> None:
        """Commit the pending chunks in one transaction (rerunnable: it only puts what it holds)."""
        if not self._pending:
            return
        pending = self._pending

        def put_all(txn: Txn) -> int:
            return sum(len(payload(frame)) for key, frame in pending if txn.put_chunk(key, frame))

        began = time.perf_counter()
        self.new_bytes += self.store.write(put_all, reserve=self._pending_bytes)
        self._pending, self._pending_bytes = [], 0
        self.store.release_pages()
        self.write_seconds += time.perf_counter() - began




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
