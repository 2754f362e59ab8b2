"""model_stock: interpolate between the base and the models' average by a factor from the
average cosine between the models' offsets from the base (MergeKit's formula), over the whole
tensor (a Gram pass) or, with `filter_wise`, per row.
"""

from __future__ import annotations

import torch

from .base import Block, MergeMethod, ParamDef, Params, TensorContext, known
from .gram import gram_pass


def _stock_t(gram: torch.Tensor) -> torch.Tensor:
    """model_stock's interpolation factor from the offsets' Gram matrix (batched over lines):
    t = n·c / (1 + (n-1)·c) for the mean pairwise cosine c of n offsets (0 where undefined)."""
    n = gram.shape[-1]
    norms = torch.sqrt(torch.diagonal(gram, dim1=-2, dim2=-1))
    cos = gram / torch.clamp(norms.unsqueeze(-1) * norms.unsqueeze(-2), min=1e-6)
    cos = torch.clamp(cos, -1, 1)
    iu = torch.triu_indices(n, n, 1)
    c = cos[..., iu[0], iu[1]].mean(-1)
    den = 1 + (n - 1) * c
    return torch.where(den.abs() < 1e-6, torch.zeros_like(c), n * c / torch.where(den.abs() < 1e-6, 1, den))


def _deltas(b: Block) -> torch.Tensor:
    return b.deltas()


def _per_row(b: Block) -> torch.Tensor:
    """`filter_wise`: each row of the block gets its own factor from its own offsets."""
    base = b.require_base()
    m = b.models.reshape(b.models.shape[0], -1, b.row_len)
    rows = base.reshape(-1, b.row_len)
    o = (m - rows).to(torch.float64).transpose(0, 1)  # [rows, K, len]
    t = _stock_t(o @ o.transpose(1, 2)).unsqueeze(1).to(base.dtype)  # [rows, 1]
    out = t * m.mean(0) + (1 - t) * rows
    return out.reshape(-1).to(base.dtype)


class ModelStock(MergeMethod):
    name = "model_stock"
    base = "required"
    global_params = (ParamDef("filter_wise", False, bool),)
    min_models = 2
    passes = (gram_pass("model_stock gram", _deltas, lambda p, g: not g["filter_wise"]),)

    def row_local(self, g: Params) -> bool:
        return bool(g["filter_wise"])

    def combine(self, b: Block, ctx: TensorContext) -> torch.Tensor:
        if b.g["filter_wise"]:
            return _per_row(b)
        base = b.require_base()
        t = float(_stock_t(known(ctx.gram, "model_stock's Gram matrix")))
        return (t * b.models.mean(0) + (1 - t) * base).to(base.dtype)


MODEL_STOCK = ModelStock()
