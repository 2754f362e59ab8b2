"""Bad input through the real `mp` command: one line `mp: error: ...` naming the problem, exit
status 1, no traceback, and a store whose every key and value is exactly what it was before."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import assert_user_error, run_mp, safetensors_bytes, store_fingerprint, tree_bytes
from safetensors.torch import save_file

from mpstore import Repo


@pytest.fixture
def store(tmp_path, family):
    """A repository holding the base model on branch `base`, closed again so `mp` owns it."""
    root = tmp_path / "repo"
    with Repo.init(root) as r:
        r.add(family["base"], "base")
    return root


def model_dir(tmp_path: Path, name: str, weights: bytes | None, file: str = "model.safetensors") -> Path:
    """A model folder with a config and (unless None) the given bytes as its weights file."""
    folder = tmp_path / "inputs" / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "qwen2"}\n')
    if weights is not None:
        (folder / file).write_bytes(weights)
    return folder


F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def valid_file_bytes(tmp_path: Path) -> bytes:
    p = tmp_path / "valid.safetensors"
    save_file({"a": torch.arange(64, dtype=torch.float32), "b": torch.ones(3, 3)}, str(p))
    return p.read_bytes()


# Each case: (id, builder(tmp_path) -> bytes of model.safetensors, fragments the message must hold)
MALFORMED = [
    ("truncated", lambda t: valid_file_bytes(t)[:200], ["runs past the end", "truncated"]),
    ("shorter-than-length-prefix", lambda t: b"\x10\x00\x00", ["too short"]),
    ("empty-file", lambda t: b"", ["too short"]),
    ("header-length-huge", lambda t: safetensors_bytes({"a": F32x2}, bytes(8), length=1 << 40), ["header length", "limit"]),
    ("header-length-past-file", lambda t: safetensors_bytes(b'{}', b"", length=500), ["header length 500", "runs past the end"]),
    ("invalid-json", lambda t: safetensors_bytes(b'{"a": {"dtype": ', bytes(8)), ["not valid JSON"]),
    ("invalid-utf8", lambda t: safetensors_bytes(b'{"\xff\xfe": 1}', b""), ["not valid JSON"]),
    ("duplicate-key", lambda t: safetensors_bytes(b'{"a": %s, "a": %s}' % ((json.dumps(F32x2).encode(),) * 2), bytes(8)), ["duplicate key"]),
    ("deeply-nested-json", lambda t: safetensors_bytes(b"[" * 100_000 + b"]" * 100_000, b""), ["JSON"]),
    ("header-not-an-object", lambda t: safetensors_bytes(b"[1, 2]", b""), ["not a JSON object"]),
    ("entry-not-an-object", lambda t: safetensors_bytes({"a": [1]}, b""), ["'a'", "not an object"]),
    ("unknown-dtype", lambda t: safetensors_bytes({"a": {**F32x2, "dtype": "F42"}}, bytes(8)), ["'a'", "unknown dtype 'F42'"]),
    ("negative-shape", lambda t: safetensors_bytes({"a": {**F32x2, "shape": [-2]}}, bytes(8)), ["'a'", "invalid shape"]),
    ("shape-vs-bytes", lambda t: safetensors_bytes({"a": {**F32x2, "shape": [3]}}, bytes(8)), ["'a'", "needs 12 bytes", "span 8"]),
    ("offsets-reversed", lambda t: safetensors_bytes({"a": {**F32x2, "data_offsets": [8, 0]}}, bytes(8)), ["'a'", "invalid data_offsets"]),
    ("overlapping-offsets", lambda t: safetensors_bytes(
        {"a": F32x2, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12)), ["'a'", "'b'", "overlap"]),
    ("offsets-past-file", lambda t: safetensors_bytes({"a": F32x2}, bytes(4)), ["'a'", "runs past the end"]),
    ("hole-between-tensors", lambda t: safetensors_bytes(
        {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}},
        bytes(12)), ["4 unindexed bytes", "'a'"]),
    ("trailing-bytes", lambda t: safetensors_bytes({"a": F32x2}, bytes(11)), ["3 trailing bytes"]),
    ("metadata-not-strings", lambda t: safetensors_bytes({"__metadata__": {"n": 1}, "a": F32x2}, bytes(8)), ["__metadata__"]),
]


@pytest.mark.parametrize("build,fragments", [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_safetensors_is_refused(store, tmp_path, build, fragments):
    folder = model_dir(tmp_path, "bad", build(tmp_path))
    before = store_fingerprint(store)
    line = assert_user_error(run_mp("-C", store, "add", folder, "--name", "bad"), *fragments)
    assert "model.safetensors" in line  # names the file
    assert store_fingerprint(store) == before


@pytest.mark.parametrize("build,fragments", [c[1:] for c in MALFORMED[:6]], ids=[c[0] for c in MALFORMED[:6]])
def test_malformed_single_file_is_refused(store, tmp_path, build, fragments):
    path = tmp_path / "one.safetensors"
    path.write_bytes(build(tmp_path))
    before = store_fingerprint(store)
    assert_user_error(run_mp("-C", store, "add", path, "--name", "bad"), "one.safetensors", *fragments)
    assert store_fingerprint(store) == before


def _sharded_copy(tmp_path, sharded_family) -> Path:
    dst = tmp_path / "inputs" / "sharded"
    shutil.copytree(sharded_family["base"], dst)
    return dst


def _missing_shard(tmp_path, sharded_family):
    folder = _sharded_copy(tmp_path, sharded_family)
    victim = sorted(folder.glob("model-*.safetensors"))[1]
    victim.unlink()
    return folder, ["model.safetensors.index.json", repr(victim.name), "missing"]


def _index_lies(tmp_path, sharded_family):
    folder = _sharded_copy(tmp_path, sharded_family)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    index["weight_map"]["model.embed_tokens.weight"] = shards[-1]
    index_path.write_text(json.dumps(index))
    return folder, ["'model.embed_tokens.weight'", "but it is not"]


def _index_invalid_json(tmp_path, sharded_family):
    folder = _sharded_copy(tmp_path, sharded_family)
    (folder / "model.safetensors.index.json").write_text("{ nope")
    return folder, ["model.safetensors.index.json", "not a valid JSON shard index"]


def _index_without_weight_map(tmp_path, sharded_family):
    folder = _sharded_copy(tmp_path, sharded_family)
    (folder / "model.safetensors.index.json").write_text('{"metadata": {}}')
    return folder, ["no weight_map"]


def _tensor_in_two_files(tmp_path, sharded_family):
    folder = model_dir(tmp_path, "twice", None)
    save_file({"w": torch.ones(2)}, str(folder / "a.safetensors"))
    save_file({"w": torch.zeros(2)}, str(folder / "b.safetensors"))
    return folder, ["'w'", "a.safetensors", "b.safetensors"]


def _missing_path(tmp_path, sharded_family):
    return tmp_path / "does-not-exist", ["does-not-exist", "no such file or folder"]


def _no_weights(tmp_path, sharded_family):
    return model_dir(tmp_path, "empty", None), ["no .safetensors weights"]


def _only_pickle(tmp_path, sharded_family):
    folder = model_dir(tmp_path, "pickle", b"\x80\x04not really a pickle", file="pytorch_model.bin")
    return folder, ["no .safetensors weights", "pytorch_model.bin", "pickle"]


def _not_safetensors_file(tmp_path, sharded_family):
    folder = model_dir(tmp_path, "cfg", None)
    return folder / "config.json", ["config.json", "not a .safetensors file"]


def _symlink_outside(tmp_path, sharded_family):
    folder = model_dir(tmp_path, "link", valid_file_bytes(tmp_path))
    (tmp_path / "secret.txt").write_text("outside")
    os.symlink(tmp_path / "secret.txt", folder / "tokenizer.json")
    return folder, ["tokenizer.json", "symlink points outside"]


def _control_char_file_name(tmp_path, sharded_family):
    folder = model_dir(tmp_path, "ctl", valid_file_bytes(tmp_path))
    (folder / "notes\x1b[31m.txt").write_text("colourful")
    return folder, ["control character"]


def _control_char_single_file(tmp_path, sharded_family):
    """A single .safetensors file added directly: its name becomes the snapshot's file name."""
    path = tmp_path / "inputs" / "evil\x1b[2J.safetensors"
    path.parent.mkdir(parents=True)
    path.write_bytes(valid_file_bytes(tmp_path))
    return path, ["control character"]


