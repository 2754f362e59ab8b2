"""LoRA adapters: stored as commits of their own (`mp add ADAPTER --base MODEL`) and merged into a
model as MergeKit 0.1.5 does for a `model+adapter` reference (`mpstore.model.lora.apply`).

The adapters are PEFT folders written here (adapter_config.json + adapter_model.safetensors with
random A and B) for a small generated bf16 family with grouped-query attention, so q_proj is
square and k_proj / v_proj and the MLP are not. MergeKit merges `expert+adapter` (peft's
merge_and_unload, in its own virtualenv, through tests/mergekit_driver.py) in a `linear` merge
of that one reference with weight 1, which returns the merged model's tensors unchanged in the
dtype the adapter was merged in; mpstore's `apply` must give every tensor bit for bit.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml
from conftest import assert_user_error, load_dir, run_mp, tree_bytes
from make_family import make_family, write_lora_adapter
from mergekit_oracle import config_doc, running
from safetensors.torch import load_file, save_file

from mpstore import Repo
from mpstore.errors import BadMerge
from mpstore.merge.request import from_yaml
from mpstore.model import lora
from mpstore.progress import Silent
from mpstore.store.chunks import ChunkSink
from mpstore.store.dtypes import torch_dtype
from mpstore.store.objects import Tensor

FAMILY = {"arch": "qwen2", "hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "vocab": 128,
          "dtype": "bf16", "experts": 1, "kinds": ("dense",), "seed": 3}
SAFETENSORS_NAME = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}


@dataclass(frozen=True)
class Spec:
    """One adapter: the projections it adapts in every layer, its rank, the dtype of its A and B,
    its adapter_config.json entries over the defaults, and MergeKit's lora_merge_dtype."""

    modules: tuple[str, ...]
    rank: int
    dtype: torch.dtype
    config: dict = field(default_factory=dict)
    merge_dtype: str | None = None
    ranks: dict[str, int] = field(default_factory=dict)  # per projection, as the config's rank_pattern says


SPECS = {
    # the common case: a bf16 adapter on a bf16 model, merged in the dtype config.json names
    "bf16": Spec(("q_proj", "v_proj"), 4, torch.bfloat16, {"lora_alpha": 16}),
    # rsLoRA, merged in float32: every other tensor of the model is cast to float32 too
    "rslora_f32": Spec(("q_proj", "k_proj", "v_proj", "o_proj", "up_proj"), 8, torch.float32,
                       {"lora_alpha": 16, "use_rslora": True}, "float32"),
    # per-module ranks and alphas (regex patterns matched at the end of the module name)
    "patterns_f16": Spec(("q_proj", "v_proj", "down_proj"), 4, torch.bfloat16,
                         {"lora_alpha": 8, "rank_pattern": {"v_proj": 8},
                          "alpha_pattern": {"layers.1.self_attn.q_proj": 3.5, "down_proj": 2}},
                         "float16", {"v_proj": 8}),
    # fan_in_fan_out on Linear layers: peft ignores it, so does apply (their weights are not square)
    "fan_flag": Spec(("v_proj", "up_proj", "down_proj"), 2, torch.float16,
                     {"lora_alpha": 4, "fan_in_fan_out": True}, "bfloat16"),
}


def write_adapter(folder: Path, model: dict[str, torch.Tensor], spec: Spec, seed: int) -> Path:
    """A PEFT LoRA adapter folder for `model` as `spec` describes it."""
    return write_lora_adapter(folder, model, spec.modules, spec.rank, spec.dtype, spec.config, spec.ranks, seed)


GPT2_ADAPTED = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # attn.c_proj is square


