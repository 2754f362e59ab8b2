"""arcee_fusion: keep the model's value only where its change from the base is important,
judged against the whole tensor's distribution of importance.

importance = |M - B| · KL(softmax(M) ‖ softmax(B)) per row of the last axis; the model's value is
kept where importance >= median + 1.5·(q3 - q1) of the whole tensor's importances (quartiles read
off the sorted values at floor(q·(n-1))). A softmax per row plus quartiles of the whole tensor
need the tensor at once, so the method works on one block holding it (`whole_tensor`), with
MergeKit's operations in the compute dtype: 16-bit results are bit-equal. The mask is float32, as
MergeKit's, so B + (M - B)·mask is float32 for a 16-bit compute dtype and rounds only once, to the
output dtype.

One deviation: over 1,000,000 elements MergeKit estimates the quartiles from 1,000,000 entries
drawn at random (with replacement) from the global RNG; mpstore takes the exact quartiles of all
entries, which that sample estimates, so the result does not depend on a random stream.
"""

from __future__ import annotations

from ..lazytorch import torch
from .base import Block, MergeMethod, Params, TensorContext

EPS = 1e-8  # added to both softmaxes before the KL divergence, as MergeKit


def _importance(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|M - B| times the KL divergence of the rows' softmaxes (one value per row, broadcast)."""
    p = torch.softmax(model, dim=-1) + EPS
    q = torch.softmax(base, dim=-1) + EPS
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return (model - base).abs() * kl


def _threshold(importance: torch.Tensor) -> torch.Tensor:
    """median + 1.5 * (q3 - q1), the quartiles at sorted positions floor(q * (n - 1)), in the
    importance's dtype (exact integer positions: MergeKit's float32 q * (n - 1) is exact for the
    at most 10^6 entries it sorts)."""
    ordered = torch.sort(importance.reshape(-1)).values
    last = ordered.numel() - 1
    q1, median, q3 = ordered[last // 4], ordered[last // 2], ordered[3 * last // 4]
    return median + 1.5 * (q3 - q1)


class ArceeFusion(MergeMethod):
    name = "arcee_fusion"
    base = "required"
    min_models = 1
    max_models = 1

    def whole_tensor(self, g: Params) -> bool:
        return True

    def combine(self, b: Block, ctx: TensorContext) -> torch.Tensor:
        lines = (-1, b.row_len) if b.ndim >= 2 else (-1,)  # the rows the softmax runs along
        base, model = b.require_base().reshape(lines), b.models[0].reshape(lines)
        importance = _importance(model, base)
        mask = (importance >= _threshold(importance)).float()
        return (base + (model - base) * mask).reshape(-1)


ARCEE_FUSION = ArceeFusion()
