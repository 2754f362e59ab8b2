"""The merge methods: one registry, one small function each, in plain tensor math.

MergeKit's parameter names, defaults and formulas are the reference (docs/merge_methods.md).
A method sees a `Block`: a run of elements of one tensor from every input, in the compute dtype.
Steps that need the whole tensor (a top-k magnitude threshold, slerp's angle, model_stock's
cosines, the L1 norms behind `rescale`) are `Pass`es: the executor streams every block through a
pass's `measure`, sums the results, and `finish` turns the sums into statistics the next pass
and `combine` read. So a tensor-global quantity is exact without holding K whole tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import xxhash

from ...errors import BadMerge


@dataclass(frozen=True)
class ParamDef:
    name: str
    default: object  # None: required
    kind: type = float
    per_model: bool = False


@dataclass
class Block:
    """Elements [start, start+n) of one tensor from the inputs, in the compute dtype.

    For methods with `sparse_inputs`, `models` holds only the inputs whose delta from the base is
    not zero here (`index` maps its rows to input numbers); the others contribute nothing."""

    name: str
    start: int
    base: torch.Tensor | None  # [n]
    models: torch.Tensor  # [k, n] the non-base inputs present in this block
    row_len: int  # length of the tensor's last axis (rows are whole within a row-local block)
    p: list[dict]  # per-model parameters of the rows of `models`
    g: dict  # global parameters for this tensor
    seed: int
    index: list[int] = field(default_factory=list)  # input number of each row of `models`
    weight_sum: float = 0.0  # sum of every input's weight (present here or not)
    ndim: int = 1  # of the whole tensor
    _deltas: torch.Tensor | None = field(default=None, repr=False)

    def deltas(self) -> torch.Tensor:
        """models - base, computed once per block (a cached block serves several passes).
        Callers must not modify it."""
        if self._deltas is None:
            self._deltas = self.models - self.base
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


Stats = dict


@dataclass(frozen=True)
class Pass:
    """One streaming sweep over a tensor: per-block partial sums, then a finishing step."""

    measure: Callable[[Block, Stats], dict[str, torch.Tensor]] | None  # None: no sweep, only finish
    finish: Callable[[Stats, dict[str, torch.Tensor], list[dict], dict, int], None]
    needed: Callable[[list[dict], dict], bool] = lambda p, g: True
    # What `measure` would return for a block of n elements where every input equals the base
    # (all deltas zero), so such blocks are accounted for without reading them. None: read them.
    zero: Callable[[int, Stats, int], dict[str, torch.Tensor]] | None = None
    # The sums `measure` would give, from the delta catalog instead of a sweep: called with a
    # function giving input i's histogram of float32 |delta| high bits over the whole tensor (or
    # None when the catalog cannot say); returns None to sweep after all.
    from_catalog: Callable[[Stats, Callable[[int], torch.Tensor | None]], dict | None] | None = None


@dataclass(frozen=True)
class Method:
    name: str
    combine: Callable[[Block, Stats], torch.Tensor]
    base: str  # "required", "optional" or "none" (linear: a given base is just another input)
    model_params: tuple[ParamDef, ...] = ()
    global_params: tuple[ParamDef, ...] = ()
    min_models: int = 1
    max_models: int | None = None
    passes: tuple[Pass, ...] = ()
    sparse_inputs: bool = False  # inputs whose delta is zero in a block may be left out of it
    row_local: Callable[[dict], bool] = lambda g: False  # blocks must hold whole rows
    local_identity: Callable[[dict, bool], bool] = lambda g, has_base: True
    # All inputs equal over the whole tensor: is the output that tensor? (linear: only normalized)
    equal_identity: Callable[[dict], bool] = lambda g: True
    check: Callable[[list[dict], dict, str, int], None] = lambda p, g, name, numel: None
    # The output is base + a fixed linear combination of the deltas, so leaving a chunk's delta
    # out moves it by at most that delta's weighted norm: the planner can bound the omission.
    additive: bool = False


REGISTRY: dict[str, Method] = {}


def register(m: Method) -> Method:
    REGISTRY[m.name] = m
    return m


def get(name: str) -> Method:
    if name not in REGISTRY:
        raise BadMerge(f"unknown merge method {name!r} (known: {', '.join(sorted(REGISTRY))})")
    return REGISTRY[name]


# ----------------------------------------------------------------------------------------------
# Order statistics of |delta| by radix selection: two streaming passes find the exact r-th
# largest magnitude per input (top 16 bits of the float32 pattern, then the low 16 bits).

def _deltas(b: Block) -> torch.Tensor:
    return b.deltas()


def _magnitude_bits(d: torch.Tensor) -> torch.Tensor:
    return d.abs().to(torch.float32).view(torch.int32)


def _zero_counts(n: int) -> torch.Tensor:
    counts = torch.zeros(1 << 16, dtype=torch.int64)
    counts[0] = n
    return counts


def _radix_high(b: Block, st: Stats) -> dict[str, torch.Tensor]:
    out = {}
    d = _deltas(b)
    for i in st["ranks"]:
        r = b.row(i)
        out[f"h{i}"] = (_zero_counts(d.shape[1]) if r is None
                        else torch.bincount(_magnitude_bits(d[r]) >> 16, minlength=1 << 16))
    return out


def _pick(hist: torch.Tensor, rank: int) -> tuple[int, int]:
    """The bin holding the rank-th largest count from the top, and the rank within that bin."""
    from_top = torch.flip(hist, [0]).cumsum(0)
    idx = int(torch.searchsorted(from_top, torch.tensor(rank, dtype=from_top.dtype)))
    above = int(from_top[idx - 1]) if idx > 0 else 0
    return len(hist) - 1 - idx, rank - above


def _radix_high_zero(n: int, st: Stats, k: int) -> dict[str, torch.Tensor]:
    return {f"h{i}": _zero_counts(n) for i in st["ranks"]}


def _radix_low_zero(n: int, st: Stats, k: int) -> dict[str, torch.Tensor]:
    # zero deltas only count in bin 0; other sums are left out rather than added as zeros
    return {f"l{i}.{j}": _zero_counts(n)
            for i, picks in st["bins"].items() for j, (hi, _) in enumerate(picks) if hi == 0}


def _radix_high_finish(st: Stats, tot: dict, p: list[dict], g: dict, numel: int) -> None:
    st["high"] = tot
    st["bins"] = {i: [_pick(tot[f"h{i}"], r) for r in ranks] for i, ranks in st["ranks"].items()}


def _radix_high_known(st: Stats, hist: Callable[[int], torch.Tensor | None]) -> dict | None:
    out = {}
    for i in st["ranks"]:
        h = hist(i)
        if h is None:
            return None
        out[f"h{i}"] = h
    return out


def _radix_low(b: Block, st: Stats) -> dict[str, torch.Tensor]:
    out = {}
    d = _deltas(b)
    for i, picks in st["bins"].items():
        r = b.row(i)
        bits = _magnitude_bits(d[r]) if r is not None else None
        for j, (hi, _) in enumerate(picks):
            if bits is None:
                out[f"l{i}.{j}"] = _zero_counts(d.shape[1] if hi == 0 else 0)
            else:
                out[f"l{i}.{j}"] = torch.bincount(bits[(bits >> 16) == hi] & 0xFFFF, minlength=1 << 16)
    return out


def _radix_low_finish(st: Stats, tot: dict, p: list[dict], g: dict, numel: int) -> None:
    """The exact magnitude at each wanted rank, and that rank's position among the entries
    tied at that magnitude (1 = the first of them in index order)."""
    thresholds, within = {}, {}
    omitted = st.get("omitted_hist", {})
    for i, picks in st["bins"].items():
        values, positions = [], []
        for j, (hi, r) in enumerate(picks):
            if i in omitted and hi > 0:
                r = _rank_among_read(r, int(st["high"][f"h{i}"][hi]), int(omitted[i][hi]))
                if r == 0:  # no read entry in the threshold's bin: cut at the bin's floor
                    values.append(torch.tensor([hi << 16], dtype=torch.int32).view(torch.float32).item())
                    positions.append(1)
                    continue
            lo, position = _pick(tot.get(f"l{i}.{j}", _zero_counts(0)), r)
            values.append(torch.tensor([(hi << 16) | lo], dtype=torch.int32).view(torch.float32).item())
            positions.append(position)
        thresholds[i], within[i] = values, positions
    st["thresholds"], st["within"] = thresholds, within


def _rank_among_read(rank: int, in_bin: int, unread: int) -> int:
    """A budgeted merge leaves chunks unread: the threshold's bin (from the catalog, over the
    whole delta) holds `in_bin` entries of which `unread` were not read. The same fraction of the
    read ones is kept, so read chunks keep what the exact merge would keep, to within the bin."""
    read = in_bin - unread
    return 0 if read <= 0 else max(1, min(read, math.ceil(rank * read / in_bin)))


def _ties(b: Block, st: Stats) -> dict[str, torch.Tensor]:
    """How many entries of this block tie with each threshold, as a one-hot over blocks, so the
    sums tell every block how many tied entries come before it."""
    d = _deltas(b)
    n = st["block_of"][b.start]
    out = {}
    for i, values in st["thresholds"].items():
        r = b.row(i)
        m = d[r].abs().to(torch.float32) if r is not None else None
        for j, v in enumerate(values):
            counts = torch.zeros(len(st["block_of"]), dtype=torch.int64)
            if m is not None:
                counts[n] = int((m == v).sum())
            out[f"t{i}.{j}"] = counts
    return out


def _ties_finish(st: Stats, tot: dict, p: list[dict], g: dict, numel: int) -> None:
    st["tied_here"] = tot
    st["tied_before"] = {k: torch.cumsum(v, 0) - v for k, v in tot.items()}


def _ties_zero(n: int, st: Stats, k: int) -> dict[str, torch.Tensor]:
    return {f"t{i}.{j}": torch.zeros(len(st["block_of"]), dtype=torch.int64)
            for i, values in st["thresholds"].items() for j in range(len(values))}


def _tied(b: Block, st: Stats, i: int, j: int, m: torch.Tensor, first: int, last: float) -> torch.Tensor:
    """Entries equal to threshold j of input i whose position among all such entries of the
    tensor (index order) is within [first, last]: exact top-k with a deterministic tie-break."""
    gi = b.index[i]
    eq = m == st["thresholds"][gi][j]
    key, n = f"t{gi}.{j}", st["block_of"][b.start]
    before, here = int(st["tied_before"][key][n]), int(st["tied_here"][key][n])
    if before + 1 >= first and before + here <= last:
        return eq  # every tie in this block is kept: no need to number them
    position = before + torch.cumsum(eq, 0)
    return eq & (position >= first) & (position <= last)


def _has_ranks(p: list[dict], g: dict) -> bool:
    return any(q["density"] < 1 for q in p)


RADIX = (
    Pass(_radix_high, _radix_high_finish, _has_ranks, _radix_high_zero, _radix_high_known),
    Pass(_radix_low, _radix_low_finish, _has_ranks, _radix_low_zero),
    Pass(_ties, _ties_finish, _has_ranks, _ties_zero),
)


# ----------------------------------------------------------------------------------------------
# Sparsifiers: each returns a keep-mask for input i's delta `d` within a block.

def _topk_ranks(q: dict, numel: int) -> list[int]:
    # MergeKit keeps max(1, floor(density*n)) entries: also the sensible answer when density*n < 1.
    return [max(1, math.floor(q["density"] * numel))]


def _topk_mask(b: Block, st: Stats, i: int, d: torch.Tensor) -> torch.Tensor:
    """Exactly k entries: all above the threshold, and of those tied with it the first ones in
    index order (MergeKit keeps an arbitrary subset of the tied ones)."""
    gi = b.index[i]
    m = d.abs().to(torch.float32)
    return (m > st["thresholds"][gi][0]) | _tied(b, st, i, 0, m, 1, st["within"][gi][0])


def _crumbs_ranks(q: dict, numel: int) -> list[int]:
    # Keep density*n entries after dropping gamma*n from the top. Unlike MergeKit (which floors
    # density*n to 0 for small tensors and then drops the whole delta) at least one entry is kept.
    keep = max(1, math.floor(q["density"] * numel))
    top = math.floor(q["gamma"] * numel)
    bottom = max(0, numel - keep - top)
    top = numel - bottom - keep
    return [top + 1, top + keep]  # descending ranks of the largest and smallest kept magnitude


def _crumbs_mask(b: Block, st: Stats, i: int, d: torch.Tensor) -> torch.Tensor:
    """Descending ranks (top, top+keep] exactly: strictly between the two cut magnitudes, plus
    the tied entries at each cut that fall inside the range (index order breaks ties)."""
    gi = b.index[i]
    hi, lo = st["thresholds"][gi]
    first, last = st["within"][gi]
    m = d.abs().to(torch.float32)
    if hi == lo:
        return _tied(b, st, i, 0, m, first, last)
    return ((m > lo) & (m < hi)) | _tied(b, st, i, 0, m, first, math.inf) | _tied(b, st, i, 1, m, 1, last)


def _dare_mask(b: Block, st: Stats, i: int, d: torch.Tensor) -> torch.Tensor:
    return torch.rand(d.shape, generator=b.rng(i)) < b.p[i]["density"]


def _della_mask(b: Block, st: Stats, i: int, d: torch.Tensor) -> torch.Tensor:
    """Keep probability rises linearly with the magnitude's rank within its row, from
    density-epsilon to density+epsilon (a row of one element keeps with p = density)."""
    q = b.p[i]
    rows = d.reshape(-1, b.row_len)
    m = rows.shape[1]
    if m > 1:
        rank = rows.abs().to(torch.float32).argsort(dim=1).argsort(dim=1).to(torch.float32)
        prob = q["density"] - q["epsilon"] + 2 * q["epsilon"] * rank / (m - 1)
    else:
        prob = torch.full(rows.shape, q["density"])
    return (torch.rand(rows.shape, generator=b.rng(i)) < prob).reshape(d.shape)


@dataclass(frozen=True)
class Sparsifier:
    mask: Callable[[Block, Stats, int, torch.Tensor], torch.Tensor]
    ranks: Callable[[dict, int], list[int]] | None = None  # order statistics it needs


TOPK = Sparsifier(_topk_mask, _topk_ranks)
CRUMBS = Sparsifier(_crumbs_mask, _crumbs_ranks)
DARE = Sparsifier(_dare_mask)
DELLA = Sparsifier(_della_mask)


def _sparsified(b: Block, st: Stats, sp: Sparsifier | None) -> torch.Tensor:
    """Each input's delta after its sparsifier (inputs with density >= 1 are left whole)."""
    d = _deltas(b)
    if sp is None:
        return d
    rows = [torch.where(sp.mask(b, st, i, d[i]), d[i], 0) if q["density"] < 1 else d[i]
            for i, q in enumerate(b.p)]
    return torch.stack(rows) if rows else d


