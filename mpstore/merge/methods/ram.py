"""ram and ramplus_tl: Reinforced Agent Merging, MergeKit's two RAM methods.

Per element, only deltas with |delta| > epsilon count. Where one model changes an element its
delta is kept whole; where several do, their deltas are averaged. ramplus_tl also scales each
model's unique entries by lambda = 1 + r * clamp(shared / unique, 0, alpha), from the counts of
that model's entries shared with others and its own over the whole tensor.

Operations follow MergeKit's order and dtypes: the masks and counts are exact, the deltas stay in
the compute dtype, and ramplus_tl's lambda is float32, which promotes its result to float32 (the
executor rounds it to the output dtype once, as MergeKit's write does). A model whose delta is
zero in a block counts nowhere there, so blocks carry only the inputs that change them
(`sparse_inputs`). ram is elementwise and streams in blocks; ramplus_tl's counts span the tensor,
so it takes the tensor as one block (`whole_tensor`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import BadMerge
from ..lazytorch import torch
from .base import Block, MergeMethod, ParamDef, Params, TensorContext


@dataclass(frozen=True)
class Contributions:
    """Which entries of each delta count (|delta| > epsilon), and how many models count at each
    element: the split both RAM methods merge by."""

    kept: torch.Tensor  # [k, n] the deltas, zero where they do not count
    counting: torch.Tensor  # [k, n] bool
    count: torch.Tensor  # [1, n] int64: models counting at each element
    shared: torch.Tensor  # [1, n] bool: more than one counts
    unique: torch.Tensor  # [1, n] bool: exactly one counts

    def averaged(self) -> torch.Tensor:
        """The shared entries divided by the number of models sharing them."""
        return self.kept * self.shared / self.count.clamp(min=1)


def contributions(b: Block, epsilon: float) -> Contributions:
    d = b.deltas()
    counting = d.abs() > epsilon
    count = counting.sum(dim=0, keepdim=True)
    return Contributions(d * counting, counting, count, count > 1, count == 1)


def check_epsilon(g: Params, name: str, method: str, positive: bool) -> None:
    """A negative epsilon would count unchanged entries (and every input everywhere); ramplus_tl
    also divides by it where a model has no unique entry."""
    eps = g["epsilon"]
    if eps < 0 or (positive and eps == 0):
        bound = "> 0" if positive else ">= 0"
        raise BadMerge(f"{method}: epsilon {eps:g} on {name} must be {bound}")


EPSILON = ParamDef("epsilon", 1e-5)


class Ram(MergeMethod):
    name = "ram"
    base = "required"
    global_params = (EPSILON,)
    sparse_inputs = True

    def check(self, p: list[Params], g: Params, name: str, numel: int) -> None:
        check_epsilon(g, name, self.name, positive=False)

    def combine(self, b: Block, ctx: TensorContext) -> torch.Tensor:
        c = contributions(b, b.g["epsilon"])
        return b.require_base() + (c.kept * c.unique + c.averaged()).sum(dim=0)


class RamPlusTensorLocal(MergeMethod):
    name = "ramplus_tl"
    base = "required"
    global_params = (ParamDef("r", 0.1), ParamDef("alpha", 0.2), EPSILON)
    sparse_inputs = True

    def whole_tensor(self, g: Params) -> bool:
        return True  # lambda comes from each model's shared and unique counts over the tensor

    def check(self, p: list[Params], g: Params, name: str, numel: int) -> None:
        check_epsilon(g, name, self.name, positive=True)

    def combine(self, b: Block, ctx: TensorContext) -> torch.Tensor:
        c = contributions(b, b.g["epsilon"])
        shared = (c.counting & c.shared).sum(dim=1)
        unique = (c.counting & c.unique).sum(dim=1)
        rho = shared / unique.clamp(min=b.g["epsilon"])  # float32, as MergeKit's
        lam = 1 + b.g["r"] * rho.clamp(min=0, max=b.g["alpha"])
        return b.require_base() + (c.kept * c.unique * lam.unsqueeze(-1) + c.averaged()).sum(dim=0)


RAM = Ram()
RAMPLUS_TL = RamPlusTensorLocal()
