"""sce (select, calculate, erase): a sign-consensus mix of the deltas weighted by their energy.

Per tensor, with deltas d_i = M_i - B, all in the compute dtype in MergeKit's order:
- select (only when `select_topk` < 1): keep the elements where the deltas' variance across
  models is among the largest k = floor(nonzero(var) * select_topk), zero the rest in every delta;
- calculate: w_i = mean(d_i²) over the tensor / sum_j mean(d_j²) (1/K each when that sum is
  below 1e-6);
- erase: per element, only deltas whose sign is the sign of sum_i d_i count;
- B + sum_i w_i·d_i·[kept] / max(sum_i w_i·[kept], 1e-6).

The means are sums of squares, which a pass sums block by block: each block's sum is torch's own
reduction (float32 for 16-bit dtypes, then mean = sum / n rounded to the compute dtype, as
torch's `mean`), so a tensor in one block gets MergeKit's weights bit for bit, and one in several
blocks the float64 sum of the blocks' sums. The selection ranks variances over the whole tensor
with torch's top-k (which of several equal variances it keeps is torch's choice, as in MergeKit):
with `select_topk` < 1 the method takes the whole tensor as one block and needs no pass.
`int8_mask` changes only the dtype of MergeKit's 0/1 masks, never a value: it is accepted and
has no effect.
"""

from __future__ import annotations

from ...errors import BadMerge
from ..lazytorch import torch
from .base import Block, MergeMethod, ParamDef, Params, Pass, TensorContext, known


def _selects(g: Params) -> bool:
    return g["select_topk"] < 1


def _square_sums(deltas: torch.Tensor) -> torch.Tensor:
    """Per delta, sum of its squares as torch's mean sums them (float32 accumulator for 16-bit
    dtypes), held exactly in float64 ([K])."""
    wide = torch.float32 if deltas.dtype in (torch.bfloat16, torch.float16) else deltas.dtype
    return deltas.square().sum(dim=1, dtype=wide).to(torch.float64)


def _measure(b: Block, ctx: TensorContext) -> torch.Tensor:
    return _square_sums(b.deltas())


def _finish(ctx: TensorContext, total: torch.Tensor) -> None:
    # `scale` is the context's per-input numbers the deltas are weighed by; sce keeps there each
    # delta's sum of squares, and combine turns them into weights in the block's dtype
    ctx.scale = total.tolist()


def _zero(n: int, ctx: TensorContext) -> torch.Tensor:
    return torch.zeros(ctx.inputs, dtype=torch.float64)


SQUARES = Pass("sce squares", _measure, _finish, lambda p, g: not _selects(g), _zero)


def _weights(sums: torch.Tensor, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """Each delta's share of the mean squares ([K] in `dtype`) from its sum of squares."""
    wide = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    means = (sums.to(wide) / numel).to(dtype)
    total = torch.sum(means).item()
    if abs(total) < 1e-6:
        return torch.ones_like(means) / means.shape[0]
    return means / total


def _high_variance(deltas: torch.Tensor, share: float) -> torch.Tensor:
    """0/1 per element: among the int(nonzero(var) * share) largest variances across models."""
    var = torch.var(deltas, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * share)  # a float32 product, truncated: MergeKit's k
    mask = torch.zeros_like(var)
    if k:
        mask[torch.topk(var.abs(), k=k, largest=True).indices] = 1
    return mask


class Sce(MergeMethod):
    name = "sce"
    base = "required"
    global_params = (ParamDef("int8_mask", False, bool), ParamDef("select_topk", 1.0))
    passes = (SQUARES,)

    def whole_tensor(self, g: Params) -> bool:
        return _selects(g)

    def check(self, p: list[Params], g: Params, name: str, numel: int) -> None:
        if not 0 < g["select_topk"] <= 1:
            raise BadMerge(f"sce select_topk {g['select_topk']:g} on {name} is outside (0, 1] "
                           "(the share of elements kept; 0 would keep none and return the base)")

    def combine(self, b: Block, ctx: TensorContext) -> torch.Tensor:
        base = b.require_base()
        deltas = b.deltas()
        if _selects(b.g):
            deltas = deltas * _high_variance(deltas, b.g["select_topk"]).unsqueeze(0)
            sums = _square_sums(deltas)
        else:
            sums = torch.tensor(known(ctx.scale, "sce's sums of squares"), dtype=torch.float64)
        weights = _weights(sums, ctx.numel, base.dtype).unsqueeze(1)
        agree = torch.where(deltas.sum(dim=0) >= 0, deltas > 0, deltas < 0)
        kept = weights * agree
        return base + (deltas * kept).sum(dim=0) / kept.sum(dim=0).clamp(min=1e-6)


SCE = Sce()
