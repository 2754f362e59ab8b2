"""MergeKit configs with `slices:` and multi-stage configs, against MergeKit 0.1.5.

Published configs stack layer ranges (frankenmerges with passthrough), interleave or repeat them,
give each source its own range, and set parameters per slice or per source. Each config here is
merged by MergeKit (tests/mergekit_driver.py, one process) and by mpstore (the same YAML with refs),
and the outputs must have the same tensor names, bit-equal tensors, and config.json must give the
same layer count and dtype. The family has 8 layers so ranges can overlap, repeat and interleave.
It is llama-shaped: MergeKit 0.1.5 under transformers 5 cannot save a qwen2 config whose layer
count changed (Qwen2Config derives `layer_types` from the old count and then refuses to save).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import load_dir
from make_family import make_family
from mergekit_oracle import E1, E2, B, require_mergekit, running

from mpstore import Repo
from mpstore.errors import BadMerge
from mpstore.merge.request import from_yaml, stages

require_mergekit(module=True)

LAYERS = 8
FAMILY = {"arch": "llama", "hidden": 64, "layers": LAYERS, "vocab": 96, "dtype": "bf16", "experts": 2,
          "kinds": ("dense", "partial"), "seed": 7}


def src(model: str, first: int, end: int, **params) -> dict:
    return {"model": model, "layer_range": [first, end], **({"parameters": params} if params else {})}


CONFIGS: dict[str, dict] = {
    # the usual published gradient slerp: one full-range slice, t by filter and layer gradient
    "gradient_slerp": {
        "slices": [{"sources": [src(B, 0, LAYERS), src(E1, 0, LAYERS)]}],
        "merge_method": "slerp", "base_model": B,
        "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                             {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]},
        "dtype": "bfloat16"},
    # a frankenmerge: stack, overlap and repeat ranges of two models (12 output layers)
    "stack_passthrough": {
        "slices": [{"sources": [src(B, 0, 5)]}, {"sources": [src(E1, 3, 8)]}, {"sources": [src(B, 6, 8)]}],
        "merge_method": "passthrough", "dtype": "bfloat16"},
    # fewer layers than the inputs: a pruned model (layers 0-2 and 6-7)
    "prune_passthrough": {
        "slices": [{"sources": [src(E2, 0, 3)]}, {"sources": [src(E2, 6, 8)]}],
        "merge_method": "passthrough", "dtype": "float32"},
    # per-source ranges: each output layer mixes different layers of the two models
    "shifted_linear": {
        "slices": [{"sources": [src(E1, 0, 4, weight=0.7), src(E2, 4, 8, weight=0.3)]}],
        "merge_method": "linear", "dtype": "float32"},
    # per-slice and per-source parameters over a base, with the base a source of each slice
    "sliced_task_arithmetic": {
        "slices": [{"sources": [src(B, 0, 4), src(E1, 0, 4, weight=[0.2, 0.8]), src(E2, 0, 4)],
                    "parameters": {"weight": 0.5}},
                   {"sources": [src(B, 4, 8), src(E1, 4, 8), src(E2, 4, 8, weight=-0.3)],
                    "parameters": {"weight": 0.9, "lambda": 1.5}}],
        "merge_method": "task_arithmetic", "base_model": B, "parameters": {"weight": 0.1},
        "dtype": "float32", "out_dtype": "bfloat16"},
}

STAGED = [  # mergekit-multi: the second stage uses the first by its name
    {"name": "stage-one", "merge_method": "linear", "dtype": "float32",
     "models": [{"model": E1, "parameters": {"weight": 0.6}}, {"model": E2, "parameters": {"weight": 0.4}}]},
    {"merge_method": "slerp", "base_model": B, "dtype": "float32",
     "slices": [{"sources": [src(B, 0, LAYERS), src("stage-one", 0, LAYERS)]}],
     "parameters": {"t": [0.1, 0.9]}},
]


def _with(doc: object, names: dict[str, str]) -> object:
    """The config with model keys replaced (folders for MergeKit, refs for mpstore)."""
    if isinstance(doc, dict):
        return {k: (names.get(v, v) if k in ("model", "base_model") and isinstance(v, str) else _with(v, names))
                for k, v in doc.items()}
    if isinstance(doc, list):
        return [_with(v, names) for v in doc]
    return doc


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mkslices")
    fam = make_family(root / "fam", **FAMILY)
    jobs, mk, mp_yaml = [], {}, {}
    for name, cfg in CONFIGS.items():
        (root / f"{name}.mk.yml").write_text(yaml.safe_dump(_with(cfg, {k: str(v) for k, v in fam.items()})))
        mp_yaml[name] = root / f"{name}.mp.yml"
        mp_yaml[name].write_text(yaml.safe_dump(_with(cfg, {k: f"f-{k}" for k in fam})))
        mk[name] = root / "mk" / name
        jobs.append({"name": name, "config": str(root / f"{name}.mk.yml"), "out": str(mk[name]), "seed": None})
    # MergeKit's multi-stage tool writes stage one to a folder the second names; the same by hand
    stage_one = root / "mk" / "stage-one"
    for i, doc in enumerate(STAGED):
        names = {k: str(v) for k, v in fam.items()} | {"stage-one": str(stage_one)}
        (root / f"staged{i}.mk.yml").write_text(yaml.safe_dump(_with(doc, names)))
        jobs.append({"name": f"staged{i}", "config": str(root / f"staged{i}.mk.yml"),
                     "out": str(stage_one if i == 0 else root / "mk" / "staged"), "seed": None})
    out = {}
    with running(jobs, root) as driver:
        with Repo.init(root / "repo", chunk_size=4096) as repo:  # small chunks: tensors span blocks
            for key, path in fam.items():
                repo.add(path, f"f-{key}", base=None if key == B else f"f-{B}")
            for name in CONFIGS:
                repo.merge(from_yaml(mp_yaml[name]), f"m-{name}", threads=2)
                repo.checkout(f"m-{name}", root / "mp" / name)
                out[name] = root / "mp" / name
            multi = root / "staged.mp.yml"
            multi.write_text(yaml.safe_dump_all([_with(d, {k: f"f-{k}" for k in fam}) for d in STAGED]))
            done = repo.merge_stages(stages(multi), "m-staged", threads=2)
            repo.checkout("m-staged", root / "mp" / "staged")
            out["staged"] = root / "mp" / "staged"
            replay = repo.replay("m-staged")
        result = driver.finish()
    mk["staged"] = root / "mk" / "staged"
    return {"mk": mk, "mp": out, "jobs": result["jobs"], "stages": done, "replay": replay, "root": root}


@pytest.mark.parametrize("name", [*CONFIGS, "staged"])
def test_sliced_configs_match_mergekit(runs, name):
    for job, info in runs["jobs"].items():
        if job == name or (name == "staged" and job.startswith("staged")):
            assert info["error"] is None, f"MergeKit failed on {job}:\n{info['error']}"
    mk, mp = load_dir(runs["mk"][name]), load_dir(runs["mp"][name])
    assert sorted(mk) == sorted(mp), f"only MergeKit: {sorted(set(mk) - set(mp))[:5]}, only mpstore: {sorted(set(mp) - set(mk))[:5]}"
    for n in mk:
        assert mk[n].dtype == mp[n].dtype and mk[n].shape == mp[n].shape, n
        same = (mk[n].view(torch.uint8) == mp[n].view(torch.uint8)).all() if mk[n].numel() else True
        assert same, f"{name}: {n} differs from MergeKit's ({(mk[n].float() - mp[n].float()).abs().max():.3g} at most)"
    cm = json.loads((runs["mk"][name] / "config.json").read_text())
    cp = json.loads((runs["mp"][name] / "config.json").read_text())
    assert cp["num_hidden_layers"] == cm["num_hidden_layers"]
    assert cp.get("torch_dtype", cp.get("dtype")) == cm.get("torch_dtype", cm.get("dtype"))
    for key, value in cp.items():  # per-layer lists follow the layers
        if isinstance(value, list) and key in cm and len(cm[key]) == cm["num_hidden_layers"]:
            assert len(value) == cp["num_hidden_layers"], key


def test_stacked_layers_are_renamed_copies(runs):
    """Output layer 5 of the stack is expert-1's layer 3, bit for bit: the same stored tensor."""
    out = load_dir(runs["mp"]["stack_passthrough"])
    e1 = load_dir(Path(runs["root"]) / "fam" / E1)
    assert max(int(n.split(".")[2]) for n in out if ".layers." in n) == 11
    name = "model.layers.{}.mlp.down_proj.weight"
    assert torch.equal(out[name.format(5)], e1[name.format(3)])
    with Repo.open(Path(runs["root"]) / "repo") as repo, repo.store.read() as r:
        merged = r.snapshot_of(repo.resolve("m-stack_passthrough")).tensors
        source = r.snapshot_of(repo.resolve(f"f-{E1}")).tensors
    assert merged[name.format(5)] == source[name.format(3)]  # the input's tensor itself: nothing read or written