def _l1_pass(sp: Sparsifier | None) -> Pass:
    """`rescale`: MergeKit scales each sparsified delta so its L1 norm matches the whole delta's."""

    def measure(b: Block, st: Stats) -> dict[str, torch.Tensor]:
        k = st["inputs"]
        whole, kept = torch.zeros(k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)
        rows = torch.tensor(b.index, dtype=torch.int64)
        whole[rows] = _deltas(b).to(torch.float64).abs().sum(dim=1)
        kept[rows] = _sparsified(b, st, sp).to(torch.float64).abs().sum(dim=1)
        return {"whole": whole, "kept": kept}

    def finish(st: Stats, tot: dict, p: list[dict], g: dict, numel: int) -> None:
        st["scale"] = [
            (w / k) if q["density"] < 1 and w >= 1e-7 and k >= 1e-7 else 1.0
            for w, k, q in zip(tot["whole"].tolist(), tot["kept"].tolist(), p)
        ]

    def zero(n: int, st: Stats, k: int) -> dict[str, torch.Tensor]:
        return {"whole": torch.zeros(k, dtype=torch.float64), "kept": torch.zeros(k, dtype=torch.float64)}

    return Pass(measure, finish, lambda p, g: bool(g["rescale"]) and _has_ranks(p, g), zero)


