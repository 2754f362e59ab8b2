"""Applying a stored PEFT LoRA adapter to a stored model: MergeKit's `model+adapter` references.

An adapter is an ordinary commit (`mp add ADAPTER --base MODEL`): adapter_config.json plus
adapter_model.safetensors holding `base_model.model.<module>.lora_A.weight` (r x in) and
`...lora_B.weight` (out x r) for each adapted layer `<module>`. MergeKit 0.1.5 merges such a
reference before anything else, with transformers and peft: the model is loaded in
`lora_merge_dtype`, else in the dtype its config.json names, else in its weights' dtype (every
float tensor is cast to it); peft loads A and B as float32 (float64 for a float64 model) and
`merge_and_unload` adds `(B @ A) * scale` to each target weight in place, so the sum is taken in
float32 and rounded once to the model's dtype. `scale` is
`lora_alpha / r`, or `lora_alpha / sqrt(r)` with `use_rslora`, with `rank_pattern` /
`alpha_pattern` overriding r and alpha per module. `apply` does exactly these operations, with
the same torch calls, on stored tensors.

peft transposes `B @ A` for GPT-2 style Conv1D layers (weights stored in x out) and never for
Linear ones, whatever `fan_in_fan_out` says (it corrects the flag, and saves it corrected). A
weight that is not square shows which it is; a square one is taken as the flag says.

What peft would merge differently (DoRA and the other LoRA variants, initialisations that rewrite
the base weights, trained biases, modules_to_save, embedding or nn.Conv targets) is refused
with one line naming it. This module writes chunks only, through the caller's sink: it stores no
object and moves no ref; the caller keeps the new tensors with whatever it commits.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from ..errors import BadMerge, quoted
from ..store.chunks import ChunkWriter
from ..store.dtypes import FLOATS, torch_dtype
from ..store.env import Txn
from ..store.objects import Snapshot, Tensor
from .checkout import chunk_views

CONFIG = "adapter_config.json"
_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")
# Config entries that select a variant whose merge is not `W + scale * B @ A`, or that make the
# adapter replace or add tensors other than A and B: any of them set (truthy) is refused.
_VARIANTS = ("use_dora", "use_qalora", "use_bdlora", "velora_config", "alora_invocation_tokens",
             "arrow_config", "kasa_config", "monteclora_config", "lora_bias", "modules_to_save",
             "trainable_token_indices", "target_parameters", "layer_replication")
# Initialisations that rewrite the base weights whenever peft loads the adapter.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
_CONFIG_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16"}


@dataclass(frozen=True)
class LoraConfig:
    """What adapter_config.json says about the arithmetic; everything else in it is checked and
    then ignored (dropout, target lists: the tensors stored say which modules are adapted)."""

    rank: int
    alpha: float
    rslora: bool
    fan_in_fan_out: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]

    def scale(self, module: str, rank: int, label: str) -> float:
        """peft's scaling of `module`: its pattern-resolved alpha over its rank (or the rank's
        square root with rsLoRA); the stored A must have the rank the config resolves to."""
        r = self.rank_pattern.get(_pattern_key(self.rank_pattern, module), self.rank)
        if rank != r:
            raise BadMerge(f"adapter {label}: {module} has rank {rank} in its tensors, but its "
                           f"{CONFIG} says {r}")
        alpha = self.alpha_pattern.get(_pattern_key(self.alpha_pattern, module), self.alpha)
        return alpha / math.sqrt(r) if self.rslora else alpha / r


@dataclass(frozen=True)
class Applied:
    """The model with the adapter merged in, as MergeKit's merged copy of it holds it."""

    tensors: dict[str, Tensor]  # every tensor of the model by name: the model's own where unchanged
    new: list[Tensor]  # the tensors made here (their chunks are in the sink): store them with the result
    dtype: str  # the dtype the model was loaded in; every float tensor now has it


