"""Merge parameters as MergeKit writes them, and their value for one tensor.

A parameter's value may be a scalar, a gradient (a list of numbers interpolated over the layer
position), or a list of `{filter, value}` entries where the first entry whose filter is a
substring of the tensor name wins. A plan keeps, per parameter, the chain of places it may be set
(the model's entry, then the global `parameters`, then the method's default); the first level
that yields a value for a tensor is used. Nothing here knows about any particular method.
Every number in a value must be finite (NaN, ±inf and 1e999 — also written as text — are refused:
they would merge into an all-NaN model) and every integer must fit the plan's 64-bit msgpack
integers; `check_spec` enforces both before a plan is made.
"""

from __future__ import annotations

import math
import re

from ..errors import MpError, quoted

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")

Spec = object  # a scalar, a list of scalars, a {filter, value} dict, or a list of such dicts


class BadParameter(MpError):
    """A parameter value that cannot be used."""


def layer_index(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def with_layer(name: str, i: int) -> str:
    """`name` with its layer number replaced by i (a slice renames the layers it stacks)."""
    return _LAYER.sub(lambda m: m.group(0).replace(m.group(1), str(i)), name, count=1)


def layer_position(name: str, num_layers: int) -> float:
    """Where a tensor sits for gradients: layer i of L at i/(L-1); non-layer tensors at 0."""
    i = layer_index(name)
    if i is None:
        return 0.0
    return 1.0 if num_layers <= 1 else i / (num_layers - 1)


def _is_conditional(spec: Spec) -> bool:
    return isinstance(spec, dict) or (isinstance(spec, list) and any(isinstance(v, dict) for v in spec))


INT_MIN, INT_MAX = -(1 << 63), (1 << 64) - 1  # what a plan's msgpack integer holds
MAX_DEPTH = 8  # {filter, value} entries nested in one another


def check_number(value: object, where: str) -> None:
    """Refuse a scalar no plan can hold or no merge can use: NaN, ±inf, a float written too big
    for a double (1e999, also as text: 'nan', 'inf', '1e999'), an integer outside 64 bits."""
    if isinstance(value, bool):
        return
    if isinstance(value, int):
        if not INT_MIN <= value <= INT_MAX:
            raise BadParameter(f"{where}: {quoted(value)} is too large (integers are stored in 64 bits)")
        return
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return  # a word (true, off, ...): `coerce` says whether it is a value for this parameter
    elif isinstance(value, float):
        number = value
    else:
        return
    if not math.isfinite(number):
        raise BadParameter(f"{where}: {quoted(value)} is not a finite number")


def check_spec(spec: Spec, where: str, depth: int = 0) -> Spec:
    """Reject shapes of values MergeKit would reject, and every number that is not finite or
    does not fit in 64 bits, wherever it sits; return the spec unchanged."""
    if depth > MAX_DEPTH:
        raise BadParameter(f"{where}: {{filter, value}} entries nested more than {MAX_DEPTH} deep")
    if isinstance(spec, dict):
        spec = [spec]
    if isinstance(spec, list):
        if _is_conditional(spec):
            for entry in spec:
                if not isinstance(entry, dict) or set(entry) - {"filter", "value"} or "value" not in entry:
                    raise BadParameter(f"{where}: a filtered value is a list of {{filter, value}} entries")
                if entry.get("filter") is not None and not isinstance(entry["filter"], str):
                    raise BadParameter(f"{where}: a filter is a piece of a tensor name, got {quoted(entry['filter'])}")
                check_spec(entry["value"], where, depth + 1)
        elif not all(isinstance(v, (int, float, bool)) for v in spec):
            raise BadParameter(f"{where}: a gradient is a list of numbers, got {quoted(spec)}")
        else:
            for v in spec:
                check_number(v, where)
    elif not isinstance(spec, (int, float, bool, str)) and spec is not None:
        raise BadParameter(f"{where}: unsupported value {quoted(spec)}")
    else:
        check_number(spec, where)
    return spec


def _gradient(values: list[object], t: float, kind: type) -> object:
    if not values:
        return None
    x = t * (len(values) - 1)
    i = math.floor(x)
    if kind is bool:
        return values[i]
    j = min(i + 1, len(values) - 1)
    frac = x - i
    return (1 - frac) * _number(values[i]) + frac * _number(values[j])


def _number(value: object) -> float:
    """A gradient's point as a float (`check_spec` lets only numbers into a gradient)."""
    if not isinstance(value, (int, float, str)):
        raise BadParameter(f"a gradient is a list of numbers, got {value!r}")
    return float(value)


def evaluate(spec: Spec, name: str, t: float, kind: type) -> object:
    """The value `spec` gives tensor `name` at layer position `t`, or None if it is silent."""
    if spec is None:
        return None
    if _is_conditional(spec):
        for entry in spec if isinstance(spec, list) else [spec]:
            if not isinstance(entry, dict):
                raise BadParameter(f"a filtered value is a list of {{filter, value}} entries, got {entry!r}")
            f = entry.get("filter")
            if f is None or f == "*" or f in name:
                return evaluate(entry["value"], name, t, kind)
        return None
    if isinstance(spec, list):
        return _gradient(spec, t, kind)
    return spec


def coerce(value: object, kind: type, where: str) -> float:
    """Turn a YAML/CLI scalar into a float or bool the way MergeKit accepts them (a bool is a
    float to the type checker)."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise BadParameter(f"{where}: expected true or false, got {value!r}")
    if isinstance(value, (int, float, str)):
        try:
            number = float(value)
        except (ValueError, OverflowError):
            pass
        else:
            if math.isfinite(number):
                return number
            raise BadParameter(f"{where}: {quoted(value)} is not a finite number")
    raise BadParameter(f"{where}: expected a number, got {value!r}")


def resolve(chain: list[Spec], name: str, t: float, kind: type, where: str) -> float:
    """The first value along `chain` (model level, global level, default) for this tensor."""
    for spec in chain:
        value = evaluate(spec, name, t, kind)
        if value is not None:
            return coerce(value, kind, where)
    raise BadParameter(f"{where}: no value for tensor {name!r} (required parameter)")
