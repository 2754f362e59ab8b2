#!/usr/bin/env python3
"""Benchmark merges on a cold page cache: disk bytes read against the plan's bytes, and wall time.

What it measures, on a copy of a repository holding `base` and experts e1..e8 (added with
`--base base`, so the delta catalog is there), for a ties merge of the K experts (weight 1/K,
density 0.5, float32 compute, bfloat16 out, as tools/bench_budget.py):

  * the 10 % budget merge and the exact merge (`Repo.merge`, plan + execute + commit), each with
    the store cold: `sync`, then posix_fadvise DONTNEED on the store's data file inside the
    measuring process, after its imports (the store's pages only: `echo 3 >
    /proc/sys/vm/drop_caches` would also evict the files of whoever else is measuring on this
    machine, and make the program's own libraries cold); fincore checks that nothing of the file
    stayed resident. Measured: the bytes the process read from the disk (/proc/self/io
    `read_bytes`, every thread's, page faults and read-ahead included), of them those of the
    planning phase (up to the executor's first progress report: plan and prepare), over the
    merge's planned bytes (its base + expert bytes, realized = estimated), and the wall time;
  * the budgeted merge again with the prefetch disabled (`MP_PREFETCH=0`): the read path as it was
    before the prefetcher, for the A/B; and with the map's read-ahead off for the whole
    `Repo.merge` ("plan too": the planner's catalog reads as well), which the executor alone
    cannot do (the exact merge does not prefetch: the kernel's read-ahead serves its reads);
  * warm merges (the data file read once before), 10 % and exact, with and without prefetch: the
    prefetch must not slow a warm merge.

Every measurement runs in a fresh process (`--child`), so no page of the store is mapped before
it starts; the merge's branch is deleted and gc'd after each run (not timed), so every run sees
the same store. Rounds interleave the variants; the report gives medians, and ratios within one
round. Other processes may be running: compare the ratios, not the absolute times.

Usage (from the repository root, with the venv's python):
  python tools/bench_cold.py [--source /tmp/b12/repo0] [--work /tmp/s3] [--rounds 3] [--out results.md]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20
K = 8
BUDGET = "10%"


def request():
    from mpstore.merge.request import MergeRequest

    params = [{"weight": round(1 / K, 6), "density": 0.5} for _ in range(K)]
    return MergeRequest("ties", "base", [f"e{i}" for i in range(1, K + 1)], params, {}, "F32", "BF16")


def io_read_bytes() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes:"))


class _Phase:
    """A Progress that notes the bytes read when the merge starts computing (after its plan)."""

    def __init__(self) -> None:
        self.at_start: int | None = None

    def start(self, label: str, total: int) -> None:
        if self.at_start is None:
            self.at_start = io_read_bytes()

    def advance(self, n: int) -> None:
        pass

    def finish(self) -> None:
        pass


def child(repo_dir: Path, budget: str | None, cold: bool, whole: bool) -> dict:
    """One merge in this process; its numbers as JSON on stdout."""
    import torch  # noqa: F401  (imported before the measurement: its pages are not the store's)

    from mpstore import Repo

    req = request()
    data = repo_dir / ".mp" / "data.mdb"
    resident = None
    if cold:
        fd = os.open(data, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        resident = int(subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(data)],
                                      capture_output=True, text=True, check=True).stdout)
    phase = _Phase()
    r0 = io_read_bytes()
    t0 = time.perf_counter()
    repo = Repo.open(repo_dir)
    with repo.store.no_read_ahead() if whole else nullcontext():
        res = repo.merge(req, "cold", budget=budget, progress=phase)
    wall = time.perf_counter() - t0
    r1 = io_read_bytes()
    repo.delete_branch("cold")
    repo.gc("now")
    repo.close()
    real = res.realized
    return {"wall": wall, "read": r1 - r0, "resident": resident, "plan_read": (phase.at_start or r1) - r0,
            "planned": real["base_bytes"] + real["expert_bytes"], "seconds": real["seconds"]}


def warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(64 * MIB):
            pass


@dataclass(frozen=True)
class Variant:
    budget: str | None  # None: the exact merge
    cold: bool
    prefetch: bool
    whole: bool = False  # read-ahead off for the whole merge (plan too), not only while executing

    def __str__(self) -> str:
        if self.budget is None:  # an exact merge does not prefetch
            return f"{'cold' if self.cold else 'warm'} exact{'' if self.prefetch else ', MP_PREFETCH=0'}"
        return (f"{'cold' if self.cold else 'warm'} {self.budget}, "
                f"{'prefetch' if self.prefetch else 'no prefetch'}{', plan too' if self.whole else ''}")


VARIANTS = [Variant(BUDGET, True, True), Variant(BUDGET, True, False), Variant(BUDGET, True, True, True),
            Variant(None, True, True), Variant(BUDGET, False, True), Variant(BUDGET, False, False),
            Variant(None, False, True), Variant(None, False, False)]


def measure(repo_dir: Path, v: Variant) -> dict:
    os.sync()  # the drop in the child leaves no dirty page behind
    if not v.cold:
        warm(repo_dir / ".mp" / "data.mdb")
    env = dict(os.environ, MP_PREFETCH="1" if v.prefetch else "0")
    cmd = [sys.executable, __file__, "--child", str(repo_dir), "--budget", v.budget or "exact"]
    cmd += ["--cold"] if v.cold else []
    cmd += ["--whole"] if v.whole else []
    out = subprocess.run(cmd, env=env, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, default=Path("/tmp/b12/repo0"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/s3"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--budget", default="exact", help=argparse.SUPPRESS)
    ap.add_argument("--cold", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--whole", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, None if args.budget == "exact" else args.budget, args.cold, args.whole)))
        return
    repo_dir = args.work / "repo"
    shutil.rmtree(repo_dir, ignore_errors=True)
    args.work.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", "-a", "--sparse=always", str(args.source), str(repo_dir)], check=True)
    for b in (BUDGET, None):  # each output written and freed once: every measured run sees the same store
        measure(repo_dir, Variant(b, False, True))
    runs: dict[Variant, list[dict]] = {v: [] for v in VARIANTS}
    for rnd in range(args.rounds):
        for v in VARIANTS if rnd % 2 == 0 else VARIANTS[::-1]:
            r = measure(repo_dir, v)
            runs[v].append(r)
            print(f"round {rnd + 1} {v}: {r['wall']:.2f} s, read {r['read'] / MIB:.0f} MiB "
                  f"(plan {r['plan_read'] / MIB:.0f}), planned {r['planned'] / MIB:.0f} MiB "
                  f"= {r['read'] / r['planned']:.2f}x", file=sys.stderr, flush=True)
    text = report(runs, args)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    shutil.rmtree(repo_dir, ignore_errors=True)


def report(runs: dict[Variant, list[dict]], args: argparse.Namespace) -> str:
    def med(v: Variant, key: str) -> float:
        return statistics.median(r[key] for r in runs[v])

    def ratio(a: Variant, b: Variant) -> str:
        xs = [x["wall"] / y["wall"] for x, y in zip(runs[a], runs[b])]
        return f"{statistics.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})"

    def v(budget: str | None, cold: bool = True, prefetch: bool = True, whole: bool = False) -> Variant:
        return Variant(budget, cold, prefetch, whole)

    lines = [f"Command: `cd /work/main && .venv/bin/python tools/bench_cold.py --source {args.source} "
             f"--rounds {args.rounds}`: ties K={K} (weight 1/{K}, density 0.5, float32 compute, bfloat16 out), "
             f"Repo.merge (plan + execute + commit) in a fresh process; medians of {args.rounds} rounds. "
             "Disk read: /proc/self/io read_bytes of the merge (plan phase: up to the executor's start). "
             "Planned: the merge's base + expert bytes (realized = estimated).", "",
             "| run | wall s | executor waiting on reads s | disk read MiB (plan phase) | planned MiB | read / planned |",
             "|---|---|---|---|---|---|"]
    for x, rs in runs.items():
        lines.append(f"| {x} | {med(x, 'wall'):.2f} | {statistics.median(r['seconds']['read'] for r in rs):.2f} "
                     f"| {med(x, 'read') / MIB:.0f} ({med(x, 'plan_read') / MIB:.0f}) | {med(x, 'planned') / MIB:.0f} "
                     f"| {statistics.median(r['read'] / r['planned'] for r in rs):.2f} |")
    resident = max(r["resident"] for x, rs in runs.items() if x.cold for r in rs)
    lines += ["", f"Store pages still cached after each drop: at most {resident / MIB:.1f} MiB (fincore). "
              "Executor waiting on reads: the merge's `seconds.read` (its main thread inside chunk reads)."]
    lines += ["", "Wall-time ratios within a round, median (min-max):", "",
              f"- cold {BUDGET} / cold exact: {ratio(v(BUDGET), v(None))}; plan too: {ratio(v(BUDGET, whole=True), v(None))}; "
              f"no prefetch: {ratio(v(BUDGET, prefetch=False), v(None))}",
              f"- cold {BUDGET}, prefetch / no prefetch: {ratio(v(BUDGET), v(BUDGET, prefetch=False))}; "
              f"plan too / no prefetch: {ratio(v(BUDGET, whole=True), v(BUDGET, prefetch=False))}",
              f"- warm {BUDGET}, prefetch / no prefetch: {ratio(v(BUDGET, cold=False), v(BUDGET, cold=False, prefetch=False))}",
              f"- warm exact, as built / MP_PREFETCH=0 (the same path: an exact merge does not prefetch): "
              f"{ratio(v(None, cold=False), v(None, cold=False, prefetch=False))}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
