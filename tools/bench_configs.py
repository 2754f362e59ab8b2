"""MergeKit configs as people publish them, through MergeKit 0.1.5 and through `mp merge --config`.

Issue 11's measure: of a corpus of configs shaped like those on model cards and in MergeKit's
examples (mapped onto a generated family: llama-shaped, 8 layers, a small BPE tokenizer, bf16),
how many does each tool accept, and how close is mpstore's model to MergeKit's. Per config:
whether each tool merged it, the share of output elements bit-equal to MergeKit's (vocabulary
tensors compared token by token, since MergeKit numbers a union's new tokens in a different order
every run), config.json's layer count, dtype and vocabulary size, and for the random methods the
distance to MergeKit relative to MergeKit's own distance between two seeds.

MergeKit runs in the test-only venv (`make mergekit-venv`) through tests/mergekit_driver.py.

mpstore runs as `mp` does (`mp add`, `mp merge --config`, `mp checkout`, `mp replay`), from this
tree or, with --tree, from another checkout (to measure what an older version accepted).

Usage: python tools/bench_configs.py [--out DIR] [--json FILE] [--tree DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tools"))
from make_family import Tokenizer, make_family, write_lora_adapter  # noqa: E402
from mergekit_oracle import MK_INSTALLED, running, ulp_distance  # noqa: E402

T1 = "{% for m in messages %}{{ m.content }}{% endfor %}"
T2 = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
FAMILY = {"arch": "llama", "hidden": 64, "layers": 8, "vocab": 128, "dtype": "bf16", "experts": 4,
          "kinds": ("dense", "partial", "lora", "dense"), "seed": 11,
          "tokenizer": Tokenizer(added={"expert-4": ["Ġmerge", "Ġkit"]}, special={"expert-4": ["<|tool|>"]},
                                 chat_template={"base": T1, "expert-1": T2, "expert-2": T2})}
RANDOM = {"dare_ties", "dare_linear", "della", "della_linear"}


def src(model: str, first: int, end: int, **params: object) -> dict:
    return {"model": model, "layer_range": [first, end], **({"parameters": params} if params else {})}


# Model names are @keys: folders for MergeKit, refs for mpstore. `@expert-1+@adapter` is a LoRA.
CORPUS: dict[str, dict | list[dict]] = {
    "readme_ties": {  # MergeKit's README example shape: gradients of density and weight, fp16
        "models": [{"model": "@expert-1", "parameters": {"density": [1, 0.7, 0.1], "weight": 1.0}},
                   {"model": "@expert-2", "parameters": {"density": 0.5, "weight": [0, 0.3, 0.7, 1]}},
                   {"model": "@expert-3", "parameters": {"density": 0.33, "weight": [{"filter": "mlp", "value": 0.5},
                                                                                      {"value": 0}]}}],
        "merge_method": "ties", "base_model": "@base",
        "parameters": {"normalize": True, "int8_mask": True}, "dtype": "float16"},
    "gradient_slerp": {  # the most copied model-card config
        "slices": [{"sources": [src("@base", 0, 8), src("@expert-1", 0, 8)]}],
        "merge_method": "slerp", "base_model": "@base",
        "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                             {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]},
        "dtype": "bfloat16"},
    "slerp_models": {"models": [{"model": "@base"}, {"model": "@expert-2"}], "merge_method": "slerp",
                     "base_model": "@base", "parameters": {"t": 0.4}, "dtype": "bfloat16"},
    "dare_ties_bf16": {
        "models": [{"model": "@base"},
                   {"model": "@expert-1", "parameters": {"density": 0.53, "weight": 0.4}},
                   {"model": "@expert-2", "parameters": {"density": 0.53, "weight": 0.3}},
                   {"model": "@expert-3", "parameters": {"density": 0.53, "weight": 0.3}}],
        "merge_method": "dare_ties", "base_model": "@base", "parameters": {"int8_mask": True},
        "dtype": "bfloat16"},
    "task_arithmetic": {"models": [{"model": "@expert-1", "parameters": {"weight": 0.6}},
                                   {"model": "@expert-3", "parameters": {"weight": 0.4}}],
                        "merge_method": "task_arithmetic", "base_model": "@base",
                        "parameters": {"lambda": 0.9}, "dtype": "float16"},
    "linear_soup": {"models": [{"model": "@expert-1", "parameters": {"weight": 0.5}},
                               {"model": "@expert-2", "parameters": {"weight": 0.3}},
                               {"model": "@expert-3", "parameters": {"weight": 0.2}}],
                    "merge_method": "linear", "dtype": "float16"},
    "linear_raw": {"models": [{"model": "@expert-1", "parameters": {"weight": 0.7}},
                              {"model": "@expert-2", "parameters": {"weight": 0.7}}],
                   "merge_method": "linear", "parameters": {"normalize": False}, "dtype": "float32",
                   "out_dtype": "bfloat16"},
    "frankenmerge_interleave": {  # Goliath-style: interleaved overlapping ranges of two models
        "slices": [{"sources": [src("@expert-1", 0, 4)]}, {"sources": [src("@expert-2", 2, 6)]},
                   {"sources": [src("@expert-1", 4, 8)]}, {"sources": [src("@expert-2", 6, 8)]}],
        "merge_method": "passthrough", "dtype": "bfloat16"},
    "self_merge_repeat": {  # depth up-scaling: a model's middle layers twice
        "slices": [{"sources": [src("@expert-1", 0, 6)]}, {"sources": [src("@expert-1", 2, 8)]}],
        "merge_method": "passthrough", "dtype": "bfloat16"},
    "passthrough_scale": {  # the dampened duplicate layers of published self-merges
        "slices": [{"sources": [src("@expert-2", 0, 5)]},
                   {"sources": [src("@expert-2", 3, 8, scale=[{"filter": "o_proj", "value": 0.0},
                                                               {"filter": "down_proj", "value": 0.0},
                                                               {"value": 1.0}])]}],
        "merge_method": "passthrough", "dtype": "float16"},
    "prune_layers": {"slices": [{"sources": [src("@expert-3", 0, 3)]}, {"sources": [src("@expert-3", 5, 8)]}],
                     "merge_method": "passthrough", "dtype": "bfloat16"},
    "shifted_sources": {"slices": [{"sources": [src("@expert-1", 0, 4, weight=0.6), src("@expert-2", 4, 8, weight=0.4)]}],
                        "merge_method": "linear", "dtype": "bfloat16"},
    "sliced_ties": {"slices": [{"sources": [src("@base", 0, 4), src("@expert-1", 0, 4, weight=0.7),
                                            src("@expert-2", 0, 4, weight=0.3)], "parameters": {"density": 0.6}},
                               {"sources": [src("@base", 4, 8), src("@expert-1", 4, 8, weight=0.2),
                                            src("@expert-2", 4, 8, weight=0.8)], "parameters": {"density": 0.4}}],
                    "merge_method": "ties", "base_model": "@base", "dtype": "bfloat16"},
    "model_stock": {"models": [{"model": "@expert-1"}, {"model": "@expert-2"}, {"model": "@expert-3"}],
                    "merge_method": "model_stock", "base_model": "@base", "dtype": "bfloat16"},
    "breadcrumbs_ties": {"models": [{"model": "@expert-1", "parameters": {"weight": 0.5, "density": 0.9, "gamma": 0.01}},
                                    {"model": "@expert-2", "parameters": {"weight": 0.5, "density": 0.9, "gamma": 0.01}}],
                         "merge_method": "breadcrumbs_ties", "base_model": "@base", "dtype": "bfloat16"},
    "della": {"models": [{"model": "@expert-1", "parameters": {"weight": 0.5, "density": 0.6, "epsilon": 0.1}},
                         {"model": "@expert-3", "parameters": {"weight": 0.5, "density": 0.6, "epsilon": 0.1}}],
              "merge_method": "della", "base_model": "@base", "parameters": {"lambda": 1.0}, "dtype": "bfloat16"},
    "della_linear": {"models": [{"model": "@expert-1", "parameters": {"weight": 0.6, "density": 0.5}},
                                {"model": "@expert-2", "parameters": {"weight": 0.4, "density": 0.5}}],
                     "merge_method": "della_linear", "base_model": "@base", "dtype": "float16"},
    "dare_linear": {"models": [{"model": "@expert-1", "parameters": {"weight": 0.5, "density": 0.7}},
                               {"model": "@expert-2", "parameters": {"weight": 0.5, "density": 0.7}}],
                    "merge_method": "dare_linear", "base_model": "@base", "dtype": "bfloat16"},
    "nuslerp": {"models": [{"model": "@expert-1", "parameters": {"weight": 0.6}},
                           {"model": "@expert-2", "parameters": {"weight": 0.4}}],
                "merge_method": "nuslerp", "base_model": "@base", "dtype": "bfloat16"},
    "sce": {"models": [{"model": "@expert-1"}, {"model": "@expert-2"}, {"model": "@expert-3"}],
            "merge_method": "sce", "base_model": "@base", "parameters": {"select_topk": 0.1}, "dtype": "bfloat16"},
    "karcher": {"models": [{"model": "@expert-1"}, {"model": "@expert-2"}], "merge_method": "karcher",
                "parameters": {"max_iter": 10, "tol": 1e-5}, "dtype": "bfloat16"},
    "multislerp": {"models": [{"model": "@expert-1", "parameters": {"weight": 0.5}},
                              {"model": "@expert-2", "parameters": {"weight": 0.3}},
                              {"model": "@expert-3", "parameters": {"weight": 0.2}}],
                   "merge_method": "multislerp", "base_model": "@base", "dtype": "bfloat16"},
    "nearswap": {"models": [{"model": "@expert-1"}], "merge_method": "nearswap", "base_model": "@base",
                 "parameters": {"t": 0.0001}, "dtype": "bfloat16"},
    "arcee_fusion": {"models": [{"model": "@base"}, {"model": "@expert-2"}], "merge_method": "arcee_fusion",
                     "base_model": "@base", "dtype": "bfloat16", "out_dtype": "bfloat16"},
    "ramplus_tl": {"models": [{"model": "@expert-1"}, {"model": "@expert-3"}], "merge_method": "ramplus_tl",
                   "base_model": "@base", "dtype": "bfloat16", "out_dtype": "bfloat16"},
    "tokenizer_union": {"models": [{"model": "@expert-1", "parameters": {"weight": 0.5}},
                                   {"model": "@expert-4", "parameters": {"weight": 0.5}}],
                        "merge_method": "task_arithmetic", "base_model": "@base", "tokenizer_source": "union",
                        "dtype": "bfloat16"},
    "tokenizer_base_chat_auto": {"models": [{"model": "@expert-1"}, {"model": "@expert-2"}],
                                 "merge_method": "linear", "base_model": "@base", "tokenizer_source": "base",
                                 "parameters": {"weight": 0.5}, "chat_template": "auto", "dtype": "bfloat16"},
    "tokenizer_block": {"models": [{"model": "@expert-1", "parameters": {"weight": 1.0}},
                                   {"model": "@expert-4", "parameters": {"weight": 1.0}}],
                        "merge_method": "ties", "base_model": "@base",
                        "tokenizer": {"source": "union", "pad_to_multiple_of": 32,
                                      "tokens": {"<|tool|>": {"source": "@expert-4"},
                                                 "Ġkit": {"source": {"kind": "zero"}}}},
                        "parameters": {"density": 0.5}, "chat_template": T2, "dtype": "bfloat16"},
    "model_plus_lora": {"models": [{"model": "@expert-1+@adapter", "parameters": {"weight": 0.5}},
                                   {"model": "@expert-2", "parameters": {"weight": 0.5}}],
                        "merge_method": "linear", "dtype": "bfloat16"},
    "multi_stage": [  # mergekit-multi
        {"name": "stage-one", "models": [{"model": "@expert-1", "parameters": {"weight": 0.5}},
                                         {"model": "@expert-2", "parameters": {"weight": 0.5}}],
         "merge_method": "linear", "dtype": "bfloat16"},
        {"slices": [{"sources": [src("@base", 0, 8), src("@stage-one", 0, 8)]}], "merge_method": "slerp",
         "base_model": "@base", "parameters": {"t": [0.2, 0.8]}, "dtype": "bfloat16"}],
}


def _last(name: str) -> dict:
    """The (last) document of a corpus entry."""
    cfg = CORPUS[name]
    return cfg[-1] if isinstance(cfg, list) else cfg


def _named(doc: object, where: dict[str, str]) -> object:
    """The config with every @key replaced by `where[key]`."""
    if isinstance(doc, dict):
        return {k: _named(v, where) for k, v in doc.items()}
    if isinstance(doc, list):
        return [_named(v, where) for v in doc]
    if isinstance(doc, str) and "@" in doc:
        return re.sub(r"@([\w-]+)", lambda m: where[m.group(1)], doc)
    return doc


def _vocab(folder: Path) -> dict[str, int] | None:
    path = folder / "tokenizer.json"
    if not path.exists():
        return None
    doc = json.loads(path.read_text())
    vocab = dict(doc["model"]["vocab"])
    vocab.update((t["content"], t["id"]) for t in doc.get("added_tokens", []))
    return vocab


def _load(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def compare(mk: Path, mp: Path) -> dict:
    """Bit-equal share of the elements (vocabulary rows by token), and config.json agreement."""
    a, b = _load(mk), _load(mp)
    if sorted(a) != sorted(b):
        return {"equal": 0.0, "note": f"tensor names differ: {sorted(set(a) ^ set(b))[:3]}"}
    va, vb = _vocab(mk), _vocab(mp)
    same = total = worst = 0
    for n, x in a.items():
        y = b[n]
        if x.dtype != y.dtype:
            return {"equal": 0.0, "note": f"{n}: dtype {x.dtype} vs {y.dtype}"}
        if va and vb and set(va) == set(vb) and n in ("model.embed_tokens.weight", "lm_head.weight"):
            order = sorted(va, key=va.__getitem__)
            x = x[[va[t] for t in order if va[t] < x.shape[0]]]
            y = y[[vb[t] for t in order if vb[t] < y.shape[0]]]
        if x.shape != y.shape:
            return {"equal": 0.0, "note": f"{n}: shape {list(x.shape)} vs {list(y.shape)}"}
        eq = _bits(x) == _bits(y)
        same += int(eq.sum())
        total += eq.numel()
        if x.dtype in (torch.bfloat16, torch.float16) and not bool(eq.all()):
            worst = max(worst, int(ulp_distance(x, y).max()))
    ca, cb = (json.loads((f / "config.json").read_text()) for f in (mk, mp))
    keys = [k for k in ("num_hidden_layers", "vocab_size") if ca.get(k) != cb.get(k)]
    if ca.get("torch_dtype", ca.get("dtype")) != cb.get("torch_dtype", cb.get("dtype")):
        keys.append("dtype")
    if va is not None and vb is not None and set(va) != set(vb):
        keys.append("vocabulary")
    return {"equal": 100.0 * same / max(1, total), "max_ulp": worst,
            "note": ("config.json differs: " + ", ".join(keys)) if keys else ""}


def spread(mk: Path, mk2: Path, mp: Path) -> float:
    """Largest ratio, over tensors, of |mpstore - MergeKit| to |MergeKit(seed 2) - MergeKit|."""
    a, a2, b = _load(mk), _load(mk2), _load(mp)
    worst = 0.0
    for n, x in a.items():
        gap = float((a2[n].double() - x.double()).norm())
        if gap > 0:
            worst = max(worst, float((b[n].double() - x.double()).norm()) / gap)
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    ap.add_argument("--tree", type=Path, default=ROOT, help="the mpstore source tree to run (default: this one; "
                    "an older checkout measures what it accepted)")
    args = ap.parse_args()
    if not MK_INSTALLED.exists():
        sys.exit(f"MergeKit oracle not installed ({MK_INSTALLED}): run `make mergekit-venv`")
    root = args.out or Path(tempfile.mkdtemp(prefix="bench-configs-"))
    fam = make_family(root / "family", **FAMILY)
    expert = load_file(str(fam["expert-1"] / "model.safetensors"))
    fam["adapter"] = write_lora_adapter(root / "family" / "adapter", expert, ("q_proj", "v_proj", "up_proj"), 8,
                                        torch.bfloat16, {"lora_alpha": 16}, seed=3)
    mk_where = {k: str(v) for k, v in fam.items()} | {"stage-one": str(root / "mk" / "stage-one")}
    mp_where = {k: k for k in fam} | {"stage-one": "stage-one"}
    jobs = []
    for name, cfg in CORPUS.items():
        docs = cfg if isinstance(cfg, list) else [cfg]
        for i, doc in enumerate(docs):
            last = i == len(docs) - 1
            path = root / "cfg" / f"{name}.{i}.mk.yml"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(yaml.safe_dump({k: v for k, v in _named(doc, mk_where).items() if k != "name"}))
            out = root / "mk" / (name if last else str(doc["name"]))
            jobs.append({"name": name if last else f"{name}:{i}", "config": str(path), "out": str(out), "seed": 1,
                         "options": {"copy_tokenizer": True, "lora_merge_cache": str(root / "lora-cache")}})
            if last and doc["merge_method"] in RANDOM:
                jobs.append({**jobs[-1], "name": f"{name}@seed2", "out": str(out) + "@seed2", "seed": 2})
        (root / "cfg" / f"{name}.mp.yml").write_text(
            yaml.safe_dump_all([_named(d, mp_where) for d in docs], sort_keys=False))
    results: dict[str, dict] = {}
    env = {**os.environ, "PYTHONPATH": str(args.tree.resolve()), "MP_AUTHOR": "bench"}
    env.pop("MP_REPO", None)

    def mp(*argv: object) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", "from mpstore.cli import main; main()", "-q",
                               "-C", str(root / "repo"), *map(str, argv)], env=env, capture_output=True, text=True,
                              cwd=root)  # not this tree: `python -c` puts the working folder first on the path

    t0 = time.perf_counter()
    (root / "mk-run").mkdir()
    with running(jobs, root / "mk-run") as driver:
        mp("init")
        for key, path in fam.items():
            base = [] if key == "base" else ["--base", "expert-1" if key == "adapter" else "base"]
            mp("add", path, "--name", key, *base)
        t1 = time.perf_counter()
        for name in CORPUS:
            proc = mp("merge", "--config", root / "cfg" / f"{name}.mp.yml", "-b", f"m-{name}", "--seed", 1)
            row: dict = {"mpstore": "ok" if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["?"])[-1]}
            if proc.returncode == 0:
                out = mp("checkout", f"m-{name}", "-o", root / "mp" / name)
                row["replay"] = out.returncode == 0 and mp("replay", f"m-{name}").returncode == 0
            results[name] = row
        mp_seconds = time.perf_counter() - t1
        info = driver.finish(timeout=1800)
    mk_seconds = time.perf_counter() - t0
    for name, row in results.items():
        err = info["jobs"][name]["error"]
        row["mergekit"] = "ok" if err is None else err.strip().splitlines()[-1]
        if err is None and row["mpstore"] == "ok":
            if _last(name)["merge_method"] in RANDOM:
                row["random"] = True
                row["spread"] = spread(root / "mk" / name, root / "mk" / f"{name}@seed2", root / "mp" / name)
                row.update({k: v for k, v in compare(root / "mk" / name, root / "mp" / name).items() if k == "note"})
            else:
                row.update(compare(root / "mk" / name, root / "mp" / name))
    accepted = {tool: sum(r[tool] == "ok" for r in results.values()) for tool in ("mergekit", "mpstore")}
    print(f"{'config':<26}{'MergeKit':>9}{'mpstore':>9}{'bit-equal':>11}{'max ulp':>9}  note")
    for name, row in results.items():
        shown = (f"{row['spread']:.2f}x sd" if row.get("random") else
                 f"{row['equal']:.3f}%" if "equal" in row else "-")
        print(f"{name:<26}{'ok' if row['mergekit'] == 'ok' else 'no':>9}{'ok' if row['mpstore'] == 'ok' else 'no':>9}"
              f"{shown:>11}{row.get('max_ulp', '-'):>9}  "
              f"{row.get('note') or ('' if row['mpstore'] == 'ok' else row['mpstore'])[:90]}"
              f"{'' if row['mergekit'] == 'ok' else ' MergeKit: ' + row['mergekit'][:80]}")
    matched = sum(1 for r in results.values() if r.get("equal") == 100.0 and not r.get("note"))
    print(f"\n{len(CORPUS)} configs: MergeKit accepts {accepted['mergekit']}, mpstore {accepted['mpstore']}; "
          f"bit-equal to MergeKit in every element and config.json: {matched}; random methods within "
          f"{max([r['spread'] for r in results.values() if r.get('random')] or [0]):.2f}x MergeKit's seed-to-seed "
          f"distance; every mpstore merge replayed identical: "
          f"{all(r.get('replay', True) for r in results.values())}")
    print(f"mpstore merge+checkout+replay {mp_seconds:.1f} s; MergeKit, concurrently, {mk_seconds:.1f} s in all")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "accepted": accepted}, indent=2, default=str))


if __name__ == "__main__":
    main()
