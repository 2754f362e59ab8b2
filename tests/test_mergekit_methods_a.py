"""passthrough, nearswap, arcee_fusion and sce: bit-equal to MergeKit 0.1.5, and their edge cases.

One small generated family (qwen2-shaped, float32: a base, a dense, a partial and a LoRA
expert; 8 layers for gradients) is merged by MergeKit (one driver process, tests/mergekit_driver.py)
and by mpstore (in-process, through `Repo.merge`) with the same YAML, each config under
`dtype: float32`, `bfloat16` and `float16`, written as float32 (`out_dtype: float32`) so that no
output rounding hides a difference. mpstore runs in a repository with 1 MiB chunks (every tensor
one block) and one with 4 KiB chunks (the elementwise methods and sce's sums of squares stream
over many blocks; arcee_fusion and sce's variance selection take the whole tensor).

The contract: every element bit-equal to MergeKit's, in every dtype and both repositories, except
sce without selection in the 4 KiB repository under float32, where a tensor's sums of squares are
added over blocks in float64 instead of in torch's float32 order: its weights may differ in the
last bit, so its elements are allowed F32_ULPS float32 ulps of the largest operand (every other
case must be bit-equal; the test prints what it measured). Tensors every input shares with the
base go through the compute dtype as in MergeKit (nearswap_partial and arcee_fusion_lora in 16-bit
compute over float32 checkpoints: the executor reuses a stored tensor only when the compute dtype
holds it exactly).

Configs MergeKit refuses (input counts, a missing `t`) are refused by both tools.
The edge-case tests (bad parameters, identical inputs, budgets) need only mpstore and always run;
the differential tests skip without the MergeKit venv (`make mergekit-venv`), unless CI is set.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from conftest import load_dir, stored_tensors, tensors_of
from make_family import make_family
from mergekit_oracle import E1, E2, E3, MERGEKIT_VERSION, B, config_doc, running
from safetensors.torch import save_file

from mpstore import Repo
from mpstore.errors import BadMerge, MpError
from mpstore.merge.request import MergeRequest, from_yaml

FAMILY = {"arch": "qwen2", "hidden": 64, "layers": 8, "vocab": 128, "dtype": "f32", "experts": 3,
          "kinds": ("dense", "partial", "lora"), "seed": 7}
CHUNKS = {"chunk1m": 1 << 20, "chunk4k": 4096}
DTYPES = ("float32", "bfloat16", "float16")
AGAIN = "base-again"  # a second branch on the base's commit
F32_ULPS = 4


@dataclass(frozen=True)
class Case:
    method: str
    models: tuple[tuple[str, dict | None], ...]
    base: str | None = B
    parameters: dict | None = None

    def doc(self, where: dict[str, str], dtype: str) -> dict:
        return config_doc(self.method, self.models, where, base=self.base, parameters=self.parameters,
                          dtype=dtype, out_dtype="float32")


# Filters fall through to the default (passthrough: no scale); gradients run over 8 layers.
CASES = {
    "passthrough": Case("passthrough", ((E1, {"scale": [{"filter": "mlp", "value": 0.5},
                                                        {"filter": "self_attn", "value": [2.0, -1.0]}]}),),
                        base=None),
    # the base listed as the one model; a global scale
    "passthrough_global": Case("passthrough", ((B, None),), parameters={"scale": 1.5}),
    "passthrough_plain": Case("passthrough", ((E2, None),), base=None),
    # t = 3e-7 gives w = 0.3 where the model equals the base: 0.3·B + 0.7·B need not be B
    "nearswap": Case("nearswap", ((B, None), (E1, None)),
                     parameters={"t": [{"filter": "mlp", "value": 1e-3},
                                       {"filter": "self_attn", "value": [1e-4, 0.02]}, {"value": 3e-7}]}),
    # the partial expert leaves half the layers as the base's: equal tensors at t >= 1e-5 are
    # copied (the identity shortcut), at t = 3e-7 (the layer norms) computed
    "nearswap_partial": Case("nearswap", ((E2, None),),
                             parameters={"t": [{"filter": "layernorm", "value": 3e-7}, {"value": 0.002}]}),
    "arcee_fusion": Case("arcee_fusion", ((E1, None),)),
    "arcee_fusion_lora": Case("arcee_fusion", ((B, None), (E3, None))),
    "sce": Case("sce", ((E1, None), (E2, None), (E3, None))),
    "sce_select": Case("sce", ((E1, None), (E2, None), (E3, None)),
                       parameters={"select_topk": [{"filter": "mlp", "value": 0.5},
                                                   {"filter": "self_attn", "value": [0.1, 1.0]}, {"value": 0.3}]}),
    "sce_int8": Case("sce", ((E1, None), (E3, None)), parameters={"int8_mask": True, "select_topk": 0.7}),
}
# What MergeKit's input contracts refuse; mpstore must refuse them too.
REFUSED = {
    "passthrough_two": Case("passthrough", ((E1, None), (E2, None)), base=None),
    "passthrough_with_base": Case("passthrough", ((E1, None),)),  # the base is a second input
    "nearswap_two": Case("nearswap", ((E1, None), (E2, None)), parameters={"t": 0.01}),
    "nearswap_no_t": Case("nearswap", ((E1, None),)),
    "arcee_fusion_no_base": Case("arcee_fusion", ((E1, None), (E2, None)), base=None),
}
JOBS = [f"{name}@{dtype}" for name in CASES for dtype in DTYPES]


def _stream_f32(job: str) -> bool:
    """sce without selection under float32: weights from float64 sums over blocks (see top)."""
    name, dtype = job.split("@")
    return name == "sce" and dtype == "float32"


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    return make_family(tmp_path_factory.mktemp("family-a"), **FAMILY)


@pytest.fixture(scope="module")
def repos(family, tmp_path_factory):
    """Both repositories with the family added; `base-again` names the base's commit, so the base
    can be an input besides being the base."""
    root = tmp_path_factory.mktemp("repos-a")
    out = {}
    for variant, chunk in CHUNKS.items():
        repo = Repo.init(root / variant, chunk_size=chunk)
        for key, path in family.items():
            repo.add(path, key, base=None if key == B else B)
        repo.create_branch(AGAIN, B)
        out[variant] = repo
    yield out
    for repo in out.values():
        repo.close()


def _configs(root: Path, where: dict[str, str], tool: str) -> dict[str, Path]:
    """Every job's YAML for one tool (`where`: model key -> folder or ref)."""
    todo = [(job, CASES[job.split("@")[0]], job.split("@")[1]) for job in JOBS]
    todo += [(name, case, "float32") for name, case in REFUSED.items()]
    out = {}
    for job, case, dtype in todo:
        out[job] = root / f"{job}.{tool}.yml"
        out[job].write_text(yaml.safe_dump(case.doc(where, dtype), sort_keys=False))
    return out


