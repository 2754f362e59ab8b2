"""What the store's roots reach: the walk behind fsck, gc and status.

Roots are the refs and the reflog entries still in force. From a commit the walk follows its
parents, base, plan (and the plan's inputs), snapshot; from a snapshot its tensors, blobs and
shard headers; from those their chunks. Missing or undecodable objects are reported, not fatal,
so fsck can name every problem in one run.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TypeVar

from ..errors import CorruptData
from .dtypes import ITEMSIZE
from .env import Txn
from .ids import short
from .objects import Blob, Chunked, Commit, Plan, Snapshot, Stored, Tensor

K = TypeVar("K", bound=Stored)


@dataclass
class Reach:
    objects: set[bytes] = field(default_factory=set)
    chunks: set[bytes] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)
    # chunk digest -> a place that uses it, for naming damage ("tensor X of commit Y"),
    # and the length that place expects of it
    users: dict[bytes, str] = field(default_factory=dict)
    sizes: dict[bytes, int] = field(default_factory=dict)


def walk(txn: Txn, roots: Iterable[tuple[str, bytes]], name_users: bool = False) -> Reach:
    """Everything reachable from (label, commit id) roots."""
    out = Reach()
    todo: list[tuple[str, bytes]] = list(roots)
    while todo:
        label, cid = todo.pop()
        if cid in out.objects:
            continue
        commit = _get(txn, cid, Commit, f"{label}: commit", out)
        if commit is None:
            continue
        out.objects.add(cid)
        where = f"commit {short(cid)} ({commit.message})"
        for p in commit.parents:
            todo.append((f"parent of {where}", p))
        if commit.base:
            todo.append((f"base of {where}", commit.base))
        if commit.plan:
            plan = _get(txn, commit.plan, Plan, f"plan of {where}", out)
            if plan is not None:
                out.objects.add(commit.plan)
                todo.extend((f"input of {where}", m) for m in [*([plan.base] if plan.base else []), *plan.models,
                                                                *(a for a in plan.adapters or [] if a)])
        snap = _get(txn, commit.snapshot, Snapshot, f"snapshot of {where}", out)
        if snap is None:
            continue
        out.objects.add(commit.snapshot)
        parts: list[tuple[str, bytes, type[Tensor] | type[Blob]]] = [
            (f"tensor {n!r} of {where}", tid, Tensor) for n, tid in snap.tensors.items()]
        parts += [(f"file {f!r} of {where}", bid, Blob) for f, bid in snap.files.items()]
        parts += [(f"header of {s.file!r} of {where}", s.header, Blob) for s in snap.shards]
        for what, oid, kind in parts:
            if oid in out.objects:
                continue
            obj = _get(txn, oid, kind, what, out)
            if obj is None:
                continue
            out.objects.add(oid)
            _check_cover(obj, what, out)
            for c, (start, end) in zip(obj.chunks, obj.spans()):
                out.chunks.add(c)
                if name_users:
                    out.users.setdefault(c, what)
                    out.sizes.setdefault(c, end - start)
    return out


def _get(txn: Txn, oid: bytes, kind: type[K], what: str, out: Reach) -> K | None:
    try:
        return txn.object_of(oid, kind)
    except CorruptData as e:
        out.problems.append(f"{what}: {e}")
        return None


def _check_cover(obj: Chunked, what: str, out: Reach) -> None:
    """A chunked object's chunks must add up to its size, and a tensor's size to its shape."""
    expected = -(-obj.size // obj.chunk_size) if obj.size else 0
    if len(obj.chunks) != expected:
        out.problems.append(f"{what}: {len(obj.chunks)} chunks for {obj.size} bytes (expected {expected})")
    if isinstance(obj, Tensor):
        if obj.dtype not in ITEMSIZE or math.prod(obj.shape) * ITEMSIZE[obj.dtype] != obj.size:
            out.problems.append(f"{what}: {obj.dtype}{list(obj.shape)} does not fill {obj.size} bytes")
