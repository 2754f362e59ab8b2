"""Sparsifiers: which entries of each input's delta a task-arithmetic method keeps.

Each is a keep-mask for input i's delta within a block: top-k and breadcrumbs by exact ranks of
|delta| over the whole tensor (found by the radix passes), DARE by a coin per entry, DELLA by a
coin whose odds rise with the entry's magnitude rank in its row. Also the `rescale` pass, which
needs the sparsified deltas. Nothing here combines deltas; methods/task_arithmetic.py does.

Dtypes are MergeKit's on CPU: top-k and breadcrumbs mask and rescale in the compute dtype; DARE
and DELLA in float32 unless the compute dtype is bfloat16 (their keep probabilities too), the
result rounded back to the compute dtype. The L1 sums behind `rescale` are float64 sums rounded to
that work dtype, then divided in it, as torch's sums there come out.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ...store.dtypes import torch_dtype
from ..lazytorch import torch
from . import kernels
from .base import Block, Params, Pass, TensorContext, known
from .gram import narrow, overflow
from .radix import has_ranks, tied

RESCALE_EPS = 1e-7  # an L1 norm below this (whole or kept) leaves the kept delta unscaled


def random_work(dtype: torch.dtype) -> torch.dtype:
    """The dtype MergeKit's Bernoulli sparsifiers (DARE, DELLA) work in on CPU."""
    return dtype if dtype == torch.bfloat16 else torch.float32


def _topk_ranks(q: Params, numel: int) -> list[int]:
    # MergeKit keeps max(1, floor(density*n)) entries: also the sensible answer when density*n < 1.
    return [max(1, math.floor(q["density"] * numel))]


def _topk_mask(b: Block, ctx: TensorContext, i: int, d: torch.Tensor) -> torch.Tensor:
    """Exactly k entries: all above the threshold, and of those tied with it the first ones in
    index order (MergeKit keeps an arbitrary subset of the tied ones)."""
    gi = b.index[i]
    m = d.abs().to(torch.float32)
    return (m > ctx.thresholds[gi][0]) | tied(b, ctx, i, 0, m, 1, ctx.within[gi][0])


def _crumbs_ranks(q: Params, numel: int) -> list[int]:
    # Keep density*n entries after dropping gamma*n from the top. Unlike MergeKit (which floors
    # density*n to 0 for small tensors and then drops the whole delta) at least one entry is kept.
    keep = max(1, math.floor(q["density"] * numel))
    top = math.floor(q["gamma"] * numel)
    bottom = max(0, numel - keep - top)
    top = numel - bottom - keep
    return [top + 1, top + keep]  # descending ranks of the largest and smallest kept magnitude


def _crumbs_mask(b: Block, ctx: TensorContext, i: int, d: torch.Tensor) -> torch.Tensor:
    """Descending ranks (top, top+keep] exactly: strictly between the two cut magnitudes, plus
    the tied entries at each cut that fall inside the range (index order breaks ties)."""
    gi = b.index[i]
    hi, lo = ctx.thresholds[gi]
    first, last = ctx.within[gi]
    m = d.abs().to(torch.float32)
    if hi == lo:
        return tied(b, ctx, i, 0, m, first, last)
    return ((m > lo) & (m < hi)) | tied(b, ctx, i, 0, m, first, math.inf) | tied(b, ctx, i, 1, m, 1, last)


def _dare_mask(b: Block, ctx: TensorContext, i: int, d: torch.Tensor) -> torch.Tensor:
    """Each entry kept with probability density (as the work dtype holds it), independently."""
    p = torch.tensor(b.p[i]["density"], dtype=random_work(d.dtype))
    return torch.rand(d.shape, generator=b.rng(i)) < p


