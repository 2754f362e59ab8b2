"""MergeKit differential in 16-bit compute: every method with `dtype: bfloat16` and `dtype: float16`.

A YAML means what it means in MergeKit: with a 16-bit `dtype:` MergeKit loads every input in that
dtype and runs the task-arithmetic family, nuslerp and model_stock in it (linear and slerp work in
float32 inside and round once), so mpstore must give the same bits. Each config runs with
`dtype: bfloat16` and `dtype: float16` and no `out_dtype` (the output is that dtype), on a family
stored in float32 and one stored in bfloat16, in a repository with the default chunks and in one
with 4 KiB chunks, where tensors are split into blocks and every whole-tensor norm, dot product
and L1 sum is summed over blocks. Then:

- deterministic methods: every element bit-equal to MergeKit's (+0 and -0 count as equal),
  except where `explain` gives a reason:
  - a cut-off tie of top-k / breadcrumbs: MergeKit keeps an arbitrary subset of the entries tied
    at a cut-off (an unstable sort), mpstore the first ones in index order. Both keep the same
    number, of equal magnitude, so the L1 rescale factor agrees and only the tied elements
    themselves can differ;
  - a whole-tensor sum at a rounding boundary: a norm, dot product or L1 norm that mpstore sums
    over blocks in float64 and MergeKit accumulates in float32, each rounded once to the compute
    dtype, can round differently only if its exact value lies within float32 noise (STAT_NOISE)
    of a rounding midpoint; then the whole tensor may differ (the rates count it as differing);
- random methods at density 1 draw nothing: bit-equal like the deterministic ones;
- random methods below density 1 draw other masks by design; on every tensor that only one model
  changed, each element either keeps the base or is MergeKit's op chain, in the compute dtype, of
  that model's delta with one L1 rescale factor s per tensor (the factor is searched near its
  estimate; it must exist for both tools). So the arithmetic around the draws is MergeKit's;
- `--compute-dtype float32` on a bfloat16 YAML is recorded in the plan and lands closer to a
  float64 reference (MergeKit with `dtype: float64`) than the bfloat16 compute.

Each test prints its rate of bit-equal elements (`-s`). MergeKit runs in its own virtualenv
through tests/mergekit_driver.py, one process for every config (started and collected by the
helpers of tests/mergekit_oracle.py, which the MergeKit differential modules share).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
import yaml
from conftest import load_dir
from make_family import make_family
from mergekit_oracle import E1, E2, E3, MERGEKIT_VERSION, B, config_doc, param, require_mergekit, running, ulp_distance

from mpstore import Repo
from mpstore.merge.request import from_yaml
from mpstore.store.objects import Plan

require_mergekit(module=True)

FAMILIES = {
    "f32": {"arch": "qwen2", "hidden": 64, "layers": 2, "vocab": 256, "dtype": "f32", "experts": 3,
            "kinds": ("dense", "partial", "lora"), "seed": 21},
    "bf16": {"arch": "qwen2", "hidden": 64, "layers": 2, "vocab": 256, "dtype": "bf16", "experts": 3,
             "kinds": ("dense", "partial", "lora"), "seed": 22},
}
LAYERS = 2
DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16}
YAML_DTYPE = {"bf16": "bfloat16", "f16": "float16", "f64": "float64"}
CHUNKS = {"chunk1m": 1 << 20, "chunk4k": 4096}


@dataclass
class Case:
    method: str
    models: list  # [(model key, parameters or None)]
    base: str | None = B
    parameters: dict = field(default_factory=dict)
    seed: int | None = None

    def doc(self, where: dict[str, str], dtype: str) -> dict:
        return config_doc(self.method, self.models, where, base=self.base, parameters=self.parameters,
                          dtype=YAML_DTYPE[dtype])


FILTERED = [{"filter": "mlp", "value": 0.4}, {"filter": "self_attn", "value": [0.1, 0.3]}]

# Densities keep floor(density * n) >= 1 on the smallest tensors (64 elements).
DETERMINISTIC: dict[str, Case] = {
    "linear": Case("linear", [(E1, {"weight": 0.5}), (E2, {"weight": [0.2, 0.6]}), (E3, {"weight": FILTERED}),
                              (B, {"weight": 0.3})], base=None, parameters={"weight": 0.25}),
    "task_arithmetic": Case("task_arithmetic", [(E1, {"weight": 0.7}), (E2, {"weight": -0.4}),
                                                (E3, {"weight": [0.5, 1.0]})], parameters={"lambda": 1.3}),
    "task_arithmetic_norm": Case("task_arithmetic", [(E1, {"weight": 0.6}), (E2, {"weight": 0.3}),
                                                     (E3, {"weight": FILTERED})],
                                 parameters={"weight": 0.2, "normalize": True, "lambda": 0.8}),
    "ties": Case("ties", [(E1, {"weight": 0.6, "density": [0.3, 0.7]}), (E2, {"weight": 0.5, "density": 0.5}),
                          (E3, {"weight": 0.8, "density": [{"filter": "q_proj", "value": 0.2}, {"value": 0.6}]})],
                 parameters={"weight": 0.4}),
    "ties_rescale": Case("ties", [(E1, {"weight": 0.7, "density": 0.4}), (E2, {"weight": -0.5, "density": [0.6, 0.3]}),
                                  (E3, {"weight": 0.5, "density": 0.5})],
                         parameters={"normalize": False, "rescale": True, "lambda": 0.9}),
    "breadcrumbs": Case("breadcrumbs", [(E1, {"weight": 0.5, "density": 0.6, "gamma": 0.05}),
                                        (E2, {"weight": 0.7, "density": [0.4, 0.8]}),
                                        (E3, {"weight": 0.4, "density": 0.5, "gamma": [{"filter": "mlp", "value": 0.1}]})],
                        parameters={"lambda": 1.1}),
    "breadcrumbs_ties": Case("breadcrumbs_ties", [(E1, {"weight": 0.6, "density": [0.5, 0.8], "gamma": 0.02}),
                                                  (E2, {"weight": 0.5, "density": 0.6}),
                                                  (E3, {"weight": 0.8, "density": 0.7, "gamma": 0.1})],
                             parameters={"normalize": True, "rescale": True}),
    # density 1 draws nothing: the random methods are deterministic then
    "dare_linear_density1": Case("dare_linear", [(E1, {"weight": 0.5}), (E2, {"weight": 0.3}), (E3, {"weight": 0.6})],
                                 parameters={"density": 1.0, "lambda": 0.7}, seed=5),
    "dare_ties_density1": Case("dare_ties", [(E1, {"weight": 0.5}), (E2, {"weight": -0.3}), (E3, {"weight": 0.6})],
                               parameters={"density": 1.0}, seed=5),
    "della_density1": Case("della", [(E1, {"weight": 0.5}), (E2, {"weight": -0.3}), (E3, {"weight": 0.6})],
                           parameters={"density": 1.0}, seed=5),
    "della_linear_density1": Case("della_linear", [(E1, {"weight": 0.4}), (E2, {"weight": 0.3}), (E3, {"weight": 0.6})],
                                  parameters={"density": 1.0, "normalize": True}, seed=5),
    "slerp": Case("slerp", [(E1, None)], parameters={
        "t": [{"filter": "self_attn", "value": [0.2, 0.9]}, {"filter": "mlp", "value": 0.7}, {"value": 0.4}]}),
    "nuslerp": Case("nuslerp", [(E1, {"weight": 0.3}), (E3, {"weight": 0.7})]),
    "nuslerp_rows": Case("nuslerp", [(E1, {"weight": [0.2, 0.8]}), (E2, {"weight": 0.5})],
                         parameters={"nuslerp_flatten": False}),
    "nuslerp_columns": Case("nuslerp", [(E1, {"weight": 0.4}), (E2, {"weight": 0.6})],
                            parameters={"nuslerp_flatten": False, "nuslerp_row_wise": True}),
    "nuslerp_nobase": Case("nuslerp", [(E1, {"weight": 1.0}), (E2, {"weight": 2.0})], base=None),
    "model_stock": Case("model_stock", [(E1, None), (E2, None), (E3, None)]),
    "model_stock_filter_wise": Case("model_stock", [(E1, None), (E2, None), (E3, None)],
                                    parameters={"filter_wise": True}),
}
# Scalar parameters only: the chain check resolves them without filters or gradients.
RANDOM: dict[str, Case] = {
    "dare_linear": Case("dare_linear", [(E1, {"weight": 0.5, "density": 0.3}), (E2, {"weight": 0.3, "density": 0.5}),
                                        (E3, {"weight": 0.6, "density": 0.4})], seed=11),
    "dare_ties": Case("dare_ties", [(E1, {"weight": 0.6, "density": 0.5}), (E2, {"weight": -0.4, "density": 0.3}),
                                    (E3, {"weight": 0.5, "density": 0.7})], parameters={"lambda": 1.2}, seed=12),
    "della": Case("della", [(E1, {"weight": 0.5, "density": 0.5, "epsilon": 0.2}), (E2, {"weight": 0.4, "density": 0.6}),
                            (E3, {"weight": 0.7, "density": 0.4, "epsilon": 0.1})], seed=13),
    "della_linear": Case("della_linear", [(E1, {"weight": 0.8, "density": 0.4, "epsilon": 0.3}),
                                          (E2, {"weight": 0.3, "density": 0.5}), (E3, {"weight": 0.5, "density": 0.6})],
                         parameters={"rescale": False, "lambda": 0.9}, seed=14),
}
CASES = {**DETERMINISTIC, **RANDOM}
# The float64 reference for --compute-dtype float32 (MergeKit, `dtype: float64`, f32 family)
PRECISE = ("task_arithmetic_norm", "nuslerp", "model_stock")
RUNS = [(fam, dt, name) for fam in FAMILIES for dt in DTYPES for name in CASES]
SPARSIFIER = {"ties": "topk", "breadcrumbs": "crumbs", "breadcrumbs_ties": "crumbs"}
DEFAULTS = {  # (normalize, rescale, consensus) of the random methods, docs/merge_methods.md §2
    "dare_linear": (False, True, False), "dare_ties": (False, True, True),
    "della": (True, True, True), "della_linear": (False, True, False),
}


def _job(fam: str, dt: str, name: str) -> str:
    return f"{fam}-{dt}-{name}"


def _ref(fam: str, key: str) -> str:
    return f"{fam}-{key}"


@dataclass(repr=False)  # a failure report prints the fixture: not every tensor of every run
class Runs:
    inputs: dict[str, dict[str, dict[str, torch.Tensor]]]  # family -> model key -> tensors
    mergekit: dict[str, dict[str, torch.Tensor]]  # job -> tensors
    mpstore: dict[tuple[str, str], dict[str, torch.Tensor]]  # (chunk variant, job) -> tensors
    errors: dict[str, str | None]  # MergeKit's error per job
    plans: dict[str, Plan]  # --compute-dtype float32 runs: name -> plan
    precise: dict[str, dict[str, torch.Tensor]]  # --compute-dtype float32 runs: name -> tensors

    def __repr__(self) -> str:
        return f"Runs({len(self.mergekit)} MergeKit outputs, {len(self.mpstore)} mpstore outputs)"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    t0 = time.perf_counter()
    root = tmp_path_factory.mktemp("mkdtypes")
    families = {f: make_family(root / f, **spec) for f, spec in FAMILIES.items()}
    (root / "cfg").mkdir()
    jobs, yaml_mp = [], {}
    wanted = [*RUNS, *(("f32", "f64", name) for name in PRECISE)]
    for fam, dt, name in wanted:
        case, job = CASES[name], _job(fam, dt, name)
        paths = {k: str(v) for k, v in families[fam].items()}
        mk_yaml = root / "cfg" / f"{job}.mergekit.yml"
        mk_yaml.write_text(yaml.safe_dump(case.doc(paths, dt), sort_keys=False))
        jobs.append({"name": job, "config": str(mk_yaml), "out": str(root / "mk" / job), "seed": case.seed})
        if dt != "f64":
            yaml_mp[job] = root / "cfg" / f"{job}.mpstore.yml"
            yaml_mp[job].write_text(yaml.safe_dump(case.doc({k: _ref(fam, k) for k in paths}, dt), sort_keys=False))
    mp: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    plans, precise = {}, {}
    t1 = time.perf_counter()
    with running(jobs, root) as driver:
        for variant, chunk in CHUNKS.items():
            with Repo.init(root / f"repo-{variant}", chunk_size=chunk) as repo:
                for f, fam in families.items():
                    for key, path in fam.items():
                        repo.add(path, _ref(f, key), base=None if key == B else _ref(f, B))
                for fam, dt, name in RUNS:
                    job = _job(fam, dt, name)
                    request = from_yaml(yaml_mp[job])
                    request.seed = CASES[name].seed or 0
                    repo.merge(request, f"m-{job}", threads=2)
                    repo.checkout(f"m-{job}", root / "mp" / variant / job)
                    mp[variant, job] = load_dir(root / "mp" / variant / job)
                if variant == "chunk1m":
                    for name in PRECISE:
                        request = from_yaml(yaml_mp[_job("f32", "bf16", name)])
                        request.compute_dtype = "F32"
                        plans[name] = repo.merge(request, f"p-{name}", threads=2).plan
                        repo.checkout(f"p-{name}", root / "mp" / "precise" / name)
                        precise[name] = load_dir(root / "mp" / "precise" / name)
        t2 = time.perf_counter()
        info = driver.finish()
    assert info["mergekit"] == MERGEKIT_VERSION, info
    errors = {job: r["error"] for job, r in info["jobs"].items()}
    mk = {job: load_dir(out) for job, out in driver.out.items() if errors[job] is None}
    inputs = {f: {k: load_dir(p) for k, p in fam.items()} for f, fam in families.items()}
    print(f"\n[mergekit dtypes] setup {t1 - t0:.1f}s; mpstore {len(RUNS) * len(CHUNKS)} merges {t2 - t1:.1f}s; "
          f"MergeKit {len(jobs)} merges, waited {time.perf_counter() - t2:.1f}s more")
    return Runs(inputs, mk, mp, errors, plans, precise)


def _both(runs: Runs, variant: str, job: str, dtype: torch.dtype) -> tuple[dict, dict]:
    assert runs.errors[job] is None, f"MergeKit failed on {job}:\n{runs.errors[job]}"
    mk, mp = runs.mergekit[job], runs.mpstore[variant, job]
    assert sorted(mk) == sorted(mp), (sorted(set(mk) ^ set(mp)))
    for n in mk:
        assert mk[n].shape == mp[n].shape, n
        assert mk[n].dtype == mp[n].dtype == dtype, (n, mk[n].dtype, mp[n].dtype)
    return mk, mp


# ------------------------------------------------------------------------------ parameters


def _param(case: Case, params: dict | None, key: str, name: str, default):
    """A per-model parameter (model level, then global, then default) for tensor `name`."""
    return param((params, case.parameters), key, name, LAYERS, default)


def _non_base(case: Case) -> list:
    return [(m, p) for m, p in case.models if m != case.base]


def _delta(inputs: dict, m: str, n: str, cd: torch.dtype) -> torch.Tensor:
    """Model m's delta on tensor n as the compute dtype gives it (MergeKit loads in cd)."""
    return inputs[m][n].to(cd) - inputs[B][n].to(cd)


