#!/usr/bin/env python3
"""This machine's limit for the work of one `mp merge`: the floor that tools/bench_merge.py sets
beside every merge (mp / floor shows the gap that is left).

The floor is the time to read every distinct input chunk the merge reads once, from the page
cache (zero-copy views of the store's memory map; a compressed chunk decoded, on the workers as
mp decodes, unchecked), and to run one pass of the method's arithmetic over them in the fastest
kernel we have (the fused kernel of mpstore/merge/methods/kernels.py), on every core. Left out, because a merge needs them but the limit of the arithmetic does not:
interpreter start-up and imports, the radix passes that find top-k thresholds (a fixed threshold
stands in), hashing, writing and committing the output. Chunks where every expert equals the base
are not read, as mp never reads them.

Usage (from the repository root, with the venv's python; the store's pages should be warm):
  python tools/merge_floor.py REPO CONFIG.yml [--threads N] [--repeat 3]
Prints one JSON line: {"seconds": median, "runs": [...], "bytes": distinct bytes read, "blocks": n}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mpstore import Repo  # noqa: E402
from mpstore.merge import executor, methods  # noqa: E402
from mpstore.merge.methods import kernels  # noqa: E402
from mpstore.merge.methods.base import STORED_BITS  # noqa: E402
from mpstore.merge.methods.task_arithmetic import TaskArithmetic  # noqa: E402
from mpstore.merge.request import from_yaml  # noqa: E402
from mpstore.store.env import Pending, stored_payload  # noqa: E402


def jobs(repo: Repo, cfg: Path) -> tuple[list[tuple[bytes, list[bytes], str, list[float]]], TaskArithmetic]:
    """Per chunk position of every merged tensor: the base chunk, the differing expert chunks,
    the dtype and those experts' weights; and the method (one the kernels run)."""
    plan = repo.plan(from_yaml(cfg))
    method = methods.get(plan.method)
    if not isinstance(method, TaskArithmetic):
        raise SystemExit(f"{plan.method}: the fused kernels run the task-arithmetic family only")
    out = []
    with repo.store.read() as txn:
        for t in executor.tasks(txn, plan, method):
            if t.copy is not None or t.base is None or t.base.dtype not in STORED_BITS:
                continue
            for c, key in enumerate(t.base.chunks):
                differing = [(m.chunks[c], p["weight"]) for m, p in zip(t.models, t.p) if m.chunks[c] != key]
                if differing:
                    out.append((key, [k for k, _ in differing], t.base.dtype, [w for _, w in differing]))
    return out, method


def run_once(repo: Repo, todo: list, sparse: bool, consensus: bool, threads: int) -> tuple[float, int]:
    """One timed pass: the main thread takes views of the chunks (LMDB is read from one thread),
    the workers run the fused combine on them."""
    width = kernels.MIN_COLUMNS

    def raw(p: Pending) -> memoryview:
        """The chunk's bytes: a raw one's view, a compressed one decoded (no digest check)."""
        return stored_payload(p.key, p.value, lambda k: stored_payload(k, p.ref[1]) if p.ref else b"")

    def work(base: Pending, rows: list[Pending], dtype: str, weights: list[float]) -> None:
        kind, shift = STORED_BITS[dtype]
        b = np.frombuffer(raw(base), kind)
        m = np.stack([np.frombuffer(raw(r), kind) for r in rows])
        k = len(rows)
        if b.shape[0] < width:
            return
        mode = np.full(k, kernels.MODE_TOPK if sparse else kernels.MODE_WHOLE, np.int8)
        cut = np.full(k, 1e-30, np.float32)  # a fixed threshold: no radix pass, no ties
        kernels.combine(b, m, shift, np.array(weights, np.float32), mode, cut, cut,
                        np.zeros((k, 2), np.int64), np.ones((k, 2), np.int64),
                        np.full((k, 2), kernels.NO_TIE_LIMIT, np.int64), np.zeros((k, 0), np.uint8),
                        None, consensus, consensus, 1.0, 1.0)

    nbytes = 0
    began = time.perf_counter()
    with repo.store.read() as txn, ThreadPoolExecutor(threads) as pool:
        pending = []
        for base, rows, dtype, weights in todo:
            views = [txn.pending(base), *(txn.pending(r) for r in rows)]
            nbytes += sum(len(v.value) for v in views)
            pending.append(pool.submit(work, views[0], views[1:], dtype, weights))
            if len(pending) >= 4 * threads:
                pending.pop(0).result()
        for f in pending:
            f.result()
    return time.perf_counter() - began, nbytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("repo")
    ap.add_argument("config")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if not kernels.available():
        raise SystemExit("the fused kernels are off on this machine: no floor to measure")
    repo = Repo.open(Path(args.repo))
    todo, method = jobs(repo, Path(args.config))
    sparse, consensus = method.sparsifier is not None, method.consensus
    run_once(repo, todo[:8], sparse, consensus, args.threads)  # compile or load the kernels: not timed
    runs = []
    nbytes = 0
    for _ in range(args.repeat):
        seconds, nbytes = run_once(repo, todo, sparse, consensus, args.threads)
        runs.append(round(seconds, 3))
    print(json.dumps({"seconds": statistics.median(runs), "runs": runs, "bytes": nbytes, "blocks": len(todo)}))


if __name__ == "__main__":
    main()