def _pattern_key(patterns: dict[str, int] | dict[str, float], module: str) -> str:
    """The first pattern (a regex) that matches the end of the module's name at a dot, else the
    name itself, as peft looks ranks and alphas up."""
    return next((p for p in patterns if re.match(rf"(.*\.)?({p})$", module)), module)


def _number(doc: dict, key: str, default: object, label: str, rank: bool) -> float:
    """A rank (a positive integer) or an alpha (any finite number, as peft takes it)."""
    value = doc.get(key, default)
    ok = isinstance(value, int) and value > 0 if rank else isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or isinstance(value, bool):
        kind = "a positive integer" if rank else "a number"
        raise BadMerge(f"adapter {label}: {key} in {CONFIG} must be {kind}, not {quoted(value)}")
    return value


def _patterns(doc: dict, key: str, label: str, rank: bool) -> dict:
    table = doc.get(key) or {}
    if not isinstance(table, dict):
        raise BadMerge(f"adapter {label}: {key} in {CONFIG} must map module patterns to numbers")
    for pattern in table:
        try:
            re.compile(pattern)
        except re.error:
            raise BadMerge(f"adapter {label}: {key} in {CONFIG} has the invalid pattern {quoted(pattern)}") from None
    return {p: _number(table, p, None, f"{label} ({key})", rank) for p in table}


def read_config(txn: Txn, adapter: Snapshot, label: str) -> LoraConfig:
    """The adapter's adapter_config.json, checked to describe a plain LoRA that `apply` merges
    exactly as peft would."""
    bid = adapter.files.get(CONFIG)
    if bid is None:
        raise BadMerge(f"{label} is not a PEFT adapter: it has no {CONFIG}")
    data = b"".join(chunk_views(txn, txn.blob(bid), f"{label}: {CONFIG}"))
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise BadMerge(f"adapter {label}: {CONFIG} is not valid JSON") from None
    if not isinstance(doc, dict):
        raise BadMerge(f"adapter {label}: {CONFIG} is not a JSON object")
    kind = doc.get("peft_type")
    if kind != "LORA":
        raise BadMerge(f"adapter {label}: peft_type {quoted(kind)} is not supported (only LORA)")
    for key in _VARIANTS:
        if doc.get(key):
            raise BadMerge(f"adapter {label}: {key} is set in its {CONFIG}: only plain LoRA adapters are supported")
    if doc.get("bias", "none") != "none":
        raise BadMerge(f"adapter {label}: bias {quoted(doc.get('bias'))} trains the model's biases: not supported")
    init = doc.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise BadMerge(f"adapter {label}: init_lora_weights {quoted(init)} rewrites the base weights: not supported")
    fan = doc.get("fan_in_fan_out", False)
    rslora = doc.get("use_rslora", False)
    if not isinstance(fan, bool) or not isinstance(rslora, bool):
        raise BadMerge(f"adapter {label}: fan_in_fan_out and use_rslora in {CONFIG} must be true or false")
    return LoraConfig(int(_number(doc, "r", 8, label, rank=True)), _number(doc, "lora_alpha", 8, label, rank=False),
                      rslora, fan, _patterns(doc, "rank_pattern", label, True),
                      _patterns(doc, "alpha_pattern", label, False))


def factors(txn: Txn, adapter: Snapshot, label: str) -> dict[str, tuple[Tensor, Tensor]]:
    """(A, B) of every adapted module, by the module's name in the model."""
    found: dict[str, dict[str, Tensor]] = {}
    for key, tid in adapter.tensors.items():
        m = _KEY.fullmatch(key)
        if m is None:
            raise BadMerge(f"adapter {label}: tensor {key!r} is not a LoRA A or B weight of a Linear "
                           "layer (embedding, bias, DoRA and modules_to_save tensors are not supported)")
        found.setdefault(m[1], {})[m[2]] = txn.tensor(tid)
    if not found:
        raise BadMerge(f"adapter {label} holds no LoRA weights")
    pairs = {}
    for module, ab in sorted(found.items()):
        if set(ab) != {"A", "B"}:
            missing = "B" if "A" in ab else "A"
            raise BadMerge(f"adapter {label}: {module} has no lora_{missing} weight")
        a, b = ab["A"], ab["B"]
        if (a.dtype not in FLOATS or b.dtype not in FLOATS or len(a.shape) != 2 or len(b.shape) != 2
                or a.shape[0] != b.shape[1]):
            raise BadMerge(f"adapter {label}: {module} has lora_A {a.dtype}{list(a.shape)} and lora_B "
                           f"{b.dtype}{list(b.shape)}: not the float matrices (r x in) and (out x r) of a LoRA")
        pairs[module] = (a, b)
    return pairs


