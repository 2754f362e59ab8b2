"""Packs: how entries travel to and rest on an object store, as bytes only.

An object store charges per request, so entries (objects, chunks, catalog entries; see
`remote.transport`) are not stored one per key but concatenated into packs of about 64 MiB. Each
pack has an index, msgpack `[1, [[kind, key, offset, length, check], ...]]` where `check` is the
entry's xxh3-64 (as an int), and the pack is named by the xxh3-128 hex digest of its index bytes:
content-addressed and immutable, like git's packfiles.

This module builds packs, decodes and checks indexes, and plans the ranged reads that fetch a set
of entries with few requests. It never talks to a store: `remote.bucket` moves the bytes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import msgpack
import xxhash

from mpstore.remote.transport import KINDS

INDEX_FORMAT = 1
PACK_BYTES = 64 << 20  # a pack closes once it holds this much: few requests, bounded memory
# Entries this close in one pack are read in one request, gap included: small entries (objects,
# catalog entries, config files) join, but no unwanted 1 MiB chunk between two wanted ones comes
# down (a lazy budgeted merge read 7% more than its plan with a 1 MiB gap: docs/benchmarks.md).
RANGE_GAP = 64 << 10
# ...up to this many bytes per request (one larger entry gets its own). With bucket.READERS
# requests in flight, what a fetch has received but not committed stays within one pack
# (READERS * RANGE_CAP + sync.BATCH = 64 MiB), so an interrupted fetch moves at most a pack again.
RANGE_CAP = 4 << 20


@dataclass(frozen=True)
class Location:
    """Where an entry lies: its pack, its byte span there, and the xxh3-64 of its bytes."""

    pack: str
    offset: int
    length: int
    check: int

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass
class Pack:
    """A pack ready to upload: its name, its bytes and its encoded index, and the index decoded
    (the uploader records what the remote now holds without decoding it again)."""

    id: str
    data: bytearray  # uploaded as it is: a 64 MiB copy saved
    index: bytes
    entries: list[tuple[int, bytes, Location]]


@dataclass
class Range:
    """One ranged read: bytes [start, end) of a pack, and the entries that lie in it."""

    pack: str
    start: int
    end: int
    members: list[tuple[bytes, Location]] = field(default_factory=list)


def pack_id(index: bytes) -> str:
    """A pack's name: the hex xxh3-128 of its index, which names every entry and its checksum."""
    return xxhash.xxh3_128_hexdigest(index)


def build_packs(entries: Iterable[tuple[int, bytes, bytes]], target: int = PACK_BYTES) -> Iterator[Pack]:
    """Packs of (kind, key, data) entries, in the order given, each closed once it holds at least
    `target` bytes (a lone entry larger than `target` makes a pack of its own). Only the pack being
    built is held here, so a consumer that uploads one while the next builds holds two."""
    data = bytearray()
    rows: list[tuple[int, bytes, int, int, int]] = []
    for kind, key, value in entries:
        rows.append((kind, bytes(key), len(data), len(value), xxhash.xxh3_64_intdigest(value)))
        data += value
        if len(data) >= target:
            yield _close(data, rows)
            data, rows = bytearray(), []
    if rows:
        yield _close(data, rows)


def _close(data: bytearray, rows: list[tuple[int, bytes, int, int, int]]) -> Pack:
    index = msgpack.packb([INDEX_FORMAT, rows], use_bin_type=True)
    name = pack_id(index)
    entries = [(k, key, Location(name, off, n, check)) for k, key, off, n, check in rows]
    return Pack(name, data, index, entries)


def decode_index(name: str, raw: bytes) -> list[tuple[int, bytes, Location]]:
    """The entries of pack `name` from its index bytes, as (kind, key, location). ValueError (the
    reason) when the bytes do not hash to the name or are not a well-formed index."""
    if pack_id(raw) != name:
        raise ValueError("its bytes do not hash to its name")
    try:
        fmt, rows = msgpack.unpackb(raw, raw=True, use_list=False, strict_map_key=False)
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise ValueError(f"cannot be decoded: {e}") from None
    if fmt != INDEX_FORMAT:
        raise ValueError(f"format {fmt!r}, expected {INDEX_FORMAT}")
    if not isinstance(rows, tuple):
        raise ValueError("its entries are not a list")
    out = []
    for row in rows:
        if not (isinstance(row, tuple) and len(row) == 5):
            raise ValueError("an entry is not [kind, key, offset, length, check]")
        kind, key, off, n, check = row
        if kind not in KINDS or not isinstance(key, bytes) or not all(
            isinstance(v, int) and v >= 0 for v in (off, n, check)
        ):
            raise ValueError("an entry has a field of the wrong type")
        out.append((kind, key, Location(name, off, n, check)))
    return out


def plan_ranges(wanted: Iterable[tuple[bytes, Location]], gap: int = RANGE_GAP, cap: int = RANGE_CAP,
                age: dict[str, float] | None = None) -> list[Range]:
    """Ranged reads covering `wanted`: entries of one pack sorted by offset, neighbours joined when
    the gap between them is at most `gap` bytes and the joined read stays within `cap` bytes. Packs
    come oldest first by `age` (when each was written): a push sends a delta's reference before
    the delta, so a fetch then meets references first and need not hold deltas waiting for them."""
    ranges: list[Range] = []
    cur: Range | None = None
    ages = age or {}
    for key, loc in sorted(wanted, key=lambda kl: (ages.get(kl[1].pack, 0.0), kl[1].pack, kl[1].offset)):
        if cur is None or loc.pack != cur.pack or loc.offset - cur.end > gap or loc.end - cur.start > cap:
            cur = Range(loc.pack, loc.offset, loc.end)
            ranges.append(cur)
        cur.end = max(cur.end, loc.end)
        cur.members.append((key, loc))
    return ranges


def split_range(r: Range, body: bytes) -> Iterator[tuple[bytes, bytes]]:
    """(key, data) of each entry in a fetched range. ValueError naming the first entry whose bytes
    are short or do not match the checksum its index gives."""
    if len(body) != r.end - r.start:
        raise ValueError(f"{len(body)} bytes came back for a range of {r.end - r.start}")
    for key, loc in r.members:
        data = body[loc.offset - r.start : loc.end - r.start]
        if xxhash.xxh3_64_intdigest(data) != loc.check:
            raise ValueError(f"entry {key.hex()} at offset {loc.offset} does not match its checksum")
        yield key, data