@pytest.fixture(scope="module")
def driver(family, tmp_path_factory):
    """MergeKit running every job in one background process, started before mpstore's merges so
    that both run at once."""
    root = tmp_path_factory.mktemp("mergekit-a")
    configs = _configs(root, {k: str(v) for k, v in family.items()}, "mergekit")
    jobs = [{"name": job, "config": str(c), "out": str(root / "out" / job), "seed": None} for job, c in configs.items()]
    with running(jobs, root) as driver:
        yield driver


@dataclass
class Merged:
    out: dict[tuple[str, str], Path]  # (variant, job) -> mpstore's checkout
    refused: dict[str, str]  # REFUSED config -> mpstore's message
    seconds: float


@pytest.fixture(scope="module")
def merged(repos, tmp_path_factory) -> Merged:
    """mpstore's merge of every job in both repositories, through the YAML front door."""
    began = time.perf_counter()
    root = tmp_path_factory.mktemp("mpstore-a")
    configs = _configs(root, {k: k for k in (B, E1, E2, E3)}, "mpstore")
    out, refused = {}, {}
    for variant, repo in repos.items():
        for job in JOBS:
            branch = "a-" + job.replace("@", "-")
            repo.merge(from_yaml(configs[job]), branch, threads=2)
            out[variant, job] = root / variant / job
            repo.checkout(branch, out[variant, job])
    for name in REFUSED:
        with pytest.raises(BadMerge) as e:
            repos["chunk1m"].merge(from_yaml(configs[name]), "refused-" + name)
        refused[name] = str(e.value)
    return Merged(out, refused, time.perf_counter() - began)


@pytest.fixture(scope="module")
def mergekit(driver, merged) -> dict:
    """MergeKit's result.json, once it has finished (mpstore's merges ran meanwhile)."""
    began = time.perf_counter()
    info = driver.finish()
    print(f"\n[mergekit methods a] mpstore {merged.seconds:.1f}s; MergeKit finished "
          f"{time.perf_counter() - began:.1f}s later ({sum(j['seconds'] for j in info['jobs'].values()):.1f}s merging)")
    return info


