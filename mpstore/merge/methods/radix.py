"""Exact order statistics of |delta| by radix selection, streamed over a tensor's blocks.

Top-k and breadcrumbs cut each input's delta at given ranks of its magnitude over the whole
tensor. Non-negative float32 values order like their bit patterns, so three passes find every
cut exactly without holding the tensor:

1. `HIGH_BITS`: a histogram of the top 16 bits of each input's |delta| places each wanted rank in a
   bin (the delta catalog stores exactly this histogram per chunk, so it can stand in);
2. `LOW_BITS`: a histogram of the low 16 bits of the entries in that bin gives the exact magnitude;
3. `TIE_COUNTS`: the entries equal to each cut magnitude, counted per block, tell every block how many
   tied entries come before it, so ties are broken by index order whatever the blocking.

Which ranks are wanted is not decided here: `MergeMethod.prepare` sets `TensorContext.ranks`.
Statistics are stacked in fixed layouts: per ranked input ([len(ranks), 65536]) for `HIGH_BITS`, per
cut ([cuts, 65536], [cuts, blocks]) for `LOW_BITS` and `TIE_COUNTS`, cuts numbered by `TensorContext.cut`.
They are int64 numpy arrays (counts: no summation order to follow), so a merge whose blocks run in
the fused kernels finds its cuts without torch; only the eager path's histograms use torch.
"""

from __future__ import annotations

import math

import numpy as np

from ..lazytorch import torch
from . import kernels
from .base import Block, HistogramOf, Params, Pass, Stored, TensorContext, known

BINS = 1 << 16


def magnitude_bits(d: torch.Tensor) -> torch.Tensor:
    """The float32 bit pattern of |d|, as int32: orders like the magnitude."""
    return d.abs().to(torch.float32).view(torch.int32)


def _stored(b: Block) -> Stored | None:
    """The block's stored inputs where the kernels count from them (counts need no sum order)."""
    st = b.stored
    return st if st is not None and st.base is not None and kernels.available() else None


def _zero_counts(n: int) -> np.ndarray:
    """The histogram of n zero magnitudes: all in bin 0."""
    counts = np.zeros(BINS, dtype=np.int64)
    counts[0] = n
    return counts


def _pick(hist: np.ndarray, rank: int) -> tuple[int, int]:
    """The bin holding the rank-th largest count from the top, and the rank within that bin."""
    from_top = np.cumsum(hist[::-1])
    idx = int(np.searchsorted(from_top, rank))
    above = int(from_top[idx - 1]) if idx > 0 else 0
    return len(hist) - 1 - idx, rank - above


def _as_float(bits: int) -> float:
    """The float32 whose bit pattern is `bits`."""
    return float(np.array([bits], dtype=np.uint32).view(np.float32)[0])


def has_ranks(p: list[Params], g: Params) -> bool:
    """Some input is sparsified (density < 1): the radix passes have cuts to find."""
    return any(q["density"] < 1 for q in p)


# ---------------------------------------------------------------------------------- pass 1: high bits

def _counts(t: torch.Tensor) -> np.ndarray:
    """An eager histogram (torch.bincount) as the passes keep counts."""
    return t.numpy().astype(np.int64, copy=False)


def _high_measure(b: Block, ctx: TensorContext) -> np.ndarray:
    st = _stored(b)
    n = b.models.shape[1] if st is None else st.models.shape[1]
    rows = []
    for i in ctx.ranks:
        r = b.row(i)
        if r is None:
            rows.append(_zero_counts(n))
        elif st is not None:
            rows.append(kernels.high_histogram(known(st.base, "the base"), st.models[r], st.shift))
        else:
            rows.append(_counts(torch.bincount(magnitude_bits(b.deltas()[r]) >> 16, minlength=BINS)))
    return np.stack(rows)


def _high_zero(n: int, ctx: TensorContext) -> np.ndarray:
    return np.stack([_zero_counts(n) for _ in ctx.ranks])


def _high_from_catalog(ctx: TensorContext, hist: HistogramOf) -> np.ndarray | None:
    rows = []
    for i in ctx.ranks:
        h = hist(i)
        if h is None:
            return None
        rows.append(h)
    return np.stack(rows)


def _high_finish(ctx: TensorContext, total: np.ndarray) -> None:
    """Each cut's high bits, and its rank among the entries in that bin."""
    ctx.high = total
    ctx.bins = {i: [_pick(total[row], r) for r in ranks] for row, (i, ranks) in enumerate(ctx.ranks.items())}


# ---------------------------------------------------------------------------------- pass 2: low bits

