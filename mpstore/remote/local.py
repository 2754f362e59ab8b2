"""A remote that is another mpstore repository on a path (a shared disk, another checkout).

Its entries are its LMDB's own: objects, chunks as stored, catalog entries. What is pushed there
is a normal history of that repository (its `mp log` shows it), written the way every command
writes: entries in transactions of about `BATCH` bytes under the shared gc lock, so a gc there
waits; refs by the store's compare-and-set, with a reflog entry naming the push.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..errors import RemoteError
from ..store.env import Store, Txn
from ..store.objects import timestamp
from .transport import CATALOG, CHUNK, OBJECT, Info, RemoteRef

BATCH = 32 << 20  # bytes per write transaction: an interrupted push loses at most this much
_DB = {OBJECT: b"objects", CHUNK: b"chunks", CATALOG: b"catalog"}


class RepoRemote:
    """The repository whose `.mp/` is in the folder `url` names."""

    def __init__(self, url: str):
        self.url = url
        folder = Path(url[len("file://"):] if url.startswith("file://") else url).expanduser()
        if not (folder / ".mp" / "data.mdb").is_file():
            raise RemoteError(f"remote {url}: not an mpstore repository (no .mp in {folder})")
        self._path = (folder / ".mp").resolve()
        self.store = _shared.open(self._path)
        self.sent_bytes = 0
        self.received_bytes = 0
        self.batch_bytes = BATCH

    def info(self) -> Info:
        with self.store.read() as r:
            return Info(int(r.meta("chunk_size") or 0) or None, r.meta("HEAD"))

    def init(self, chunk_size: int, head: str | None) -> None:
        have = self.info().chunk_size
        if have != chunk_size:
            raise RemoteError(f"remote {self.url} has chunk size {have}, this repository {chunk_size}: "
                              "chunks would not line up")
        if head is not None:
            self.store.write(lambda t: None if t.meta("HEAD") else t.set_meta("HEAD", head))

    def refs(self) -> dict[str, RemoteRef]:
        with self.store.read() as r:
            return {name: RemoteRef(cid, cid.hex()) for name, cid in r.refs().items()
                    if name.startswith(("heads/", "tags/"))}

    def set_ref(self, name: str, old: RemoteRef | None, new: bytes) -> bool:
        def move(t: Txn) -> bool:
            if not t.has_object(new):
                raise RemoteError(f"remote {self.url}: commit {new.hex()} did not arrive")
            return t.set_ref_if_equals(name, old.id if old else None, new, "push", timestamp())

        moved = self.store.write(move)
        self.store.sync()
        return moved

    def holdings(self, kind: int) -> set[bytes]:
        with self.store.read() as r:
            return set(r.keys(_DB[kind]))

    def sizes(self, kind: int, keys: Iterable[bytes]) -> dict[bytes, int]:
        with self.store.read() as r:
            return {k: len(v) for k in keys if (v := _value(r, kind, k)) is not None}

    def get(self, kind: int, keys: Iterable[bytes]) -> Iterator[tuple[bytes, bytes]]:
        with self.store.read() as r:
            for key in keys:
                value = _value(r, kind, key)
                if value is not None:
                    self.received_bytes += len(value)
                    yield key, bytes(value)

    def put(self, entries: Iterable[tuple[int, bytes, bytes]]) -> int:
        sent = 0
        batch: list[tuple[int, bytes, bytes]] = []
        size = 0
        with self.store.writing():
            for entry in entries:
                batch.append(entry)
                size += len(entry[2])
                if size >= BATCH:
                    sent += self._write(batch, size)
                    batch, size = [], 0
            sent += self._write(batch, size)
        self.store.sync()
        self.sent_bytes += sent
        return sent

    def _write(self, batch: list[tuple[int, bytes, bytes]], size: int) -> int:
        def put(t: Txn) -> None:
            for kind, key, data in batch:
                if kind == OBJECT:
                    t.put_encoded(key, data)
                elif kind == CHUNK:
                    t.put_stored_chunk(key, data)
                else:
                    t.put_catalog(key, data)

        if batch:
            self.store.write(put, reserve=size + (1 << 20))
        return size

    def close(self) -> None:
        _shared.close(self._path)


class _Shared:
    """Stores opened as remotes, shared within the process: LMDB opens an environment once per
    process, and one command may hold two transports to one remote (a lazy clone pushing to the
    remote it reads from)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[Path, tuple[Store, int]] = {}

    def open(self, path: Path) -> Store:
        with self._lock:
            store, users = self._open.get(path) or (Store.open(path), 0)
            self._open[path] = (store, users + 1)
            return store

    def close(self, path: Path) -> None:
        with self._lock:
            store, users = self._open[path]
            if users == 1:
                del self._open[path]
                store.close()
            else:
                self._open[path] = (store, users - 1)


_shared = _Shared()


def _value(r: Txn, kind: int, key: bytes) -> memoryview | None:
    if kind == OBJECT:
        return r.encoded(key)
    if kind == CHUNK:
        return r.stored_chunk(key)
    return r.catalog(key)
