"""Crash-safety harness: SIGKILL `mp add`, `mp merge`, `mp revert` and `mp gc --compact` at
seeded random instants and check the store after every kill.

Each kill runs the real `mp` command line in a child process with `mpstore.store.chunks.BATCH_BYTES`
(new chunk bytes per write transaction) lowered from 64 MiB to 64 KiB, so that a model of a MiB or
two is written in dozens of transactions (the real code path, only smaller batches). The
repository uses 4 KiB chunks.

When to kill (the approach of tests/test_crash.py: poll the child with psutil, then SIGKILL):
  * time mode: wait until the child has `.mp/gc.lock` open (add, merge and revert hold it, shared,
    from the start of their work, after interpreter and torch start-up, to the end of their commit;
    for gc the trigger is `.mp/data.mdb`, open from start to end), then kill it after a delay drawn
    from [0, D), where D is 1.1 x how long an uninterrupted run of the same command kept that file
    open (measured once per scenario): uniformly for add, merge and revert; for gc as D x u^2, so
    about a third of the kills fall in the short collection at the start rather than the copy;
  * position mode (add only): kill once the child's read position in the model file it is
    ingesting reaches a drawn fraction of the file's size.

After every kill the harness asserts, on a fresh open of the store:
  * fsck finds no problem (in-process `Repo.fsck()`, the code `mp fsck` runs; the `mp fsck` CLI
    itself every --cli-fsck-every kills and at the end of every round);
  * every ref names a commit that checks out completely (every chunk hash-checked);
  * every commit made before the kill checks out bit-exact: compared with its source folder (add)
    or with a checkout taken right after it was made, before the kill (merge, revert);
  * the killed command's branch is where it was, or on a new commit that is whole: for add, its
    parent is the old head and it checks out as the source folder; for merge, `replay` re-derives
    exactly its snapshot; for revert, it checks out as the uninterrupted revert did;
  * a command that finished before the kill printed a commit id that its branch now names;
    a kill while the model file was still being read left the branch where it was.

Usage: python tools/crash_stress.py --kills 1000 --seed 1 [--commands add,merge,revert,gc]
       [--per-round 25] [--cli-fsck-every 10] [--workdir DIR] [--keep]
Prints per-command counts (kills, where they landed) and exits 1 on the first violation.
The test suite runs the same scenarios (tests/test_reliability.py) with ~55 kills in total.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_family import make_family  # noqa: E402

from mpstore import Repo  # noqa: E402
from mpstore.store.refs import BRANCH_PREFIX  # noqa: E402

CALIBRATION_TRIES = 5
CHUNK_SIZE = 4096
BATCH_BYTES = 64 << 10  # 16 chunks per transaction in the killed child
CHILD_CODE = (
    "import sys, mpstore.store.chunks as chunks; chunks.BATCH_BYTES = int(sys.argv.pop(1)); "
    "from mpstore.cli import main; main()"
)
_MP_SCRIPT = Path(sys.executable).parent / "mp"
MP = [str(_MP_SCRIPT)] if _MP_SCRIPT.exists() else [sys.executable, "-c", "from mpstore.cli import main; main()"]
COMMANDS = ("add", "merge", "revert", "gc")
POLL_S = 0.0005  # between polls of the child's open files: keeps a core for the child on small machines


class Violation(AssertionError):
    """A crash-safety property that did not hold after a kill."""


# ------------------------------------------------------------------------------ running and killing


def child(root: Path, *args: object) -> list[str]:
    """`mp -C ROOT --quiet ARGS` with small chunk-write batches."""
    return [sys.executable, "-c", CHILD_CODE, str(BATCH_BYTES), "-C", str(root), "--quiet", *map(str, args)]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("MP_REPO", None)
    env["MP_AUTHOR"] = "crash-harness"
    return env


def mp(*args: object, timeout: float = 300) -> subprocess.CompletedProcess:
    """The real `mp` command, uninterrupted."""
    return subprocess.run([*MP, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=child_env())


@dataclass
class Run:
    rc: int
    killed: bool  # SIGKILL was sent while the child was still running
    work_s: float | None  # seconds from the trigger to the kill or the exit (None: no trigger)
    held_s: float | None  # seconds the child kept the trigger file open (None: killed first)
    position: int | None  # position mode: read position in the watched file when killed
    stdout: str
    stderr: str


def run_and_kill(cmd: list[str], trigger: Path, delay: float | None = None,
                 watch: Path | None = None, at: int | None = None, timeout: float = 300) -> Run:
    """Run `cmd`; kill it `delay` seconds after it opens `trigger` (time mode), or once its read
    position in `watch` reaches `at` (position mode), or never (both None: a timed calibration)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
    ps = psutil.Process(proc.pid)
    trig = os.path.realpath(trigger)
    watched = os.path.realpath(watch) if watch is not None else None
    deadline = time.monotonic() + timeout
    seen = killed_at = None
    killed = False
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                files = ps.open_files()
            except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                break
            if watched is not None:
                pos = next((f.position for f in files if f.path == watched), None)
                if pos is not None and pos >= at:
                    proc.send_signal(signal.SIGKILL)
                    killed, killed_at, seen = True, pos, time.monotonic()
                    break
            elif any(f.path == trig for f in files):
                seen = time.monotonic()
                break
            time.sleep(POLL_S)
        held = None
        if seen is not None and not killed and watched is None:
            # kill at `delay` (None: never); meanwhile note when the child lets go of the trigger
            while True:
                now = time.monotonic()
                if delay is not None and now - seen >= delay:
                    if proc.poll() is None:
                        proc.send_signal(signal.SIGKILL)
                        killed = True
                    break
                if proc.poll() is not None or now > deadline:
                    break
                if held is None:
                    try:
                        if not any(f.path == trig for f in ps.open_files()):
                            held = time.monotonic() - seen
                    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                        pass
                time.sleep(POLL_S)
        out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    ended = time.monotonic()
    killed = killed and proc.returncode == -signal.SIGKILL
    return Run(proc.returncode, killed, None if seen is None else ended - seen, held, killed_at, out, err)


