"""model_stock: interpolate between the base and the models' average by a factor from the
average cosine between the models' offsets from the base (MergeKit's formula), over the whole
tensor (a Gram pass) or, with `filter_wise`, per row.

Everything runs in the compute dtype, in MergeKit's order: the norms and dot products rounded to
it (the whole tensor's summed by the Gram pass, then narrowed), each cosine, their mean, the
factor, the average as a running sum divided by the count, and the final interpolation.
"""

from __future__ import annotations

from collections.abc import Callable

from ..lazytorch import torch
from .base import Block, MergeMethod, ParamDef, Params, TensorContext, known
from .gram import gram_pass, narrow


def _factor(norms: list[torch.Tensor], dot: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
    """MergeKit's interpolation factor from the offsets' norms and pairwise dot products (batched
    over lines, in their dtype): the mean pairwise cosine c of the n offsets, then
    t = n·c / (1 + (n-1)·c), or 0 where that denominator is below 1e-6. Shape [lines..., 1]."""
    n = len(norms)
    cosines = [(dot(i, j) / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1)
               for i in range(n) for j in range(i + 1, n)]
    c = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    den = 1 + (n - 1) * c
    singular = den.abs() < 1e-6
    return torch.where(singular, torch.zeros_like(c), (n * c) / torch.where(singular, torch.ones_like(den), den))


def _interpolate(t: torch.Tensor, models: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """t · average + (1 - t) · base, the average summed model by model and then divided."""
    total = models[0]
    for m in models[1:]:
        total = total + m
    return t * (total / len(models)) + (1 - t) * base


def _deltas(b: Block, ctx: TensorContext) -> torch.Tensor:
    return b.deltas()


def _per_row(b: Block) -> torch.Tensor:
    """`filter_wise`: each row of the block gets its own factor from its own offsets."""
    rows = b.require_base().reshape(-1, b.row_len)
    models = b.models.reshape(b.models.shape[0], -1, b.row_len)
    offsets = [m - rows for m in models]
    t = _factor([torch.norm(o, dim=-1) for o in offsets], lambda i, j: (offsets[i] * offsets[j]).sum(dim=-1))
    return _interpolate(t, models, rows).reshape(-1)


class ModelStock(MergeMethod):
    name = "model_stock"
    base = "required"
    global_params = (ParamDef("filter_wise", False, bool),)
    min_models = 2
    passes = (gram_pass("model_stock gram", _deltas, lambda p, g: not g["filter_wise"]),)

    def row_local(self, g: Params) -> bool:
        return bool(g["filter_wise"])

    def local_identity(self, g: Params, has_base: bool) -> bool:
        # Where every model is the base, t·average + (1-t)·base still rounds in the compute
        # dtype (the running sum too): MergeKit's result need not be the base bit for bit.
        return False

    def combine(self, b: Block, ctx: TensorContext) -> torch.Tensor:
        if b.g["filter_wise"]:
            return _per_row(b)
        g = known(ctx.gram, "model_stock's Gram matrix")
        dtype = b.models.dtype

        def rounded(total: torch.Tensor, what: str) -> torch.Tensor:
            return narrow(total, dtype, f"tensor {b.name!r}: {what}")

        norms = [rounded(g[i, i].sqrt(), f"the norm of model {i + 1}'s offset") for i in range(g.shape[0])]
        t = _factor(norms, lambda i, j: rounded(g[i, j], f"the dot product of models {i + 1} and {j + 1}'s offsets"))
        return _interpolate(t, b.models, b.require_base())


MODEL_STOCK = ModelStock()
