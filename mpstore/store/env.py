"""The only module that touches LMDB: named databases of chunks, objects, refs, meta, catalog.

Layout (one environment in `.mp/`): `meta` (format version, chunk size, HEAD), `chunks`
(digest -> codec byte + bytes), `objects` (id -> msgpack), `refs` (name -> commit id) and
`catalog` (filled by the catalog; created here so the format is stable). A write is a function
run inside one LMDB write transaction: LMDB serialises writers across processes, readers see
only committed transactions, and a transaction that fills the map is rerun on a larger map, so
no MapFullError reaches a caller. The store never interprets chunk bytes beyond their codec byte.

Every failure of the environment reaches callers as one `MpError` saying what happened and what
to do: a full disk (`DiskFull`: the transaction is aborted, the store unchanged), a read-only
store (`ReadOnlyStore`: reading works, writing says so), a damaged data file (`StoreDamaged`).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import shutil
import struct
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar

import lmdb
import msgpack

from ..errors import (
    CorruptData,
    DiskFull,
    FormatMismatch,
    MpError,
    NotARepository,
    ReadOnlyStore,
    StoreBusy,
    StoreDamaged,
    WriteFailed,
)
from .ids import digest
from .objects import Blob, Commit, Plan, Snapshot, Stored, StoredObject, Tensor, decode

FORMAT_VERSION = 1
CODEC_RAW = 0
XOR_CODEC = 2  # store/codecs.py's XOR: a delta against a reference chunk
DATABASES = (b"meta", b"chunks", b"objects", b"refs", b"reflog", b"catalog")
# Address space only: without writemap the data file grows with what is written, never to the map
# size, so a large map costs nothing on disk and spares resizes (which LMDB allows only while this
# process has no transaction open).
DEFAULT_MAP_SIZE = 1 << 40
MIN_MAP_SIZE = 1 << 30  # where address space is limited (ulimit -v), open with less
MAP_SLACK = 64 << 20
MADV_NORMAL, MADV_RANDOM, MADV_DONTNEED = 0, 1, 4
# LMDB 0.9's on-disk structures that Store.overflow_extent reads (mdb.c: MDB_node, MDB_page)
NODE = struct.Struct("@HHHH")  # data size (two halves, in the machine's order), flags, key size
NODE_HEADER = NODE.size
F_BIGDATA = 0x01  # the node's data is the number of its first overflow page
PGNO = struct.Struct("@N")
PAGE = struct.Struct("@NHHI")  # page number, pad, flags, overflow page count
PAGE_HEADER = PAGE.size
P_OVERFLOW = 0x04
RELEASE_EVERY = 64 << 20  # bytes of the map touched between releases of this process's mapping

T = TypeVar("T")
K = TypeVar("K", bound=Stored)


@dataclass(frozen=True)
class ReflogEntry:
    """One move of a ref: from `old` to `new` (None: created / deleted), when, by which command."""

    old: bytes | None
    new: bytes | None
    time: str
    command: str

    def encode(self) -> bytes:
        return msgpack.packb({"old": self.old, "new": self.new, "time": self.time, "command": self.command},
                             use_bin_type=True)

    @classmethod
    def decode(cls, data: bytes | memoryview) -> ReflogEntry:
        d = msgpack.unpackb(data, raw=False)
        return cls(d["old"], d["new"], d["time"], d["command"])

    def to_json(self) -> dict[str, str | None]:
        return {"old": self.old.hex() if self.old else None, "new": self.new.hex() if self.new else None,
                "time": self.time, "command": self.command}


def new_frame(size: int) -> bytearray:
    """A buffer for a chunk of `size` bytes as the store keeps it (codec byte, then the bytes), so
    a chunk is copied once into its final layout; fill `payload(frame)`."""
    return bytearray(1 + size)


def payload(frame: bytearray | memoryview) -> memoryview:
    """The chunk bytes of a frame (see new_frame)."""
    return memoryview(frame)[1:]


def framed(data: bytes | bytearray | memoryview) -> bytearray:
    """A frame holding `data` (bytes computed in memory, e.g. a merged tensor's output)."""
    frame = new_frame(len(data))
    frame[1:] = data
    return frame


def stored_payload(key: bytes, value: memoryview,
                   reference: Callable[[bytes], bytes | memoryview] | None = None,
                   into: memoryview | None = None) -> memoryview:
    """A stored chunk value's raw bytes (store/codecs.py): a RAW value's are a view of it, a
    compressed one is decoded (into `into` if given, see codecs.decode); a delta (XOR) needs
    `reference(digest)`, its reference chunk's raw bytes, checked. A malformed value is
    CorruptData naming the chunk; the caller checks the digest of what comes back."""
    if len(value) and value[0] == CODEC_RAW:
        return value[1:]
    from . import codecs  # numpy and zstd: only where a compressed chunk is read

    try:
        return codecs.decode(value, reference or _no_reference, into)
    except CorruptData as e:
        raise CorruptData(f"chunk {key.hex()}: {e}") from None


def _no_reference(ref: bytes) -> bytes:
    raise CorruptData(f"a delta against chunk {ref.hex()} cannot be decoded where no store holds its reference")


def checked_chunk(key: bytes, data: memoryview) -> memoryview:
    """`data` if it hashes to `key`, else CorruptData: no chunk's bytes are used unchecked."""
    if digest(data) != key:
        raise CorruptData(f"chunk {key.hex()} does not match its digest")
    return data


def delta_reference(value: bytes | memoryview | None) -> bytes | None:
    """The digest of the chunk a stored value is a delta against (store/codecs.py's XOR), or
    None: not a delta, or no value. CorruptData for a delta too short to name its reference."""
    if value is None or not len(value) or value[0] != XOR_CODEC:
        return None
    from .codecs import reference_of  # zstd: only where a delta is met

    return reference_of(value)


def checked_stored(key: bytes, stored: bytes | memoryview,
                   reference: Callable[[bytes], bytes | memoryview] | None = None,
                   into: memoryview | None = None) -> memoryview:
    """The bytes of a chunk as stored, decoded (into `into`, see stored_payload) and hash-checked:
    CorruptData unless they decode to bytes whose digest is `key`."""
    return checked_chunk(key, stored_payload(key, memoryview(stored), reference, into))


class Pending:
    """A chunk found in a transaction, to decode and check later on any thread (a merge's or a
    checkout's workers): its stored value and, for a delta, its reference's, as views valid while
    the transaction is open. Decoding then touches no LMDB state."""

    __slots__ = ("key", "value", "ref")

    def __init__(self, key: bytes, value: memoryview, ref: tuple[bytes, memoryview] | None):
        self.key, self.value, self.ref = key, value, ref

    @property
    def raw(self) -> bool:
        """Whether the value is the bytes themselves (opening it copies nothing)."""
        return len(self.value) > 0 and self.value[0] == CODEC_RAW

    def open(self, decoded: dict[bytes, memoryview] | None = None, into: memoryview | None = None) -> memoryview:
        """The chunk's bytes, hash-checked. `decoded`: reference chunks already decoded (a
        merge block's base chunk is most of its experts' reference), added to as they are.
        `into`: where a compressed chunk is decoded (see codecs.decode); a raw one is a view."""
        memo = {} if decoded is None else decoded

        def reference(key: bytes) -> memoryview:
            if key not in memo:
                assert self.ref is not None and self.ref[0] == key  # reference_of(value), found by Txn.pending
                memo[key] = checked_stored(key, self.ref[1])
            return memo[key]

        out = checked_stored(self.key, self.value, reference, into)
        if not self.raw:
            memo.setdefault(self.key, out)
        return out


class Txn:
    """One LMDB transaction seen through the store's vocabulary (read-only unless from write()).

    Values come back as views into the map (no copy, and only the pages actually read become
    resident): a chunk view is valid until the transaction ends or writes again."""

    def __init__(self, store: Store, txn: lmdb.Transaction):
        self._s = store
        self._t = txn

    def _db(self, name: bytes) -> lmdb._Database:
        return self._s.db[name]

    # chunks -------------------------------------------------------------------------------
    def has_chunk(self, key: bytes) -> bool:
        return self._t.get(key, db=self._db(b"chunks"), default=None) is not None

    def put_chunk(self, key: bytes, frame: bytearray) -> bool:
        """Store a chunk given as a frame (see new_frame); False (nothing written) if present."""
        frame[0] = CODEC_RAW
        return bool(self._t.put(key, frame, db=self._db(b"chunks"), overwrite=False))

    def chunk(self, key: bytes) -> memoryview:
        """The chunk's bytes (a view into the map, valid for this transaction), hash-checked."""
        return checked_chunk(key, self.unchecked_chunk(key))

    def unchecked_chunk(self, key: bytes) -> memoryview:
        """The chunk's bytes before their hash check, for a reader that runs `checked_chunk` on
        them elsewhere (checkout's writer threads, which must not call into the transaction)."""
        return stored_payload(key, self._stored(key, "chunk"), self.reference)

    def _stored(self, key: bytes, what: str) -> memoryview:
        value = self._t.get(key, db=self._db(b"chunks"), default=None)
        if value is None:
            if self._s.fallback is None:
                raise CorruptData(f"{what} {key.hex()} is missing")
            value = self._s.fallback(key)  # a lazy clone's remote: checked there, kept by the caller
        return memoryview(value)

    def pending(self, key: bytes) -> Pending:
        """Chunk `key` to decode and check later, elsewhere (see Pending)."""
        value = self._stored(key, "chunk")
        try:
            rkey = delta_reference(value)
        except CorruptData as e:
            raise CorruptData(f"chunk {key.hex()}: {e}") from None
        ref = None
        if rkey is not None:
            rvalue = self._stored(rkey, "reference chunk")
            if delta_reference(rvalue) is not None:
                raise CorruptData(f"reference chunk {rkey.hex()} is itself a delta (chains have depth 1)")
            ref = (rkey, rvalue)
        return Pending(key, value, ref)

    def reference(self, key: bytes) -> memoryview:
        """A delta chunk's reference chunk: its raw bytes, hash-checked. A reference is never a
        delta itself (chains have depth 1; writers keep to it), so a damaged store cannot send
        a decode down a chain."""
        value = self._stored(key, "reference chunk")
        if delta_reference(value) is not None:
            raise CorruptData(f"reference chunk {key.hex()} is itself a delta (chains have depth 1)")
        try:
            return checked_chunk(key, stored_payload(key, value))
        except CorruptData as e:
            raise CorruptData(f"reference chunk of a delta: {e}") from None

    def stored_chunk(self, key: bytes) -> memoryview | None:
        """The chunk as stored (codec byte, then its encoding), unchecked, or None: what travels
        to a remote (remote/sync.py checks it on arrival with `checked_stored`)."""
        value = self._t.get(key, db=self._db(b"chunks"), default=None)
        return None if value is None else memoryview(value)

    def replace_chunk(self, key: bytes, stored: bytes | memoryview) -> None:
        """Store a chunk's bytes in another encoding (store/recompress.py): same key, same raw bytes."""
        self._t.put(key, stored, db=self._db(b"chunks"))

    def put_stored_chunk(self, key: bytes, stored: bytes | memoryview) -> bool:
        """Store a chunk received as stored elsewhere, once `checked_stored` has vouched for it."""
        return bool(self._t.put(key, stored, db=self._db(b"chunks"), overwrite=False))

    def chunks(self) -> Iterator[tuple[bytes, memoryview]]:
        """(digest, stored value) of every chunk, in key order; `stored_payload` reads a value."""
        return self._items(b"chunks")

    def extent(self, db: bytes, key: bytes) -> tuple[int, int] | None:
        """(offset in the data file, length) of value `key` of `db`, found without reading the
        value (py-lmdb's get touches every page of a value before it returns): what a prefetcher
        fetches ahead (store.prefetch). None for a missing key, for a small value kept in its
        B-tree leaf (the lookup has read it), and if the file's layout is not the one read here."""
        cur = self._t.cursor(db=self._db(db))
        if not cur.set_key(key):
            return None
        return self._s.overflow_extent(memoryview(cur.key()))

    # catalog (derived statistics of chunk pairs; see store.derived) -------------------------
    def catalog(self, key: bytes) -> memoryview | None:
        value = self._t.get(key, db=self._db(b"catalog"), default=None)
        return None if value is None else memoryview(value)

    def put_catalog(self, key: bytes, value: bytes) -> bool:
        return bool(self._t.put(key, value, db=self._db(b"catalog")))

    def catalog_entries(self) -> Iterator[tuple[bytes, memoryview]]:
        return self._items(b"catalog")

    # objects ------------------------------------------------------------------------------
    def put_object(self, obj: StoredObject) -> bytes:
        self._t.put(obj.id, obj.encoded, db=self._db(b"objects"), overwrite=False)
        return obj.id

    def put_encoded(self, oid: bytes, data: bytes | memoryview) -> bool:
        """Store an object received in its encoding, once it is known to hash to `oid` and decode."""
        return bool(self._t.put(oid, data, db=self._db(b"objects"), overwrite=False))

    def encoded(self, oid: bytes) -> memoryview | None:
        """An object's stored encoding, unchecked, or None."""
        value = self._t.get(oid, db=self._db(b"objects"), default=None)
        return None if value is None else memoryview(value)

    def has_object(self, oid: bytes) -> bool:
        return self._t.get(oid, db=self._db(b"objects"), default=None) is not None

    def object(self, oid: bytes) -> StoredObject:
        """An object of any kind; the typed accessors below say which kind the caller expects."""
        data = self._t.get(oid, db=self._db(b"objects"), default=None)
        if data is None:
            raise CorruptData(f"object {oid.hex()} is missing")
        if digest(data) != oid:  # a few KB hashed per object: every read on the way to output
            raise CorruptData(f"object {oid.hex()} does not match its id: the store is damaged")
        return decode(data, oid)

    def object_of(self, oid: bytes, kind: type[K]) -> K:
        """The object `oid`, which must be of `kind` (else CorruptData naming both)."""
        obj = self.object(oid)
        if not isinstance(obj, kind):
            raise CorruptData(f"object {oid.hex()} is a {obj.TYPE}, not a {kind.TYPE}")
        return obj

    def commit(self, oid: bytes) -> Commit:
        return self.object_of(oid, Commit)

    def snapshot(self, oid: bytes) -> Snapshot:
        return self.object_of(oid, Snapshot)

    def tensor(self, oid: bytes) -> Tensor:
        return self.object_of(oid, Tensor)

    def blob(self, oid: bytes) -> Blob:
        return self.object_of(oid, Blob)

    def plan(self, oid: bytes) -> Plan:
        return self.object_of(oid, Plan)

    def snapshot_of(self, commit_id: bytes) -> Snapshot:
        """The snapshot a commit records."""
        return self.snapshot(self.commit(commit_id).snapshot)

    def objects(self) -> Iterator[tuple[bytes, memoryview]]:
        """(id, stored encoding) of every object, in key order."""
        return self._items(b"objects")

    def object_ids_from(self, start: bytes) -> Iterator[bytes]:
        """Object ids in key order from `start` on (for prefix lookups)."""
        cur = self._t.cursor(db=self._db(b"objects"))
        if cur.set_range(start):
            yield from map(bytes, cur.iternext(keys=True, values=False))

    # whole-store iteration and deletion (fsck, gc, status) ---------------------------------
    def _items(self, db: bytes) -> Iterator[tuple[bytes, memoryview]]:
        cur = self._t.cursor(db=self._db(db))
        for k, v in cur.iternext():
            yield bytes(k), memoryview(v)

    def keys(self, db: bytes) -> Iterator[bytes]:
        """Every key of `db`, in order, without touching the values (a remote's holdings)."""
        cur = self._t.cursor(db=self._db(db))
        return map(bytes, cur.iternext(keys=True, values=False))

    def delete(self, db: bytes, key: bytes) -> bool:
        return bool(self._t.delete(key, db=self._db(db)))

    def entries(self, db: bytes) -> int:
        return int(self._t.stat(self._db(db))["entries"])

    # refs and meta ------------------------------------------------------------------------
    def ref(self, name: str) -> bytes | None:
        value = self._t.get(name.encode(), db=self._db(b"refs"), default=None)
        return None if value is None else bytes(value)

    def set_ref_if_equals(self, name: str, old: bytes | None, new: bytes | None, command: str,
                          when: str) -> bool:
        """Point ref `name` at `new` (None: delete it) only if it points at `old` now (None: it
        does not exist); the move is appended to its reflog. False, and nothing written, if the
        ref is elsewhere: every ref update is this compare-and-set, so no caller can lose a move
        another process made between its read and its write."""
        if self.ref(name) != old:
            return False
        if new is None:
            self._t.delete(name.encode(), db=self._db(b"refs"))
        else:
            self._t.put(name.encode(), new, db=self._db(b"refs"))
        self._append_reflog(name, ReflogEntry(old, new, when, command))
        return True

    def add_ref_if_new(self, name: str, new: bytes, command: str, when: str) -> bool:
        return self.set_ref_if_equals(name, None, new, command, when)

    def _append_reflog(self, name: str, entry: ReflogEntry) -> None:
        prefix = name.encode() + b"\0"
        last = self._last_reflog_key(prefix)
        seq = 0 if last is None else int.from_bytes(last[len(prefix):], "big") + 1
        self._t.put(prefix + seq.to_bytes(8, "big"), entry.encode(), db=self._db(b"reflog"))

    def _last_reflog_key(self, prefix: bytes) -> bytes | None:
        cur = self._t.cursor(db=self._db(b"reflog"))
        if not cur.set_range(prefix + b"\xff" * 8):
            if not cur.last():
                return None
        elif not cur.prev():
            return None
        key = bytes(cur.key())
        return key if key.startswith(prefix) and len(key) == len(prefix) + 8 else None

    def reflog(self, name: str) -> list[ReflogEntry]:
        """Every move of ref `name`, oldest first."""
        prefix = name.encode() + b"\0"
        cur = self._t.cursor(db=self._db(b"reflog"))
        out = []
        if cur.set_range(prefix):
            for k, v in cur.iternext():
                if not bytes(k).startswith(prefix):
                    break
                out.append(ReflogEntry.decode(v))
        return out

    def reflog_entries(self) -> Iterator[tuple[bytes, ReflogEntry]]:
        """(key, entry) of every reflog entry of every ref (for gc's expiry)."""
        for key, value in self._items(b"reflog"):
            yield key, ReflogEntry.decode(value)

    def refs(self, prefix: str = "") -> dict[str, bytes]:
        cur = self._t.cursor(db=self._db(b"refs"))
        p = prefix.encode()
        out: dict[str, bytes] = {}
        if cur.set_range(p):
            for k, v in cur.iternext():
                key = bytes(k)
                if not key.startswith(p):
                    break
                out[key.decode()] = bytes(v)
        return out

    def meta(self, key: str) -> str | None:
        value = self._t.get(key.encode(), db=self._db(b"meta"), default=None)
        return None if value is None else bytes(value).decode()

    def set_meta(self, key: str, value: str) -> None:
        self._t.put(key.encode(), value.encode(), db=self._db(b"meta"))

    def delete_meta(self, key: str) -> None:
        self._t.delete(key.encode(), db=self._db(b"meta"))

    # binary meta records (the file-identity cache, store/filecache.py) ---------------------
    def meta_bytes(self, key: bytes) -> memoryview | None:
        value = self._t.get(key, db=self._db(b"meta"), default=None)
        return None if value is None else memoryview(value)

    def set_meta_bytes(self, key: bytes, value: bytes) -> None:
        self._t.put(key, value, db=self._db(b"meta"))

    def meta_items(self, prefix: bytes) -> Iterator[tuple[bytes, memoryview]]:
        """(key, value) of every meta record whose key starts with `prefix`, in key order."""
        cur = self._t.cursor(db=self._db(b"meta"))
        if cur.set_range(prefix):
            for k, v in cur.iternext():
                key = bytes(k)
                if not key.startswith(prefix):
                    break
                yield key, memoryview(v)


class Store:
    """An open LMDB environment; `read()` and `write()` are the only ways in."""

    def __init__(self, path: Path, env: lmdb.Environment, open_lock: BinaryIO | None, readonly: bool = False):
        self.path = path
        self.env = env
        self.readonly = readonly  # opened on a read-only file system: no lock files, no writes
        self._open_lock: BinaryIO | None = open_lock  # held shared for as long as the store is open
        self._touched = 0
        self._live = 0  # transactions open in this process: the map may be resized only at 0
        self._layout_ok: bool | None = None  # overflow_extent reads LMDB 0.9's nodes (checked once)
        self._psize: int | None = None  # the environment's page size, once asked
        self._no_read_ahead = 0  # depth of no_read_ahead()
        self._mapped: list[tuple[int, int]] | None = None  # the map's address ranges, until it is remapped
        # A lazy clone's source of chunks it has not fetched: the stored bytes of a missing chunk,
        # checked against its digest, or CorruptData (set by Repo; None: a missing chunk is damage).
        self.fallback: Callable[[bytes], bytes] | None = None
        self.db = {name: env.open_db(name, create=False) for name in DATABASES}

    @classmethod
    def create(cls, path: Path, settings: dict[str, str], map_size: int = DEFAULT_MAP_SIZE) -> Store:
        try:
            path.mkdir(parents=True)
            lock = _lock_open(path)
        except OSError as e:
            raise _os_error(e, path) from None
        env = _open_env(path, map_size)
        try:
            with env.begin(write=True) as txn:
                for name in DATABASES:
                    env.open_db(name, txn=txn, create=True)
                meta = env.open_db(b"meta", txn=txn)
                txn.put(b"format", str(FORMAT_VERSION).encode(), db=meta)
                for key, value in settings.items():
                    txn.put(key.encode(), value.encode(), db=meta)
            env.sync(True)
        except lmdb.Error as e:
            env.close()
            lock.close()
            raise _lmdb_error(e, path) from None
        return cls(path, env, lock)

    @classmethod
    def open(cls, path: Path) -> Store:
        data = path / "data.mdb"
        if not data.is_file():
            raise NotARepository(f"{path} is not an mpstore repository")
        # The lock comes first: a compaction holds it exclusively while it swaps the data file,
        # and an environment opened before the swap would write into the replaced file.
        readonly = False
        try:
            lock: BinaryIO | None = _lock_open(path)
        except OSError as e:
            if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise _os_error(e, path) from None
            lock, readonly = None, True  # a read-only mount: nobody can write, nothing to lock
        try:
            env = _open_env(path, max(DEFAULT_MAP_SIZE, 2 * data.stat().st_size), readonly=readonly)
        except lmdb.Error as e:
            if lock is not None:
                lock.close()
            if "already open in this process" in str(e):  # LMDB allows one environment per file per process
                raise StoreBusy(f"{path} is already open in this process: use that Repo") from None
            raise StoreDamaged(f"{path} cannot be opened as an mpstore repository ({reason(e)}): "
                               "its data.mdb is damaged or not LMDB; restore .mp from a backup") from None
        try:
            store = cls(path, env, lock, readonly)
        except lmdb.Error as e:
            env.close()
            if lock is not None:
                lock.close()
            if isinstance(e, lmdb.NotFoundError):  # an LMDB environment, but not ours
                raise NotARepository(f"{path} is not an mpstore repository") from None
            raise _lmdb_error(e, path) from None
        store._check_length()
        with store.read() as r:
            found = r.meta("format")
        if found != str(FORMAT_VERSION):
            store.close()
            raise FormatMismatch(
                f"{path} has store format {found}, this mpstore reads format {FORMAT_VERSION}"
            )
        return store

    def _check_length(self) -> None:
        """A data file shorter than its pages in use was truncated (a failed copy, a full disk
        during a backup): reading a page past its end would kill the process with SIGBUS."""
        need = self.used_bytes()
        have = (self.path / "data.mdb").stat().st_size
        if have < need:
            self.close()
            raise StoreDamaged(f"{self.path / 'data.mdb'} is truncated ({have} bytes, its pages need {need}): "
                               "restore .mp from a backup")

    def close(self) -> None:
        self.env.close()
        if self._open_lock is not None:
            self._open_lock.close()
            self._open_lock = None

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Held (shared) by every command that writes chunks before its commit, and taken
        exclusively by gc: gc never deletes the unreferenced chunks of a commit in progress."""
        with self._lock_file("gc.lock") as f:
            fcntl.flock(f, fcntl.LOCK_SH)
            yield

    @contextmanager
    def collecting(self) -> Iterator[None]:
        """gc's side of `writing`: waits for writers in progress, keeps new ones waiting."""
        with self._lock_file("gc.lock") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    def _check_writable(self) -> None:
        """A writing command on a read-only store says so before it has done anything."""
        if self.readonly:
            raise ReadOnlyStore(f"{self.path} is on a read-only file system: reading commands work, "
                                "this one writes")

    def _lock_file(self, name: str) -> BinaryIO:
        """A lock file of the store, opened for a command that writes: a read-only store says so
        here, before the command has done anything."""
        self._check_writable()
        try:
            return open(self.path / name, "a+b")
        except OSError as e:
            raise _os_error(e, self.path) from None

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """This process alone has the store open (every open holds a shared lock), or MpError."""
        self._check_writable()
        lock = self._open_lock
        assert lock is not None  # only a read-only store is opened without it
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreBusy(f"{self.path}: another process has the repository open; try again") from None
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_SH)

    def used_bytes(self) -> int:
        """Bytes of the data file's pages in use (the high-water mark of allocated pages)."""
        info = self.env.info()
        return int((info["last_pgno"] + 1) * self.env.stat()["psize"])

    def file_bytes(self) -> int:
        """Bytes the data file really occupies on disk (it is sparse: see _open_env)."""
        return os.stat(self.path / "data.mdb").st_blocks * 512

    def compact(self) -> tuple[int, int]:
        """Rewrite the data file without free pages; (allocated bytes before, after). Needs the
        store to itself, and is safe at any instant: the copy is complete and synced before it is
        renamed over the data file, and a copy left by a killed compaction is removed first."""
        data = self.path / "data.mdb"
        before = self.file_bytes()
        with self.exclusive():
            tmp = self.path / "compact.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                tmp.mkdir()
                self.env.copy(str(tmp), compact=True)
                _fsync(tmp / "data.mdb")
            except (OSError, lmdb.Error) as e:  # a full disk: the copy goes, the store is untouched
                shutil.rmtree(tmp, ignore_errors=True)
                if isinstance(e, lmdb.Error):
                    raise _lmdb_error(e, self.path) from None
                raise _os_error(e, self.path) from None
            self._reopen(lambda: os.replace(tmp / "data.mdb", data))
            shutil.rmtree(tmp, ignore_errors=True)
            _fsync(self.path)
        return before, self.file_bytes()

    def _reopen(self, swap: Callable[[], None]) -> None:
        """Close the environment, run `swap` (which replaces the data file), open it again."""
        size = self.env.info()["map_size"]
        self.env.close()
        try:
            swap()
        finally:
            self.env = _open_env(self.path, size)
            self._mapped = None
            self.db = {name: self.env.open_db(name, create=False) for name in DATABASES}

    @contextmanager
    def read(self) -> Iterator[Txn]:
        txn = self._begin(write=False)
        try:
            yield Txn(self, txn)
        except lmdb.Error as e:
            raise _lmdb_error(e, self.path) from None
        finally:
            txn.abort()
            self._live -= 1

    def write(self, fn: Callable[[Txn], T], reserve: int = 0) -> T:
        """Run `fn` in one write transaction and commit; rerun it on a larger map if it filled.

        `fn` must be safe to rerun (it only writes through the Txn it is given). `reserve` is how
        many bytes it may add; the map is grown beforehand so a rerun is the exception. A full
        disk aborts the transaction: the store is as it was, and the caller gets `DiskFull`.
        """
        self._check_writable()
        self._ensure_room(reserve)
        while True:
            txn = self._begin(write=True)
            try:
                result = fn(Txn(self, txn))
                txn.commit()
                return result
            except lmdb.MapFullError:
                txn.abort()
            except lmdb.Error as e:
                txn.abort()
                raise _lmdb_error(e, self.path) from None
            except BaseException:
                txn.abort()
                raise
            finally:
                self._live -= 1
            self._resize(2 * self.env.info()["map_size"])

    def reserve(self, nbytes: int) -> None:
        """Make room in the map for `nbytes` of writes to come, before a long read transaction
        opens (a merge writes its output while it reads its inputs, and the map cannot grow while
        this process has a transaction open)."""
        if not self.readonly:
            self._ensure_room(nbytes)

    def sync(self) -> None:
        """Make every committed transaction durable (data pages are synced at each commit; this
        flushes the meta page too)."""
        self.env.sync(True)

    def touched(self, nbytes: int) -> None:
        """Account for `nbytes` of the map just read or written; every RELEASE_EVERY bytes the
        mapping is released, which is what keeps long operations' resident memory bounded."""
        self._touched += nbytes
        if self._touched >= RELEASE_EVERY:
            self._touched = 0
            self.release_pages()

    def release_pages(self) -> None:
        """Drop this process's mapping of store pages it has touched, so a long read or write
        keeps a bounded resident set; the pages stay in the page cache and fault back in on the
        next access. Safe for a shared file mapping: written pages stay dirty in the page cache."""
        self._advise(MADV_DONTNEED)

    def overflow_extent(self, leaf_key: memoryview) -> tuple[int, int] | None:
        """(offset, length) of the value on overflow pages whose B-tree leaf node holds
        `leaf_key` (a key as a cursor returns it: a view into its leaf page). The node is LMDB
        0.9's (`MDB_node`: data size in two halves, flags, key size, the key, then the first
        overflow page's number); the first value located is checked against its page's header
        (`MDB_page`: its own number, P_OVERFLOW, its page count), and if that disagrees nothing
        is located in this store again: a prefetch then does nothing, every read still works."""
        import numpy as np  # the address of a read-only view; numpy is loaded wherever this runs

        if self._layout_ok is False:
            return None
        node = int(np.frombuffer(leaf_key, dtype=np.uint8).ctypes.data) - NODE_HEADER
        first, second, flags, ksize = NODE.unpack(ctypes.string_at(node, NODE.size))
        if not flags & F_BIGDATA or ksize != len(leaf_key):
            return None
        lo, hi = (first, second) if sys.byteorder == "little" else (second, first)
        (pgno,) = PGNO.unpack(ctypes.string_at(node + NODE_HEADER + ksize, PGNO.size))
        if self._psize is None:
            self._psize = int(self.env.stat()["psize"])  # asked once: the call opens a transaction
        psize = self._psize
        offset, length = pgno * psize + PAGE_HEADER, lo | hi << 16
        if self._layout_ok is None:
            try:
                with open(self.path / "data.mdb", "rb") as f:
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_RANDOM)  # that page, no read-ahead
                    header = os.pread(f.fileno(), PAGE.size, pgno * psize)
            except OSError:
                header = b""
            own, _, page_flags, pages = PAGE.unpack(header) if len(header) == PAGE.size else (-1, 0, 0, 0)
            self._layout_ok = own == pgno and bool(page_flags & P_OVERFLOW) and pages * psize >= PAGE_HEADER + length
            if not self._layout_ok:
                return None
        return offset, length

    @contextmanager
    def no_read_ahead(self) -> Iterator[None]:
        """The kernel's read-ahead on this process's map off while inside (uses nest; on again
        when the outermost ends, and kept off across a resize of the map). Off, a page fault
        reads that one page instead of the device's read-ahead window around it (8 MiB on a VM
        disk): right for scattered reads, such as a budgeted merge's, whose bulk a prefetcher
        fetches in runs (store.prefetch); ruinous for long reads without one."""
        self._no_read_ahead += 1
        if self._no_read_ahead == 1:
            self._advise(MADV_RANDOM)
        try:
            yield
        finally:
            self._no_read_ahead -= 1
            if not self._no_read_ahead:
                self._advise(MADV_NORMAL)

    def _advise(self, advice: int) -> None:
        """madvise every range where this process maps the data file."""
        for start, end in self._map_ranges():
            _libc().madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), advice)

    def _map_ranges(self) -> list[tuple[int, int]]:
        """The address ranges where this process maps the data file (from /proc/self/maps, read
        once per mapping: with torch loaded the file has thousands of lines); none if unreadable."""
        if self._mapped is None:
            datafile = str(self.path.resolve() / "data.mdb")
            try:
                with open("/proc/self/maps") as maps:
                    ranges = [line.split()[0] for line in maps if line.rstrip().endswith(datafile)]
            except OSError:
                return []
            self._mapped = [(int(a, 16), int(b, 16)) for a, b in (r.split("-") for r in ranges)]
        return self._mapped

    def uncached(self, offset: int, length: int) -> list[tuple[int, int]]:
        """The runs (offset, length) of whole pages of [offset, offset + length) of the data file
        that are not in the page cache, from mincore on this process's map (LMDB maps the file
        from its start), which asks without reading; the whole range where that cannot be told.
        Any thread may ask while a transaction keeps the map in place."""
        ranges = self._map_ranges()
        page = mmap.PAGESIZE
        first = offset // page * page
        pages = (offset + length - first + page - 1) // page
        vec = (ctypes.c_ubyte * pages)()
        if not ranges or _libc().mincore(ctypes.c_void_p(min(a for a, _ in ranges) + first),
                                         ctypes.c_size_t(pages * page), vec):
            return [(offset, length)]
        flags = bytes(vec)
        if flags.count(0) in (0, pages):  # the usual answers: all cached (warm), none (cold)
            return [] if flags[0] else [(first, pages * page)]
        runs: list[tuple[int, int]] = []
        for i, resident in enumerate(flags):
            if resident & 1:
                continue
            at = first + i * page
            if runs and runs[-1][0] + runs[-1][1] == at:
                runs[-1] = (runs[-1][0], runs[-1][1] + page)
            else:
                runs.append((at, page))
        return runs

    def _begin(self, write: bool) -> lmdb.Transaction:
        try:
            try:
                txn = self.env.begin(write=write, buffers=True)
            except lmdb.MapResizedError:  # another process grew the map: adopt its size
                self._resize(0)
                txn = self.env.begin(write=write, buffers=True)
        except lmdb.Error as e:
            raise _lmdb_error(e, self.path) from None
        self._live += 1
        return txn

    def _ensure_room(self, reserve: int) -> None:
        info = self.env.info()
        need = self.used_bytes() + reserve + reserve // 8 + MAP_SLACK
        if need > info["map_size"]:
            self._resize(max(need, 2 * info["map_size"]))

    def _resize(self, size: int) -> None:
        """LMDB resizes the map only while this process has no transaction open: one open across
        a resize would be invalidated mid-read. A command that reads while it writes reserves its
        writes beforehand (`reserve`), so this refusal means another process grew the store."""
        if self._live:
            raise StoreBusy(f"{self.path}: the store's map must grow while a read is in progress "
                            "(another process wrote much since); run the command again")
        self.env.set_mapsize(size)
        self._mapped = None
        if self._no_read_ahead:  # a new mapping: advise it too
            self._advise(MADV_RANDOM)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _lock_open(path: Path) -> BinaryIO:
    """Take the shared open lock (see Store.exclusive); waits while a compaction runs."""
    lock = open(path / "open.lock", "a+b")
    fcntl.flock(lock, fcntl.LOCK_SH)
    return lock