def _della_mask(b: Block, ctx: TensorContext, i: int, d: torch.Tensor) -> torch.Tensor:
    """Keep probability rises linearly with the magnitude's rank within its row, from
    density-epsilon to density+epsilon (a row of one element keeps with p = density); ranks and
    probabilities in the work dtype, where bfloat16 rounds ranks above 256 as MergeKit's do."""
    q = b.p[i]
    work = random_work(d.dtype)
    rows = d.reshape(-1, b.row_len)
    if rows.shape[1] > 1:
        rank = rows.abs().to(torch.float32).argsort(dim=1).argsort(dim=1).to(work) + 1
        low, high = rank.min(dim=1, keepdim=True).values, rank.max(dim=1, keepdim=True).values
        spread = ((rank - low) / (high - low)).clamp(0, 1)
        prob = (q["density"] - q["epsilon"]) + spread * 2 * q["epsilon"]
    else:
        prob = torch.full(rows.shape, q["density"], dtype=work)
    return (torch.rand(rows.shape, generator=b.rng(i)) < prob).reshape(d.shape)


@dataclass(frozen=True)
class Sparsifier:
    name: str
    mask: Callable[[Block, TensorContext, int, torch.Tensor], torch.Tensor]
    kernel_mode: int  # how the fused kernel keeps entries (kernels.MODE_*)
    ranks: Callable[[Params, int], list[int]] | None = None  # the order statistics it needs
    row_local: bool = False  # the mask is decided per row: blocks must hold whole rows
    random: bool = False  # a Bernoulli mask: works in `random_work` of the compute dtype

    def work(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype the kept delta is masked and rescaled in, for compute dtype `dtype`."""
        return random_work(dtype) if self.random else dtype


TOPK = Sparsifier("top-k", _topk_mask, kernels.MODE_TOPK, _topk_ranks)
CRUMBS = Sparsifier("breadcrumbs", _crumbs_mask, kernels.MODE_CRUMBS, _crumbs_ranks)
DARE = Sparsifier("dare", _dare_mask, kernels.MODE_MASK, random=True)
DELLA = Sparsifier("della", _della_mask, kernels.MODE_MASK, row_local=True, random=True)


@dataclass
class KernelRows:
    """What the fused kernel needs per row of a block to keep exactly the entries `sparsified`
    keeps: the mode, the cut magnitudes, and for each of up to two cuts the tied entries before
    the block and the positions [first, last] among the tied ones that are kept."""

    mode: np.ndarray  # int8 [k]
    hi: np.ndarray  # float32 [k]: top-k's cut, breadcrumbs' upper cut
    lo: np.ndarray  # float32 [k]: breadcrumbs' lower cut
    before: np.ndarray  # int64 [k, 2]
    first: np.ndarray  # int64 [k, 2]
    last: np.ndarray  # int64 [k, 2]
    mask: np.ndarray  # uint8 [k, n] for Bernoulli sparsifiers, else [k, 0]
    scale: np.ndarray | None  # float32 [k]: `rescale`'s factors, None without rescale


def kernel_rows(b: Block, ctx: TensorContext, sp: Sparsifier | None, n: int) -> KernelRows:
    """The per-row arguments of `kernels.combine` for block `b` of n elements."""
    k = len(b.index)
    rows = KernelRows(np.zeros(k, np.int8), np.zeros(k, np.float32), np.zeros(k, np.float32),
                      np.zeros((k, 2), np.int64), np.ones((k, 2), np.int64),
                      np.full((k, 2), kernels.NO_TIE_LIMIT, np.int64),
                      np.zeros((k, n if sp is not None and sp.random else 0), np.uint8),
                      None if sp is None or ctx.scale is None else np.zeros(k, np.float32))
    if sp is None:
        return rows
    block = ctx.block_of[b.start]
    for r, (i, q) in enumerate(zip(b.index, b.p)):
        if q["density"] >= 1:
            continue
        rows.mode[r] = sp.kernel_mode
        if rows.scale is not None:
            rows.scale[r] = known(ctx.scale, "the rescale factors")[i]
        if sp.random:
            rows.mask[r] = sp.mask(b, ctx, r, b.deltas()[r]).numpy()
            continue
        cuts = ctx.thresholds[i]
        rows.hi[r], rows.lo[r] = cuts[0], cuts[-1]
        for j in range(len(cuts)):
            rows.before[r, j] = known(ctx.tied_before, "the tie counts")[ctx.cut(i, j), block]
        within = ctx.within[i]
        if sp is TOPK:
            rows.last[r, 0] = within[0]
        elif cuts[0] == cuts[1]:  # breadcrumbs cut twice at one magnitude: (see _crumbs_mask)
            rows.first[r, 0], rows.last[r, 0] = within
        else:
            rows.first[r, 0], rows.last[r, 1] = within
    return rows


def _kept(b: Block, ctx: TensorContext, sp: Sparsifier, i: int) -> torch.Tensor:
    """Row i's delta times its keep-mask, in the sparsifier's work dtype (not rescaled)."""
    d = b.deltas()[i]
    work = sp.work(d.dtype)
    return d.to(work) * sp.mask(b, ctx, i, d).to(work)


def sparsified(b: Block, ctx: TensorContext, sp: Sparsifier | None) -> torch.Tensor:
    """Each input's delta after its sparsifier and the `rescale` factor, in the compute dtype
    (inputs with density >= 1 are left whole, unscaled)."""
    d = b.deltas()
    if sp is None:
        return d
    rows = []
    for i, q in enumerate(b.p):
        if q["density"] >= 1:
            rows.append(d[i])
            continue
        kept = _kept(b, ctx, sp, i)
        if ctx.scale is not None:
            kept = kept * torch.tensor(ctx.scale[b.index[i]], dtype=kept.dtype)
        rows.append(kept.to(d.dtype))
    return torch.stack(rows) if rows else d


def _l1_factor(whole: torch.Tensor, kept: torch.Tensor, work: torch.dtype, i: int) -> float:
    """MergeKit's `rescale` factor for input i from the float64 L1 sums: both rounded to the work
    dtype, 1 (no rescale) if either is below RESCALE_EPS, else their quotient in that dtype."""
    what = f"with rescale, the L1 norm of input {i + 1}'s delta on some tensor"
    w, k = narrow(whole, work, what), narrow(kept, work, what)
    if bool(w < RESCALE_EPS) or bool(k < RESCALE_EPS):
        return 1.0
    factor = w / k
    if bool(torch.isfinite(w) & torch.isfinite(k) & ~torch.isfinite(factor)):
        raise overflow(f"with rescale, the scale factor of input {i + 1}'s delta on some tensor",
                       float(whole / kept), work)
    return float(factor)


def rescale_pass(sp: Sparsifier) -> Pass:
    """`rescale`: MergeKit scales each sparsified delta so its L1 norm matches the whole delta's.
    Sums [2, inputs] in float64: row 0 the whole deltas' L1, row 1 the kept ones' (both of the
    values in the work dtype); `finish` rounds the totals to the work dtype, as MergeKit's sums
    come out in it."""

    def measure(b: Block, ctx: TensorContext) -> torch.Tensor:
        work = sp.work(b.models.dtype)
        sums = torch.zeros(2, ctx.inputs, dtype=torch.float64)
        for r, (i, q) in enumerate(zip(b.index, b.p)):
            if q["density"] < 1:
                sums[0, i] = b.deltas()[r].to(work).to(torch.float64).abs().sum()
                sums[1, i] = _kept(b, ctx, sp, r).to(torch.float64).abs().sum()
        return sums

    def finish(ctx: TensorContext, total: torch.Tensor) -> None:
        work = sp.work(torch_dtype(ctx.compute))
        ctx.scale = [_l1_factor(total[0, i], total[1, i], work, i) if q["density"] < 1 else 1.0
                     for i, q in enumerate(ctx.p)]

    def zero(n: int, ctx: TensorContext) -> torch.Tensor:
        return torch.zeros(2, ctx.inputs, dtype=torch.float64)

    def needed(p: list[Params], g: Params) -> bool:
        return bool(g["rescale"]) and has_ranks(p, g)

    return Pass(f"{sp.name} rescale", measure, finish, needed, zero)
