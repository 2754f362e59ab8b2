"""multislerp: barycentric interpolation of several models (or their deltas from a base) on the
hypersphere, MergeKit's Multi-SLERP.

Each input is scaled to unit norm, the weighted mean of the unit vectors fixes a tangent point,
the weighted tangent vectors are averaged there and mapped back onto the sphere, and the result
takes the weighted mean of the input norms. Every step runs over the whole flattened tensor in
the compute dtype, with torch's own reductions, as MergeKit does: so the method takes the tensor
as one block (`whole_tensor`), and its result is MergeKit's bit for bit in any dtype.
"""

from __future__ import annotations

from ...errors import BadMerge
from ..lazytorch import torch
from .base import Block, MergeMethod, ParamDef, Params, TensorContext
from .task_arithmetic import WEIGHT


class MultiSlerp(MergeMethod):
    name = "multislerp"
    base = "optional"
    model_params = (WEIGHT,)
    global_params = (ParamDef("normalize_weights", True, bool), ParamDef("eps", 1e-8))
    min_models = 1

    def whole_tensor(self, g: Params) -> bool:
        return True  # the norms, the mean direction and the tangent step span the tensor

    def local_identity(self, g: Params, has_base: bool) -> bool:
        # With a base, zero deltas interpolate to zero (MergeKit: exactly, for one or two models;
        # it refuses three or more, whose mean direction is then undefined). Without one, equal
        # models still go through the sphere and need not come back bit for bit.
        return has_base

    def equal_identity(self, p: list[Params], g: Params) -> bool:
        return False  # without a base, equal inputs are not returned as they are (see above)

    def check(self, p: list[Params], g: Params, name: str, numel: int) -> None:
        if g["eps"] < 0:
            raise BadMerge(f"multislerp: eps {g['eps']:g} on {name} is negative")
        # MergeKit divides by the weight sum and writes inf/NaN; refusing is the sensible answer.
        if g["normalize_weights"] and len(p) > 1 and abs(sum(q["weight"] for q in p)) < 1e-8:
            raise BadMerge(f"multislerp with normalize_weights: the weights on {name} sum to zero")

    def combine(self, b: Block, ctx: TensorContext) -> torch.Tensor:
        if len(b.models) == 1:
            return b.models[0]  # nothing to interpolate: the one model as it is
        x = b.models - b.base if b.base is not None else b.models
        eps = b.g["eps"]
        w = torch.tensor([q["weight"] for q in b.p], dtype=x.dtype)
        if b.g["normalize_weights"]:
            w = w / w.sum()
        w_col = w.view(-1, 1)
        norms = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        units = x / (norms + eps)
        centre = (units * w_col).sum(0)
        centre_norm = torch.linalg.vector_norm(centre)
        if centre_norm < eps:
            if len(x) != 2:
                raise BadMerge(f"multislerp: on {b.name} the weighted mean direction of the inputs is zero "
                               "(antipodal inputs whose weights cancel): change the weights")
            out = x[0] * w[0] + x[1] * w[1]  # two opposite inputs: interpolate linearly
        else:
            centre = centre / centre_norm
            tangents = units - (units * centre).sum(-1, keepdim=True) * centre
            step = (tangents * w_col).sum(0)
            angle = torch.linalg.vector_norm(step) + eps
            on_sphere = centre * torch.cos(angle) + step * (torch.sin(angle) / angle)
            out = on_sphere * (norms.squeeze(-1) * w).sum()
        return out + b.base if b.base is not None else out


MULTISLERP = MultiSlerp()