def _kept_magnitudes(case: Case, params: dict | None, n: str, a: torch.Tensor) -> tuple[torch.Tensor, list]:
    """Sorted (ascending) |delta| of one model, the magnitudes its top-k / breadcrumbs mask keeps
    (the same multiset whichever tied entries are picked), and its cut-off values."""
    asc = torch.sort(a.reshape(-1)).values
    numel = asc.numel()
    density = float(_param(case, params, "density", n, 1.0))
    if SPARSIFIER[case.method] == "topk":
        k = max(1, math.floor(density * numel))
        return asc[numel - k:], [asc[numel - k]]
    keep = math.floor(density * numel)
    assert keep >= 1, f"choose a density with floor(density*n) >= 1 on {n}"
    bottom = max(0, numel - keep - math.floor(float(_param(case, params, "gamma", n, 0.01)) * numel))
    return asc[bottom:bottom + keep], [asc[bottom], asc[bottom + keep - 1]]


def cut_ties(case: Case, n: str, inputs: dict, cd: torch.dtype) -> torch.Tensor:
    """Elements where some sparsified model's |delta| (in cd) equals a top-k / breadcrumbs
    cut-off value that several elements share: which of those MergeKit keeps is arbitrary."""
    shape = inputs[B][n].shape
    explained = torch.zeros(shape.numel(), dtype=torch.bool)
    for m, params in _non_base(case):
        if float(_param(case, params, "density", n, 1.0)) >= 1:
            continue
        a = _delta(inputs, m, n, cd).abs().float().reshape(-1)
        for c in _kept_magnitudes(case, params, n, a)[1]:
            tied = a == c
            if c > 0 and int(tied.sum()) > 1:
                explained |= tied
    return explained.reshape(shape)


