"""Rebuilding a snapshot as a folder (`mp checkout`), byte for byte, or not at all.

Every chunk is hash-checked as it is read. The folder is written under a temporary sibling name
and renamed into place only when complete, so the target is either untouched or whole; file names
are checked again here so that no snapshot, however it was made, writes outside its target.
"""

from __future__ import annotations

import os
import secrets
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from ..errors import CorruptData, TargetExists, WriteFailed
from ..progress import Progress
from ..store.env import Store, Txn
from ..store.objects import Chunked, Snapshot
from .paths import check_relpath, inside


def chunk_views(txn: Txn, obj: Chunked, what: str) -> Iterator[memoryview]:
    """The object's bytes chunk by chunk, verified; a bad chunk is reported as `what`."""
    for key in obj.chunks:
        try:
            yield txn.chunk(key)
        except CorruptData as e:
            raise CorruptData(f"{what}: {e}") from None


def _prepare_target(out: Path, force: bool, store_path: Path) -> None:
    store_path = store_path.resolve()
    if out.resolve() == store_path or out.resolve() in store_path.parents:
        raise TargetExists(f"{out} holds the repository itself; choose another folder")
    if out.exists() or out.is_symlink():
        if not out.is_dir() or out.is_symlink():
            raise TargetExists(f"{out} exists and is not a folder")
        if any(out.iterdir()) and not force:
            raise TargetExists(f"{out} is not empty (use --force to replace it)")


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Atomically put `tmp` at `out`; an existing folder is moved aside first and then removed."""
    if out.exists():
        aside = out.parent / f".{out.name}.mp-old-{secrets.token_hex(4)}"
        os.rename(out, aside)
        os.rename(tmp, out)
        shutil.rmtree(aside)
    else:
        os.rename(tmp, out)


def snapshot_size(txn: Txn, snap: Snapshot) -> int:
    """Total bytes of the folder a snapshot rebuilds."""
    total = sum(txn.blob(b).size for b in snap.files.values())
    for shard in snap.shards:
        total += 8 + txn.blob(shard.header).size
        total += sum(txn.tensor(snap.tensors[n]).size for n in shard.tensors)
    return total


class _Writer:
    """Writes verified chunks to files and releases store pages as it goes."""

    def __init__(self, store: Store, txn: Txn, progress: Progress):
        self.store, self.txn, self.progress = store, txn, progress

    def write(self, f: BinaryIO, obj: Chunked, what: str) -> None:
        for view in chunk_views(self.txn, obj, what):
            f.write(view)
            self.progress.advance(len(view))
            self.store.touched(len(view))


def checkout(store: Store, snapshot_id: bytes, out: Path, force: bool, progress: Progress) -> None:
    """Write the snapshot's folder at `out`; raises before touching `out` if anything is wrong."""
    out = Path(os.path.abspath(out))
    _prepare_target(out, force, store.path)
    with store.read() as txn:
        snap = txn.snapshot(snapshot_id)
        for rel in [*snap.files, *(s.file for s in snap.shards)]:
            check_relpath(rel)
        tmp = out.parent / f".{out.name}.mp-tmp-{secrets.token_hex(4)}"
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
        except OSError as e:
            raise WriteFailed(f"{out}: cannot create the folder: {e.strerror}") from None
        progress.start("checkout", snapshot_size(txn, snap))
        try:
            writer = _Writer(store, txn, progress)
            for rel, blob_id in snap.files.items():
                target = inside(tmp, rel)
                target.parent.mkdir(parents=True, exist_ok=True)
                with open(target, "wb") as f:
                    writer.write(f, txn.blob(blob_id), rel)
            for shard in snap.shards:
                header = txn.blob(shard.header)
                with open(inside(tmp, shard.file), "wb") as f:
                    f.write(struct.pack("<Q", header.size))
                    writer.write(f, header, f"{shard.file}: header")
                    for name in shard.tensors:
                        writer.write(f, txn.tensor(snap.tensors[name]), f"{shard.file}: tensor {name!r}")
            _swap_into_place(tmp, out)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise WriteFailed(f"{out}: cannot write: {e.strerror or e}") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            progress.finish()
            store.release_pages()
