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
from typing import TYPE_CHECKING

from ..errors import BadMerge, MpError, quoted
from ..model import tokenizer
from ..store.objects import Plan
from ..units import MAX_SIZE, SizeTooLarge, parse_size
from . import params as P

if TYPE_CHECKING:  # the methods import torch: only their types here
    from .methods.base import MergeMethod, ParamDef

YAML_KEYS = {"merge_method", "models", "slices", "base_model", "parameters", "dtype", "out_dtype",
             "tokenizer_source", "tokenizer", "chat_template", "name"}
# Keys MergeKit 0.1.5 accepts and then ignores (or that mpstore does not implement): refused by
# name with where the setting belongs, since a silently dropped setting gives another model.
MISPLACED = {
    "normalize": "MergeKit ignores a top-level `normalize:`; put it under `parameters:`",
    "rescale": "MergeKit ignores a top-level `rescale:`; put it under `parameters:`",
    "weight": "MergeKit ignores a top-level `weight:`; put it under a model's or the global `parameters:`",
    "density": "MergeKit ignores a top-level `density:`; put it under a model's or the global `parameters:`",
    "t": "MergeKit ignores a top-level `t:`; put it under `parameters:`",
    "modules": "`modules:` (per-module merges of multi-module models) is not supported by mpstore; "
               "use `models:` or `slices:`",
}
DTYPES = {
    "float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64",
    "fp32": "F32", "fp16": "F16", "bf16": "BF16", "f32": "F32", "f16": "F16", "f64": "F64",
}


@dataclass
class SourceRequest:
    """One source of a MergeKit slice: a model and the layers [first, end) it gives."""

    model: str
    layers: tuple[int, int]
    params: dict[str, P.Spec] = field(default_factory=dict)


@dataclass
class SliceRequest:
    """One output slice: its sources (equal numbers of layers), its base and its parameters."""

    sources: list[SourceRequest]
    base: str | None = None
    params: dict[str, P.Spec] = field(default_factory=dict)


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
    slices: list[SliceRequest] | None = None  # MergeKit `slices:`; then `models` is empty
    # `tokenizer_source` / `tokenizer:`: {"source": "base" | "union" | ref, "tokens": {...},
    # "pad_to_multiple_of": int or None}
    tokenizer: dict | None = None
    chat_template: str | None = None
    name: str | None = None  # a stage of a multi-document config: the branch it commits on


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
    for where, given in _levels(req):
        if not isinstance(given, dict):
            raise BadMerge(f"{where} must be a mapping of parameter name to value")
        for name, spec in given.items():
            P.check_spec(spec, f"{name} ({where})" if isinstance(name, str) else f"{quoted(name)} ({where})")
    for k, sl in enumerate(req.slices or []):
        lengths = set()
        for i, src in enumerate(sl.sources):
            a, b = src.layers
            if not 0 <= a < b:
                raise BadMerge(f"slices[{k}].sources[{i}]: layer_range [{a}, {b}] is empty or negative "
                               "(it is [FIRST, END), END excluded)")
            lengths.add(b - a)
        if len(lengths) > 1:
            raise BadMerge(f"slices[{k}]: its sources give different numbers of layers ({sorted(lengths)}); "
                           "every source of a slice must give the same number (as MergeKit requires)")
    if req.slices is not None and req.models:
        raise BadMerge("a merge takes models or slices, not both")
    for what in ("chat_template", "name"):
        value = getattr(req, what)
        if value is not None and not isinstance(value, str):
            raise BadMerge(f"{what} must be text, got {quoted(value)}")


def _levels(req: MergeRequest) -> list[tuple[str, dict]]:
    """Every place a request sets parameters, with where it is for messages."""
    out: list[tuple[str, dict]] = [("parameters", req.global_params)]
    out += [(f"parameters of {m!r}", q) for m, q in zip(req.models, req.model_params)]
    for k, sl in enumerate(req.slices or []):
        out.append((f"slices[{k}].parameters", sl.params))
        out += [(f"slices[{k}].sources[{i}].parameters", src.params) for i, src in enumerate(sl.sources)]
    return out