def midpoint_gap(x: torch.Tensor, cd: torch.dtype) -> torch.Tensor:
    """For float64 values: the distance to the nearest point where rounding to cd changes (a
    midpoint between two cd values)."""
    y = x.to(cd)
    up = torch.nextafter(y, torch.tensor(math.inf, dtype=cd)).double()
    down = torch.nextafter(y, torch.tensor(-math.inf, dtype=cd)).double()
    y = y.double()
    return torch.minimum((x - (y + up) / 2).abs(), (x - (y + down) / 2).abs())


STAT_NOISE = 2.0 ** -18  # float32 accumulation error of a whole-tensor sum, relative (generous)


def _statistics(case: Case, n: str, inputs: dict, cd: torch.dtype) -> torch.Tensor:
    """The whole-tensor sums MergeKit's torch reductions round to cd (summed here exactly, in
    float64): offsets' norms and dot products (model_stock), norms and cosines over the tensor or
    its columns (nuslerp), the L1 norms behind `rescale`."""
    stats: list[torch.Tensor] = []
    g = case.parameters
    if case.method == "model_stock" and not g.get("filter_wise"):
        o = [_delta(inputs, m, n, cd).reshape(-1) for m, _ in case.models]
        for i in range(len(o)):
            stats.append(o[i].double().square().sum().sqrt().reshape(1))
            stats += [(o[i] * o[j]).double().sum().reshape(1) for j in range(i + 1, len(o))]
    elif case.method == "nuslerp" and (g.get("nuslerp_flatten", True) or g.get("nuslerp_row_wise")):
        u, v = (_delta(inputs, m, n, cd) if case.base else inputs[m][n].to(cd) for m, _ in case.models)
        if g.get("nuslerp_flatten", True):
            u, v = u.reshape(1, -1), v.reshape(1, -1)
        elif u.dim() >= 2:  # per column (a 1-D tensor is one row: no sum over blocks)
            u, v = u.reshape(-1, u.shape[-1]).T, v.reshape(-1, v.shape[-1]).T
        else:
            return torch.zeros(0, dtype=torch.float64)
        nu, nv = (x.double().square().sum(-1, keepdim=True).sqrt() for x in (u, v))
        uu, vv = u / nu.to(cd).clamp(min=1e-7), v / nv.to(cd).clamp(min=1e-7)
        stats += [nu.reshape(-1), nv.reshape(-1), (uu * vv).double().sum(-1)]
    elif bool(_param(case, {}, "rescale", n, False)) and case.method in SPARSIFIER:
        for m, params in _non_base(case):
            if float(_param(case, params, "density", n, 1.0)) < 1:
                a = _delta(inputs, m, n, cd).abs().double()
                stats += [a.sum().reshape(1), _kept_magnitudes(case, params, n, a)[0].sum().reshape(1)]
    return torch.cat(stats) if stats else torch.zeros(0, dtype=torch.float64)