# ------------------------------------------------------------------------------ differential


def test_oracle_is_mergekit_0_1_5(mergekit):
    assert mergekit["mergekit"] == MERGEKIT_VERSION, mergekit
    assert mergekit["torch"] == torch.__version__, "bit-equality needs the same torch kernels"


def _ulps_off(a: torch.Tensor, b: torch.Tensor, inputs: list[torch.Tensor]) -> torch.Tensor:
    """|a - b| in float32 ulps of the largest operand (the inputs and a) per element."""
    scale = torch.stack([x.abs() for x in inputs] + [a.abs()]).amax(0).double()
    return (a.double() - b.double()).abs() / (torch.finfo(torch.float32).eps * scale)


@pytest.mark.parametrize("variant", CHUNKS)
@pytest.mark.parametrize("job", JOBS)
def test_matches_mergekit_bit_for_bit(mergekit, driver, merged, family, variant, job):
    error = mergekit["jobs"][job]["error"]
    assert error is None, f"MergeKit failed on {job}:\n{error}"
    mk, mp = load_dir(driver.out[job]), load_dir(merged.out[variant, job])
    assert sorted(mk) == sorted(mp)
    inputs = [load_dir(p) for p in family.values()] if _stream_f32(job) else []
    total = equal = 0
    worst = 0.0
    bad = []
    for n in sorted(mk):
        a, b = mk[n], mp[n]
        assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape, (n, a.dtype, b.dtype)
        same = a.view(torch.int32) == b.view(torch.int32)
        total += a.numel()
        equal += int(same.sum())
        if bool(same.all()):
            continue
        if inputs:
            off = float(_ulps_off(a, b, [x[n] for x in inputs]).max())
            worst = max(worst, off)
            if variant == "chunk4k" and off <= F32_ULPS:
                continue
        i = int((~same).reshape(-1).nonzero()[0])
        bad.append(f"{n}: {int((~same).sum())}/{a.numel()} differ (first at flat {i}: MergeKit "
                   f"{a.reshape(-1)[i].item()!r}, mpstore {b.reshape(-1)[i].item()!r})")
    print(f"\n[{variant} {job}] {100 * equal / total:.4f}% of {total} elements bit-equal"
          + (f", the others at most {worst:.2f} float32 ulps off" if inputs else ""))
    assert not bad, f"{job} in {variant}: mpstore differs from MergeKit:\n  " + "\n  ".join(bad[:10])


@pytest.mark.parametrize("name", REFUSED)
def test_both_refuse_what_mergekit_refuses(mergekit, merged, name):
    assert mergekit["jobs"][name]["error"] is not None, f"MergeKit accepted {name}"
    message = merged.refused[name]
    assert message and "\n" not in message, message


# ------------------------------------------------------------------------------ mpstore alone


@pytest.mark.parametrize("job", [j for j in JOBS if not _stream_f32(j)])
def test_blocks_do_not_change_the_result(merged, job):
    """A 4 KiB-chunk repository streams the elementwise methods and sce's sums over many blocks:
    the result is the 1 MiB repository's (one block per tensor), bit for bit."""
    one, many = load_dir(merged.out["chunk1m", job]), load_dir(merged.out["chunk4k", job])
    assert sorted(one) == sorted(many)
    for n in one:
        assert torch.equal(one[n].view(torch.int32), many[n].view(torch.int32)), n


def _request(method: str, models: list[str], base: str | None = B, p: list[dict] | None = None,
             g: dict | None = None) -> MergeRequest:
    return MergeRequest(method, base, models, p or [{} for _ in models], g or {})


