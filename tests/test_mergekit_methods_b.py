"""multislerp, karcher, ram and ramplus_tl against MergeKit 0.1.5, bit for bit, in three dtypes.

A small generated family (qwen2-shaped, float32: base, a dense, a partial and a LoRA expert, and
a byte copy of the base for identical inputs) is merged by MergeKit and by mpstore with the same
YAML under `dtype: float32`, `bfloat16` and `float16`. All four methods are deterministic, and
mpstore does MergeKit's operations in MergeKit's order and dtypes, so every output tensor must be
bit-equal to MergeKit's, in a repository with 1 MiB chunks (every tensor one chunk) and in one
with 4 KiB chunks (ram streams the tensors in many blocks; the others read them whole across
chunks). MergeKit runs in its own virtualenv through tests/mergekit_driver.py (one process for
every config, through the helpers of tests/mergekit_oracle.py); without that virtualenv the
module is skipped unless CI is set.

The unit tests below need no oracle beyond what they state: bad parameters refused in one line,
identical inputs, antipodal multislerp inputs, and which of the methods a budget applies to.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml
from conftest import load_dir
from make_family import make_family
from mergekit_oracle import E1, E2, E3, B, config_doc, require_mergekit, running
from safetensors.torch import load_file, save_file

from mpstore import Repo
from mpstore.errors import BadMerge
from mpstore.merge.request import MergeRequest, from_yaml

require_mergekit(module=True)

FAMILY = {"arch": "qwen2", "hidden": 64, "layers": 8, "vocab": 128, "dtype": "f32", "experts": 3,
          "kinds": ("dense", "partial", "lora"), "seed": 7}
SAME = "base-copy"  # a byte copy of the base
DTYPES = ("float32", "bfloat16", "float16")
CHUNKS = {"chunk1m": 1 << 20, "chunk4k": 4096}
BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


@dataclass(frozen=True)
class Case:
    """One MergeKit config, run under every dtype of DTYPES."""

    method: str
    models: list  # [(model key, parameters or None)]
    base: str | None = B
    parameters: dict = field(default_factory=dict)
    out_dtype: str | None = None  # None: written in the compute dtype

    def doc(self, where: dict[str, str], dtype: str) -> dict:
        return config_doc(self.method, self.models, where, base=self.base, parameters=self.parameters,
                          dtype=dtype, out_dtype=self.out_dtype)


CASES = {
    # per-model weights as a scalar, a layer gradient and a filter falling through to the global one
    "multislerp": Case("multislerp", [(E1, {"weight": 0.5}), (E2, {"weight": [0.2, 0.8]}),
                                      (E3, {"weight": [{"filter": "mlp", "value": 0.7}]})],
                       parameters={"weight": 0.3}),
    "multislerp_nobase": Case("multislerp", [(E1, {"weight": 1.0}), (E3, {"weight": [3.0, 0.5]})], base=None,
                              parameters={"normalize_weights": False, "eps": [{"filter": "norm", "value": 1e-3},
                                                                              {"value": 1e-6}]}),
    "multislerp_identical": Case("multislerp", [(B, {"weight": 0.4}), (SAME, {"weight": 0.6})], base=None),
    "multislerp_single": Case("multislerp", [(E3, {"weight": 2.0})]),
    # the base is one more input, appended after the models
    "karcher": Case("karcher", [(E1, None), (E2, None), (E3, None)]),
    "karcher_params": Case("karcher", [(B, None), (E1, None), (E3, None)], base=None,
                           parameters={"max_iter": [{"filter": "mlp", "value": 2}, {"value": 25}],
                                       "tol": [1e-7, 1e-3]}),
    "karcher_identical": Case("karcher", [(B, None), (SAME, None)], base=None),
    "ram": Case("ram", [(E1, None), (E2, None), (E3, None)]),
    "ram_epsilon": Case("ram", [(E1, None), (E2, None), (E3, None), (SAME, None)],
                        parameters={"epsilon": [0.0, 1e-3]}),
    # ramplus_tl's lambda is float32: MergeKit's result is float32 whatever the compute dtype
    "ramplus_tl": Case("ramplus_tl", [(E1, None), (E2, None), (E3, None)], out_dtype="float32"),
    "ramplus_tl_params": Case("ramplus_tl", [(E2, None), (E1, None), (E3, None)], out_dtype="float32",
                              parameters={"r": 0.5, "alpha": [0.05, 0.9],
                                          "epsilon": [{"filter": "self_attn", "value": 1e-3}, {"value": 1e-6}]}),
}
RUNS = [(case, dtype) for case in CASES for dtype in DTYPES]


def _key(case: str, dtype: str) -> str:
    return f"{case}@{dtype}"


@dataclass
class Oracle:
    folders: dict[str, Path]  # model key -> folder
    mergekit: dict[str, Path]  # run key -> MergeKit's output
    mpstore: dict[tuple[str, str], Path]  # (chunk variant, run key) -> mpstore's checkout
    repos: dict[str, Repo]
    errors: dict[str, str | None]  # run key -> MergeKit's traceback, if it failed


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    root = tmp_path_factory.mktemp("mkb")
    folders = make_family(root / "family", **FAMILY)
    folders[SAME] = root / "family" / SAME
    shutil.copytree(folders[B], folders[SAME])
    (root / "cfg").mkdir()
    jobs, mp_yaml = [], {}
    for case, dtype in RUNS:
        key = _key(case, dtype)
        mk_yaml, mp_yaml[key] = root / "cfg" / f"{key}.mk.yml", root / "cfg" / f"{key}.mp.yml"
        mk_yaml.write_text(yaml.safe_dump(CASES[case].doc({k: str(v) for k, v in folders.items()}, dtype)))
        mp_yaml[key].write_text(yaml.safe_dump(CASES[case].doc({k: k for k in folders}, dtype)))
        jobs.append({"name": key, "config": str(mk_yaml), "out": str(root / "mk" / key), "seed": None})
    mp_out, repos = {}, {}
    with running(jobs, root) as driver:
        for variant, chunk in CHUNKS.items():  # mpstore meanwhile, in this process
            repos[variant] = repo = Repo.init(root / f"repo-{variant}", chunk_size=chunk)
            for key, path in folders.items():
                repo.add(path, key, base=None if key == B else B)
            for case, dtype in RUNS:
                key = _key(case, dtype)
                repo.merge(from_yaml(mp_yaml[key]), f"m-{key}".replace("@", "-"), threads=2)
                mp_out[variant, key] = root / "mp" / variant / key
                repo.checkout(f"m-{key}".replace("@", "-"), mp_out[variant, key])
        errors = {k: j["error"] for k, j in driver.finish()["jobs"].items()}
    yield Oracle(folders, driver.out, mp_out, repos, errors)
    for repo in repos.values():
        repo.close()


@pytest.mark.parametrize("variant", sorted(CHUNKS))
@pytest.mark.parametrize("case,dtype", RUNS)
def test_bit_equal_to_mergekit(oracle, variant, case, dtype):
    """Every element of every tensor has MergeKit's bits, in the dtype MergeKit writes."""
    key = _key(case, dtype)
    assert oracle.errors[key] is None, f"MergeKit failed on {key}:\n{oracle.errors[key]}"
    mk, mp = load_dir(oracle.mergekit[key]), load_dir(oracle.mpstore[variant, key])
    assert sorted(mk) == sorted(mp)
    want = getattr(torch, CASES[case].out_dtype or dtype)
    total = differ = 0
    bad = []
    for n in sorted(mk):
        a, b = mk[n], mp[n]
        assert a.dtype == b.dtype == want and a.shape == b.shape, (n, a.dtype, b.dtype)
        off = a.view(BITS[want]) != b.view(BITS[want])
        total, differ = total + off.numel(), differ + int(off.sum())
        if bool(off.any()):
            i = int(off.reshape(-1).nonzero()[0])
            bad.append(f"{n}: {int(off.sum())}/{off.numel()} differ (first at flat {i}: MergeKit "
                       f"{a.reshape(-1)[i].item()!r}, mpstore {b.reshape(-1)[i].item()!r})")
    print(f"\n[{variant} {key}] {total - differ}/{total} elements bit-equal")
    assert not bad, f"{key}: mpstore differs from MergeKit:\n  " + "\n  ".join(bad[:8])


