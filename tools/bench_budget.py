#!/usr/bin/env python3
"""Benchmark budgeted merges (`mp merge --budget`) on a generated model family.

What it measures, with K experts merged onto the base (task_arithmetic and ties; weight 1/K for
every expert, ties density 0.5; float32 compute, bfloat16 out, as tools/bench_merge.py):

  * for each method, budget (2, 5, 10, 20, 50, 100 % of the expert bytes that differ from the
    base) and chunk selector:
      greedy   the planner's: most |w|·‖delta‖ per byte first, from the delta catalog;
      random   the planner's uniform selection: chunks ordered by a hash of their position, as
               the seed paper's code does (no rescaling in mp; see the rescaled column below);
      offline  an oracle computed here, not by mpstore: the base and every expert are read in
               full from their safetensors files, ‖delta‖ in float32 is summed per (expert,
               chunk) (chunk = the repository's chunk size of one tensor's bytes), and chunks
               are taken by |w|·‖delta‖ per byte, a chunk shared by experts counted once
               (mpstore.merge.planner.take_in_order), i.e. the best chunk-level greedy choice at those bytes;
    the expert bytes read (the plan's estimate and the realized count), the wall time of
    Repo.merge (plan + execute + commit), and the deviation of the budgeted merge A from the
    exact merge E, ‖A−E‖ / ‖E−base‖ over all tensors in float32 (A, E from `checkout`), beside
    the L2 bound on ‖A−E‖ that the plan printed (additive methods only);
  * the exact merge (no budget) of each method, at the start and the end of its sweep: the
    baseline of wall time and the E of every deviation;
  * expert bytes vs K = 2..K at a fixed budget (10 %): the planner's estimates for every K (mp
    exact = the bytes that differ from the base; budgeted) beside MergeKit's K × model size, and
    realized merges for one K as a check;
  * I/O composition at K experts (base read, expert read, output written) for mp (realized
    counts) and MergeKit (which reads every model in full); both are also measured by the OS, as
    the block I/O of one run with the inputs' pages dropped from the page cache first
    (posix_fadvise DONTNEED on the family files, resp. the store's data file; wait4's
    ru_inblock/ru_oublock, which count mmap faults too, and /proc/PID/io sampled while it runs);
  * the one-time cost of the catalog analysis: `mp add` of an expert into a fresh repository
    holding only the base, without --base (no analysis) vs with --base (analysis), interleaved,
    median of --add-repeat runs, one expert of each kind; and AddResult.analyzed of the in-process
    adds that build the benchmark's repository.

Conventions are tools/bench_store.py's (helpers imported from it and tools/bench_merge.py): wall
clock, page cache not dropped except for the OS I/O check, sources read once before timing, an
untimed `sync` before every timed command. After each merge its branch is deleted and `gc`
(expire now) frees its chunks, so every merge writes its output into the same store state.
Other processes may be running: compare the ratios, not the absolute times.

Usage (from the repository root, with the venv's python):
  python tools/bench_budget.py [--work bench/store] [--out results.md] [--plot-prefix docs/bench_budget]
      [--quick] [--budgets 2,5,10,20,50,100] [--repeat 1] [--add-repeat 3] [--mergekit PATH] [--keep]
"""

from __future__ import annotations

import argparse
import math
import os
import pickle
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_merge as bm  # noqa: E402  (same folder: MergeKit configs and lookup, tensor maps)
import bench_store as bs  # noqa: E402  (run(), family(), compare(), machine facts, formatting)
from bench_store import MP, ROOT, b, log, rm, table, warm  # noqa: E402

GIB = 1 << 30
METHODS = ("task_arithmetic", "ties")
SHORT = {"task_arithmetic": "ta", "ties": "ties"}
BUDGETS = (2, 5, 10, 20, 50, 100)
QUICK_BUDGETS = (5, 20, 100)
SELECTS = ("greedy", "random", "offline")
K_BUDGET = "10%"
ORACLE_TOL = 1.10  # target: greedy's deviation within 10 % of the offline greedy's
FAR = 2.0  # "far below random" read as: random's deviation at least 2× greedy's
RHO_MIN = 0.9  # "wall time falls with expert bytes" read as: Spearman rank correlation ≥ 0.9
IO_POLL_S = 0.05


# ------------------------------------------------------------------------------ requests


def request(method: str, k: int):
    """Experts 1..k onto the base: the same parameters as bench_merge's YAML (weight 1/K)."""
    from mpstore.merge.request import MergeRequest

    params = [{"weight": round(1 / k, 6), **({"density": bm.DENSITY} if method == "ties" else {})}
              for _ in range(k)]
    return MergeRequest(method, "base", [f"expert-{i}" for i in range(1, k + 1)], params, {}, "F32", "BF16")


def weights(req) -> list[float]:
    return [q["weight"] for q in req.model_params]


# ------------------------------------------------------------------------------ the offline oracle


def per_chunk(x, per: int, op: str) -> list:
    """`op` ("sum" or "any") of a flat tensor over consecutive runs of `per` elements."""
    import torch

    n = x.numel()
    full = n // per
    parts = []
    if full:
        parts.append(getattr(x[: full * per].view(full, per), op)(1))
    if n > full * per:
        parts.append(getattr(x[full * per:], op)().reshape(1))
    return torch.cat(parts).tolist() if parts else []


class Oracle:
    """‖delta‖ of every (expert, tensor, chunk), measured from the safetensors files in full.

    The deltas are formed in float32 (expert − base, both widened from their stored dtype) and
    their squares summed in float64, per chunk of `chunk_size` bytes of the tensor's data: the
    chunks the store cuts. Nothing comes from mpstore's catalog; `check` records how the catalog's
    values (Read.value / |w|) compare, as a by-product."""

    def __init__(self, base: Path, experts: list[Path], chunk_size: int):
        self.base, self.experts, self.chunk_size = base, experts, chunk_size
        self.l2: dict[tuple[int, str, int], float] = {}  # (expert index from 0, tensor, chunk) -> ‖delta‖
        self.nbytes: dict[tuple[int, str, int], int] = {}  # the same keys: the chunk's bytes
        self.differ = [0] * len(experts)  # per expert: bytes of chunks whose bytes differ from the base's
        self.bytes_read = 0
        self.seconds = 0.0
        self.check = {"reads": 0, "missing": 0, "max_rel": 0.0}

    def measure(self) -> None:
        import torch
        from safetensors import safe_open

        ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
        t0 = time.perf_counter()
        base_map = bm.safetensors_map(self.base)
        maps = [bm.safetensors_map(e) for e in self.experts]
        with ExitStack() as stack:
            handles: dict[Path, object] = {}

            def get(path: Path, name: str) -> torch.Tensor:
                if path not in handles:
                    handles[path] = stack.enter_context(safe_open(str(path), framework="pt"))
                return handles[path].get_tensor(name).reshape(-1)

            for name, path in base_map.items():
                bt = get(path, name)
                if not bt.is_floating_point():
                    continue
                isz = bt.element_size()
                per = self.chunk_size // isz
                bf = bt.float()
                bbits = bt.view(ints[isz])
                self.bytes_read += bt.numel() * isz
                for i, m in enumerate(maps):
                    if name not in m:
                        raise SystemExit(f"offline oracle: {name} missing from {self.experts[i]}")
                    et = get(m[name], name)
                    self.bytes_read += et.numel() * isz
                    sums = per_chunk((et.float() - bf).double().square(), per, "sum")
                    differs = per_chunk(et.view(ints[isz]) != bbits, per, "any")
                    for c, (s, d) in enumerate(zip(sums, differs)):
                        if d:
                            n = min(self.chunk_size, bt.numel() * isz - c * self.chunk_size)
                            self.l2[(i, name, c)] = math.sqrt(s)
                            self.nbytes[(i, name, c)] = n
                            self.differ[i] += n
        self.seconds = time.perf_counter() - t0

    def selector(self, ws: list[float]):
        """A planner selector: most |w|·‖delta‖ per byte first, by this oracle's own values."""
        from mpstore.merge.planner import take_in_order

        def offline(reads, limit: int) -> set[int]:
            score = []
            for r in reads:
                key = (r.input, r.tensor, r.chunk)
                l2 = self.l2.get(key)
                self.check["reads"] += 1
                if l2 is None:  # the planner proposes a chunk whose bytes equal the base's
                    self.check["missing"] += 1
                    l2 = 0.0
                v = abs(ws[r.input]) * l2
                if r.value or v:
                    self.check["max_rel"] = max(self.check["max_rel"], abs(v - r.value) / max(abs(v), abs(r.value)))
                score.append(v / r.nbytes)
            return take_in_order(reads, sorted(range(len(reads)), key=lambda k: -score[k]), limit)

        return offline