# ------------------------------------------------------------------------------ folders and checks


def tree_digest(folder: Path) -> dict[str, tuple[int, str]]:
    """Every regular file below `folder`: '/'-path -> (size, sha256); equal digests = equal bytes."""
    folder = Path(folder)
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            out[p.relative_to(folder).as_posix()] = (len(data), hashlib.sha256(data).hexdigest())
    return out


def random_model(folder: Path, seed: int, kib: int = 2048) -> Path:
    """A model folder of ~`kib` KiB of random tensors (f32, bf16, i32) plus config and tokenizer
    files; every third seed is written as two shards with a model.safetensors.index.json."""
    folder.mkdir(parents=True)
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    tensors, budget, i = {}, kib * 1024, 0
    while budget > 0:
        n = min(budget // 4 + 1, rng.choice([1, 7, 1000, 4096, 30000, 100000]))
        kind = rng.choice(["f32", "f32", "bf16", "i32"])
        if kind == "f32":
            t = torch.randn(n, generator=g)
        elif kind == "bf16":
            t = torch.randn(n, generator=g).to(torch.bfloat16)
        else:
            t = torch.randint(-2**31, 2**31 - 1, (n,), generator=g, dtype=torch.int32)
        tensors[f"layers.{i}.{kind}"] = t.reshape(-1, 1) if n % 2 else t
        budget -= t.numel() * t.element_size()
        i += 1
    if seed % 3 == 0 and len(tensors) > 1:
        names = list(tensors)
        half = len(names) // 2
        parts = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
        for file, members in parts.items():
            save_file({n: tensors[n] for n in members}, str(folder / file))
        index = {"metadata": {}, "weight_map": {n: f for f, ms in parts.items() for n in ms}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"seed": str(seed)})
    (folder / "config.json").write_text(json.dumps({"seed": seed, "n": len(tensors)}) + "\n")
    (folder / "tokenizer.json").write_bytes(bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 9000))))
    return folder


