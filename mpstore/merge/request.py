"""What a user asks for (CLI flags or a MergeKit YAML file) turned into a Plan.

Both front doors produce the same `MergeRequest`; `to_plan` resolves refs to commit ids, fills
every parameter's chain of levels (model, global, default) and checks what can be checked before
any tensor is read. Keys this engine does not implement are refused by name, never ignored.
`check_request` (which `from_yaml`, `to_plan` and the CLI call) refuses, in one line, whatever no
plan can hold or no merge can use: fields of the wrong type, a non-finite number or an integer
past 64 bits anywhere in a parameter value, a seed outside -2**63 .. 2**64-1; `parse_budget`,
`check_memory_limit` and `check_threads` do the same for the other knobs. All of it runs before
anything is read or written, so a refused request leaves the store exactly as it was.
This module must stay light: it does not import torch (the methods registry is imported inside
`to_plan`), so parsing a request costs no torch start-up.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BadMerge, MpError, quoted
from ..store.objects import Plan
from ..units import MAX_SIZE, SizeTooLarge, parse_size
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
    # `--compute-dtype`: compute at this precision instead of `dtype` (which then names the output
    # unless `out_dtype` does); None: compute in `dtype` as MergeKit does.
    compute_dtype: str | None = None


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
    except RecursionError:
        raise P.BadParameter(f"value {quoted(text)} is nested too deeply") from None


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


SEED_MIN, SEED_MAX = P.INT_MIN, P.INT_MAX  # the plan stores the seed as a msgpack integer
MAX_THREADS = 4096
COMPUTE = {"F32", "F16", "BF16", "F64"}  # what `dtype`/`out_dtype` may name in a MergeRequest


@dataclass(frozen=True)
class Budget:
    spec: str  # as the user wrote it
    fraction: float | None  # of the experts' differing bytes
    nbytes: int | None

    def limit(self, total: int) -> int:
        """The budget in bytes, given the experts' distinct differing bytes."""
        if self.nbytes is not None:
            return self.nbytes
        assert self.fraction is not None  # parse_budget sets one of the two
        return math.floor(self.fraction * total)


def parse_budget(text: str) -> Budget:
    """'10%' (of the experts' bytes that differ from the base) or a size: '2GB', '512MiB'."""
    if not isinstance(text, str):
        raise BadMerge(f"a budget is text such as '10%' or '2GB', got {quoted(text)}")
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*%\s*", text)
    if m:
        fraction = float(m.group(1)) / 100  # digits only: at worst inf, never NaN
        if not 0 <= fraction <= 1:
            raise BadMerge(f"budget {quoted(text)} is outside 0%..100%")
        return Budget(text.strip(), fraction, None)
    try:
        return Budget(text.strip(), None, parse_size(text))
    except SizeTooLarge as e:
        raise BadMerge(f"budget {e}") from None
    except MpError:
        raise BadMerge(f"invalid budget {quoted(text)}: use a share of the differing expert bytes (10%) "
                       "or a size (2GB)") from None


def check_memory_limit(memory_limit: int) -> int:
    """The bound on blocks in flight: a whole number of bytes, 1 .. MAX_SIZE."""
    if isinstance(memory_limit, bool) or not isinstance(memory_limit, int) or not 1 <= memory_limit <= MAX_SIZE:
        raise BadMerge(f"the memory limit must be a size from 1 byte to {MAX_SIZE} bytes, "
                       f"got {quoted(memory_limit)}")
    return memory_limit


def check_threads(threads: int | None) -> int | None:
    """`threads` for merge, plan, replay and analyze: None (all cores) or 1..MAX_THREADS."""
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= MAX_THREADS:
        raise BadMerge(f"--threads must be a whole number from 1 to {MAX_THREADS} "
                       f"(leave it out to use every core), got {quoted(threads)}")
    return threads


def _ref(value: object, what: str) -> str:
    """A model named in a request: a ref as text (YAML reads `model: 12345678` as a number)."""
    if not isinstance(value, str) or not value:
        raise BadMerge(f"{what} must be a ref (a branch, tag or commit id; quote one YAML would read "
                       f"as a number: '12345678'), got {quoted(value)}")
    return value


