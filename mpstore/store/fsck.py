"""Checking a store end to end (`mp fsck`): every problem named on its own line.

Every object must decode and hash to its key, every ref must name a commit, everything reachable
must exist with chunks that cover it, every chunk's bytes must hash to its key, and every delta
catalog entry must be what measuring its two chunks gives (a wrong entry would silently steer
budgeted merges). A damaged
chunk is reported with a tensor or file that uses it, so the user knows which model is hurt.
"""

from __future__ import annotations

from ..merge import catalog
from .ids import digest
from .objects import Commit, decode
from ..errors import CorruptData
from .reach import walk
from .env import CODEC_RAW, Store



def fsck(store: Store) -> tuple[list[str], dict]:
    """(problems, counts of what was checked)."""
    problems: list[str] = []
    counts = {"objects": 0, "chunks": 0, "refs": 0, "chunk_bytes": 0, "catalog": 0}
    with store.read() as txn:
        for oid, data in txn.iter_db(b"objects"):
            counts["objects"] += 1
            if digest(data) != oid:
                problems.append(f"object {oid.hex()}: bytes do not hash to its id")
                continue
            try:
                decode(data, oid)
            except CorruptData as e:
                problems.append(str(e))
        roots = []
        for name, cid in txn.refs().items():
            counts["refs"] += 1
            try:
                obj = txn.object(cid)
            except CorruptData as e:
                problems.append(f"ref {name}: {e}")
                continue
            if not isinstance(obj, Commit):
                problems.append(f"ref {name}: {cid.hex()} is not a commit")
                continue
            roots.append((f"ref {name}", cid))
        reach = walk(txn, roots, name_users=True)
        problems.extend(reach.problems)
        stored: set[bytes] = set()
        for key, value in txn.iter_db(b"chunks"):
            counts["chunks"] += 1
            counts["chunk_bytes"] += len(value) - 1
            stored.add(key)
            view = memoryview(value)
            user = reach.users.get(key)
            where = f" (used by {user})" if user else ""
            if len(view) == 0 or view[0] != CODEC_RAW:
                problems.append(f"chunk {key.hex()}: unknown codec{where}")
            elif digest(view[1:]) != key:
                problems.append(f"chunk {key.hex()}: bytes do not match its digest{where}")
            elif key in reach.sizes and reach.sizes[key] != len(view) - 1:
                problems.append(f"chunk {key.hex()}: {len(view) - 1} bytes, expected "
                                f"{reach.sizes[key]}{where}")
            store.touched(len(view))
        for key in sorted(reach.chunks - stored):
            problems.append(f"chunk {key.hex()} is missing (used by {reach.users.get(key, '?')})")
        for key, value in txn.iter_db(b"catalog"):
            counts["catalog"] += 1
            problem = catalog.verify(txn, key, value)
            if problem:
                problems.append(problem)
            store.touched(2 << 20)
    store.release_pages()
    return problems, counts
