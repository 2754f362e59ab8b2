"""karcher: the Karcher (Riemannian) mean of the inputs' directions on the unit hypersphere,
scaled by their mean norm, MergeKit's Karcher Mean. A given base is one more input.

The mean is found by fixed-point iteration (at most `max_iter` steps, until the tangent step is
shorter than `tol`) over whole flattened tensors, so the method takes the tensor as one block
(`whole_tensor`). Norms are taken in float32 (float64 for float64 inputs) and the iterate is kept
in the compute dtype, each operation in MergeKit's order and dtypes, so the result is MergeKit's
bit for bit.
"""

from __future__ import annotations

from ...errors import BadMerge
from ..lazytorch import torch
from .base import Block, MergeMethod, ParamDef, Params, TensorContext


def karcher_mean(xs: list[torch.Tensor], alphas: list[float], max_iter: int, tol: float) -> torch.Tensor:
    """The weighted Karcher mean direction of the 1-D tensors `xs` times sum(alpha * norm).
    Inputs with norm <= tol take no part in the direction (they still count in the scale)."""
    wide = torch.float64 if xs[0].dtype == torch.float64 else torch.float32
    norms = [torch.linalg.vector_norm(x.to(wide)) for x in xs]
    live = [i for i, n in enumerate(norms) if n.item() > tol]
    if not live:
        return (torch.stack(xs) * 0).sum(0)
    units = [(xs[i] / norms[i]).to(xs[i].dtype) for i in live]  # norm > tol >= 0 (`check`)
    total = sum(alphas[i] for i in live)
    share = [alphas[i] / total for i in live]

    mean = torch.zeros_like(units[0])
    for a, u in zip(share, units):
        mean += a * u
    length = torch.linalg.vector_norm(mean.to(wide))
    mean = units[0].clone() if length.item() < tol else (mean / length).to(mean.dtype)

    for _ in range(max_iter):
        step = torch.zeros_like(mean)
        for a, u in zip(share, units):
            cos = torch.clamp(torch.dot(mean, u), -1.0, 1.0)
            theta = torch.arccos(cos)
            if theta.item() < tol:
                continue  # u is the mean already: no pull (and theta / sin(theta) would be 0/0)
            step += a * (theta / torch.sin(theta)) * (u - cos * mean)
        step_len = torch.linalg.vector_norm(step.to(wide))
        if step_len.item() < tol:
            break
        mean = (torch.cos(step_len) * mean + torch.sin(step_len) * (step / step_len)).to(mean.dtype)
        length = torch.linalg.vector_norm(mean.to(wide))
        if length.item() > tol:
            mean = (mean / length).to(mean.dtype)

    scale = sum(a * n for a, n in zip(alphas, norms))
    return scale * mean


class Karcher(MergeMethod):
    name = "karcher"
    base = "none"
    global_params = (ParamDef("max_iter", 10), ParamDef("tol", 1e-5))

    def whole_tensor(self, g: Params) -> bool:
        return True  # every iteration takes dot products and norms over the whole tensor

    def local_identity(self, g: Params, has_base: bool) -> bool:
        return False  # equal inputs come back through a unit vector times a rounded mean norm

    def equal_identity(self, p: list[Params], g: Params) -> bool:
        return False

    def check(self, p: list[Params], g: Params, name: str, numel: int) -> None:
        steps = g["max_iter"]
        if steps < 0 or steps != int(steps):
            raise BadMerge(f"karcher: max_iter {steps:g} on {name} is not a whole number >= 0")
        if g["tol"] < 0:
            raise BadMerge(f"karcher: tol {g['tol']:g} on {name} is negative")

    def combine(self, b: Block, ctx: TensorContext) -> torch.Tensor:
        rows = list(b.models)
        if len(rows) == 1:
            return rows[0]
        return karcher_mean(rows, [1.0 / len(rows)] * len(rows), int(b.g["max_iter"]), b.g["tol"])


KARCHER = Karcher()