@dataclass
class Stats:
    """What the kills of one command did."""

    attempts: int = 0
    kills: int = 0
    outcomes: Counter = field(default_factory=Counter)
    cli_fsck: int = 0
    seconds: float = 0.0

    def add(self, other: Stats) -> None:
        self.attempts += other.attempts
        self.kills += other.kills
        self.outcomes.update(other.outcomes)
        self.cli_fsck += other.cli_fsck
        self.seconds += other.seconds

    def to_json(self) -> dict:
        return {"attempts": self.attempts, "kills": self.kills, "outcomes": dict(self.outcomes),
                "cli_fsck": self.cli_fsck, "seconds": round(self.seconds, 1)}


class Scenario:
    """A repository, a ledger of commits that must survive, and one command to kill."""

    command = ""

    def __init__(self, work: Path, seed: int, cli_fsck_every: int = 10):
        self.work = Path(work)
        self.root = self.work / "repo"
        self.rng = random.Random(f"{self.command}-{seed}")
        self.seed = seed
        self.cli_fsck_every = cli_fsck_every
        self.ledger: dict[bytes, dict] = {}  # commit id -> tree digest of what it must check out as
        self.stats = Stats()
        self.duration = 0.0  # seconds of work of an uninterrupted run, from the trigger on
        self._n = 0
        self.work.mkdir(parents=True, exist_ok=True)

    @property
    def trigger(self) -> Path:
        return self.root / ".mp" / "gc.lock"

    def scratch(self, name: str) -> Path:
        p = self.work / "scratch" / f"{name}-{self._n}"
        self._n += 1
        return p

    def checkout_digest(self, repo: Repo, spec: str) -> dict:
        out = self.scratch("co")
        repo.checkout(spec, out)
        try:
            return tree_digest(out)
        finally:
            shutil.rmtree(out)

    def fail(self, what: str, run: Run | None = None) -> Violation:
        extra = ""
        if run is not None:
            extra = f" [rc {run.rc}, killed {run.killed}, stderr {run.stderr.strip()[-500:]!r}]"
        return Violation(f"{self.command} (seed {self.seed}, kill #{self.stats.kills}): {what}{extra}")

    def check_store(self, run: Run | None = None) -> dict[str, bytes]:
        """fsck clean, every ref a complete commit, every ledger commit bit-exact; returns the refs."""
        with Repo.open(self.root) as repo:
            problems = repo.fsck().problems
            if problems:
                raise self.fail("fsck after the kill: " + "; ".join(problems[:5]), run)
            with repo.store.read() as r:
                refs = r.refs()
            for cid in sorted(set(refs.values()) | set(self.ledger)):
                got = self.checkout_digest(repo, cid.hex())
                if cid in self.ledger and got != self.ledger[cid]:
                    raise self.fail(f"commit {cid.hex()} no longer checks out as it did", run)
        self._since_cli = getattr(self, "_since_cli", 0) + 1
        if self._since_cli >= self.cli_fsck_every:
            self.cli_fsck()
        return refs

    def cli_fsck(self) -> None:
        self._since_cli = 0
        proc = mp("-C", self.root, "fsck", "--json")
        self.stats.cli_fsck += 1
        if proc.returncode != 0 or not json.loads(proc.stdout)["ok"]:
            raise self.fail(f"`mp fsck` exit {proc.returncode}: {proc.stdout.strip()[-500:]} {proc.stderr.strip()}")

    def head(self, branch: str) -> bytes | None:
        with Repo.open(self.root) as repo:
            return repo.branches().get(branch)

    def chunk_count(self) -> int:
        with Repo.open(self.root) as repo, repo.store.read() as r:
            return r.entries(b"chunks")

    def draw_delay(self) -> float:
        """When to kill, in seconds after the trigger: uniform over an uninterrupted run's work."""
        return self.rng.uniform(0.0, 1.0) * self.duration

    # to be provided by each scenario
    def setup(self) -> None:
        raise NotImplementedError

    def step(self, delay: float | None) -> Run:
        raise NotImplementedError

    def run(self, kills: int, max_attempts: int | None = None) -> Stats:
        """Set up, calibrate with one uninterrupted run, then kill until `kills` kills landed."""
        t0 = time.monotonic()
        self.setup()
        for _ in range(CALIBRATION_TRIES):  # a short command may hold its lock between two polls
            calib = self.step(None)
            if calib.work_s is not None:
                break
        else:
            raise self.fail(f"the calibration run never opened {self.trigger.name}", calib)
        # the work is while the trigger is open (the command's lock, or the store for gc); the
        # rest is interpreter exit, where a kill tells nothing: 10% of the work past it is kept
        self.duration = 1.1 * (calib.held_s or calib.work_s)
        max_attempts = max_attempts or 3 * kills + 5
        while self.stats.kills < kills and self.stats.attempts < max_attempts:
            self.stats.attempts += 1
            run = self.step(self.draw_delay())
            self.stats.kills += run.killed
            if not run.killed and run.held_s is not None:  # the work got shorter (warm caches)
                self.duration = min(self.duration, 1.1 * run.held_s)
        self.cli_fsck()
        self.stats.seconds = time.monotonic() - t0
        if self.stats.kills < kills:
            raise self.fail(f"only {self.stats.kills} of {self.stats.attempts} runs were killed while running")
        return self.stats