def test_the_configs_exercise_what_they_claim(oracle):
    """The 4 KiB repository splits tensors over chunks, and the parameters matter: a config with
    non-default parameters gives another model than the defaults."""
    with oracle.repos["chunk4k"].store.read() as r:
        snap = r.snapshot_of(oracle.repos["chunk4k"].resolve(B))
        assert max(len(r.tensor(t).chunks) for t in snap.tensors.values()) >= 8
    for plain, tuned in (("karcher", "karcher_params"), ("ramplus_tl", "ramplus_tl_params"),
                         ("ram", "ram_epsilon")):
        a = load_dir(oracle.mpstore["chunk1m", _key(plain, "float32")])
        b = load_dir(oracle.mpstore["chunk1m", _key(tuned, "float32")])
        assert any(not torch.equal(a[n], b[n]) for n in a), (plain, tuned)


# ------------------------------------------------------------------------------ unit tests

def _merge(repo: Repo, method: str, models: list[str], base: str | None, p: list[dict] | None = None,
           g: dict | None = None, branch: str = "unit") -> dict[str, torch.Tensor]:
    """Merge in float32 through the real API, check the result out next to the repository and load it."""
    req = MergeRequest(method, base, models, p or [{} for _ in models], g or {}, "F32")
    repo.merge(req, branch, threads=2)
    out = repo.root.parent / f"{repo.root.name}-{branch}"
    repo.checkout(branch, out)
    return load_dir(out)


