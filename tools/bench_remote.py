#!/usr/bin/env python3
"""Benchmark mpstore's remotes (issue 13) against a real S3-protocol server on 127.0.0.1.

It starts moto's standalone server (tests/s3server.py's `start_server`), generates the family
(tools/make_family.py, as tools/bench_store.py does: base + --experts experts, kinds cycling
dense/partial/lora, bf16), adds it to a repository (experts with --base base), and measures:

  1. `mp push` of base + every expert into an empty bucket prefix: bytes sent on the wire (the
     object bodies the transport uploaded: packs, indexes) / the store's unique chunk bytes
     (target ≤ 1.02), and its wall time;
  2. the same models uploaded as their Hugging Face folders with boto3 (`upload_file` per file,
     the default TransferConfig, in a fresh interpreter, as a user scripts it today) to another
     prefix of the same bucket: mp bytes / upload bytes (target ≤ 0.6) and mp wall / upload wall
     (target ≤ 1.0). Both run --repeat rounds, a fresh bucket per round, their order alternating;
     medians are reported, each an `mp push` CLI run against a `python -c` script, with an
     untimed `sync` before each;
  3. the push of one more expert (expert-K+1 of the same family, kind `partial`: half its layers
     the base's) added later: chunks sent vs its chunks the remote did not hold
     (target: only those, ratio 1.00), checked as sets from the remote's pack indexes;
  4. a lazy clone and a budgeted (10%) ties merge of the K experts (weight 1/K, density 0.5, f32
     compute, bf16 out: tools/bench_budget.py's request): bytes the merge downloaded (the lazy
     transport's received bytes) / `Repo.network_bytes(plan)` (target ≤ 1.1), the plan's
     estimate, and whether the merged snapshot equals the same merge in a full clone;
  5. `mp fetch` into a fresh repository killed (SIGKILL) once about half the chunk bytes are in
     its data file, then rerun: the bytes the rerun moved that had already been stored before the
     kill, = rerun wire bytes − (a full fetch's wire bytes − chunk bytes stored before the rerun),
     in packs (target ≤ 1 pack); and the bytes that crossed the wire twice, counting those the
     killed fetch had received but not yet stored (its transport's counter, written every 10 ms
     by the process that runs the CLI: WATCHED_FETCH) = received + rerun − full fetch.

Everything lives under --work (default /tmp/bench-remote), removed at the end unless --keep;
the server is stopped at the end. The AWS environment of this process (and so of the `mp` and
upload subprocesses) points at the server with fake credentials; ~/.aws takes no part.

Usage (from the repository root, with the venv's python):
  python tools/bench_remote.py [--work /tmp/bench-remote] [--out results.md] [--repeat 3]
      [--params 250M] [--experts 8] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "tests"))
from bench_store import MIB, MP, b, log, rm, table, warm  # noqa: E402  (same folder: formatting, the mp command)
from s3server import KEY_ID, REGION, SECRET, client, start_server  # type: ignore[import-not-found]  # noqa: E402

from mpstore import Repo  # noqa: E402
from mpstore.merge.request import MergeRequest  # noqa: E402
from mpstore.remote.bucket import Bucket  # noqa: E402
from mpstore.remote.packs import PACK_BYTES  # noqa: E402
from mpstore.remote.transport import CHUNK  # noqa: E402
from mpstore.store.objects import Blob  # noqa: E402
from mpstore.units import parse_size  # noqa: E402

TARGETS = {"push_unique": 1.02, "push_bytes": 0.6, "push_wall": 1.0, "late_chunks": 1.0, "lazy": 1.1,
           "refetch_packs": 1.0}
DENSITY = 0.5
BUDGET = "10%"
POLL_S = 0.02

# What a user scripts today: every file of every folder with boto3's upload_file and the default
# TransferConfig (multipart above 8 MiB, 10 threads). Prints the body bytes it uploaded.
UPLOAD_SCRIPT = """
import sys, threading, boto3
from pathlib import Path
bucket, prefix, *folders = sys.argv[1:]
s3 = boto3.client("s3")
sent, lock = [0], threading.Lock()
def count(n):
    with lock:
        sent[0] += n
