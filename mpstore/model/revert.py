"""Undoing one commit's changes on top of a later head, tensor by tensor (`mp revert`).

A tensor (or file) the commit changed relative to its first parent, and that nothing changed
since, goes back to the parent's version; one changed again later is a conflict. Shards keep the
head's layout; a shard's header is rebuilt only when what it describes changed, so untouched
shards keep their exact bytes.
"""

from __future__ import annotations

from ..store.chunks import ChunkSink
from ..store.env import Txn
from ..store.objects import Shard, Snapshot
from .header import build_header


def _changed(old: dict[str, bytes], new: dict[str, bytes]) -> set[str]:
    return {k for k in old.keys() | new.keys() if old.get(k) != new.get(k)}


def revert(txn: Txn, sink: ChunkSink, parent: Snapshot, commit: Snapshot, head: Snapshot,
           force: bool) -> tuple[Snapshot, list, list[str], int]:
    """(new snapshot, new objects, conflicting names, number of reverted names)."""
    conflicts: list[str] = []
    tensors, files = dict(head.tensors), dict(head.files)
    reverted = 0
    for mine, theirs, ours in ((tensors, parent.tensors, commit.tensors), (files, parent.files, commit.files)):
        for name in sorted(_changed(theirs, ours)):
            if mine.get(name) != ours.get(name) and not force:
                conflicts.append(name)
                continue
            reverted += 1
            if theirs.get(name) is None:
                mine.pop(name, None)
            else:
                mine[name] = theirs[name]
    if conflicts:
        return head, [], conflicts, 0
    objects: list = []
    shards = []
    placed: set[str] = set()
    for shard in head.shards:
        names = tuple(n for n in shard.tensors if n in tensors)
        placed.update(names)
        shards.append((shard, names))
    missing = [n for n in tensors if n not in placed]  # restored tensors the head had dropped
    if missing:
        last, names = shards[-1]
        shards[-1] = (last, names + tuple(missing))
    out_shards = []
    for shard, names in shards:
        header_id = shard.header
        if names != shard.tensors or any(tensors[n] != head.tensors.get(n) for n in names):
            entries = []
            for n in names:
                t = txn.tensor(tensors[n])
                entries.append((n, t.dtype, t.shape, t.size))
            blob = sink.blob(build_header(entries, shard.metadata), "header")
            objects.append(blob)
            header_id = blob.id
        out_shards.append(Shard(shard.file, header_id, names, shard.metadata))
    return Snapshot(tensors, files, tuple(out_shards)), objects, [], reverted