W = [{"weight": 1.0}, {"weight": 1.0}]
BAD = [  # method, per-model parameters, global parameters, what the one-line refusal says
    ("karcher", None, {"max_iter": 2.5}, "max_iter 2.5 on .* not a whole number"),
    ("karcher", None, {"max_iter": [{"filter": "mlp", "value": -1}]}, "max_iter -1 on .*mlp.* not a whole number"),
    ("karcher", None, {"tol": -1e-3}, "tol -0.001 on .* negative"),
    ("multislerp", W, {"eps": -1}, "eps -1 on .* negative"),
    ("multislerp", [{"weight": [0.2, 0.5]}, {"weight": -0.5}], {}, "weights on model.layers.7.* sum to zero"),
    ("multislerp", [{"weight": 1.0}, {}], {}, "needs parameter 'weight' for model 'expert-3'"),
    ("ram", None, {"epsilon": -1e-5}, "epsilon -1e-05 on .* must be >= 0"),
    ("ramplus_tl", None, {"epsilon": 0}, "epsilon 0 on .* must be > 0"),
    ("ramplus_tl", None, {"lambda": 1}, "ramplus_tl has no parameter 'lambda'"),
]


@pytest.mark.parametrize("method,p,g,message", BAD)
def test_bad_parameters_are_refused_in_one_line(oracle, method, p, g, message):
    repo = oracle.repos["chunk1m"]
    with pytest.raises(BadMerge, match=message) as err:
        _merge(repo, method, [E1, E3], B, p, g, branch="refused")
    assert "\n" not in str(err.value)
    assert "refused" not in repo.branches()


@pytest.mark.parametrize("method", ["multislerp", "ram", "ramplus_tl"])
def test_models_equal_to_the_base_merge_to_the_base(oracle, method):
    """Three models equal to the base (MergeKit's multislerp refuses this: the mean direction of
    three zero deltas is undefined; mpstore keeps the base, as for two)."""
    repo = oracle.repos["chunk4k"]
    for i in (1, 2):
        if f"same-{i}" not in repo.branches():
            repo.add(oracle.folders[B], f"same-{i}")
    p = [{"weight": 1.0}] * 3 if method == "multislerp" else None
    out = _merge(repo, method, [SAME, "same-1", "same-2"], B, p, branch=f"same-{method}")
    base = load_file(str(oracle.folders[B] / "model.safetensors"))
    assert sorted(out) == sorted(base)
    for n, t in base.items():
        assert torch.equal(out[n], t), n


def _antipodal_repo(root: Path) -> Repo:
    """A base of zeros and models +d, -d and 0 (deltas exact in float32), in a 4 KiB repository."""
    g = torch.Generator().manual_seed(5)
    d = {"w": torch.randn(40, 64, generator=g), "v": torch.randn(1500, generator=g)}
    repo = Repo.init(root / "repo", chunk_size=4096)
    for name, sign in (("zero", 0.0), ("plus", 1.0), ("minus", -1.0)):
        folder = root / name
        folder.mkdir()
        save_file({n: (t * sign).contiguous() for n, t in d.items()}, str(folder / "model.safetensors"))
        (folder / "config.json").write_text('{"model_type": "qwen2", "torch_dtype": "float32"}\n')
        repo.add(folder, name)
    return repo


def test_multislerp_of_antipodal_inputs(tmp_path):
    """Two antipodal deltas with equal weights: MergeKit falls back to a linear mix (zero delta
    here); with a third input the mean direction is undefined and the merge is refused."""
    repo = _antipodal_repo(tmp_path)
    two = _merge(repo, "multislerp", ["plus", "minus"], "zero", [{"weight": 1.0}] * 2, branch="two")
    assert all(bool((t == 0).all()) for t in two.values())
    with pytest.raises(BadMerge, match="weighted mean direction of the inputs is zero") as err:
        _merge(repo, "multislerp", ["plus", "minus", "zero"], None, [{"weight": 1.0}] * 3, branch="three")
    assert "\n" not in str(err.value) and "three" not in repo.branches()
    repo.close()


def test_karcher_of_one_input_is_that_input(tmp_path):
    repo = _antipodal_repo(tmp_path)
    out = _merge(repo, "karcher", ["plus"], None, branch="one")
    plus = load_file(str(tmp_path / "plus" / "model.safetensors"))
    assert all(torch.equal(out[n], plus[n]) for n in plus)
    repo.close()


def test_budgets_apply_only_to_the_ram_methods(oracle):
    """A budget leaves chunks of the deltas out: multislerp and karcher take whole models, so it
    is refused; ram and ramplus_tl merge deltas from a base, but not linearly, so there is no
    error bound."""
    repo = oracle.repos["chunk4k"]
    for method, p in (("multislerp", [{"weight": 1.0}] * 2), ("karcher", None)):
        req = MergeRequest(method, B, [E1, E3], p or [{}, {}], {}, "F32")
        with pytest.raises(BadMerge, match="--budget needs a method that merges deltas"):
            repo.plan(req, budget="50%")
    for method in ("ram", "ramplus_tl"):
        req = MergeRequest(method, B, [E1, E2, E3], [{}, {}, {}], {}, "F32")
        plan = repo.plan(req, budget="30%")
        assert plan.estimate is not None and plan.omit
        assert plan.estimate["bound"] is None and plan.estimate["bound_covers"].startswith("nothing")
        done = repo.merge(req, f"budget-{method}", threads=2, budget="30%")
        assert done.realized["chunks_omitted"] == plan.estimate["chunks_omitted"] > 0