def _rank_setup(sp: Sparsifier) -> Pass:
    """Decides which order statistics the radix passes must find (no sweep)."""

    def finish(st: Stats, tot: dict, p: list[dict], g: dict, numel: int) -> None:
        st["ranks"] = {i: sp.ranks(q, numel) for i, q in enumerate(p) if q["density"] < 1}

    return Pass(None, finish, _has_ranks)


def _task_combine(sp: Sparsifier | None, consensus: bool) -> Callable[[Block, Stats], torch.Tensor]:
    def combine(b: Block, st: Stats) -> torch.Tensor:
        d = _sparsified(b, st, sp)
        scale = st.get("scale")
        if scale is not None:
            factors = torch.tensor([scale[i] for i in b.index], dtype=d.dtype).unsqueeze(1)
            d = d * factors
        w = torch.tensor([q["weight"] for q in b.p], dtype=d.dtype).unsqueeze(1)
        weighted = d * w
        if consensus:
            positive = weighted.sum(dim=0) >= 0
            agree = torch.where(positive, weighted > 0, weighted < 0)
            mixed = torch.where(agree, weighted, 0).sum(dim=0)
            divisor = (agree.to(w.dtype) * w).sum(dim=0)
            divisor[divisor == 0] = 1
        else:
            mixed = weighted.sum(dim=0)
            total = torch.tensor(b.weight_sum, dtype=d.dtype)  # every input's weight, as MergeKit
            divisor = 1.0 if abs(float(total)) < 1e-8 else total
        if b.g["normalize"]:
            mixed = mixed / divisor
        if b.g["lambda"] != 1:
            mixed = mixed * b.g["lambda"]
        return (b.base + mixed).to(b.base.dtype)

    return combine


