"""linear: a weighted average of the inputs themselves (a given base is one more input).

Computed as MergeKit does: in float32 (float64 for float64 inputs) whatever the compute dtype,
one fused multiply-add (`addcmul`) per input in input order, a division by the weights' float32
sum, one rounding to the compute dtype at the end.
"""

from __future__ import annotations

from ...errors import BadMerge
from ..lazytorch import torch
from .base import Block, MergeMethod, ParamDef, Params, TensorContext
from .task_arithmetic import WEIGHT


class Linear(MergeMethod):
    name = "linear"
    base = "none"
    model_params = (WEIGHT,)
    global_params = (ParamDef("normalize", True, bool),)

    def local_identity(self, g: Params, has_base: bool) -> bool:
        return bool(g["normalize"])  # equal inputs average to themselves only when normalised

    def equal_identity(self, p: list[Params], g: Params) -> bool:
        return bool(g["normalize"])

    def check(self, p: list[Params], g: Params, name: str, numel: int) -> None:
        # MergeKit divides by a zero weight sum and writes inf/NaN; refusing is the sensible answer.
        if g["normalize"] and abs(sum(q["weight"] for q in p)) < 1e-8:
            raise BadMerge(f"linear merge with normalize: the weights on {name} sum to zero")

    def combine(self, b: Block, ctx: TensorContext) -> torch.Tensor:
        work = torch.float64 if b.models.dtype == torch.float64 else torch.float32
        w = torch.tensor([q["weight"] for q in b.p], dtype=work)
        acc = torch.zeros(b.models.shape[1], dtype=work)
        for x, c in zip(b.models, w):
            acc.addcmul_(x, c)
        if b.g["normalize"]:
            acc.div_(w.sum())
        return acc.to(b.models.dtype)


LINEAR = Linear()
