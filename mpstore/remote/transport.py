"""What a remote is to the sync code: refs to read and compare-and-swap, and entries to list,
get and put, whatever the remote stores them in.

Two kinds of remote implement it: another mpstore repository on a path (`remote.local`), whose
LMDB holds the entries as any store does, and an object store (`remote.bucket`), which keeps them
in immutable packs. The sync code (`remote.sync`) decides what moves and verifies every entry it
receives; a transport only moves bytes.

An entry is one thing a store holds, by kind:
- `OBJECT`: key = object id, data = the object's msgpack encoding;
- `CHUNK`: key = chunk digest, data = the chunk as stored (codec byte, then the encoded bytes):
  chunks travel in the codec they are stored in;
- `CATALOG`: key = a delta-catalog key (expert digest, base digest, dtype), data = its entry.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

OBJECT, CHUNK, CATALOG = 0, 1, 2
KINDS = (OBJECT, CHUNK, CATALOG)
KIND_NAMES = {OBJECT: "object", CHUNK: "chunk", CATALOG: "catalog entry"}


@dataclass(frozen=True)
class RemoteRef:
    """A ref as the remote holds it: the commit id, and the token a compare-and-swap of it must
    present (an object store's ETag; the id itself for a repository)."""

    id: bytes
    token: str


@dataclass(frozen=True)
class Info:
    """What a remote says of itself: its chunk size (a clone takes it), the branch its HEAD
    names (a clone checks it out as its branch), or None for an empty remote."""

    chunk_size: int | None
    head: str | None


class Transport(Protocol):
    """One remote. Every method raises MpError (one line, naming the remote) on failure."""

    url: str
    sent_bytes: int  # bytes sent so far (entries, packs, indexes): what a push costs on the wire
    received_bytes: int  # bytes received so far: what a fetch or a lazy read costs
    # Bytes of chunks a receiver commits at a time (a pack, at most): an interrupted fetch moves
    # at most this much again.
    batch_bytes: int

    def info(self) -> Info: ...

    def init(self, chunk_size: int, head: str | None) -> None:
        """Make an empty remote usable (an object store's config object); a no-op where it
        already is, and an error when its chunk size differs."""
        ...

    def refs(self) -> dict[str, RemoteRef]:
        """Every ref, by store name (`heads/NAME`, `tags/NAME`)."""
        ...

    def set_ref(self, name: str, old: RemoteRef | None, new: bytes) -> bool:
        """Move `name` to `new` if it is still `old` (None: only if it does not exist); False
        when another writer got there first. Atomic on the remote."""
        ...

    def holdings(self, kind: int) -> set[bytes]:
        """The keys of every entry of `kind` the remote holds (complete packs only)."""
        ...

    def sizes(self, kind: int, keys: Iterable[bytes]) -> dict[bytes, int]:
        """The stored size of each of `keys` the remote holds: what getting it moves."""
        ...

    def get(self, kind: int, keys: Iterable[bytes]) -> Iterator[tuple[bytes, bytes]]:
        """(key, data) for each of `keys` the remote holds, in any order; unverified."""
        ...

    def put(self, entries: Iterable[tuple[int, bytes, bytes]]) -> int:
        """Store (kind, key, data) entries; returns bytes sent. Entries become visible in
        batches, each all or nothing, so an interrupted put leaves a valid remote and a rerun
        sends only what did not arrive."""
        ...

    def close(self) -> None: ...