def explain(case: Case, n: str, inputs: dict, cd: torch.dtype, differs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Why elements may differ from MergeKit where it is deterministic, by reason:
    - "ties": a top-k / breadcrumbs cut-off tie (`cut_ties`);
    - "statistic": every element of a tensor one of whose whole-tensor sums lies within float32
      accumulation noise of a rounding midpoint of cd (MergeKit accumulates in float32, mpstore
      sums blocks in float64, so the rounded sums may differ by one ulp)."""
    why = {}
    if case.method in SPARSIFIER:
        why["ties"] = cut_ties(case, n, inputs, cd) & differs
    stats = _statistics(case, n, inputs, cd)
    if bool((midpoint_gap(stats, cd) < STAT_NOISE * stats.abs()).any()):
        why["statistic"] = differs.clone()
    return why


# ------------------------------------------------------------------------------ the tests

@pytest.mark.parametrize("variant", sorted(CHUNKS))
@pytest.mark.parametrize("fam,dt,name", [r for r in RUNS if r[2] in DETERMINISTIC])
def test_deterministic_bit_equal(runs, variant, fam, dt, name):
    case, job = CASES[name], _job(fam, dt, name)
    cd = DTYPES[dt]
    inputs = runs.inputs[fam]
    mk, mp = _both(runs, variant, job, cd)
    total = equal = 0
    explained: dict[str, int] = defaultdict(int)
    bad = []
    for n in sorted(mk):
        d = ulp_distance(mk[n], mp[n])
        differs = d > 0
        total += differs.numel()
        equal += differs.numel() - int(differs.sum())
        if not bool(differs.any()):
            continue
        for reason, mask in explain(case, n, inputs, cd, differs).items():
            if bool((mask & differs).any()):
                explained[reason] += int((mask & differs).sum())
                differs &= ~mask
        if bool(differs.any()):
            i = int(torch.argmax(differs.reshape(-1).to(torch.uint8)))
            bad.append(f"{n}: {int(differs.sum())}/{differs.numel()} differ unexplained (first at flat {i}: "
                       f"MergeKit {mk[n].reshape(-1)[i].item()!r}, mpstore {mp[n].reshape(-1)[i].item()!r}, "
                       f"{int(d.reshape(-1)[i])} ulp; max {int(d.max())} ulp)")
    print(f"\n[{variant} {job}] {100 * equal / total:.3f}% of {total} bit-equal; differing elements explained: "
          f"{dict(explained) or 'none'}")
    assert not bad, f"{job} ({variant}): mpstore differs from MergeKit {MERGEKIT_VERSION}:\n  " + "\n  ".join(bad)


def _chain(case: Case, n: str, inputs: dict, i: int, cd: torch.dtype,
           at: torch.Tensor) -> Callable[[torch.Tensor | None], torch.Tensor]:
    """MergeKit's result at elements `at` of tensor n when only model i changed it and every
    element of its delta is kept, as a function of the L1 rescale factor s (None: no rescale):
    docs/merge_methods.md §2.2, §2.4, §2.5, each step an operation in the compute dtype (the
    sparsifier's in its work dtype)."""
    normalize_default, _, consensus = DEFAULTS[case.method]
    base = inputs[B][n].to(cd)[at]
    delta = _delta(inputs, _non_base(case)[i][0], n, cd)[at]
    w = torch.tensor([float(_param(case, p, "weight", n, None)) for _, p in _non_base(case)], dtype=cd)
    normalize = bool(_param(case, {}, "normalize", n, normalize_default))
    lam = float(_param(case, {}, "lambda", n, 1.0))

    def chain(s: torch.Tensor | None) -> torch.Tensor:
        d = delta if s is None else (delta.to(s.dtype) * s).to(cd)
        x = d * w[i]
        if normalize:
            x = x / (w[i] if consensus else w.sum())
        if lam != 1:
            x = x * lam
        return base + x

    return chain


def _changed_by(case: Case, inputs: dict, n: str) -> list[int]:
    return [i for i, (m, _) in enumerate(_non_base(case)) if not torch.equal(inputs[m][n], inputs[B][n])]


def _neighbours(s: torch.Tensor, reach: int, stride: int) -> list[torch.Tensor]:
    """Values of s's dtype `stride`, 2 `stride`, ... up to `reach` strides of ulps either side."""
    bits = {2: torch.int16, 4: torch.int32}[s.element_size()]
    return [(s.view(bits) + k * stride).view(s.dtype) for k in range(-reach, reach + 1)]


def _chain_misses(case: Case, n: str, inputs: dict, i: int, cd: torch.dtype, out: torch.Tensor) -> tuple[int, int]:
    """(elements not the base, those of them that are not the chain for the best factor s). The
    factor is searched among work-dtype values around its estimate from the elements the output
    shows kept: every bfloat16 within 24 ulps; float32 in strides of 64, 8 and 1 ulps."""
    changed = ulp_distance(out, inputs[B][n].to(cd)) > 0
    if not bool(changed.any()):
        return 0, 0
    chain, seen = _chain(case, n, inputs, i, cd, changed), out[changed]

    def misses(s: torch.Tensor | None) -> int:
        return int((ulp_distance(chain(s), seen) > 0).sum())

    if not bool(_param(case, {}, "rescale", n, DEFAULTS[case.method][1])):
        return int(changed.sum()), misses(None)
    a = _delta(inputs, _non_base(case)[i][0], n, cd).to(torch.float64).abs()
    guess = torch.tensor(float(a.sum() / a[changed].sum()), dtype=torch.bfloat16 if cd == torch.bfloat16 else torch.float32)
    if guess.dtype == torch.bfloat16:
        return int(changed.sum()), min(misses(s) for s in _neighbours(guess, 24, 1))
    for reach, stride in ((32, 64), (8, 8)):
        guess = min(_neighbours(guess, reach, stride), key=misses)
    return int(changed.sum()), min(misses(s) for s in _neighbours(guess, 8, 1))


@pytest.mark.parametrize("variant", sorted(CHUNKS))
@pytest.mark.parametrize("fam,dt,name", [r for r in RUNS if r[2] in RANDOM])
def test_random_methods_do_mergekit_arithmetic(runs, variant, fam, dt, name):
    """Around the random draws, both tools compute as MergeKit: on single-model tensors every
    element is the base or the op chain of the delta, for one rescale factor per tensor."""
    case, job = CASES[name], _job(fam, dt, name)
    cd = DTYPES[dt]
    inputs = runs.inputs[fam]
    mk, mp = _both(runs, variant, job, cd)
    rows, checked = [], 0
    for n in sorted(mk):
        changed = _changed_by(case, inputs, n)
        if len(changed) != 1:
            continue
        checked += 1
        for tool, out in (("MergeKit", mk), ("mpstore", mp)):
            kept, misses = _chain_misses(case, n, inputs, changed[0], cd, out[n])
            if kept == 0:
                rows.append(f"{tool} {n}: nothing kept")
            elif misses:
                rows.append(f"{tool} {n}: {misses} of {kept} kept elements are not MergeKit's chain")
    assert checked, f"{job}: no tensor changed by exactly one model"
    assert not rows, f"{job} ({variant}):\n  " + "\n  ".join(rows)


def test_compute_dtype_float32_is_recorded_and_closer(runs):
    """`--compute-dtype float32` (MergeRequest.compute_dtype) on a `dtype: bfloat16` YAML: the
    plan computes in F32 and writes BF16, and the output is nearer MergeKit's float64 result than
    the bfloat16 compute (which is MergeKit's own bfloat16 result, bit for bit)."""
    for name in PRECISE:
        plan = runs.plans[name]
        assert (plan.compute_dtype, plan.out_dtype) == ("F32", "BF16"), (name, plan.compute_dtype, plan.out_dtype)
        ref_job = _job("f32", "f64", name)
        assert runs.errors[ref_job] is None, runs.errors[ref_job]
        ref = runs.mergekit[ref_job]
        plain = runs.mpstore["chunk1m", _job("f32", "bf16", name)]
        precise = runs.precise[name]
        err_plain = err_precise = 0.0
        for n, r in ref.items():
            assert r.dtype == torch.float64 and precise[n].dtype == torch.bfloat16, n
            err_plain += float((plain[n].double() - r).abs().sum())
            err_precise += float((precise[n].double() - r).abs().sum())
            # one rounding of a float32 result: at most one bf16 ulp from the float64 result's
            assert int(ulp_distance(precise[n], r.to(torch.bfloat16)).max()) <= 1, n
        print(f"\n[{name}] L1 distance to float64: bf16 compute {err_plain:.6g}, float32 compute {err_precise:.6g}")
        assert err_precise < err_plain, name


@pytest.mark.parametrize("method,params", [("ties", {"rescale": True}), ("model_stock", {})])
def test_float16_statistic_overflow_is_refused(tmp_path, method, params):
    """A whole-tensor statistic float16 cannot hold (here an L1 norm, or a norm of the offsets,
    above 65504) would make MergeKit write inf or NaN; mpstore refuses the float16 merge in one
    line naming the way out, and merges with `--compute-dtype float32`."""
    from safetensors.torch import save_file

    from mpstore.errors import BadMerge
    from mpstore.merge.request import MergeRequest

    g = torch.Generator().manual_seed(3)
    base = torch.randn(64, 64, generator=g)
    with Repo.init(tmp_path / "repo") as repo:
        for name, shift in (("base", 0.0), ("a", 60.0), ("b", -40.0), ("c", 50.0)):
            folder = tmp_path / name
            folder.mkdir()
            tensors = {"model.layers.0.mlp.up_proj.weight": base + shift * torch.rand(64, 64, generator=g)}
            save_file(tensors, str(folder / "model.safetensors"))
            (folder / "config.json").write_text('{"model_type": "qwen2", "torch_dtype": "float32"}\n')
            repo.add(folder, name)
        models = ["a", "b", "c"]
        weights = [{"weight": 0.5, "density": 0.5} for _ in models] if method == "ties" else [{} for _ in models]
        request = MergeRequest(method, "base", models, weights, dict(params), "F16", None, 0)
        with pytest.raises(BadMerge) as refused:
            repo.merge(request, "m16", threads=1)
        message = str(refused.value)
        assert "\n" not in message and "float16" in message and "--compute-dtype float32" in message, message
        request.compute_dtype = "F32"
        res = repo.merge(request, "m32", threads=1)
        assert (res.plan.compute_dtype, res.plan.out_dtype) == ("F32", "F16")