def write_gpt2(root: Path) -> tuple[Path, Path]:
    """A one-layer GPT-2 saved as the original checkpoint is (names without `transformer.`, Conv1D
    weights stored in x out), and a LoRA adapter of its four Conv1D layers (fan_in_fan_out)."""
    g = torch.Generator().manual_seed(7)
    d, inner, vocab, positions = 32, 128, 64, 16
    shapes = {"wte.weight": (vocab, d), "wpe.weight": (positions, d), "ln_f.weight": (d,), "ln_f.bias": (d,),
              "h.0.ln_1.weight": (d,), "h.0.ln_1.bias": (d,), "h.0.ln_2.weight": (d,), "h.0.ln_2.bias": (d,),
              "h.0.attn.c_attn.weight": (d, 3 * d), "h.0.attn.c_attn.bias": (3 * d,),
              "h.0.attn.c_proj.weight": (d, d), "h.0.attn.c_proj.bias": (d,),
              "h.0.mlp.c_fc.weight": (d, inner), "h.0.mlp.c_fc.bias": (inner,),
              "h.0.mlp.c_proj.weight": (inner, d), "h.0.mlp.c_proj.bias": (d,)}
    model, adapter = root / "gpt2", root / "adapters" / "gpt2"
    model.mkdir(parents=True)
    save_file({n: 0.02 * torch.randn(s, generator=g) for n, s in shapes.items()}, str(model / "model.safetensors"))
    (model / "config.json").write_text(json.dumps({
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": d, "n_layer": 1, "n_head": 2,
        "n_positions": positions, "vocab_size": vocab, "torch_dtype": "float32"}))
    adapter.mkdir(parents=True)
    lora_weights = {}
    for module in GPT2_ADAPTED:
        inp, out = shapes[f"h.0.{module}.weight"]
        lora_weights[f"base_model.model.transformer.h.0.{module}.lora_A.weight"] = 0.05 * torch.randn(4, inp, generator=g)
        lora_weights[f"base_model.model.transformer.h.0.{module}.lora_B.weight"] = 0.05 * torch.randn(out, 4, generator=g)
    save_file(lora_weights, str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 6, "fan_in_fan_out": True,
        "target_modules": ["c_attn", "c_proj", "c_fc"], "bias": "none", "inference_mode": True}))
    return model, adapter


def values(repo: Repo, t: Tensor) -> torch.Tensor:
    """A tensor's values from its stored chunks."""
    with repo.store.read() as r:
        raw = bytearray(b"".join(bytes(r.chunk(k)) for k in t.chunks))
    return torch.frombuffer(raw, dtype=torch_dtype(t.dtype)).reshape(t.shape)


def applied(repo: Repo, model: str, adapter: str, dtype: str | None = None) -> lora.Applied:
    """`lora.apply` of two refs, its chunks flushed to the store."""
    sink = ChunkSink(repo.store, repo.chunk_size, Silent())
    with repo.store.read() as r:
        result = lora.apply(r, r.snapshot_of(repo.resolve(model)), r.snapshot_of(repo.resolve(adapter)), sink,
                            dtype, label=adapter)
    sink.flush()
    return result


@dataclass
class World:
    root: Path
    family: dict[str, Path]
    gpt2: Path
    adapters: dict[str, Path]  # SPECS' adapters of the family's expert, and "gpt2"
    repo: Repo
    applied: dict[str, lora.Applied]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("lora")
    family = make_family(root / "family", **FAMILY)
    expert = load_file(str(family["expert-1"] / "model.safetensors"))
    adapters = {name: write_adapter(root / "adapters" / name, expert, spec, seed)
                for seed, (name, spec) in enumerate(SPECS.items())}
    gpt2, adapters["gpt2"] = write_gpt2(root)
    repo = Repo.init(root / "repo")
    repo.add(family["base"], "base")
    repo.add(family["expert-1"], "expert", base="base")
    repo.add(gpt2, "gpt2")
    for name, folder in adapters.items():
        repo.add(folder, f"ad-{name}", base="gpt2" if name == "gpt2" else "expert")
    done = {name: applied(repo, "expert", f"ad-{name}",
                          SAFETENSORS_NAME[spec.merge_dtype] if spec.merge_dtype else None)
            for name, spec in SPECS.items()}
    done["gpt2"] = applied(repo, "gpt2", "ad-gpt2")
    yield World(root, family, gpt2, adapters, repo, done)
    repo.close()


# ------------------------------------------------------------------------------ storing


def test_add_show_checkout_adapter(world, tmp_path):
    """An adapter folder is an ordinary commit: `--base` is recorded, `show` lists its two
    files, `checkout` gives the folder back byte for byte."""
    folder = world.adapters["bf16"]
    repo_dir = tmp_path / "cli"
    repo_dir.mkdir()
    assert run_mp("init", cwd=repo_dir).returncode == 0
    assert run_mp("add", world.family["expert-1"], "-n", "expert", cwd=repo_dir).returncode == 0
    added = run_mp("add", folder, "-n", "ad", "--base", "expert", cwd=repo_dir)
    assert added.returncode == 0, added.stderr
    shown = run_mp("show", "ad", "--json", cwd=repo_dir)
    assert shown.returncode == 0, shown.stderr
    info = json.loads(shown.stdout)
    with Repo.open(repo_dir) as repo:
        assert info["base"] == repo.resolve("expert").hex()
    assert info["files"] == ["adapter_config.json", "adapter_model.safetensors"]
    assert info["tensors"] == 2 * 2 * len(SPECS["bf16"].modules)
    out = tmp_path / "out"
    assert run_mp("checkout", "ad", "-o", out, cwd=repo_dir).returncode == 0
    assert tree_bytes(out) == tree_bytes(folder)


