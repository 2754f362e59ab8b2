"""Sparsifiers: which entries of each input's delta a task-arithmetic method keeps.

Each is a keep-mask for input i's delta within a block: top-k and breadcrumbs by exact ranks of
|delta| over the whole tensor (found by the radix passes), DARE by a coin per entry, DELLA by a
coin whose odds rise with the entry's magnitude rank in its row. Also the `rescale` pass, which
needs the sparsified deltas. Nothing here combines deltas; methods/task_arithmetic.py does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .base import Block, Params, Pass, TensorContext
from .radix import has_ranks, tied


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
    """Each entry kept with probability density, independently."""
    return torch.rand(d.shape, generator=b.rng(i)) < b.p[i]["density"]


def _della_mask(b: Block, ctx: TensorContext, i: int, d: torch.Tensor) -> torch.Tensor:
    """Keep probability rises linearly with the magnitude's rank within its row, from
    density-epsilon to density+epsilon (a row of one element keeps with p = density)."""
    q = b.p[i]
    rows = d.reshape(-1, b.row_len)
    m = rows.shape[1]
    if m > 1:
        rank = rows.abs().to(torch.float32).argsort(dim=1).argsort(dim=1).to(torch.float32)
        prob = q["density"] - q["epsilon"] + 2 * q["epsilon"] * rank / (m - 1)
    else:
        prob = torch.full(rows.shape, q["density"])
    return (torch.rand(rows.shape, generator=b.rng(i)) < prob).reshape(d.shape)


@dataclass(frozen=True)
class Sparsifier:
    name: str
    mask: Callable[[Block, TensorContext, int, torch.Tensor], torch.Tensor]
    ranks: Callable[[Params, int], list[int]] | None = None  # the order statistics it needs
    row_local: bool = False  # the mask is decided per row: blocks must hold whole rows


TOPK = Sparsifier("top-k", _topk_mask, _topk_ranks)
CRUMBS = Sparsifier("breadcrumbs", _crumbs_mask, _crumbs_ranks)
DARE = Sparsifier("dare", _dare_mask)
DELLA = Sparsifier("della", _della_mask, row_local=True)


def sparsified(b: Block, ctx: TensorContext, sp: Sparsifier | None) -> torch.Tensor:
    """Each input's delta after its sparsifier (inputs with density >= 1 are left whole)."""
    d = b.deltas()
    if sp is None:
        return d
    rows = [torch.where(sp.mask(b, ctx, i, d[i]), d[i], 0) if q["density"] < 1 else d[i]
            for i, q in enumerate(b.p)]
    return torch.stack(rows) if rows else d


def rescale_pass(sp: Sparsifier) -> Pass:
    """`rescale`: MergeKit scales each sparsified delta so its L1 norm matches the whole delta's.
    Sums [2, inputs] in float64: row 0 the whole deltas' L1, row 1 the sparsified ones'."""

    def measure(b: Block, ctx: TensorContext) -> torch.Tensor:
        sums = torch.zeros(2, ctx.inputs, dtype=torch.float64)
        rows = torch.tensor(b.index, dtype=torch.int64)
        sums[0, rows] = b.deltas().to(torch.float64).abs().sum(dim=1)
        sums[1, rows] = sparsified(b, ctx, sp).to(torch.float64).abs().sum(dim=1)
        return sums

    def finish(ctx: TensorContext, total: torch.Tensor) -> None:
        ctx.scale = [
            (w / k) if q["density"] < 1 and w >= 1e-7 and k >= 1e-7 else 1.0
            for w, k, q in zip(total[0].tolist(), total[1].tolist(), ctx.p)
        ]

    def zero(n: int, ctx: TensorContext) -> torch.Tensor:
        return torch.zeros(2, ctx.inputs, dtype=torch.float64)

    def needed(p: list[Params], g: Params) -> bool:
        return bool(g["rescale"]) and has_ranks(p, g)

    return Pass(f"{sp.name} rescale", measure, finish, needed, zero)
