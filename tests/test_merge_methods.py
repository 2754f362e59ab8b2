"""Every merge method against an independent reference written here in plain torch on whole
tensors, from docs/merge_methods.md (MergeKit 0.1.5's behaviour), never from mpstore.merge.methods.

The models are hand-built float32 safetensors stored with a 4096-byte chunk size, so most tensors
span several chunks: a 2-D weight whose rows are longer than a chunk, one whose rows straddle
chunk boundaries, a 1-D vector over three chunks, a 256x256 weight for the statistics, and a
weight that the experts change only in its first rows (its later chunks are the base's in every
input). That checks that the streaming passes (top-k thresholds, slerp angles, model_stock
cosines, L1 rescale factors) give exactly what a whole-tensor computation gives.

The random methods (dare_*, della*) cannot match any other generator, so they are checked
statistically (kept fraction, keep probability against magnitude rank), exactly where the
stream does not matter (L1 matching of every kept delta), and for determinism by seed.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mpstore import Repo
from mpstore.merge.request import MergeRequest

CHUNK = 4096  # bytes: 1024 float32 elements per chunk

EMBED = "model.embed_tokens.weight"
Q = "model.layers.0.self_attn.q_proj.weight"
UP = "model.layers.0.mlp.up_proj.weight"
LN = "model.layers.1.input_layernorm.weight"
DOWN = "model.layers.1.mlp.down_proj.weight"
GATE = "model.layers.1.mlp.gate_proj.weight"
NORM = "model.norm.weight"
SHAPES = {
    EMBED: (50, 64),  # 3.1 chunks
    Q: (6, 1500),  # every row longer than a chunk
    UP: (96, 40),  # rows straddle chunk boundaries
    LN: (64,),  # a small vector inside one chunk
    DOWN: (40, 96),  # the experts change only rows 0..7 (inside chunk 0); chunks 1..3 are the base's
    GATE: (256, 256),  # 64 chunks, for the statistics
    NORM: (3000,),  # a vector over three chunks
}
PARTIAL_ROWS = 8
TOL = {"rtol": 2e-5, "atol": 2e-6}


@dataclass
class Zoo:
    repo: Repo
    root: Path
    t: dict[str, dict[str, torch.Tensor]]  # model name -> tensor name -> float32 tensor
    count = itertools.count()


def _write(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True)
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text('{"model_type": "qwen2", "torch_dtype": "float32"}\n')
    return folder


def _orthogonal_nudge(a: torch.Tensor, g: torch.Generator, tan: float) -> torch.Tensor:
    """a + n with n orthogonal to a (flattened) and |n| = tan * |a|: cos(a, result) = 1/sqrt(1+tan^2)."""
    x = a.flatten().double()
    n = torch.randn(x.shape, generator=g, dtype=torch.float64)
    n -= (n @ x) / (x @ x) * x
    n *= tan * x.norm() / n.norm()
    return (x + n).float().reshape(a.shape)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Zoo:
    root = tmp_path_factory.mktemp("zoo")
    g = torch.Generator().manual_seed(20261128)
    base = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
    models: dict[str, dict[str, torch.Tensor]] = {"base": base}
    for k in (1, 2, 3):
        e = {}
        for n, s in SHAPES.items():
            d = torch.randn(s, generator=g) * (0.2 + 0.3 * k)
            if n == DOWN:
                d[PARTIAL_ROWS:] = 0
            e[n] = base[n] + d
        models[f"e{k}"] = e
    models["e3"][EMBED] = base[EMBED].clone()  # a zero delta: it never agrees in an election
    # Nearly parallel to the base in every tensor: cos = 0.99961 > 0.9995, slerp's lerp threshold,
    # yet an angle of 0.028 rad, so the slerp and lerp formulas differ measurably.
    models["near"] = {n: _orthogonal_nudge(t, g, 0.028) for n, t in base.items()}
    # Only NORM changes, by a delta whose magnitude grows with the index (random signs).
    ramp = dict(base)
    n = SHAPES[NORM][0]
    signs = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    ramp[NORM] = base[NORM] + signs * torch.arange(1, n + 1, dtype=torch.float32) / n
    models["ramp"] = ramp
    models["same"] = base
    repo = Repo.init(root / "repo", chunk_size=CHUNK)
    for name, tensors in models.items():
        repo.add(_write(root / "models" / name, tensors), name, message=name)
    # Sanity of the fixture itself: every delta that should be non-zero is (f32 subtraction).
    for k in ("e1", "e2", "e3"):
        for n in SHAPES:
            d = models[k][n] - base[n]
            if n == DOWN:
                assert (d[:PARTIAL_ROWS] != 0).all() and (d[PARTIAL_ROWS:] == 0).all()
            elif not (k == "e3" and n == EMBED):
                assert (d != 0).all(), (k, n)
    z = Zoo(repo, root, models)
    yield z
    repo.close()


def merge(zoo: Zoo, method: str, models: list[str], base: str | None = "base",
          p: list[dict] | None = None, g: dict | None = None, seed: int = 0, **kw):
    """Merge through the real Repo API (real store); return (commit id, tensors checked out)."""
    req = MergeRequest(method, base, list(models), p or [{} for _ in models], g or {}, "F32", None, seed)
    branch = f"m{next(zoo.count)}"
    res = zoo.repo.merge(req, branch, threads=kw.pop("threads", 2), **kw)
    out = zoo.root / "out" / branch
    zoo.repo.checkout(branch, out)
    tensors = load_file(str(out / "model.safetensors"))
    assert set(tensors) == set(SHAPES)
    for n, t in tensors.items():
        assert t.dtype == torch.float32 and tuple(t.shape) == SHAPES[n], n
    return res, tensors


def pick(spec, name: str):
    """A parameter written as a scalar or as [{filter, value}, ...] (first substring match)."""
    if isinstance(spec, list):
        for entry in spec:
            f = entry.get("filter")
            if f is None or f in name:
                return entry["value"]
        return None
    return spec


def assert_close(got: torch.Tensor, want: torch.Tensor, name: str, **tol) -> None:
    torch.testing.assert_close(got, want.to(got.dtype), **(tol or TOL), msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------- references
# All of these take whole tensors and follow the spec's pseudocode; deltas are formed in
# float32 (the compute dtype) exactly as the spec says, and later arithmetic follows §2.2.

def ref_topk(d: torch.Tensor, density: float) -> torch.Tensor:
    """§2.3: keep the k = max(1, floor(density*N)) largest |d| of the whole tensor."""
    if density >= 1:
        return d
    flat = d.flatten()
    k = max(1, math.floor(density * flat.numel()))
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[torch.topk(flat.abs(), k).indices] = True
    return torch.where(keep, flat, 0).reshape(d.shape)


def ref_crumbs(d: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """§2.6, with mpstore's documented change: keep max(1, floor(density*N)) (MergeKit: floor)."""
    if density >= 1:
        return d
    flat = d.flatten()
    n = flat.numel()
    keep_n = max(1, math.floor(density * n))
    top_n = math.floor(gamma * n)
    bot_n = max(0, n - keep_n - top_n)
    order = torch.argsort(flat.abs(), stable=True)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[order[bot_n: bot_n + keep_n]] = True
    return torch.where(keep, flat, 0).reshape(d.shape)


