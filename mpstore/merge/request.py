"""What a user asks for (CLI flags or a MergeKit YAML file) turned into a Plan.

Both front doors produce the same `MergeRequest`; `to_plan` resolves refs to commit ids, fills
every parameter's chain of levels (model, global, default) and checks what can be checked before
any tensor is read. Keys this engine does not implement are refused by name, never ignored.
This module must stay light: it does not import torch (the methods registry is imported inside
`to_plan`), so parsing a request costs no torch start-up.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BadMerge
from ..store.objects import Plan
from . import params as P

YAML_KEYS = {"merge_method", "models", "base_model", "parameters", "dtype", "out_dtype"}
UNSUPPORTED = {"slices", "modules", "tokenizer_source", "tokenizer", "chat_template"}
DTYPES = {
    "float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64",
    "fp32": "F32", "fp16": "F16", "bf16": "BF16", "f32": "F32", "f16": "F16", "f64": "F64",
}


@dataclass
class MergeRequest:
    method: str
    base: str | None
    models: list[str]
    model_params: list[dict[str, P.Spec]] = field(default_factory=list)  # per model, as written
    global_params: dict[str, P.Spec] = field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    seed: int = 0


def dtype_name(text: str | None, what: str) -> str | None:
    if text is None:
        return None
    key = str(text).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise BadMerge(f"unknown {what} {text!r} (use float32, bfloat16, float16 or float64)")
    return DTYPES[key]


def parse_value(text: str) -> object:
    """A CLI value: JSON (numbers, true/false, lists for gradients, filter lists) or a bare word."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def split_per_model(text: str, n: int, name: str) -> list[object]:
    """`--weight 0.5` (all models) or `--weight 0.5,0.3,0.2` (one per model, in order)."""
    if text.lstrip().startswith(("[", "{")):
        return [parse_value(text)] * n
    values = [parse_value(v) for v in text.split(",")]
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise BadMerge(f"--{name} has {len(values)} values for {n} models")
    return values


def from_yaml(path: Path) -> MergeRequest:
    try:
        import yaml
    except ImportError:
        raise BadMerge("--config needs PyYAML: pip install 'mpstore[yaml]'") from None
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as e:
        raise BadMerge(f"{path}: cannot read: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise BadMerge(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(doc, dict):
        raise BadMerge(f"{path}: a merge config is a mapping with merge_method, models, ...")
    for key in doc:
        if key in UNSUPPORTED:
            raise BadMerge(f"{path}: key {key!r} is not supported by mpstore (use `models:`)")
        if key not in YAML_KEYS:
            raise BadMerge(f"{path}: unknown key {key!r}")
    if "merge_method" not in doc or "models" not in doc:
        raise BadMerge(f"{path}: needs merge_method and models")
    models, model_params = [], []
    for i, entry in enumerate(doc["models"] or []):
        if not isinstance(entry, dict) or "model" not in entry or set(entry) - {"model", "parameters"}:
            raise BadMerge(f"{path}: models[{i}] must be {{model: REF, parameters: {{...}}}}")
        models.append(str(entry["model"]))
        model_params.append(dict(entry.get("parameters") or {}))
    return MergeRequest(
        str(doc["merge_method"]), str(doc["base_model"]) if doc.get("base_model") is not None else None,
        models, model_params, dict(doc.get("parameters") or {}),
        dtype_name(doc.get("dtype"), "dtype"), dtype_name(doc.get("out_dtype"), "out_dtype"),
    )


def to_plan(req: MergeRequest, resolve: Callable[[str], bytes], chunk_size: int, engine: int) -> Plan:
    """Check the request against its method and fix every input and parameter in a Plan."""
    from . import methods  # imports torch: only when a plan is made

    method = methods.get(req.method)
    known = {d.name: d for d in (*method.model_params, *method.global_params)}
    per_model = req.model_params or [{} for _ in req.models]
    for where, given in [("parameters", req.global_params)] + [
        (f"parameters of {m}", q) for m, q in zip(req.models, per_model)
    ]:
        for name, spec in given.items():
            if name not in known:
                raise BadMerge(f"{req.method} has no parameter {name!r} ({where})")
            P.check_spec(spec, f"{name} ({where})")
    models, params = list(req.models), list(per_model)
    if req.base is not None and req.base in models and method.base != "none":
        at = models.index(req.base)
        del models[at], params[at]  # the base listed among the models is the base, not an input
    if method.base == "none" and req.base is not None and req.base not in models:
        models.append(req.base)  # linear: a base is one more input and needs a weight
        params.append({})
    if method.base == "required" and req.base is None:
        raise BadMerge(f"{req.method} needs a base model (--base / base_model)")
    if len(models) < method.min_models or (method.max_models and len(models) > method.max_models):
        want = (f"exactly {method.min_models}" if method.max_models == method.min_models
                else f"at least {method.min_models}")
        raise BadMerge(f"{req.method} takes {want} model(s) besides the base, got {len(models)}")
    chains: list[dict[str, list[P.Spec]]] = []
    for q in params:
        chains.append({d.name: [s for s in (q.get(d.name), req.global_params.get(d.name), d.default)
                                if s is not None] for d in method.model_params})
    globals_: dict[str, list[P.Spec]] = {
        d.name: [s for s in (req.global_params.get(d.name), d.default) if s is not None]
        for d in method.global_params}
    for name, levels in globals_.items():
        if not levels:
            raise BadMerge(f"{req.method} needs parameter {name!r}")
    for m, chain in zip(models, chains):
        for name, levels in chain.items():
            if not levels:
                raise BadMerge(f"{req.method} needs parameter {name!r} for model {m!r}")
    return Plan(
        method.name,
        resolve(req.base) if req.base is not None else None,
        tuple(resolve(m) for m in models),
        tuple(chains), globals_, req.seed, req.dtype, req.out_dtype, chunk_size, engine,
    )