class AddScenario(Scenario):
    """`mp add` of a fresh random model (nothing dedups) onto one of two branches."""

    command = "add"

    def setup(self) -> None:
        Repo.init(self.root, chunk_size=CHUNK_SIZE).close()
        self.sources: dict[bytes, Path] = {}
        for branch in ("a", "b"):
            src = random_model(self.work / "src" / f"init-{branch}", self.rng.randrange(1 << 30), kib=256)
            proc = mp("-C", self.root, "--quiet", "add", src, "--name", branch)
            if proc.returncode:
                raise self.fail(f"setup add failed: {proc.stderr}")
            self.ledger[bytes.fromhex(proc.stdout.strip())] = tree_digest(src)
        self.i = 0

    def step(self, delay: float | None) -> Run:
        self.i += 1
        branch = "ab"[self.i % 2]
        seed = self.rng.randrange(1 << 30)
        src = random_model(self.work / "src" / f"m{self.i}", seed, kib=1024)
        old = self.head(branch)
        chunks_before = self.chunk_count()
        cmd = child(self.root, "add", src, "--name", branch, "-m", f"step {self.i}")
        weights = src / "model.safetensors"
        if delay is not None and weights.exists() and self.rng.random() < 0.5:
            size = weights.stat().st_size
            run = run_and_kill(cmd, self.trigger, watch=weights, at=int(self.rng.uniform(0.0, 1.0) * size))
            reading = run.position is not None and run.position < size
        else:
            run = run_and_kill(cmd, self.trigger, delay=delay)
            reading = False
        refs = self.check_store(run)
        new = refs.get(BRANCH_PREFIX + branch)
        if not run.killed and run.rc != 0:
            raise self.fail("add failed without being killed", run)
        if run.rc == 0 and new != bytes.fromhex(run.stdout.strip()):
            raise self.fail("add exited 0 but its branch does not name the commit it printed", run)
        if reading and new != old:
            raise self.fail(f"killed at byte {run.position} of the weights, yet the branch moved", run)
        if new == old:
            grew = self.chunk_count() > chunks_before
            self.stats.outcomes["mid-write (orphan chunks)" if grew else "before writing"] += run.killed
        else:
            with Repo.open(self.root) as repo:
                if repo.commit(new.hex()).commit.parents != (old,):
                    raise self.fail("the new commit's parent is not the branch's previous head", run)
            if self.checkout_digest_of(new) != tree_digest(src):
                raise self.fail("the new commit does not check out as its source folder", run)
            self.ledger[new] = tree_digest(src)
            self.stats.outcomes["after commit" if run.killed else "finished"] += 1
        shutil.rmtree(src)  # the ledger keeps its digest; keeps disk use flat in long runs
        return run

    def checkout_digest_of(self, cid: bytes) -> dict:
        with Repo.open(self.root) as repo:
            return self.checkout_digest(repo, cid.hex())


