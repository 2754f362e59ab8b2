"""Spherical interpolation: slerp (base toward one model, over the whole tensor) and nuslerp
(two models, or their deltas from a base; over the whole tensor, per row or per column).

Each does MergeKit's operations in MergeKit's dtype. slerp works in float32 (float64 for float64
inputs) whatever the compute dtype and rounds once; its angle is a float32 norm and dot product
that MergeKit takes with torch's reductions over runs of CHUNK elements, whose float32 rounding
depends on their order, so slerp takes the whole tensor and the same reductions over the same
runs. nuslerp works in the compute dtype throughout: it normalises both vectors (rounded), takes
the cosine as the sum of the rounded products of the normalised vectors, and slerps the
unnormalised ones. Rows are whole within a block, so they get exactly those operations; for the
whole tensor or its columns a first pass sums the squares (the norms) and a second one the
products of the normalised vectors as the compute dtype rounds them (methods/gram.py).
"""

from __future__ import annotations

from collections.abc import Callable

from ..lazytorch import torch
from .base import Block, MergeMethod, ParamDef, Params, Pass, TensorContext, known
from .gram import gram_pass, narrow
from .task_arithmetic import WEIGHT

CHUNK = 1 << 20  # slerp: MergeKit's runs of elements for the norms and the dot product
SLERP_PARALLEL = 0.9995  # |cos| above which slerp interpolates linearly
SLERP_EPS = 1e-8  # a smaller norm counts as 1
NUSLERP_EPS = 1e-8  # 1 - cos^2 <= NUSLERP_EPS^2: colinear, interpolate linearly
NUSLERP_MIN_NORM = 1e-7  # norms are clamped here before normalising


class Slerp(MergeMethod):
    name = "slerp"
    base = "required"
    global_params = (ParamDef("t", None),)
    min_models = 1
    max_models = 1

    def whole_tensor(self, g: Params) -> bool:
        return True  # the float32 angle is bit-exact only from torch's reductions over MergeKit's runs

    def local_identity(self, g: Params, has_base: bool) -> bool:
        return False  # the angle is the whole tensor's: an unchanged block still moves

    def combine(self, b: Block, ctx: TensorContext) -> torch.Tensor:
        base = b.require_base()
        work = torch.float64 if base.dtype == torch.float64 else torch.float32
        a, m = base.reshape(1, -1), b.models[0].reshape(1, -1)
        runs = [slice(i, i + CHUNK) for i in range(0, a.shape[1], CHUNK)]

        def norm(x: torch.Tensor) -> torch.Tensor:
            parts = [torch.linalg.vector_norm(x[:, r].to(work), dim=1, keepdim=True) for r in runs]
            n = torch.linalg.vector_norm(torch.stack(parts), dim=0)
            return torch.where(n > SLERP_EPS, n, 1)

        na, nm = norm(a), norm(m)
        dot = torch.stack([(a[:, r].to(work) / na * (m[:, r].to(work) / nm)).sum(dim=1, keepdim=True)
                           for r in runs]).sum(dim=0).clamp(-1, 1)
        t = torch.tensor([[b.g["t"]]], dtype=work)
        linear = dot.abs() > SLERP_PARALLEL
        theta = torch.acos(torch.where(linear, 0, dot))
        sin_theta = torch.sin(theta)
        coef_a = torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
        coef_m = torch.where(linear, t, torch.sin(t * theta) / sin_theta)
        out = torch.empty_like(a)
        for r in runs:
            out[:, r] = coef_a * a[:, r].to(work) + coef_m * m[:, r].to(work)
        return out.reshape(-1)


def _nuslerp_pair(b: Block) -> torch.Tensor:
    """The two vectors nuslerp interpolates: the models' deltas from the base, or the models."""
    return b.deltas() if b.base is not None else b.models


def _nuslerp_lines(g: Params) -> str:
    """What one angle is taken over: the whole tensor, each row, or each column."""
    if g["nuslerp_flatten"]:
        return "tensor"
    return "columns" if g["nuslerp_row_wise"] else "rows"


def _nuslerp_needed(lines: str) -> Callable[[list[Params], Params], bool]:
    """A pass needed only when nuslerp's angles are taken over these lines."""
    return lambda p, g: _nuslerp_lines(g) == lines