def _fifo(tmp_path, sharded_family):
    folder = model_dir(tmp_path, "fifo", valid_file_bytes(tmp_path))
    os.mkfifo(folder / "pipe")
    return folder, ["pipe", "not a regular file"]


def _symlinked_folder(tmp_path, sharded_family):
    folder = model_dir(tmp_path, "dirlink", valid_file_bytes(tmp_path))
    (tmp_path / "tok").mkdir()
    os.symlink(tmp_path / "tok", folder / "tokenizer")
    return folder, ["tokenizer", "symlinked folders"]


BAD_FOLDERS = [
    _missing_path, _no_weights, _only_pickle, _not_safetensors_file, _missing_shard, _index_lies,
    _index_invalid_json, _index_without_weight_map, _tensor_in_two_files, _symlink_outside,
    _control_char_file_name, _control_char_single_file, _fifo, _symlinked_folder,
]


@pytest.mark.parametrize("make", BAD_FOLDERS, ids=[f.__name__.strip("_") for f in BAD_FOLDERS])
def test_bad_model_folders_are_refused(store, tmp_path, sharded_family, make):
    path, fragments = make(tmp_path, sharded_family)
    before = store_fingerprint(store)
    assert_user_error(run_mp("-C", store, "add", path, "--name", "bad"), *fragments)
    assert store_fingerprint(store) == before


