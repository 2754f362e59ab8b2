"""Spherical interpolation: slerp (base toward one model, over the whole tensor) and nuslerp
(two models, or their deltas from a base; over the whole tensor, per row or per column).

The angle comes from dot products: for whole tensors a Gram pass sums them block by block
(methods/gram.py), for columns a pass sums them per column; rows are whole within a block.
"""

from __future__ import annotations

import math

import torch

from .base import Block, MergeMethod, ParamDef, Params, Pass, TensorContext, known
from .gram import gram_pass
from .task_arithmetic import WEIGHT


def _slerp_vectors(b: Block) -> torch.Tensor:
    return torch.stack([b.require_base(), b.models[0]])


def _slerp_weights(t: float, gram: torch.Tensor) -> tuple[float, float] | None:
    """Slerp's weights of the base and the model from their Gram matrix, or None when they are
    nearly parallel (the angle is meaningless: interpolate linearly)."""
    na, nb = math.sqrt(gram[0, 0]), math.sqrt(gram[1, 1])
    na, nb = (na if na > 1e-8 else 1.0), (nb if nb > 1e-8 else 1.0)
    c = max(-1.0, min(1.0, float(gram[0, 1]) / (na * nb)))
    if abs(c) > 0.9995:
        return None
    theta = math.acos(c)
    s = math.sin(theta)
    return math.sin((1 - t) * theta) / s, math.sin(t * theta) / s


class Slerp(MergeMethod):
    name = "slerp"
    base = "required"
    global_params = (ParamDef("t", None),)
    min_models = 1
    max_models = 1
    passes = (gram_pass("slerp gram", _slerp_vectors, of_deltas=False),)

    def local_identity(self, g: Params, has_base: bool) -> bool:
        return False  # the angle is the whole tensor's: an unchanged block still moves

    def combine(self, b: Block, ctx: TensorContext) -> torch.Tensor:
        base = b.require_base()
        work = torch.float64 if base.dtype == torch.float64 else torch.float32
        a, m = base.to(work), b.models[0].to(work)
        t = b.g["t"]
        weights = _slerp_weights(t, known(ctx.gram, "slerp's Gram matrix"))
        out = (1 - t) * a + t * m if weights is None else weights[0] * a + weights[1] * m
        return out.to(base.dtype)


def _nuslerp_pair(b: Block) -> torch.Tensor:
    """The two vectors nuslerp interpolates: the models' deltas from the base, or the models."""
    return b.models - b.base if b.base is not None else b.models


def _nuslerp_lines(g: Params) -> str:
    """What one angle is taken over: the whole tensor, each row, or each column."""
    if g["nuslerp_flatten"]:
        return "tensor"
    return "columns" if g["nuslerp_row_wise"] else "rows"


def _column_measure(b: Block, ctx: TensorContext) -> torch.Tensor:
    """Per column: sum of u·u, v·v and u·v over this block's rows ([3, row_len], float64)."""
    if not ctx.columns or b.ndim < 2:
        return torch.zeros(3, 0, dtype=torch.float64)  # a 1-D tensor is slerped as one row
    u, v = (x.reshape(-1, b.row_len).to(torch.float64) for x in _nuslerp_pair(b))
    return torch.stack([(u * u).sum(0), (v * v).sum(0), (u * v).sum(0)])


def _column_finish(ctx: TensorContext, total: torch.Tensor) -> None:
    ctx.column_dots = total


def _slerp_lines(u: torch.Tensor, v: torch.Tensor, uu: torch.Tensor, vv: torch.Tensor, uv: torch.Tensor,
                 t: float) -> torch.Tensor:
    """Per-line slerp of u toward v given the lines' dot products (MergeKit's nuslerp rule)."""
    nu = torch.clamp(torch.sqrt(uu), min=1e-7)
    nv = torch.clamp(torch.sqrt(vv), min=1e-7)
    c = torch.clamp(uv / (nu * nv), -1, 1)
    theta = torch.acos(c)
    s = torch.sin(theta)
    colinear = (1 - c * c) <= 1e-16
    safe = torch.where(colinear, torch.ones_like(s), s)
    wu = torch.where(colinear, 1 - t, torch.sin((1 - t) * theta) / safe).to(u.dtype)
    wv = torch.where(colinear, t, torch.sin(t * theta) / safe).to(u.dtype)
    return wu * u + wv * v


def _row_dots(ur: torch.Tensor, vr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: u·u, v·v, u·v in float64 ([rows, 1] each)."""
    u64, v64 = ur.to(torch.float64), vr.to(torch.float64)
    return (u64 * u64).sum(1, keepdim=True), (v64 * v64).sum(1, keepdim=True), (u64 * v64).sum(1, keepdim=True)


class NuSlerp(MergeMethod):
    name = "nuslerp"
    base = "optional"
    model_params = (WEIGHT,)
    global_params = (ParamDef("nuslerp_flatten", True, bool), ParamDef("nuslerp_row_wise", False, bool))
    min_models = 2
    max_models = 2
    passes = (gram_pass("nuslerp gram", _nuslerp_pair, lambda p, g: _nuslerp_lines(g) == "tensor"),
              Pass("nuslerp column dots", _column_measure, _column_finish,
                   lambda p, g: _nuslerp_lines(g) == "columns"))

    def prepare(self, ctx: TensorContext) -> None:
        ctx.columns = _nuslerp_lines(ctx.g) == "columns"

    def row_local(self, g: Params) -> bool:
        return _nuslerp_lines(g) != "tensor"

    def local_identity(self, g: Params, has_base: bool) -> bool:
        # With a base, zero deltas slerp to zero: the block is the base. Without one, equal models
        # still go through wu*u + wv*v with the line's weights, which need not give them back.
        return has_base

    def combine(self, b: Block, ctx: TensorContext) -> torch.Tensor:
        w1, w2 = b.p[0]["weight"], b.p[1]["weight"]
        t = 0.5 if abs(w1 + w2) < 1e-6 else w2 / (w1 + w2)
        u, v = _nuslerp_pair(b)
        lines = _nuslerp_lines(b.g)
        if lines == "columns" and b.ndim < 2:
            lines = "rows"  # a 1-D tensor is a single line whichever way it is read (as MergeKit)
        if lines == "tensor":
            g = known(ctx.gram, "nuslerp's Gram matrix")
            out = _slerp_lines(u, v, g[0, 0], g[1, 1], g[0, 1], t)
        elif lines == "rows":
            ur, vr = (x.reshape(-1, b.row_len) for x in (u, v))
            out = _slerp_lines(ur, vr, *_row_dots(ur, vr), t).reshape(-1)
        else:
            ur, vr = (x.reshape(-1, b.row_len) for x in (u, v))
            dots = known(ctx.column_dots, "nuslerp's column dot products")
            out = _slerp_lines(ur, vr, dots[0], dots[1], dots[2], t).reshape(-1)
        return (out + b.base if b.base is not None else out).to(b.models.dtype)


SLERP = Slerp()
NUSLERP = NuSlerp()