def small_family(work: Path) -> dict[str, Path]:
    """base, expert-1 (dense) and expert-2 (partial): ~0.7 MB of float32 each."""
    return make_family(work / "family", hidden=64, layers=2, vocab=512, dtype="f32", experts=2,
                       kinds=("dense", "partial"), seed=7)


class MergeScenario(Scenario):
    """`mp merge` onto branch `m` with parameters that differ every time (new chunks each run)."""

    command = "merge"
    METHODS = ("task_arithmetic", "ties", "linear", "dare_ties")

    def setup(self) -> None:
        fam = small_family(self.work)
        with Repo.init(self.root, chunk_size=CHUNK_SIZE) as repo:
            for name, src in (("base", fam["base"]), ("e1", fam["expert-1"]), ("e2", fam["expert-2"])):
                self.ledger[repo.add(src, name, base="base" if name != "base" else None).commit] = tree_digest(src)
        self.i = 0

    def step(self, delay: float | None) -> Run:
        self.i += 1
        method = self.METHODS[self.i % len(self.METHODS)]
        w = f"{0.2 + 0.6 * self.rng.random():.6f}"
        args = ["merge", "--method", method, "e1", "e2", "-b", "m", "-m", f"step {self.i}",
                "--threads", "1", "--memory-limit", "1MB", "--seed", str(self.i)]
        args += ["--weight", f"{w},0.5"] if method == "linear" else ["--base", "base", "--weight", w]
        if method in ("ties", "dare_ties"):
            args += ["--density", "0.5"]
        if method != "linear" and self.rng.random() < 0.5:  # a budgeted merge (catalog from setup)
            args += ["--budget", f"{self.rng.randrange(5, 95)}%"]
        old = self.head("m")
        chunks_before = self.chunk_count()
        run = run_and_kill(child(self.root, *args), self.trigger, delay=delay)
        refs = self.check_store(run)
        new = refs.get(BRANCH_PREFIX + "m")
        if not run.killed and run.rc != 0:
            raise self.fail("merge failed without being killed", run)
        if run.rc == 0 and new != bytes.fromhex(run.stdout.strip()):
            raise self.fail("merge exited 0 but its branch does not name the commit it printed", run)
        if new == old:
            grew = self.chunk_count() > chunks_before
            self.stats.outcomes["mid-write (orphan chunks)" if grew else "before writing"] += run.killed
            return run
        with Repo.open(self.root) as repo:
            parents = repo.commit(new.hex()).commit.parents
            if old is not None and old not in parents:
                raise self.fail("the merge commit does not keep the branch's previous head as a parent", run)
            replay = repo.replay(new.hex(), threads=1)
            if not replay.identical:
                raise self.fail(f"the merge commit differs from its own plan in {replay.differing[:5]}", run)
            self.ledger[new] = self.checkout_digest(repo, new.hex())  # the reference checkout, before the next kill
        self.stats.outcomes["after commit" if run.killed else "finished"] += 1
        return run


