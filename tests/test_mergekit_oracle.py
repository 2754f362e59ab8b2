"""Differential test of the merge engine against MergeKit 0.1.5, the reference users expect.

Small generated families (qwen2-shaped, float32: base + a dense, a partial and a LoRA expert)
are merged by both tools with the same MergeKit YAML (MergeKit gets folder paths, mpstore gets
the refs of the same folders after `mp add`), computing in float32 (`dtype: float32`). mpstore
runs in a repository with the default 1 MiB chunks and in one with 4 KiB chunks, where its
streaming executor splits tensors into many blocks. Then:

- deterministic methods, written as bfloat16: per tensor at least 99.9% of the elements
  bit-equal and every other element within one bf16 ulp of MergeKit's value, except where a
  difference is explained by a documented deviation (top-k / breadcrumbs ties at the threshold:
  both keep exactly the spec's count, mpstore the first tied entries in index order, MergeKit
  an arbitrary subset of them);
- the same configs written as float32: every element within a few float32 ulps of its largest
  operand, which also sees errors in merged deltas far below a bf16 ulp of the weight;
- random methods (written as float32, see RANDOM): the random streams differ by design, so the
  two outputs are compared statistically, and the parts that do not depend on the stream are
  checked exactly (the L1-matching rescale; density 1 = the deterministic method);
- on bf16 checkpoints (whose deltas tie a lot), ties and breadcrumbs keep exactly the number of
  entries the spec gives (density * n), in MergeKit and in mpstore;
- config.json of both names the output dtype.

MergeKit lives in its own virtualenv, `.venv-mergekit` (`make mergekit-venv`), and runs as a
subprocess (tests/mergekit_driver.py, one process for every config, run through the helpers of
tests/mergekit_oracle.py); mpstore never imports it. Without that venv the module is skipped,
unless CI is set: then every test fails.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml
from conftest import load_dir, run_mp
from make_family import make_family
from mergekit_oracle import E1, E2, E3, MERGEKIT_VERSION, B, config_doc, param, require_mergekit, running, ulp_distance

from mpstore import Repo
from mpstore.merge.request import from_yaml

require_mergekit(module=True)

FAMILIES = {
    "main": {"arch": "qwen2", "hidden": 128, "layers": 3, "vocab": 512, "dtype": "f32", "experts": 3,
                 "kinds": ("dense", "partial", "lora"), "seed": 0},
    # 1-D tensors of 1088 float32 (4352 bytes) span two chunks of a 4 KiB-chunk repository
    "wide": {"arch": "qwen2", "hidden": 1088, "layers": 1, "intermediate": 64, "vocab": 64, "dtype": "f32", "experts": 3,
                 "kinds": ("dense", "partial", "lora"), "seed": 1},
    # bf16 checkpoints, the usual case: their deltas take few distinct values, so many entries tie
    # with a top-k / breadcrumbs cut-off
    "bf16": {"arch": "qwen2", "hidden": 128, "layers": 1, "vocab": 256, "dtype": "bf16", "experts": 2,
                 "kinds": ("dense", "lora"), "seed": 2},
}
# mpstore streams each tensor in blocks of one chunk: the default chunk holds every tensor of these
# families whole, 4 KiB splits all but the smallest, so the multi-block passes (top-k thresholds,
# L1 sums, Gram matrices) and the row-local blocking run too. Both must give MergeKit's result.
CHUNKS = {"chunk1m": 1 << 20, "chunk4k": 4096}

# ------------------------------------------------------------------------------ the configs
# Each exercises per-model weights, and most of: densities < 1, layer gradients (3 layers:
# positions 0, 0.5, 1), {filter, value} lists with fall-through to the global level, normalize
# true/false, lambda != 1, rescale, negative weights. Densities keep floor(density*n) >= 1 on
# every tensor (the smallest has 64 elements) so mpstore's documented breadcrumbs deviation
# (it keeps max(1, floor(density*n))) never triggers.


@dataclass
class Cfg:
    method: str
    models: list  # [(model key, parameters or None)]
    base: str | None = B
    parameters: dict = field(default_factory=dict)
    out_dtype: str = "bfloat16"
    seed: int | None = None
    family: str = "main"

    def doc(self, where: dict[str, str]) -> dict:
        return config_doc(self.method, self.models, where, base=self.base, parameters=self.parameters,
                          dtype="float32", out_dtype=self.out_dtype)


MLP_OR_ATTN = [{"filter": "mlp", "value": 0.4}, {"filter": "self_attn", "value": [0.1, 0.3]}]

DETERMINISTIC: dict[str, Cfg] = {
    # the base is an ordinary input of linear; E3's filters fall through to the global weight
    "linear": Cfg("linear", [(E1, {"weight": 0.5}), (E2, {"weight": [0.2, 0.6]}),
                             (E3, {"weight": MLP_OR_ATTN}), (B, {"weight": 0.3})],
                  base=None, parameters={"weight": 0.25}),
    "linear_raw": Cfg("linear", [(B, {"weight": 1.0}), (E1, {"weight": 0.3}), (E3, {"weight": -0.3})],
                      base=None, parameters={"normalize": False}),
    "task_arithmetic": Cfg("task_arithmetic",
                           [(E1, {"weight": 0.7}), (E2, {"weight": -0.4}), (E3, {"weight": [0.5, 1.0]})],
                           parameters={"lambda": 1.3}),
    "task_arithmetic_norm": Cfg("task_arithmetic",
                                [(E1, {"weight": 0.6}), (E2, {"weight": 0.3}), (E3, {"weight": MLP_OR_ATTN})],
                                parameters={"weight": 0.2, "normalize": True, "lambda": 0.8}),
    "ties": Cfg("ties", [(E1, {"weight": 0.6, "density": [0.3, 0.7]}),
                         (E2, {"weight": 0.5, "density": 0.5}),
                         (E3, {"weight": [{"filter": "self_attn", "value": 0.8}],
                               "density": [{"filter": "q_proj", "value": 0.2}, {"filter": "", "value": 0.6}]})],
                parameters={"weight": 0.4}),
    "ties_rescale": Cfg("ties", [(E1, {"weight": 0.7, "density": 0.4}),
                                 (E2, {"weight": -0.5, "density": [0.6, 0.3]}),
                                 (E3, {"weight": 0.5, "density": 0.5})],
                        parameters={"normalize": False, "rescale": True, "lambda": 0.9}),
    "breadcrumbs": Cfg("breadcrumbs", [(E1, {"weight": 0.5, "density": 0.6, "gamma": 0.05}),
                                       (E2, {"weight": 0.7, "density": [0.4, 0.8]}),
                                       (E3, {"weight": 0.4, "density": 0.5,
                                             "gamma": [{"filter": "mlp", "value": 0.1}]})],
                       parameters={"lambda": 1.1}),
    "breadcrumbs_ties": Cfg("breadcrumbs_ties", [(E1, {"weight": 0.6, "density": [0.5, 0.8], "gamma": 0.02}),
                                                 (E2, {"weight": 0.5, "density": 0.6}),
                                                 (E3, {"weight": 0.8, "density": 0.7, "gamma": 0.1})],
                            parameters={"normalize": True, "rescale": True}),
    "slerp": Cfg("slerp", [(E1, None)], parameters={
        "t": [{"filter": "self_attn", "value": [0.2, 0.9]}, {"filter": "mlp", "value": 0.7}, {"value": 0.4}]}),
    "slerp_gradient": Cfg("slerp", [(B, None), (E3, None)], parameters={"t": [0, 0.5, 1]}),
    "nuslerp": Cfg("nuslerp", [(E1, {"weight": 0.3}), (E3, {"weight": 0.7})]),
    "nuslerp_rows": Cfg("nuslerp", [(E1, {"weight": [0.2, 0.8]}), (E2, {"weight": 0.5})],
                        parameters={"nuslerp_flatten": False}),
    "nuslerp_columns": Cfg("nuslerp", [(E1, {"weight": 0.4}), (E2, {"weight": 0.6})],
                           parameters={"nuslerp_flatten": False, "nuslerp_row_wise": True}),
    "nuslerp_nobase": Cfg("nuslerp", [(E1, {"weight": 1.0}), (E2, {"weight": 2.0})], base=None),
    "model_stock": Cfg("model_stock", [(E1, None), (E2, None), (E3, None)]),
    "model_stock_filter_wise": Cfg("model_stock", [(E1, None), (E2, None), (E3, None)],
                                   parameters={"filter_wise": True}),
    # density 1: no mask is drawn, so the random methods are deterministic and must match
    # (dare_linear = task_arithmetic, della = ties without sparsification)
    "dare_linear_density1": Cfg("dare_linear", [(E1, {"weight": 0.5}), (E2, {"weight": 0.3}),
                                                (E3, {"weight": [0.2, 0.6]})],
                                parameters={"density": 1.0, "lambda": 0.7}, seed=5),
    "della_density1": Cfg("della", [(E1, {"weight": 0.5}), (E2, {"weight": -0.3}), (E3, {"weight": 0.6})],
                          parameters={"density": 1.0}, seed=5),
}

# Row-local methods on 1-D tensors longer than a chunk (one line per tensor in MergeKit)
DETERMINISTIC.update({
    "wide_model_stock_filter_wise": Cfg("model_stock", [(E1, None), (E2, None), (E3, None)],
                                        parameters={"filter_wise": True}, family="wide"),
    "wide_nuslerp_rows": Cfg("nuslerp", [(E1, {"weight": 0.4}), (E2, {"weight": 0.6})],
                             parameters={"nuslerp_flatten": False}, family="wide"),
})

# How many entries the magnitude sparsifiers keep, on bf16 inputs
# (test_magnitude_sparsifiers_keep_the_specified_count)
KEEP = {
    "bf16_ties": Cfg("ties", [(E1, {"weight": 1.0, "density": 0.5}), (E2, {"weight": 1.0, "density": 0.5})],
                     out_dtype="float32", family="bf16"),
    "bf16_breadcrumbs": Cfg("breadcrumbs", [(E1, {"weight": 1.0, "density": 0.5, "gamma": 0.05}),
                                            (E2, {"weight": 1.0, "density": 0.5, "gamma": 0.05})],
                            out_dtype="float32", family="bf16"),
}

# Written as float32: the kept/dropped pattern and the L1 mass of the merged delta are then
# visible exactly (in bf16 most small deltas would round back to the base).
RANDOM: dict[str, Cfg] = {
    "dare_linear": Cfg("dare_linear", [(E1, {"weight": 0.5, "density": [0.3, 0.7]}),
                                       (E2, {"weight": 0.3, "density": 0.5}),
                                       (E3, {"weight": 0.6, "density": 0.4})],
                       out_dtype="float32", seed=11),
    "dare_ties": Cfg("dare_ties", [(E1, {"weight": 0.6, "density": 0.5}),
                                   (E2, {"weight": -0.4, "density": [{"filter": "mlp", "value": 0.3}]}),
                                   (E3, {"weight": 0.5, "density": 0.7})],
                     parameters={"density": 0.6, "lambda": 1.2}, out_dtype="float32", seed=12),
    "della": Cfg("della", [(E1, {"weight": 0.5, "density": 0.5, "epsilon": 0.2}),
                           (E2, {"weight": 0.4, "density": 0.6}),
                           (E3, {"weight": 0.7, "density": [0.4, 0.7], "epsilon": 0.1})],
                 out_dtype="float32", seed=13),
    "della_linear": Cfg("della_linear", [(E1, {"weight": 0.8, "density": 0.4, "epsilon": 0.3}),
                                         (E2, {"weight": 0.3, "density": 0.5}),
                                         (E3, {"weight": 0.5, "density": 0.6})],
                        parameters={"rescale": False, "lambda": 0.9}, out_dtype="float32", seed=14),
}

# The deterministic configs again, written as float32: bf16 rounding hides any error in a merged
# delta smaller than ~2^-9 of the base value; in float32 the deltas themselves can be compared.
F32 = {f"{name}@f32": Cfg(**{**cfg.__dict__, "out_dtype": "float32"}) for name, cfg in DETERMINISTIC.items()}

CONFIGS = {**DETERMINISTIC, **F32, **RANDOM, **KEEP}
# What mpstore runs in which repository (MergeKit runs every config once). The bf16 comparison
# runs on the default chunk size; the more sensitive float32 one and the random methods on both.
RUNS = {"chunk1m": sorted(CONFIGS), "chunk4k": sorted([*F32, *RANDOM, *KEEP])}
ALL_RUNS = [(v, n) for v, names in RUNS.items() for n in names]
CASES = {"bf16": [(v, n) for v, n in ALL_RUNS if n in DETERMINISTIC],
         "f32": [(v, n) for v, n in ALL_RUNS if n in F32],
         "random": [(v, n) for v, n in ALL_RUNS if n in RANDOM],
         "keep": [(v, n) for v, n in ALL_RUNS if n in KEEP],
         "all": ALL_RUNS}
SPARSIFIER = {"ties": "topk", "breadcrumbs": "crumbs", "breadcrumbs_ties": "crumbs",
              "dare_linear": "dare", "dare_ties": "dare", "della": "della", "della_linear": "della"}
CONSENSUS = {"ties", "dare_ties", "breadcrumbs_ties", "della"}
DEFAULTS = {  # (normalize, rescale) per task-arithmetic method, docs/merge_methods.md §2
    "dare_linear": (False, True), "dare_ties": (False, True),
    "della": (True, True), "della_linear": (False, True),
}


# ------------------------------------------------------------------------------ running both


@dataclass
class Oracle:
    family: dict[str, dict[str, Path]]  # family -> model key -> folder
    mergekit: dict[str, Path]  # config name -> MergeKit's output folder
    mpstore: dict[tuple[str, str], Path]  # (chunk variant, config name) -> mpstore's checkout
    repos: dict[str, Path]  # chunk variant -> repository
    yaml_mp: dict[str, Path]
    info: dict
    timing: dict


def _ref(family: str, key: str) -> str:
    return f"{family}-{key}"  # `mp add` puts each folder on a branch of this name


@pytest.fixture(scope="module")
def oracle(tmp_path_factory) -> Oracle:
    t0 = time.perf_counter()
    root = tmp_path_factory.mktemp("mkoracle")
    families = {f: make_family(root / f, **spec) for f, spec in FAMILIES.items()}
    (root / "cfg").mkdir()
    jobs, yaml_mp = [], {}
    for name, cfg in CONFIGS.items():
        fam = families[cfg.family]
        mk_yaml, mp_yaml = root / "cfg" / f"{name}.mergekit.yml", root / "cfg" / f"{name}.mpstore.yml"
        mk_yaml.write_text(yaml.safe_dump(cfg.doc({k: str(v) for k, v in fam.items()}), sort_keys=False))
        mp_yaml.write_text(yaml.safe_dump(cfg.doc({k: _ref(cfg.family, k) for k in fam}), sort_keys=False))
        yaml_mp[name] = mp_yaml
        jobs.append({"name": name, "config": str(mk_yaml), "out": str(root / "mk" / name), "seed": cfg.seed})
    t1 = time.perf_counter()
    mp_out, repos = {}, {}
    with running(jobs, root) as driver:
        # mpstore meanwhile, in this process: the same YAML with refs instead of paths
        for variant, chunk in CHUNKS.items():
            repos[variant] = root / f"repo-{variant}"
            with Repo.init(repos[variant], chunk_size=chunk) as repo:
                for f, fam in families.items():
                    for key, path in fam.items():
                        repo.add(path, _ref(f, key), base=None if key == B else _ref(f, B))
                for name in RUNS[variant]:
                    cfg = CONFIGS[name]
                    request = from_yaml(yaml_mp[name])
                    request.seed = cfg.seed or 0
                    repo.merge(request, f"m-{name}", threads=2)
                    mp_out[variant, name] = root / "mp" / variant / name
                    repo.checkout(f"m-{name}", mp_out[variant, name])
        t2 = time.perf_counter()
        info = driver.finish()
    t3 = time.perf_counter()
    timing = {"setup": t1 - t0, "mpstore": t2 - t1, "mergekit": t3 - t1,
              "mergekit_jobs": sum(j["seconds"] for j in info["jobs"].values())}
    print(f"\n[mergekit oracle] families+yaml {timing['setup']:.1f}s; mpstore add+merge+checkout of "
          f"{sum(map(len, RUNS.values()))} merges in {len(RUNS)} repositories {timing['mpstore']:.1f}s; MergeKit, "
          f"concurrently, {timing['mergekit']:.1f}s of which merging {timing['mergekit_jobs']:.1f}s")
    return Oracle(families, driver.out, mp_out, repos, yaml_mp, info, timing)


def _mk_ok(oracle: Oracle, name: str) -> None:
    job = oracle.info["jobs"][name]
    assert job["error"] is None, f"MergeKit failed on {name}:\n{job['error']}"


def _both(oracle: Oracle, variant: str, name: str) -> tuple[dict, dict]:
    _mk_ok(oracle, name)
    mk, mp = load_dir(oracle.mergekit[name]), load_dir(oracle.mpstore[variant, name])
    assert sorted(mk) == sorted(mp), (f"tensor names differ: only MergeKit {sorted(set(mk) - set(mp))}, "
                                      f"only mpstore {sorted(set(mp) - set(mk))}")
    want = getattr(torch, CONFIGS[name].out_dtype)
    for n in mk:
        assert mk[n].shape == mp[n].shape, n
        assert mk[n].dtype == mp[n].dtype == want, (n, mk[n].dtype, mp[n].dtype)
    return mk, mp


# ------------------------------------------------------------------------------ helpers


def model_param(cfg: Cfg, params: dict | None, key: str, name: str, default):
    """A per-model parameter (model level, then global) for tensor `name` as a float, else `default`."""
    v = param((params, cfg.parameters), key, name, FAMILIES[cfg.family]["layers"])
    return default if v is None else float(v)


def global_param(cfg: Cfg, key: str, name: str, default):
    return param((cfg.parameters,), key, name, FAMILIES[cfg.family]["layers"], default)


def _non_base(cfg: Cfg) -> list:
    return [(m, p) for m, p in cfg.models if m != cfg.base]


def threshold_ties(cfg: Cfg, name: str, inputs: dict) -> torch.Tensor:
    """Elements whose |delta| for some model equals a top-k / breadcrumbs cut-off value shared
    by several elements: which of those tied entries are kept is arbitrary in MergeKit (an
    unstable sort), while mpstore keeps all of them (documented in mpstore/methods.py)."""
    base = inputs[cfg.base][name].float()
    explained = torch.zeros(base.numel(), dtype=torch.bool)
    kind = SPARSIFIER[cfg.method]
    for m, params in _non_base(cfg):
        density = model_param(cfg, params, "density", name, 1.0)
        if density >= 1:
            continue
        a = (inputs[m][name].float() - base).abs().reshape(-1)
        n = a.numel()
        asc = torch.sort(a).values
        if kind == "topk":
            k = max(1, math.floor(density * n))
            cuts = [asc[n - k]]
        else:
            keep = math.floor(density * n)
            assert keep >= 1, f"choose a density with floor(density*n) >= 1 on {name}"
            top = math.floor(model_param(cfg, params, "gamma", name, 0.01) * n)
            bottom = max(0, n - keep - top)
            cuts = [asc[bottom], asc[bottom + keep - 1]]
        for c in cuts:
            tied = a == c
            if c > 0 and int(tied.sum()) > 1:
                explained |= tied
    return explained.reshape(base.shape)


@pytest.fixture(scope="module")
def all_inputs(oracle) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """family -> model key -> tensors"""
    return {f: {k: load_dir(p) for k, p in fam.items()} for f, fam in oracle.family.items()}


# ------------------------------------------------------------------------------ the tests


def test_oracle_is_mergekit_0_1_5(oracle):
    assert oracle.info["mergekit"] == MERGEKIT_VERSION, oracle.info
    assert oracle.info["torch"].startswith("2.13.0"), oracle.info


@pytest.mark.parametrize("variant,name", CASES["all"])
def test_config_json_dtype(oracle, variant, name):
    """config.json of both outputs names the output dtype (MergeKit writes it via transformers,
    which may call the key `dtype` or `torch_dtype`; mpstore keeps the donor's key)."""
    _mk_ok(oracle, name)
    mk = json.loads((oracle.mergekit[name] / "config.json").read_text())
    mp = json.loads((oracle.mpstore[variant, name] / "config.json").read_text())
    want = CONFIGS[name].out_dtype
    mk_dtypes = {mk[k] for k in ("torch_dtype", "dtype") if k in mk}
    mp_dtypes = {mp[k] for k in ("torch_dtype", "dtype") if k in mp}
    assert mk_dtypes == {want}, mk
    assert mp_dtypes == {want}, mp
    for key in ("num_hidden_layers", "hidden_size", "vocab_size", "tie_word_embeddings", "model_type"):
        assert mk.get(key) == mp.get(key), key


@pytest.mark.parametrize("variant,name", CASES["bf16"])
def test_deterministic_method_matches_mergekit(oracle, all_inputs, variant, name):
    cfg = CONFIGS[name]
    inputs = all_inputs[cfg.family]
    mk, mp = _both(oracle, variant, name)
    total = equal = explained_n = 0
    worst = 0
    bad = []
    for n in sorted(mk):
        d = ulp_distance(mk[n], mp[n])
        differs = d > 0
        if SPARSIFIER.get(cfg.method) in ("topk", "crumbs") and bool(differs.any()):
            ex = threshold_ties(cfg, n, inputs) & differs
            explained_n += int(ex.sum())
            differs &= ~ex
        numel = d.numel()
        n_diff = int(differs.sum())
        far = int((d[differs] > 1).sum()) if n_diff else 0
        worst = max(worst, int(d[differs].max()) if n_diff else 0)
        total += numel
        equal += numel - n_diff
        if n_diff > 0.001 * numel or far:
            i = int(torch.argmax(torch.where(differs, d, 0)))
            bad.append(f"{n}: {n_diff}/{numel} differ, {far} by more than 1 ulp "
                       f"(worst at flat {i}: MergeKit {mk[n].reshape(-1)[i].item()!r}, "
                       f"mpstore {mp[n].reshape(-1)[i].item()!r}, {int(d.reshape(-1)[i])} ulp)")
    print(f"\n[{variant} {name}] {100 * equal / total:.4f}% of {total} elements bit-equal, max {worst} ulp "
          f"off elsewhere; {explained_n} differing elements explained by threshold ties")
    assert not bad, f"{name}: mpstore differs from MergeKit {MERGEKIT_VERSION}:\n  " + "\n  ".join(bad)


def test_cli_merge_config_matches_api(oracle):
    """`mp merge --config FILE.yml -b BRANCH`, the user's path, gives the API's tensors."""
    name = "ties"
    repo = oracle.repos["chunk1m"]
    proc = run_mp("-q", "merge", "--config", oracle.yaml_mp[name], "-b", "cli-ties", cwd=repo)
    assert proc.returncode == 0, proc.stderr
    out = repo.parent / "cli-ties"
    proc = run_mp("checkout", "cli-ties", "-o", out, cwd=repo)
    assert proc.returncode == 0, proc.stderr
    cli, api = load_dir(out), load_dir(oracle.mpstore["chunk1m", name])
    assert sorted(cli) == sorted(api)
    for n in cli:
        assert torch.equal(cli[n].view(torch.int16), api[n].view(torch.int16)), n


def rescale_gap(cfg: Cfg, name: str, inputs: dict) -> torch.Tensor:
    """Bound on |MergeKit - mpstore| that threshold ties cause through `rescale` (elementwise).

    With rescale, each sparsified delta is scaled by s = |delta|_1 / |kept|_1. MergeKit keeps
    exactly k entries (top-k; breadcrumbs: `keep` entries between its two cut-offs), mpstore also
    every entry tied with a cut-off, so its kept L1 mass, and thus s, differ slightly for the WHOLE
    tensor. Both masses are known exactly (tied entries have equal magnitude): MergeKit's is the
    sum of the k selected sorted magnitudes, mpstore's that plus the extra tied entries. The
    resulting difference of model i's contribution is |lambda * w_i / divisor * delta_i| * |s_mk - s_mp|,
    with |w_i / divisor| <= 1 under normalize with consensus and positive weights."""
    base = inputs[cfg.base][name].double()
    gap = torch.zeros_like(base)
    normalize = bool(global_param(cfg, "normalize", name, cfg.method == "ties"))
    rescale = bool(global_param(cfg, "rescale", name, False))
    if not rescale:
        return gap
    lam = abs(float(global_param(cfg, "lambda", name, 1.0)))
    weights = [model_param(cfg, p, "weight", name, None) for _, p in _non_base(cfg)]
    for (m, params), w in zip(_non_base(cfg), weights):
        density = model_param(cfg, params, "density", name, 1.0)
        if density >= 1:
            continue
        delta = inputs[m][name].double() - base
        a = delta.abs().reshape(-1)
        n = a.numel()
        asc = torch.sort(a).values
        if SPARSIFIER[cfg.method] == "topk":
            k = max(1, math.floor(density * n))
            mk_mass = float(asc[n - k:].sum())
            mp_mass = float(a[a >= asc[n - k]].sum())
        else:
            keep = math.floor(density * n)
            top = math.floor(model_param(cfg, params, "gamma", name, 0.01) * n)
            bottom = max(0, n - keep - top)
            lo, hi = asc[bottom], asc[bottom + keep - 1]
            mk_mass = float(asc[bottom:bottom + keep].sum())
            mp_mass = float(a[(a >= lo) & (a <= hi)].sum())
        whole = float(a.sum())
        if whole < 1e-7 or mk_mass < 1e-7:
            continue
        if normalize and cfg.method in CONSENSUS:
            assert all(x > 0 for x in weights), "the bound below needs positive weights"
            coef = lam
        elif normalize:
            coef = lam * abs(w / sum(weights))
        else:
            coef = lam * abs(w)
        gap += coef * delta.abs() * abs(whole / mk_mass - whole / mp_mass)
    return gap


F32_ULPS = 16  # observed at most 3.3: float32 results differ by the order of their operations


@pytest.mark.parametrize("variant,name", CASES["f32"])
def test_deterministic_method_float32_matches_mergekit(oracle, all_inputs, variant, name):
    """The same configs written as float32: every element within F32_ULPS float32 ulps of the
    largest operand there (|inputs| and |output|), as differently ordered float32 arithmetic
    gives. Here an error in a merged delta shows even where the delta is far below a bf16 ulp
    of the weight. Explained: threshold ties, and their effect on the rescale factor."""
    cfg = CONFIGS[name]
    inputs = all_inputs[cfg.family]
    mk, mp = _both(oracle, variant, name)
    eps = torch.finfo(torch.float32).eps
    worst, bad = 0.0, []
    for n in sorted(mk):
        a, b = mk[n].double(), mp[n].double()
        scale = torch.stack([x[n].double().abs() for x in inputs.values()] + [a.abs()]).amax(0)
        err = (a - b).abs()
        ulps = err / (eps * scale)
        if float(ulps.max()) > F32_ULPS and SPARSIFIER.get(cfg.method) in ("topk", "crumbs"):
            err = torch.where(threshold_ties(cfg, n, inputs), 0, err)
            err = (err - rescale_gap(cfg, n, inputs)).clamp(min=0)
            ulps = err / (eps * scale)
        top = float(ulps.max())
        worst = max(worst, top)
        if top > F32_ULPS:
            i = int(ulps.argmax())
            off = int((ulps > F32_ULPS).sum())
            bad.append(f"{n}: {off}/{a.numel()} elements off by more than {F32_ULPS} ulps (worst at flat {i}: "
                       f"MergeKit {a.reshape(-1)[i].item():.9g}, mpstore {b.reshape(-1)[i].item():.9g}, "
                       f"base {inputs[B][n].reshape(-1)[i].item():.9g}, {top:.0f} ulps)")
    print(f"\n[{variant} {name}] max {worst:.2f} float32 ulps of the largest operand")
    assert not bad, f"{name}: mpstore differs from MergeKit {MERGEKIT_VERSION}:\n  " + "\n  ".join(bad)


@pytest.mark.parametrize("variant,name", CASES["keep"])
def test_magnitude_sparsifiers_keep_the_specified_count(oracle, all_inputs, variant, name):
    """ties keeps k = max(1, floor(density*n)) entries of each delta, breadcrumbs floor(density*n)
    (docs/merge_methods.md §2.3, §2.6); which of several entries tied at the cut-off is
    implementation-defined, how many is not. On a tensor only one model changed, the kept entries
    are where the output differs from the base (float32 output, so none rounds away).
    Counted for MergeKit (which must give exactly the count: this checks the test's reading of
    the spec) and for mpstore."""
    cfg = CONFIGS[name]
    inputs = all_inputs[cfg.family]
    mk, mp = _both(oracle, variant, name)
    want_total, got = 0, {"MergeKit": 0, "mpstore": 0}
    rows = []
    for n in sorted(mk):
        changed = _changed_by(cfg, inputs, n)
        if len(changed) != 1:
            continue
        m, params = _non_base(cfg)[changed[0]]
        delta = inputs[m][n].float() - inputs[B][n].float()
        a = delta.abs().reshape(-1)
        numel = a.numel()
        density = model_param(cfg, params, "density", n, 1.0)
        asc = torch.sort(a).values
        if SPARSIFIER[cfg.method] == "topk":
            k = max(1, math.floor(density * numel))
            cuts = {float(asc[numel - k])}
        else:
            k = math.floor(density * numel)
            bottom = max(0, numel - k - math.floor(model_param(cfg, params, "gamma", n, 0.01) * numel))
            cuts = {float(asc[bottom]), float(asc[bottom + k - 1])}
        if min(cuts) == 0:
            continue  # fewer non-zero entries than k: nothing to count
        tied = int(sum((a == c).sum() for c in cuts))
        want_total += k
        for tool, out in (("MergeKit", mk), ("mpstore", mp)):
            kept = int((out[n].float() != inputs[B][n].float()).sum())
            got[tool] += kept
            if kept != k:
                rows.append(f"{tool} {n}: keeps {kept} of {numel}, the spec says {k} "
                            f"({tied} entries tie with a cut-off)")
    assert want_total, f"{name}: no tensor to count on"
    print(f"\n[{variant} {name}] kept on single-model tensors: spec {want_total}, "
          f"MergeKit {got['MergeKit']}, mpstore {got['mpstore']} "
          f"({100 * (got['mpstore'] - want_total) / want_total:+.2f}%)")
    assert not rows, f"{name}:\n  " + "\n  ".join(rows[:12]) + (f"\n  ... {len(rows)} in all" if len(rows) > 12 else "")


# --- random methods: statistics, plus the parts of the result that do not depend on the stream


def _deltas(out: dict, inputs: dict, name: str) -> torch.Tensor:
    return out[name].float() - inputs[B][name].float()


def _changed_by(cfg: Cfg, inputs: dict, name: str) -> list[int]:
    """Indices (in non-base order) of the models whose tensor differs from the base."""
    return [i for i, (m, _) in enumerate(_non_base(cfg)) if not torch.equal(inputs[m][name], inputs[B][name])]


@pytest.mark.parametrize("variant,name", CASES["random"])
def test_random_method_statistics_match_mergekit(oracle, all_inputs, variant, name):
    """Per tensor, the fraction of elements the merge changed and the L1/L2 norms of the merged
    delta agree between the tools within sampling noise.

    The masks are independent per element (given the per-model rescale factor), so a tool's
    changed fraction f over n elements has standard deviation <= sqrt(f(1-f)/n), and its L1 norm
    sum_e |D_e| has variance <= sum_e E[D_e^2], estimated by sum_e D_e^2; the L2^2 likewise by
    sum_e D_e^4. The per-model L1 rescale factor is itself a ratio of such sums, adding a
    fluctuation of the same order. The bound on the difference of the two tools is therefore
    6 standard deviations of the element noise, doubled for the rescale factor (12 sigma in all);
    the totals over the whole model must agree within the same 12 sigma of their own, much
    smaller, noise. A wrong weight, normalization, lambda, density or a missing rescale moves
    these quantities by tens of percent, far outside the bounds (relative bounds are printed).
    """
    inputs = all_inputs[CONFIGS[name].family]
    mk, mp = _both(oracle, variant, name)
    rows = []
    tot = {"n": 0, "fa": 0, "fb": 0, "l1a": 0.0, "l1b": 0.0, "s2a": 0.0, "s2b": 0.0}
    worst_rel = 0.0
    for n in sorted(mk):
        da, db = _deltas(mk, inputs, n).double(), _deltas(mp, inputs, n).double()
        numel = da.numel()
        fa, fb = float((da != 0).double().mean()), float((db != 0).double().mean())
        sd_f = math.sqrt((fa * (1 - fa) + fb * (1 - fb)) / numel)
        if abs(fa - fb) > 12 * sd_f + 2 / numel:
            rows.append(f"{n}: changed fraction MergeKit {fa:.4f}, mpstore {fb:.4f} (sd {sd_f:.4f})")
        l1a, l1b = float(da.abs().sum()), float(db.abs().sum())
        s2a, s2b = float((da ** 2).sum()), float((db ** 2).sum())
        sd_l1 = math.sqrt(s2a + s2b)
        if abs(l1a - l1b) > 12 * sd_l1:
            rows.append(f"{n}: L1 MergeKit {l1a:.6g}, mpstore {l1b:.6g} (sd {sd_l1:.3g})")
        sd_l2 = math.sqrt(float((da ** 4).sum() + (db ** 4).sum()))
        if abs(s2a - s2b) > 12 * sd_l2:
            rows.append(f"{n}: L2^2 MergeKit {s2a:.6g}, mpstore {s2b:.6g} (sd {sd_l2:.3g})")
        if l1a > 0:
            worst_rel = max(worst_rel, abs(l1a - l1b) / l1a)
        for k, v in (("n", numel), ("fa", fa * numel), ("fb", fb * numel), ("l1a", l1a), ("l1b", l1b),
                     ("s2a", s2a), ("s2b", s2b)):
            tot[k] += v
    fa, fb = tot["fa"] / tot["n"], tot["fb"] / tot["n"]
    sd_f = math.sqrt((fa * (1 - fa) + fb * (1 - fb)) / tot["n"])
    print(f"\n[{variant} {name}] changed fraction MergeKit {fa:.4f} mpstore {fb:.4f} (sd {sd_f:.4f}); "
          f"L1 MergeKit {tot['l1a']:.5g} mpstore {tot['l1b']:.5g} "
          f"(rel diff {abs(tot['l1a'] - tot['l1b']) / tot['l1a']:.2%}); worst tensor L1 rel diff {worst_rel:.2%}")
    assert abs(fa - fb) <= 12 * sd_f, f"whole model: changed fraction MergeKit {fa:.5f}, mpstore {fb:.5f}"
    # whole-model L1: the per-tensor sums are independent; their noise adds in quadrature
    assert abs(tot["l1a"] - tot["l1b"]) <= 12 * math.sqrt(tot["s2a"] + tot["s2b"]), tot
    assert not rows, f"{name}: statistics differ from MergeKit {MERGEKIT_VERSION}:\n  " + "\n  ".join(rows)


@pytest.mark.parametrize("variant,name", CASES["random"])
def test_random_method_single_model_tensors_are_exact(oracle, all_inputs, variant, name):
    """On a tensor only one model changed, the merged delta is c * mask * delta with one scalar c
    per tensor, whatever the random stream: c = lambda * s * (1 if normalized with consensus,
    w/sum(w) if normalized without, else w), with s the L1-matching rescale
    |delta|_1 / |mask*delta|_1 (1 without rescale). Checked for both tools from the mask each
    drew. And the masks follow the spec: the number kept is the sum of the keep probabilities
    p (DARE: density; DELLA: from density-epsilon for the smallest |delta| of a row to
    density+epsilon for the largest, by rank) within 6 sigma, sigma^2 = sum p(1-p), for the
    smaller and the larger half of each row separately (so DELLA's tilt is checked too)."""
    cfg = CONFIGS[name]
    inputs = all_inputs[cfg.family]
    mk, mp = _both(oracle, variant, name)
    normalize_default, rescale_default = DEFAULTS[cfg.method]
    della = SPARSIFIER[cfg.method] == "della"
    checked = 0
    problems = []
    # per tool, per half of the rows (0: smaller |delta|, 1: larger): [kept, sum p, sum p(1-p)]
    counts = {tool: [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]] for tool in ("MergeKit", "mpstore")}
    for n in sorted(mk):
        changed = _changed_by(cfg, inputs, n)
        if len(changed) != 1:
            continue
        i = changed[0]
        m, params = _non_base(cfg)[i]
        base = inputs[B][n].double()
        delta = (inputs[m][n].float() - inputs[B][n].float()).double()
        rho = model_param(cfg, params, "density", n, 1.0)
        w = model_param(cfg, params, "weight", n, None)
        weights = [model_param(cfg, p, "weight", n, None) for _, p in _non_base(cfg)]
        lam = float(global_param(cfg, "lambda", n, 1.0))
        normalize = bool(global_param(cfg, "normalize", n, normalize_default))
        rescale = bool(global_param(cfg, "rescale", n, rescale_default))
        if normalize and cfg.method in CONSENSUS:
            coef = lam
        elif normalize:
            coef = lam * w / sum(weights)
        else:
            coef = lam * w
        rows = delta.reshape(-1, delta.shape[-1]) if delta.dim() >= 2 else delta.reshape(1, -1)
        rank = rows.abs().argsort(dim=1).argsort(dim=1).double()
        if della:
            eps = model_param(cfg, params, "epsilon", n, 0.15)
            p = rho - eps + 2 * eps * rank / (rows.shape[1] - 1)
        else:
            p = torch.full_like(rows, rho)
        upper = (rank >= rows.shape[1] / 2).reshape(delta.shape)
        p = p.reshape(delta.shape)
        checked += 1
        for tool, out in (("MergeKit", mk), ("mpstore", mp)):
            d = out[n].double() - base
            kept = d != 0
            if not bool(kept.any()):
                problems.append(f"{tool} {n}: nothing kept at density {rho}")
                continue
            # kept elements whose scaled delta is under ~half an ulp of the base may have rounded
            # back to it; their share of |delta|_1 is negligible for s, and they are left out below
            s = float(delta.abs().sum() / (delta * kept).abs().sum()) if rescale else 1.0
            tol = 4 * torch.finfo(torch.float32).eps * (base.abs() + (coef * s * delta).abs())
            visible = (coef * s * delta).abs() > tol
            expect = coef * s * delta * kept
            off = ((d - expect).abs() > tol) & visible
            if bool(off.any()):
                j = int(torch.argmax(torch.where(off, (d - expect).abs(), 0).reshape(-1)))
                problems.append(f"{tool} {n}: {int(off.sum())} elements are not {coef * s:.6g} * delta "
                                f"(e.g. flat {j}: got {d.reshape(-1)[j].item():.6g}, "
                                f"want {expect.reshape(-1)[j].item():.6g})")
            for half in (0, 1):
                sel = visible & (upper if half else ~upper)
                c = counts[tool][half]
                c[0] += float(kept[sel].sum())
                c[1] += float(p[sel].sum())
                c[2] += float((p[sel] * (1 - p[sel])).sum())
    assert checked, f"{name}: no tensor is changed by exactly one model"
    for tool, halves in counts.items():
        for half, (got, want, var) in zip(("smaller", "larger"), halves):
            print(f"\n[{variant} {name}] {tool}: {half} half of |delta| on single-model tensors: kept {got:.0f}, "
                  f"expected {want:.1f} (sd {math.sqrt(var):.1f})", end="")
            if abs(got - want) > 6 * math.sqrt(var) + 1:
                problems.append(f"{tool}: kept {got:.0f} of the {half} half, expected {want:.1f} "
                                f"+- {6 * math.sqrt(var):.1f}")
    assert not problems, f"{name}:\n  " + "\n  ".join(problems)