def test_stages_commit_on_their_branches_and_replay_as_a_chain(runs):
    first, last = runs["stages"]
    assert first.plan.method == "linear" and last.plan.method == "slerp"
    assert first.commit in last.plan.models
    replay = runs["replay"]
    assert replay.all_identical and [r.commit for r in replay.chain] == [first.commit]


def test_bad_slices_are_refused_in_one_line(tmp_path):
    cases = {
        "slices[0]: its sources give different numbers of layers": {
            "merge_method": "linear", "slices": [{"sources": [src(E1, 0, 4), src(E2, 0, 3)]}]},
        "layer_range is [FIRST, END]": {"merge_method": "passthrough", "slices": [{"sources": [
            {"model": E1, "layer_range": [0]}]}]},
        "is empty or negative": {"merge_method": "passthrough", "slices": [{"sources": [src(E1, 4, 4)]}]},
        "ignores residual_weight": {"merge_method": "passthrough",
                                    "slices": [{"sources": [src(E1, 0, 2)], "residual_weight": 0.5}]},
        "exactly one of models or slices": {"merge_method": "linear", "models": [{"model": E1}],
                                            "slices": [{"sources": [src(E1, 0, 2)]}]},
    }
    for i, (message, doc) in enumerate(cases.items()):
        path = tmp_path / f"{i}.yml"
        path.write_text(yaml.safe_dump(doc))
        with pytest.raises(BadMerge, match=message.replace("[", r"\[").replace("]", r"\]")) as e:
            from_yaml(path)
        assert "\n" not in str(e.value)


def test_a_range_past_the_model_is_refused_before_any_write(runs, tmp_path):
    path = tmp_path / "past.yml"
    path.write_text(yaml.safe_dump({"merge_method": "passthrough", "slices": [{"sources": [src(f"f-{E1}", 4, 12)]}]}))
    with Repo.open(Path(runs["root"]) / "repo") as repo:
        before = repo.branches()
        with pytest.raises(BadMerge, match="goes past the 8 layers"):
            repo.merge(from_yaml(path), "never")
        assert repo.branches() == before