class RevertScenario(Scenario):
    """`mp revert` of the partial expert's commit on branch `r`, reset back before every run."""

    command = "revert"

    def setup(self) -> None:
        fam = small_family(self.work)
        with Repo.init(self.root, chunk_size=CHUNK_SIZE) as repo:
            self.ledger[repo.add(fam["base"], "base").commit] = tree_digest(fam["base"])
            repo.create_branch("r", "base")
            self.c1 = repo.add(fam["expert-2"], "r", base="base").commit
            self.ledger[self.c1] = tree_digest(fam["expert-2"])
        self.expected: dict | None = None

    def step(self, delay: float | None) -> Run:
        with Repo.open(self.root) as repo:
            repo.reset("r", self.c1.hex())
        run = run_and_kill(child(self.root, "revert", self.c1.hex(), "-b", "r"), self.trigger, delay=delay)
        refs = self.check_store(run)
        new = refs.get(BRANCH_PREFIX + "r")
        if not run.killed and run.rc != 0:
            raise self.fail("revert failed without being killed", run)
        if run.rc == 0 and new != bytes.fromhex(run.stdout.strip()):
            raise self.fail("revert exited 0 but its branch does not name the commit it printed", run)
        if new == self.c1:
            self.stats.outcomes["before commit"] += run.killed
            return run
        with Repo.open(self.root) as repo:
            if repo.commit(new.hex()).commit.parents != (self.c1,):
                raise self.fail("the revert commit's parent is not the head it was made on", run)
            got = self.checkout_digest(repo, new.hex())
        if self.expected is None:  # the calibration run: its checkout is the reference
            self.expected = got
        elif got != self.expected:
            raise self.fail("the revert commit does not check out as the uninterrupted revert did", run)
        self.ledger[new] = got
        self.stats.outcomes["after commit" if run.killed else "finished"] += 1
        return run


class GcScenario(Scenario):
    """`mp gc --expire now --compact` with garbage to free: the chunks an add that never committed
    leaves (its chunk phase run in-process, as a killed add leaves them) and a commit on a deleted
    branch."""

    command = "gc"

    @property
    def trigger(self) -> Path:
        # gc holds gc.lock only while collecting, which can be over before a poll sees it; the
        # data file is open from start to end
        return self.root / ".mp" / "data.mdb"

    def draw_delay(self) -> float:
        # collection is a short stretch at the start, the copy a long one: a squared uniform
        # fraction puts about a third of the kills in the first tenth of the run
        return self.rng.uniform(0.0, 1.0) ** 2 * self.duration

    def setup(self) -> None:
        with Repo.init(self.root, chunk_size=CHUNK_SIZE) as repo:
            for branch in ("a", "b"):
                src = random_model(self.work / "src" / f"live-{branch}", self.rng.randrange(1 << 30), kib=512)
                self.ledger[repo.add(src, branch).commit] = tree_digest(src)
            repo.tag("v1", "a")
        self.i = 0

    def step(self, delay: float | None) -> Run:
        from mpstore.progress import Silent
        from mpstore.store.chunks import ChunkSink

        self.i += 1
        junk = random_model(self.work / "src" / f"junk{self.i}", self.rng.randrange(1 << 30), kib=512)
        orphan = self.work / "src" / f"orphan{self.i}"
        orphan.write_bytes(self.rng.randbytes(512 << 10))
        with Repo.open(self.root) as repo:
            repo.add(junk, "junk")
            repo.delete_branch("junk")
            sink = ChunkSink(repo.store, repo.chunk_size, Silent())
            with open(orphan, "rb") as f:
                sink.consume(f, orphan.stat().st_size, "orphan")
            sink.flush()
            with repo.store.read() as r:
                chunks_before = r.entries(b"chunks")
        shutil.rmtree(junk)
        orphan.unlink()
        data = self.root / ".mp" / "data.mdb"
        blocks_before = os.stat(data).st_blocks
        run = run_and_kill(child(self.root, "gc", "--expire", "now", "--compact"), self.trigger, delay=delay)
        tmp_left = (self.root / ".mp" / "compact.tmp").exists()
        self.check_store(run)
        if not run.killed and run.rc != 0:
            raise self.fail("gc failed without being killed", run)
        with Repo.open(self.root) as repo, repo.store.read() as r:
            chunks_after = r.entries(b"chunks")
        kept = len(self.kept_chunks())
        if run.killed:
            if os.stat(data).st_blocks < blocks_before:
                where = "after the rename (file compacted)"
            elif tmp_left:
                where = "while copying (compact.tmp left)"
            elif chunks_after == chunks_before:
                where = "before deleting"
            elif chunks_after > kept:
                where = "mid-delete"
            else:
                where = "after deleting, before the copy"
            self.stats.outcomes[where] += 1
        else:
            if tmp_left:
                raise self.fail("an uninterrupted gc --compact left compact.tmp behind", run)
            if chunks_after != kept:
                raise self.fail(f"an uninterrupted gc left {chunks_after - kept} unreachable chunks", run)
            self.stats.outcomes["finished"] += 1
        return run

    def kept_chunks(self) -> set[bytes]:
        """Chunks reachable from the refs and the reflog entries still stored."""
        from mpstore.store.reach import walk

        with Repo.open(self.root) as repo, repo.store.read() as r:
            roots = list(r.refs().items())
            for _, entry in r.reflog_entries():
                roots += [("reflog", x) for x in (entry.old, entry.new) if x]
            return walk(r, roots).chunks