# ------------------------------------------------------------------------------ applying


def test_apply_is_peft_arithmetic(world):
    """W + (B @ A) * alpha / r in float32, rounded once to the model's bf16; the other tensors
    are the model's own objects, and only adapted weights are new."""
    repo, result = world.repo, world.applied["bf16"]
    expert = load_file(str(world.family["expert-1"] / "model.safetensors"))
    adapter = load_file(str(world.adapters["bf16"] / "adapter_model.safetensors"))
    with repo.store.read() as r:
        own = {n: r.tensor(t) for n, t in r.snapshot_of(repo.resolve("expert")).tensors.items()}
    adapted = {f"model.layers.{i}.self_attn.{p}.weight" for i in range(2) for p in ("q_proj", "v_proj")}
    with repo.store.read() as r:
        assert lora.check(r, r.snapshot_of(repo.resolve("expert")), r.snapshot_of(repo.resolve("ad-bf16"))) == "BF16"
    assert result.dtype == "BF16"
    assert set(result.tensors) == set(own)
    assert {t.id for t in result.new} == {result.tensors[n].id for n in adapted}
    for name, t in result.tensors.items():
        if name not in adapted:
            assert t.id == own[name].id, name
            continue
        module = name.removesuffix(".weight")
        a = adapter[f"base_model.model.{module}.lora_A.weight"].float()
        b = adapter[f"base_model.model.{module}.lora_B.weight"].float()
        want = (expert[name].float() + (b @ a) * (16 / 4)).to(torch.bfloat16)
        got = values(repo, t)
        assert torch.equal(got, want), name
        assert not torch.equal(got, expert[name]), name  # the update is large enough to see


def test_apply_in_another_dtype_casts_every_float_tensor(world):
    """Merged in float32 (MergeKit's lora_merge_dtype), every tensor of the bf16 model is float32:
    unchanged ones exactly the bf16 values, adapted ones with the rsLoRA scale alpha / sqrt(r)."""
    repo, result = world.repo, world.applied["rslora_f32"]
    expert = load_file(str(world.family["expert-1"] / "model.safetensors"))
    adapter = load_file(str(world.adapters["rslora_f32"] / "adapter_model.safetensors"))
    assert result.dtype == "F32" and len(result.new) == len(result.tensors)
    for name, t in result.tensors.items():
        assert t.dtype == "F32"
        key = f"base_model.model.{name.removesuffix('.weight')}.lora_A.weight"
        want = expert[name].float()
        if key in adapter:
            b = adapter[key.replace("lora_A", "lora_B")]
            want = want + (b @ adapter[key]) * (16 / 8 ** 0.5)
        assert torch.equal(values(repo, t), want), name


def test_apply_conv1d_transposes(world):
    """GPT-2's Conv1D weights (in x out) get (B @ A) transposed, the square one too since the
    adapter says fan_in_fan_out; the adapter's `transformer.` modules find the checkpoint's
    bare names."""
    model = load_file(str(world.gpt2 / "model.safetensors"))
    adapter = load_file(str(world.adapters["gpt2"] / "adapter_model.safetensors"))
    result = world.applied["gpt2"]
    assert result.dtype == "F32" and len(result.new) == len(GPT2_ADAPTED)
    for module in GPT2_ADAPTED:
        key = f"base_model.model.transformer.h.0.{module}.lora_A.weight"
        delta = (adapter[key.replace("lora_A", "lora_B")] @ adapter[key]).T * (6 / 4)
        name = f"h.0.{module}.weight"
        assert torch.equal(values(world.repo, result.tensors[name]), model[name] + delta), name


def test_apply_across_chunks(world, tmp_path):
    """In a repository of 4 KiB chunks every adapted weight and every cast tensor spans several
    chunks: the values are the same as with whole-tensor chunks."""
    with Repo.init(tmp_path / "small", chunk_size=4096) as repo:
        repo.add(world.family["expert-1"], "expert")
        repo.add(world.adapters["rslora_f32"], "ad")
        result = applied(repo, "expert", "ad", "F32")
        assert max(len(t.chunks) for t in result.new) > 1
        for name, t in result.tensors.items():
            assert torch.equal(values(repo, t), values(world.repo, world.applied["rslora_f32"].tensors[name])), name


