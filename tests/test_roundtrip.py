"""add then checkout gives back the very same bytes: folders, shards, every dtype, big tensors,
with dedup of what the store already holds and a checkout that only ever writes its target."""

from __future__ import annotations

import json
import math
import random
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import leftovers, safetensors_bytes, tree_bytes
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mpstore import Repo
from mpstore.errors import BadInput, MpError, TargetExists
from mpstore.store.dtypes import ITEMSIZE
from mpstore.store.env import framed
from mpstore.store.ids import digest
from mpstore.store.objects import Blob, Commit, Snapshot
from mpstore.store.refs import BRANCH_PREFIX


def tensor_sizes(path) -> dict[str, int]:
    """name -> byte size of every tensor in a safetensors file, from its own header."""
    raw = open(path, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()}


def folder_size(folder) -> int:
    return sum(len(b) for b in tree_bytes(folder).values())


# ------------------------------------------------------------------------------ folders


def test_every_family_member_checks_out_byte_identical(repo, family, tmp_path):
    for name, src in family.items():
        repo.add(src, name)
    for name, src in family.items():
        out = tmp_path / "out" / name
        repo.checkout(name, out)
        original = tree_bytes(src)
        assert set(original) == {"README.md", "config.json", "generation_config.json", "model.safetensors"}
        assert tree_bytes(out) == original
        assert repo.show(name).to_json()["size"] == folder_size(src)


def test_sharded_family_with_index_round_trips(repo, sharded_family, tmp_path):
    src = sharded_family["base"]
    shards = sorted(p.name for p in src.glob("*.safetensors"))
    assert len(shards) >= 3, "the fixture should produce several shards"
    repo.add(src, "base")
    repo.add(sharded_family["expert-1"], "expert", base="base")
    for name, folder in (("base", src), ("expert", sharded_family["expert-1"])):
        out = tmp_path / name
        repo.checkout(name, out)
        assert tree_bytes(out) == tree_bytes(folder)
    info = repo.show("base").to_json()
    assert info["files"] == sorted(tree_bytes(src))
    assert "model.safetensors.index.json" in info["files"]
    # ls lists every tensor of every shard, each under the shard that holds it
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    assert {r.name: r.file for r in repo.ls("base")} == index


def test_nested_files_empty_files_and_binary_files_round_trip(repo, family, copy_model, tmp_path):
    src = copy_model(family["base"])
    (src / "tokenizer" / "deep").mkdir(parents=True)
    (src / "tokenizer" / "deep" / "vocab.bin").write_bytes(bytes(range(256)) * 3)
    (src / "tokenizer" / "empty.txt").write_bytes(b"")
    (src / ".hidden-notes").write_text("dotfiles are files too\n")
    # a .safetensors below the top level is not a weight file of this model: kept as a plain file
    save_file({"x": torch.arange(6, dtype=torch.int32)}, str(src / "tokenizer" / "aux.safetensors"))
    res = repo.add(src, "nested")
    out = tmp_path / "out"
    repo.checkout("nested", out)
    assert tree_bytes(out) == tree_bytes(src)
    assert (out / "tokenizer" / "empty.txt").stat().st_size == 0
    assert res.total_bytes == folder_size(src)
    assert [r.file for r in repo.ls("nested")] == ["model.safetensors"] * len(repo.ls("nested"))


def test_single_safetensors_file_added_directly(repo, family, tmp_path):
    src = family["expert-3"] / "model.safetensors"
    res = repo.add(src, "single")
    assert res.total_bytes == src.stat().st_size
    out = tmp_path / "out"
    repo.checkout("single", out)
    assert tree_bytes(out) == {"model.safetensors": src.read_bytes()}
    assert repo.show("single").to_json()["files"] == ["model.safetensors"]


def test_hand_written_header_with_odd_layout_is_kept_verbatim(repo, tmp_path):
    """Writers differ in key order, whitespace and padding; checkout must not normalise them."""
    a = torch.arange(5, dtype=torch.float32).numpy().tobytes()
    b = torch.arange(3, dtype=torch.int16).numpy().tobytes()
    header = (
        b'{ "b" : {"data_offsets":[20,26], "shape":[3], "dtype":"I16"},\n'
        b'  "__metadata__": {"who": "hand"},\n'
        b'  "a": {"shape": [5], "dtype": "F32", "data_offsets": [0, 20]} }   '
    )
    path = tmp_path / "odd.safetensors"
    path.write_bytes(safetensors_bytes(header, a + b))
    repo.add(path, "odd")
    out = tmp_path / "out"
    repo.checkout("odd", out)
    assert (out / "odd.safetensors").read_bytes() == path.read_bytes()
    assert [r.name for r in repo.ls("odd")] == ["a", "b"]  # file order, not header order


