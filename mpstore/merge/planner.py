"""The planner: which expert chunks a budgeted merge reads, what the merge will cost, and how far
its result can be from the exact merge.

With K experts, expert reads dominate a merge. The planner decides them from the delta catalog
alone: every (expert, chunk) whose digest differs from the base's is a candidate read carrying
|weight|·||delta|| of update; chunks equal to the base are never candidates. A selector spends the
budget (greedy: most weighted delta per byte first); chunks left out are read as the base's, i.e.
a zero delta. The counts come from `outline.Accountant`, which walks the same `Outline` the
executor follows through the same `ReadAccount`, so the estimate is what execution then does.
The planner reads no chunk and writes nothing; it returns a Plan.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import xxhash

from ..errors import BadMerge
from ..store.env import Txn
from ..store.objects import Plan, bitmap
from . import catalog, methods
from .executor import omit, tasks
from .methods.base import MergeMethod
from .outline import Accountant, Task
from .request import Budget, check_memory_limit, parse_budget

__all__ = ["Budget", "parse_budget", "plan"]  # Budget and parse_budget live in request (no torch)

# Rough cost of executing on the 2-core reference machine, fitted to warm merges of the 250M
# family with K=8 (docs/benchmarks.md, "Budgeted merges"): seconds per unit of work (elements x
# inputs x sweeps, see Executor.account) and per tensor computed (catalog histograms, pass set-up).
# Only the plan's time estimate uses them; other methods are costed like ties.
SECONDS_PER_WORK = {"task_arithmetic": 3.0e-9, "ties": 4.8e-9}
SECONDS_PER_TENSOR = {"task_arithmetic": 0.75e-3, "ties": 5e-3}
MANTISSA = {"F64": 52, "F32": 23, "F16": 10, "BF16": 7, "F8_E4M3": 3, "F8_E5M2": 2}
FLOAT8 = {"F8_E4M3", "F8_E5M2"}  # stored, converted, never computed in: torch has no float8 arithmetic
SMALLEST = {"F64": 2.0 ** -1074, "F32": 2.0 ** -149, "F16": 2.0 ** -24, "BF16": 2.0 ** -133,
            "F8_E4M3": 2.0 ** -9, "F8_E5M2": 2.0 ** -16}  # spacing below the normal range


@dataclass(frozen=True)
class Read:
    """One candidate read: chunk `chunk` of input `input` of tensor `tensor`."""

    tensor: str
    input: int
    chunk: int
    digest: bytes
    nbytes: int
    value: float  # |weight| * ||delta||: the update it carries


Selector = Callable[[list[Read], int], set[int]]


def distinct_bytes(reads: list[Read], ks: Iterable[int]) -> int:
    """Bytes of the chosen reads, a chunk read by several experts (one digest) counted once."""
    return sum({reads[k].digest: reads[k].nbytes for k in ks}.values())


def take_in_order(reads: list[Read], order: list[int], limit: int) -> set[int]:
    """The candidates of `order` (indices into `reads`) taken in that order, each while it still
    fits in `limit` bytes; a chunk already taken (the same digest in another expert) costs nothing
    more. Every selector is an order plus this rule, so they all keep the budget the same way."""
    chosen: set[int] = set()
    digests: set[bytes] = set()
    spent = 0
    for k in order:
        r = reads[k]
        if r.digest in digests:
            chosen.add(k)
        elif spent + r.nbytes <= limit:
            chosen.add(k)
            digests.add(r.digest)
            spent += r.nbytes
    return chosen


def greedy(reads: list[Read], limit: int) -> set[int]:
    """Most weighted delta per byte first: optimal for additive methods up to the last chunk.
    A NaN delta (an expert holding NaN) ranks as infinite: first, and a total order to sort by."""
    def key(k: int) -> float:
        v = reads[k].value
        return -(math.inf if math.isnan(v) else v) / reads[k].nbytes

    return take_in_order(reads, sorted(range(len(reads)), key=key), limit)


def position_hash(reads: list[Read], limit: int) -> set[int]:
    """Uniform random selection, as the seed paper's code does it: chunks are picked by a hash
    of their position (the same positions in every expert), blind to what they hold."""
    def h(r: Read) -> int:
        return xxhash.xxh3_64_intdigest(f"{r.tensor}/{r.chunk}".encode())

    return take_in_order(reads, sorted(range(len(reads)), key=lambda k: h(reads[k])), limit)


SELECTORS: dict[str, Selector] = {"greedy": greedy, "random": position_hash}


Entries = dict[tuple[str, int, int], catalog.DeltaStats | None]  # (tensor, input, chunk) -> entry


def candidates(txn: Txn, todo: list[Task], need_catalog: bool) -> tuple[list[Read], Entries]:
    """Every expert chunk that differs from the base's, with its catalog entry (if any); without
    a base, every input chunk."""
    reads: list[Read] = []
    stats: Entries = {}
    for task in todo:
        if task.copy is not None:
            continue
        for i, t in enumerate(task.stored):
            if task.base is None:  # no base (linear): every chunk of every input is read
                reads.extend(Read(task.name, i, c, e, t.chunk_len(c), 0.0) for c, e in enumerate(t.chunks))
                continue
            if t.chunks == task.base.chunks:
                continue
            for c, (e, b) in enumerate(zip(t.chunks, task.base.chunks)):
                if e == b:
                    continue
                st = catalog.lookup(txn, e, b, t.dtype)
                if st is None and need_catalog:
                    raise BadMerge(
                        f"input {i + 1} has no delta catalog entries against the base for {task.name!r}: "
                        "run `mp analyze REF --base BASE` (or add it with --base)")
                stats[(task.name, i, c)] = st
                value = abs(task.p[i].get("weight", 1.0)) * st.l2 if st is not None else 0.0
                reads.append(Read(task.name, i, c, e, t.chunk_len(c), value))
    return reads, stats


def plan(txn: Txn, base_plan: Plan, budget: Budget | None, select: str | Selector,
         memory_limit: int) -> Plan:
    """`base_plan` with the reads a budget allows and the estimate of what execution will do.

    Refuses, before anything runs, a memory limit outside 1 byte .. MAX_SIZE and a tensor to be
    computed in float8 (a plan without a compute dtype computes each tensor in its own dtype, and
    torch has no float8 arithmetic): such a merge needs `dtype` (the CLI's default is float32).
    Float8 is refused rather than quietly widened because a plan has one compute dtype for all
    tensors, and choosing float32 for the whole model would also change its output dtype."""
    check_memory_limit(memory_limit)
    method = methods.get(base_plan.method)
    todo = tasks(txn, base_plan, method)
    for task in todo:
        if task.copy is None and task.compute in FLOAT8:
            raise BadMerge(f"{task.name!r} is {task.compute} and float8 arithmetic is not implemented: "
                           "set a compute dtype (YAML `dtype: float32`, or --dtype; the output is then "
                           "float32 unless out_dtype says otherwise)")
    if budget is not None and (not method.sparse_inputs or base_plan.base is None):
        takes = ", ".join(m.name for m in methods.METHODS if m.sparse_inputs)
        raise BadMerge(f"--budget needs a method that merges deltas from a base ({takes}); "
                       f"{method.name} reads whole models")
    reads, stats = candidates(txn, todo, budget is not None)
    total = distinct_bytes(reads, range(len(reads)))
    chosen = set(range(len(reads)))
    p = base_plan
    selector = SELECTORS.get(select) if isinstance(select, str) else select
    if selector is None:
        raise BadMerge(f"unknown chunk selection {select!r} (known: {', '.join(SELECTORS)})")
    if budget is not None:
        limit = budget.limit(total)
        name = select if isinstance(select, str) else getattr(select, "__name__", "custom")
        chosen = _checked(selector(reads, limit), reads, limit)
        left: dict[str, dict[int, set[int]]] = {}
        for k, r in enumerate(reads):
            if k not in chosen:
                left.setdefault(r.tensor, {}).setdefault(r.input, set()).add(r.chunk)
        omitted: dict[str, list[bytes | None]] = {}
        for task in todo:
            if task.name in left:
                omitted[task.name] = [bitmap(left[task.name][i], len(t.chunks)) if i in left[task.name] else None
                                      for i, t in enumerate(task.stored)]
        p = replace(p, omit=omitted or None, budget={"spec": budget.spec, "bytes": limit, "select": name})
    if p.omit:
        todo = [omit(t, p.omit.get(t.name)) for t in todo]  # the reads the executor will see
    accountant = Accountant(txn, memory_limit)
    for task in todo:
        accountant.account(task, method)
    counted, work = accountant.realized, accountant.work
    touched: dict[str, list[int]] = {}
    for k, r in enumerate(reads):
        row = touched.setdefault(r.tensor, [0, 0])
        row[0] += r.nbytes if k in chosen else 0
        row[1] += r.nbytes
    bound: float | None
    exact: float | None
    if not p.omit:
        bound, exact = 0.0, 0.0  # nothing left out: the exact merge
    else:
        bound, exact = _bound(todo, reads, chosen, stats) if method.additive else (None, None)
    estimate = {
        "base_bytes": counted.base_bytes,
        "bound": bound,
        "bound_covers": _covers(method, p),
        "bound_exact": exact,
        "chunks_omitted": counted.chunks_omitted,
        "expert_bytes": counted.expert_bytes,
        "expert_total": total,
        "output_bytes": counted.output_bytes,
        "read_bytes": counted.read_bytes,
        "seconds": round(work * SECONDS_PER_WORK.get(method.name, SECONDS_PER_WORK["ties"])
                         + (len(todo) - counted.tensors_copied)
                         * SECONDS_PER_TENSOR.get(method.name, SECONDS_PER_TENSOR["ties"]), 2),
        "tensors": dict(sorted(touched.items())),
    }
    return replace(p, estimate=estimate)


def _checked(chosen: set[int], reads: list[Read], limit: int) -> set[int]:
    """A selector's choice must name candidates and fit the budget: the budget is a promise."""
    if any(not 0 <= k < len(reads) for k in chosen):
        raise BadMerge("the chunk selector chose reads that are not candidates")
    spent = distinct_bytes(reads, chosen)
    if spent > limit:
        raise BadMerge(f"the chunk selector chose {spent} bytes of reads for a budget of {limit}")
    return chosen


def _bound(todo: list[Task], reads: list[Read], chosen: set[int], stats: Entries) -> tuple[float, float]:
    """An upper bound on ||budgeted - exact|| over all tensors, and the part of it that is the
    merge arithmetic alone (without rounding).

    For an additive method the difference at a chunk is s * the sum of the omitted weighted
    deltas there (s = |lambda| / the normalising weight sum), so by the triangle inequality its
    norm is at most a_c = s * sum |w_i| ||delta_ic||; chunks are disjoint, so norms add in squares
    across chunks. Both merges are rounded: to the output dtype once (half a spacing each, and a
    spacing is at most 2^-m |x| for m mantissa bits), and at each of K+2 steps in the compute
    dtype. So each chunk can differ by r_c = (2^-m_out + (K+2) 2^-m_compute) * N_c more, where
    N_c = ||base_c|| + s * sum over all inputs |w_i| ||delta_ic|| bounds both results' norms
    there, plus one smallest spacing per element for values below the normal range."""
    by_task = {t.name: t for t in todo}
    at: dict[tuple[str, int], list[int]] = {}
    for k, r in enumerate(reads):
        at.setdefault((r.tensor, r.chunk), []).append(k)
    total, arith = 0.0, 0.0
    for (name, c), ks in at.items():
        if all(k in chosen for k in ks):
            continue
        task = by_task[name]
        wsum = sum(q.get("weight", 0.0) for q in task.p)
        div = abs(wsum) if task.g.get("normalize") and abs(wsum) >= 1e-8 else 1.0
        s = abs(task.g.get("lambda", 1.0)) / div
        a = s * sum(reads[k].value for k in ks if k not in chosen)  # value: |w_i| * ||delta_ic||
        entry = stats[(name, reads[ks[0]].input, c)]
        assert task.base is not None and entry is not None  # a budget needs both (`plan`, `candidates`)
        norm = entry.base_l2 + s * sum(reads[k].value for k in ks)
        relative = 2.0 ** -MANTISSA[task.out] + (len(task.models) + 2) * 2.0 ** -MANTISSA[task.compute]
        tiny = math.sqrt(catalog.elements(task.base, c)) * SMALLEST[task.out]
        total += (a + relative * norm + tiny) ** 2
        arith += a ** 2
    # a NaN delta left out (an expert holding NaN) leaves no finite bound: say inf, not NaN
    bound, exact = math.sqrt(total), math.sqrt(arith)
    return (math.inf if math.isnan(bound) else bound), (math.inf if math.isnan(exact) else exact)


def _covers(method: MergeMethod, p: Plan) -> str:
    if not p.omit:
        return "everything: no chunk is left out, the result is the exact merge"
    if method.additive:
        return "the whole difference from the exact merge, output rounding included"
    return (f"nothing: {method.name} sparsifies or elects signs over whole tensors, so leaving "
            "chunks out also changes what the read chunks contribute")