# ------------------------------------------------------------------------------ deviation


def deviation(a_dir: Path, e_dir: Path, base_dir: Path, keep: float | None = None) -> dict:
    """‖A−E‖ and ‖E−base‖ over all tensors, in float32 (squares summed in float64), tensor by
    tensor. With `keep`, also ‖base + (A−base)/keep − E‖: A's delta rescaled by one keep ratio,
    as the seed paper's random selection does (computed from A's bf16 output)."""
    import torch
    from safetensors import safe_open

    maps = [bm.safetensors_map(d) for d in (a_dir, e_dir, base_dir)]
    out = {"num": 0.0, "den": 0.0, "rescaled": 0.0, "identical": True, "tensors": 0}
    with ExitStack() as stack:
        handles: dict[Path, object] = {}

        def get(m: dict, name: str) -> torch.Tensor:
            p = m[name]
            if p not in handles:
                handles[p] = stack.enter_context(safe_open(str(p), framework="pt"))
            return handles[p].get_tensor(name)

        for name in maps[1]:
            ra, re, rb = (get(m, name) for m in maps)
            out["identical"] &= bool(torch.equal(ra, re))
            a, e, base = ra.float(), re.float(), rb.float()
            out["num"] += float(torch.sum(torch.square(a - e), dtype=torch.float64))
            out["den"] += float(torch.sum(torch.square(e - base), dtype=torch.float64))
            if keep:
                out["rescaled"] += float(torch.sum(torch.square((a - base) / keep + (base - e)), dtype=torch.float64))
            out["tensors"] += 1
    out["abs"], out["norm"] = math.sqrt(out["num"]), math.sqrt(out["den"])
    out["rel"] = out["abs"] / out["norm"] if out["norm"] else 0.0
    out["rescaled_rel"] = math.sqrt(out["rescaled"]) / out["norm"] if keep and out["norm"] else None
    return out


# ------------------------------------------------------------------------------ OS-level I/O


@dataclass
class IoRun:
    seconds: float
    storage_read: int  # ru_inblock × 512: block reads of the command and its children (mmap faults included)
    storage_write: int  # ru_oublock × 512: pages it dirtied
    rchar: int  # /proc/PID/io of the main process, last sample: bytes passed to read()-like calls
    wchar: int
    maxrss: int


def run_io(cmd: list[str]) -> IoRun:
    """Run `cmd`, sampling its /proc/PID/io; block I/O from wait4's rusage."""
    last: dict[str, int] = {}
    stop = threading.Event()

    def poll(pid: int) -> None:
        while True:
            try:
                with open(f"/proc/{pid}/io") as f:
                    sample = {k: int(v) for k, _, v in (line.partition(": ") for line in f.read().splitlines())}
                if sample:
                    last.update(sample)
            except (OSError, ValueError):
                return
            if stop.wait(IO_POLL_S):
                return

    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        th = threading.Thread(target=poll, args=(p.pid,), daemon=True)
        th.start()
        _, status, usage = os.wait4(p.pid, 0)
        seconds = time.perf_counter() - t0
        stop.set()
        th.join()
        p.returncode = os.waitstatus_to_exitcode(status)
        if p.returncode:
            err.seek(0)
            raise SystemExit(f"command failed ({p.returncode}): {shlex.join(cmd)}\n{err.read().decode(errors='replace')}")
    return IoRun(seconds, usage.ru_inblock * 512, usage.ru_oublock * 512, last.get("rchar", 0),
                 last.get("wchar", 0), usage.ru_maxrss * 1024)


def self_io() -> dict[str, int]:
    with open("/proc/self/io") as f:
        return {k: int(v) for k, _, v in (line.partition(": ") for line in f.read().splitlines())}


def run_self_io(fn) -> IoRun:
    """Call fn() in this process: its block I/O (every thread's) from getrusage, rchar/wchar from
    /proc/self/io, both as differences."""
    import resource

    ru0, io0 = resource.getrusage(resource.RUSAGE_SELF), self_io()
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    ru1, io1 = resource.getrusage(resource.RUSAGE_SELF), self_io()
    return IoRun(seconds, (ru1.ru_inblock - ru0.ru_inblock) * 512, (ru1.ru_oublock - ru0.ru_oublock) * 512,
                 io1["rchar"] - io0["rchar"], io1["wchar"] - io0["wchar"], ru1.ru_maxrss * 1024)


def files_under(paths: list[Path]) -> list[Path]:
    out = []
    for root in paths:
        out += sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    return out


def readahead_kb(path: Path) -> str:
    """The read-ahead window of the block device holding `path` (what an mmap fault reads around)."""
    dev = os.stat(path).st_dev
    base = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    for p in (base / "queue" / "read_ahead_kb", base / ".." / "queue" / "read_ahead_kb"):
        try:
            return p.read_text().strip()
        except OSError:
            continue
    return "?"


def drop_cache(paths: list[Path]) -> int | None:
    """Sync, then ask the kernel to drop these files' pages from the page cache; returns the bytes
    still resident (fincore), or None when fincore is missing."""
    os.sync()
    files = files_under(paths)
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    try:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", *map(str, files)],
                             capture_output=True, text=True, check=True).stdout
        return sum(int(x) for x in out.split())
    except (OSError, subprocess.CalledProcessError, ValueError):
        return None


# ------------------------------------------------------------------------------ the benchmark


@dataclass
class Case:
    method: str
    k: int
    budget: str | None  # "10%", or None: the exact merge
    select: str
    wall: list[float] = field(default_factory=list)  # Repo.merge, every run
    est: dict = field(default_factory=dict)
    realized: dict = field(default_factory=dict)
    new_bytes: int = 0  # output bytes the merge added to the store
    dev: dict | None = None
    plan_budget: dict | None = None  # the plan's budget record: spec, bytes (limit), select

    @property
    def seconds(self) -> float:
        return statistics.median(self.wall)

    @property
    def pct(self) -> float:
        return 100.0 if self.budget is None else float(self.budget.rstrip("%"))


