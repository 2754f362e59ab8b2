"""What checking every object against its id costs: reading each object of a commit (snapshot,
tensors, blobs) with and without the xxh3 check, and a whole checkout beside it.

Usage: .venv/bin/python tools/bench_verify.py [--params 250M] [--repeat 200]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))


from mpstore import Repo  # noqa: E402
from mpstore.store.objects import decode  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="250M")
    ap.add_argument("--repeat", type=int, default=200)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        subprocess.run([sys.executable, str(HERE / "make_family.py"), str(Path(tmp) / "fam"), "--params", args.params,
                        "--experts", "0"], check=True, stdout=subprocess.DEVNULL)
        fam = {"base": Path(tmp) / "fam" / "base"}
        with Repo.init(Path(tmp) / "repo") as repo:
            repo.add(fam["base"], "base")
            with repo.store.read() as r:
                snap_id = repo.commit("base").commit.snapshot
                snap = r.snapshot(snap_id)
                ids = [snap_id, *snap.tensors.values(), *snap.files.values(), *(s.header for s in snap.shards)]
                raw = {oid: bytes(r._t.get(oid, db=r._db(b"objects"))) for oid in ids}

                def timed(fn) -> float:  # type: ignore[no-untyped-def]
                    began = time.perf_counter()
                    for _ in range(args.repeat):
                        for oid in ids:
                            fn(oid)
                    return (time.perf_counter() - began) / args.repeat

                checked = timed(r.object)
                unchecked = timed(lambda oid: decode(r._t.get(oid, db=r._db(b"objects")), oid))
            out = Path(tmp) / "out"
            began = time.perf_counter()
            repo.checkout("base", out)
            checkout = time.perf_counter() - began
            shutil.rmtree(out)
        nbytes = sum(len(v) for v in raw.values())
        print(f"one {args.params} commit: {len(ids)} objects, {nbytes / 1024:.1f} KiB of encodings; "
              f"every object read {args.repeat} times\n")
        print("| read of all objects | ms | per object (µs) |")
        print("|---|---|---|")
        print(f"| decode only | {unchecked * 1e3:.3f} | {unchecked / len(ids) * 1e6:.2f} |")
        print(f"| hash-checked against the id, then decode | {checked * 1e3:.3f} | {checked / len(ids) * 1e6:.2f} |")
        print(f"\nthe check adds {(checked - unchecked) * 1e3:.3f} ms per full read of the commit's objects; "
              f"a checkout of it takes {checkout:.2f} s ({(checked - unchecked) / checkout * 100:.3f}% of it)")


if __name__ == "__main__":
    main()
