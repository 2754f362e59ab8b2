"""Comparing two snapshots tensor by tensor (`mp diff`), reading as little as the digests allow.

Tensors with equal ids are unchanged without reading anything; within a changed tensor a chunk
whose digest is equal on both sides is never subtracted and is read once, only because the
tensor's norm and cosine need its values. Statistics are computed in float32 with float64 sums.
NaN and Inf are counted, per side and in the difference, and never folded into a number: a
statistic they poison is None (JSON null), so `--json` output is always valid JSON.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from ..store.dtypes import FLOATS, torch_dtype
from ..store.env import Store, Txn
from ..store.objects import Tensor

if TYPE_CHECKING:  # imported where values are compared: add and checkout never pay for it
    import torch


NONFINITE_KEYS = ("nan_a", "inf_a", "nan_b", "inf_b", "nan_diff", "inf_diff")


def _finite(x: float | None) -> float | None:
    """A statistic as reported: NaN and infinities are not numbers JSON can carry, and a tensor
    holding them has no meaningful norm; `nonfinite` says why the number is missing."""
    return x if x is not None and math.isfinite(x) else None


@dataclass(frozen=True)
class TensorDiff:
    name: str
    status: str  # unchanged | changed | only_a | only_b
    changed_chunks: int | None = None
    total_chunks: int | None = None
    rel_l2: float | None = None  # ||B-A|| / ||A||
    cosine: float | None = None
    max_abs: float | None = None
    changed_bytes: int = 0
    note: str | None = None  # why numbers are missing (dtype or shape changed)
    # NaN / Inf counts (NONFINITE_KEYS) in A, in B and in the float32 difference B - A, for a
    # changed tensor holding any; None when every value read is finite. Statistics a non-finite
    # value poisons are None then, never a number that hides it.
    nonfinite: dict[str, int] | None = None

    def to_json(self) -> dict:
        out = asdict(self)
        for key in ("rel_l2", "cosine", "max_abs"):
            out[key] = _finite(out[key])
        return out


@dataclass(frozen=True)
class DiffResult:
    a: bytes
    b: bytes
    tensors: list[TensorDiff]

    def counts(self) -> dict[str, int]:
        out = {"unchanged": 0, "changed": 0, "only_a": 0, "only_b": 0}
        for t in self.tensors:
            out[t.status] += 1
        return out

    def bytes_changed(self) -> int:
        return sum(t.changed_bytes for t in self.tensors)

    def nonfinite(self) -> int:
        """How many tensors hold NaN or Inf (on either side or in their difference)."""
        return sum(t.nonfinite is not None for t in self.tensors)

    def to_json(self) -> dict:
        return {
            "a": self.a.hex(),
            "b": self.b.hex(),
            "summary": {**self.counts(), "bytes_changed": self.bytes_changed(), "nonfinite": self.nonfinite()},
            "tensors": [t.to_json() for t in self.tensors],
        }


class _Reader:
    """Turns chunks into tensors of their own dtype, releasing mapped pages as it goes."""

    def __init__(self, store: Store, txn: Txn):
        self.store, self.txn = store, txn

    def values(self, key: bytes, dtype: str) -> torch.Tensor:
        import torch

        view = self.txn.chunk(key)
        self.store.touched(len(view))
        if not len(view):
            return torch.zeros(0, dtype=torch_dtype(dtype))
        return torch.frombuffer(bytearray(view), dtype=torch_dtype(dtype))


def _count(x: torch.Tensor) -> tuple[int, int]:
    """(NaN, Inf) elements of a floating tensor."""
    import torch

    return int(torch.isnan(x).sum()), int(torch.isinf(x).sum())


def _compare(reader: _Reader, name: str, ta: Tensor, tb: Tensor) -> TensorDiff:
    import torch

    if ta.dtype != tb.dtype or ta.shape != tb.shape:
        note = f"{ta.dtype}{list(ta.shape)} -> {tb.dtype}{list(tb.shape)}"
        return TensorDiff(name, "changed", len(tb.chunks), len(tb.chunks), changed_bytes=tb.size, note=note)
    floating = ta.dtype in FLOATS
    counts = dict.fromkeys(NONFINITE_KEYS, 0)

    def side(native: torch.Tensor, *sides: str) -> torch.Tensor:
        """The values in float32 (as the statistics take them), counting NaN and Inf as stored
        on each of `sides` ("a", "b") that holds this chunk."""
        values = native.to(torch.float32)
        if floating:
            n, i = _count(native.double() if ta.dtype == "F64" else values)
            for s in sides:
                counts[f"nan_{s}"] += n
                counts[f"inf_{s}"] += i
        return values

    aa = bb = ab = dd = 0.0
    max_abs = 0.0
    changed = changed_bytes = 0
    for (ka, kb), (start, end) in zip(zip(ta.chunks, tb.chunks), tb.spans()):
        a32 = side(reader.values(ka, ta.dtype), *(("a", "b") if ka == kb else ("a",)))
        a = a32.double()
        if ka == kb:  # the same bytes on both sides: no difference, read once for the norms
            s = float(torch.dot(a, a))
            aa, bb, ab = aa + s, bb + s, ab + s
            continue
        b32 = side(reader.values(kb, tb.dtype), "b")
        b = b32.double()
        d32 = b32 - a32  # the difference itself is taken in float32
        d = d32.double()
        aa += float(torch.dot(a, a))
        bb += float(torch.dot(b, b))
        ab += float(torch.dot(a, b))
        dd += float(torch.dot(d, d))
        n, i = _count(d32)
        counts["nan_diff"] += n
        counts["inf_diff"] += i
        if d.numel() and not n:
            max_abs = max(max_abs, float(d.abs().max()))
        changed += 1
        changed_bytes += end - start
    bad = counts if any(counts.values()) else None
    norms_ok = all(math.isfinite(x) for x in (aa, bb, ab, dd))
    rel = cos = None
    if norms_ok:
        rel = math.sqrt(dd) / math.sqrt(aa) if aa > 0 else (0.0 if dd == 0 else None)
        cos = ab / math.sqrt(aa * bb) if aa > 0 and bb > 0 else None
    shown_max = None if counts["nan_diff"] or counts["inf_diff"] else max_abs
    return TensorDiff(name, "changed", changed, len(tb.chunks), _finite(rel), _finite(cos), _finite(shown_max),
                      changed_bytes, nonfinite=bad)


def diff_snapshots(store: Store, txn: Txn, a: bytes, b: bytes) -> list[TensorDiff]:
    sa = txn.snapshot(a)
    sb = txn.snapshot(b)
    reader = _Reader(store, txn)
    out: list[TensorDiff] = []
    for name in sorted(sa.tensors.keys() | sb.tensors.keys(), key=natural_key):
        ia, ib = sa.tensors.get(name), sb.tensors.get(name)
        if ib is None:
            out.append(TensorDiff(name, "only_a"))
        elif ia is None:
            out.append(TensorDiff(name, "only_b", changed_bytes=txn.tensor(ib).size))
        elif ia == ib:
            n = len(txn.tensor(ia).chunks)
            out.append(TensorDiff(name, "unchanged", 0, n, 0.0, 1.0, 0.0))
        else:
            out.append(_compare(reader, name, txn.tensor(ia), txn.tensor(ib)))
    store.release_pages()
    return out


def natural_key(name: str) -> list:
    """Sort `layers.10` after `layers.9`, as people count layers."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split(".")]