SCENARIOS = {"add": AddScenario, "merge": MergeScenario, "revert": RevertScenario, "gc": GcScenario}


def run_scenario(command: str, work: Path, kills: int, seed: int, cli_fsck_every: int = 10) -> Stats:
    return SCENARIOS[command](Path(work), seed, cli_fsck_every).run(kills)


# ------------------------------------------------------------------------------ command line

SHARE = {"add": 0.4, "merge": 0.15, "revert": 0.2, "gc": 0.25}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=1000, help="total kills over all commands")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--commands", default=",".join(COMMANDS), help="comma-separated subset of add,merge,revert,gc")
    ap.add_argument("--per-round", type=int, default=25, help="kills per fresh repository")
    ap.add_argument("--cli-fsck-every", type=int, default=10, help="run the `mp fsck` CLI every N kills")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args(argv)
    commands = [c for c in args.commands.split(",") if c]
    bad = [c for c in commands if c not in SCENARIOS]
    if bad:
        ap.error(f"unknown command(s) {bad}; choose from {list(SCENARIOS)}")
    share = sum(SHARE[c] for c in commands)
    target = {c: max(1, round(args.kills * SHARE[c] / share)) for c in commands}
    target[commands[0]] += args.kills - sum(target.values())
    work = args.workdir or Path(tempfile.mkdtemp(prefix="mp-crash-"))
    work.mkdir(parents=True, exist_ok=True)
    totals = {c: Stats() for c in commands}
    t0 = time.monotonic()
    rnd = 0
    status = 0
    try:
        while any(totals[c].kills < target[c] for c in commands):
            for c in commands:
                left = target[c] - totals[c].kills
                if left <= 0:
                    continue
                folder = work / f"{c}-{rnd}"
                st = run_scenario(c, folder, min(left, args.per_round), seed=args.seed * 100003 + rnd,
                                  cli_fsck_every=args.cli_fsck_every)
                totals[c].add(st)
                shutil.rmtree(folder, ignore_errors=True)
                print(f"round {rnd} {c:<6} kills {st.kills:>3}/{st.attempts:<3} {dict(st.outcomes)}  "
                      f"({st.seconds:.1f}s)", flush=True)
            rnd += 1
    except Violation as e:
        print(f"VIOLATION: {e}", file=sys.stderr)
        print(f"store kept at {work}", file=sys.stderr)
        args.keep = True
        status = 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    total = Stats()
    for st in totals.values():
        total.add(st)
    print()
    print(f"crash_stress --kills {args.kills} --seed {args.seed}: {total.kills} kills in {total.attempts} runs, "
          f"{time.monotonic() - t0:.0f}s, {'FAILED' if status else 'all checks passed'}")
    for c, st in totals.items():
        outcomes = ", ".join(f"{k}: {v}" for k, v in sorted(st.outcomes.items()))
        print(f"  {c:<7} {st.kills:>5} kills / {st.attempts:>5} runs; `mp fsck` CLI runs {st.cli_fsck}; {outcomes}")
    print(json.dumps({c: st.to_json() for c, st in totals.items()}))
    return status


if __name__ == "__main__":
    sys.exit(main())
