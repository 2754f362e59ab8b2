"""Checkout of awkward models: two shards with an index, tensors of 2 bytes, odd sizes, exact
chunk multiples, empty tensors and files, nested folders; the folder is byte for byte what was
added, and a damaged or missing chunk is an error in one line that leaves no folder behind (and
a `--force` target as it was)."""

from __future__ import annotations

import json
from pathlib import Path

import lmdb
import pytest
import torch
from conftest import assert_user_error, leftovers, run_mp, tree_bytes
from safetensors.torch import save_file

from mpstore import Repo
from mpstore.errors import CorruptData

CHUNK = 4096  # the smallest chunk size: many chunks per tensor


def odd_model(folder: Path) -> Path:
    """Two shards with an index, tensors of odd and exact chunk multiples, an empty tensor, a
    tensor of several MB, nested and empty non-tensor files."""
    g = torch.Generator().manual_seed(12)
    folder.mkdir(parents=True)
    first = {
        "a.one": torch.randn(1, generator=g).to(torch.bfloat16),  # 2 bytes
        "a.odd": torch.randn(12345, generator=g),  # 49 380 bytes: 12 chunks and a remainder
        "a.exact": torch.randn(CHUNK // 4 * 3, generator=g),  # exactly 3 chunks
        "a.empty": torch.zeros((0, 4)),
    }
    second = {
        "b.big": torch.randn(5 << 18, generator=g),  # 5 MiB: 1280 chunks, more than one writev takes
        "b.int": torch.arange(777, dtype=torch.int16),
    }
    index = {"metadata": {}, "weight_map": {}}
    for i, part in enumerate((first, second), 1):
        name = f"model-0000{i}-of-00002.safetensors"
        save_file(part, str(folder / name), metadata={"part": str(i)})
        index["weight_map"].update(dict.fromkeys(part, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text('{"odd": true}\n')
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "vocab.txt").write_bytes(bytes(range(256)) * 41 + b"tail")
    (folder / "empty.txt").write_bytes(b"")
    return folder


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """(repository root, model folder) with the odd model committed on branch `m`."""
    work = tmp_path_factory.mktemp("co")
    model = odd_model(work / "model")
    root = work / "repo"
    with Repo.init(root, chunk_size=CHUNK) as repo:
        repo.add(model, "m")
    return root, model


def test_checkout_is_byte_identical(stored, tmp_path):
    root, model = stored
    with Repo.open(root) as repo:
        repo.checkout("m", tmp_path / "out")
    written = tree_bytes(tmp_path / "out")
    assert written == tree_bytes(model)
    assert written["empty.txt"] == b"" and len(written) == 6
    assert leftovers(tmp_path) == []


def test_the_cli_checkout_is_byte_identical(stored, tmp_path):
    root, model = stored
    proc = run_mp("-C", root, "--quiet", "checkout", "m", "-o", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert tree_bytes(tmp_path / "out") == tree_bytes(model)


def _edit_chunks(root: Path, fn) -> None:
    """fn(txn, chunks db) in a raw LMDB write transaction, as a disk fault would change the store
    (conftest's edit_db maps 10 MiB; this store, at 4 KiB chunks, is larger)."""
    env = lmdb.open(str(root / ".mp"), max_dbs=16, subdir=True, map_size=1 << 30)
    try:
        with env.begin(write=True) as txn:
            fn(txn, env.open_db(b"chunks", txn=txn, create=False))
    finally:
        env.close()


def _copy_repo(root: Path, to: Path) -> Path:
    (to / ".mp").mkdir(parents=True)
    for f in (root / ".mp").iterdir():
        (to / ".mp" / f.name).write_bytes(f.read_bytes())
    return to


def _chunk_of(root: Path, tensor: str, which: float) -> bytes:
    with Repo.open(root) as repo, repo.store.read() as r:
        chunks = r.tensor(r.snapshot_of(repo.resolve("m")).tensors[tensor]).chunks
        return chunks[int(len(chunks) * which)]


@pytest.fixture
def damaged(stored, tmp_path):
    """A copy of the repository with one bit flipped deep inside `b.big` (the second shard)."""
    copy = _copy_repo(stored[0], tmp_path / "damaged")
    key = _chunk_of(copy, "b.big", 0.8)

    def flip(txn, db):
        value = bytearray(txn.get(key, db=db))
        value[1 + 1000] ^= 0x10
        txn.put(key, bytes(value), db=db)

    _edit_chunks(copy, flip)
    return copy, key


def test_a_damaged_chunk_is_one_line_and_leaves_no_folder(damaged, tmp_path):
    root, key = damaged
    area = tmp_path / "area"
    area.mkdir()
    proc = run_mp("-C", root, "checkout", "m", "-o", area / "out")
    assert_user_error(proc, "model-00002-of-00002.safetensors: tensor 'b.big'", key.hex(), "does not match its digest")
    assert list(area.iterdir()) == []  # neither the target nor a temporary folder


def test_a_damaged_chunk_leaves_a_forced_target_as_it_was(damaged, tmp_path):
    """The error reaches the caller after part of the folder was written; the half-written
    folder is removed and the target it would have replaced is kept."""
    root, key = damaged
    area = tmp_path / "area"
    (area / "keep").mkdir(parents=True)
    (area / "keep" / "mine.txt").write_text("mine")
    with Repo.open(root) as repo, pytest.raises(CorruptData, match=f"tensor 'b.big': chunk {key.hex()}"):
        repo.checkout("m", area / "keep", force=True)
    assert tree_bytes(area / "keep") == {"mine.txt": b"mine"}  # --force replaces only a whole folder
    assert sorted(p.name for p in area.iterdir()) == ["keep"]


def test_a_missing_chunk_is_one_line_and_leaves_no_folder(stored, tmp_path):
    copy = _copy_repo(stored[0], tmp_path / "repo")
    key = _chunk_of(copy, "a.odd", 0.5)
    _edit_chunks(copy, lambda txn, db: txn.delete(key, db=db))
    proc = run_mp("-C", copy, "checkout", "m", "-o", tmp_path / "area" / "out")
    assert_user_error(proc, "model-00001-of-00002.safetensors: tensor 'a.odd'", key.hex(), "is missing")
    assert list((tmp_path / "area").iterdir()) == []