def _clamped(sum_squares: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    """Norms from float64 sums of squares, as torch.norm in `dtype` gives them, clamped."""
    return narrow(sum_squares.sqrt(), dtype, f"tensor {name!r}: a norm").clamp(min=NUSLERP_MIN_NORM)


def _normalised(b: Block, ctx: TensorContext) -> torch.Tensor:
    """The pair divided by the whole tensor's norms (the first Gram pass): [2, n]."""
    g = known(ctx.gram, "nuslerp's norms")
    u = _nuslerp_pair(b)
    return u / _clamped(g.diagonal(), u.dtype, b.name).unsqueeze(1)


def _lines(b: Block) -> tuple[torch.Tensor, torch.Tensor]:
    """The pair as rows of the last axis: [rows, row_len] each."""
    u, v = (x.reshape(-1, b.row_len) for x in _nuslerp_pair(b))
    return u, v


def _column_normalised(b: Block, ctx: TensorContext) -> tuple[torch.Tensor, torch.Tensor]:
    """The pair's columns divided by their norms (the first column pass)."""
    dots = known(ctx.column_dots, "nuslerp's column norms")
    u, v = _lines(b)
    return u / _clamped(dots[0], u.dtype, b.name), v / _clamped(dots[1], v.dtype, b.name)


def _column_pass(name: str, pair: Callable[[Block, TensorContext], tuple[torch.Tensor, torch.Tensor]]) -> Pass:
    """Per column of `pair(block)`: the sums of u·u and v·v (exact squares) and of u·v (products
    rounded to the compute dtype), [3, row_len] in float64, into `TensorContext.column_dots`."""

    def measure(b: Block, ctx: TensorContext) -> torch.Tensor:
        if not ctx.columns or b.ndim < 2:
            return torch.zeros(3, 0, dtype=torch.float64)  # a 1-D tensor is slerped as one row
        u, v = pair(b, ctx)
        u64, v64 = u.to(torch.float64), v.to(torch.float64)
        return torch.stack([(u64 * u64).sum(0), (v64 * v64).sum(0), (u * v).to(torch.float64).sum(0)])

    def finish(ctx: TensorContext, total: torch.Tensor) -> None:
        ctx.column_dots = total

    return Pass(name, measure, finish, _nuslerp_needed("columns"))


def _slerp_lines(u: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, t: float) -> torch.Tensor:
    """MergeKit's nuslerp of u toward v (lines along the last axis) once the cosines are known."""
    colinear = (1 - cos.square()) <= NUSLERP_EPS ** 2
    theta = torch.acos(torch.where(colinear, 0, cos))
    sin_theta = torch.sin(theta)
    result = (torch.sin((1 - t) * theta) * u + torch.sin(t * theta) * v) / sin_theta
    return torch.where(colinear, (1 - t) * u + t * v, result)


def _rows(u: torch.Tensor, v: torch.Tensor, t: float) -> torch.Tensor:
    """Each row slerped by its own angle: every step as MergeKit's, on whole rows."""
    def unit(x: torch.Tensor) -> torch.Tensor:
        return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=NUSLERP_MIN_NORM)

    cos = torch.sum(unit(u) * unit(v), dim=-1, keepdim=True).clamp(-1, 1)
    return _slerp_lines(u, v, cos, t)


class NuSlerp(MergeMethod):
    name = "nuslerp"
    base = "optional"
    model_params = (WEIGHT,)
    global_params = (ParamDef("nuslerp_flatten", True, bool), ParamDef("nuslerp_row_wise", False, bool))
    min_models = 2
    max_models = 2
    passes = (gram_pass("nuslerp norms", lambda b, ctx: _nuslerp_pair(b), _nuslerp_needed("tensor")),
              gram_pass("nuslerp cosine", _normalised, _nuslerp_needed("tensor")),
              _column_pass("nuslerp column norms", lambda b, ctx: _lines(b)),
              _column_pass("nuslerp column cosines", _column_normalised))

    def prepare(self, ctx: TensorContext) -> None:
        ctx.columns = _nuslerp_lines(ctx.g) == "columns"

    def row_local(self, g: Params) -> bool:
        return _nuslerp_lines(g) != "tensor"

    def local_identity(self, g: Params, has_base: bool) -> bool:
        # With a base, zero deltas slerp to zero: the block is the base. Without one, equal models
        # still go through the line's weights in the compute dtype, which need not give them back.
        return has_base

    def equal_identity(self, p: list[Params], g: Params) -> bool:
        # Without a base, equal models slerp to themselves only up to rounding (see local_identity)
        return False

    def combine(self, b: Block, ctx: TensorContext) -> torch.Tensor:
        w1, w2 = b.p[0]["weight"], b.p[1]["weight"]
        t = 0.5 if abs(w1 + w2) < 1e-6 else w2 / (w1 + w2)
        lines = _nuslerp_lines(b.g)
        if lines == "columns" and b.ndim < 2:
            lines = "rows"  # a 1-D tensor is a single line whichever way it is read (as MergeKit)
        if lines == "tensor":
            u, v = _nuslerp_pair(b)
            cos = known(ctx.gram, "nuslerp's cosine")[0, 1]
            out = _slerp_lines(u, v, narrow(cos, u.dtype, f"tensor {b.name!r}: the cosine").clamp(-1, 1), t)
        elif lines == "rows":
            u, v = _lines(b)
            out = _rows(u, v, t).reshape(-1)
        else:
            u, v = _lines(b)
            cos = known(ctx.column_dots, "nuslerp's column cosines")[2]
            out = _slerp_lines(u, v, narrow(cos, u.dtype, f"tensor {b.name!r}: a cosine").clamp(-1, 1), t).reshape(-1)
        return out + b.base if b.base is not None else out


SLERP = Slerp()
NUSLERP = NuSlerp()
