"""The file-identity cache: what reading a file produced, so `mp add` of an unchanged file reads
nothing (git's index, for model folders).

An entry is keyed by the file's identity (device and inode) and records the file's size,
mtime_ns and ctime_ns as `mp add` saw them before it began reading, when it began, and the ids
the read produced: for a safetensors file its header blob and its tensors in header order, for
any other file its blob. A later add trusts the entry only when

- the file's size, mtime_ns and ctime_ns are still the recorded ones (a write moves mtime, and
  ctime too, even when mtime is set back with utime), and
- the entry is not *racily clean*: the recorded mtime is at least MARGIN_NS older than the time
  the read began. A write within the file system's timestamp granularity of the read could
  leave the mtime as it was; such an entry is never trusted, the file is read again, and the
  new entry (recorded later) is trusted from then on, as git does with its index,
- every object it names is still in the store (gc may have collected them; it also deletes the
  entries that name collected objects, in its sweep).

Entries live in the `meta` database under FILE_PREFIX (old stores need no new database) and
carry their own digest: a damaged entry is a miss, never a wrong commit. The cache never
changes what a commit holds: a hit gives the ids a full read gives (tests/test_filecache.py).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import msgpack

from .env import Txn
from .ids import DIGEST_SIZE, digest

FILE_PREFIX = b"file\0"  # meta keys of entries: prefix, then device and inode (8 bytes each)
MARGIN_NS = 2_000_000_000  # coarser than any file system's mtime granularity (FAT: 2 s)
VERSION = 1
WEIGHTS, BLOB = "weights", "blob"  # what an entry's ids are (see the module docstring)


@dataclass(frozen=True)
class Identity:
    """A file as stat sees it: which file, and the fields a write changes."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> Identity:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    @property
    def key(self) -> bytes:
        return FILE_PREFIX + struct.pack(">QQ", self.dev & (2**64 - 1), self.ino & (2**64 - 1))


@dataclass(frozen=True)
class Observed:
    """A file's identity throughout one read of it, and when that read began (ns since the epoch)."""

    identity: Identity
    began_ns: int


@dataclass(frozen=True)
class Entry:
    identity: Identity
    began_ns: int  # when the read that produced `ids` began
    kind: str  # WEIGHTS or BLOB
    ids: tuple[bytes, ...]

    def encode(self) -> bytes:
        i = self.identity
        body = msgpack.packb([VERSION, i.size, i.mtime_ns, i.ctime_ns, self.began_ns, self.kind, list(self.ids)],
                             use_bin_type=True)
        return digest(body) + body

    @classmethod
    def decode(cls, key: bytes, value: bytes | memoryview) -> Entry | None:
        """The entry, or None when it is damaged or of another version (a miss, never an error)."""
        value = bytes(value)
        body = value[DIGEST_SIZE:]
        if len(key) != len(FILE_PREFIX) + 16 or digest(body) != value[:DIGEST_SIZE]:
            return None
        try:
            version, size, mtime, ctime, began, kind, ids = msgpack.unpackb(body, raw=False)
        except Exception:  # bytes that are not what we wrote
            return None
        if version != VERSION or kind not in (WEIGHTS, BLOB) or not all(
                isinstance(x, bytes) and len(x) == DIGEST_SIZE for x in ids):
            return None
        dev, ino = struct.unpack(">QQ", key[len(FILE_PREFIX):])
        return cls(Identity(dev, ino, size, mtime, ctime), began, kind, tuple(ids))

    @property
    def trusted(self) -> bool:
        """Not racily clean: a write after the read began would have moved the mtime."""
        return self.identity.mtime_ns < self.began_ns - MARGIN_NS


def lookup(txn: Txn, identity: Identity, kind: str) -> tuple[bytes, ...] | None:
    """The ids reading this file produced, if the cache may be trusted for it (see the module
    docstring); None means: read the file."""
    value = txn.meta_bytes(identity.key)
    if value is None:
        return None
    entry = Entry.decode(identity.key, value)
    if entry is None or entry.kind != kind or entry.identity != identity or not entry.trusted:
        return None
    return entry.ids if all(txn.has_object(i) for i in entry.ids) else None


def record(txn: Txn, entries: Iterable[Entry]) -> None:
    """Store entries (each replaces the one its file had)."""
    for entry in entries:
        txn.set_meta_bytes(entry.identity.key, entry.encode())


def entries(txn: Txn) -> Iterator[tuple[bytes, Entry | None]]:
    """(key, entry or None if damaged) of every entry, for gc."""
    for key, value in txn.meta_items(FILE_PREFIX):
        yield key, Entry.decode(key, value)
