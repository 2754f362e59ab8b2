"""`mp merge` of this tree against another checkout of mpstore, on one family, interleaved: did a
change move merge speed? (bench_merge.py measures against MergeKit; this isolates our own change.)

Usage: .venv/bin/python tools/bench_merge_ab.py --other /tmp/before [--params 250M] [--experts 8] [--runs 2]
    [--dtype float32|bfloat16]
where /tmp/before holds the other code, e.g. `git archive HEAD~5 | tar -x -C /tmp/before`. Both
trees must read the same store format. Each run merges in a fresh copy of one repository holding
every model (`cp -r --sparse=always`, untimed), so every run writes its output chunks.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CLI = "from mpstore.cli import main; main()"
METHODS = {
    "ties": ["--method", "ties", "--density", "0.5"],
    "task_arithmetic": ["--method", "task_arithmetic"],
}


def mp(tree: str, *args: str, cwd: str) -> float:
    began = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CLI, *args], env={**os.environ, "PYTHONPATH": tree}, cwd=cwd,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode:
        sys.exit(f"mp {' '.join(args)} failed with {tree}: {proc.stderr.strip()}")
    return time.perf_counter() - began


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--other", required=True, help="another mpstore checkout (the baseline)")
    ap.add_argument("--params", default="250M")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--dtype", default="float32", help="compute dtype (a YAML's `dtype:`); output is bf16")
    args = ap.parse_args()
    trees = {"this tree": str(HERE.parent), "baseline": args.other}
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        fam = Path(tmp) / "fam"
        subprocess.run([sys.executable, str(HERE / "make_family.py"), str(fam), "--params", args.params,
                        "--experts", str(args.experts)], check=True, stdout=subprocess.DEVNULL)
        repo = Path(tmp) / "repo"
        # The baseline builds the repository: code from before the store dropped writemap cannot grow
        # its map while a merge reads, so it needs the headroom its own adds leave.
        mp(trees["baseline"], "-q", "-C", str(repo), "init", cwd=tmp)
        mp(trees["baseline"], "-q", "-C", str(repo), "add", str(fam / "base"), "-n", "base", cwd=tmp)
        experts = []
        for i in range(1, args.experts + 1):
            mp(trees["baseline"], "-q", "-C", str(repo), "add", str(fam / f"expert-{i}"), "-n", f"e{i}",
               "--base", "base", cwd=tmp)
            experts.append(f"e{i}")
        weight = str(round(1 / args.experts, 6))
        times: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.runs):
            for method, opts in METHODS.items():
                for label, tree in trees.items():
                    work = Path(tmp) / "work"
                    shutil.rmtree(work, ignore_errors=True)
                    subprocess.run(["cp", "-r", "--sparse=always", str(repo), str(work)], check=True)
                    t = mp(tree, "-q", "-C", str(work), "merge", *opts, "--base", "base", *experts,
                           "--weight", weight, "--dtype", args.dtype, "--out-dtype", "bfloat16", "-b", "m", cwd=tmp)
                    times.setdefault((method, label), []).append(t)
        print(f"`mp merge`, {args.params} bf16 family, K={args.experts}, weight 1/K, ties density 0.5, {args.dtype} "
              f"compute, bf16 out; median of {args.runs} interleaved runs (wall, start-up included)\n")
        print("| method | this tree (s) | baseline (s) | ratio |")
        print("|---|---|---|---|")
        for method in METHODS:
            a = statistics.median(times[(method, "this tree")])
            b = statistics.median(times[(method, "baseline")])
            print(f"| {method} | {a:.2f} | {b:.2f} | {a / b:.3f} |")


if __name__ == "__main__":
    main()