def _check_density(p: list[dict], g: dict, name: str, numel: int) -> None:
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


WEIGHT = ParamDef("weight", None, float, True)
DENSITY = ParamDef("density", 1.0, float, True)
GAMMA = ParamDef("gamma", 0.01, float, True)
EPSILON = ParamDef("epsilon", 0.15, float, True)
LAMBDA = ParamDef("lambda", 1.0)


def _task_method(name: str, sp: Sparsifier | None, consensus: bool, normalize: bool,
                 rescale: bool, extra: tuple[ParamDef, ...] = ()) -> Method:
    passes: tuple[Pass, ...] = ()
    if sp is not None and sp.ranks is not None:
        passes = (_rank_setup(sp), *RADIX)
    if sp is not None:
        passes = (*passes, _l1_pass(sp))
    return register(Method(
        name, _task_combine(sp, consensus), base="required",
        model_params=(WEIGHT, DENSITY, *extra),
        global_params=(ParamDef("normalize", normalize, bool), ParamDef("rescale", rescale, bool),
                       LAMBDA, ParamDef("int8_mask", False, bool)),
        min_models=1, passes=passes, sparse_inputs=True, row_local=lambda g: sp is DELLA,
        check=_check_density, additive=sp is None and not consensus,
    ))


_task_method("task_arithmetic", None, False, False, False)
_task_method("ties", TOPK, True, True, False)
_task_method("dare_linear", DARE, False, False, True)
_task_method("dare_ties", DARE, True, False, True)
_task_method("breadcrumbs", CRUMBS, False, False, False, (GAMMA,))
_task_method("breadcrumbs_ties", CRUMBS, True, False, False, (GAMMA,))
_task_method("della", DELLA, True, True, True, (EPSILON,))
_task_method("della_linear", DELLA, False, False, True, (EPSILON,))


