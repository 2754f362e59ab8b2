"""`mp add` with and without LMDB's writemap, beside `cp`: wall time, apparent and allocated size.

The store dropped writemap (docs/architecture.md): a full disk is then an error the commit
returns instead of SIGBUS, and the data file is only as large as its pages. This measures what
that costs `mp add`. Every variant adds the same family into a fresh repository, in process;
rounds interleave the variants so load changes hit each alike; each round starts from a synced
page cache with the sources read once.

Usage: .venv/bin/python tools/bench_writemap.py [--params 250M] [--experts 3] [--rounds 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import lmdb  # noqa: E402

from mpstore import Repo  # noqa: E402
from mpstore.store import env as store_env  # noqa: E402

_lmdb_open = lmdb.open


def with_writemap(writemap: bool) -> None:
    """Open every environment with writemap on or off (what the store does is off)."""
    def opener(*args: object, **kwargs: object) -> lmdb.Environment:
        kwargs["writemap"] = writemap
        return _lmdb_open(*args, **kwargs)
    store_env.lmdb.open = opener  # type: ignore[attr-defined]


def sizes(root: Path) -> tuple[int, int]:
    apparent = int(subprocess.check_output(["du", "-sb", "--apparent-size", str(root)]).split()[0])
    allocated = int(subprocess.check_output(["du", "-sB1", str(root)]).split()[0])
    return apparent, allocated


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="250M")
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        subprocess.run([sys.executable, str(HERE / "make_family.py"), str(Path(tmp) / "fam"), "--params", args.params,
                        "--experts", str(args.experts), "--kinds", "dense"], check=True, stdout=subprocess.DEVNULL)
        models = sorted(p for p in (Path(tmp) / "fam").iterdir() if p.is_dir())
        total = sum(f.stat().st_size for m in models for f in m.rglob("*") if f.is_file())
        results: dict[str, list[tuple[float, int, int]]] = {"cp": [], "no writemap": [], "writemap": []}
        for _ in range(args.rounds):
            for variant in results:
                root = Path(tmp) / "out"
                shutil.rmtree(root, ignore_errors=True)
                for m in models:  # sources in the page cache, as for every variant
                    for f in m.rglob("*"):
                        if f.is_file():
                            f.read_bytes()
                subprocess.run(["sync"], check=True)
                began = time.perf_counter()
                if variant == "cp":
                    root.mkdir()
                    for m in models:
                        shutil.copytree(m, root / m.name)
                    subprocess.run(["sync"], check=True)
                else:
                    with_writemap(variant == "writemap")
                    with Repo.init(root) as repo:
                        for m in models:
                            repo.add(m, m.name)
                    subprocess.run(["sync"], check=True)
                results[variant].append((time.perf_counter() - began, *sizes(root)))
        print(f"{len(models)} models ({args.params}, bf16, dense experts), {total / 2**20:.0f} MiB in all; "
              f"median of {args.rounds} interleaved rounds, each ending with sync\n")
        print("| variant | wall (s) | / cp | apparent size | allocated |")
        print("|---|---|---|---|---|")
        cp = statistics.median(r[0] for r in results["cp"])
        for variant, rows in results.items():
            wall = statistics.median(r[0] for r in rows)
            print(f"| {variant} | {wall:.2f} | {wall / cp:.2f} | {rows[-1][1] / 2**20:.0f} MiB | "
                  f"{rows[-1][2] / 2**20:.0f} MiB |")


if __name__ == "__main__":
    main()
