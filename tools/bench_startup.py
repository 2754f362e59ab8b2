"""Start-up cost of the reading commands: `mp log` wall time and what `python -X importtime` says
`import mpstore.cli` costs, against a bare `python -c pass` run in the same loop.

Usage: .venv/bin/python tools/bench_startup.py [--runs 15] [--other PATH ...]
Each --other PATH is another checkout of mpstore (e.g. the previous commit, `git archive HEAD~1 |
tar -x -C /tmp/before`) measured in the same loop, so the ratios compare code, not machine load.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from make_family import make_family  # noqa: E402

CLI = "from mpstore.cli import main; main()"


# Every command runs outside the repository's folder: `python -c` puts the working directory first
# on sys.path, which would shadow PYTHONPATH's checkout with this one.
NEUTRAL = tempfile.gettempdir()


def timed(cmd: list[str], env: dict[str, str]) -> float:
    began = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=NEUTRAL)
    return time.perf_counter() - began


def import_profile(env: dict[str, str]) -> tuple[float, bool, list[tuple[int, str]]]:
    """(cumulative µs of importing mpstore.cli, whether torch was imported, the 5 costliest)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", "import mpstore.cli"], env=env,
                          capture_output=True, text=True, check=True, cwd=NEUTRAL)
    rows = []
    for line in proc.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)", line)
        if m:
            rows.append((int(m.group(2)), len(m.group(3)), m.group(4)))
    total = next(cum for cum, _, name in rows if name == "mpstore.cli")
    top = sorted(((cum, name) for cum, depth, name in rows if depth <= 3), reverse=True)[:5]
    return total / 1e6, any(name == "torch" for _, _, name in rows), top


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--other", action="append", default=[], help="another mpstore checkout to compare")
    args = ap.parse_args()
    trees = {"this tree": str(HERE.parent), **{f"--other {p}": p for p in args.other}}
    with tempfile.TemporaryDirectory() as tmp:
        fam = make_family(Path(tmp) / "fam", hidden=64, layers=2, vocab=256, experts=1)
        root = Path(tmp) / "repo"
        env0 = {**os.environ, "PYTHONPATH": trees["this tree"]}
        timed([sys.executable, "-c", CLI, "-C", str(root), "init"], env0)
        timed([sys.executable, "-c", CLI, "-C", str(root), "add", str(fam["base"]), "-n", "base"], env0)
        times: dict[str, list[float]] = {"python -c pass": [], **{k: [] for k in trees}}
        for _ in range(args.runs):  # interleaved, so load changes hit every variant alike
            times["python -c pass"].append(timed([sys.executable, "-c", "pass"], env0))
            for label, path in trees.items():
                env = {**os.environ, "PYTHONPATH": path}
                times[label].append(timed([sys.executable, "-c", CLI, "-C", str(root), "log"], env))
        base = statistics.median(times["python -c pass"])
        print(f"`mp log` on a one-commit repository, median of {args.runs} interleaved runs\n")
        print("| variant | wall (s) | minus bare python (s) | import mpstore.cli (s) | torch imported |")
        print("|---|---|---|---|---|")
        print(f"| python -c pass | {base:.3f} | - | - | - |")
        for label, path in trees.items():
            wall = statistics.median(times[label])
            imp, torch_loaded, top = import_profile({**os.environ, "PYTHONPATH": path})
            print(f"| {label} | {wall:.3f} | {wall - base:.3f} | {imp:.3f} | {'yes' if torch_loaded else 'no'} |")
        for label, path in trees.items():
            _, _, top = import_profile({**os.environ, "PYTHONPATH": path})
            print(f"\n{label}: costliest imports (cumulative s): "
                  + ", ".join(f"{name} {cum / 1e6:.3f}" for cum, name in top))


if __name__ == "__main__":
    main()