def load_dtype(txn: Txn, model: Snapshot, asked: str | None) -> str:
    """The dtype transformers loads the model in for MergeKit's merge of an adapter: the one
    asked (MergeKit's lora_merge_dtype), else config.json's `dtype` (or its older name
    `torch_dtype`), else the first float tensor's dtype of the first weight file."""
    if asked is not None:
        if asked not in _CONFIG_DTYPES.values():
            raise BadMerge(f"cannot apply an adapter in {asked}: choose one of {', '.join(_CONFIG_DTYPES.values())}")
        return asked
    bid = model.files.get("config.json")
    if bid is not None:
        try:
            doc = json.loads(b"".join(chunk_views(txn, txn.blob(bid), "config.json")))
        except (UnicodeDecodeError, ValueError, RecursionError):
            doc = None
        if isinstance(doc, dict):
            named = doc.get("dtype") if doc.get("dtype") is not None else doc.get("torch_dtype")
            if isinstance(named, str) and named in _CONFIG_DTYPES:
                return _CONFIG_DTYPES[named]
    for shard in sorted(model.shards, key=lambda s: s.file):
        for name in sorted(shard.tensors):
            dtype = txn.tensor(model.tensors[name]).dtype
            if dtype in FLOATS:
                return dtype
    raise BadMerge("cannot apply an adapter to a model without float tensors")


def _values(txn: Txn, t: Tensor, what: str) -> torch.Tensor:
    """A whole stored tensor (chunks hash-checked)."""
    if not t.size:
        return torch.zeros(t.shape, dtype=torch_dtype(t.dtype))
    raw = bytearray(b"".join(chunk_views(txn, t, what)))
    return torch.frombuffer(raw, dtype=torch_dtype(t.dtype)).reshape(t.shape)


def _raw(values: torch.Tensor) -> memoryview:
    """The values' little-endian bytes, without a copy where they are contiguous."""
    return values.contiguous().reshape(-1).view(torch.uint8).numpy().data


def _cut(sink: ChunkWriter, pieces: Iterable[memoryview]) -> tuple[tuple[bytes, ...], int]:
    """Byte pieces, in order, as chunks of the sink's size: their digests and the total size."""
    digests: list[bytes] = []
    held = bytearray()
    size = 0
    for piece in pieces:
        size += len(piece)
        if not held and len(piece) == sink.chunk_size:
            digests.append(sink.data(piece))
            continue
        held += piece
        while len(held) >= sink.chunk_size:
            digests.append(sink.data(held[: sink.chunk_size]))
            del held[: sink.chunk_size]
    if held:
        digests.append(sink.data(held))
    return tuple(digests), size


def _stored(sink: ChunkWriter, pieces: Iterable[memoryview], dtype: str, shape: tuple[int, ...]) -> Tensor:
    chunks, size = _cut(sink, pieces)
    return Tensor(size, sink.chunk_size, chunks, dtype, shape)


def _cast(txn: Txn, t: Tensor, dtype: str, what: str) -> Iterator[memoryview]:
    """A stored tensor's values cast to `dtype`, chunk by chunk (casting is elementwise)."""
    for view in chunk_views(txn, t, what):
        yield _raw(torch.frombuffer(bytearray(view), dtype=torch_dtype(t.dtype)).to(torch_dtype(dtype)))


