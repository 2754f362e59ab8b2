"""nearswap: take the model's value where it is within `t` of the base, else move the base by
`t` toward it; elementwise, so blocks need nothing from the rest of the tensor.

Per element, w = clamp(t / max(|B - M|, 1e-6), 0, 1) and the result is w·M + (1 - w)·B, every
step in the compute dtype in MergeKit's order (`t / x` is torch's reciprocal-then-multiply, as in
MergeKit), so 16-bit results are bit-equal to MergeKit's.
"""

from __future__ import annotations

from ...errors import BadMerge
from ..lazytorch import torch
from .base import Block, MergeMethod, ParamDef, Params, TensorContext

# From this t on, w is exactly 1 where the model equals the base in every compute dtype
# (t / 1e-6 >= 1 with room for 16-bit rounding), so the result there is the base itself.
IDENTITY_T = 1e-5


class NearSwap(MergeMethod):
    name = "nearswap"
    base = "required"
    global_params = (ParamDef("t", None),)
    min_models = 1
    max_models = 1

    def local_identity(self, g: Params, has_base: bool) -> bool:
        return g["t"] >= IDENTITY_T  # smaller t mixes w·B + (1-w)·B, which can round off B

    def equal_identity(self, p: list[Params], g: Params) -> bool:
        return g["t"] >= IDENTITY_T

    def check(self, p: list[Params], g: Params, name: str, numel: int) -> None:
        # t <= 0 keeps the base (MergeKit's float16 even turns 0·inf into NaN where the model
        # is within 1.5e-5 of the base): a config error, not a merge.
        if not g["t"] > 0:
            raise BadMerge(f"nearswap t {g['t']:g} on {name} must be > 0 (the distance up to "
                           "which the model's values are taken; t <= 0 returns the base)")

    def combine(self, b: Block, ctx: TensorContext) -> torch.Tensor:
        base, model = b.require_base(), b.models[0]
        distance = torch.abs(base - model).clamp(min=1e-6)
        w = (b.g["t"] / distance).clamp(min=0, max=1)
        return w * model + (1 - w) * base


NEARSWAP = NearSwap()
