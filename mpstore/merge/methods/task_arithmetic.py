"""The task-arithmetic family: base + lambda * a weighted mix of (sparsified) deltas.

task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs, breadcrumbs_ties, della and
della_linear differ in two choices only, as in MergeKit's generalized task arithmetic: which
sparsifier keeps which entries of each delta (methods/sparsify.py), and whether the mix is a plain
weighted sum or a sign consensus (TIES: per element, only the deltas agreeing with the sign of
the weighted sum count, normalised by their weights). Parameter names and defaults are MergeKit's.

Every step is MergeKit's operation in the compute dtype, in MergeKit's order: the deltas, the
sparsified and rescaled deltas (methods/sparsify.py), the weights rounded to the dtype, the
weighted deltas, their sum (torch sums 16-bit values in float32 and rounds once), the divisor,
the division, lambda, and the base added back.
"""

from __future__ import annotations

import functools

import numpy as np

from ...errors import BadMerge
from ..lazytorch import torch
from . import kernels
from .base import Block, MergeMethod, ParamDef, Params, Pass, TensorContext, Values
from .radix import RADIX
from .sparsify import CRUMBS, DARE, DELLA, TOPK, Sparsifier, kernel_rows, rescale_pass, sparsified

WEIGHT = ParamDef("weight", None, float)
DENSITY = ParamDef("density", 1.0, float)
GAMMA = ParamDef("gamma", 0.01, float)
EPSILON = ParamDef("epsilon", 0.15, float)
LAMBDA = ParamDef("lambda", 1.0)


@functools.lru_cache(maxsize=64)
def _plain_divisor(weights: tuple[float, ...], dtype: torch.dtype) -> torch.Tensor:
    """The divisor `normalize` uses without consensus: the sum of every input's weight (present
    in the block or not) in the compute dtype, as MergeKit, or 1 where it is below 1e-8 (the
    weights cancel). Found once per tensor's weights: a torch call per block cost more than the
    block's arithmetic. Callers only read the tensor."""
    divisor = torch.tensor(weights, dtype=dtype).unsqueeze(1).sum(dim=0)
    divisor[divisor.abs() < 1e-8] = 1
    return divisor


@functools.lru_cache(maxsize=64)
def _divisor_value(weights: tuple[float, ...]) -> float:
    """`_plain_divisor` in float32 as a number, for the fused kernel, summed as torch sums the
    weights (`kernels.vector_sum`) so that torch is not needed at all; torch is asked where
    that order is not known here."""
    lanes = kernels.sum_lanes()
    if lanes is None:
        return float(_plain_divisor(weights, torch.float32)[0])
    d = kernels.vector_sum(np.array(weights, np.float32), lanes)
    return 1.0 if abs(d) < np.float32(1e-8) else float(d)


def _weights(ctx: TensorContext) -> tuple[float, ...]:
    return tuple(q["weight"] for q in ctx.p)