# ----------------------------------------------------------------------------------------------
# linear

def _linear(b: Block, st: Stats) -> torch.Tensor:
    work = torch.float64 if b.models.dtype == torch.float64 else torch.float32
    w = torch.tensor([q["weight"] for q in b.p], dtype=work).unsqueeze(1)
    acc = (b.models.to(work) * w).sum(dim=0)
    if b.g["normalize"]:
        acc = acc / w.sum()
    return acc.to(b.models.dtype)


def _check_linear(p: list[dict], g: dict, name: str, numel: int) -> None:
    # MergeKit divides by a zero weight sum and writes inf/NaN; refusing is the sensible answer.
    if g["normalize"] and abs(sum(q["weight"] for q in p)) < 1e-8:
        raise BadMerge(f"linear merge with normalize: the weights on {name} sum to zero")


register(Method(
    "linear", _linear, base="none", model_params=(WEIGHT,),
    global_params=(ParamDef("normalize", True, bool),), min_models=1,
    local_identity=lambda g, has_base: bool(g["normalize"]), check=_check_linear,
    equal_identity=lambda g: bool(g["normalize"]),
))


# ----------------------------------------------------------------------------------------------
# Angles: slerp, nuslerp, model_stock. A Gram pass sums the dot products the angle needs.

def _gram_pass(vectors: Callable[[Block], torch.Tensor],
               needed: Callable[[list[dict], dict], bool] = lambda p, g: True,
               of_deltas: bool = True) -> Pass:
    """Sums of all pairwise dot products of the given vectors over the whole tensor."""

    def measure(b: Block, st: Stats) -> dict[str, torch.Tensor]:
        v = vectors(b).to(torch.float64)
        return {"gram": v @ v.T}

    def finish(st: Stats, tot: dict, p: list[dict], g: dict, numel: int) -> None:
        st["gram"] = tot["gram"]

    def zero(n: int, st: Stats, k: int) -> dict[str, torch.Tensor]:
        return {"gram": torch.zeros(k, k, dtype=torch.float64)}

    return Pass(measure, finish, needed, zero if of_deltas else None)


