"""Which output tensors a plan makes, from which input tensors, and where they go.

A plan with `models:` makes every tensor of its template (the base, else the first input) from
the same-named tensor of every input. A plan with MergeKit `slices:` stacks output layers slice
by slice: output layer L of a slice of n layers is made from layer `first + j` of each of the
slice's sources (j = 0..n-1), renamed to `layers.L`, with gradients evaluated at j/(n-1) (1 for
a one-layer slice) as MergeKit does. Tensors outside the layers follow MergeKit's planner: the
embeddings ("pre" weights) come from the first slice's sources with its parameters, everything
else ("post": final norm, head) from the last slice's, each at t = 0.

An `Input` is one input model as the merge sees it: a stored snapshot plus tensors that replace
stored ones (a LoRA adapter applied, a vocabulary permuted). Nothing here reads chunk bytes or
does merge arithmetic; the executor turns each `Wanted` into a task.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property

from ..errors import BadMerge
from ..store.env import Txn
from ..store.ids import short
from ..store.objects import Plan, Snapshot, Tensor
from . import params as P
from .methods.base import MergeMethod

TIED = ("lm_head.weight", "model.embed_tokens.weight")  # an untied head may come from a tied model
# Layer counts in config.json, by the names architectures give them.
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


@dataclass
class Input:
    """One input model: its commit, its snapshot and the tensors that replace stored ones."""

    commit: bytes
    snapshot: Snapshot
    overrides: dict[str, Tensor] = field(default_factory=dict)

    def tensor(self, txn: Txn, name: str) -> Tensor | None:
        if name in self.overrides:
            return self.overrides[name]
        tid = self.snapshot.tensors.get(name)
        if tid is None and name == TIED[0]:
            return self.tensor(txn, TIED[1])
        return None if tid is None else txn.tensor(tid)

    @cached_property
    def names(self) -> list[str]:
        """Tensor names in file order."""
        return [n for s in self.snapshot.shards for n in s.tensors]

    @cached_property
    def layers(self) -> int:
        found = {i for n in self.names if (i := P.layer_index(n)) is not None}
        return max(found) + 1 if found else 0


@dataclass
class Wanted:
    """One output tensor: its name, the input tensors it is made from and its parameters."""

    name: str
    base: Tensor | None
    models: list[Tensor]
    chains: list[dict]  # per model: {parameter: [spec per level]}
    globals: dict  # {parameter: [spec per level]}
    t: float  # where gradients are evaluated
    origin: str  # the template tensor whose file the output goes into


def is_pre(name: str) -> bool:
    """An embedding outside the layers: MergeKit's "pre" weights, taken from the first slice."""
    return P.layer_index(name) is None and any(k in name for k in ("embed_tokens", "wte", "wpe", "embed_in",
                                                                   "word_embeddings"))


def wanted(txn: Txn, plan: Plan, method: MergeMethod, template: Input, base: Input | None,
           inputs: list[Input]) -> list[Wanted]:
    """Every output tensor of `plan`, in output order."""
    if plan.slices is None:
        return [_made(txn, name, base, inputs, P.layer_position(name, template.layers), plan)
                for name in template.names]
    out: list[Wanted] = []
    first, last = plan.slices[0], plan.slices[-1]
    non_layer = [n for n in template.names if P.layer_index(n) is None]
    for name in (n for n in non_layer if is_pre(n)):
        out.append(_from_slice(txn, method, first, inputs, name, name, None, 0.0, 0))
    at = 0
    for k, sl in enumerate(plan.slices):
        spans = [(inputs[i], a, b) for i, a, b in sl["sources"]]
        for inp, a, b in spans:
            if b > inp.layers:
                raise BadMerge(f"slices[{k}]: layer_range [{a}, {b}] goes past the {inp.layers} layers of "
                               f"{short(inp.commit)}")
        n = spans[0][2] - spans[0][1]
        lead, lead_first = spans[0][0], spans[0][1]
        for j in range(n):
            t = j / (n - 1) if n > 1 else 1.0
            for name in (x for x in lead.names if P.layer_index(x) == lead_first + j):
                out.append(_from_slice(txn, method, sl, inputs, P.with_layer(name, at), name, j, t, k))
            at += 1
    # MergeKit pairs the last slice's models with as many weights as the first slice has sources
    post = dict(last, sources=last["sources"][:len(first["sources"])])
    for name in (n for n in non_layer if not is_pre(n)):
        out.append(_from_slice(txn, method, post, inputs, name, name, None, 0.0, len(plan.slices) - 1))
    return out