def _mapping(value: object, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadMerge(f"{what} must be a mapping of parameter name to value, got {quoted(value)}")
    return dict(value)


def _documents(path: Path) -> list[object]:
    """The YAML documents of a config file (several: a multi-stage config, as mergekit-multi)."""
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
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        raise BadMerge(f"{path}: not valid YAML: {' '.join(str(e).split())[:200]}") from None
    except RecursionError:
        raise BadMerge(f"{path}: not valid YAML: nested too deeply") from None
    if not docs:
        raise BadMerge(f"{path}: a merge config is a mapping with merge_method, models, ...")
    return docs


def from_yaml(path: Path) -> MergeRequest:
    """The one merge a single-document config describes."""
    found = stages(path)
    if len(found) != 1:
        raise BadMerge(f"{path}: holds {len(found)} merges (documents separated by ---): merge it with "
                       "`mp merge --config` (each stage commits on the branch its `name:` gives)")
    return found[0]


def stages(path: Path) -> list[MergeRequest]:
    """Every merge of a config, in order. Several documents are stages (mergekit-multi): each but
    the last names itself with `name:`, the branch it commits on, and later stages use that name
    as a ref."""
    docs = _documents(path)
    out = []
    for i, doc in enumerate(docs):
        where = f"{path}" if len(docs) == 1 else f"{path} (document {i + 1})"
        req = _request(doc, where)
        if len(docs) > 1 and i < len(docs) - 1 and req.name is None:
            raise BadMerge(f"{where}: each stage but the last needs `name:` (the branch it commits on, "
                           "which later stages refer to)")
        out.append(req)
    names = [r.name for r in out if r.name is not None]
    if len(set(names)) != len(names):
        raise BadMerge(f"{path}: two stages have the same name")
    return out


def _request(doc: object, where: str) -> MergeRequest:
    if not isinstance(doc, dict):
        raise BadMerge(f"{where}: a merge config is a mapping with merge_method, models, ...")
    for key in doc:
        if key in MISPLACED:
            raise BadMerge(f"{where}: {MISPLACED[key]}")
        if key not in YAML_KEYS:
            raise BadMerge(f"{where}: unknown key {quoted(key)} (MergeKit 0.1.5 ignores unknown top-level keys; "
                           "mpstore refuses them so that no setting is silently dropped)")
    if "merge_method" not in doc or ("models" in doc) == ("slices" in doc):
        raise BadMerge(f"{where}: needs merge_method and exactly one of models or slices")
    if not isinstance(doc["merge_method"], str):
        raise BadMerge(f"{where}: merge_method is a name such as ties, got {quoted(doc['merge_method'])}")
    models, model_params, slices = [], [], None
    if "models" in doc:
        entries = doc["models"] if doc["models"] is not None else []
        if not isinstance(entries, list):
            raise BadMerge(f"{where}: models must be a list of {{model: REF, parameters: {{...}}}}")
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or "model" not in entry or set(entry) - {"model", "parameters"}:
                raise BadMerge(f"{where}: models[{i}] must be {{model: REF, parameters: {{...}}}}")
            models.append(_ref(entry["model"], f"{where}: models[{i}].model"))
            model_params.append(_mapping(entry.get("parameters"), f"{where}: models[{i}].parameters"))
    else:
        slices = _slices(doc["slices"], where)
    base = doc.get("base_model")
    dtypes = []
    for what in ("dtype", "out_dtype"):
        value = doc.get(what)
        if value is not None and not isinstance(value, str):
            raise BadMerge(f"{where}: {what} is a name such as bfloat16, got {quoted(value)}")
        dtypes.append(dtype_name(value, what))
    name = doc.get("name")
    if name is not None and (not isinstance(name, str) or not name):
        raise BadMerge(f"{where}: name is the stage's branch name, got {quoted(name)}")
    try:
        template = tokenizer.check_chat_template(doc.get("chat_template"))
    except MpError as e:
        raise type(e)(f"{where}: {e}") from None
    req = MergeRequest(
        doc["merge_method"], _ref(base, f"{where}: base_model") if base is not None else None,
        models, model_params, _mapping(doc.get("parameters"), f"{where}: parameters"), dtypes[0], dtypes[1],
        slices=slices, tokenizer=_tokenizer(doc, where), chat_template=template, name=name,
    )
    try:
        check_request(req)
    except MpError as e:
        raise type(e)(f"{where}: {e}") from None
    return req


def _slices(value: object, where: str) -> list[SliceRequest]:
    if not isinstance(value, list) or not value:
        raise BadMerge(f"{where}: slices must be a list of {{sources: [{{model, layer_range}}, ...]}}")
    out = []
    for k, sl in enumerate(value):
        at = f"{where}: slices[{k}]"
        if not isinstance(sl, dict) or "sources" not in sl:
            raise BadMerge(f"{at} must be {{sources: [...], parameters: {{...}}}}")
        if "residual_weight" in sl:
            raise BadMerge(f"{at}: MergeKit 0.1.5 ignores residual_weight; remove it")
        extra = set(sl) - {"sources", "base_model", "parameters"}
        if extra:
            raise BadMerge(f"{at}: unknown key {quoted(sorted(map(str, extra))[0])} (a slice has sources, "
                           "base_model and parameters)")
        if not isinstance(sl["sources"], list) or not sl["sources"]:
            raise BadMerge(f"{at}: sources must be a non-empty list of {{model, layer_range}}")
        sources = []
        for i, src in enumerate(sl["sources"]):
            sat = f"{at}.sources[{i}]"
            if not isinstance(src, dict) or "model" not in src or "layer_range" not in src \
                    or set(src) - {"model", "layer_range", "parameters"}:
                raise BadMerge(f"{sat} must be {{model: REF, layer_range: [FIRST, END], parameters: {{...}}}}")
            r = src["layer_range"]
            if not (isinstance(r, list) and len(r) == 2
                    and all(isinstance(x, int) and not isinstance(x, bool) for x in r)):
                raise BadMerge(f"{sat}: layer_range is [FIRST, END] (whole numbers), got {quoted(r)}")
            sources.append(SourceRequest(_ref(src["model"], f"{sat}.model"), (r[0], r[1]),
                                         _mapping(src.get("parameters"), f"{sat}.parameters")))
        base = sl.get("base_model")
        out.append(SliceRequest(sources, _ref(base, f"{at}.base_model") if base is not None else None,
                                _mapping(sl.get("parameters"), f"{at}.parameters")))
    return out


def _tokenizer(doc: dict, where: str) -> dict | None:
    """`tokenizer_source: base | union | REF` or a `tokenizer:` block, as one spec whose models
    are still refs (`to_plan` fixes them as commit ids)."""
    try:
        return tokenizer.parse_spec(doc.get("tokenizer_source"), doc.get("tokenizer"), lambda ref: ref)
    except MpError as e:
        raise type(e)(f"{where}: {e}") from None


def _inputs(base: str | None, refs: list[str], resolve: Callable[[str], bytes]
            ) -> tuple[bytes | None, list[bytes], list[bytes | None]]:
    """Commit ids of the base and of the other inputs, and per input of (base, *others) the LoRA
    adapter it names (MergeKit's `model+adapter`) or None."""
    commits: list[bytes] = []
    adapters: list[bytes | None] = [] if base is not None else [None]
    for ref in ([base] if base is not None else []) + refs:
        try:
            commits.append(resolve(ref))
            adapters.append(None)
            continue
        except MpError:
            if "+" not in ref:
                raise
        model, _, adapter = ref.partition("+")
        if "+" in adapter:
            raise BadMerge(f"{ref!r}: a model takes at most one adapter (MODEL+ADAPTER)")
        commits.append(resolve(model))
        adapters.append(resolve(adapter))
    return (commits.pop(0) if base is not None else None), commits, adapters


def _chains(defs: tuple[ParamDef, ...], levels: list[dict]) -> dict[str, list[P.Spec]]:
    """Each parameter's values from the most specific level to the method's default."""
    return {d.name: [s for s in (*(q.get(d.name) for q in levels), d.default) if s is not None] for d in defs}


def to_plan(req: MergeRequest, resolve: Callable[[str], bytes], chunk_size: int, engine: int) -> Plan:
    """Check the request against its method and fix every input and parameter in a Plan."""
    check_request(req)  # before the methods (and torch) are imported
    from . import methods  # imports torch: only when a plan is made

    method = methods.get(req.method)
    known = {d.name: d for d in (*method.model_params, *method.global_params)}
    for where, given in _levels(req):
        for name in given:
            if name not in known:
                raise BadMerge(f"{req.method} has no parameter {quoted(name)} ({where}){_ignored(name, req.method)}")
    if req.slices is not None:
        return _sliced(req, method, resolve, chunk_size, engine)
    per_model = req.model_params or [{} for _ in req.models]
    models, params = list(req.models), list(per_model)
    if req.base is not None and req.base in models and method.base != "none":
        at = models.index(req.base)
        del models[at], params[at]  # the base listed among the models is the base, not an input
    if method.base == "none" and req.base is not None and req.base not in models:
        models.append(req.base)  # linear: a base is one more input and needs a weight
        params.append({})
    if method.base == "required" and req.base is None:
        raise BadMerge(f"{req.method} needs a base model (--base / base_model)")
    _count(method, len(models), "")
    chains = [_chains(method.model_params, [q, req.global_params]) for q in params]
    globals_ = _chains(method.global_params, [req.global_params])
    _required(method, globals_, chains, models)
    base, commits, adapters = _inputs(req.base, models, resolve)
    return _plan(req, method.name, base, tuple(commits), tuple(chains), globals_, chunk_size, engine,
                 adapters, resolve, None)


def _ignored(name: object, method: str) -> str:
    """Why a parameter a method does not take is refused rather than dropped."""
    if name == "dtype":
        return ": dtype is a top-level key (MergeKit ignores it under parameters)"
    return " (MergeKit would ignore it; mpstore refuses it so that nothing is silently dropped)"


def _count(method: MergeMethod, n: int, where: str) -> None:
    if n < method.min_models or (method.max_models and n > method.max_models):
        want = (f"exactly {method.min_models}" if method.max_models == method.min_models
                else f"at least {method.min_models}")
        raise BadMerge(f"{where}{method.name} takes {want} model(s) besides the base, got {n}")


def _required(method: MergeMethod, globals_: dict, chains: list[dict], models: list[str], where: str = "") -> None:
    for name, levels in globals_.items():
        if not levels:
            raise BadMerge(f"{where}{method.name} needs parameter {name!r}")
    for m, chain in zip(models, chains):
        for name, levels in chain.items():
            if not levels:
                raise BadMerge(f"{where}{method.name} needs parameter {name!r} for model {m!r}")


def _sliced(req: MergeRequest, method: MergeMethod, resolve: Callable[[str], bytes], chunk_size: int,
            engine: int) -> Plan:
    """A plan of MergeKit slices: the distinct source models are the inputs, each slice names its
    sources by input number and keeps its own parameter chains (source, slice, global, default)."""
    assert req.slices is not None
    refs: list[str] = []
    for sl in req.slices:
        refs += [src.model for src in sl.sources if src.model not in refs]
    out = []
    for k, sl in enumerate(req.slices):
        where = f"slices[{k}]: "
        base = sl.base or req.base
        at = next((i for i, src in enumerate(sl.sources) if src.model == base), None) if base else None
        if method.base == "required" and at is None:
            raise BadMerge(f"{where}{method.name} needs its base model among the slice's sources "
                           f"({'none given' if base is None else repr(base) + ' is not one'})")
        models = [src.model for i, src in enumerate(sl.sources) if i != at or method.base == "none"]
        _count(method, len(models), where)
        chains = [_chains(method.model_params, [src.params, sl.params, req.global_params]) for src in sl.sources]
        globals_ = _chains(method.global_params, [sl.params, req.global_params])
        _required(method, globals_, [c for i, c in enumerate(chains) if i != at or method.base == "none"],
                  models, where)
        out.append({"sources": [[refs.index(src.model), *src.layers] for src in sl.sources],
                    "base": at if method.base != "none" else None,
                    "model_params": chains, "global_params": globals_})
    base_id, commits, adapters = _inputs(req.base, refs, resolve)
    return _plan(req, method.name, base_id, tuple(commits), (), {}, chunk_size, engine, adapters, resolve, out)


def _plan(req: MergeRequest, method: str, base: bytes | None, models: tuple[bytes, ...], chains: tuple,
          globals_: dict, chunk_size: int, engine: int, adapters: list[bytes | None],
          resolve: Callable[[str], bytes], slices: list | None) -> Plan:
    vocab = None
    if req.tokenizer is not None:
        vocab = tokenizer.with_models(req.tokenizer, lambda ref: resolve(str(ref)))
    return Plan(
        method, base, models, chains, globals_, req.seed, req.compute_dtype or req.dtype,
        req.out_dtype or (req.dtype if req.compute_dtype else None), chunk_size, engine,
        slices=slices, adapters=adapters if any(a is not None for a in adapters) else None,
        tokenizer=vocab, chat_template=req.chat_template,
    )
