"""The Gram pass: sums of pairwise dot products over a whole tensor, in float64.

Angles between whole tensors (slerp, nuslerp with `nuslerp_flatten`, model_stock) need only the
dot products of the vectors involved, and those sum block by block. The pass writes
`TensorContext.gram`; the methods turn it into angles.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .base import Block, Params, Pass, TensorContext, always


def gram_pass(name: str, vectors: Callable[[Block], torch.Tensor],
              needed: Callable[[list[Params], Params], bool] = always, of_deltas: bool = True) -> Pass:
    """Sums of all pairwise dot products of `vectors(block)` ([k, n] -> [k, k]) over the tensor.
    `of_deltas`: the vectors are deltas from the base, so a block where every input is the base
    adds zeros and need not be read."""

    def measure(b: Block, ctx: TensorContext) -> torch.Tensor:
        v = vectors(b).to(torch.float64)
        return v @ v.T

    def finish(ctx: TensorContext, total: torch.Tensor) -> None:
        ctx.gram = total

    def zero(n: int, ctx: TensorContext) -> torch.Tensor:
        return torch.zeros(ctx.inputs, ctx.inputs, dtype=torch.float64)

    return Pass(name, measure, finish, needed, zero if of_deltas else None)