def test_load_dtype_follows_config(world, tmp_path):
    """Without lora_merge_dtype the model loads in config.json's `dtype` (before the older
    `torch_dtype`), else in its weights' dtype, as transformers' dtype="auto"."""
    with Repo.init(tmp_path / "r") as repo:
        for key, config in {"both": {"dtype": "float16", "torch_dtype": "float32"},
                            "old": {"torch_dtype": "float32"}, "none": {}}.items():
            folder = tmp_path / key
            shutil.copytree(world.family["expert-1"], folder)
            doc = json.loads((folder / "config.json").read_text())
            doc.pop("torch_dtype")
            (folder / "config.json").write_text(json.dumps({**doc, **config}))
            repo.add(folder, key)
        repo.add(world.adapters["bf16"], "ad")
        assert applied(repo, "both", "ad").dtype == "F16"
        assert applied(repo, "old", "ad").dtype == "F32"
        assert applied(repo, "none", "ad").dtype == "BF16"


def _broken(folder: Path, how: str) -> None:
    """Make a copied adapter folder into one `apply` must refuse."""
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    weights = load_file(str(folder / "adapter_model.safetensors"))
    first = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    if how == "no config":
        config_path.unlink()
        return
    if how in ("use_dora", "modules_to_save", "lora_bias"):
        config[how] = ["lm_head"] if how == "modules_to_save" else True
    elif how == "peft_type":
        config["peft_type"] = "IA3"
    elif how == "pissa":
        config["init_lora_weights"] = "pissa_niter_4"
    elif how == "bias":
        config["bias"] = "all"
    elif how == "rank":
        config["r"] = 3
    elif how == "alpha":
        config["lora_alpha"] = "16"
    elif how == "embedding":
        weights["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.zeros(4, 128)
    elif how == "magnitude":
        weights["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = torch.ones(64)
    elif how == "lonely":
        del weights[first]
    elif how == "unknown module":
        for key in (first, first.replace("lora_A", "lora_B")):
            weights[key.replace("layers.0", "layers.7")] = weights[key].clone()
    elif how == "rank shape":
        weights[first] = torch.zeros(3, 64, dtype=torch.bfloat16)
    elif how == "update shape":
        weights[first] = torch.zeros(4, 65, dtype=torch.bfloat16)
    config_path.write_text(json.dumps(config))
    save_file(weights, str(folder / "adapter_model.safetensors"))


@pytest.mark.parametrize("how, message", [
    ("no config", "is not a PEFT adapter: it has no adapter_config.json"),
    ("use_dora", "use_dora is set"),
    ("modules_to_save", "modules_to_save is set"),
    ("lora_bias", "lora_bias is set"),
    ("peft_type", "peft_type 'IA3' is not supported"),
    ("pissa", "rewrites the base weights"),
    ("bias", "trains the model's biases"),
    ("rank", "has rank 4 in its tensors, but its adapter_config.json says 3"),
    ("alpha", "lora_alpha in adapter_config.json must be a number"),
    ("embedding", "is not a LoRA A or B weight of a Linear layer"),
    ("magnitude", "lora_magnitude_vector"),
    ("lonely", "has no lora_A weight"),
    ("unknown module", "the model has no tensor 'model.layers.7.self_attn.q_proj.weight'"),
    ("rank shape", "not the float matrices"),
    ("update shape", "q_proj's update is [64, 65], but 'model.layers.0.self_attn.q_proj.weight' is BF16[64, 64]"),
])
def test_refusals(world, tmp_path, how, message):
    """What peft would merge differently, or not at all, is one BadMerge line naming it, from
    `check` (before a plan runs) as from `apply`, which writes no chunk then."""
    folder = tmp_path / "ad"
    shutil.copytree(world.adapters["bf16"], folder)
    _broken(folder, how)
    with Repo.init(tmp_path / "r") as repo:
        repo.add(world.family["expert-1"], "expert")
        repo.add(folder, "ad")
        with repo.store.read() as r, pytest.raises(BadMerge) as early:
            lora.check(r, r.snapshot_of(repo.resolve("expert")), r.snapshot_of(repo.resolve("ad")), label="ad")
        with repo.store.read() as r:
            chunks = r.entries(b"chunks")
        with pytest.raises(BadMerge) as err:
            applied(repo, "expert", "ad")
        with repo.store.read() as r:
            assert r.entries(b"chunks") == chunks
    text = str(err.value)
    assert message in text and "\n" not in text, text
    assert str(early.value) == text


def test_mp_add_refuses_nothing_of_an_adapter(world, tmp_path):
    """Refusals belong to merging: any adapter folder is stored as it is (here a DoRA one)."""
    folder = tmp_path / "dora"
    shutil.copytree(world.adapters["bf16"], folder)
    _broken(folder, "use_dora")
    repo_dir = tmp_path / "r"
    repo_dir.mkdir()
    assert run_mp("init", cwd=repo_dir).returncode == 0
    assert run_mp("add", folder, "-n", "dora", cwd=repo_dir).returncode == 0
    assert_user_error(run_mp("add", folder, "-n", "x", "--base", "nope", cwd=repo_dir), "nope")


# ------------------------------------------------------------------------------ MergeKit


MERGEKIT_CASES = [*SPECS, "gpt2"]


def _case(world: World, name: str) -> tuple[Path, str | None, str]:
    """A MergeKit case's model folder, lora_merge_dtype, and the dtype the adapter is merged in
    (without lora_merge_dtype, the one config.json names)."""
    if name == "gpt2":
        return world.gpt2, None, "float32"
    spec = SPECS[name]
    return world.family["expert-1"], spec.merge_dtype, spec.merge_dtype or "bfloat16"


def _case_dtype_is_default(name: str) -> bool:
    """The case merges its adapter in the dtype config.json names (MergeKit without
    lora_merge_dtype, which mpstore has no option for)."""
    return name == "gpt2" or SPECS[name].merge_dtype is None


def _alone(model: str, dtype: str) -> dict:
    """`linear` of one `model+adapter` reference with weight 1, computing in `dtype`: MergeKit
    returns that reference's merged tensors unchanged."""
    return config_doc("linear", [(model, {"weight": 1.0})], {model: model}, dtype=dtype)


@pytest.fixture(scope="module")
def mergekit(world) -> dict[str, Path]:
    """MergeKit's `linear` merge of `expert+adapter` alone (weight 1) for every adapter, in the
    dtype the adapter is merged in: the merged model's tensors, as MergeKit holds them."""
    root = world.root / "mk"
    jobs = []
    for name in MERGEKIT_CASES:
        model, merge_dtype, dtype = _case(world, name)
        cfg = root / f"{name}.yml"
        cfg.parent.mkdir(parents=True, exist_ok=True)
        cfg.write_text(yaml.safe_dump(_alone(f"{model}+{world.adapters[name]}", dtype)))
        options = {"lora_merge_cache": str(root / "cache" / name)}
        if merge_dtype:
            options["lora_merge_dtype"] = merge_dtype
        jobs.append({"name": name, "config": str(cfg), "out": str(root / "out" / name), "seed": None, "options": options})
    with running(jobs, root) as driver:
        result = driver.finish()
    for name, job in result["jobs"].items():
        assert job["error"] is None, f"MergeKit failed on {name}:\n{job['error']}"
    return driver.out


@pytest.mark.parametrize("name", MERGEKIT_CASES)
def test_apply_matches_mergekit(world, mergekit, name):
    """Every tensor MergeKit's merged model holds is bit-equal to apply's, in the same dtype
    (MergeKit writes GPT-2's canonical names, `transformer.h.0...`; mpstore keeps the model's)."""
    theirs = {n.removeprefix("transformer."): t for n, t in load_dir(mergekit[name]).items()}
    ours = world.applied[name]
    assert set(theirs) == set(ours.tensors)
    for tname, t in ours.tensors.items():
        got = values(world.repo, t)
        assert got.dtype == theirs[tname].dtype, tname
        assert torch.equal(got, theirs[tname]), f"{name}: {tname}"
    assert ours.dtype == SAFETENSORS_NAME[_case(world, name)[2]]


@pytest.mark.parametrize("name", [n for n in MERGEKIT_CASES if _case_dtype_is_default(n)])
def test_model_plus_adapter_config_merges_as_mergekit(world, mergekit, name, tmp_path):
    """The same YAML with refs (`expert+ad-NAME`) through `mp merge --config`: the adapter is
    applied inside the merge and the output is MergeKit's, bit for bit; the adapter commit is
    recorded in the plan and among the merge's parents."""
    model, _, dtype = _case(world, name)
    ref = "gpt2" if name == "gpt2" else "expert"
    cfg = tmp_path / "m.yml"
    cfg.write_text(yaml.safe_dump(_alone(f"{ref}+ad-{name}", dtype)))
    res = world.repo.merge(from_yaml(cfg), f"lora-{name}")
    adapter = world.repo.resolve(f"ad-{name}")
    assert res.plan.adapters == [None, adapter]
    assert adapter in world.repo.commit(f"lora-{name}").commit.parents
    world.repo.checkout(f"lora-{name}", tmp_path / "out")
    theirs = {n.removeprefix("transformer."): t for n, t in load_dir(mergekit[name]).items()}
    ours = load_dir(tmp_path / "out")
    assert set(theirs) == set(ours)
    for tname, t in ours.items():
        assert torch.equal(t, theirs[tname]), f"{name}: {tname}"
    assert world.repo.replay(f"lora-{name}").identical