@pytest.mark.parametrize("request_, fragment", [
    (_request("nearswap", [E1], g={"t": 0}), "nearswap t 0 on"),
    (_request("nearswap", [E1], g={"t": [{"filter": "mlp", "value": -0.1}, {"value": 0.1}]}), "must be > 0"),
    (_request("sce", [E1, E2], g={"select_topk": 0}), "select_topk 0 on"),
    (_request("sce", [E1, E2], g={"select_topk": 1.5}), "outside (0, 1]"),
    (_request("sce", [E1, E2], p=[{"weight": 1.0}, {}]), "sce has no parameter 'weight'"),
    (_request("passthrough", [E1, E2], base=None), "exactly 1 model"),
    (_request("passthrough", [E1]), "exactly 1 model"),  # the base is a second input
    (_request("arcee_fusion", [E1, E2]), "exactly 1 model"),
    (_request("arcee_fusion", [E1], base=None), "needs a base model"),
    (_request("nearswap", [E1]), "needs parameter 't'"),
    (_request("passthrough", [E1], base=None, p=[{"scale": "big"}]), "expected a number"),
])
def test_bad_parameters_are_refused_in_one_line(repos, request_, fragment):
    repo = repos["chunk4k"]
    before = repo.branches()
    with pytest.raises(MpError) as e:  # BadMerge, or BadParameter for a value's type
        repo.merge(request_, "refused")
    message = str(e.value)
    assert fragment in message and "\n" not in message, message
    assert repo.branches() == before


@pytest.mark.parametrize("method", ["passthrough", "nearswap", "arcee_fusion", "sce"])
def test_budgets_do_not_apply(repos, method):
    """None of the four is additive over deltas read chunk by chunk (passthrough has no base;
    the others weigh, rank or mix elements across the whole tensor): a budget is refused."""
    models, base = ([E1], None) if method == "passthrough" else ([E1, E2] if method == "sce" else [E1], B)
    g = {"t": 0.01} if method == "nearswap" else {}
    with pytest.raises(BadMerge, match="--budget needs a method that merges deltas"):
        repos["chunk4k"].plan(_request(method, models, base, g=g), budget="50%")


@pytest.mark.parametrize("method, g", [("nearswap", {"t": 0.01}), ("arcee_fusion", {}), ("sce", {}),
                                       ("sce", {"select_topk": 0.5})])
def test_inputs_equal_to_the_base_give_the_base_itself(repos, method, g):
    """Every delta zero: the output is the base, stored as the base's own tensor objects (the
    executor copies them without computing) when the dtype does not change."""
    repo = repos["chunk4k"]
    models = [AGAIN, AGAIN] if method == "sce" else [AGAIN]
    branch = f"same-{method}-{len(g)}"
    repo.merge(_request(method, models, g=g), branch)
    assert stored_tensors(repo, branch) == stored_tensors(repo, B)


def test_passthrough_scale_is_applied_even_to_a_lone_input(repos, tmp_path):
    """With one input every block "equals the first input", yet scale 2 doubles it (no identity
    shortcut), exactly, in the compute dtype; scale 1 (the default) gives the input's own chunks."""
    repo = repos["chunk4k"]
    repo.merge(_request("passthrough", [E1], None, p=[{"scale": [{"filter": "mlp", "value": 2.0}]}]), "pt-scaled")
    got, e1 = tensors_of(repo, "pt-scaled", tmp_path), tensors_of(repo, E1, tmp_path)
    scaled = [n for n in got if "mlp" in n]
    assert scaled
    for n in got:
        assert torch.equal(got[n], e1[n] * 2 if n in scaled else e1[n]), n
    repo.merge(_request("passthrough", [E1], None), "pt-plain")
    stored, original = stored_tensors(repo, "pt-plain"), stored_tensors(repo, E1)
    assert {n: t.chunks for n, t in stored.items()} == {n: t.chunks for n, t in original.items()}


def test_nearswap_takes_close_values_and_moves_far_ones_by_t(tmp_path):
    """The rule on hand-picked values: |M - B| <= t takes M, farther moves B by t toward M."""
    base = torch.zeros(8)
    model = torch.tensor([0.001, -0.004, 0.005, 0.02, -0.5, 3.0, 0.0, 1e-9])
    for name, t in (("b", base), ("m", model)):
        (tmp_path / name).mkdir()
        save_file({"model.norm.weight": t}, str(tmp_path / name / "model.safetensors"))
        (tmp_path / name / "config.json").write_text('{"model_type": "qwen2", "torch_dtype": "float32"}\n')
    with Repo.init(tmp_path / "repo") as repo:
        repo.add(tmp_path / "b", "b")
        repo.add(tmp_path / "m", "m")
        repo.merge(_request("nearswap", ["m"], "b", g={"t": 0.005}), "ns")
        got = tensors_of(repo, "ns", tmp_path)["model.norm.weight"]
    want = torch.tensor([0.001, -0.004, 0.005, 0.005, -0.005, 0.005, 0.0, 1e-9])
    assert torch.allclose(got, want, rtol=1e-6, atol=0), got
