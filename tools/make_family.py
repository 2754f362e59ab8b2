"""Generate a synthetic family of small LLM checkpoints: one base model and K fine-tuned experts.

Why: mpstore's dedup, diff and merge paths behave very differently depending on *how* an
expert differs from its base: every tensor nudged (full fine-tune), a few layers retrained
(partial fine-tune), or a low-rank update on a few projections (LoRA) with everything else
bit-identical. Tests and benchmarks need families with those realistic patterns of change,
at any size, without downloading weights. Each output folder is an ordinary Hugging Face
checkpoint (config.json, generation_config.json, README.md, safetensors, optionally sharded
with model.safetensors.index.json) that transformers' AutoModelForCausalLM loads.

Layout written: OUT/base, OUT/expert-1 .. OUT/expert-K.

Expert kinds (cycled over the experts by --kinds):
  dense    every tensor changes; each tensor's delta has an RMS drawn log-uniformly from
           [max(1e-4, eps(dtype)), 1e-1] times that tensor's RMS, so scales span orders of
           magnitude yet stay large enough to survive rounding to the output dtype.
  partial  half of the decoder layers (and, by a coin flip, the final norm) change as in
           dense; every other tensor is the base tensor, bit for bit.
  lora     q_proj, v_proj and a random few other projections get a rank 4..16 update B @ A
           in every layer; every other tensor is the base tensor, bit for bit.

Tokenizer (off by default; `--tokenizer`, or make_family(tokenizer=Tokenizer(...))): every model
also gets a small byte-level BPE tokenizer written as plain JSON (tokenizer.json,
tokenizer_config.json, special_tokens_map.json) that transformers loads as it is: <unk>, <s>, </s>
at ids 0-2, the letters and "Ġ", then one merged token per merge. Tokenizer(...) can give an
expert another vocabulary, for MergeKit's tokenizer merges: tokens appended (ordinary or special),
the base's last tokens dropped, pairs of token ids swapped; the expert's embed_tokens / lm_head
rows follow (swapped rows, fresh rows for new tokens, dropped rows removed) and its config.json
vocab_size is its row count. Each model may carry a chat template.

Everything derives from --seed: each tensor has its own generator seeded from
(seed, model name, tensor name), so the same arguments give byte-identical files.

--params N picks the shape by one scan over hidden sizes (multiples of 64):
layers = hidden / 64, intermediate = 2.75 * hidden rounded to 64, default heads, and the
hidden size whose parameter count is closest to N wins. With --params the vocabulary
defaults to 32000, since embeddings are a large share of a real small model. Example:
qwen2 250M -> hidden 1024, 16 layers, intermediate 2816, 16 heads, 4 kv heads, ~246M params.

Usage:
  python tools/make_family.py OUT [--arch qwen2|llama] [--hidden 256] [--layers 4]
      [--intermediate N] [--heads N] [--kv-heads N] [--vocab 1024] [--params 250M]
      [--dtype bf16|f16|f32] [--experts 3] [--kinds dense,partial,lora] [--seed 0]
      [--shard-size MB] [--tie-embeddings] [--tokenizer]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import save_file

DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}
KINDS = ("dense", "partial", "lora")
ARCH_CLASSES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

INIT_STD = 0.02  # matrices, as in the usual initializer_range
BIAS_STD = 0.01
NORM_STD = 0.02  # norm weights are 1 + NORM_STD * noise
MIN_REL_DELTA = 1e-4
MAX_REL_DELTA = 1e-1
LORA_RANKS = (4, 16)
LORA_EXTRA_P = 0.3  # chance that each projection other than q/v is also a LoRA target
DEFAULT_VOCAB = 1024
PARAMS_VOCAB = 32000
BOS_ID, EOS_ID = 1, 2
SPECIALS = ("<unk>", "<s>", "</s>")  # ids 0, BOS_ID, EOS_ID
LETTERS = "Ġabcdefghijklmnopqrstuvwxyz"  # byte-level symbols; "Ġ" is a space
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
TOKENIZER_CLASS = {"qwen2": "Qwen2Tokenizer", "llama": "PreTrainedTokenizerFast"}


@dataclass(frozen=True)
class Dims:
    """Shape of one model in the family; every member shares it."""

    arch: str
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tie_embeddings: bool

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


@dataclass(frozen=True)
class ExpertPlan:
    """Which tensors an expert changes and how; everything else is copied from the base."""

    changes: dict[str, str]  # tensor name -> "dense" | "lora"
    rank: int  # LoRA rank; 0 when unused
    summary: str  # one line for the README


@dataclass(frozen=True)
class Tokenizer:
    """The family's tokenizer and how each expert's differs from the base's (model name -> ...)."""

    tokens: int | None = None  # tokens of the base's tokenizer; None: one per embedding row
    added: Mapping[str, Sequence[str]] = field(default_factory=dict)  # ordinary tokens appended
    special: Mapping[str, Sequence[str]] = field(default_factory=dict)  # special tokens appended after those
    dropped: Mapping[str, int] = field(default_factory=dict)  # how many of the base's last tokens it lacks
    swapped: Mapping[str, int] = field(default_factory=dict)  # pairs of token ids exchanged (rows too)
    chat_template: Mapping[str, str] = field(default_factory=dict)  # in tokenizer_config.json

    def changes_vocab(self, model: str) -> bool:
        return any(model in m for m in (self.added, self.special, self.dropped, self.swapped))


