"""SIGKILL in the middle of `mp add` or `mp checkout`: the store stays valid, the branch still
names its previous commit, and the target folder is untouched or whole.

The killed `mp add` runs with chunks.BATCH_BYTES lowered from 64 MiB to 4 MiB (the real code
path, only a smaller batch), so a ~48 MB model is written in a dozen committed chunk batches and
kills land before, between and during those transactions, not only before the first one.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
import torch
from conftest import MP, leftovers, tree_bytes
from safetensors.torch import save_file

from mpstore import Repo

BATCH = 4 << 20
ADD_SMALL_BATCHES = [
    sys.executable, "-c",
    "import sys, mpstore.store.chunks as chunks; chunks.BATCH_BYTES = int(sys.argv.pop(1)); "
    "from mpstore.cli import main; main()",
    str(BATCH),
]
TENSORS, ELEMENTS = 12, 1 << 20  # 12 x 4 MiB of float32


def big_model(folder: Path, seed: int) -> Path:
    """~48 MiB of random float32 (nothing dedups against another seed) plus a config."""
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    save_file({f"layers.{i}.weight": torch.randn(ELEMENTS, generator=g) for i in range(TENSORS)},
              str(folder / "model.safetensors"))
    (folder / "config.json").write_text(f'{{"seed": {seed}}}\n')
    return folder


def file_position(proc: psutil.Process, path: str) -> int | None:
    """Where the process's open file `path` is positioned, or None if it has it closed."""
    for f in proc.open_files():
        if f.path == path:
            return f.position
    return None


def run_and_kill_at(cmd: list[str], watched: Path, at: int, timeout: float = 60) -> tuple[int, int | None]:
    """Run `cmd`; SIGKILL it once its read position in `watched` reaches `at` bytes.
    Returns (exit status, position when killed or None if it finished first)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ps = psutil.Process(proc.pid)
    target, killed_at = os.path.realpath(watched), None
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                pos = file_position(ps, target)
            except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                break
            if pos is not None and pos >= at:
                proc.send_signal(signal.SIGKILL)
                killed_at = pos
                break
    finally:
        if proc.poll() is None and killed_at is None and time.monotonic() >= deadline:
            proc.kill()
        proc.wait(timeout)
    return proc.returncode, killed_at


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("big")
    return big_model(root / "v1", seed=1), big_model(root / "v2", seed=2)


@pytest.mark.parametrize("reader", ["none", "open-in-parent"])
def test_killed_add_leaves_the_branch_on_its_previous_commit(tmp_path, models, reader):
    """With reader='open-in-parent' this process keeps the store open throughout, as a
    concurrent reader would, so LMDB cannot reset its lock table between runs: the next writer
    must recover the write lock the killed one held."""
    v1, v2 = models
    v1_files, v2_files = tree_bytes(v1), tree_bytes(v2)
    size = (v2 / "model.safetensors").stat().st_size
    root = tmp_path / "repo"
    held = Repo.init(root)
    old = held.add(v1, "x", message="v1").commit
    if reader == "none":
        held.close()

    @contextmanager
    def opened():
        if reader == "none":
            with Repo.open(root) as repo:
                yield repo
        else:
            yield held

    rng = random.Random(20261128)
    fractions = sorted(rng.uniform(0.02, 0.98) for _ in range(6)) + [1.0]
    kills = 0
    cmd = [*ADD_SMALL_BATCHES, "-C", str(root), "--quiet", "add", str(v2), "--name", "x", "-m", "v2"]
    try:
        for i, frac in enumerate(fractions):
            rc, pos = run_and_kill_at(cmd, v2 / "model.safetensors", int(frac * size))
            kills += rc == -signal.SIGKILL
            with opened() as repo:
                head = repo.resolve("x")
                if pos is not None and pos < size:
                    # still reading the weights: the commit transaction cannot have run
                    assert rc == -signal.SIGKILL
                    assert head == old, f"killed at byte {pos} of {size}, yet the branch moved"
                out = tmp_path / f"out-{i}"
                repo.checkout("x", out)
                if head == old:
                    assert tree_bytes(out) == v1_files
                else:  # killed after the commit became durable: the new commit must be whole
                    assert repo.commit("x").commit.parents == (old,)
                    assert tree_bytes(out) == v2_files
                    old = head
                shutil.rmtree(out)
                assert repo.log("x")[-1].commit.message == "v1"
        assert kills >= 5, f"only {kills} of {len(fractions)} adds were killed while running"

        done = subprocess.run([*MP, "-C", str(root), "--quiet", "add", str(v2), "--name", "x", "-m", "v2 again"],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        new = done.stdout.strip()
        assert re.fullmatch(r"[0-9a-f]{32}", new)
        with opened() as repo:
            assert repo.resolve("x").hex() == new
            assert repo.commit("x").commit.parents == (old,)
            repo.checkout("x", tmp_path / "final")
            assert tree_bytes(tmp_path / "final") == v2_files
            assert repo.log("x")[-1].commit.message == "v1"
    finally:
        if reader != "none":
            held.close()


def test_killed_checkout_leaves_the_target_absent(tmp_path, models):
    v1, _ = models
    root = tmp_path / "repo"
    with Repo.init(root) as repo:
        repo.add(v1, "x")
    size = (v1 / "model.safetensors").stat().st_size
    out = tmp_path / "area" / "out"
    (tmp_path / "area").mkdir()
    cmd = [*MP, "-C", str(root), "--quiet", "checkout", "x", "-o", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ps = psutil.Process(proc.pid)
    killed = False
    while proc.poll() is None:
        try:
            files = ps.open_files()
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            break
        if any(f.path.endswith("model.safetensors") and f.position >= size // 2 for f in files):
            proc.send_signal(signal.SIGKILL)
            killed = True
            break
    proc.wait(60)
    assert killed and proc.returncode == -signal.SIGKILL
    assert not out.exists()  # the half-written folder never took the target's name
    assert len(leftovers(tmp_path / "area")) == 1  # what SIGKILL leaves: the temporary sibling
    with Repo.open(root) as repo:
        repo.checkout("x", out)
    assert tree_bytes(out) == tree_bytes(v1)