for folder in map(Path, folders):
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        s3.upload_file(str(f), bucket, f"{prefix}/{folder.name}/{f.relative_to(folder).as_posix()}", Callback=count)
print(sent[0])
"""


# `mp -C DST --quiet fetch origin`, the CLI's own entry point, in a process that also writes what
# its object-store transports have received so far every 10 ms (one number a line): what a
# SIGKILL throws away is what arrived and was not yet stored.
WATCHED_FETCH = """
import sys, threading, time
import mpstore.remote.bucket as bucket
from mpstore.cli import main
made = []
class Watched(bucket.Bucket):
    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        made.append(self)
bucket.Bucket = Watched
def report():
    while True:
        print(sum(b.received_bytes for b in made), flush=True)
        time.sleep(0.01)
threading.Thread(target=report, daemon=True).start()
sys.argv = ["mp", "-C", sys.argv[1], "--quiet", "fetch", "origin"]
main()
"""


def aws_env(endpoint: str, where: Path) -> None:
    """The standard AWS environment pointed at the server (tests/s3server.py's aws_env, for a
    process rather than a test): inherited by every subprocess started here."""
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_REGION"):
        os.environ.pop(var, None)
    os.environ.update(AWS_ACCESS_KEY_ID=KEY_ID, AWS_SECRET_ACCESS_KEY=SECRET, AWS_DEFAULT_REGION=REGION,
                      AWS_ENDPOINT_URL=endpoint, AWS_CONFIG_FILE=str(where / "no-aws-config"),
                      AWS_SHARED_CREDENTIALS_FILE=str(where / "no-aws-credentials"),
                      AWS_EC2_METADATA_DISABLED="true")


@dataclass
class Timed:
    seconds: float
    stdout: str


def timed(cmd: list[str]) -> Timed:
    """Run `cmd` after an untimed sync (so earlier writes are not flushed during it); wall time
    from spawn to exit. A failure stops the benchmark with the command's stderr."""
    os.sync()
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"failed ({p.returncode}): {shlex.join(cmd)}\n{p.stderr}")
    return Timed(seconds, p.stdout)


def mp(repo: Path, *args: str) -> list[str]:
    """The `mp` command line for `args` in `repo`."""
    return [MP, "-C", str(repo), "--quiet", *args]


def chunk_bytes(repo: Repo, stored: bool = False) -> tuple[int, int]:
    """(count, bytes) of the chunks in a store: raw sizes (less each value's codec byte), or the
    stored values as they travel (`stored`)."""
    n = total = 0
    with repo.store.read() as r:
        for _, value in r.chunks():
            n += 1
            total += len(value) - (0 if stored else 1)
    return n, total


def chunk_sizes(repo: Repo) -> dict[bytes, int]:
    """Every chunk in a store -> its stored size (small stores: a lazy clone's)."""
    with repo.store.read() as r:
        return {bytes(k): len(v) for k, v in r.chunks()}


def commit_chunks(repo: Repo, ref: str) -> set[bytes]:
    """Every chunk a commit's snapshot reaches (tensors, files, shard headers)."""
    with repo.store.read() as r:
        snap = r.snapshot_of(repo.resolve(ref))
        blobs = [*snap.files.values(), *(s.header for s in snap.shards)]
        return ({k for tid in snap.tensors.values() for k in r.tensor(tid).chunks}
                | {k for bid in blobs for k in r.object_of(bid, Blob).chunks})


def remote_chunks(url: str) -> set[bytes]:
    bucket = Bucket(url)
    try:
        return bucket.holdings(CHUNK)
    finally:
        bucket.close()


def empty_bucket(s3: Any, bucket: str, prefix: str = "", drop: bool = False) -> None:
    """Delete every object under `prefix` (and the bucket with `drop`): the server keeps what it
    holds in temporary files and memory."""
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            s3.delete_objects(Bucket=bucket, Delete={"Objects": keys})
    if drop:
        s3.delete_bucket(Bucket=bucket)


def ratio_row(what: str, got: str, ref: str, ratio: float, target: float | None, unit: str = "×") -> list[str]:
    if target is None:
        return [what, got, ref, f"{ratio:.3f}{unit}", "-", "info"]
    return [what, got, ref, f"{ratio:.3f}{unit}", f"≤ {target:g}{unit}", "yes" if ratio <= target else "NO"]


def info_row(what: str, got: str, ref: str = "-") -> list[str]:
    return [what, got, ref, "-", "-", "info"]