# ---------------------------------------------------------------- shapes and sizes


def default_intermediate(hidden: int) -> int:
    """About 2.75 * hidden rounded to a multiple of 64, like Llama/Qwen-style MLPs."""
    return max(64, round(2.75 * hidden / 64) * 64)


def default_heads(hidden: int) -> int:
    """One head per 64 hidden units, the common head_dim."""
    return max(1, hidden // 64)


def default_kv_heads(heads: int) -> int:
    """Grouped-query attention with about 4 query heads per kv head; must divide heads."""
    kv = max(1, heads // 4)
    while heads % kv:
        kv -= 1
    return kv


def tensor_shapes(dims: Dims) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes in the order transformers' *ForCausalLM saves them."""
    h, kv_dim = dims.hidden, dims.kv_heads * dims.head_dim
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (dims.vocab, h))]
    for i in range(dims.layers):
        p = f"model.layers.{i}."
        attn = [("q_proj", h), ("k_proj", kv_dim), ("v_proj", kv_dim)]
        for proj, out in attn:
            shapes.append((f"{p}self_attn.{proj}.weight", (out, h)))
            if dims.arch == "qwen2":
                shapes.append((f"{p}self_attn.{proj}.bias", (out,)))
        shapes += [
            (f"{p}self_attn.o_proj.weight", (h, h)),
            (f"{p}mlp.gate_proj.weight", (dims.intermediate, h)),
            (f"{p}mlp.up_proj.weight", (dims.intermediate, h)),
            (f"{p}mlp.down_proj.weight", (h, dims.intermediate)),
            (f"{p}input_layernorm.weight", (h,)),
            (f"{p}post_attention_layernorm.weight", (h,)),
        ]
    shapes.append(("model.norm.weight", (h,)))
    if not dims.tie_embeddings:
        shapes.append(("lm_head.weight", (dims.vocab, h)))
    return shapes


def count_params(dims: Dims) -> int:
    """Number of parameters the checkpoint holds (tied lm_head not counted twice)."""
    return sum(math.prod(shape) for _, shape in tensor_shapes(dims))