def l1_match(d: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """§2.5: scale the kept entries so their L1 norm is the whole delta's."""
    before, after = d.double().abs().sum().item(), masked.double().abs().sum().item()
    if before < 1e-7 or after < 1e-7:
        return masked
    return masked * torch.tensor(before / after, dtype=masked.dtype)


def ref_task(method: str, base: torch.Tensor, models: list[torch.Tensor], p: list[dict], g: dict) -> torch.Tensor:
    """§2.2 for the deterministic task-arithmetic methods."""
    consensus = method in ("ties", "breadcrumbs_ties")
    defaults = {"task_arithmetic": (False, False), "ties": (True, False), "breadcrumbs": (False, False),
                "breadcrumbs_ties": (False, False)}[method]
    normalize = g.get("normalize", defaults[0])
    rescale = g.get("rescale", defaults[1])
    lam = g.get("lambda", 1.0)
    deltas = []
    for m, q in zip(models, p):
        d = m - base
        rho = q.get("density", 1.0)
        if method == "ties" and rho < 1:
            s = ref_topk(d, rho)
            d = l1_match(d, s) if rescale else s
        elif method.startswith("breadcrumbs") and rho < 1:
            s = ref_crumbs(d, rho, q.get("gamma", 0.01))
            d = l1_match(d, s) if rescale else s
        deltas.append(d)
    w = torch.tensor([q["weight"] for q in p], dtype=torch.float32).reshape(-1, *[1] * base.dim())
    weighted = torch.stack(deltas) * w
    if consensus:
        elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
        agree = torch.sign(weighted) == elected
        mixed = torch.where(agree, weighted, 0).sum(0)
        divisor = torch.where(agree, w, 0).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed = weighted.sum(0)
        total = w.sum()
        divisor = torch.ones(()) if abs(float(total)) < 1e-8 else total
    if normalize:
        mixed = mixed / divisor
    if lam != 1:
        mixed = mixed * lam
    return base + mixed


def ref_linear(models: list[torch.Tensor], weights: list[float], normalize: bool) -> torch.Tensor:
    acc = torch.zeros_like(models[0])
    for m, w in zip(models, weights):
        acc = acc + float(w) * m
    return acc / sum(weights) if normalize else acc


def ref_slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """§3: one angle for the whole flattened tensor; lerp when |cos| > 0.9995."""
    x, y = a.double().flatten(), b.double().flatten()
    na, nb = x.norm().item(), y.norm().item()
    na, nb = (na if na > 1e-8 else 1.0), (nb if nb > 1e-8 else 1.0)
    c = max(-1.0, min(1.0, float((x / na) @ (y / nb))))
    if abs(c) > 0.9995:
        r = (1 - t) * x + t * y
    else:
        th = math.acos(c)
        r = math.sin((1 - t) * th) / math.sin(th) * x + math.sin(t * th) / math.sin(th) * y
    return r.reshape(a.shape).float()


def lerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    return ((1 - t) * a.double() + t * b.double()).float()


def _slerp_lines(u: torch.Tensor, v: torch.Tensor, t: float) -> torch.Tensor:
    """nuslerp's rule on the rows of u, v (2-D, float64)."""
    nu = u.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    nv = v.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    c = ((u / nu) * (v / nv)).sum(-1, keepdim=True).clamp(-1, 1)
    th = torch.acos(c)
    colinear = (1 - c * c) <= 1e-16
    s = torch.where(colinear, torch.ones_like(th), torch.sin(th))
    out = (torch.sin((1 - t) * th) * u + torch.sin(t * th) * v) / s
    return torch.where(colinear, (1 - t) * u + t * v, out)


def ref_nuslerp(base: torch.Tensor | None, m1: torch.Tensor, m2: torch.Tensor, w1: float, w2: float,
                flatten: bool, row_wise: bool) -> torch.Tensor:
    """§4: t = w2/(w1+w2); task vectors when there is a base; lines = whole tensor (flatten),
    the last axis, or axis 0 (row_wise); a 1-D tensor is one line whatever the mode."""
    t = 0.5 if abs(w1 + w2) < 1e-6 else w2 / (w1 + w2)
    u, v = (m1 - base, m2 - base) if base is not None else (m1, m2)
    u, v = u.double(), v.double()
    if flatten or u.dim() == 1:
        r = _slerp_lines(u.reshape(1, -1), v.reshape(1, -1), t).reshape(u.shape)
    elif row_wise:
        r = _slerp_lines(u.transpose(0, -1), v.transpose(0, -1), t).transpose(0, -1)
    else:
        r = _slerp_lines(u, v, t)
    r = r.float()
    return base + r if base is not None else r


def ref_model_stock(base: torch.Tensor, models: list[torch.Tensor], filter_wise: bool) -> torch.Tensor:
    """§5: t from the mean pairwise cosine of the offsets; per row of the last axis if filter_wise."""
    n = len(models)
    if filter_wise and base.dim() >= 2:
        o = torch.stack([(m - base).double().reshape(-1, base.shape[-1]) for m in models])  # [n, rows, len]
    else:
        o = torch.stack([(m - base).double().reshape(1, -1) for m in models])
    cos = []
    for i, j in itertools.combinations(range(n), 2):
        den = torch.clamp(o[i].norm(dim=-1) * o[j].norm(dim=-1), min=1e-6)
        cos.append(torch.clamp((o[i] * o[j]).sum(-1) / den, -1, 1))
    c = torch.stack(cos).mean(0)  # [lines]
    den = 1 + (n - 1) * c
    t = torch.where(den.abs() < 1e-6, torch.zeros_like(c), n * c / torch.where(den.abs() < 1e-6, 1, den))
    mean = torch.stack([m.double() for m in models]).mean(0).reshape(o.shape[1], -1)
    b = base.double().reshape(o.shape[1], -1)
    return (t.unsqueeze(1) * mean + (1 - t.unsqueeze(1)) * b).reshape(base.shape).float()


# ---------------------------------------------------------------------------- linear

@pytest.mark.parametrize("normalize,weights", [(True, [0.5, 0.3, 0.2]), (False, [0.5, -0.25, 1.0])])
def test_linear(zoo, normalize, weights):
    names = ["e1", "e2", "e3"]
    _, out = merge(zoo, "linear", names, base=None, p=[{"weight": w} for w in weights],
                   g={"normalize": normalize})
    for n in SHAPES:
        assert_close(out[n], ref_linear([zoo.t[m][n] for m in names], weights, normalize), n)


def test_linear_with_a_base_takes_it_as_one_more_input(zoo):
    """§1: a base not listed among the models is appended as an input and needs a weight
    (here from the global level)."""
    _, out = merge(zoo, "linear", ["e1", "e2"], base="base", p=[{"weight": 0.6}, {"weight": 0.2}],
                   g={"weight": 1.0})
    for n in SHAPES:
        want = ref_linear([zoo.t["e1"][n], zoo.t["e2"][n], zoo.t["base"][n]], [0.6, 0.2, 1.0], True)
        assert_close(out[n], want, n)


# ---------------------------------------------------------------------------- task arithmetic family

DENSITY_FILTERS = [  # per-tensor densities: a tiny one on each small/1-D tensor, 0.3 elsewhere
    {"filter": "input_layernorm", "value": 0.01},  # 64 elements: floor(0.64) = 0
    {"filter": "model.norm", "value": 0.0002},  # 3000 elements over 3 chunks: floor(0.6) = 0
    {"filter": "up_proj", "value": 0.9},
    {"value": 0.3},
]

TASK_CASES = {
    "task_arithmetic": ("task_arithmetic", [{"weight": 0.7}, {"weight": 0.4}, {"weight": -0.2}], {}),
    "task_arithmetic-normalize-lambda": (
        "task_arithmetic", [{"weight": 0.7}, {"weight": 0.4}, {"weight": -0.2}],
        {"normalize": True, "lambda": 0.6}),
    "ties": ("ties", [{"weight": 1.0, "density": DENSITY_FILTERS}, {"weight": 0.5, "density": 0.5},
                      {"weight": -0.3, "density": 0.2}], {}),
    "ties-rescale-no-normalize-lambda": (
        "ties", [{"weight": 0.6, "density": 0.25}, {"weight": 0.4, "density": DENSITY_FILTERS},
                 {"weight": 0.3, "density": 0.7}], {"rescale": True, "normalize": False, "lambda": 1.3}),
    "ties-density-1": ("ties", [{"weight": 0.5}, {"weight": 0.5}, {"weight": 0.5}], {}),
    "breadcrumbs": ("breadcrumbs", [
        {"weight": 0.5, "density": [{"filter": "input_layernorm", "value": 0.01}, {"filter": "up_proj", "value": 0.9},
                                    {"value": 0.3}], "gamma": [{"filter": "up_proj", "value": 0.2}, {"value": 0.05}]},
        {"weight": 0.8, "density": 0.4, "gamma": 0.02},
        {"weight": -0.3, "density": 0.6}], {}),
    "breadcrumbs-rescale-normalize": ("breadcrumbs", [
        {"weight": 0.5, "density": 0.3, "gamma": 0.1}, {"weight": 0.8, "density": 0.4, "gamma": 0.02},
        {"weight": 0.3, "density": 0.6}], {"rescale": True, "normalize": True}),
    "breadcrumbs_ties": ("breadcrumbs_ties", [
        {"weight": 1.0, "density": 0.3, "gamma": 0.05}, {"weight": 0.6, "density": DENSITY_FILTERS, "gamma": 0.01},
        {"weight": 0.4, "density": 0.5}], {}),
    "breadcrumbs_ties-normalize": ("breadcrumbs_ties", [
        {"weight": 1.0, "density": 0.3, "gamma": 0.05}, {"weight": 0.6, "density": 0.2},
        {"weight": -0.4, "density": 0.5}], {"normalize": True}),
}


@pytest.mark.parametrize("case", list(TASK_CASES))
def test_task_arithmetic_family(zoo, case):
    method, p, g = TASK_CASES[case]
    names = ["e1", "e2", "e3"]
    _, out = merge(zoo, method, names, p=p, g=g)
    for n in SHAPES:
        pn = [{k: pick(v, n) for k, v in q.items()} for q in p]
        want = ref_task(method, zoo.t["base"][n], [zoo.t[m][n] for m in names], pn, g)
        assert_close(out[n], want, n)
    # The rows every expert left alone stay the base's exactly.
    assert torch.equal(out[DOWN][PARTIAL_ROWS:], zoo.t["base"][DOWN][PARTIAL_ROWS:])


def test_ties_keeps_one_entry_when_density_times_n_is_below_one(zoo):
    """§2.3: k = max(1, floor(density*N)); on a 3000-element vector over three chunks, the one
    entry kept is the largest |delta| of the whole tensor, wherever its chunk."""
    for name, density in ((NORM, 0.0002), (LN, 0.01)):
        _, out = merge(zoo, "ties", ["e2"], p=[{"weight": 1.0, "density": density}])
        d = zoo.t["e2"][name] - zoo.t["base"][name]
        changed = (out[name] != zoo.t["base"][name]).nonzero().flatten().tolist()
        assert changed == [int(d.abs().argmax())], name
        assert_close(out[name], zoo.t["base"][name] + torch.where(d.abs() == d.abs().max(), d, 0), name)


def test_ties_elects_the_sign_of_the_weighted_sum(tmp_path):
    """§2.2 point 1: the election uses weighted deltas (a=[1,-1], c=[-3,2], weights [1, 0.2]
    follows a); point 2: the divisor is the per-element sum of the agreeing signed weights,
    a zero delta never agrees, and a negative weight flips a model's vote."""
    root = tmp_path / "tiny"
    vals = {"base": [0, 0, 0, 0, 0], "a": [1, -1, 1, 0, 2], "c": [-3, 2, -1, 0, 2]}
    with Repo.init(root / "repo", chunk_size=CHUNK) as repo:
        for k, v in vals.items():
            repo.add(_write(root / k, {"w": torch.tensor(v, dtype=torch.float32)}), k)

        def run(weights, branch):
            req = MergeRequest("ties", "base", ["a", "c"], [{"weight": w} for w in weights], {}, "F32", None, 0)
            repo.merge(req, branch)
            repo.checkout(branch, root / branch)
            return load_file(str(root / branch / "model.safetensors"))["w"].tolist()

        # weighted sums [0.4, -0.6, 0.8, 0, 2.4]: a wins the first three; the last: both agree,
        # (2 + 0.4) / (1 + 0.2) = 2. An unweighted vote would elect c's sign on element 0.
        assert run([1.0, 0.2], "w1") == pytest.approx([1, -1, 1, 0, 2], abs=1e-6)
        # weight -0.5 flips c: weighted c = [1.5, -1, 0.5, 0, -1]; sums [2.5, -2, 1.5, 0, 1].
        # Elements 0-2: both agree, divisor 1 - 0.5 = 0.5. Element 4: only a agrees, divisor 1.
        assert run([1.0, -0.5], "w2") == pytest.approx([5, -4, 3, 0, 2], abs=1e-6)


def test_breadcrumbs_keeps_at_least_one_entry(zoo):
    """mpstore keeps max(1, floor(density*N)) where MergeKit floors to 0 and drops the whole
    delta: on 64 elements with density 0.01 one entry survives, the largest below the
    floor(gamma*N) removed from the top."""
    d = zoo.t["e1"][LN] - zoo.t["base"][LN]
    order = torch.argsort(d.abs(), descending=True)
    for gamma, survivor in ((0.01, order[0]), (0.05, order[3])):  # top_n = 0, then floor(3.2) = 3
        _, out = merge(zoo, "breadcrumbs", ["e1"], p=[{"weight": 1.0, "density": 0.01, "gamma": gamma}])
        changed = (out[LN] != zoo.t["base"][LN]).nonzero().flatten().tolist()
        assert changed == [int(survivor)], gamma
        assert out[LN][survivor] == zoo.t["base"][LN][survivor] + d[survivor]


def test_breadcrumbs_shrinks_the_top_cut_when_density_plus_gamma_exceed_one(zoo):
    """§2.6: density 0.9 + gamma 0.2 > 1 removes only the top 10%, so 90% is still kept."""
    _, out = merge(zoo, "breadcrumbs", ["e1"], p=[{"weight": 1.0, "density": 0.9, "gamma": 0.2}])
    d = (zoo.t["e1"][GATE] - zoo.t["base"][GATE]).flatten()
    kept = (out[GATE] != zoo.t["base"][GATE]).flatten()
    n = d.numel()
    assert int(kept.sum()) == math.floor(0.9 * n)
    order = torch.argsort(d.abs(), descending=True)
    top = n - math.floor(0.9 * n)
    assert not kept[order[:top]].any() and kept[order[top:]].all()


# ---------------------------------------------------------------------------- slerp

def test_slerp(zoo):
    t = 0.3
    _, out = merge(zoo, "slerp", ["e1"], g={"t": t})
    for n in SHAPES:
        want = ref_slerp(zoo.t["base"][n], zoo.t["e1"][n], t)
        assert_close(out[n], want, n)
        # genuinely spherical here: not what a plain lerp would give
        assert not torch.allclose(out[n], lerp(zoo.t["base"][n], zoo.t["e1"][n], t), **TOL), n


def test_slerp_of_nearly_parallel_tensors_is_a_lerp(zoo):
    t = 0.3
    _, out = merge(zoo, "slerp", ["near"], g={"t": t})
    for n in SHAPES:
        a, b = zoo.t["base"][n], zoo.t["near"][n]
        assert_close(out[n], lerp(a, b, t), n)
        th = math.acos(1 / math.sqrt(1 + 0.028 ** 2))
        spherical = (math.sin((1 - t) * th) * a.double() + math.sin(t * th) * b.double()) / math.sin(th)
        far = (out[n].double() - spherical).abs().max().item()
        near = (out[n].double() - lerp(a, b, t).double()).abs().max().item()
        assert far > 20 * near, (n, far, near)


def test_slerp_of_identical_models_is_the_base(zoo):
    res, out = merge(zoo, "slerp", ["same"], g={"t": 0.7})
    for n in SHAPES:
        assert torch.equal(out[n], zoo.t["base"][n]), n
    merged, base = zoo.repo.commit(res.commit.hex()).commit, zoo.repo.commit("base").commit
    with zoo.repo.store.read() as r:
        assert r.object(merged.snapshot).tensors == r.object(base.snapshot).tensors


# ---------------------------------------------------------------------------- nuslerp

@pytest.mark.parametrize("with_base", [True, False], ids=["base", "no-base"])
@pytest.mark.parametrize("flatten,row_wise", [(True, False), (False, False), (False, True)],
                         ids=["flatten", "rows", "columns"])
def test_nuslerp(zoo, with_base, flatten, row_wise):
    w1, w2 = 0.3, 0.5
    _, out = merge(zoo, "nuslerp", ["e1", "e2"], base="base" if with_base else None,
                   p=[{"weight": w1}, {"weight": w2}],
                   g={"nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise})
    bad = []
    for n in SHAPES:
        want = ref_nuslerp(zoo.t["base"][n] if with_base else None, zoo.t["e1"][n], zoo.t["e2"][n],
                           w1, w2, flatten, row_wise)
        if not torch.allclose(out[n], want, **TOL):
            bad.append(f"{n} {tuple(SHAPES[n])}: max |diff| {(out[n] - want).abs().max().item():.3g}")
    assert not bad, "differs from the whole-tensor reference:\n" + "\n".join(bad)


@pytest.mark.parametrize("row_wise", [False, True], ids=["rows", "columns"])
def test_nuslerp_lines_of_tensors_inside_one_chunk(tmp_path, row_wise):
    """Small tensors (one chunk each): a 1-D vector is a single line in every mode (§4: the
    last axis, or axis 0, of a 1-D tensor is the whole tensor); an [8, 16] weight has 8 rows
    or 16 columns."""
    g = torch.Generator().manual_seed(77)
    shapes = {"v": (64,), "w": (8, 16)}
    models = {k: {n: torch.randn(s, generator=g) for n, s in shapes.items()} for k in ("base", "a", "b")}
    with Repo.init(tmp_path / "repo", chunk_size=CHUNK) as repo:
        for k, tensors in models.items():
            repo.add(_write(tmp_path / k, tensors), k)
        req = MergeRequest("nuslerp", "base", ["a", "b"], [{"weight": 1.0}, {"weight": 3.0}],
                           {"nuslerp_flatten": False, "nuslerp_row_wise": row_wise}, "F32", None, 0)
        repo.merge(req, "m")
        repo.checkout("m", tmp_path / "out")
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    for n in shapes:
        want = ref_nuslerp(models["base"][n], models["a"][n], models["b"][n], 1.0, 3.0, False, row_wise)
        assert_close(out[n], want, n)


# ---------------------------------------------------------------------------- model_stock

@pytest.mark.parametrize("filter_wise", [False, True], ids=["tensor", "filter_wise"])
def test_model_stock(zoo, filter_wise):
    names = ["e1", "e2", "e3"]
    _, out = merge(zoo, "model_stock", names, g={"filter_wise": filter_wise})
    bad = []
    for n in SHAPES:
        want = ref_model_stock(zoo.t["base"][n], [zoo.t[m][n] for m in names], filter_wise)
        if not torch.allclose(out[n], want, **TOL):
            bad.append(f"{n} {tuple(SHAPES[n])}: max |diff| {(out[n] - want).abs().max().item():.3g}")
    assert not bad, "differs from the whole-tensor reference:\n" + "\n".join(bad)


def test_model_stock_of_two_with_one_equal_to_the_base_keeps_the_base(zoo):
    """§5: a zero offset has cosine 0 with everything; with N = 2 that makes t = 0."""
    _, out = merge(zoo, "model_stock", ["e1", "same"])
    for n in SHAPES:
        assert torch.equal(out[n], zoo.t["base"][n]), n


# ---------------------------------------------------------------------------- random methods

RANDOM = ["dare_linear", "dare_ties", "della", "della_linear"]


def _kept(out: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    return out != base


@pytest.mark.parametrize("method", RANDOM)
def test_random_methods_keep_density_and_match_l1(zoo, method):
    """One expert, weight 1: the output is base + delta*mask*scale. The kept fraction is the
    density within 5 sigma; with rescale (the default for all four) every tensor's kept delta
    has the whole delta's L1 norm, by one factor per tensor (§2.5)."""
    density = 0.3
    p = [{"weight": 1.0, "density": density, **({"epsilon": 0.1} if "della" in method else {})}]
    _, out = merge(zoo, method, ["e1"], p=p, seed=11)
    for n in (GATE, Q, UP, EMBED, NORM):
        base, d = zoo.t["base"][n], zoo.t["e1"][n] - zoo.t["base"][n]
        kept = _kept(out[n], base)
        frac, sigma = kept.double().mean().item(), math.sqrt(density * (1 - density) / d.numel())
        assert abs(frac - density) < 5 * sigma, (n, frac)
        got = (out[n].double() - base.double())
        assert got.abs().sum().item() == pytest.approx(d.double().abs().sum().item(), rel=1e-5), n
        scale = d.double().abs().sum() / d.double()[kept].abs().sum()
        big = kept & (d.abs() > 1e-2)
        assert torch.allclose(got[big] / d.double()[big], scale.expand(int(big.sum())), rtol=1e-4), n
    # The masks of neighbouring chunks are not one pattern repeated.
    k = _kept(out[GATE], zoo.t["base"][GATE]).flatten()
    assert not torch.equal(k[:1024], k[1024:2048])


@pytest.mark.parametrize("method", ["dare_linear", "della_linear"])
def test_random_methods_without_rescale_keep_the_delta_as_is(zoo, method):
    p = [{"weight": 1.0, "density": 0.5, **({"epsilon": 0.2} if "della" in method else {})}]
    _, out = merge(zoo, method, ["e2"], p=p, g={"rescale": False}, seed=3)
    for n in SHAPES:
        base, full = zoo.t["base"][n], zoo.t["base"][n] + (zoo.t["e2"][n] - zoo.t["base"][n])
        kept = _kept(out[n], base)
        assert torch.equal(out[n][kept], full[kept]), n
        if n not in (DOWN, LN):
            assert 0.3 < kept.double().mean().item() < 0.7, n


def test_della_keep_probability_rises_with_magnitude_rank_within_rows(zoo):
    """§2.7: p = density - eps + 2 eps * rank/(m-1), the rank of |delta| within its row."""
    density, eps = 0.5, 0.4
    _, out = merge(zoo, "della_linear", ["e1"], p=[{"weight": 1.0, "density": density, "epsilon": eps}], seed=5)
    d = zoo.t["e1"][GATE] - zoo.t["base"][GATE]
    kept = _kept(out[GATE], zoo.t["base"][GATE]).double()
    m = d.shape[1]
    rank = d.abs().argsort(dim=1).argsort(dim=1).double() / (m - 1)  # 0 smallest .. 1 largest in its row
    for lo in (0.0, 0.25, 0.5, 0.75):
        sel = (rank >= lo) & (rank < lo + 0.25) if lo < 0.75 else rank >= lo
        expect = (density - eps + 2 * eps * rank[sel]).mean().item()
        got = kept[sel].mean().item()
        sigma = math.sqrt(expect * (1 - expect) / int(sel.sum()))
        assert abs(got - expect) < 5 * sigma, (lo, got, expect)


def test_della_ranks_a_vector_as_a_whole(zoo):
    """§2.7: a 1-D tensor is one line; with |delta| growing along the 3000-element vector, the
    keep probability grows from density-eps at its start to density+eps at its end, across its
    three chunks (not within each chunk separately)."""
    density, eps = 0.5, 0.4
    _, out = merge(zoo, "della_linear", ["ramp"], p=[{"weight": 1.0, "density": density, "epsilon": eps}],
                   g={"rescale": False}, seed=9)
    kept = _kept(out[NORM], zoo.t["base"][NORM]).double()
    n = kept.numel()
    p = density - eps + 2 * eps * torch.arange(n, dtype=torch.float64) / (n - 1)
    for a, b in ((0, 1024), (1024, 2048), (2048, n)):
        expect, got = p[a:b].mean().item(), kept[a:b].mean().item()
        sigma = math.sqrt(expect * (1 - expect) / (b - a))
        assert abs(got - expect) < 5 * sigma, f"elements [{a}, {b}): kept {got:.3f}, expected {expect:.3f}"


@pytest.mark.parametrize("method", RANDOM)
def test_random_methods_are_determined_by_the_seed(zoo, method):
    p = [{"weight": 0.6, "density": 0.4}, {"weight": 0.4, "density": 0.6}]
    first, _ = merge(zoo, method, ["e1", "e2"], p=p, seed=7)
    again, _ = merge(zoo, method, ["e1", "e2"], p=p, seed=7, threads=1)
    other, _ = merge(zoo, method, ["e1", "e2"], p=p, seed=8)
    snap = lambda r: zoo.repo.commit(r.commit.hex()).commit.snapshot  # noqa: E731
    assert snap(first) == snap(again)
    assert snap(first) != snap(other)
