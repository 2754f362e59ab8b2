"""passthrough: one model's tensors as they are, or times a per-tensor `scale`.

This is what frankenmerges (`slices:` stacking layers of different models) merge each slice
with; MergeKit refuses more than one input, and so does the registry (a given base is one more
input, as for linear). The multiplication happens in the compute dtype, as in MergeKit.
"""

from __future__ import annotations

from ..lazytorch import torch
from .base import Block, MergeMethod, ParamDef, Params, TensorContext

# MergeKit's default is "no scale": the tensor is returned untouched. A scale of 1 returns it
# untouched too (combine does not multiply), so 1 is the same default without an optional type.
SCALE = ParamDef("scale", 1.0)


class Passthrough(MergeMethod):
    name = "passthrough"
    base = "none"
    model_params = (SCALE,)
    min_models = 1
    max_models = 1

    # With one input every block is "equal to the first input", but a scale != 1 still changes
    # it. A tensor whose scale is 1 is the input's own (nothing read); `local_identity` sees only
    # global parameters, so the blocks of a scaled tensor are all combined.
    def local_identity(self, g: Params, has_base: bool) -> bool:
        return False

    def equal_identity(self, p: list[Params], g: Params) -> bool:
        return all(q["scale"] == 1 for q in p)

    def combine(self, b: Block, ctx: TensorContext) -> torch.Tensor:
        x = b.models[0]
        scale = b.p[0]["scale"]
        return x if scale == 1 else x * scale


PASSTHROUGH = Passthrough()
