"""The fused kernels (mpstore/merge/methods/kernels.py) give the eager path's bytes, bit for bit.

Every task-arithmetic method merges the same real store twice, kernels off and on, and the
snapshots must be the same object. The family is built to stress what a fused pass could get
wrong: deltas quantised to a few magnitudes (many entries tied at every top-k and breadcrumbs
cut, ties straddling chunk boundaries), 4 KiB chunks (many blocks, a tail of odd width in each
tensor), 17 experts (torch's 16-row summation level), negative weights, an Inf and a NaN delta,
bfloat16 and float32 stored inputs, a tensor narrower than the kernels take.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mpstore import Repo
from mpstore.merge.methods import kernels
from mpstore.merge.request import MergeRequest

CHUNK = 4096
SHAPES = {"a.weight": (37, 53), "b.weight": (1000,), "c.weight": (300, 41), "tiny.weight": (7,)}


def test_the_kernels_are_on_here() -> None:
    """The machine CI runs on must use them, or every comparison below compares eager to eager."""
    assert kernels.available()


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 7, 8, 13, 16, 17, 33, 64])
def test_column_sums_are_torchs(k: int) -> None:
    rng = np.random.default_rng(k)
    for n in (32, 33, 63, 64 + 31, 4096 + 17):
        x = (rng.standard_normal((k, n)) * np.exp(rng.standard_normal((k, n)) * 4)).astype(np.float32)
        x[:, :3] = -0.0
        want = torch.from_numpy(x).sum(dim=0).numpy()
        got = kernels.column_sums(x, kernels.width())
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), (k, n)


@pytest.mark.parametrize("k", [1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 31, 40, 100])
def test_row_sums_are_torchs(k: int) -> None:
    """A [k, 1] tensor summed over its rows (the weights' divisor) as torch sums it."""
    rng = np.random.default_rng(k)
    lanes = kernels.sum_lanes()
    assert lanes is not None
    for _ in range(50):
        x = (rng.standard_normal(k) * np.exp(rng.standard_normal(k) * 4)).astype(np.float32)
        want = torch.from_numpy(x.reshape(-1, 1)).sum(dim=0).numpy()
        got = np.array([kernels.vector_sum(x, lanes)], np.float32)
        assert got.view(np.uint32)[0] == want.view(np.uint32)[0], k


def test_bfloat16_rounding_is_torchs() -> None:
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(1 << 16) * np.exp(rng.standard_normal(1 << 16) * 20)).astype(np.float32)
    edges = np.array([0.0, -0.0, np.inf, -np.inf, 3.4028235e38, -3.4028235e38, 1e-45, -1e-45, 1.0039062,
                      1.0117188, 65504.0], np.float32)
    x = np.concatenate([x, edges, x.view(np.uint32).__or__(np.uint32(0x8000)).view(np.float32)])  # ties
    want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    got = kernels.to_bfloat16(x)
    assert got is not None and np.array_equal(got, want)
    x[5] = np.nan
    assert kernels.to_bfloat16(x) is None  # NaN: converted by torch, whose paths differ on it


def test_the_calibration_is_kept_and_read_back(tmp_path) -> None:
    """A fresh process finds the split in the cache and merges without importing torch."""
    code = """
import json, sys
from mpstore.merge.methods import kernels
print(json.dumps([kernels._calibration(), "torch" in sys.modules]))
"""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    runs = [json.loads(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                      check=True).stdout) for _ in range(2)]
    assert runs[0][0] == runs[1][0] == [kernels.width(), kernels.sum_lanes()]
    assert runs[0][1] and not runs[1][1]  # measured against torch once, then read
    assert (tmp_path / "mpstore" / "kernel-width.json").exists()


def test_a_fused_merge_never_imports_torch(tmp_path, monkeypatch) -> None:
    """task_arithmetic over bf16 inputs in float32 with bf16 out runs in the kernels alone (blocks
    of at least kernels.MIN_COLUMNS elements; a narrower one would load torch for itself)."""
    g = torch.Generator().manual_seed(7)
    base = {"w": torch.randn(64, 48, generator=g), "v": torch.randn(5000, generator=g)}
    repo = Repo.init(tmp_path / "repo", chunk_size=CHUNK)
    for k, name in enumerate(("base", "e1", "e3")):
        folder = tmp_path / name
        folder.mkdir()
        save_file({n: (t + k * 2.0 ** -5 * torch.randn(t.shape, generator=g)).to(torch.bfloat16)
                   for n, t in base.items()}, str(folder / "model.safetensors"))
        repo.add(folder, name, base="base" if k else None)
    repo.close()
    code = """
import sys
from mpstore import Repo
from mpstore.merge.request import MergeRequest
with Repo.open(sys.argv[1]) as repo:
    r = MergeRequest("task_arithmetic", "base", ["e1", "e3"], [{"weight": 0.3}, {"weight": 0.6}], {}, "F32", "BF16")
    repo.merge(r, "m")
    print(repo.commit("m").commit.snapshot.hex(), "torch" in sys.modules)
"""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    kernels._calibration.cache_clear()
    kernels._calibration()  # measured here, with torch, and kept where the merge process looks
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "repo")], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[1] == "False"
    monkeypatch.setattr(kernels, "ENABLED", False)  # the eager path, in torch, gives the same snapshot
    with Repo.open(tmp_path / "repo") as repo:
        eager = MergeRequest("task_arithmetic", "base", ["e1", "e3"], [{"weight": 0.3}, {"weight": 0.6}], {},
                             "F32", "BF16")
        repo.merge(eager, "m2")
        assert repo.commit("m2").commit.snapshot.hex() == out[0]


