"""Fetching values from disk in runs, in the order a reader will use them, ahead of it.

Values are read through LMDB's memory map. On a cold page cache the first touch of a page faults,
and with the kernel's read-ahead on (the store's default) the fault reads the device's read-ahead
window around that page (8 MiB on a VM disk): right when everything is read, wasteful when the
reads are scattered (a budgeted merge read 5.2x its planned bytes). With read-ahead off every
fault reads one 4 KiB page, synchronously: the bytes drop and the time grows (4x, measured). A
`Prefetcher` keeps both: the reader names the values it will read, in order; the prefetcher finds
where each lies in the data file, joins neighbours into runs, and a thread reads each run (large
preads on its own descriptor of the file, which leave the pages in the page cache), up to `ahead`
bytes beyond what the reader has reached, while the map's read-ahead is off. Faults then find
their pages in the page cache. (posix_fadvise WILLNEED would start the reads without waiting, but
the kernel caps each call at the device's read-ahead window: a 32 MiB WILLNEED read 8 MiB here.)
When the first `ahead` bytes are all cached already (a warm cache) it steps aside at once:
read-ahead back on, nothing more named or read.

It only warms the page cache: what the reader reads and checks is unchanged. Its thread never
touches LMDB or the map, only file offsets; names are resolved to offsets on the reader's thread,
in the reader's transaction (LMDB is used from one thread).
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import ExitStack
from types import TracebackType

from .env import Store, Txn

AHEAD = 128 << 20  # bytes fetched beyond the reader: deep enough to keep the disk busy
GAP = 64 << 10  # values at most this far apart are fetched as one run, the gap with them
PIECE = 4 << 20  # bytes per read of the fetching thread


class Prefetcher:
    """Fetches the values of `keys` (in database `db`, in the order the reader will read them)
    ahead of the reader, which reports each value it reaches through `reached`. Use it as a
    context manager: leaving it stops the thread and turns the map's read-ahead back on."""

    def __init__(self, store: Store, txn: Txn, keys: Iterator[bytes], db: bytes = b"chunks",
                 ahead: int = AHEAD):
        self._store, self._txn, self._keys, self._db, self._ahead = store, txn, keys, db, ahead
        self._fd = os.open(store.path / "data.mdb", os.O_RDONLY)
        try:
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_RANDOM)  # its reads fetch what they ask, no more
        except OSError:
            pass
        self._seen: set[bytes] = set()
        self._ends: dict[bytes, int] = {}  # a value named and not yet reached -> bytes named up to its end
        self._named = 0  # bytes named so far
        self._reached = 0  # of them, bytes the reader has gone past
        self._runs: deque[tuple[int, int]] = deque()  # (file offset, length) to fetch, in order
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._fetch, name="mp-prefetch", daemon=True)
        self._quiet = ExitStack()
        self._quiet.enter_context(store.no_read_ahead())
        self._thread.start()
        try:
            first = self._name()
        except BaseException:
            self.close()
            raise
        if not any(store.uncached(offset, length) for offset, length in first):
            # a warm page cache: the kernel serves the reads as they are; nothing more to do
            self._keys = iter(())
            self._ends.clear()
            self._quiet.close()

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def reached(self, key: bytes) -> None:
        """The reader is about to read value `key`: everything named before it counts as read
        (a value it skips must not hold the window back), and more is named when half the
        window is used (so runs are joined over many values, not one at a time)."""
        end = self._ends.pop(key, None)
        if end is not None and end > self._reached:
            self._reached = end
            if self._named - self._reached < self._ahead // 2:
                self._name()

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join()
        self._quiet.close()
        os.close(self._fd)

    def _name(self) -> list[tuple[int, int]]:
        """Resolve the next values until `ahead` bytes are named beyond the reader, and queue (and
        return) them as runs: in file order within the batch (the batch is named half a window before it is
        needed, and its reads are all under way within moments), neighbours joined, so a merge
        reading block by block across its inputs still fetches each input's chunks together."""
        extents: list[tuple[int, int]] = []
        while self._named - self._reached < self._ahead:
            key = next(self._keys, None)
            if key is None:
                break
            if key in self._seen:
                continue
            self._seen.add(key)
            extent = self._txn.extent(self._db, key)
            if extent is None:
                continue
            self._named += extent[1]
            self._ends[key] = self._named
            extents.append(extent)
        runs: list[list[int]] = []
        for offset, length in sorted(extents):
            if runs and offset <= runs[-1][1] + GAP:
                runs[-1][1] = max(runs[-1][1], offset + length)
            else:
                runs.append([offset, offset + length])
        queued = [(a, b - a) for a, b in runs]
        if queued:
            with self._cond:
                self._runs.extend(queued)
                self._cond.notify()
        return queued

    def _fetch(self) -> None:
        """The thread: read each run's pages that are not cached yet, in order, into a scratch
        buffer; they stay in the page cache for the reader's faults. A refusal (an I/O error) only
        leaves the reader to fault those pages in itself, and meet the error there."""
        scratch = memoryview(bytearray(PIECE))
        while True:
            with self._cond:
                while not self._runs and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                run = self._runs.popleft()
            for offset, length in self._store.uncached(*run):  # a warm merge reads nothing here
                end = offset + length
                while offset < end and not self._stop:
                    try:
                        n = os.preadv(self._fd, [scratch[: min(PIECE, end - offset)]], offset)
                    except OSError:
                        break
                    if n <= 0:
                        break
                    offset += n