# ------------------------------------------------------------------------------ dtypes

ALL_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def one_of_each_dtype() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    out = {}
    for name, dt in ALL_DTYPES.items():
        if dt == torch.bool:
            t = torch.rand(7, 3, generator=g) > 0.5
        elif dt.is_floating_point:
            t = (torch.randn(7, 3, generator=g) * 4).to(dt)
        else:
            t = torch.randint(0, 100, (7, 3), generator=g).to(dt)
        out[f"t_{name}"] = t
    out["empty"] = torch.zeros(0, 5, dtype=torch.float32)
    out["scalar"] = torch.tensor(-2.5, dtype=torch.float64)
    return out


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def test_every_safetensors_dtype_round_trips(repo, tmp_path):
    tensors = one_of_each_dtype()
    path = tmp_path / "m" / "model.safetensors"
    path.parent.mkdir()
    save_file(tensors, str(path), metadata={"format": "pt", "note": "all dtypes"})
    repo.add(path.parent, "dtypes")
    out = tmp_path / "out"
    repo.checkout("dtypes", out)
    assert (out / "model.safetensors").read_bytes() == path.read_bytes()

    back = load_file(str(out / "model.safetensors"))
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape
        assert raw_bytes(back[name]) == raw_bytes(t)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt", "note": "all dtypes"}

    rows = {r.name: r.to_json() for r in repo.ls("dtypes")}
    for name, _dt in ALL_DTYPES.items():
        assert rows[f"t_{name}"]["dtype"] == name
        assert rows[f"t_{name}"]["shape"] == [7, 3]
        assert rows[f"t_{name}"]["bytes"] == 21 * tensors[f"t_{name}"].element_size()
    assert rows["empty"] == {"name": "empty", "dtype": "F32", "shape": [0, 5], "bytes": 0, "file": "model.safetensors"}
    assert rows["scalar"]["shape"] == [] and rows["scalar"]["bytes"] == 8
    info = repo.show("dtypes").to_json()
    assert info["parameters"] == sum(t.numel() for t in tensors.values())
    assert info["dtypes"]["F64"] == 21 + 1 and info["dtypes"]["F32"] == 21


# ------------------------------------------------------------------------------ chunking


def test_tensors_larger_than_the_chunk_size_are_cut_and_rebuilt(tmp_path):
    repo = Repo.init(tmp_path / "repo", chunk_size=4096)
    try:
        g = torch.Generator().manual_seed(0)
        tensors = {
            "exact": torch.randn(3 * 1024, generator=g),  # 12288 bytes: 3 full chunks
            "ragged": torch.randn(10_000, generator=g),  # 40000 bytes: 9 full + 3136
            "small": torch.randn(10, generator=g),  # 40 bytes: 1 chunk
            "half": torch.randn(5000, generator=g).half(),  # 10000 bytes: 3 chunks
        }
        path = tmp_path / "big.safetensors"
        save_file(tensors, str(path))
        res = repo.add(path, "big")
        assert res.new_bytes == path.stat().st_size - 8  # header and tensors, all new
        with repo.store.read() as r:
            snap = r.object(r.object(res.commit).snapshot)
            chunked = {n: r.object(i) for n, i in snap.tensors.items()}
            header = r.object(snap.shards[0].header)
        expect = {"exact": 3, "ragged": 10, "small": 1, "half": 3}
        assert {n: len(t.chunks) for n, t in chunked.items()} == expect
        assert chunked["ragged"].spans()[-1] == (9 * 4096, 40000)
        assert all(t.chunk_size == 4096 for t in chunked.values())
        assert header.size == path.stat().st_size - 8 - sum(t.size for t in chunked.values())
        out = tmp_path / "out"
        repo.checkout("big", out)
        assert (out / "big.safetensors").read_bytes() == path.read_bytes()
    finally:
        repo.close()