def _family(root: Path, dtype: torch.dtype, experts: int) -> dict[str, Path]:
    g = torch.Generator().manual_seed(1129)
    base = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
    folders = {}
    for k in range(experts + 1):
        tensors = {}
        for n, s in SHAPES.items():
            d = torch.zeros(s) if k == 0 else torch.randint(-3, 4, s, generator=g).float() * 2.0 ** -6
            if k == 2 and n == "c.weight":
                d.view(-1)[5], d.view(-1)[900] = float("inf"), float("nan")
            tensors[n] = (base[n] + d).to(dtype)
        folder = root / f"{dtype}".split(".")[-1] / (f"e{k}" if k else "base")
        folder.mkdir(parents=True)
        save_file(tensors, str(folder / "model.safetensors"))
        folders[folder.name] = folder
    return folders


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Repo]:
    root = tmp_path_factory.mktemp("kernels")
    out = {}
    for dtype, experts in ((torch.bfloat16, 17), (torch.float32, 5)):
        repo = Repo.init(root / f"repo-{dtype}".replace("torch.", ""), chunk_size=CHUNK)
        for name, folder in _family(root, dtype, experts).items():
            repo.add(folder, name, base=None if name == "base" else "base")
        out[str(dtype).split(".")[-1]] = repo
    yield out
    for repo in out.values():
        repo.close()


METHODS = [
    ("task_arithmetic", {}, {}),
    ("task_arithmetic", {}, {"normalize": True, "lambda": 0.7}),
    ("ties", {"density": 0.5}, {}),
    ("ties", {"density": 0.3}, {"normalize": False, "lambda": 1.3}),
    ("dare_ties", {"density": 0.6}, {}),
    ("dare_linear", {"density": 0.4}, {"rescale": False}),
    ("breadcrumbs", {"density": 0.5, "gamma": 0.1}, {}),
    ("breadcrumbs_ties", {"density": 0.4, "gamma": 0.2}, {"rescale": True}),
    ("della", {"density": 0.5, "epsilon": 0.1}, {}),
    ("della_linear", {"density": 0.4, "epsilon": 0.2}, {"lambda": 0.9}),
]
count = itertools.count()


def _merge(repo: Repo, experts: int, method: str, p: dict, g: dict, mixed: bool) -> bytes:
    params = []
    for i in range(experts):
        q = dict(p, weight=(-0.3 if i % 4 == 3 else 0.2 + 0.05 * i))
        if mixed and i % 3 == 1:
            q["density"] = 1.0  # an input left whole beside sparsified ones
        params.append(q)
    req = MergeRequest(method, "base", [f"e{i + 1}" for i in range(experts)], params, g, "F32", None, 7)
    return repo.commit(repo.merge(req, f"m{next(count)}").commit.hex()).commit.snapshot


@pytest.mark.parametrize("method,p,g", METHODS, ids=[f"{m}-{i}" for i, (m, _, _) in enumerate(METHODS)])
@pytest.mark.parametrize("stored", ["bfloat16", "float32"])
def test_fused_merge_is_the_eager_merge(stores, monkeypatch, method: str, p: dict, g: dict, stored: str) -> None:
    repo = stores[stored]
    experts = 17 if stored == "bfloat16" else 5
    calls = []
    combine = kernels.combine

    def counted(*args, **kw):
        calls.append(1)
        return combine(*args, **kw)

    for mixed in (False, True):
        monkeypatch.setattr(kernels, "ENABLED", False)
        eager = _merge(repo, experts, method, p, g, mixed)
        monkeypatch.setattr(kernels, "ENABLED", True)
        monkeypatch.setattr(kernels, "combine", counted)
        fused = _merge(repo, experts, method, p, g, mixed)
        monkeypatch.setattr(kernels, "combine", combine)
        assert fused == eager, (method, mixed)
    assert calls, "the fused path was never taken"