def params_to_dims(
    n_params: int, arch: str = "qwen2", vocab: int = PARAMS_VOCAB, tie_embeddings: bool = False
) -> tuple[int, int, int, int, int]:
    """Pick (hidden, layers, intermediate, heads, kv_heads) for about n_params parameters.

    One knob keeps the mapping predictable: layers = hidden / 64 and every other size
    follows its default, so the scan over hidden (multiples of 64) is monotone and the
    closest count wins.
    """
    best: tuple[int, Dims] | None = None
    for hidden in range(64, 16384 + 1, 64):
        heads = default_heads(hidden)
        dims = Dims(arch, hidden, max(1, hidden // 64), default_intermediate(hidden),
                    heads, default_kv_heads(heads), vocab, tie_embeddings)
        err = abs(count_params(dims) - n_params)
        if best is not None and err > best[0]:
            break
        best = (err, dims)
    assert best is not None
    d = best[1]
    return d.hidden, d.layers, d.intermediate, d.heads, d.kv_heads


def parse_count(text: str) -> int:
    """Parse '250M', '1.5B', '800K' or a plain integer into a count."""
    units = {"K": 10**3, "M": 10**6, "B": 10**9}
    text = text.strip().upper()
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


# ---------------------------------------------------------------- random tensors


def _generator(*key: object) -> torch.Generator:
    """A generator seeded from a stable hash of key, so each tensor's stream is independent
    of generation order and of Python's per-process hash randomisation."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little"))


def _base_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Float32 init: N(0, 0.02) matrices, small biases, norms near 1."""
    t = torch.randn(shape, generator=_generator(seed, "base", name))
    if name.endswith("norm.weight"):
        return t.mul_(NORM_STD).add_(1.0)
    return t.mul_(BIAS_STD if name.endswith(".bias") else INIT_STD)


def make_base(dims: Dims, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    """All base tensors in the output dtype; experts are derived from (and share) them."""
    return {name: _base_tensor(name, shape, seed).to(dtype) for name, shape in tensor_shapes(dims)}


def _rms(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t, dtype=torch.float32)) / math.sqrt(t.numel())


def _relative_scale(g: torch.Generator, dtype: torch.dtype) -> float:
    """Log-uniform delta size relative to the tensor's RMS. The floor is the dtype's eps,
    below which most elements of a changed tensor would round back to the base value."""
    lo = math.log(max(MIN_REL_DELTA, torch.finfo(dtype).eps))
    u = float(torch.rand((), generator=g))
    return math.exp(lo + u * (math.log(MAX_REL_DELTA) - lo))


def _dense_update(base: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """base + scale * rms(base) * noise, computed in float32 and cast back once."""
    target = _relative_scale(g, base.dtype) * _rms(base)
    out = torch.randn(base.shape, generator=g).mul_(target).add_(base)
    return out.to(base.dtype)


def _lora_update(base: torch.Tensor, g: torch.Generator, rank: int) -> torch.Tensor:
    """base + B @ A with B @ A rescaled to a log-uniform RMS relative to base."""
    target = _relative_scale(g, base.dtype) * _rms(base)
    out_dim, in_dim = base.shape
    r = min(rank, out_dim, in_dim)
    delta = torch.randn(out_dim, r, generator=g) @ torch.randn(r, in_dim, generator=g)
    delta.mul_(target / _rms(delta))
    return delta.add_(base).to(base.dtype)


# ---------------------------------------------------------------- expert plans


def expert_kinds(experts: int, kinds: Sequence[str]) -> list[str]:
    """Kind of each expert, cycling over kinds."""
    return [kinds[i % len(kinds)] for i in range(experts)]


def plan_expert(kind: str, dims: Dims, seed: int, name: str) -> ExpertPlan:
    """Decide which tensors an expert changes, from its own seed."""
    g = _generator(seed, name, "plan")
    names = [n for n, _ in tensor_shapes(dims)]
    if kind == "dense":
        return ExpertPlan(dict.fromkeys(names, "dense"), 0,
                          "Every tensor differs from the base.")
    if kind == "partial":
        chosen = sorted(torch.randperm(dims.layers, generator=g)[: max(1, dims.layers // 2)].tolist())
        prefixes = tuple(f"model.layers.{i}." for i in chosen)
        final_norm = bool(torch.rand((), generator=g) < 0.5)
        changed = [n for n in names if n.startswith(prefixes) or (final_norm and n == "model.norm.weight")]
        summary = (f"Changed layers {', '.join(map(str, chosen))}"
                   f"{' and the final norm' if final_norm else ''}; all other tensors are "
                   "bit-identical to the base.")
        return ExpertPlan(dict.fromkeys(changed, "dense"), 0, summary)
    if kind == "lora":
        extra = [p for p in PROJECTIONS if p not in ("q_proj", "v_proj")
                 and float(torch.rand((), generator=g)) < LORA_EXTRA_P]
        targets = ["q_proj", "v_proj", *extra]
        rank = int(torch.randint(LORA_RANKS[0], LORA_RANKS[1] + 1, (), generator=g))
        changed = [n for n in names if n.endswith(tuple(f".{p}.weight" for p in targets))]
        summary = (f"Rank-{rank} LoRA updates on {', '.join(targets)} in every layer; all other "
                   "tensors are bit-identical to the base.")
        return ExpertPlan(dict.fromkeys(changed, "lora"), rank, summary)
    raise ValueError(f"unknown expert kind {kind!r}; expected one of {KINDS}")


def expert_tensor(name: str, base: torch.Tensor, plan: ExpertPlan, seed: int, model: str) -> torch.Tensor:
    """The expert's tensor: the base object itself when untouched, so it stays bit-identical."""
    how = plan.changes.get(name)
    if how is None:
        return base
    g = _generator(seed, model, name)
    return _lora_update(base, g, plan.rank) if how == "lora" else _dense_update(base, g)


# ---------------------------------------------------------------- LoRA adapters

SUBMODULE = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
             "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def write_lora_adapter(folder: Path, model: Mapping[str, torch.Tensor], modules: Sequence[str], rank: int,
                       dtype: torch.dtype, config: Mapping | None = None, ranks: Mapping[str, int] | None = None,
                       seed: int = 0) -> Path:
    """A PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) for a model of
    this family, with random A (r x in) and B (out x r) for `modules` (q_proj, v_proj, ...) of every
    layer; `config` entries override the adapter_config.json defaults, `ranks` the rank per module."""
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    layers = 1 + max(int(n.split(".")[2]) for n in model if n.startswith("model.layers."))
    for layer in range(layers):
        for proj in modules:
            module = f"model.layers.{layer}.{SUBMODULE[proj]}.{proj}"
            out, inp = model[f"{module}.weight"].shape
            r = (ranks or {}).get(proj, rank)
            tensors[f"base_model.model.{module}.lora_A.weight"] = (0.05 * torch.randn(r, inp, generator=g)).to(dtype)
            tensors[f"base_model.model.{module}.lora_B.weight"] = (0.05 * torch.randn(out, r, generator=g)).to(dtype)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    doc = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None, "r": rank,
           "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": list(modules), "bias": "none",
           "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "inference_mode": True,
           "init_lora_weights": True, **(config or {})}
    (folder / "adapter_config.json").write_text(json.dumps(doc, indent=2))
    return folder


# ---------------------------------------------------------------- tokenizer


def bpe_tokens(n: int) -> tuple[list[str], list[list[str]]]:
    """n tokens (the specials, the letters, then merged tokens) and the merges making them.

    Merged tokens grow one letter at a time (every token of length L-1 times every letter), so the
    parts of every merge come before its result: dropping the last tokens drops the last merges."""
    tokens = list(SPECIALS) + list(LETTERS)
    merges: list[list[str]] = []
    shorter = list(LETTERS)
    while len(tokens) < n:
        longer = []
        for left in shorter:
            for c in LETTERS[1:]:
                if len(tokens) + len(longer) >= n:
                    break
                longer.append(left + c)
                merges.append([left, c])
        tokens += longer
        shorter = longer
    return tokens[:n], merges[:max(0, n - len(SPECIALS) - len(LETTERS))]


def model_vocab(tok: Tokenizer, vocab: int, model: str) -> tuple[list[str], list[int], list[list[str]]]:
    """The model's tokens in id order, the base row each takes (-1: a new token) and its merges."""
    n = tok.tokens or vocab
    tokens, merges = bpe_tokens(n)
    keep = n - tok.dropped.get(model, 0)
    rows = list(range(keep))
    for k in range(tok.swapped.get(model, 0)):  # exchange ids 3+2k and 4+2k (after the specials)
        i, j = len(SPECIALS) + 2 * k, len(SPECIALS) + 2 * k + 1
        rows[i], rows[j] = rows[j], rows[i]
    new = [*tok.added.get(model, ()), *tok.special.get(model, ())]
    kept_merges = merges[:max(0, len(merges) - (n - keep))]
    return [tokens[r] for r in rows] + new, rows + [-1] * len(new), kept_merges


def tokenizer_files(tok: Tokenizer, vocab: int, arch: str, model: str) -> dict[str, str]:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json of one model."""
    tokens, _, merges = model_vocab(tok, vocab, model)
    special = set(SPECIALS) | set(tok.special.get(model, ()))

    def added(i: int, t: str) -> dict:
        return {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": True}

    added_tokens = [added(i, t) for i, t in enumerate(tokens) if t in special]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    doc = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added_tokens,
        "normalizer": {"type": "NFC"}, "pre_tokenizer": byte_level, "post_processor": byte_level,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens) if t not in special or t in SPECIALS},
                  "merges": merges},
    }
    names = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>"}
    extra = list(tok.special.get(model, ()))
    config = {"tokenizer_class": TOKENIZER_CLASS[arch], "add_prefix_space": False, **names,
              "model_max_length": 512,
              "added_tokens_decoder": {str(e["id"]): {k: v for k, v in e.items() if k != "id"} for e in added_tokens}}
    if extra:
        config["additional_special_tokens"] = extra
    if model in tok.chat_template:
        config["chat_template"] = tok.chat_template[model]
    specials_map = {**names, **({"additional_special_tokens": extra} if extra else {})}
    return {"tokenizer.json": json.dumps(doc, indent=2, ensure_ascii=False),
            "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False) + "\n",
            "special_tokens_map.json": json.dumps(specials_map, indent=2) + "\n"}


def vocab_rows(t: torch.Tensor, rows: list[int], seed: int, model: str, name: str) -> torch.Tensor:
    """A vocabulary tensor with the model's rows: base rows by index, fresh N(0, 0.02) rows for -1."""
    g = _generator(seed, model, name, "new rows")
    fresh = (torch.randn((rows.count(-1), *t.shape[1:]), generator=g) * INIT_STD).to(t.dtype)
    kept = t[torch.tensor([r for r in rows if r >= 0], dtype=torch.long)]
    return torch.cat([kept, fresh]) if rows[-1] == -1 else kept


# ---------------------------------------------------------------- writing


def plan_shards(dims: Dims, dtype: torch.dtype, shard_size_mb: float) -> list[list[str]]:
    """Group tensors, in order, into shards of about shard_size_mb (10**6 bytes) each.
    A tensor larger than a shard gets a shard of its own; 0 means one file."""
    shapes = tensor_shapes(dims)
    if shard_size_mb <= 0:
        return [[n for n, _ in shapes]]
    limit, itemsize = shard_size_mb * 10**6, torch.empty((), dtype=dtype).element_size()
    shards: list[list[str]] = [[]]
    used = 0
    for name, shape in shapes:
        size = math.prod(shape) * itemsize
        if shards[-1] and used + size > limit:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def hf_config(dims: Dims, dtype: str) -> dict:
    """config.json that AutoModelForCausalLM accepts for the chosen architecture."""
    cfg = {
        "architectures": [ARCH_CLASSES[dims.arch]],
        "model_type": dims.arch,
        "hidden_size": dims.hidden,
        "intermediate_size": dims.intermediate,
        "num_hidden_layers": dims.layers,
        "num_attention_heads": dims.heads,
        "num_key_value_heads": dims.kv_heads,
        "head_dim": dims.head_dim,
        "vocab_size": dims.vocab,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "initializer_range": INIT_STD,
        "attention_dropout": 0.0,
        "tie_word_embeddings": dims.tie_embeddings,
        "torch_dtype": {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}[dtype],
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "use_cache": True,
    }
    if dims.arch == "llama":
        cfg |= {"attention_bias": False, "mlp_bias": False}
    return cfg


def _write_weights(
    folder: Path, shards: list[list[str]], sharded: bool, tensor: Callable[[str], torch.Tensor]
) -> None:
    """Write safetensors shard by shard, so only one shard's new tensors are alive at once;
    when sharded, also the HF index that maps each tensor to its file."""
    weight_map: dict[str, str] = {}
    total = 0
    for i, names in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors" if sharded else "model.safetensors"
        part = {n: tensor(n) for n in names}
        total += sum(t.numel() * t.element_size() for t in part.values())
        save_file(part, str(folder / file), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(names, file)
        del part  # free this shard before the next one is built
    if sharded:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        text = json.dumps(index, indent=2, sort_keys=True) + "\n"
        (folder / "model.safetensors.index.json").write_text(text)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _readme(name: str, kind: str, dims: Dims, seed: int, summary: str) -> str:
    return (
        f"# {name}\n\n"
        f"Synthetic {dims.arch} checkpoint ({count_params(dims):,} parameters, random weights, not a "
        f"trained model) written by mpstore's tools/make_family.py with seed {seed}.\n\n"
        f"Kind: {kind}. {summary}\n"
    )


def write_model(
    folder: Path,
    dims: Dims,
    dtype: str,
    shards: list[list[str]],
    sharded: bool,
    tensor: Callable[[str], torch.Tensor],
    readme: str,
    extra_files: Mapping[str, str] | None = None,
) -> int:
    """Write one complete HF folder (with extra_files, name -> text); return the total bytes of its files."""
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / "config.json", hf_config(dims, dtype))
    for file, text in (extra_files or {}).items():
        (folder / file).write_text(text, encoding="utf-8")
    _write_json(folder / "generation_config.json",
                {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "do_sample": False})
    (folder / "README.md").write_text(readme)
    _write_weights(folder, shards, sharded, tensor)
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


# ---------------------------------------------------------------- family


def build_dims(
    arch: str,
    hidden: int,
    layers: int,
    intermediate: int | None,
    heads: int | None,
    kv_heads: int | None,
    vocab: int,
    tie_embeddings: bool,
) -> Dims:
    """Fill in defaults and reject shapes transformers would refuse."""
    if arch not in ARCH_CLASSES:
        raise ValueError(f"unknown arch {arch!r}; expected one of {tuple(ARCH_CLASSES)}")
    heads = heads or default_heads(hidden)
    dims = Dims(arch, hidden, layers, intermediate or default_intermediate(hidden), heads,
                kv_heads or default_kv_heads(heads), vocab, tie_embeddings)
    if hidden % heads or (hidden // heads) % 2:
        raise ValueError(f"hidden {hidden} must split into {heads} heads of even size (RoPE)")
    if heads % dims.kv_heads:
        raise ValueError(f"kv_heads {dims.kv_heads} must divide heads {heads}")
    if layers < 1 or vocab <= EOS_ID:
        raise ValueError("need at least one layer and a vocabulary above the special token ids")
    return dims


def make_family(
    out: Path,
    *,
    arch: str = "qwen2",
    hidden: int = 256,
    layers: int = 4,
    intermediate: int | None = None,
    heads: int | None = None,
    kv_heads: int | None = None,
    vocab: int = DEFAULT_VOCAB,
    dtype: str = "bf16",
    experts: int = 3,
    kinds: Sequence[str] = KINDS,
    seed: int = 0,
    shard_size_mb: float = 0,
    tie_embeddings: bool = False,
    tokenizer: Tokenizer | None = None,
    verbose: bool = False,
) -> dict[str, Path]:
    """Write out/base and out/expert-1..K; return {"base": path, "expert-1": path, ...}.

    The base stays in memory in the output dtype and every expert is derived from it
    tensor by tensor, so peak memory is about one base plus one expert shard. With
    verbose, prints "path<TAB>kind<TAB>bytes" as each model is written. With a tokenizer, each
    model gets its tokenizer files, and an expert whose vocabulary differs its own rows.
    """
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {tuple(DTYPES)}")
    if not kinds or any(k not in KINDS for k in kinds):
        raise ValueError(f"kinds must be a non-empty selection of {KINDS}, got {tuple(kinds)}")
    dims = build_dims(arch, hidden, layers, intermediate, heads, kv_heads, vocab, tie_embeddings)
    if tokenizer is not None and not len(SPECIALS) + len(LETTERS) <= (tokenizer.tokens or vocab) <= vocab:
        raise ValueError(f"the tokenizer needs {len(SPECIALS) + len(LETTERS)} to {vocab} (--vocab) tokens")
    if tokenizer is not None and tokenizer.tokens not in (None, vocab) and any(
            tokenizer.changes_vocab(f"expert-{i}") for i in range(1, experts + 1)):
        raise ValueError("experts can change the vocabulary only of a tokenizer with one token per row")
    out = Path(out)
    shards = plan_shards(dims, DTYPES[dtype], shard_size_mb)
    base = make_base(dims, DTYPES[dtype], seed)
    paths: dict[str, Path] = {}

    def emit(name: str, kind: str, tensor: Callable[[str], torch.Tensor], summary: str) -> None:
        path = out / name
        model_dims, files = dims, None
        if tokenizer is not None:
            files = tokenizer_files(tokenizer, vocab, arch, name)
            if tokenizer.changes_vocab(name):
                _, rows, _ = model_vocab(tokenizer, vocab, name)
                model_dims = replace(dims, vocab=len(rows))
                plain = tensor
                tensor = lambda n: (vocab_rows(plain(n), rows, seed, name, n)  # noqa: E731
                                    if n in VOCAB_TENSORS else plain(n))
        size = write_model(path, model_dims, dtype, shards, shard_size_mb > 0, tensor,
                           _readme(name, kind, dims, seed, summary), files)
        paths[name] = path
        if verbose:
            print(f"{path}\t{kind}\t{size}", flush=True)

    emit("base", "base", base.__getitem__, "The base model of the family; every expert derives from it.")
    for i, kind in enumerate(expert_kinds(experts, kinds), 1):
        name = f"expert-{i}"
        plan = plan_expert(kind, dims, seed, name)
        emit(name, kind, lambda n, p=plan, m=name: expert_tensor(n, base[n], p, seed, m), plan.summary)
    return paths


# ---------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="output folder; gets base/ and expert-N/")
    ap.add_argument("--arch", choices=tuple(ARCH_CLASSES), default="qwen2")
    ap.add_argument("--hidden", type=int, help="hidden size (default 256)")
    ap.add_argument("--layers", type=int, help="decoder layers (default 4)")
    ap.add_argument("--intermediate", type=int, help="MLP size (default ~2.75*hidden, multiple of 64)")
    ap.add_argument("--heads", type=int, help="attention heads (default hidden//64)")
    ap.add_argument("--kv-heads", type=int, help="key/value heads (default heads//4, dividing heads)")
    ap.add_argument("--vocab", type=int,
                    help=f"vocabulary (default {DEFAULT_VOCAB}, or {PARAMS_VOCAB} with --params)")
    ap.add_argument("--params", type=parse_count,
                    help="target parameter count such as 250M; picks hidden and layers")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--kinds", default=",".join(KINDS), help="expert kinds, cycled over experts")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-size", type=float, default=0,
                    help="MB per shard; 0 writes one model.safetensors")
    ap.add_argument("--tie-embeddings", action="store_true")
    ap.add_argument("--tokenizer", action="store_true", help="write a small BPE tokenizer with every model")
    args = ap.parse_args(argv)

    if args.params is not None:
        if args.hidden is not None or args.layers is not None:
            ap.error("--params replaces --hidden/--layers; give one or the other")
        vocab = args.vocab or PARAMS_VOCAB
        # intermediate/heads/kv_heads left unset get the same defaults params_to_dims assumed
        hidden, layers, *_ = params_to_dims(args.params, args.arch, vocab, args.tie_embeddings)
    else:
        hidden, layers, vocab = args.hidden or 256, args.layers or 4, args.vocab or DEFAULT_VOCAB
    try:
        make_family(args.out, arch=args.arch, hidden=hidden, layers=layers, vocab=vocab,
                    dtype=args.dtype, experts=args.experts, kinds=tuple(args.kinds.split(",")),
                    seed=args.seed, shard_size_mb=args.shard_size,
                    tie_embeddings=args.tie_embeddings, verbose=True,
                    tokenizer=Tokenizer() if args.tokenizer else None,
                    intermediate=args.intermediate, heads=args.heads, kv_heads=args.kv_heads)
    except ValueError as e:
        ap.error(str(e))


if __name__ == "__main__":
    main()