def test_a_header_larger_than_a_chunk_round_trips(tmp_path):
    repo = Repo.init(tmp_path / "repo", chunk_size=4096)
    try:
        tensors = {f"model.layers.{i}.a_rather_long_tensor_name.weight": torch.full((2,), float(i)) for i in range(120)}
        path = tmp_path / "many.safetensors"
        save_file(tensors, str(path))
        header_len = int.from_bytes(path.read_bytes()[:8], "little")
        assert header_len > 2 * 4096
        res = repo.add(path, "many")
        with repo.store.read() as r:
            snap = r.object(r.object(res.commit).snapshot)
            assert len(r.object(snap.shards[0].header).chunks) == math.ceil(header_len / 4096)
        repo.checkout("many", tmp_path / "out")
        assert (tmp_path / "out" / "many.safetensors").read_bytes() == path.read_bytes()
    finally:
        repo.close()


@pytest.mark.parametrize("size", [4095, 4100, 1000, 128 << 20])
def test_invalid_chunk_sizes_are_refused_before_anything_is_created(tmp_path, size):
    with pytest.raises(MpError, match="invalid chunk size"):
        Repo.init(tmp_path / "repo", chunk_size=size)
    assert not (tmp_path / "repo" / ".mp").exists()


# ------------------------------------------------------------------------------ dedup


def test_adding_identical_bytes_again_writes_no_new_chunks(repo, family):
    first = repo.add(family["base"], "base")
    assert first.new_bytes == first.total_bytes - 8  # every byte but the length prefix is new
    again = repo.add(family["base"], "base")
    assert again.new_bytes == 0
    assert again.commit != first.commit
    assert repo.show("base").to_json()["new_bytes"] == 0
    # the same folder under another branch name is free as well
    assert repo.add(family["base"], "copy").new_bytes == 0


def test_shared_tensors_of_partial_and_lora_experts_are_stored_once(repo, family):
    base_file = family["base"] / "model.safetensors"
    base_tensors = load_file(str(base_file))
    repo.add(family["base"], "base")
    for expert in ("expert-2", "expert-3"):  # partial, lora
        src = family[expert]
        res = repo.add(src, expert, base="base")
        tensors = load_file(str(src / "model.safetensors"))
        sizes = tensor_sizes(src / "model.safetensors")
        changed = [n for n, t in tensors.items() if not torch.equal(t, base_tensors[n])]
        assert 0 < len(changed) < len(tensors)
        # one 1 MiB chunk per tensor here, so exactly the changed tensors plus the README are new;
        # the header and config files are bit-identical to the base's
        readme = (src / "README.md").stat().st_size
        assert res.new_bytes == sum(sizes[n] for n in changed) + readme
        assert repo.show(expert).to_json()["new_bytes"] == res.new_bytes
        assert res.new_bytes < 0.7 * folder_size(src)


def test_dense_expert_shares_nothing_but_its_config(repo, family):
    repo.add(family["base"], "base")
    res = repo.add(family["expert-1"], "dense", base="base")
    sizes = tensor_sizes(family["expert-1"] / "model.safetensors")
    assert res.new_bytes == sum(sizes.values()) + (family["expert-1"] / "README.md").stat().st_size


# ------------------------------------------------------------------------------ checkout target


def test_checkout_refuses_a_non_empty_folder_without_force(repo, family, tmp_path):
    repo.add(family["base"], "base")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(TargetExists, match="not empty"):
        repo.checkout("base", out)
    assert tree_bytes(out) == {"keep.txt": b"mine"}
    assert leftovers(tmp_path) == []

    repo.checkout("base", out, force=True)
    assert tree_bytes(out) == tree_bytes(family["base"])
    assert leftovers(tmp_path) == []


def test_checkout_into_an_existing_empty_folder_or_a_new_nested_path(repo, family, tmp_path):
    repo.add(family["base"], "base")
    empty = tmp_path / "empty"
    empty.mkdir()
    repo.checkout("base", empty)
    assert tree_bytes(empty) == tree_bytes(family["base"])
    nested = tmp_path / "a" / "b" / "c"
    repo.checkout("base", nested)
    assert tree_bytes(nested) == tree_bytes(family["base"])
    assert leftovers(tmp_path) == [] and leftovers(tmp_path / "a" / "b") == []


def test_checkout_refuses_a_file_in_the_way_even_with_force(repo, family, tmp_path):
    repo.add(family["base"], "base")
    target = tmp_path / "file"
    target.write_text("not a folder")
    for force in (False, True):
        with pytest.raises(TargetExists, match="not a folder"):
            repo.checkout("base", target, force=force)
    assert target.read_text() == "not a folder"