def check_request(req: MergeRequest) -> None:
    """What a request holds is usable whatever method it names: the types of its fields, a seed
    that fits the plan (any integer from -2**63 to 2**64-1: it is hashed as text, so negative
    seeds are seeds like any other), dtypes by safetensors name, and every parameter value finite
    and within 64 bits (`params.check_spec`). Imports nothing heavy: the CLI calls it first."""
    if not isinstance(req.method, str):
        raise BadMerge(f"the merge method is a name such as ties, got {quoted(req.method)}")
    if req.base is not None:
        _ref(req.base, "the base model")
    if not isinstance(req.models, list):
        raise BadMerge(f"models must be a list of refs, got {quoted(req.models)}")
    for i, m in enumerate(req.models):
        _ref(m, f"models[{i}]")
    if not isinstance(req.model_params, list) or req.model_params and len(req.model_params) != len(req.models):
        raise BadMerge(f"per-model parameters must be a list with one mapping for each of the "
                       f"{len(req.models)} models")
    if not isinstance(req.global_params, dict) or not all(isinstance(q, dict) for q in req.model_params):
        raise BadMerge("parameters must be a mapping of parameter name to value")
    for what in ("dtype", "out_dtype", "compute_dtype"):
        value = getattr(req, what)
        if value is not None and value not in COMPUTE:
            raise BadMerge(f"{what} {quoted(value)} is not one of {', '.join(sorted(COMPUTE))} "
                           "(safetensors names; the CLI and YAML also take float32, bfloat16, ...)")
    seed = req.seed
    if isinstance(seed, bool) or not isinstance(seed, int) or not SEED_MIN <= seed <= SEED_MAX:
        raise BadMerge(f"seed must be a whole number from -2**63 to 2**64-1, got {quoted(seed)}")
    for where, given in [("parameters", req.global_params)] + [
        (f"parameters of {m!r}", q) for m, q in zip(req.models, req.model_params)
    ]:
        for name, spec in given.items():
            P.check_spec(spec, f"{name} ({where})" if isinstance(name, str) else f"{quoted(name)} ({where})")


def _mapping(value: object, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadMerge(f"{what} must be a mapping of parameter name to value, got {quoted(value)}")
    return dict(value)


def from_yaml(path: Path) -> MergeRequest:
    try:
        import yaml
    except ImportError:
        raise BadMerge("--config needs PyYAML: pip install 'mpstore[yaml]'") from None
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise BadMerge(f"{path}: cannot read: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadMerge(f"{path}: not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r})") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise BadMerge(f"{path}: not valid YAML: {' '.join(str(e).split())[:200]}") from None
    except RecursionError:
        raise BadMerge(f"{path}: not valid YAML: nested too deeply") from None
    if not isinstance(doc, dict):
        raise BadMerge(f"{path}: a merge config is a mapping with merge_method, models, ...")
    for key in doc:
        if key in UNSUPPORTED:
            raise BadMerge(f"{path}: key {key!r} is not supported by mpstore (use `models:`)")
        if key not in YAML_KEYS:
            raise BadMerge(f"{path}: unknown key {quoted(key)}")
    if "merge_method" not in doc or "models" not in doc:
        raise BadMerge(f"{path}: needs merge_method and models")
    if not isinstance(doc["merge_method"], str):
        raise BadMerge(f"{path}: merge_method is a name such as ties, got {quoted(doc['merge_method'])}")
    entries = doc["models"] if doc["models"] is not None else []
    if not isinstance(entries, list):
        raise BadMerge(f"{path}: models must be a list of {{model: REF, parameters: {{...}}}}")
    models, model_params = [], []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "model" not in entry or set(entry) - {"model", "parameters"}:
            raise BadMerge(f"{path}: models[{i}] must be {{model: REF, parameters: {{...}}}}")
        models.append(_ref(entry["model"], f"{path}: models[{i}].model"))
        model_params.append(_mapping(entry.get("parameters"), f"{path}: models[{i}].parameters"))
    base = doc.get("base_model")
    dtypes = []
    for what in ("dtype", "out_dtype"):
        value = doc.get(what)
        if value is not None and not isinstance(value, str):
            raise BadMerge(f"{path}: {what} is a name such as bfloat16, got {quoted(value)}")
        dtypes.append(dtype_name(value, what))
    req = MergeRequest(
        doc["merge_method"], _ref(base, f"{path}: base_model") if base is not None else None,
        models, model_params, _mapping(doc.get("parameters"), f"{path}: parameters"), dtypes[0], dtypes[1],
    )
    try:
        check_request(req)
    except MpError as e:
        raise type(e)(f"{path}: {e}") from None
    return req


def to_plan(req: MergeRequest, resolve: Callable[[str], bytes], chunk_size: int, engine: int) -> Plan:
    """Check the request against its method and fix every input and parameter in a Plan."""
    check_request(req)  # before the methods (and torch) are imported
    from . import methods  # imports torch: only when a plan is made

    method = methods.get(req.method)
    known = {d.name: d for d in (*method.model_params, *method.global_params)}
    per_model = req.model_params or [{} for _ in req.models]
    for where, given in [("parameters", req.global_params)] + [
        (f"parameters of {m!r}", q) for m, q in zip(req.models, per_model)
    ]:
        for name in given:
            if name not in known:
                raise BadMerge(f"{req.method} has no parameter {quoted(name)} ({where})")
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
        tuple(chains), globals_, req.seed, req.compute_dtype or req.dtype,
        req.out_dtype or (req.dtype if req.compute_dtype else None), chunk_size, engine,
    )
