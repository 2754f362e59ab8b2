"""The Gram pass: sums of pairwise dot products over a whole tensor, in float64, and `narrow`,
which turns such a sum into what MergeKit's torch reduction in the compute dtype returns.

Angles between whole tensors (model_stock, nuslerp over the whole tensor) need only the
dot products of the vectors involved, and those sum block by block. MergeKit takes them with
torch in the compute dtype: a norm from the exact squares (torch upcasts them to float32), a dot
product `(a * b).sum()` from the elementwise products rounded to that dtype; either way the sum
is accumulated in float32 and rounded once to the dtype. So the pass sums exact squares on the
diagonal and the rounded products off it, in float64, and the methods `narrow` the totals before
doing MergeKit's scalar arithmetic in the compute dtype. (An accumulation in float64 rounded once
can differ from torch's float32 one only when the total lies within float32 noise of a rounding
boundary of the compute dtype.)
"""

from __future__ import annotations

from collections.abc import Callable

from ...errors import BadMerge
from ..lazytorch import torch
from .base import Block, Params, Pass, TensorContext, always


def overflow(what: str, value: float, dtype: torch.dtype) -> BadMerge:
    """The error for a statistic the compute dtype cannot hold: MergeKit would carry on with inf
    and write inf or NaN into the model."""
    return BadMerge(f"{what} is {value:.4g}, beyond {str(dtype).removeprefix('torch.')}, the compute dtype: "
                    "compute in float32 (--compute-dtype float32, or dtype: float32)")


def narrow(total: torch.Tensor, dtype: torch.dtype, what: str) -> torch.Tensor:
    """A float64 sum (or its square root) as a reduction in `dtype` returns it: rounded once.
    A finite value that `dtype` cannot hold is refused (`overflow`)."""
    out = total.to(dtype)
    lost = torch.isfinite(total) & ~torch.isfinite(out)
    if bool(lost.any()):
        raise overflow(what, float(total[lost].abs().max()), dtype)
    return out


def gram(v: torch.Tensor) -> torch.Tensor:
    """[k, n] vectors -> [k, k] float64: exact sums of squares on the diagonal (a norm's), sums of
    the products as `v`'s dtype rounds them off it (a dot product's)."""
    k = v.shape[0]
    out = torch.empty(k, k, dtype=torch.float64)
    wide = v.to(torch.float64)
    out.diagonal().copy_((wide * wide).sum(dim=1))
    for i in range(k):
        for j in range(i + 1, k):
            out[i, j] = out[j, i] = (v[i] * v[j]).to(torch.float64).sum()
    return out


def gram_pass(name: str, vectors: Callable[[Block, TensorContext], torch.Tensor],
              needed: Callable[[list[Params], Params], bool] = always) -> Pass:
    """The `gram` of `vectors(block, ctx)` ([k, n], in the dtype the products are rounded to)
    summed over the tensor, into `TensorContext.gram`. With a base the vectors are zero where
    every input is the base (deltas, or deltas scaled), so such a block adds zeros and need not
    be read; without one the executor reads every block."""

    def measure(b: Block, ctx: TensorContext) -> torch.Tensor:
        return gram(vectors(b, ctx))

    def finish(ctx: TensorContext, total: torch.Tensor) -> None:
        ctx.gram = total

    def zero(n: int, ctx: TensorContext) -> torch.Tensor:
        return torch.zeros(ctx.inputs, ctx.inputs, dtype=torch.float64)

    return Pass(name, measure, finish, needed, zero)
