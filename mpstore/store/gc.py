"""Garbage collection (`mp gc`): delete what no ref, tag or live reflog entry reaches.

Marking walks from the refs and from every reflog entry younger than the expiry (as git keeps
what its reflogs name), then unreachable objects, chunks, expired reflog entries and catalog
entries whose chunks are gone (or whose layout is outdated) are deleted in one transaction, which first checks that no ref moved
since the marking (else it marks again). The whole collection runs
under the store's exclusive gc lock, which commands that write chunks hold shared while they
work, so a commit in progress never loses its chunks. Readers are never disturbed: LMDB keeps
every page a live read transaction can see.

`compact` rewrites the data file with only live pages and renames it into place, which needs the
store to itself (no other process may have it open) and is safe at any instant: until the rename
the old file is untouched, after it the new one is complete.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone

import msgpack

from ..merge import catalog
from ..errors import MpError, StoreBusy
from .reach import walk
from .env import Store, Txn

MAX_ATTEMPTS = 5
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


@dataclass
class Garbage:
    objects: int = 0
    chunks: int = 0
    chunk_bytes: int = 0
    reflog_entries: int = 0
    catalog_entries: int = 0

    def to_json(self) -> dict:
        return asdict(self)


def _cutoff(expire: timedelta) -> str:
    return (datetime.now(timezone.utc) - expire).strftime(TIME_FORMAT)


def _find(txn: Txn, cutoff: str) -> tuple[Garbage, dict[bytes, list[bytes]]]:
    roots = [(f"ref {n}", cid) for n, cid in txn.refs().items()]
    expired: list[bytes] = []
    for key, value in txn.iter_db(b"reflog"):
        entry = msgpack.unpackb(value, raw=False)
        if entry["time"] <= cutoff:
            expired.append(key)
            continue
        roots += [("reflog", x) for x in (entry["old"], entry["new"]) if x]
    reach = walk(txn, roots)
    found = Garbage(reflog_entries=len(expired))
    dead: dict[bytes, list[bytes]] = {b"objects": [], b"chunks": [], b"reflog": expired, b"catalog": []}
    for oid, _ in txn.iter_db(b"objects"):
        if oid not in reach.objects:
            dead[b"objects"].append(oid)
    for key, value in txn.iter_db(b"chunks"):
        if key not in reach.chunks:
            dead[b"chunks"].append(key)
            found.chunk_bytes += len(value) - 1
    for key, value in txn.iter_db(b"catalog"):  # keyed by (expert chunk, base chunk, dtype)
        if key[:16] not in reach.chunks or key[16:32] not in reach.chunks or not catalog.current(key, value):
            dead[b"catalog"].append(key)
    found.objects, found.chunks = len(dead[b"objects"]), len(dead[b"chunks"])
    found.catalog_entries = len(dead[b"catalog"])
    return found, dead


def reclaimable(store: Store, expire: timedelta) -> Garbage:
    """What gc would free now, without freeing it."""
    with store.read() as txn:
        found, _ = _find(txn, _cutoff(expire))
    store.release_pages()
    return found


def _roots(txn: Txn) -> tuple:
    """What marking depended on: any ref move since changes it (and adds a reflog entry)."""
    return tuple(sorted(txn.refs().items())), txn.entries(b"reflog")


def collect(store: Store, expire: timedelta) -> Garbage:
    """Mark in a read transaction, then sweep everything in one write transaction that first
    checks no ref moved meanwhile (else mark again): a ref made to point at a commit during
    the collection either keeps it whole or finds it gone, never half deleted."""
    with store.collecting():
        for _ in range(MAX_ATTEMPTS):
            with store.read() as txn:
                found, dead = _find(txn, _cutoff(expire))
                marked = _roots(txn)

            def sweep(t: Txn) -> bool:
                if _roots(t) != marked:
                    return False
                for db, keys in dead.items():
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


def compact(store: Store) -> tuple[int, int]:
    """Rewrite the data file without free pages; (allocated bytes before, after)."""
    data = store.path / "data.mdb"
    before = os.stat(data).st_blocks * 512
    with store.exclusive():
        tmp = store.path / "compact.tmp"
        shutil.rmtree(tmp, ignore_errors=True)  # left by a compaction that was killed
        tmp.mkdir()
        store.env.copy(str(tmp), compact=True)
        fd = os.open(tmp / "data.mdb", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        store.reopen(lambda: os.replace(tmp / "data.mdb", data))
        shutil.rmtree(tmp, ignore_errors=True)
        dfd = os.open(store.path, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return before, os.stat(data).st_blocks * 512


def parse_expire(text: str) -> timedelta:
    """'30d', '12h', '90m', 'now' (expire everything), or 'never'."""
    text = text.strip().lower()
    if text == "now":
        return timedelta(0)
    if text == "never":
        return timedelta(days=365 * 1000)
    units = {"d": "days", "h": "hours", "m": "minutes", "s": "seconds", "w": "weeks"}
    if len(text) >= 2 and text[-1] in units and text[:-1].isdigit():
        return timedelta(**{units[text[-1]]: int(text[:-1])})
    raise MpError(f"invalid expiry {text!r}: use e.g. 30d, 12h, now or never")