# ------------------------------------------------------------------------------ the measurements


class Bench:
    """One run: the server's client, the repository of the family, and the rows measured so far."""

    def __init__(self, args: argparse.Namespace, endpoint: str):
        self.args = args
        self.work: Path = args.work
        self.s3 = client(endpoint)
        self.rows: list[list[str]] = []
        self.notes: list[str] = []
        self.pack = parse_size(os.environ["MP_PACK_SIZE"]) if os.environ.get("MP_PACK_SIZE") else PACK_BYTES
        self.names = ["base", *(f"expert-{i}" for i in range(1, args.experts + 1))]
        self.late = f"expert-{args.experts + 1}"
        self.models = [self.work / "family" / n for n in self.names]
        self.repo = self.work / "repo"

    def setup(self) -> None:
        """The family and one more expert, `partial`: make_family derives every tensor from (seed,
        model name, tensor name), so experts 1..K are bench_store's family's and the last one is
        new (a late expert with another name would repeat an earlier expert's tensors)."""
        kinds = [("dense", "partial", "lora")[i % 3] for i in range(self.args.experts)] + ["partial"]
        log(f"generating the family ({self.args.params} params, {self.args.experts} experts + 1)")
        subprocess.run([sys.executable, str(ROOT / "tools" / "make_family.py"), str(self.work / "family"),
                        "--params", self.args.params, "--experts", str(self.args.experts + 1),
                        "--kinds", ",".join(kinds), "--dtype", "bf16", "--seed", "0"],
                       check=True, stdout=subprocess.DEVNULL)
        log("adding the family (experts with --base base)")
        rm(self.repo)
        t0 = time.perf_counter()
        with Repo.init(self.repo) as r:
            for name, folder in zip(self.names, self.models):
                r.add(folder, name, base=None if name == "base" else "base")
            self.unique = chunk_bytes(r)
        log(f"added in {time.perf_counter() - t0:.1f} s; {self.unique[0]} unique chunks, {b(self.unique[1])}")
        warm(self.models)

    def push_vs_upload(self) -> str:
        """Rows 1-2; returns the URL of the last round's mp remote (kept for the other steps)."""
        mp_runs: list[tuple[float, int]] = []
        up_runs: list[tuple[float, int]] = []
        url = ""
        for i in range(self.args.repeat):
            bucket = f"bench-{uuid.uuid4().hex[:12]}"
            self.s3.create_bucket(Bucket=bucket)
            url, remote = f"s3://{bucket}/mp", f"r{i}"
            with Repo.open(self.repo) as r:
                r.remote_add(remote, url)
            order = ["mp", "upload"] if i % 2 == 0 else ["upload", "mp"]
            for which in order:
                if which == "mp":
                    t = timed(mp(self.repo, "push", remote, *self.names, "--json"))
                    moved = json.loads(t.stdout)
                    sent = moved["wire_bytes"]
                    mp_runs.append((t.seconds, sent))
                else:
                    t = timed([sys.executable, "-c", UPLOAD_SCRIPT, bucket, "hf", *map(str, self.models)])
                    sent = int(t.stdout.split()[-1])
                    up_runs.append((t.seconds, sent))
                log(f"  round {i + 1} {which}: {t.seconds:.2f} s, {b(sent)}")
            empty_bucket(self.s3, bucket, "hf/")
            if i + 1 < self.args.repeat:
                empty_bucket(self.s3, bucket, drop=True)
        mp_wall = statistics.median(s for s, _ in mp_runs)
        up_wall = statistics.median(s for s, _ in up_runs)
        mp_bytes = statistics.median(n for _, n in mp_runs)
        up_bytes = statistics.median(n for _, n in up_runs)
        k = self.args.experts
        self.rows += [
            ratio_row(f"push base + {k} experts: bytes sent / unique chunk bytes", b(mp_bytes),
                      f"{b(self.unique[1])} ({self.unique[0]} chunks)", mp_bytes / self.unique[1],
                      TARGETS["push_unique"]),
            ratio_row(f"push vs boto3 upload_file of the {k + 1} folders: bytes", b(mp_bytes), b(up_bytes),
                      mp_bytes / up_bytes, TARGETS["push_bytes"]),
            ratio_row("... floor without compression: unique chunk bytes / the folders' bytes", b(self.unique[1]),
                      b(up_bytes), self.unique[1] / up_bytes, None),
            ratio_row("push vs boto3 upload_file: wall (median)", f"{mp_wall:.2f} s", f"{up_wall:.2f} s",
                      mp_wall / up_wall, TARGETS["push_wall"]),
        ]
        self.notes.append(
            f"Push: {moved['chunks']} chunks ({b(moved['chunk_bytes'])} as stored: one codec byte each), "
            f"{moved['objects']} objects and {moved['catalog_entries']} catalog entries; the "
            f"{b(moved['wire_bytes'] - moved['chunk_bytes'])} on the wire beyond the chunks are pack indexes, "
            "objects and catalog entries.")
        self.notes.append("Rounds (mp push, upload): " + "; ".join(
            f"{m[0]:.2f} s, {u[0]:.2f} s" for m, u in zip(mp_runs, up_runs)) + ".")
        self.push_mb_s = mp_bytes / mp_wall / MIB
        self.upload_mb_s = up_bytes / up_wall / MIB
        self.server_reads(bucket)
        return url

    def server_reads(self, bucket: str) -> None:
        """What one GET of the largest pack costs the server: a 1 MiB range vs the whole pack (median of 5),
        which sets the speed of a lazy clone's ranged reads on this server."""
        key, size = max(((o["Key"], o["Size"]) for o in self.s3.list_objects_v2(Bucket=bucket, Prefix="mp/packs/")
                         ["Contents"] if o["Key"].endswith(".pack")), key=lambda ks: ks[1])
        got = {}
        for what, extra in (("range", {"Range": f"bytes=0-{MIB - 1}"}), ("whole", {})):
            runs = []
            for _ in range(5):
                t0 = time.perf_counter()
                self.s3.get_object(Bucket=bucket, Key=key, **extra)["Body"].read()
                runs.append(time.perf_counter() - t0)
            got[what] = statistics.median(runs)
        self.rows.append(ratio_row("server: GET of a 1 MiB range of the largest pack / GET of the whole pack (median of 5)",
                                   f"{got['range'] * 1000:.0f} ms", f"{got['whole'] * 1000:.0f} ms ({b(size)})",
                                   got["range"] / got["whole"], None))

    def late_expert(self, url: str) -> None:
        """Row 3: one more (partial) expert, added after the push, pushed alone."""
        remote = f"r{self.args.repeat - 1}"
        with Repo.open(self.repo) as r:
            r.add(self.work / "family" / self.late, "late", base="base")
            reached = commit_chunks(r, "late")
            before = remote_chunks(url)
            with r.store.read() as t:
                new = {k: len(t.stored_chunk(k) or b"") for k in reached - before}
            t0 = time.perf_counter()
            moved = r.push(remote, ["late"])
            seconds = time.perf_counter() - t0
        arrived = remote_chunks(url) - before
        exact = arrived == set(new)
        self.rows += [
            ratio_row("push of one more (partial) expert: chunks sent / its chunks the remote lacked",
                      f"{moved.chunks}", f"{len(new)} of its {len(reached)}", moved.chunks / len(new),
                      TARGETS["late_chunks"]),
            ratio_row("... chunk bytes sent / its new chunks' bytes", b(moved.chunk_bytes), b(sum(new.values())),
                      moved.chunk_bytes / sum(new.values()), None),
            ratio_row("... wire bytes (packs, index, objects, catalog) / its new chunks' bytes",
                      b(moved.wire_bytes), b(sum(new.values())), moved.wire_bytes / sum(new.values()), None),
        ]
        self.notes.append(f"Late expert: pushed in {seconds:.2f} s (in process); the chunks that arrived on the "
                          f"remote are {'exactly' if exact else 'NOT'} its new chunks "
                          f"({len(arrived)} arrived, {len(new)} new); {moved.objects} objects and "
                          f"{moved.catalog} catalog entries went with them.")

    def lazy_merge(self, url: str) -> int:
        """Row 4; returns the wire bytes of a full clone (the full fetch row 5 compares against)."""
        k = self.args.experts
        request = MergeRequest("ties", "origin/base", [f"origin/expert-{i}" for i in range(1, k + 1)],
                               [{"weight": round(1 / k, 6), "density": DENSITY}] * k, {}, "F32", "BF16")
        log("lazy clone + budgeted merge")
        rm(self.work / "lazy")
        rm(self.work / "full")
        t0 = time.perf_counter()
        lazy, got = Repo.clone(url, self.work / "lazy", lazy=True)
        clone_s = time.perf_counter() - t0
        with lazy:
            plan = lazy.plan(request, budget=BUDGET)
            planned = lazy.network_bytes(plan)
            assert planned is not None
            transport = lazy._lazy_transport()  # the transport the lazy reads go through: its counters
            assert isinstance(transport, Bucket)
            before, held, asked = transport.received_bytes, chunk_sizes(lazy), transport.requests
            t0 = time.perf_counter()
            merged = lazy.merge(request, "m", budget=BUDGET)
            merge_s = time.perf_counter() - t0
            downloaded, requests = transport.received_bytes - before, transport.requests - asked
            output = commit_chunks(lazy, "m")
            # chunks that arrived, less the merge's own output: what it fetched and kept
            kept = {k: n for k, n in chunk_sizes(lazy).items() if k not in held and k not in output}
            with lazy.store.read() as r:
                snap = r.commit(merged.commit).snapshot
        log("full clone + the same merge")
        t0 = time.perf_counter()
        full, fetched = Repo.clone(url, self.work / "full")
        full_s = time.perf_counter() - t0
        with full:
            t0 = time.perf_counter()
            again = full.merge(request, "m", budget=BUDGET)
            full_merge_s = time.perf_counter() - t0
            with full.store.read() as r:
                same = r.commit(again.commit).snapshot == snap
        rm(self.work / "full")
        est, realized = plan.estimate, merged.realized
        assert est is not None
        self.rows += [
            ratio_row(f"lazy clone, ties K={k} budget {BUDGET}: bytes downloaded / planned (network_bytes)",
                      b(downloaded), b(planned), downloaded / planned, TARGETS["lazy"]),
            info_row("... plan estimate: expert bytes, base bytes",
                     f"{b(est['expert_bytes'])}, {b(est['base_bytes'])}",
                     f"realized {b(realized['expert_bytes'])}, {b(realized['base_bytes'])}"),
            ratio_row("... bytes downloaded / bytes of the chunks it fetched and kept (stored form)",
                      b(downloaded), f"{b(sum(kept.values()))} ({len(kept)} chunks)",
                      downloaded / sum(kept.values()), None),
            info_row("... merged snapshot equals the same merge in a full clone", "yes" if same else "NO"),
        ]
        self.notes.append(
            f"Lazy clone: {clone_s:.2f} s, {got.objects} objects and {got.catalog} catalog entries "
            f"({b(got.wire_bytes)} on the wire); budgeted merge {merge_s:.2f} s (of which planning "
            f"{realized['seconds']['plan']} s and executing {realized['seconds']['execute']} s; the rest is the "
            f"download before executing), {requests} requests (ranged reads "
            f"and listings), {b(downloaded - sum(kept.values()))} of the bytes downloaded were gaps between "
            f"wanted chunks that a ranged read spans. Full clone: {full_s:.2f} s, "
            f"{b(fetched.wire_bytes)} on the wire; the same merge there {full_merge_s:.2f} s.")
        return fetched.wire_bytes

    def interrupted_fetch(self, url: str, full_wire: int) -> None:
        """Row 5: fetch, SIGKILL at about half the chunk bytes, fetch again."""
        dst = self.work / "dst"
        rm(dst)
        with Repo.init(dst) as r:
            r.remote_add("origin", url)
        with Repo.open(self.repo) as r:
            total = chunk_bytes(r, stored=True)[1]
        data = dst / ".mp" / "data.mdb"
        log("fetch, killed halfway")
        counter = self.work / "received"
        with open(counter, "w") as out:
            proc = subprocess.Popen([sys.executable, "-c", WATCHED_FETCH, str(dst)], stdout=out,
                                    stderr=subprocess.DEVNULL)
            t0 = time.perf_counter()
            while proc.poll() is None and data.stat().st_blocks * 512 < total / 2:
                time.sleep(POLL_S)
            killed = proc.poll() is None
            if killed:
                proc.send_signal(signal.SIGKILL)
            proc.wait()
        before_s = time.perf_counter() - t0
        arrived = int(counter.read_text().split()[-1])
        with Repo.open(dst) as r:
            stored_n, stored = chunk_bytes(r, stored=True)
        rerun = timed(mp(dst, "fetch", "origin", "--json"))
        moved = json.loads(rerun.stdout)
        again = moved["wire_bytes"] - (full_wire - stored)
        twice = arrived + moved["wire_bytes"] - full_wire
        with Repo.open(dst) as r, Repo.open(self.repo) as src:
            complete = chunk_bytes(r)[0] == chunk_bytes(src)[0] and r.resolve("origin/late") == src.resolve("late")
        self.rows += [
            ratio_row("fetch after a SIGKILLed fetch: rerun wire bytes − (full fetch − stored before the rerun), "
                      "in packs", b(again), f"pack {b(self.pack)}", again / self.pack, TARGETS["refetch_packs"],
                      " packs"),
            ratio_row("... received by the killed fetch + rerun wire bytes − full fetch (bytes that crossed "
                      "twice), in packs", b(twice), f"pack {b(self.pack)}", twice / self.pack, None, " packs"),
        ]
        self.notes.append(
            f"Interrupted fetch: {'killed' if killed else 'NOT killed (it finished first)'} after "
            f"{before_s:.2f} s, having received {b(arrived)} (its transport's counter, sampled every 10 ms) "
            f"and stored {stored_n} chunks ({b(stored)} of {b(total)}); the rerun took "
            f"{rerun.seconds:.2f} s and moved {moved['chunks']} chunks ({b(moved['chunk_bytes'])}), "
            f"{b(moved['wire_bytes'])} on the wire, against a full fetch's {b(full_wire)}; "
            f"chunk bytes fetched twice: {b(moved['chunk_bytes'] - (total - stored))}; the store is "
            f"{'complete' if complete else 'INCOMPLETE'} afterwards.")