def _commit_snapshot(repo: Repo, files: dict[str, bytes], branch: str) -> None:
    """Store a snapshot whose file names add would never accept, through the store's own API,
    as a snapshot from a damaged or hostile store would look."""

    def write(txn):
        blobs = {}
        for rel, data in files.items():
            key = digest(data)
            txn.put_chunk(key, framed(data))
            blobs[rel] = txn.put_object(Blob(len(data), repo.chunk_size, (key,)))
        snap = txn.put_object(Snapshot({}, blobs, ()))
        cid = txn.put_object(Commit(snap, (), "crafted", "t", "2026-01-01T00:00:00Z"))
        txn.set_ref_if_equals(BRANCH_PREFIX + branch, txn.ref(BRANCH_PREFIX + branch), cid, "test", "2026-01-01T00:00:00Z")

    repo.store.write(write)


@pytest.mark.parametrize("evil", ["../escape.txt", "sub/../../escape.txt", "ABS/escape.txt", "a\nb.txt"])
def test_checkout_never_writes_outside_its_target(repo, tmp_path, evil):
    evil = evil.replace("ABS", str(tmp_path))  # an absolute path
    _commit_snapshot(repo, {"ok.txt": b"fine", evil: b"escaped"}, "evil")
    area = tmp_path / "area"
    area.mkdir()
    before = tree_bytes(tmp_path / "area")
    with pytest.raises(BadInput):
        repo.checkout("evil", area / "out")
    assert not (area / "out").exists()
    assert tree_bytes(area) == before == {}
    assert not (tmp_path / "escape.txt").exists()
    assert leftovers(area) == []


def test_checkout_with_force_does_not_destroy_the_repository_itself(family, tmp_path):
    """`mp checkout base -o . --force` run in the repository's root must not delete `.mp/`."""
    root = tmp_path / "work"
    repo = Repo.init(root)
    try:
        cid = repo.add(family["base"], "base").commit
        with pytest.raises(TargetExists, match="holds the repository itself"):
            repo.checkout("base", root, force=True)
    finally:
        repo.close()
    with Repo.open(root) as again:
        assert again.resolve("base") == cid


# ------------------------------------------------------------------------------ property


@settings(max_examples=30, deadline=None)
@given(
    spec=st.lists(
        st.tuples(st.sampled_from(sorted(ITEMSIZE)), st.lists(st.integers(0, 24), max_size=3)),
        min_size=1, max_size=6,
    ),
    chunk_size=st.sampled_from([4096, 8192]),
    seed=st.integers(0, 2**32 - 1),
    pad=st.booleans(),
    metadata=st.one_of(st.none(), st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3)),
)
def test_any_valid_safetensors_file_round_trips(spec, chunk_size, seed, pad, metadata):
    """Hand-built files with arbitrary bytes (NaN patterns, odd bool bytes), sizes around the
    chunk size, zero-size tensors, scalars, optional metadata and optional header padding."""
    rnd = random.Random(seed)
    header, data, offset = {}, b"", 0
    for i, (dtype, shape) in enumerate(spec):
        n = math.prod(shape) * ITEMSIZE[dtype]
        header[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        data += rnd.randbytes(n)
        offset += n
    if metadata is not None:
        header["__metadata__"] = metadata
    raw = json.dumps(header, ensure_ascii=False).encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = tmp / "m.safetensors"
        path.write_bytes(safetensors_bytes(raw, data))
        with Repo.init(tmp / "repo", chunk_size=chunk_size) as repo:
            res = repo.add(path, "m")
            repo.checkout("m", tmp / "out")
            rows = repo.ls("m")
            with repo.store.read() as r:
                snap = r.object(r.object(res.commit).snapshot)
                chunks = {n: len(r.object(i).chunks) for n, i in snap.tensors.items()}
        assert (tmp / "out" / "m.safetensors").read_bytes() == path.read_bytes()
    assert [(r.name, r.dtype, r.shape) for r in rows] == [(f"t{i}", d, s) for i, (d, s) in enumerate(spec)]
    assert chunks == {f"t{i}": math.ceil(math.prod(s) * ITEMSIZE[d] / chunk_size) for i, (d, s) in enumerate(spec)}