def _slerp_vectors(b: Block) -> torch.Tensor:
    return torch.stack([b.base, b.models[0]])


def _slerp(b: Block, st: Stats) -> torch.Tensor:
    work = torch.float64 if b.base.dtype == torch.float64 else torch.float32
    a, m = b.base.to(work), b.models[0].to(work)
    t = b.g["t"]
    gram = st["gram"]
    na, nb = math.sqrt(gram[0, 0]), math.sqrt(gram[1, 1])
    na, nb = (na if na > 1e-8 else 1.0), (nb if nb > 1e-8 else 1.0)
    c = max(-1.0, min(1.0, float(gram[0, 1]) / (na * nb)))
    if abs(c) > 0.9995:  # nearly parallel: the angle is meaningless, interpolate linearly
        out = (1 - t) * a + t * m
    else:
        theta = math.acos(c)
        s = math.sin(theta)
        out = math.sin((1 - t) * theta) / s * a + math.sin(t * theta) / s * m
    return out.to(b.base.dtype)


register(Method(
    "slerp", _slerp, base="required", global_params=(ParamDef("t", None),),
    min_models=1, max_models=1, passes=(_gram_pass(_slerp_vectors, of_deltas=False),),
    local_identity=lambda g, has_base: False,
))


def _nuslerp_pair(b: Block) -> torch.Tensor:
    return b.models - b.base if b.base is not None else b.models


def _nuslerp_lines(g: dict) -> str:
    if g["nuslerp_flatten"]:
        return "tensor"
    return "columns" if g["nuslerp_row_wise"] else "rows"


def _column_gram(b: Block, st: Stats) -> dict[str, torch.Tensor]:
    if not st.get("columns") or b.ndim < 2:
        return {}
    u, v = (x.reshape(-1, b.row_len).to(torch.float64) for x in _nuslerp_pair(b))
    return {"uu": (u * u).sum(0), "vv": (v * v).sum(0), "uv": (u * v).sum(0)}


def _column_finish(st: Stats, tot: dict, p: list[dict], g: dict, numel: int) -> None:
    st.update(tot)