def mpstore_state() -> str:
    """HEAD and a digest of the uncommitted changes under mpstore/: what `mp` would run now."""
    import hashlib

    git = ["git", "-C", str(ROOT)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          check=False).stdout.strip()
    diff = subprocess.run([*git, "diff", "HEAD", "--", "mpstore"], capture_output=True, check=False).stdout
    return head + (f"+{hashlib.sha1(diff).hexdigest()[:8]}" if diff else "")


def same_code(a: str, b: str) -> bool:
    """Whether two mpstore_state() values name the same mpstore/: equal digests of uncommitted
    changes, and no difference under mpstore/ between the two HEADs (commits that touch only
    other files, made while the benchmark runs, leave the code it measures as it was)."""
    if a == b:
        return True
    (ha, _, da), (hb, _, db) = a.partition("+"), b.partition("+")
    if da != db or not ha or not hb:
        return False
    diff = subprocess.run(["git", "-C", str(ROOT), "diff", "--quiet", ha, hb, "--", "mpstore"], check=False)
    return diff.returncode == 0


def spearman(xs: list[float], ys: list[float]) -> float:
    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for t in range(i, j + 1):
                r[order[t]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.mean(rx), statistics.mean(ry)
    num = sum((a - mx) * (c - my) for a, c in zip(rx, ry))
    den = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((c - my) ** 2 for c in ry))
    return num / den if den else float("nan")


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path, models: list[Path], mergekit: str | None):
        self.args, self.work, self.models, self.mergekit = args, work, models, mergekit
        self.base = models[0]
        self.K = len(models) - 1
        self.tmp = work / "tmp-budget"
        self.repo_dir = self.tmp / "repo"
        self.repo = None
        self.adds: list[tuple[str, float, object]] = []  # in-process: name, seconds, AddResult
        self.add_cli: dict[str, dict[str, bs.Timing]] = {}
        self.cases: list[Case] = []
        self.exact: dict[str, list[Case]] = {}
        self.ksweep: list[dict] = []
        self.kchecks: list[Case] = []
        self.io: dict[str, object] = {}
        self.gc_seconds: list[float] = []
        self.oracle: Oracle | None = None
        self.code: list[str] = []  # mpstore's state (HEAD + uncommitted digest) at start and end

    # setup ------------------------------------------------------------------------------
    def time_adds(self) -> None:
        """CLI `mp add` of one expert of each kind into a fresh repository holding only the base:
        without --base (no catalog) vs with --base (catalog analysis), interleaved."""
        template = self.tmp / "add-template"
        bs.run([MP, "-C", str(template), "--quiet", "init"])
        bs.run([MP, "-C", str(template), "--quiet", "add", str(self.base), "--name", "base"])
        fresh = self.tmp / "add-fresh"
        seen: set[str] = set()
        for m in self.models[1:]:
            kind = bs.model_kind(m)
            if kind in seen:
                continue
            seen.add(kind)

            def variant(extra: list[str], m: Path = m) -> tuple:
                def prepare(i: int) -> list[str]:
                    rm(fresh)
                    subprocess.run(["cp", "-r", "--sparse=always", str(template), str(fresh)], check=True)
                    return [MP, "-C", str(fresh), "--quiet", "add", str(m), "--name", m.name, *extra]

                return prepare, lambda i: rm(fresh), False

            log(f"`mp add` {m.name} ({kind}) without / with --base")
            self.add_cli[m.name] = bs.compare({"add": variant([]), "add --base": variant(["--base", "base"])},
                                              self.args.add_repeat)
        rm(template)

    def build(self) -> None:
        """The benchmark's repository: base, then every expert with base='base' (in-process)."""
        from mpstore import Repo

        rm(self.repo_dir)
        self.repo = Repo.init(self.repo_dir)
        for m in self.models:
            os.sync()
            t0 = time.perf_counter()
            res = self.repo.add(m, m.name, base=None if m == self.base else "base")
            self.adds.append((m.name, time.perf_counter() - t0, res))
            a = res.analyzed
            log(f"  add {m.name}: {self.adds[-1][1]:.2f} s" + (
                f", catalog {a.pairs} pairs in {a.seconds:.2f} s" if a else ""))

    def free(self, branch: str) -> None:
        t0 = time.perf_counter()
        self.repo.delete_branch(branch)
        self.repo.gc("now")
        self.gc_seconds.append(time.perf_counter() - t0)

    # merges -----------------------------------------------------------------------------
    def merge(self, method: str, k: int, budget: str | None, select: str, e_dir: Path | None = None,
              keep_out: Path | None = None, repeat: int = 1) -> Case:
        """Repo.merge, timed; with e_dir, the deviation of its output from that exact merge;
        with keep_out, its output is checked out there and kept."""
        req = request(method, k)
        sel = self.oracle.selector(weights(req)) if select == "offline" else (select if budget else "greedy")
        c = Case(method, k, budget, select)
        label = f"{method} K={k} {budget or 'exact'} {select if budget else ''}".rstrip()
        for i in range(repeat):
            branch = f"bb-{SHORT[method]}-k{k}-{(budget or 'exact').rstrip('%')}-{select}-{i}"
            os.sync()
            t0 = time.perf_counter()
            res = self.repo.merge(req, branch, budget=budget, select=sel)
            c.wall.append(time.perf_counter() - t0)
            if i == 0:
                c.est, c.realized = dict(res.plan.estimate), dict(res.realized)
                c.est.pop("tensors", None)
                c.plan_budget = res.plan.budget
                c.new_bytes = self.repo.commit(branch).commit.new_bytes
                out = keep_out
                if out is None and e_dir is not None:
                    out = self.tmp / "co-A"
                if out is not None:
                    rm(out)
                    self.repo.checkout(branch, out)
                    if e_dir is not None:
                        keep = None
                        if select == "random" and method == "task_arithmetic" and budget and c.est["expert_total"]:
                            keep = c.est["expert_bytes"] / c.est["expert_total"]
                        c.dev = deviation(out, e_dir, self.base, keep)
                    if keep_out is None:
                        rm(out)
            self.free(branch)
            dev = f", deviation {c.dev['rel']:.4g}" if c.dev and i == 0 else ""
            bound = c.est.get("bound")
            log(f"  {label}: {c.wall[-1]:.2f} s, experts {b(c.realized['expert_bytes'])}"
                f"{dev}" + (f", bound {bound / c.dev['norm']:.4g}" if c.dev and bound is not None and c.dev["norm"] else ""))
        return c

    def sweep(self) -> None:
        budgets = [f"{x:g}%" for x in self.args.budgets]
        for method in METHODS:
            e_dir = self.tmp / f"exact-{method}"
            log(f"{method}: exact merge (E)")
            first = self.merge(method, self.K, None, "exact", keep_out=e_dir, repeat=self.args.repeat)
            for n, budget in enumerate(budgets):
                order = SELECTS[n % len(SELECTS):] + SELECTS[: n % len(SELECTS)]
                for sel in order:
                    rep = self.args.repeat if sel == "greedy" else 1
                    self.cases.append(self.merge(method, self.K, budget, sel, e_dir=e_dir, repeat=rep))
            log(f"{method}: exact merge again (time, and that it is E bit for bit)")
            last = self.merge(method, self.K, None, "exact", e_dir=e_dir, repeat=self.args.repeat)
            self.exact[method] = [first, last]
            rm(e_dir)

    def k_sweep(self) -> None:
        """Planner estimates for K = 2..K (exact and 10 % greedy); realized merges at one K."""
        for method in METHODS:
            for k in range(2, self.K + 1):
                req = request(method, k)
                exact = self.repo.plan(req).estimate
                budgeted = self.repo.plan(req, budget=K_BUDGET).estimate
                self.ksweep.append({"method": method, "k": k, "exact": exact, "budget": budgeted})
        k = max(2, (self.K + 1) // 2)
        for method in METHODS:
            log(f"K sweep: realized check at K={k}, {method}, {K_BUDGET} greedy")
            self.kchecks.append(self.merge(method, k, K_BUDGET, "greedy"))

    # OS-level I/O -----------------------------------------------------------------------
    def cold_io(self) -> None:
        """mp merges (exact and budgeted) and one MergeKit merge with their inputs dropped from the
        page cache first: read and write bytes as the kernel counts them. mp runs in this process
        (the code loaded at start; its block I/O from getrusage before and after), reopening the
        repository after the drop so that no page of the store is mapped; MergeKit as a command."""
        from mpstore import Repo

        experts = self.models[1:]
        method = self.args.io_method
        data = self.repo_dir / ".mp" / "data.mdb"
        req = request(method, self.K)

        def cold(label: str, fn) -> None:
            self.repo.close()
            self.repo = None
            resident = drop_cache([data])
            log(f"cold {label} (store resident after drop: {'?' if resident is None else b(resident)})")

            def run() -> None:
                self.repo = Repo.open(self.repo_dir)
                fn()

            r = run_self_io(run)
            self.io[label] = {"run": r, "resident": resident}
            log(f"  {r.seconds:.1f} s, storage read {b(r.storage_read)}")

        cold("mp plan", lambda: self.repo.plan(req, budget=K_BUDGET))
        for budget in (None, K_BUDGET):
            branch = f"cold-{SHORT[method]}-{(budget or 'exact').rstrip('%')}"
            label = f"mp {budget or 'exact'}"
            cold(label, lambda branch=branch, budget=budget: self.repo.merge(req, branch, budget=budget))
            self.io[label]["stats"] = self.repo.commit(branch).commit.stats
            self.free(branch)
        if self.mergekit:
            cfg = self.tmp / f"{method}-mk.yml"
            cfg.write_text(bm.config(method, str(self.base), [str(e) for e in experts], bm.DENSITY))
            out = self.tmp / "mk-out"
            rm(out)
            bs.run([self.mergekit, "--help"])  # its imports warm: only the models are cold
            resident = drop_cache(self.models)
            log(f"cold MergeKit {method} K={self.K} (family resident after drop: "
                f"{'?' if resident is None else b(resident)})")
            r = run_io([self.mergekit, str(cfg), str(out), "--no-copy-tokenizer", "--no-write-model-card",
                        "--quiet"])
            self.io["mergekit"] = {"run": r, "out_bytes": bs.folder_bytes(out), "resident": resident}
            log(f"  {r.seconds:.1f} s, storage read {b(r.storage_read)}, rchar {b(r.rchar)}")
            rm(out)
            warm(self.models)

    # the run ----------------------------------------------------------------------------
    def go(self) -> None:
        # Every mpstore module the run uses, imported now: the merges run the code loaded at start
        # even if the working tree changes meanwhile (and torch's import is outside every timing).
        import mpstore.merge.catalog  # noqa: F401
        import mpstore.merge.executor  # noqa: F401
        import mpstore.merge.planner  # noqa: F401
        import mpstore.merge.request  # noqa: F401
        import mpstore.model.checkout  # noqa: F401
        import mpstore.repo  # noqa: F401
        import mpstore.store.gc  # noqa: F401

        self.code = [mpstore_state()]

        rm(self.tmp)
        self.tmp.mkdir(parents=True)
        log("warming the page cache with the family's files")
        warm(self.models)
        if self.args.add_repeat:
            self.time_adds()
        log("building the repository: base, then every expert with --base (in-process)")
        self.build()
        warm([self.repo_dir / ".mp" / "data.mdb"])
        log("offline oracle: reading the base and every expert in full")
        self.oracle = Oracle(self.base, self.models[1:], self.repo.chunk_size)
        self.oracle.measure()
        log(f"  {b(self.oracle.bytes_read)} in {self.oracle.seconds:.1f} s")
        log("warm-up merge (untimed)")
        self.merge("task_arithmetic", 1, "2%", "greedy")
        self.sweep()
        self.k_sweep()
        if not self.args.no_io:
            self.cold_io()
        self.code.append(mpstore_state())


# ------------------------------------------------------------------------------ report


def gib(n: float) -> str:
    return f"{n / GIB:.3f}"


def rel(x: float | None) -> str:
    return "-" if x is None else ("0" if x == 0 else f"{x:.4g}")


def agree(c: Case) -> str:
    keys = ("expert_bytes", "base_bytes", "read_bytes", "output_bytes", "chunks_omitted")
    bad = [k for k in keys if c.est.get(k) != c.realized.get(k)]
    return "exact" if not bad else "differ: " + ", ".join(
        f"{k} {c.est.get(k)} vs {c.realized.get(k)}" for k in bad)


def find(cases: list[Case], method: str, budget: str, select: str) -> Case | None:
    return next((c for c in cases if (c.method, c.budget, c.select) == (method, budget, select)), None)


def plots(bench: Bench, prefix: str, title: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    colors = {"greedy": "tab:blue", "random": "tab:red", "offline": "tab:green"}
    marks = {"greedy": "o-", "random": "s--", "offline": "^:"}
    # deviation and wall time ---------------------------------------------------------------
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    for col, method in enumerate(METHODS):
        ax = axes[0][col]
        for sel in SELECTS:
            cs = [c for c in bench.cases if c.method == method and c.select == sel and c.dev and c.dev["rel"] > 0]
            hollow = {"markerfacecolor": "none", "markersize": 10} if sel == "offline" else {}
            ax.plot([c.realized["expert_bytes"] / GIB for c in cs], [c.dev["rel"] for c in cs], marks[sel],
                    color=colors[sel], label=f"{sel}: measured ‖A−E‖ / ‖E−base‖", **hollow)
            if method == "task_arithmetic":
                ax.plot([c.realized["expert_bytes"] / GIB for c in cs], [c.est["bound"] / c.dev["norm"] for c in cs],
                        marks[sel][0] + "-", color=colors[sel], alpha=0.35, label=f"{sel}: plan's bound / ‖E−base‖")
            if sel == "random" and cs:
                ax.plot([c.realized["expert_bytes"] / GIB for c in cs],
                        [math.sqrt(1 - c.realized["expert_bytes"] / c.est["expert_total"]) for c in cs], "-",
                        color="tab:gray", alpha=0.6, label="selection blind to values: expected √(1 − share)")
            rs = [c for c in cs if c.dev.get("rescaled_rel") is not None]
            if rs:
                ax.plot([c.realized["expert_bytes"] / GIB for c in rs], [c.dev["rescaled_rel"] for c in rs], "x:",
                        color="tab:purple", label="random, delta rescaled by 1/keep (paper)")
        ax.set_yscale("log")
        ax.set_xscale("log")
        ax.set_xlabel("expert bytes read (GiB, log)")
        ax.set_ylabel("deviation from the exact merge (relative)")
        ax.set_title(method, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        ax = axes[1][col]
        for sel in SELECTS:
            cs = sorted((c for c in bench.cases if c.method == method and c.select == sel),
                        key=lambda c: c.realized["expert_bytes"])
            ax.plot([c.realized["expert_bytes"] / GIB for c in cs], [c.seconds for c in cs], marks[sel],
                    color=colors[sel], label=f"{sel} (budgets)")
        ex = bench.exact[method]
        ax.plot([ex[0].realized["expert_bytes"] / GIB] * len(ex), [c.seconds for c in ex], "kD",
                label="exact merge (start, end)")
        ax.set_xlabel("expert bytes read (GiB)")
        ax.set_ylabel("Repo.merge wall time (s)")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = f"{prefix}_deviation.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    # expert bytes vs K ---------------------------------------------------------------------
    size = bs.folder_bytes(bench.base)
    fig, ax = plt.subplots(figsize=(9, 5))
    ks = sorted({r["k"] for r in bench.ksweep})
    ax.plot(ks, [k * size / GIB for k in ks], "s--", color="tab:gray", label="MergeKit: K × model size")
    ta = [r for r in bench.ksweep if r["method"] == "task_arithmetic"]
    ax.plot(ks, [r["exact"]["expert_bytes"] / GIB for r in ta], "o-", color="tab:orange",
            label="mp exact: expert bytes that differ from the base")
    for method, col in (("task_arithmetic", "tab:blue"), ("ties", "tab:cyan")):
        rows = [r for r in bench.ksweep if r["method"] == method]
        ax.plot(ks, [r["budget"]["expert_bytes"] / GIB for r in rows], "o-", color=col,
                label=f"mp --budget {K_BUDGET} (plan), {method}")
    for c in bench.kchecks + [c for c in bench.cases if c.budget == K_BUDGET and c.select == "greedy"]:
        ax.plot([c.k], [c.realized["expert_bytes"] / GIB], "k+", markersize=12)
    ax.plot([], [], "k+", label="realized merges")
    kinds = [bs.model_kind(m) for m in bench.models[1:]]
    ax.set_xticks(ks, [f"{k}\n+{kinds[k - 1]}" for k in ks])
    ax.set_xlabel("K (experts merged; the kind of the expert added at each K)")
    ax.set_ylabel("expert bytes read (GiB)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = f"{prefix}_k.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    # I/O composition -----------------------------------------------------------------------
    rows = io_rows(bench)
    fig, ax = plt.subplots(figsize=(10, 0.55 * len(rows) + 1.6))
    labels = [r[0] for r in rows][::-1]
    parts = [("base read", "tab:gray"), ("expert read", "tab:blue"), ("output written", "tab:orange")]
    left = [0.0] * len(rows)
    for j, (name, col) in enumerate(parts):
        vals = [r[1 + j] / GIB for r in rows][::-1]
        ax.barh(labels, vals, left=left, color=col, label=name)
        left = [x + v for x, v in zip(left, vals)]
    cold = {"MergeKit (every model in full)": "mergekit", f"mp {bench.args.io_method} exact": "mp exact",
            f"mp {bench.args.io_method} --budget {K_BUDGET}": f"mp {K_BUDGET}"}
    pts = [(bench.io[cold[r[0]]]["run"].storage_read / GIB, r[0]) for r in rows if cold.get(r[0]) in bench.io]
    if pts:
        ax.plot([x for x, _ in pts], [y for _, y in pts], "kD", label="OS: storage read, cold page cache")
    ax.set_xlabel("GiB")
    ax.set_title(f"I/O composition, K={bench.K}: " + title, fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    path = f"{prefix}_io.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written


def io_rows(bench: Bench) -> list[tuple[str, int, int, int]]:
    """(label, base read, expert read, output written) at K = bench.K."""
    size = bs.folder_bytes(bench.base)
    weights_bytes = sum(p.stat().st_size for p in bench.base.glob("*.safetensors"))
    rows = [("MergeKit (every model in full)", weights_bytes, bench.K * weights_bytes, weights_bytes)]
    del size
    for method in METHODS:
        ex = bench.exact[method][0]
        rows.append((f"mp {method} exact", ex.realized["base_bytes"], ex.realized["expert_bytes"], ex.new_bytes))
        for pct in ("10%", "2%"):
            c = find(bench.cases, method, pct, "greedy")
            if c:
                rows.append((f"mp {method} --budget {pct}", c.realized["base_bytes"], c.realized["expert_bytes"],
                             c.new_bytes))
    return rows


def report(args: argparse.Namespace, bench: Bench, meta: dict, written: list[str]) -> str:
    K = bench.K
    budgets = [f"{x:g}%" for x in args.budgets]
    size = bs.folder_bytes(bench.base)
    md: list[str] = []
    kinds = ", ".join(f"{m.name}={bs.model_kind(m)}" for m in bench.models[1:])
    params, took, load = meta["params"], meta["took"], meta["load"]
    md += [
        "# mpstore budgeted-merge benchmark\n",
        f"Reproduce: `{meta['repro']}`\n",
        ((f"mpstore: {bench.code[0]} (HEAD, + digest of uncommitted changes under mpstore/, if any) for every "
         "in-process merge" + ("." if bench.code[0] == bench.code[-1] else
                               f"; HEAD moved to {bench.code[-1]} during the run by commits that leave mpstore/ "
                               "unchanged.")
         if bench.code and same_code(bench.code[0], bench.code[-1]) else
         f"**mpstore changed during the run**: {bench.code[0]} at start, {bench.code[-1]} at the end (HEAD + "
         "digest of uncommitted changes). Every merge, plan and checkout ran in this process with the code "
         "loaded at start; only the CLI add timings ran `mp` from the working tree as it was then.")
        + "\n"),
        (f"Family: `tools/make_family.py --params {params} --experts {K} --dtype bf16` ({kinds}); base folder "
        f"{b(size)}. Merges: experts 1..{K} onto the base, weight 1/K each, ties density {bm.DENSITY}, compute "
        f"float32, out bfloat16; in-process `Repo.merge` (default threads {os.cpu_count()}, memory limit 1 GiB) "
        f"on one repository holding every model (experts added with base `base`, so their delta catalog exists); "
        "after each merge its branch is deleted and `gc` (expire now) frees its chunks. Wall time: the "
        f"`Repo.merge` call (plan + execute + commit with fsync){', median of ' + str(args.repeat) + ' runs for greedy and exact' if args.repeat > 1 else ', one run each'}. "
        "Deviation: ‖A−E‖ / ‖E−base‖ over all tensors, A the budgeted merge and E the exact one, both checked "
        "out and compared tensor by tensor in float32 (squares summed in float64). Bound: the plan's "
        "`estimate.bound` (absolute L2 on ‖A−E‖; additive methods only), shown relative to ‖E−base‖. "
        f"Budgets are shares of the expert bytes that differ from the base. Load average at start {load[0]}, "
        f"at end {load[1]} (other processes may have been running: timings are noisy). The whole benchmark "
        f"took {took:.0f} s.\n"),
    ]
    # targets ---------------------------------------------------------------------------------
    trows = []
    for method in METHODS:
        worst, where = 0.0, "-"
        for bud in budgets:
            g, o = find(bench.cases, method, bud, "greedy"), find(bench.cases, method, bud, "offline")
            if not (g and o and g.dev and o.dev):
                continue
            r = (g.dev["rel"] / o.dev["rel"]) if o.dev["rel"] else (1.0 if g.dev["rel"] == 0 else math.inf)
            if r > worst:
                worst, where = r, bud
        trows.append([f"{method}: greedy deviation ≤ {ORACLE_TOL:g} × offline greedy's, every budget",
                      f"worst ratio {worst:.4f} (at {where})", "met" if worst <= ORACLE_TOL else "NOT met"])
    for method in METHODS:
        ratios = []
        for bud in budgets:
            g, r = find(bench.cases, method, bud, "greedy"), find(bench.cases, method, bud, "random")
            if g and r and g.dev and r.dev and r.dev["rel"] > 0:
                ratios.append((bud, r.dev["rel"] / g.dev["rel"] if g.dev["rel"] else math.inf))
        low = min(ratios, key=lambda x: x[1]) if ratios else ("-", float("nan"))
        shown = ", ".join(f"{bud}: {x:.1f}×" if math.isfinite(x) else f"{bud}: ∞" for bud, x in ratios)
        trows.append([f"{method}: greedy far below random (random / greedy deviation ≥ {FAR:g}×, budgets < 100%)",
                      shown or "-", "met" if ratios and low[1] >= FAR else "NOT met"])
    viol = []
    checked = 0
    tight = []
    for c in bench.cases:
        if c.method == "task_arithmetic" and c.dev and c.est.get("bound") is not None:
            checked += 1
            if c.est["bound"] < c.dev["abs"]:
                viol.append(f"{c.budget} {c.select}: bound {c.est['bound']:.4g} < {c.dev['abs']:.4g}")
            elif c.dev["abs"] > 0:
                tight.append(c.est["bound"] / c.dev["abs"])
    trows.append(["task_arithmetic: the plan's bound ≥ measured ‖A−E‖, every budget and selector",
                  f"{checked - len(viol)} of {checked} hold; bound / measured {min(tight):.2f}–{max(tight):.2f}"
                  if tight else f"{checked - len(viol)} of {checked} hold",
                  "met" if not viol else "NOT met: " + "; ".join(viol)])
    for method in METHODS:
        gs = [c for c in bench.cases if c.method == method and c.select == "greedy"] + bench.exact[method]
        rho = spearman([c.realized["expert_bytes"] for c in gs], [c.seconds for c in gs])
        lo = min((c for c in gs if c.budget), key=lambda c: c.pct)
        ex = statistics.median(c.seconds for c in bench.exact[method])
        trows.append([f"{method}: wall time falls with expert bytes (greedy budgets + exact; Spearman ρ ≥ {RHO_MIN:g})",
                      f"ρ = {rho:.2f}; {lo.budget}: {lo.seconds:.2f} s = {lo.seconds / ex:.2f}× exact ({ex:.2f} s)",
                      "met" if rho >= RHO_MIN else "NOT met"])
    allc = bench.cases + bench.kchecks + [c for v in bench.exact.values() for c in v]
    bad = [c for c in allc if agree(c) != "exact"]
    trows.append(["estimate = realized (expert, base, all reads, output bytes, chunks left out), every merge",
                  f"{len(allc) - len(bad)} of {len(allc)} agree exactly", "met" if not bad else "NOT met"])
    for method in METHODS:
        e0, e1 = bench.exact[method]
        hundred = find(bench.cases, method, "100%", "greedy")
        ok = e1.dev is not None and e1.dev["identical"] and (hundred is None or hundred.dev["identical"])
        trows.append([f"{method}: budget 100% and a second exact merge equal the exact merge bit for bit",
                      "yes" if ok else "no", "met" if ok else "NOT met"])
    md += ["## Targets\n", table(["target (issue; how it is read here)", "measured", "status"], trows) + "\n"]
    if written:
        md.append("Plots: " + ", ".join(f"`{p}`" for p in written) + ".\n")
    # sweep tables ----------------------------------------------------------------------------
    for method in METHODS:
        ex = bench.exact[method]
        exs = statistics.median(c.seconds for c in ex)
        e0 = ex[0]
        md.append(f"## {method}, K={K}: budget sweep\n")
        md.append(f"Exact merge: {b(e0.realized['expert_bytes'])} of experts ({b(e0.est['expert_total'])} differ "
                  f"from the base), {b(e0.realized['base_bytes'])} of base, wall "
                  f"{', '.join(f'{c.seconds:.2f}' for c in ex)} s (start, end; the baseline {exs:.2f} s); "
                  f"‖E−base‖ = {bench.exact[method][1].dev['norm']:.6g}.\n" if ex[1].dev else "\n")
        rows = []
        for bud in budgets:
            for sel in SELECTS:
                c = find(bench.cases, method, bud, sel)
                if c is None:
                    continue
                o = find(bench.cases, method, bud, "offline")
                g = find(bench.cases, method, bud, "greedy")
                bound = c.est.get("bound")
                rows.append([
                    bud, sel, b(c.plan_budget["bytes"]) if c.plan_budget else "-",
                    b(c.realized["expert_bytes"]),
                    f"{100 * c.realized['expert_bytes'] / c.est['expert_total']:.1f}%" if c.est["expert_total"] else "-",
                    ", ".join(f"{w:.2f}" for w in c.wall), f"{c.seconds / exs:.2f}",
                    rel(c.dev["rel"]),
                    "-" if bound is None else rel(bound / c.dev["norm"]),
                    "-" if c.est.get("bound_exact") is None else rel(c.est["bound_exact"] / c.dev["norm"]),
                    "-" if bound is None or not c.dev["abs"] else f"{bound / c.dev['abs']:.2f}",
                    "-" if not (o and o.dev["rel"]) else f"{c.dev['rel'] / o.dev['rel']:.4f}",
                    "-" if not (g and g.dev["rel"]) or sel != "random" else f"{c.dev['rel'] / g.dev['rel']:.1f}",
                    rel(c.dev.get("rescaled_rel")), agree(c),
                ])
        md.append(table(["budget", "select", "limit", "expert bytes read", "of differing", "wall (s)",
                         "wall / exact", "deviation", "bound (rel)", "bound w/o rounding (rel)", "bound / measured", "dev / offline's",
                         "random / greedy", "random rescaled 1/keep", "estimate vs realized"], rows) + "\n")
        detail = []
        for c in [ex[0]] + [find(bench.cases, method, bud, "greedy") for bud in budgets] + [ex[1]]:
            if c is None:
                continue
            r, s = c.realized, c.realized.get("seconds", {})
            detail.append([c.budget or "exact", b(r["base_bytes"]), b(r["expert_bytes"]), b(r["read_bytes"]),
                           b(r["output_bytes"]), b(c.new_bytes), str(r["chunks_omitted"]), str(r["chunks_skipped"]),
                           f"{c.est['seconds']:.2f}", f"{c.seconds:.2f}",
                           ", ".join(f"{k} {v:.2f}" for k, v in s.items())])
        md.append("Greedy merges in detail (realized counts; `est. s` is the plan's rough time estimate):\n")
        md.append(table(["budget", "base read", "experts read", "all reads", "output computed", "output new in store",
                         "chunks left out", "chunks skipped", "est. s", "wall s", "phases (s)"], detail) + "\n")
    conc = concentration(bench, budgets)
    if conc:
        md.append(conc)
    # calibration ------------------------------------------------------------------------------
    md.append(calibration(bench))
    # K sweep ---------------------------------------------------------------------------------
    kinds_list = [bs.model_kind(m) for m in bench.models[1:]]
    weights_bytes = sum(p.stat().st_size for p in bench.base.glob("*.safetensors"))
    krows = []
    ta = {r["k"]: r for r in bench.ksweep if r["method"] == "task_arithmetic"}
    ti = {r["k"]: r for r in bench.ksweep if r["method"] == "ties"}
    for k in sorted(ta):
        differ = sum(bench.oracle.differ[:k])
        krows.append([str(k), kinds_list[k - 1], gib(k * weights_bytes), gib(ta[k]["exact"]["expert_total"]),
                      gib(differ), gib(ta[k]["exact"]["expert_bytes"]), gib(ta[k]["budget"]["expert_bytes"]),
                      gib(ti[k]["budget"]["expert_bytes"]),
                      f"{ta[k]['budget']['expert_bytes'] / (k * weights_bytes):.3f}"])
    md.append(f"## Expert bytes read vs K (budget {K_BUDGET}, greedy)\n")
    md.append("Planner estimates (`Repo.plan`) for experts 1..K; `differing (files)` is computed here from the "
              "safetensors files (chunks whose bytes differ from the base's), as a check of the planner's "
              "`expert_total`. MergeKit reads every expert in full: K × the weights file.\n")
    md.append(table(["K", "expert K's kind", "MergeKit K × model (GiB)", "mp differing: expert_total (GiB)",
                     "differing (files) (GiB)", "mp exact reads (GiB)", f"mp {K_BUDGET} task_arithmetic (GiB)",
                     f"mp {K_BUDGET} ties (GiB)", f"{K_BUDGET} / MergeKit"], krows) + "\n")
    chk = []
    for c in bench.kchecks + [find(bench.cases, m, K_BUDGET, "greedy") for m in METHODS]:
        if c is None:
            continue
        chk.append([c.method, str(c.k), b(c.est["expert_bytes"]), b(c.realized["expert_bytes"]), agree(c),
                    f"{c.seconds:.2f}"])
    md.append("Realized merges at the budget (estimate vs realized):\n")
    md.append(table(["method", "K", "estimated expert bytes", "realized", "estimate vs realized", "wall (s)"], chk) + "\n")
    # I/O composition -------------------------------------------------------------------------
    md.append(f"## I/O composition, K={K}\n")
    irows = [[label, b(x), b(y), b(z), b(x + y)] for label, x, y, z in io_rows(bench)]
    md.append("mp: realized counts of distinct chunks read (`base_bytes`, `expert_bytes`) and the output bytes the "
              "merge added to the store (chunks equal to the base's are reused, not written). MergeKit: analytic, "
              "every model's weights file read in full and a full model written (checked by the OS measurement "
              "below).\n")
    md.append(table(["run", "base read", "expert read", "output written", "input read"], irows) + "\n")
    if bench.io:
        orows = []
        for label, v in bench.io.items():
            r: IoRun = v["run"]
            if label == "mp plan":
                orows.append([f"mp plan {args.io_method} --budget {K_BUDGET} (control: no chunk read)",
                              b(v["resident"] or 0), b(r.storage_read), b(r.rchar), "0 B", "-", b(r.storage_write),
                              "-", f"{r.seconds:.1f}"])
            elif label == "mergekit":
                want = (K + 1) * weights_bytes
                orows.append([f"MergeKit {args.io_method}", b(v["resident"] or 0), b(r.storage_read), b(r.rchar), b(want),
                              f"{r.storage_read / want:.3f}", b(r.storage_write), b(v["out_bytes"]), f"{r.seconds:.1f}"])
            else:
                st = v["stats"]
                want = st["base_bytes"] + st["expert_bytes"]
                orows.append([f"mp {args.io_method} {label[3:]}", b(v["resident"] or 0), b(r.storage_read), b(r.rchar),
                              b(want), f"{r.storage_read / want:.3f}" if want else "-", b(r.storage_write),
                              b(st["output_bytes"]), f"{r.seconds:.1f}"])
        md.append("Measured by the OS, one cold run each: the inputs' pages dropped from the page cache first "
                  "(`posix_fadvise(DONTNEED)` after `sync`: the family's files for MergeKit, the store's data.mdb "
                  "for mp; `resident` is what `fincore` still saw). mp runs in this process (the repository "
                  "closed before the drop and opened again inside the measurement; `Repo.plan` / `Repo.merge` "
                  "as above): block reads and dirtied pages are getrusage(RUSAGE_SELF) ru_inblock / ru_oublock "
                  "differences. MergeKit runs as `mergekit-yaml` (its imports warmed by a `--help` run first): "
                  "wait4's ru_inblock / ru_oublock. Both count mmap page faults and readahead; rchar (from "
                  "/proc/PID/io) counts read() calls only, and both tools mmap their inputs. `expected` = (K+1) "
                  "× weights file for MergeKit, the realized base + expert bytes for mp; the `mp plan` row "
                  "reads only the store's metadata and catalog. A cold page fault in an mmap reads the device's "
                  f"read-ahead window around it ({meta['readahead_kb']} KiB here, "
                  "`/sys/dev/block/…/queue/read_ahead_kb`); mp keeps LMDB's read-ahead on (a page fault reads "
                  "that window), so a budgeted merge of scattered chunks reads more from a cold disk than it "
                  "uses. Wall times of cold runs are not comparable with the rest.\n")
        md.append(table(["run", "resident after drop", "storage read", "rchar", "expected", "read / expected",
                         "storage written", "output", "wall (s)"], orows) + "\n")
    # analysis cost -------------------------------------------------------------------------------
    md.append("## Analysis (delta catalog): a one-time cost per model\n")
    arows = []
    for name, secs, res in bench.adds:
        a = res.analyzed
        arows.append([name, bs.model_kind(bench.models[[m.name for m in bench.models].index(name)]), f"{secs:.2f}",
                      "-" if a is None else str(a.pairs), "-" if a is None else b(a.bytes_read),
                      "-" if a is None else f"{a.seconds:.2f}",
                      "-" if a is None else f"{100 * a.seconds / secs:.0f}%"])
    md.append("In-process `Repo.add` of each model into the benchmark's repository (one run each; experts with "
              "base `base`): `analyzed` is AddResult.analyzed.\n")
    md.append(table(["model", "kind", "add (s)", "differing chunk pairs", "analysis read", "analysis (s)",
                     "analysis / add"], arows) + "\n")
    if bench.add_cli:
        crows = []
        for name, t in bench.add_cli.items():
            m = bench.models[[x.name for x in bench.models].index(name)]
            plain, based = t["add"], t["add --base"]
            crows.append([name, bs.model_kind(m), plain.text(), based.text(), f"{based.median - plain.median:.2f}",
                          f"{based.median / plain.median:.2f}×"])
        md.append(f"CLI `mp -C REPO --quiet add EXPERT --name N [--base base]` into a fresh copy of a repository "
                  f"holding only the base, interleaved, median of {args.add_repeat} (min in parentheses):\n")
        md.append(table(["expert", "kind", "mp add", "mp add --base", "difference (s)", "ratio"], crows) + "\n")
    o = bench.oracle
    md.append(f"The offline oracle read {b(o.bytes_read)} (the base and {K} experts in full) in {o.seconds:.1f} s "
              f"to rank {len(o.l2)} differing (expert, chunk) pairs; its ‖delta‖ agree with the catalog's "
              f"(Read.value / |w|) to a relative {o.check['max_rel']:.2g} at most over {o.check['reads']} reads "
              f"offered to it, {o.check['missing']} of which were chunks whose bytes equal the base's. "
              f"gc after each merge took {statistics.median(bench.gc_seconds):.2f} s (median, untimed).\n")
    return "\n".join(md)


def concentration(bench: Bench, budgets: list[str]) -> str:
    """How much of the weighted delta's energy the best chunks hold, from the oracle's own values:
    what any chunk-level selection can reach, and what a selection blind to the values reaches on
    average. With the experts' deltas at one position uncorrelated, leaving out chunks of energy
    share s gives a deviation of about sqrt(s), so greedy's is about sqrt(1 − top share) and
    uniform random's about sqrt(1 − p)."""
    o = bench.oracle
    if not getattr(o, "nbytes", None):
        return ""
    w = 1 / bench.K
    items = sorted(((w * l2) ** 2, o.nbytes[k]) for k, l2 in o.l2.items())
    items.sort(key=lambda x: -x[0] / x[1])
    energy = sum(e for e, _ in items)
    total = sum(n for _, n in items)
    rows = []
    for bud in budgets:
        p = float(bud.rstrip("%")) / 100
        if p >= 1:
            continue
        limit, spent, got = math.floor(p * total), 0, 0.0
        for e, n in items:
            if spent + n <= limit:
                spent += n
                got += e
        share = got / energy if energy else 0.0
        g = find(bench.cases, "task_arithmetic", bud, "greedy")
        r = find(bench.cases, "task_arithmetic", bud, "random")
        pred, blind = math.sqrt(max(0.0, 1 - share)), math.sqrt(1 - p)
        rows.append([bud, f"{100 * share:.1f}%", f"{pred:.4f}", rel(g.dev["rel"]) if g else "-",
                     f"{blind:.4f}", rel(r.dev["rel"]) if r else "-", f"{blind / pred:.2f}" if pred else "∞"])
    return ("## Where the delta's energy is (task_arithmetic, from the offline oracle)\n\n"
            "Share of Σ (w·‖Δ‖)² over all differing (expert, chunk) pairs held by the chunks the offline "
            "greedy takes at each budget, the deviation that predicts (sqrt(1 − share), deltas of different "
            "experts at one position taken as uncorrelated), beside the measured greedy one; and the deviation "
            "a selection blind to the values reaches on average (sqrt(1 − p)), beside the one draw of "
            "`--select random` measured. Their ratio is the random / greedy ratio any chunk-level selection can "
            "expect on this family.\n\n"
            + table(["budget", "energy in the best chunks", "predicted greedy deviation", "measured greedy",
                     "expected random deviation", "measured random", "expected random / best"], rows) + "\n")


def calibration(bench: Bench) -> str:
    """The plan's time estimate against the measured times, over every merge of each method: the
    factor by which the estimate would have to be scaled on this machine (median, range)."""
    rows = []
    for method in METHODS:
        cs = [c for c in bench.cases if c.method == method] + bench.exact[method]
        cs = [c for c in cs if c.est.get("seconds")]
        if not cs:
            continue
        wall = [c.seconds / c.est["seconds"] for c in cs]
        ex = [c.realized["seconds"]["execute"] / c.est["seconds"] for c in cs]
        rows.append([method, str(len(cs)), f"{statistics.median(wall):.2f}", f"{min(wall):.2f}–{max(wall):.2f}",
                     f"{statistics.median(ex):.2f}", f"{min(ex):.2f}–{max(ex):.2f}"])
    return ("## The plan's time estimate\n\n"
            "Measured time / `estimate.seconds` over every merge of the sweep (all budgets and selectors, and "
            "the exact merges): 1 is a perfect estimate. Wall = the `Repo.merge` call; execute = its execute "
            "phase (realized `seconds.execute`).\n\n"
            + table(["method", "merges", "wall / estimate (median)", "range", "execute / estimate (median)",
                     "range"], rows) + "\n")


# ------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="bench/store", help="work folder: family and scratch repos (default ./bench/store)")
    ap.add_argument("--out", help="also write the markdown (plus machine facts) here")
    ap.add_argument("--plot-prefix", help="write PREFIX_deviation.png, PREFIX_k.png, PREFIX_io.png")
    ap.add_argument("--results", help="also pickle the raw results here (for --from-results)")
    ap.add_argument("--from-results", metavar="FILE", help="measure nothing: report and plot the results pickled "
                                                          "by an earlier run's --results")
    ap.add_argument("--params", default="250M", help="family size (make_family --params)")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--budgets", default=",".join(map(str, BUDGETS)), help="budgets in %% (comma-separated)")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each greedy and exact merge (median)")
    ap.add_argument("--add-repeat", type=int, default=3, help="runs of each CLI add timing (0: skip)")
    ap.add_argument("--io-method", default="task_arithmetic", choices=METHODS,
                    help="method of the cold OS-level I/O runs (MergeKit's ties takes minutes)")
    ap.add_argument("--no-io", action="store_true", help="skip the cold OS-level I/O runs (and MergeKit)")
    ap.add_argument("--quick", action="store_true", help="small family (20M params, 3 experts), budgets 5,20,100")
    ap.add_argument("--mergekit", help="mergekit-yaml to run (default: .venv-mergekit/bin, else /tmp/mkvenv/bin)")
    ap.add_argument("--keep", action="store_true", help="keep WORK/tmp-budget")
    args = ap.parse_args(argv)
    if args.from_results:
        with open(args.from_results, "rb") as f:
            saved = pickle.load(f)
        bench, meta = saved["bench"], saved["meta"]
    else:
        bench, meta = measure(args)
        if args.results:
            with open(args.results, "wb") as f:
                pickle.dump({"bench": bench, "meta": meta}, f)
            log(f"wrote {args.results}")
    written = []
    if args.plot_prefix:
        written = plots(bench, args.plot_prefix, f"budgeted merges, {meta['params']} bf16 family, K={bench.K}, "
                                                 "f32 compute, bf16 out")
        log(f"wrote {', '.join(written)}")
    md = report(bench.args, bench, meta, written) + "\n" + meta["facts"] + "\n"
    print(md)
    if args.out:
        Path(args.out).write_text(md)
        log(f"wrote {args.out}")


def measure(args: argparse.Namespace) -> tuple[Bench, dict]:
    if not Path(MP).exists():
        raise SystemExit(f"{MP} not found: run with the venv's python (pip install -e . first)")
    params, experts = ("20M", 3) if args.quick else (args.params, args.experts)
    args.budgets = [float(x) for x in (QUICK_BUDGETS if args.quick else args.budgets.split(","))]
    if args.quick:
        args.add_repeat = min(args.add_repeat, 1)
    mergekit = None
    if not args.no_io:
        mergekit = bm.find_mergekit(args.mergekit)
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
    work = Path(args.work).absolute()
    work.mkdir(parents=True, exist_ok=True)
    _, models = bs.family(work, params, experts)
    bench = Bench(args, work, models, mergekit)
    load0 = " ".join(f"{x:.2f}" for x in os.getloadavg())
    t0 = time.perf_counter()
    try:
        bench.go()
    finally:
        if bench.repo is not None:
            bench.repo.close()
            bench.repo = None
        if not args.keep:
            rm(bench.tmp)
    took = time.perf_counter() - t0
    load1 = " ".join(f"{x:.2f}" for x in os.getloadavg())
    log(f"benchmark took {took:.0f} s")
    facts = bs.machine_facts(work).rstrip("\n")
    if mergekit:
        facts += "\n" + "\n".join(f"- {k}: {v}" for k, v in bm.versions(mergekit))
    repro = shlex.join([os.path.relpath(sys.executable), os.path.relpath(__file__), *sys.argv[1:]])
    return bench, {"params": params, "took": took, "load": (load0, load1), "facts": facts,
                   "repro": f"cd {shlex.quote(os.getcwd())} && {repro}", "readahead_kb": readahead_kb(work)}


if __name__ == "__main__":
    main()