# ------------------------------------------------------------------------------ refs and repos

REF_ERRORS = [
    (["log", "nope"], ["unknown ref 'nope'"]),
    (["show", "nope"], ["unknown ref 'nope'"]),
    (["ls", "nope~2"], ["unknown ref"]),
    (["show", "base~1"], ["has no parent"]),
    (["show", "abcdef0123"], ["unknown ref 'abcdef0123'"]),
    (["diff", "base", "nope"], ["unknown ref 'nope'"]),
    (["checkout", "nope", "-o", "{out}"], ["unknown ref 'nope'"]),
    (["add", "{base}", "--name", "x", "--base", "nope"], ["unknown ref 'nope'"]),
    (["add", "{base}", "--name=..x"], ["invalid branch name", "'..x'", "'..'"]),
    (["add", "{base}", "--name=-x"], ["invalid branch name", "starts with '-'"]),
    (["add", "{base}", "--name=/x"], ["invalid branch name", "'/'"]),
    (["add", "{base}", "--name=a\x01b"], ["invalid branch name", "control character"]),
    (["add", "{base}", "--name=tags/v1"], ["invalid branch name", "reserved"]),
]


@pytest.mark.parametrize("args,fragments", REF_ERRORS, ids=[" ".join(a[:2]) + f"-{i}" for i, (a, _) in enumerate(REF_ERRORS)])
def test_bad_refs_are_refused(store, tmp_path, family, args, fragments):
    args = [a.format(out=tmp_path / "out", base=family["expert-1"]) for a in args]
    before = store_fingerprint(store)
    assert_user_error(run_mp("-C", store, *args), *fragments)
    assert store_fingerprint(store) == before
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args", [["log"], ["branch"], ["show", "base"], ["add", "{base}", "--name", "x"]])
def test_mp_outside_a_repository(tmp_path, family, args):
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    args = [a.format(base=family["base"]) for a in args]
    assert_user_error(run_mp(*args, cwd=cwd), "not an mpstore repository", "mp init")
    assert list(cwd.iterdir()) == []


def test_init_twice_is_refused(store):
    before = store_fingerprint(store)
    assert_user_error(run_mp("-C", store, "init"), "already exists")
    assert store_fingerprint(store) == before


@pytest.mark.parametrize("size", ["1000", "12", "banana", "1GiB"])
def test_init_with_a_bad_chunk_size(tmp_path, size):
    assert_user_error(run_mp("-C", tmp_path / "r", "init", "--chunk-size", size), repr(size) if size == "banana" else "chunk size")
    assert not (tmp_path / "r" / ".mp").exists()


def test_log_of_an_empty_repository(tmp_path):
    assert run_mp("-C", tmp_path, "init").returncode == 0
    before = store_fingerprint(tmp_path)
    assert_user_error(run_mp("-C", tmp_path, "log"), "no commits yet")
    assert store_fingerprint(tmp_path) == before


def test_checkout_into_a_non_empty_folder_without_force(store, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    before = store_fingerprint(store)
    assert_user_error(run_mp("-C", store, "checkout", "base", "-o", out), "not empty", "--force")
    assert tree_bytes(out) == {"mine.txt": b"keep me"}
    assert store_fingerprint(store) == before


def test_checkout_below_a_regular_file(store, tmp_path):
    """The target's parent folder cannot be made because a file has that name."""
    (tmp_path / "afile").write_text("a file")
    before = store_fingerprint(store)
    assert_user_error(run_mp("-C", store, "checkout", "base", "-o", tmp_path / "afile" / "out"), "afile")
    assert (tmp_path / "afile").read_text() == "a file"
    assert store_fingerprint(store) == before


def test_plot_into_a_missing_folder(store, tmp_path, family):
    with Repo.open(store) as repo:
        repo.add(family["expert-2"], "e2", base="base")
    before = store_fingerprint(store)
    assert_user_error(run_mp("-C", store, "diff", "base", "e2", "--plot", tmp_path / "no" / "such" / "d.png"), "d.png")
    assert store_fingerprint(store) == before
