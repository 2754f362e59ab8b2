"""Garbage collection (`mp gc`): delete what no ref, tag or live reflog entry reaches.

Marking walks from the refs and from every reflog entry younger than the expiry (as git keeps
what its reflogs name), then unreachable objects, chunks, expired reflog entries, catalog
entries whose chunks are gone (or whose layout is outdated) and file-identity cache entries
naming objects that go (store/filecache.py) are deleted in one transaction,
which first checks that no ref moved since the marking (else it marks again). The whole
collection runs under the store's exclusive gc lock, which commands that write chunks hold shared while they
work, so a commit in progress never loses its chunks. Readers are never disturbed: LMDB keeps
every page a live read transaction can see.

Giving the freed pages back to the disk is `Store.compact` (`mp gc --compact`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone

from ..errors import MpError, StoreBusy
from . import filecache
from .derived import CatalogRules, catalog_chunks
from .env import Store, Txn, delta_reference
from .objects import timestamp
from .reach import walk

MAX_ATTEMPTS = 5


@dataclass
class Garbage:
    """What a collection deletes (or, from `reclaimable`, would delete)."""

    objects: int = 0
    chunks: int = 0
    chunk_bytes: int = 0
    reflog_entries: int = 0
    catalog_entries: int = 0
    file_cache_entries: int = 0  # entries of the file-identity cache naming objects deleted here

    def to_json(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class _Dead:
    objects: list[bytes] = field(default_factory=list)
    chunks: list[bytes] = field(default_factory=list)
    reflog: list[bytes] = field(default_factory=list)
    catalog: list[bytes] = field(default_factory=list)
    file_cache: list[bytes] = field(default_factory=list)  # keys in `meta`

    def by_database(self) -> dict[bytes, list[bytes]]:
        return {b"objects": self.objects, b"chunks": self.chunks, b"reflog": self.reflog, b"catalog": self.catalog,
                b"meta": self.file_cache}


def _cutoff(expire: timedelta) -> str:
    return timestamp(datetime.now(timezone.utc) - expire)


def _find(txn: Txn, cutoff: str, rules: CatalogRules) -> tuple[Garbage, _Dead]:
    roots = [(f"ref {n}", cid) for n, cid in txn.refs().items()]
    dead = _Dead()
    for key, entry in txn.reflog_entries():
        if entry.time <= cutoff:
            dead.reflog.append(key)
            continue
        roots += [("reflog", x) for x in (entry.old, entry.new) if x]
    reach = walk(txn, roots)
    found = Garbage(reflog_entries=len(dead.reflog))
    dead.objects = [oid for oid, _ in txn.objects() if oid not in reach.objects]
    live = reach.chunks | _references(txn, reach.chunks)
    for key, value in txn.chunks():
        if key not in live:
            dead.chunks.append(key)
            found.chunk_bytes += len(value) - 1 if len(value) else 0
    for key, value in txn.catalog_entries():
        expert, base = catalog_chunks(key)
        if expert not in reach.chunks or base not in reach.chunks or not rules.current(key, value):
            dead.catalog.append(key)
    for key, cached in filecache.entries(txn):  # a damaged entry, or one naming objects that go
        if cached is None or not all(i in reach.objects for i in cached.ids):
            dead.file_cache.append(key)
    found.objects, found.chunks, found.catalog_entries = len(dead.objects), len(dead.chunks), len(dead.catalog)
    found.file_cache_entries = len(dead.file_cache)
    return found, dead


def _references(txn: Txn, chunks: set[bytes]) -> set[bytes]:
    """The reference chunks of the delta chunks among `chunks`: kept while a live delta needs
    them, reachable or not (the base model they came from may be gone)."""
    return {ref for key in chunks if (ref := delta_reference(txn.stored_chunk(key))) is not None}


def reclaimable(store: Store, expire: timedelta, rules: CatalogRules) -> Garbage:
    """What gc would free now, without freeing it."""
    with store.read() as txn:
        found, _ = _find(txn, _cutoff(expire), rules)
    store.release_pages()
    return found


def _roots(txn: Txn) -> tuple[tuple[tuple[str, bytes], ...], int]:
    """What marking depended on: any ref move since changes it (and adds a reflog entry)."""
    return tuple(sorted(txn.refs().items())), txn.entries(b"reflog")


def collect(store: Store, expire: timedelta, rules: CatalogRules) -> Garbage:
    """Mark in a read transaction, then sweep everything in one write transaction that first
    checks no ref moved meanwhile (else mark again): a ref made to point at a commit during
    the collection either keeps it whole or finds it gone, never half deleted."""
    with store.collecting():
        for _ in range(MAX_ATTEMPTS):
            with store.read() as txn:
                found, dead = _find(txn, _cutoff(expire), rules)
                marked = _roots(txn)

            def sweep(t: Txn, dead: _Dead = dead, marked: tuple = marked) -> bool:
                if _roots(t) != marked:
                    return False
                for db, keys in dead.by_database().items():
                    for k in keys:
                        t.delete(db, k)
                return True

            if store.write(sweep):
                break
        else:
            raise StoreBusy("refs kept moving while gc was marking; run gc again")
        store.sync()
    store.release_pages()
    return found


NEVER = timedelta(days=365 * 1000)


def parse_expire(text: str) -> timedelta:
    """'30d', '12h', '90m', '45s', '2w', 'now' (expire everything), or 'never'. An expiry longer
    than 'never' (1000 years: before any reflog entry) is 'never'; it cannot overflow a date."""
    text = text.strip().lower()
    if text == "now":
        return timedelta(0)
    if text == "never":
        return NEVER
    units = {"d": "days", "h": "hours", "m": "minutes", "s": "seconds", "w": "weeks"}
    digits = text[:-1]
    if len(text) >= 2 and text[-1] in units and digits.isascii() and digits.isdigit():
        try:
            return min(timedelta(**{units[text[-1]]: int(digits)}), NEVER)
        except OverflowError:  # beyond what a timedelta holds: longer than 'never' anyway
            return NEVER
    raise MpError(f"invalid expiry {text!r}: use e.g. 30d, 12h, now or never")
