"""Storing every chunk again under a compression policy (`mp gc --recompress POLICY`).

A chunk's key is the digest of its raw bytes, so re-encoding changes no id: only the bytes a
value takes. Under `delta`, an expert's chunk is stored as a delta against the chunk at the same
position of the model it was added `--base` of (commit.base), where that is smaller; a chunk that
is any delta's reference stays standalone (chains have depth 1).

Two passes keep that rule at every instant, so a kill between any two transactions leaves a valid
store: the first stores standalone every chunk that will not be a delta against the reference it
has now; after it, the only deltas left are ones whose reference stays standalone. The second
stores the planned deltas against references that are standalone by then and stay so. Each
batch is one transaction; the collection lock keeps adds and merges (which write deltas) out.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ..progress import Progress
from .chunks import DELTA, META_KEY, NONE, POLICIES
from .dtypes import ITEMSIZE
from .env import CODEC_RAW, Store, Txn, checked_stored
from .objects import Commit
from .reach import walk

# Stored bytes per transaction: what a killed recompression redoes, and (with their raw bytes and
# new encodings) about three times what it holds in memory.
BATCH_BYTES = 4 << 20


@dataclass
class Recompressed:
    chunks: int = 0  # chunks whose stored value changed
    before: int = 0  # bytes of every stored value, before
    after: int = 0  # ...and after

    def to_json(self) -> dict[str, int]:
        return {"chunks": self.chunks, "stored_bytes_before": self.before, "stored_bytes_after": self.after}


@dataclass(frozen=True)
class _Target:
    itemsize: int
    ref: bytes | None  # the planned reference: a delta, where that is smallest


def recompress(store: Store, policy: str, progress: Progress) -> Recompressed:
    """Set the store's policy and store every chunk under it (see the module docstring)."""
    from . import codecs

    if policy not in POLICIES:
        raise ValueError(policy)
    out = Recompressed()
    with store.collecting():
        store.write(lambda t: t.set_meta(META_KEY, policy))
        with store.read() as r:
            plan = _plan(r, policy)
            keys = list(r.keys(b"chunks"))
            out.before = sum(len(v) for _, v in r.chunks())
        progress.start(f"recompress ({policy})", len(keys))
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="mp-recompress") as pool:

            def standalone(key: bytes, value: memoryview, raw: memoryview, refs: dict[bytes, bytes]) -> bytes | None:
                target = plan.get(key, _Target(_itemsize(value), None))
                if target.ref is not None and codecs.reference_of(value) == target.ref:
                    return None  # already the planned delta: its reference stays standalone
                if policy == NONE:
                    return None if value[0] == CODEC_RAW else b"\0" + bytes(raw)
                return codecs.encode(raw, target.itemsize)

            def delta(key: bytes, value: memoryview, raw: memoryview, refs: dict[bytes, bytes]) -> bytes | None:
                target = plan[key]
                assert target.ref is not None
                if codecs.reference_of(value) == target.ref:
                    return None
                return codecs.encode(raw, target.itemsize, (target.ref, refs[target.ref]))

            out.chunks += _pass(store, keys, pool, standalone, {}, progress)
            if policy == DELTA:
                deltas = {k: t.ref for k in keys if (t := plan.get(k)) is not None and t.ref is not None}
                out.chunks += _pass(store, list(deltas), pool, delta, deltas, progress)
        progress.finish()
    with store.read() as r:
        out.after = sum(len(v) for _, v in r.chunks())
    store.sync()
    return out


def _itemsize(value: memoryview) -> int:
    """A compressed value's element size (its header says); 1 for a raw one of unknown layout."""
    return value[1] if len(value) > 1 and value[0] != CODEC_RAW else 1


def _plan(txn: Txn, policy: str) -> dict[bytes, _Target]:
    """Each reachable tensor chunk's element size and, under `delta`, the base chunk at its
    position in the model its commit was added `--base` of (where the two differ); a chunk that
    is some delta's reference is planned standalone."""
    roots = [(n, c) for n, c in txn.refs().items()]
    reach = walk(txn, roots)
    plan: dict[bytes, _Target] = {}
    refs: dict[bytes, bytes] = {}
    for oid in reach.objects:
        obj = txn.object(oid)
        if not isinstance(obj, Commit):
            continue
        snap = txn.snapshot(obj.snapshot)
        base = txn.snapshot_of(obj.base).tensors if obj.base and policy == DELTA else {}
        for name, tid in snap.tensors.items():
            t = txn.tensor(tid)
            size = ITEMSIZE.get(t.dtype, 1)
            b = txn.tensor(base[name]) if name in base else None
            same = b is not None and (b.dtype, b.shape, b.chunk_size) == (t.dtype, t.shape, t.chunk_size)
            for c, key in enumerate(t.chunks):
                plan.setdefault(key, _Target(size, None))
                if same and b is not None and b.chunks[c] != key:
                    refs.setdefault(key, b.chunks[c])
    references = set(refs.values())
    for key, ref in refs.items():
        if key not in references and ref in plan:
            plan[key] = _Target(plan[key].itemsize, ref)
    return plan


def _rewrite(choose: Callable[[bytes, memoryview, memoryview, dict[bytes, bytes]], bytes | None],
             item: tuple[bytes, bytes], raw: bytes, refs: dict[bytes, bytes]) -> tuple[bytes, bytes] | None:
    key, value = item
    new = choose(key, memoryview(value), memoryview(raw), refs)
    return None if new is None or new == value else (key, new)


def _put(rewrites: list[tuple[bytes, bytes]], t: Txn) -> None:
    for key, new in rewrites:
        t.replace_chunk(key, new)


def _batches(store: Store, keys: list[bytes]) -> Iterator[list[tuple[bytes, bytes]]]:
    """(key, stored value) in batches of about BATCH_BYTES, each read in its own transaction."""
    at = 0
    while at < len(keys):
        batch, size = [], 0
        with store.read() as r:
            while at < len(keys) and size < BATCH_BYTES:
                value = r.stored_chunk(keys[at])
                if value is not None:
                    batch.append((keys[at], bytes(value)))
                    size += len(value)
                at += 1
        yield batch


def _pass(store: Store, keys: list[bytes], pool: ThreadPoolExecutor,
          choose: Callable[[bytes, memoryview, memoryview, dict[bytes, bytes]], bytes | None],
          references: dict[bytes, bytes], progress: Progress) -> int:
    """Store again, batch by batch, the chunks `choose` gives a new value (None: as it is);
    `references`: chunk -> the reference whose raw bytes `choose` is handed."""
    changed = 0
    for batch in _batches(store, keys):
        with store.read() as r:
            raws = [bytes(checked_stored(k, v, r.reference)) for k, v in batch]  # checked before rewritten
            refs = {references[k]: bytes(r.reference(references[k])) for k, _ in batch if k in references}

        rewrites = [w for w in pool.map(_rewrite, [choose] * len(batch), batch, raws, [refs] * len(batch))
                    if w is not None]
        if rewrites:
            store.write(functools.partial(_put, rewrites), reserve=sum(len(v) for _, v in rewrites) + (1 << 20))
        changed += len(rewrites)
        progress.advance(len(batch))
    return changed