def _open_env(path: Path, map_size: int, readonly: bool = False) -> lmdb.Environment:
    """The environment. metasync=False: data pages are fsynced at every commit, the meta page at
    the next sync; a power cut can lose the last commit but never corrupt the store. No writemap:
    LMDB then writes pages with pwrite at commit, so a full disk is an error the transaction
    reports (not SIGBUS on a page of a sparse file), the file is only as large as its pages in use,
    and a large map costs address space only (see docs/benchmarks.md, "writemap", for add speed).
    Read-only (a read-only mount): no lock file, as no process can write there."""
    _keep_dirty_pages_in_the_heap()
    size = map_size
    while True:
        try:
            return lmdb.open(
                str(path), subdir=True, max_dbs=len(DATABASES), map_size=size, metasync=False,
                writemap=False, readahead=True, create=not readonly, readonly=readonly, lock=not readonly,
            )
        except lmdb.MemoryError:  # address space limited (ulimit -v): a smaller map
            if size // 2 < MIN_MAP_SIZE:
                raise
            size //= 2


def reason(e: BaseException) -> str:
    """An LMDB or OS error's reason without its code number or the path we name ourselves."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e.args[1] if isinstance(e, lmdb.Error) and len(e.args) > 1 and isinstance(e.args[1], str)
               else e.args[0] if e.args else e)
    return text.split(": ", 1)[-1].strip() or type(e).__name__


def _lmdb_error(e: lmdb.Error, path: Path) -> MpError:
    """One line for a failure inside LMDB: what happened to the store, and what to do."""
    io_error = os.strerror(errno.EIO) in str(e)  # py-lmdb gives the C library's message only
    if isinstance(e, lmdb.DiskError) or (io_error and _nearly_full(path)):
        # LMDB reports a short write (the disk filled up under it) as EIO
        return DiskFull(f"no space left on the device holding {path}: nothing was written (the store is as "
                        "it was); free some space and run the command again")
    if isinstance(e, lmdb.ReadonlyError):
        return ReadOnlyStore(f"{path} cannot be written ({reason(e)}): reading commands work, this one writes")
    if isinstance(e, (lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.PanicError, lmdb.InvalidError,
                      lmdb.BadChecksumError, lmdb.ProblemError)):
        return StoreDamaged(f"{path / 'data.mdb'} is damaged ({reason(e)}): run `mp fsck` to see what is "
                            "affected; restore .mp from a backup")
    if io_error:
        return WriteFailed(f"the device holding {path} failed to read or write (I/O error): nothing was "
                           "committed; check the disk and run `mp fsck`")
    return StoreDamaged(f"{path}: the store failed ({type(e).__name__}: {reason(e)})")


def _nearly_full(path: Path) -> bool:
    try:
        return shutil.disk_usage(path).free < MAP_SLACK
    except OSError:
        return False


def _os_error(e: OSError, path: Path) -> MpError:
    """One line for an operating-system refusal around the store (lock files, folders)."""
    if e.errno == errno.ENOSPC:
        return DiskFull(f"no space left on the device holding {path}: nothing was written")
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return ReadOnlyStore(f"{path} cannot be written ({e.strerror}): reading commands work, this one writes")
    return WriteFailed(f"{path}: {e.strerror or e}")


_LIBC: ctypes.CDLL | None = None
_TUNED = False
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def _keep_dirty_pages_in_the_heap() -> None:
    """Without writemap LMDB mallocs the dirty pages of a transaction (a chunk is a run of
    overflow pages) and frees them at commit. glibc serves each allocation over 128 KiB with a
    fresh mmap, whose pages fault in and are zeroed one by one, batch after batch: that made `mp
    add` about 2x slower than with writemap. Serving them from the heap and keeping it between
    batches reuses the same memory (bounded by one batch, see ChunkSink.BATCH_BYTES); measured
    in docs/benchmarks.md, "writemap". Elsewhere than glibc this is skipped."""
    global _TUNED
    if _TUNED:
        return
    _TUNED = True
    try:
        libc = _libc()
        libc.mallopt(M_MMAP_THRESHOLD, 256 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, 512 << 20)
    except (OSError, AttributeError):
        pass


def _libc() -> ctypes.CDLL:
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
        _LIBC.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        _LIBC.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
        if hasattr(_LIBC, "mallopt"):
            _LIBC.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return _LIBC