def report(bench: Bench, args: argparse.Namespace, load: tuple[tuple[float, ...], tuple[float, ...]],
           seconds: float) -> str:
    import boto3
    import moto

    command = ".venv/bin/python tools/bench_remote.py " + shlex.join(
        [f"--repeat={args.repeat}", f"--params={args.params}", f"--experts={args.experts}"]
        + ([f"--out={args.out}"] if args.out else []))
    lines = [
        "## mpstore remote benchmark (issue 13)", "",
        f"Reproduce: `cd {ROOT} && {command}`", "",
        f"Family: `tools/make_family.py --params {args.params} --experts {args.experts} --dtype bf16` (kinds cycle "
        f"dense, partial, lora; experts added with `--base base`); generated as `--experts {args.experts + 1}` with the last expert's kind `partial`, pushed late. "
        f"Server: moto {moto.__version__} (`python -m moto.server` on 127.0.0.1, same machine); client boto3 "
        f"{boto3.__version__}; pack size {b(bench.pack)}. {os.cpu_count()} CPUs, load average "
        f"{load[0][0]:.2f} at the start, {load[1][0]:.2f} at the end; the whole run took {seconds:.0f} s.", "",
        table(["what", "mp", "reference", "ratio", "target", "met"], bench.rows), "",
        f"Throughput (medians): mp push {bench.push_mb_s:.0f} MiB/s of wire bytes, boto3 upload "
        f"{bench.upload_mb_s:.0f} MiB/s.", "",
        *(f"- {n}" for n in bench.notes), "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-remote"), help="scratch folder (removed at the end)")
    ap.add_argument("--out", type=Path, help="also write the markdown report here")
    ap.add_argument("--repeat", type=int, default=3, help="rounds of push vs upload (medians)")
    ap.add_argument("--params", default="250M", help="family size (make_family --params)")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--keep", action="store_true", help="keep --work")
    args = ap.parse_args()
    start, t0 = os.getloadavg(), time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    server = start_server()
    try:
        aws_env(server.endpoint, args.work)
        bench = Bench(args, server.endpoint)
        bench.setup()
        url = bench.push_vs_upload()
        bench.late_expert(url)
        full_wire = bench.lazy_merge(url)
        bench.interrupted_fetch(url, full_wire)
    finally:
        server.stop()
        if not args.keep:
            rm(args.work)
    text = report(bench, args, (start, os.getloadavg()), time.perf_counter() - t0)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