def _weight_name(model: Snapshot, module: str) -> str | None:
    """The model's tensor holding `module`'s weight. peft names modules as in the model with its
    head, whose bare part has a prefix (`model.`, `transformer.`); a checkpoint saved from the
    bare model (the original GPT-2: `h.0.attn.c_attn.weight`) lacks it, and transformers loads
    it all the same."""
    for name in (f"{module}.weight", f"{module.partition('.')[2]}.weight"):
        if name in model.tensors:
            return name
    return None


def merged_weight(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float,
                  flip: bool) -> torch.Tensor:
    """peft's merge of one layer, given the weight already in the model's load dtype: A and B
    as float32 (float64 for a float64 model), `B @ A` transposed for a Conv1D layer (`flip`),
    times the scale, added in place to a copy of the weight (computed in the wider dtype,
    rounded once)."""
    factor = torch.float64 if weight.dtype == torch.float64 else torch.float32
    delta = b.to(factor) @ a.to(factor)
    if flip:
        delta = delta.T
    out = weight.clone()
    out += delta * scale
    return out


@dataclass(frozen=True)
class _Target:
    """One adapted weight: the adapter's factors, peft's scale, and whether `B @ A` is transposed."""

    a: Tensor
    b: Tensor
    scale: float
    flip: bool


def _targets(txn: Txn, model: Snapshot, adapter: Snapshot, label: str) -> dict[str, _Target]:
    """Every weight of the model the adapter changes, by tensor name, checked to fit."""
    config = read_config(txn, adapter, label)
    targets = {}
    for module, (a, b) in factors(txn, adapter, label).items():
        name = _weight_name(model, module)
        if name is None:
            raise BadMerge(f"adapter {label} adapts {module}, but the model has no tensor {module + '.weight'!r}")
        w = txn.tensor(model.tensors[name])
        update = (b.shape[0], a.shape[1])  # out x in
        if w.dtype not in FLOATS or w.shape not in (update, update[::-1]):
            raise BadMerge(f"adapter {label}: {module}'s update is {list(update)}, but {name!r} is "
                           f"{w.dtype}{list(w.shape)}")
        flip = config.fan_in_fan_out if update[0] == update[1] else w.shape != update
        targets[name] = _Target(a, b, config.scale(module, a.shape[0], label), flip)
    return targets


def check(txn: Txn, model: Snapshot, adapter: Snapshot, dtype: str | None = None, label: str = "adapter") -> str:
    """Refuse now, computing nothing, whatever `apply` would refuse (a plan is checked before it
    runs); returns the dtype the model is loaded in."""
    _targets(txn, model, adapter, label)
    return load_dtype(txn, model, dtype)


def apply(txn: Txn, model: Snapshot, adapter: Snapshot, sink: ChunkWriter, dtype: str | None = None,
          label: str = "adapter") -> Applied:
    """Merge `adapter` into `model` as MergeKit does for `model+adapter` (see the module
    docstring). `dtype`: MergeKit's lora_merge_dtype as a safetensors name (None: as
    transformers chooses); `label` names the adapter in errors. Everything is checked before
    the first chunk is written. Adapted weights, and every float tensor not already in the load
    dtype, become new tensors whose chunks go through `sink`; every other tensor is the model's
    own object."""
    targets = _targets(txn, model, adapter, label)
    loaded = load_dtype(txn, model, dtype)
    tensors: dict[str, Tensor] = {}
    new: list[Tensor] = []
    for name, tid in model.tensors.items():
        t = txn.tensor(tid)
        target = targets.get(name)
        if target is not None:
            weight = _values(txn, t, name).to(torch_dtype(loaded))
            a = _values(txn, target.a, f"{label}: lora_A of {name}")
            b = _values(txn, target.b, f"{label}: lora_B of {name}")
            t = _stored(sink, [_raw(merged_weight(weight, a, b, target.scale, target.flip))], loaded, t.shape)
            new.append(t)
        elif t.dtype in FLOATS and t.dtype != loaded:
            t = _stored(sink, _cast(txn, t, loaded, name), loaded, t.shape)
            new.append(t)
        tensors[name] = t
    return Applied(tensors, new, loaded)
