"""`diff` numbers checked against torch on the original files: relative L2, cosine, max |d|,
which tensors changed and in how many chunks, and the --json / --plot outputs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import run_mp
from safetensors.torch import load_file, save_file

from mpstore import Repo

REL = 1e-5
JSON_KEYS = {"name", "status", "changed_chunks", "total_chunks", "rel_l2", "cosine", "max_abs"}


def expected_stats(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """rel_l2, cosine and max |b - a| with values and the difference in float32 (as the docs
    say), accumulated in float64."""
    a32, b32 = a.reshape(-1).to(torch.float32), b.reshape(-1).to(torch.float32)
    d = (b32 - a32).double()
    a64, b64 = a32.double(), b32.double()
    rel = float(d.norm() / a64.norm())
    cos = float(a64.dot(b64) / (a64.norm() * b64.norm()))
    return rel, cos, float(d.abs().max())


def check_against_files(result, file_a, file_b):
    ta, tb = load_file(str(file_a)), load_file(str(file_b))
    by_name = {t.name: t for t in result.tensors}
    assert set(by_name) == set(ta) | set(tb)
    for name in ta.keys() & tb.keys():
        t = by_name[name]
        a, b = ta[name], tb[name]
        if torch.equal(a, b):
            assert (t.status, t.changed_chunks, t.rel_l2, t.cosine, t.max_abs) == ("unchanged", 0, 0.0, 1.0, 0.0), name
            continue
        assert t.status == "changed", name
        rel, cos, max_abs = expected_stats(a, b)
        assert t.rel_l2 == pytest.approx(rel, rel=REL), name
        assert t.cosine == pytest.approx(cos, rel=REL), name
        assert t.max_abs == pytest.approx(max_abs, rel=REL), name
    return by_name


@pytest.fixture
def family_repo(repo, family):
    for name, path in family.items():
        repo.add(path, name, base=None if name == "base" else "base")
    return repo


@pytest.mark.parametrize("expert", ["expert-1", "expert-2", "expert-3"])
def test_diff_numbers_match_torch(family_repo, family, expert):
    result = family_repo.diff("base", expert)
    by_name = check_against_files(result, family["base"] / "model.safetensors", family[expert] / "model.safetensors")
    counts = result.counts()
    assert counts["only_a"] == counts["only_b"] == 0
    if expert == "expert-1":  # dense: every tensor moved
        assert counts["unchanged"] == 0
    else:  # partial / lora: some tensors are bit-identical to the base
        assert counts["unchanged"] > 0 and counts["changed"] > 0
    sizes = {r.name: r.bytes for r in family_repo.ls(expert)}
    assert result.bytes_changed() == sum(sizes[n] for n, t in by_name.items() if t.status == "changed")
    # tensors come in natural order: layer 1 entries follow layer 0 entries
    names = [t.name for t in result.tensors]
    assert names.index("model.layers.1.mlp.up_proj.weight") > names.index("model.layers.0.self_attn.v_proj.weight")


def test_diff_of_a_commit_with_itself_is_all_unchanged(family_repo):
    result = family_repo.diff("expert-2", "expert-2")
    assert {t.status for t in result.tensors} == {"unchanged"}
    assert result.bytes_changed() == 0


def test_diff_is_antisymmetric_where_it_should_be(family_repo):
    ab = {t.name: t for t in family_repo.diff("base", "expert-3").tensors}
    ba = {t.name: t for t in family_repo.diff("expert-3", "base").tensors}
    for name, t in ab.items():
        assert ba[name].status == t.status
        if t.status == "changed":
            assert ba[name].max_abs == pytest.approx(t.max_abs, rel=REL)
            assert ba[name].cosine == pytest.approx(t.cosine, rel=REL)


DIFF_DTYPES = [torch.float64, torch.float16, torch.bfloat16, torch.int16, torch.uint8, torch.float8_e5m2]


@pytest.mark.parametrize("dtype", DIFF_DTYPES, ids=[str(d).removeprefix("torch.") for d in DIFF_DTYPES])
def test_diff_numbers_for_other_dtypes(repo, tmp_path, dtype):
    g = torch.Generator().manual_seed(11)
    base = torch.rand(40, 30, generator=g) * 50 + 1
    a = base.to(dtype)
    b = (base + torch.rand(40, 30, generator=g) * 3).to(dtype)
    assert not torch.equal(a, b)
    save_file({"w": a}, str(tmp_path / "a.safetensors"))
    save_file({"w": b}, str(tmp_path / "b.safetensors"))
    repo.add(tmp_path / "a.safetensors", "a")
    repo.add(tmp_path / "b.safetensors", "b")
    check_against_files(repo.diff("a", "b"), tmp_path / "a.safetensors", tmp_path / "b.safetensors")


def test_tensors_on_one_side_only(repo, tmp_path):
    g = torch.Generator().manual_seed(2)
    shared = torch.randn(8, 8, generator=g)
    save_file({"shared": shared, "gone": torch.randn(4, generator=g)}, str(tmp_path / "a.safetensors"))
    save_file({"shared": shared, "fresh": torch.randn(3, 5, generator=g)}, str(tmp_path / "b.safetensors"))
    repo.add(tmp_path / "a.safetensors", "a")
    repo.add(tmp_path / "b.safetensors", "b")
    result = repo.diff("a", "b")
    by_name = {t.name: t for t in result.tensors}
    assert {n: t.status for n, t in by_name.items()} == {"shared": "unchanged", "gone": "only_a", "fresh": "only_b"}
    assert by_name["fresh"].changed_bytes == 60
    assert by_name["gone"].rel_l2 is None and by_name["fresh"].cosine is None
    assert result.counts() == {"unchanged": 1, "changed": 0, "only_a": 1, "only_b": 1}
    assert result.bytes_changed() == 60
    flipped = {t.name: t.status for t in repo.diff("b", "a").tensors}
    assert flipped == {"shared": "unchanged", "gone": "only_b", "fresh": "only_a"}


def test_dtype_or_shape_changes_are_noted_without_numbers(repo, tmp_path):
    w = torch.arange(12, dtype=torch.float32)
    save_file({"dt": w, "shape": w.clone()}, str(tmp_path / "a.safetensors"))
    save_file({"dt": w.half(), "shape": w.reshape(3, 4).clone()}, str(tmp_path / "b.safetensors"))
    repo.add(tmp_path / "a.safetensors", "a")
    repo.add(tmp_path / "b.safetensors", "b")
    by_name = {t.name: t for t in repo.diff("a", "b").tensors}
    assert by_name["dt"].status == "changed" and by_name["dt"].note == "F32[12] -> F16[12]"
    assert by_name["shape"].note == "F32[12] -> F32[3, 4]"
    assert by_name["dt"].rel_l2 is None and by_name["shape"].max_abs is None


def test_changed_chunks_are_counted_per_chunk(tmp_path):
    """With 4 KiB chunks a 10240-element float32 tensor is 10 chunks; touch two of them."""
    with Repo.init(tmp_path / "repo", chunk_size=4096) as repo:
        g = torch.Generator().manual_seed(4)
        a = torch.randn(10240, generator=g)
        ragged_a = torch.randn(10_000, generator=g)  # 9 full chunks and one of 3136 bytes
        b = a.clone()
        b[2 * 1024 + 17] += 0.5  # chunk 2
        b[7 * 1024 + 1000] -= 2.0  # chunk 7
        ragged_b = ragged_a.clone()
        ragged_b[-1] = 123.0  # only the short last chunk
        save_file({"w": a, "r": ragged_a, "same": a[:100].clone()}, str(tmp_path / "a.safetensors"))
        save_file({"w": b, "r": ragged_b, "same": a[:100].clone()}, str(tmp_path / "b.safetensors"))
        repo.add(tmp_path / "a.safetensors", "a")
        repo.add(tmp_path / "b.safetensors", "b")
        result = repo.diff("a", "b")
        by_name = check_against_files(result, tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    w, r = by_name["w"], by_name["r"]
    assert (w.changed_chunks, w.total_chunks, w.changed_bytes) == (2, 10, 2 * 4096)
    assert w.max_abs == pytest.approx(2.0, rel=REL)
    assert (r.changed_chunks, r.total_chunks, r.changed_bytes) == (1, 10, 40000 - 9 * 4096)
    assert (by_name["same"].status, by_name["same"].total_chunks) == ("unchanged", 1)
    # the norm still covers the whole tensor, not just the changed chunks
    assert w.rel_l2 == pytest.approx(math.sqrt(0.5**2 + 2.0**2) / float(a.double().norm()), rel=REL)


def test_zero_base_tensor_has_no_relative_change(repo, tmp_path):
    save_file({"z": torch.zeros(6)}, str(tmp_path / "a.safetensors"))
    save_file({"z": torch.ones(6)}, str(tmp_path / "b.safetensors"))
    repo.add(tmp_path / "a.safetensors", "a")
    repo.add(tmp_path / "b.safetensors", "b")
    (t,) = repo.diff("a", "b").tensors
    assert t.status == "changed" and t.rel_l2 is None and t.cosine is None and t.max_abs == 1.0


# ------------------------------------------------------------------------------ through mp


@pytest.fixture
def cli_repo(tmp_path, family):
    root = tmp_path / "repo"
    with Repo.init(root) as r:
        r.add(family["base"], "base")
        r.add(family["expert-2"], "expert-2", base="base")
        api = r.diff("base", "expert-2").to_json()
    return root, api


def test_diff_json_through_the_cli(cli_repo, family):
    root, api = cli_repo
    proc = run_mp("-C", root, "diff", "base", "expert-2", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc == api
    assert isinstance(doc["tensors"], list) and doc["tensors"]
    for row in doc["tensors"]:
        assert JSON_KEYS <= set(row)
    statuses = [row["status"] for row in doc["tensors"]]
    assert doc["summary"]["changed"] == statuses.count("changed") > 0
    assert doc["summary"]["unchanged"] == statuses.count("unchanged") > 0
    ta = load_file(str(family["base"] / "model.safetensors"))
    tb = load_file(str(family["expert-2"] / "model.safetensors"))
    for row in doc["tensors"]:
        if row["status"] == "changed":
            rel, cos, max_abs = expected_stats(ta[row["name"]], tb[row["name"]])
            assert row["rel_l2"] == pytest.approx(rel, rel=REL)
            assert row["cosine"] == pytest.approx(cos, rel=REL)
            assert row["max_abs"] == pytest.approx(max_abs, rel=REL)


def test_diff_text_and_plot_through_the_cli(cli_repo, tmp_path):
    root, api = cli_repo
    png = tmp_path / "change.png"
    proc = run_mp("-C", root, "diff", "base", "expert-2", "--plot", png)
    assert proc.returncode == 0, proc.stderr
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width >= 300 and height >= 200
    # the text report: one line per changed tensor (unchanged ones hidden), then a summary
    lines = proc.stdout.splitlines()
    changed = [t["name"] for t in api["tensors"] if t["status"] == "changed"]
    assert [line.split()[1] for line in lines[:-1]] == changed
    assert all(line.startswith("changed ") and "chunks 1/1" in line for line in lines[:-1])
    total = len(api["tensors"])
    assert lines[-1].startswith(f"{len(changed)} of {total} tensors changed, 0 only in A, 0 only in B")


def test_diff_all_lists_unchanged_tensors_too(cli_repo):
    root, api = cli_repo
    proc = run_mp("-C", root, "diff", "base", "expert-2", "--all")
    lines = proc.stdout.splitlines()
    assert [line.split()[:2] for line in lines[:-1]] == [[t["status"], t["name"]] for t in api["tensors"]]