def _low_measure(b: Block, ctx: TensorContext) -> np.ndarray:
    st = _stored(b)
    n = b.models.shape[1] if st is None else st.models.shape[1]
    rows = []
    for i, picks in ctx.bins.items():
        r = b.row(i)
        bits = magnitude_bits(b.deltas()[r]) if r is not None and st is None else None
        for hi, _ in picks:
            if r is None:
                rows.append(_zero_counts(n if hi == 0 else 0))
            elif st is not None:
                rows.append(kernels.low_histogram(known(st.base, "the base"), st.models[r], st.shift, hi))
            else:
                bits = known(bits, "the magnitudes")
                rows.append(_counts(torch.bincount(bits[(bits >> 16) == hi] & 0xFFFF, minlength=BINS)))
    return np.stack(rows)


def _low_zero(n: int, ctx: TensorContext) -> np.ndarray:
    # zero deltas only count in bin 0 of the cuts whose high bits are 0
    return np.stack([_zero_counts(n if hi == 0 else 0) for picks in ctx.bins.values() for hi, _ in picks])


def rank_among_read(rank: int, in_bin: int, unread: int) -> int:
    """A budgeted merge leaves chunks unread: the threshold's bin (from the catalog, over the
    whole delta) holds `in_bin` entries of which `unread` were not read. The same fraction of the
    read ones is kept, so read chunks keep what the exact merge would keep, to within the bin."""
    read = in_bin - unread
    return 0 if read <= 0 else max(1, min(read, math.ceil(rank * read / in_bin)))


def _low_finish(ctx: TensorContext, total: np.ndarray) -> None:
    """The exact magnitude at each wanted rank, and that rank's position among the entries
    tied at that magnitude (1 = the first of them in index order)."""
    high = known(ctx.high, "the high radix histograms")
    thresholds: dict[int, list[float]] = {}
    within: dict[int, list[int]] = {}
    for row, (i, picks) in enumerate(ctx.bins.items()):
        values, positions = [], []
        for j, (hi, r) in enumerate(picks):
            if i in ctx.omitted_hist and hi > 0:
                r = rank_among_read(r, int(high[row][hi]), int(ctx.omitted_hist[i][hi]))
                if r == 0:  # no read entry in the threshold's bin: cut at the bin's floor
                    values.append(_as_float(hi << 16))
                    positions.append(1)
                    continue
            lo, position = _pick(total[ctx.cut(i, j)], r)
            values.append(_as_float((hi << 16) | lo))
            positions.append(position)
        thresholds[i], within[i] = values, positions
    ctx.thresholds, ctx.within = thresholds, within


# ---------------------------------------------------------------------------------- pass 3: ties

def _ties_measure(b: Block, ctx: TensorContext) -> np.ndarray:
    """How many entries of this block tie with each cut, as a one-hot over blocks, so the sums
    tell every block how many tied entries come before it."""
    st = _stored(b)
    n = ctx.block_of[b.start]
    counts = np.zeros((ctx.cuts, len(ctx.block_of)), dtype=np.int64)
    for i, values in ctx.thresholds.items():
        r = b.row(i)
        if r is None:
            continue
        if st is not None:
            for j, v in enumerate(values):
                counts[ctx.cut(i, j), n] = kernels.count_equal(known(st.base, "the base"), st.models[r], st.shift, v)
            continue
        m = b.deltas()[r].abs().to(torch.float32)
        for j, v in enumerate(values):
            counts[ctx.cut(i, j), n] = int((m == v).sum())
    return counts


def _ties_zero(n: int, ctx: TensorContext) -> np.ndarray:
    return np.zeros((ctx.cuts, len(ctx.block_of)), dtype=np.int64)


def _ties_finish(ctx: TensorContext, total: np.ndarray) -> None:
    ctx.tied_here = total
    ctx.tied_before = np.cumsum(total, 1) - total


def tied(b: Block, ctx: TensorContext, i: int, j: int, m: torch.Tensor, first: int, last: float) -> torch.Tensor:
    """Entries equal to cut j of row i's input whose position among all such entries of the
    tensor (index order) is within [first, last]: exact top-k with a deterministic tie-break."""
    gi = b.index[i]
    eq = m == ctx.thresholds[gi][j]
    c, n = ctx.cut(gi, j), ctx.block_of[b.start]
    before = int(known(ctx.tied_before, "the tie counts")[c, n])
    here = int(known(ctx.tied_here, "the tie counts")[c, n])
    if before + 1 >= first and before + here <= last:
        return eq  # every tie in this block is kept: no need to number them
    position = before + torch.cumsum(eq, 0)
    return eq & (position >= first) & (position <= last)


HIGH_BITS = Pass("radix high bits", _high_measure, _high_finish, has_ranks, _high_zero, _high_from_catalog)
LOW_BITS = Pass("radix low bits", _low_measure, _low_finish, has_ranks, _low_zero)
TIE_COUNTS = Pass("radix ties", _ties_measure, _ties_finish, has_ranks, _ties_zero)
RADIX = (HIGH_BITS, LOW_BITS, TIE_COUNTS)
