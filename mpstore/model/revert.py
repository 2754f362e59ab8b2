"""Undoing one commit's changes on top of a later head, tensor by tensor (`mp revert`).

A tensor (or file) the commit changed relative to its first parent, and that nothing changed
since, goes back to the parent's version; one changed again later is a conflict. The shard layout
(which file holds which tensors, in which order) is reverted the same way: when the commit changed
it and the head still has the commit's layout, the parent's comes back; otherwise the head keeps
its own. A shard's header is rebuilt only when what it describes changed, so untouched shards keep
their exact bytes. Files and shards always agree in the result: a shard index
(`*.safetensors.index.json`) whose weight_map or total_size does not describe the result's shards
exactly is rewritten to do so, so that loaders reading through the index find every tensor.
"""

from __future__ import annotations

import json

from ..errors import BadMerge
from ..store.chunks import ChunkSink
from ..store.env import Txn
from ..store.objects import Shard, Snapshot
from .header import build_header

INDEX_SUFFIX = ".safetensors.index.json"


def _changed(old: dict[str, bytes], new: dict[str, bytes]) -> set[str]:
    return {k for k in old.keys() | new.keys() if old.get(k) != new.get(k)}


def _layout(snap: Snapshot) -> list[tuple[str, tuple[str, ...]]]:
    return [(s.file, tuple(s.tensors)) for s in snap.shards]


def _shards(txn: Txn, sink: ChunkSink, frame: Snapshot, tensors: dict[str, bytes],
            objects: list) -> tuple[Shard, ...]:
    """`tensors` laid out in `frame`'s shards (tensors `frame` lacks go to its last shard; shards
    left empty are dropped); headers are kept where they still describe their shard."""
    shards = []
    placed: set[str] = set()
    for shard in frame.shards:
        names = tuple(n for n in shard.tensors if n in tensors)
        placed.update(names)
        shards.append((shard, names))
    missing = tuple(n for n in tensors if n not in placed)  # restored tensors the frame had dropped
    if missing:
        last, names = shards[-1]
        shards[-1] = (last, names + missing)
    shards = [(s, names) for s, names in shards if names] or shards[:1]
    out = []
    for shard, names in shards:
        header_id = shard.header
        if names != tuple(shard.tensors) or any(tensors[n] != frame.tensors.get(n) for n in names):
            entries = []
            for n in names:
                t = txn.tensor(tensors[n])
                entries.append((n, t.dtype, t.shape, t.size))
            blob = sink.blob(build_header(entries, shard.metadata), "header")
            objects.append(blob)
            header_id = blob.id
        out.append(Shard(shard.file, header_id, names, shard.metadata))
    return tuple(out)


def _true_indexes(txn: Txn, sink: ChunkSink, files: dict[str, bytes], shards: tuple[Shard, ...],
                  tensors: dict[str, bytes], objects: list) -> None:
    """Rewrite (in `files`) every top-level shard index that does not name exactly these shards."""
    weight_map = {n: s.file for s in shards for n in s.tensors}
    total = sum(txn.tensor(tid).size for tid in tensors.values())
    for rel, blob_id in sorted(files.items()):
        if "/" in rel or not rel.endswith(INDEX_SUFFIX):
            continue
        data = b"".join(bytes(txn.chunk(k)) for k in txn.blob(blob_id).chunks)
        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, ValueError, RecursionError):
            doc = None
        if not isinstance(doc, dict):
            raise BadMerge(f"cannot revert: {rel} is not a JSON shard index, so it cannot be made to "
                           "name the result's shards")
        metadata = doc.get("metadata")
        sized = isinstance(metadata, dict) and "total_size" in metadata
        if doc.get("weight_map") == weight_map and (not sized or doc["metadata"]["total_size"] == total):
            continue
        doc["weight_map"] = dict(sorted(weight_map.items()))
        if isinstance(metadata, dict):
            metadata["total_size"] = total
        blob = sink.blob((json.dumps(doc, indent=2, sort_keys=True) + "\n").encode(), rel)
        objects.append(blob)
        files[rel] = blob.id


def revert(txn: Txn, sink: ChunkSink, parent: Snapshot, commit: Snapshot, head: Snapshot,
           force: bool) -> tuple[Snapshot, list, list[str], int]:
    """(new snapshot, new objects, conflicting names, number of reverted names and layouts)."""
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
    # the layout: the parent's when the commit changed it and nothing changed it since
    frame = head
    if _layout(parent) != _layout(commit) and _layout(head) == _layout(commit) and parent.shards:
        frame = parent
        reverted += 1
    objects: list = []
    shards = _shards(txn, sink, frame, tensors, objects) if frame.shards else ()
    _true_indexes(txn, sink, files, shards, tensors, objects)
    return Snapshot(tensors, files, shards), objects, [], reverted
