"""The safetensors dtypes mpstore knows, with their element sizes.

Chunk sizes are multiples of the largest element size, so a chunk boundary never splits an
element; the numeric views (for diff) are looked up here too, lazily, because add and checkout
move bytes only and must not pay for importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported only where a tensor is computed on
    import torch

ITEMSIZE: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}

MAX_ITEMSIZE = max(ITEMSIZE.values())
FLOATS = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})  # values with a difference: diff, merges

# Float dtypes each holds exactly: converting a value of one of them to it and back is the identity.
_F8 = {"F8_E4M3", "F8_E5M2"}
_HOLDS = {"F64": {"F32", "F16", "BF16", *_F8}, "F32": {"F16", "BF16", *_F8}, "F16": _F8, "BF16": _F8}


def holds(wide: str, narrow: str) -> bool:
    """Every value of dtype `narrow` is exactly a value of dtype `wide` (a round trip through
    `wide` changes nothing): what lets a merge reuse a stored tensor its compute dtype would
    otherwise round, as MergeKit does by loading every input in that dtype."""
    return wide == narrow or narrow in _HOLDS.get(wide, ())


_TORCH_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8",
    "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype that reads bytes of safetensors dtype `name`."""
    import torch

    return getattr(torch, _TORCH_NAMES[name])