def _from_slice(txn: Txn, method: MergeMethod, sl: dict, inputs: list[Input], out_name: str, lead: str,
                j: int | None, t: float, k: int) -> Wanted:
    """Output tensor `out_name` of slice `sl` of the plan (number k): the tensor `lead` of the first
    source, or for layer j of the slice, that layer of each source."""
    sources = sl["sources"]

    def source_name(i: int) -> str:
        return lead if j is None else P.with_layer(lead, sources[i][1] + j)

    base_at = sl["base"] if method.base != "none" else None
    base = None
    if base_at is not None and base_at < len(sources):
        name = source_name(base_at)
        base = inputs[sources[base_at][0]].tensor(txn, name)
        if base is None:
            raise BadMerge(f"tensor {name!r} is missing from the base of slices[{k}]")
    rest = [i for i in range(len(sources)) if i != base_at]
    models = []
    for i in rest:
        name = source_name(i)
        m = inputs[sources[i][0]].tensor(txn, name)
        if m is None:
            raise BadMerge(f"tensor {name!r} is missing from source {i + 1} of slices[{k}] "
                           f"({short(inputs[sources[i][0]].commit)})")
        models.append(m)
    return Wanted(out_name, base, models, [sl["model_params"][i] for i in rest], sl["global_params"], t, lead)


def _made(txn: Txn, name: str, base: Input | None, inputs: list[Input], t: float, plan: Plan) -> Wanted:
    """Output tensor `name` of a `models:` plan: the same-named tensor of every input."""
    b = base.tensor(txn, name) if base else None
    models = []
    for i, inp in enumerate(inputs):
        m = inp.tensor(txn, name)
        if m is None:
            raise BadMerge(f"tensor {name!r} is missing from input {i + 1} ({short(plan.models[i])})")
        models.append(m)
    return Wanted(name, b, models, list(plan.model_params), plan.global_params, t, name)


def shards(template: Snapshot, made: list[Wanted]) -> list[tuple[str, list[str], dict[str, str] | None]]:
    """The output files: each output tensor in the template file holding its origin (the last file
    if the template lacks it), in output order; files keep the template's order."""
    file_of = {n: s.file for s in template.shards for n in s.tensors}
    last = template.shards[-1].file
    grouped: dict[str, list[str]] = {s.file: [] for s in template.shards}
    for w in made:
        grouped[file_of.get(w.origin, last)].append(w.name)
    return [(s.file, grouped[s.file], s.metadata) for s in template.shards if grouped[s.file]]


def layer_origins(plan: Plan, template: Input) -> list[int] | None:
    """For each output layer, the template layer its first source stands in (None: `models:`)."""
    if plan.slices is None:
        return None
    return [a + j for sl in plan.slices for _, a, b in sl["sources"][:1] for j in range(b - a)]


def rewrite_layers(doc: dict, origins: list[int], template_layers: int) -> bool:
    """Set config.json's layer count to the output's and re-index its per-layer lists; says
    whether anything changed."""
    changed = False
    for key in LAYER_KEYS:
        if isinstance(doc.get(key), int) and doc[key] != len(origins):
            doc[key] = len(origins)
            changed = True
    for key, value in list(doc.items()):
        if isinstance(value, list) and len(value) == template_layers and template_layers and origins:
            new = [value[min(o, template_layers - 1)] for o in origins]
            if new != value:
                doc[key] = new
                changed = True
    return changed


def index_json(data: bytes, files: list[tuple[str, list[str], dict[str, str] | None]], total: int) -> bytes | None:
    """The shard index for the output's files and size (None: unchanged or not JSON we know)."""
    try:
        doc = json.loads(data)
        meta = doc.setdefault("metadata", {})
    except (ValueError, AttributeError):
        return None
    weight_map = {n: f for f, names, _ in files for n in names}
    if meta.get("total_size") == total and doc.get("weight_map") == weight_map:
        return None
    meta["total_size"] = total
    if doc.get("weight_map") != weight_map:  # the same map keeps its order
        doc["weight_map"] = weight_map
    return (json.dumps(doc, indent=2) + "\n").encode()