def _nuslerp_setup(st: Stats, tot: dict, p: list[dict], g: dict, numel: int) -> None:
    st["columns"] = _nuslerp_lines(g) == "columns"


def _slerp_lines(u: torch.Tensor, v: torch.Tensor, uu, vv, uv, t: float) -> torch.Tensor:
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


def _nuslerp(b: Block, st: Stats) -> torch.Tensor:
    w1, w2 = b.p[0]["weight"], b.p[1]["weight"]
    t = 0.5 if abs(w1 + w2) < 1e-6 else w2 / (w1 + w2)
    u, v = _nuslerp_pair(b)
    lines = _nuslerp_lines(b.g)
    if lines == "columns" and b.ndim < 2:
        lines = "rows"  # a 1-D tensor is a single line whichever way it is read (as MergeKit)
    if lines == "tensor":
        g = st["gram"]
        out = _slerp_lines(u, v, g[0, 0], g[1, 1], g[0, 1], t)
    elif lines == "rows":
        ur, vr = (x.reshape(-1, b.row_len) for x in (u, v))
        u64, v64 = ur.to(torch.float64), vr.to(torch.float64)
        out = _slerp_lines(ur, vr, (u64 * u64).sum(1, keepdim=True), (v64 * v64).sum(1, keepdim=True),
                           (u64 * v64).sum(1, keepdim=True), t).reshape(-1)
    else:
        ur, vr = (x.reshape(-1, b.row_len) for x in (u, v))
        out = _slerp_lines(ur, vr, st["uu"], st["vv"], st["uv"], t).reshape(-1)
    return (out + b.base if b.base is not None else out).to(b.models.dtype)


register(Method(
    "nuslerp", _nuslerp, base="optional", model_params=(WEIGHT,),
    global_params=(ParamDef("nuslerp_flatten", True, bool), ParamDef("nuslerp_row_wise", False, bool)),
    min_models=2, max_models=2,
    passes=(Pass(None, _nuslerp_setup),
            _gram_pass(_nuslerp_pair, lambda p, g: _nuslerp_lines(g) == "tensor"),
            Pass(_column_gram, _column_finish, lambda p, g: _nuslerp_lines(g) == "columns")),
    row_local=lambda g: _nuslerp_lines(g) != "tensor",
    local_identity=lambda g, has_base: has_base,
))


def _stock_t(gram: torch.Tensor) -> torch.Tensor:
    """model_stock's interpolation factor from the offsets' Gram matrix (batched over lines)."""
    n = gram.shape[-1]
    norms = torch.sqrt(torch.diagonal(gram, dim1=-2, dim2=-1))
    cos = gram / torch.clamp(norms.unsqueeze(-1) * norms.unsqueeze(-2), min=1e-6)
    cos = torch.clamp(cos, -1, 1)
    iu = torch.triu_indices(n, n, 1)
    c = cos[..., iu[0], iu[1]].mean(-1)
    den = 1 + (n - 1) * c
    return torch.where(den.abs() < 1e-6, torch.zeros_like(c), n * c / torch.where(den.abs() < 1e-6, 1, den))


def _model_stock(b: Block, st: Stats) -> torch.Tensor:
    if b.g["filter_wise"]:
        m = b.models.reshape(b.models.shape[0], -1, b.row_len)
        base = b.base.reshape(-1, b.row_len)
        o = (m - base).to(torch.float64).transpose(0, 1)  # [rows, K, len]
        t = _stock_t(o @ o.transpose(1, 2)).unsqueeze(1).to(b.base.dtype)  # [rows, 1]
        out = t * m.mean(0) + (1 - t) * base
        return out.reshape(-1).to(b.base.dtype)
    t = float(_stock_t(st["gram"]))
    return (t * b.models.mean(0) + (1 - t) * b.base).to(b.base.dtype)


register(Method(
    "model_stock", _model_stock, base="required",
    global_params=(ParamDef("filter_wise", False, bool),), min_models=2,
    passes=(_gram_pass(_deltas, lambda p, g: not g["filter_wise"]),),
    row_local=lambda g: bool(g["filter_wise"]),
))