def _plain_mix(weighted: torch.Tensor, ctx: TensorContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of the weighted deltas, and `_plain_divisor`."""
    return weighted.sum(dim=0), _plain_divisor(_weights(ctx), weighted.dtype)


def _consensus_mix(weighted: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """TIES sign election: per element, the sign of the weighted sum wins and only the deltas of
    that sign are summed; the divisor is the weight of those deltas (1 where there are none)."""
    positive = weighted.sum(dim=0) >= 0
    agree = torch.where(positive, weighted > 0, weighted < 0)
    mixed = torch.where(agree, weighted, 0).sum(dim=0)
    divisor = (agree.to(w.dtype) * w).sum(dim=0)
    divisor[divisor == 0] = 1
    return mixed, divisor


def check_density(p: list[Params], g: Params, name: str, numel: int) -> None:
    for i, q in enumerate(p):
        if not 0 < q.get("density", 1) <= 1:
            raise BadMerge(f"density {q['density']} of model {i + 1} on {name} is outside (0, 1]")
        if "gamma" in q and not 0 <= q["gamma"] < 1:
            raise BadMerge(f"gamma {q['gamma']} of model {i + 1} on {name} is outside [0, 1)")
        if "epsilon" in q and q["density"] < 1:
            lo, hi = q["density"] - q["epsilon"], q["density"] + q["epsilon"]
            if q["epsilon"] < 0 or lo <= 0 or hi >= 1:
                raise BadMerge(
                    f"epsilon {q['epsilon']} of model {i + 1} on {name}: density +/- epsilon "
                    f"must lie inside (0, 1), got ({lo:g}, {hi:g})"
                )


class TaskArithmetic(MergeMethod):
    """One member of the family: a sparsifier (or none) and a mix (plain or consensus)."""

    base = "required"
    sparse_inputs = True

    def __init__(self, name: str, sparsifier: Sparsifier | None, consensus: bool, normalize: bool,
                 rescale: bool, extra: tuple[ParamDef, ...] = ()):
        self.name = name
        self.sparsifier = sparsifier
        self.consensus = consensus
        self.model_params = (WEIGHT, DENSITY, *extra)
        self.global_params = (ParamDef("normalize", normalize, bool), ParamDef("rescale", rescale, bool),
                              LAMBDA, ParamDef("int8_mask", False, bool))
        passes: tuple[Pass, ...] = ()
        if sparsifier is not None and sparsifier.ranks is not None:
            passes = RADIX
        if sparsifier is not None:
            passes = (*passes, rescale_pass(sparsifier))
        self.passes = passes
        self.additive = sparsifier is None and not consensus

    def prepare(self, ctx: TensorContext) -> None:
        """The ranks of |delta| the sparsifier cuts at, for every input it sparsifies."""
        sp = self.sparsifier
        if sp is not None and sp.ranks is not None:
            ctx.set_ranks({i: sp.ranks(q, ctx.numel) for i, q in enumerate(ctx.p) if q["density"] < 1})

    def row_local(self, g: Params) -> bool:
        return self.sparsifier is not None and self.sparsifier.row_local

    def check(self, p: list[Params], g: Params, name: str, numel: int) -> None:
        check_density(p, g, name, numel)

    def combine(self, b: Block, ctx: TensorContext) -> Values:
        fused = self._fused(b, ctx)
        if fused is not None:
            return fused
        base = b.require_base()
        d = sparsified(b, ctx, self.sparsifier)
        w = torch.tensor([q["weight"] for q in b.p], dtype=d.dtype).unsqueeze(1)
        weighted = d * w
        mixed, divisor = _consensus_mix(weighted, w) if self.consensus else _plain_mix(weighted, ctx)
        if b.g["normalize"]:
            mixed = mixed / divisor
        if b.g["lambda"] != 1:
            mixed = mixed * b.g["lambda"]
        return base + mixed


    def _fused(self, b: Block, ctx: TensorContext) -> np.ndarray | None:
        """`combine` in one kernel pass over the stored inputs (methods/kernels.py), bit for bit
        the eager result; None where the kernels do not apply (compute other than float32,
        inputs of different dtypes, a block too narrow, the kernels off on this machine)."""
        st = b.stored
        if st is None or st.base is None or st.models.shape[1] < kernels.MIN_COLUMNS or not kernels.available():
            return None
        rows = kernel_rows(b, ctx, self.sparsifier, st.models.shape[1])
        w = np.array([q["weight"] for q in b.p], dtype=np.float32)
        divisor = 1.0 if self.consensus else _divisor_value(_weights(ctx))
        return kernels.combine(st.base, st.models, st.shift, w, rows.mode, rows.hi, rows.lo, rows.before,
                               rows.first, rows.last, rows.mask, rows.scale, self.consensus,
                               bool(b.g["normalize"]), divisor, float(b.g["lambda"]))


TASK_ARITHMETIC = TaskArithmetic("task_arithmetic", None, False, False, False)
TIES = TaskArithmetic("ties", TOPK, True, True, False)
DARE_LINEAR = TaskArithmetic("dare_linear", DARE, False, False, True)
DARE_TIES = TaskArithmetic("dare_ties", DARE, True, False, True)
BREADCRUMBS = TaskArithmetic("breadcrumbs", CRUMBS, False, False, False, (GAMMA,))
BREADCRUMBS_TIES = TaskArithmetic("breadcrumbs_ties", CRUMBS, True, False, False, (GAMMA,))
DELLA_TIES = TaskArithmetic("della", DELLA, True, True, True, (EPSILON,))
DELLA_LINEAR = TaskArithmetic("della_linear", DELLA, False, False, True, (EPSILON,))

FAMILY = (TASK_ARITHMETIC, TIES, DARE_LINEAR, DARE_TIES, BREADCRUMBS, BREADCRUMBS_TIES, DELLA_TIES, DELLA_LINEAR)
