"""Reading and validating a safetensors file's header, without reading its tensor bytes.

The header decides where every byte of the file goes, so it is checked completely before
anything is stored: a file that passes here can be cut into chunks and rebuilt byte for byte
from its raw header plus its tensors' bytes in offset order.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadInput
from ..store.dtypes import ITEMSIZE
from .paths import utf8

# safetensors itself refuses headers over 100 MB; a larger declared length is a broken file.
MAX_HEADER = 100_000_000
MAX_DIM = 1 << 63  # dimensions and offsets are u64 in the format; ours must fit a signed int64


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # offset of the first byte, relative to the start of the data section
    end: int


@dataclass(frozen=True)
class Header:
    raw: bytes  # the header exactly as in the file (JSON plus any padding)
    data_start: int  # 8 + len(raw)
    tensors: tuple[TensorEntry, ...]  # in offset order, which is the order of the bytes on disk
    metadata: dict[str, str] | None


def _fail(path: Path, what: str) -> BadInput:
    return BadInput(f"{path}: {what}")


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    seen: dict[str, object] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def _entry(path: Path, name: str, info: object) -> TensorEntry:
    if not isinstance(info, dict):
        raise _fail(path, f"tensor {name!r}: entry is not an object")
    dtype = info.get("dtype")
    shape = info.get("shape")
    offsets = info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in ITEMSIZE:
        raise _fail(path, f"tensor {name!r}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < MAX_DIM for d in shape):
        raise _fail(path, f"tensor {name!r}: invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int and 0 <= o < MAX_DIM for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise _fail(path, f"tensor {name!r}: invalid data_offsets {offsets!r}")
    nbytes = math.prod(shape) * ITEMSIZE[dtype]
    if offsets[1] - offsets[0] != nbytes:
        raise _fail(
            path,
            f"tensor {name!r}: shape {shape} of {dtype} needs {nbytes} bytes "
            f"but data_offsets span {offsets[1] - offsets[0]}",
        )
    return TensorEntry(name, dtype, tuple(shape), offsets[0], offsets[1])


def _check_layout(path: Path, tensors: list[TensorEntry], data_size: int) -> None:
    """Tensors must tile the data section exactly: no overlap, no hole, nothing past the end."""
    pos = 0
    prev: TensorEntry | None = None
    for t in tensors:
        if t.begin < pos and prev is not None:  # pos > 0: a tensor came before
            raise _fail(path, f"tensors {prev.name!r} and {t.name!r} overlap")
        if t.begin > pos:
            after = f"after {prev.name!r}" if prev else "before the first tensor"
            raise _fail(path, f"{t.begin - pos} unindexed bytes {after}")
        pos, prev = t.end, t
    if pos > data_size and prev is not None:
        raise _fail(
            path,
            f"tensor {prev.name!r} runs past the end of the file "
            f"({pos} data bytes declared, {data_size} present; truncated?)",
        )
    if pos < data_size:
        raise _fail(path, f"{data_size - pos} trailing bytes after the last tensor")


def read_header(path: Path) -> Header:
    """Parse and validate `path`'s header; raises BadInput naming the first problem found."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _fail(path, f"truncated: {size} bytes, too short for a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER:
                raise _fail(path, f"header length {n} is larger than the {MAX_HEADER}-byte limit")
            if n > size - 8:
                raise _fail(path, f"header length {n} runs past the end of the {size}-byte file")
            raw = f.read(n)
    except OSError as e:
        raise _fail(path, f"cannot read: {e.strerror}") from None
    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _fail(path, f"header is not valid JSON: {type(e).__name__}: {e}") from None
    if not isinstance(doc, dict):
        raise _fail(path, "header is not a JSON object")
    for key in doc:
        if not utf8(key):
            raise _fail(path, f"tensor name {key!r} is not valid UTF-8")
    metadata = doc.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict)
        and all(isinstance(v, str) and utf8(k) and utf8(v) for k, v in metadata.items())
    ):
        raise _fail(path, "__metadata__ must map strings to strings")
    tensors = sorted((_entry(path, k, v) for k, v in doc.items()), key=lambda t: (t.begin, t.end))
    _check_layout(path, tensors, size - 8 - n)
    return Header(raw=raw, data_start=8 + n, tensors=tuple(tensors), metadata=metadata)


def build_header(tensors: list[tuple[str, str, tuple[int, ...], int]], metadata: dict[str, str] | None) -> bytes:
    """A header for tensors (name, dtype, shape, nbytes) laid out in the given order.

    Used for files mpstore writes itself (merges, reverts). Compact JSON padded with spaces to a
    multiple of 8 bytes, as safetensors writers do, so the data section starts aligned."""
    doc: dict[str, object] = {}
    if metadata is not None:
        doc["__metadata__"] = metadata
    offset = 0
    for name, dtype, shape, nbytes in tensors:
        doc[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(doc, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)
