"""Checking a store end to end (`mp fsck`): every problem named on its own line.

Every object must decode and hash to its key, every ref must name a commit, everything reachable
must exist with chunks that cover it, every chunk's bytes must hash to its key, and every delta
catalog entry must be what measuring its two chunks gives (a wrong entry would silently steer
budgeted merges). A damaged
chunk is reported with a tensor or file that uses it, so the user knows which model is hurt.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import lmdb

from ..errors import CorruptData
from .derived import CatalogRules, catalog_chunks
from .env import Store, Txn, reason, stored_payload
from .ids import digest
from .objects import decode
from .reach import walk


@dataclass
class FsckResult:
    """Every problem found, one line each, and counts of what was checked."""

    problems: list[str] = field(default_factory=list)
    objects: int = 0
    chunks: int = 0
    refs: int = 0
    chunk_bytes: int = 0
    catalog: int = 0
    not_fetched: int = 0  # a lazy clone: reachable chunks not fetched yet (the remote holds them)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "problems": self.problems,
                "checked": {"objects": self.objects, "chunks": self.chunks, "refs": self.refs,
                            "chunk_bytes": self.chunk_bytes, "catalog": self.catalog,
                            "not_fetched": self.not_fetched}}


    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> FsckResult:
        return cls(list(doc["problems"]), **doc["checked"])


def fsck(store: Store, rules: CatalogRules) -> FsckResult:
    """Check everything; each database is checked on its own, so damage to one B-tree (which
    LMDB reports as it meets it) is a problem line and the others are still checked. In a lazy
    clone (a store with a fallback) a reachable chunk not fetched yet is counted, not a problem,
    and fsck fetches nothing: it checks what is here."""
    out = FsckResult()
    fallback, store.fallback = store.fallback, None
    try:
        with store.read() as txn:
            for phase in (_objects, _reach_and_chunks, _catalog):
                try:
                    phase(store, txn, rules, out, fallback is not None)
                except lmdb.Error as e:
                    out.problems.append(f"{store.path / 'data.mdb'}: the {phase.__doc__} B-tree is damaged "
                                        f"({reason(e)}); restore .mp from a backup")
        store.release_pages()
    finally:
        store.fallback = fallback
    return out


def _objects(store: Store, txn: Txn, rules: CatalogRules, out: FsckResult, lazy: bool) -> None:
    """objects"""
    for oid, data in txn.objects():
        out.objects += 1
        if digest(data) != oid:
            out.problems.append(f"object {oid.hex()}: bytes do not hash to its id")
            continue
        try:
            decode(data, oid)
        except CorruptData as e:
            out.problems.append(str(e))


def _reach_and_chunks(store: Store, txn: Txn, rules: CatalogRules, out: FsckResult, lazy: bool) -> None:
    """refs and chunks"""
    problems = out.problems
    roots = []
    for name, cid in txn.refs().items():
        out.refs += 1
        try:
            txn.commit(cid)
        except CorruptData as e:
            problems.append(f"ref {name}: {e}")
            continue
        roots.append((f"ref {name}", cid))
    reach = walk(txn, roots, name_users=True)
    problems.extend(reach.problems)
    stored: set[bytes] = set()
    for key, value in txn.chunks():
        out.chunks += 1
        out.chunk_bytes += max(0, len(value) - 1)
        stored.add(key)
        user = reach.users.get(key)
        where = f" (used by {user})" if user else ""
        try:
            data = stored_payload(key, value, txn.reference)
        except CorruptData as e:
            problems.append(f"{e}{where}")
            continue
        if digest(data) != key:
            problems.append(f"chunk {key.hex()}: bytes do not match its digest{where}")
        elif key in reach.sizes and reach.sizes[key] != len(data):
            problems.append(f"chunk {key.hex()}: {len(data)} bytes, expected {reach.sizes[key]}{where}")
        store.touched(len(value))
    for key in sorted(reach.chunks - stored):
        if lazy:
            out.not_fetched += 1
            continue
        problems.append(f"chunk {key.hex()} is missing (used by {reach.users.get(key, '?')})")


def _catalog(store: Store, txn: Txn, rules: CatalogRules, out: FsckResult, lazy: bool) -> None:
    """catalog"""
    for key, value in txn.catalog_entries():
        if lazy and not all(map(txn.has_chunk, catalog_chunks(key))):
            continue  # measured where its chunks are; checked here once they are fetched
        out.catalog += 1
        problem = rules.verify(txn, key, value)
        if problem:
            out.problems.append(problem)
        store.touched(2 << 20)
