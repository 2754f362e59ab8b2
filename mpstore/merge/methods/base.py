"""The contract between the executor and the merge methods: `MergeMethod`, `Pass`, `Block`,
`TensorContext`, `ParamDef`.

A method sees a `Block`: a run of elements of one tensor from every input, in the compute dtype.
Steps that need the whole tensor (a top-k magnitude threshold, slerp's angle, model_stock's
cosines, the L1 norms behind `rescale`) are `Pass`es: the executor streams every block through a
pass's `measure`, sums the results, and `finish` turns the sum into typed statistics of the
tensor's `TensorContext`, which the next pass and `combine` read. So a tensor-global quantity is
exact without holding K whole tensors.

This module holds no method and no math beyond the block's own delta and random stream; it never
reads the store (the executor hands it values) and never registers anything (`methods/__init__`
is the registry).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar, Union

import numpy as np
import xxhash

from ...errors import BadMerge
from ..lazytorch import torch

# A parameter's value for one tensor, as `params.resolve` gives it: a float, or a bool for flags
# (bool is an int, hence a float, to the type checker).
Params = dict[str, float]
BaseUse = Literal["required", "optional", "none"]  # "none": a given base is just another input
HistogramOf = Callable[[int], "np.ndarray | None"]  # input number -> catalog histogram (int64), or None
# A block's merged values: a tensor, or a fused kernel's float32 array (methods/kernels.py: such a
# merge need not import torch at all)
Values = Union["torch.Tensor", np.ndarray]
# A pass's sums over a block: a tensor, or an int64 array (the radix passes' counts)
S = TypeVar("S", "torch.Tensor", np.ndarray)

T = TypeVar("T")


@dataclass(frozen=True)
class ParamDef:
    """A parameter a method reads, by its MergeKit name; per model or global is where the method
    lists it (`MergeMethod.model_params` / `global_params`)."""

    name: str
    default: object  # None: required
    kind: type = float  # float or bool


# Stored dtypes a fused kernel decodes itself: their bit patterns' numpy type, and the shift that
# makes them float32 bits (`Stored.shift`).
STORED_BITS: dict[str, tuple[type[np.unsignedinteger], int]] = {"F32": (np.uint32, 0), "BF16": (np.uint16, 16)}


@dataclass(frozen=True)
class Stored:
    """A block's inputs as the store holds them, for fused kernels (methods/kernels.py): float32
    or bfloat16 bit patterns, decoded per element, so no float32 copy of K inputs is made."""

    base: np.ndarray | None  # [n] uint32 (float32) or uint16 (bfloat16) bit patterns
    models: np.ndarray  # [k, n], the same dtype
    shift: int  # 0: float32 bits; 16: bfloat16 bits (their float32's high half)

    def values(self, bits: np.ndarray) -> torch.Tensor:
        """Bit patterns as float32 values (what the eager path computes with)."""
        if not bits.flags.writeable:  # a view into the store's map: torch keeps no read-only tensor
            bits = bits.copy()
        if self.shift == 0:
            return torch.from_numpy(bits.view(np.float32))
        return torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).to(torch.float32)


@dataclass
class Block:
    """Elements [start, start+n) of one tensor from the inputs, in the compute dtype.

    For methods with `sparse_inputs`, `models` holds only the inputs whose delta from the base is
    not zero here (`index` maps its rows to input numbers); the others contribute nothing.
    A block in float32 compute whose inputs share a dtype also carries them as `stored`; then
    `base` and `models` are decoded from it on first use, and a fused kernel need not decode."""

    name: str
    start: int
    _base: torch.Tensor | None  # [n]; read through `base`
    _models: torch.Tensor | None  # [k, n] the non-base inputs present in this block; read through `models`
    row_len: int  # length of the tensor's last axis (rows are whole within a row-local block)
    p: list[Params]  # per-model parameters of the rows of `models`
    g: Params  # global parameters for this tensor
    seed: int
    index: list[int] = field(default_factory=list)  # input number of each row of `models`
    ndim: int = 1  # of the whole tensor
    stored: Stored | None = None
    _deltas: torch.Tensor | None = field(default=None, repr=False)
    # The base's stored bytes of these elements, decoded and checked, or None: the executor hands
    # them on as the output chunk's delta reference, so its encoder does not decode them again.
    reference: memoryview | None = field(default=None, repr=False)

    @property
    def base(self) -> torch.Tensor | None:
        if self._base is None and self.stored is not None and self.stored.base is not None:
            self._base = self.stored.values(self.stored.base)
        return self._base

    @property
    def models(self) -> torch.Tensor:
        if self._models is None:
            assert self.stored is not None  # a block is built with its inputs decoded, or stored
            self._models = self.stored.values(self.stored.models)
        return self._models

    def require_base(self) -> torch.Tensor:
        """The base, for methods that merge from one (the executor always supplies it to them)."""
        if self.base is None:
            raise BadMerge(f"tensor {self.name!r}: this method needs a base")
        return self.base

    def deltas(self) -> torch.Tensor:
        """models - base, computed once per block (a cached block serves several passes).
        Callers must not modify it."""
        if self._deltas is None:
            self._deltas = self.models - self.require_base()
        return self._deltas

    def rng(self, i: int) -> torch.Generator:
        """A generator for row i over this block: depends on (seed, tensor, input, position)
        only, so results do not depend on thread scheduling, on which pass asks, or on which
        other inputs are present."""
        key = xxhash.xxh3_64_intdigest(f"{self.seed}/{self.name}/{self.index[i]}/{self.start}".encode())
        return torch.Generator().manual_seed(key & 0x7FFF_FFFF_FFFF_FFFF)

    def row(self, input_no: int) -> int | None:
        """Row of `models` holding input `input_no`, or None if its delta is zero here."""
        return self.index.index(input_no) if input_no in self.index else None


def known(value: T | None, what: str) -> T:
    """A statistic a pass must have produced before it is read: None here is a method whose
    passes are out of order, never a user error."""
    if value is None:
        raise AssertionError(f"{what} is read before the pass that computes it")
    return value


@dataclass
class TensorContext:
    """Everything a merge knows about one tensor beyond the block in hand.

    The executor makes one per output tensor; `MergeMethod.prepare` and then each pass's `finish`
    write its statistics, in pass order, and the later passes, the sparsifiers and `combine`
    read them. It is the one per-tensor object that the executor and any fused kernel read: a
    statistic a method needs is a typed field here, never a key in a dict. Fields a pass has not
    written yet are None (or empty)."""

    inputs: int  # non-base inputs of the tensor (rows of a block with every input present)
    compute: str  # what blocks arrive in (a store dtype name): the dtype MergeKit's math runs in
    p: list[Params]  # per input
    g: Params
    numel: int
    block_of: dict[int, int]  # block number of each block's first element
    # Per input with chunks a budget left out: the catalog's histogram of float32 |delta| high
    # bits over those chunks (int64 [65536]); the radix passes keep the read share of a bin.
    omitted_hist: dict[int, np.ndarray] = field(default_factory=dict)

    # --- radix selection (methods/radix.py) for top-k and breadcrumbs ---
    # `prepare`: per sparsified input, the descending ranks of |delta| wanted (1 = the largest).
    # Each (input, j) is a "cut", numbered input by input in this order (see `cut`).
    ranks: dict[int, list[int]] = field(default_factory=dict)
    cut_start: dict[int, int] = field(default_factory=dict)  # first cut number of each input
    high: np.ndarray | None = None  # int64 [len(ranks), 65536]: histograms of the high bits
    bins: dict[int, list[tuple[int, int]]] = field(default_factory=dict)  # per cut: (high bits, rank in bin)
    thresholds: dict[int, list[float]] = field(default_factory=dict)  # per cut: the exact magnitude
    within: dict[int, list[int]] = field(default_factory=dict)  # per cut: position among its ties
    tied_here: np.ndarray | None = None  # int64 [cuts, blocks]: entries equal to the cut in a block
    tied_before: np.ndarray | None = None  # int64 [cuts, blocks]: such entries in earlier blocks

    # --- `rescale` (methods/sparsify.py): per input, whole L1 / sparsified L1; None: no rescale
    scale: list[float] | None = None

    # --- angles (methods/gram.py, slerp.py, model_stock.py) ---
    gram: torch.Tensor | None = None  # float64 [k, k]: dot products of the pass's vectors
    columns: bool = False  # nuslerp slerps per column: it needs `column_dots`
    column_dots: torch.Tensor | None = None  # float64 [3, row_len]: per column sum u·u, v·v, u·v

    def set_ranks(self, ranks: dict[int, list[int]]) -> None:
        """Fix which order statistics the radix passes find, and number the cuts."""
        self.ranks = ranks
        self.cut_start = {}
        n = 0
        for i, wanted in ranks.items():
            self.cut_start[i] = n
            n += len(wanted)

    @property
    def cuts(self) -> int:
        return sum(len(wanted) for wanted in self.ranks.values())

    def cut(self, i: int, j: int) -> int:
        """The number of cut j of input i: its row in `tied_here`, `tied_before` and the low
        radix histograms."""
        return self.cut_start[i] + j


def always(p: list[Params], g: Params) -> bool:
    """The default `Pass.needed`: every tensor needs the pass."""
    return True


@dataclass(frozen=True, eq=False)
class Pass(Generic[S]):
    """One streaming sweep over a tensor: per-block partial sums, then a finishing step.

    `measure` returns one tensor whose layout is fixed for the tensor (e.g. [inputs, 65536]);
    the executor sums the blocks' tensors elementwise in block order (first + second + ...), so
    every float sum is deterministic, and `finish` writes what the total means into the context."""

    name: str
    measure: Callable[[Block, TensorContext], S]
    finish: Callable[[TensorContext, S], None]
    needed: Callable[[list[Params], Params], bool] = always
    # What `measure` would return for a block of n elements where every input equals the base
    # (all deltas zero), so such blocks are accounted for without reading them. None: read them.
    zero: Callable[[int, TensorContext], S] | None = None
    # The total `measure` would give, from the delta catalog instead of a sweep: called with a
    # function giving input i's histogram of float32 |delta| high bits over the whole tensor (or
    # None when the catalog cannot say); returns None to sweep after all.
    from_catalog: Callable[[TensorContext, HistogramOf], S | None] | None = None

    def zero_block(self, n: int, ctx: TensorContext) -> S:
        """`zero` for a block the outline decided not to read (only passes with `zero` allow it)."""
        return known(self.zero, f"pass {self.name}'s zero-block sums")(n, ctx)


class MergeMethod(ABC):
    """A merge method: its MergeKit name and parameters, the passes it needs over each tensor, and
    `combine`, the math over one block. Instances are stateless and shared by every merge; all
    per-tensor state lives in the `TensorContext`."""

    name: str
    base: BaseUse
    model_params: tuple[ParamDef, ...] = ()
    global_params: tuple[ParamDef, ...] = ()
    min_models: int = 1
    max_models: int | None = None
    passes: tuple[Pass, ...] = ()
    # Inputs whose delta is zero in a block may be left out of it (`Block.index` says who is in).
    sparse_inputs: bool = False
    # The output is base + a fixed linear combination of the deltas, so leaving a chunk's delta
    # out moves it by at most that delta's weighted norm: the planner can bound the omission.
    additive: bool = False

    @abstractmethod
    def combine(self, block: Block, ctx: TensorContext) -> Values:
        """The merged values of `block`, in the compute dtype."""

    def prepare(self, ctx: TensorContext) -> None:
        """Set what the passes must know before they sweep (e.g. which ranks to find); no reads."""
        return None

    def row_local(self, g: Params) -> bool:
        """Blocks must hold whole rows (the math works per row of the last axis)."""
        return False

    def whole_tensor(self, g: Params) -> bool:
        """The math needs the whole tensor at once (an iterative mean, a softmax over it): one
        block holds it, so memory is the tensor times the inputs, as in MergeKit."""
        return False

    def local_identity(self, g: Params, has_base: bool) -> bool:
        """A block where every input equals the base (or, without one, the first input) merges
        to that block."""
        return True

    def equal_identity(self, p: list[Params], g: Params) -> bool:
        """All inputs equal over the whole tensor: is the output that tensor?"""
        return True

    def check(self, p: list[Params], g: Params, name: str, numel: int) -> None:
        """Refuse parameters that are out of range for tensor `name`, before anything is read."""
        return None
