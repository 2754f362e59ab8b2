"""Adversarial input to history, diff and checkout: every defect here once gave a traceback, a
silently wrong answer or a folder left behind. The contract checked: bad input is one line
`mp: error: ...` with exit 1 and the store exactly as it was; output is never silently wrong.

Real `mp` subprocesses where exit codes, terminals or kills matter; tiny models throughout.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import MP, assert_user_error, leftovers, load_dir, run_mp, store_fingerprint, tree_bytes
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mpstore import Repo
from mpstore.errors import MpError, NotARepository, TargetExists, UnknownRef, WriteFailed
from mpstore.model.plot import plot_diff
from mpstore.store.gc import parse_expire

LONG = "x" * 300  # one path component longer than any file system's NAME_MAX (255 bytes)


def mp_ok(*args) -> str:
    proc = run_mp(*args)
    assert proc.returncode == 0, f"mp {' '.join(map(str, args))}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.stdout


def single_file(src: Path, dst: Path) -> Path:
    """The same model saved as one model.safetensors (no index), other files copied."""
    dst.mkdir(parents=True)
    tensors: dict = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    save_file(tensors, str(dst / "model.safetensors"))
    for f in src.iterdir():
        if not f.name.endswith((".safetensors", ".index.json")):
            shutil.copy(f, dst / f.name)
    return dst


def load_by_index(folder: Path) -> dict[str, torch.Tensor]:
    """Read a sharded folder the way transformers does: through its index only. Every entry's
    shard must exist and hold the tensor, and the index must name every shard file there is."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    on_disk = {p.name for p in folder.glob("*.safetensors")}
    assert set(weight_map.values()) == on_disk, (sorted(set(weight_map.values())), sorted(on_disk))
    out = {}
    for name, shard in weight_map.items():
        with safe_open(str(folder / shard), framework="pt") as f:
            assert name in f.keys(), f"index says {name!r} is in {shard}, but it is not"
            out[name] = f.get_tensor(name)
    held = set()
    for shard in on_disk:
        with safe_open(str(folder / shard), framework="pt") as f:
            held |= set(f.keys())
    assert held == set(weight_map), "a shard holds tensors the index does not name"
    if "metadata" in index and "total_size" in index["metadata"]:
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in out.values())
    return out


@pytest.fixture
def root(tmp_path) -> Path:
    r = tmp_path / "repo"
    Repo.init(r, chunk_size=4096).close()
    return r


def add(root: Path, src: Path, branch: str, message: str | None = None) -> str:
    with Repo.open(root) as repo:
        return repo.add(src, branch, message=message).commit.hex()


# ------------------------------------------------------------------------------ 1. NaN in diff


def test_diff_reports_nan_and_inf_explicitly_and_emits_valid_json(root, tmp_path):
    g = torch.Generator().manual_seed(3)
    a = torch.randn(4096, generator=g)  # 4 chunks of 4 KiB
    b = a.clone()
    b[10] = math.nan  # chunk 0
    b[1500] = math.inf  # chunk 1
    b[1501] = -math.inf
    c = a.clone()
    c[3000] += 1.0  # a finite change beside them
    save_file({"w": a, "v": a.clone(), "z": a.clone()}, str(tmp_path / "a.safetensors"))
    save_file({"w": b, "v": c, "z": torch.full_like(a, math.nan)}, str(tmp_path / "b.safetensors"))
    add(root, tmp_path / "a.safetensors", "a")
    add(root, tmp_path / "b.safetensors", "b")

    with Repo.open(root) as repo:
        api = repo.diff("a", "b")
    json.dumps(api.to_json(), allow_nan=False)  # no NaN or Infinity anywhere
    by = {t.name: t for t in api.tensors}
    w, v, z = by["w"], by["v"], by["z"]
    assert w.nonfinite == {"nan_a": 0, "inf_a": 0, "nan_b": 1, "inf_b": 2, "nan_diff": 1, "inf_diff": 2}
    assert w.max_abs is None and w.rel_l2 is None and w.cosine is None  # not a silent 0
    assert z.nonfinite is not None and z.nonfinite["nan_b"] == z.nonfinite["nan_diff"] == 4096
    assert z.max_abs is None
    assert v.nonfinite is None and v.max_abs == pytest.approx(1.0)  # finite tensors keep their numbers

    proc = run_mp("-C", root, "diff", "a", "b", "--json")
    assert proc.returncode == 0, proc.stderr

    def refuse(const: str) -> None:
        raise AssertionError(f"{const} in JSON output")

    doc = json.loads(proc.stdout, parse_constant=refuse)
    assert doc == api.to_json()
    assert doc["summary"]["nonfinite"] == 2

    text = run_mp("-C", root, "diff", "a", "b")
    assert text.returncode == 0, text.stderr
    line = next(x for x in text.stdout.splitlines() if x.split()[1:2] == ["w"])
    assert "max|d| 0.000e+00" not in line
    assert "NaN" in line and "B 1 NaN, 2 Inf" in line, line
    assert "2 with NaN/Inf" in text.stdout.splitlines()[-1]


# ------------------------------------------------------------------------------ 2. revert and shards


def test_revert_across_a_change_of_shard_layout_checks_out_a_consistent_folder(root, tmp_path, sharded_family):
    sharded = sharded_family["base"]
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(shards) > 2 and (sharded / "model.safetensors.index.json").exists()
    one = single_file(sharded, tmp_path / "one")
    parent = add(root, sharded, "m")
    add(root, one, "m", message="as one file")
    mp_ok("-C", root, "revert", "m")
    out = tmp_path / "co"
    mp_ok("-C", root, "checkout", "m", "-o", out)
    loaded = load_by_index(out)
    expected = load_dir(sharded)
    assert loaded.keys() == expected.keys()
    for name, t in expected.items():
        assert torch.equal(loaded[name], t), name
    # the layout went back with the index: the parent's folder, byte for byte
    assert tree_bytes(out) == tree_bytes(sharded)
    with Repo.open(root) as repo:
        assert repo.commit("m").commit.snapshot == repo.commit(parent).commit.snapshot


def test_forced_revert_keeps_the_index_true_to_the_heads_shards(root, tmp_path, sharded_family):
    """The head changed the layout again since: it keeps its own shards, and the index the
    revert puts back is rewritten to name exactly them."""
    sharded = sharded_family["base"]
    one = single_file(sharded, tmp_path / "one")
    tensors = load_dir(sharded)
    names = list(tensors)
    two = tmp_path / "two"
    two.mkdir()
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, part in halves.items():
        save_file({n: tensors[n] for n in part}, str(two / file))
    for f in one.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, two / f.name)
    (two / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 1}, "weight_map": {n: f for f, part in halves.items() for n in part}}))
    add(root, sharded, "m")
    single = add(root, one, "m")
    add(root, two, "m")
    before = store_fingerprint(root)
    assert_user_error(run_mp("-C", root, "revert", single), "revert conflicts", "model.safetensors.index.json")
    assert store_fingerprint(root) == before
    mp_ok("-C", root, "revert", single, "--force")
    out = tmp_path / "co"
    mp_ok("-C", root, "checkout", "m", "-o", out)
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(halves)
    loaded = load_by_index(out)
    assert loaded.keys() == tensors.keys()
    for name, t in tensors.items():
        assert torch.equal(loaded[name], t), name


# ------------------------------------------------------------------------------ 3. gc --expire


def test_gc_expire_huge_or_odd_values_never_overflow(root, tmp_path, family):
    add(root, family["base"], "m")
    with Repo.open(root) as repo:
        repo.create_branch("gone", "m")
        repo.delete_branch("gone")
    before = store_fingerprint(root)
    for huge in ("999999d", "99999999999999999999d", "9999999999w"):
        assert parse_expire(huge) == parse_expire("never")
    proc = run_mp("-C", root, "gc", "--expire", "999999d", "--json")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert json.loads(proc.stdout)["reflog_entries"] == 0  # keeps everything, as 'never' does
    assert store_fingerprint(root) == before
    assert_user_error(run_mp("-C", root, "gc", "--expire", "²d"), "invalid expiry")
    for bad in ("1.5d", "-3d", "d", "١٢d"):
        with pytest.raises(MpError, match="invalid expiry"):
            parse_expire(bad)
    assert store_fingerprint(root) == before


# ------------------------------------------------------------------------------ 4. diff --plot


def test_diff_plot_unknown_format_is_one_line_and_writes_nothing(root, tmp_path, family):
    add(root, family["base"], "base")
    add(root, family["expert-1"], "e1")
    work = tmp_path / "work"
    work.mkdir()
    line = assert_user_error(run_mp("-C", root, "diff", "base", "e1", "--plot", work / "x.xyz"), "xyz", "png")
    assert "svg" in line and "pdf" in line
    assert list(work.iterdir()) == []


def test_diff_plot_into_an_existing_directory_writes_diff_png_inside_it(root, tmp_path, family):
    add(root, family["base"], "base")
    add(root, family["expert-1"], "e1")
    work = tmp_path / "work"
    (work / "plots").mkdir(parents=True)
    proc = run_mp("-C", root, "diff", "base", "e1", "--plot", work / "plots")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in work.iterdir()) == ["plots"]  # no plots.png beside it
    assert (work / "plots" / "diff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(work / "plots" / "diff.png") in proc.stderr
    # no extension: PNG at exactly the path given, not PATH.png (what `mp diff --plot` calls)
    with Repo.open(root) as repo:
        assert plot_diff(repo.diff("base", "e1"), work / "heat") == work / "heat"
    assert (work / "heat").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in work.iterdir()) == ["heat", "plots"]


# ------------------------------------------------------------------------------ 5. reflog after gc


def test_reflog_of_a_live_branch_whose_history_gc_expired(root, family):
    cid = add(root, family["base"], "m")
    with Repo.open(root) as repo:
        repo.create_branch("gone", "m")
        repo.delete_branch("gone")
        assert repo.gc("now").freed.reflog_entries == 3
        assert repo.reflog("m").to_json() == []  # what `mp reflog m --json` prints
        with pytest.raises(UnknownRef, match="unknown branch 'gone'"):
            repo.reflog("gone")
    text = mp_ok("-C", root, "reflog", "m")
    assert cid[:12] in text and "expired" in text
    assert_user_error(run_mp("-C", root, "reflog", "nosuch"), "unknown branch 'nosuch'")


# ------------------------------------------------------------------------------ 6. log without HEAD


def test_log_after_deleting_the_head_branch_names_the_branches_that_exist(root, tmp_path, family):
    empty = tmp_path / "empty"
    with Repo.init(empty) as repo:
        with pytest.raises(UnknownRef, match="no commits yet"):
            repo.lineage()
    assert_user_error(run_mp("-C", empty, "log"), "no commits yet")
    add(root, family["base"], "first")
    add(root, family["expert-1"], "second")  # HEAD: the branch last written
    with Repo.open(root) as repo:
        repo.tag("v1", "first")
        repo.delete_branch("second")
    before = store_fingerprint(root)
    for args in ((), ("--graph",)):
        line = assert_user_error(run_mp("-C", root, "log", *args), "first", "give a ref")
        assert "no commits yet" not in line
    assert store_fingerprint(root) == before
    with Repo.open(root) as repo:
        assert repo.log("first")[0].commit.message == "add base"
        repo.delete_branch("first")  # no branch left, but a tag and history
        for verb in (repo.log, repo.lineage):
            with pytest.raises(UnknownRef, match="no branch left: give a ref, e.g. one of the tags v1"):
                verb()
        repo.delete_tag("v1")
        with pytest.raises(UnknownRef, match="mp reflog NAME"):
            repo.log()


# ------------------------------------------------------------------------------ 7. killed checkout


def random_model(folder: Path, mib: int = 8) -> Path:
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(7)
    save_file({"w": torch.randn(mib << 18, generator=g)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text("{}\n")
    return folder


def wait_stopped(pid: int, timeout: float = 10) -> None:
    """Until the kernel says the process is stopped (state T in /proc/PID/stat)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat[stat.rindex(")") + 2] in "Tt":
            return
        time.sleep(0.001)
    pytest.fail(f"process {pid} did not stop")


def start_and_stop_mid_write(cmd: list[str], parent: Path, known: set[str], timeout: float = 60):
    """Start `cmd` (a checkout into `parent`); SIGSTOP it once its temporary folder holds part of
    model.safetensors. Returns (process, its temporary folder's name), or None if it finished
    first."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        for name in set(leftovers(parent)) - known:
            try:
                size = (parent / name / "model.safetensors").stat().st_size
            except OSError:
                continue
            if size >= 1 << 20:
                proc.send_signal(signal.SIGSTOP)
                wait_stopped(proc.pid)  # a write in flight completes before the process stops
                if (parent / name).exists():
                    return proc, name
                proc.send_signal(signal.SIGCONT)
    proc.wait(timeout)
    return None


def caught_mid_write(base: list[str], target: Path, known: set[str]):
    """`start_and_stop_mid_write`, retried (a small checkout may finish before it is caught)."""
    for _ in range(20):
        got = start_and_stop_mid_write([*base, str(target)], target.parent, known)
        if got:
            return got
        shutil.rmtree(target)
    pytest.fail("the checkout never got caught mid-write")


def test_a_killed_checkouts_leftover_is_removed_by_the_next_one_but_a_live_ones_is_not(root, tmp_path):
    model = random_model(tmp_path / "big")
    add(root, model, "m")
    area = tmp_path / "area"
    area.mkdir()
    base = [*MP, "-C", str(root), "--quiet", "checkout", "m", "-o"]
    # a checkout killed mid-write leaves its temporary folder behind
    victim, dead = caught_mid_write(base, area / "killed", set())
    victim.send_signal(signal.SIGKILL)
    victim.wait(60)
    assert leftovers(area) == [dead] and not (area / "killed").exists()
    # a live checkout into the same folder, paused mid-write (alive, its lock held)
    live, writing = caught_mid_write(base, area / "live", {dead})
    try:
        partial = (area / writing / "model.safetensors").stat().st_size
        # the next checkout into the same parent removes the dead one's folder, not the live one's
        with Repo.open(root) as repo:
            repo.checkout("m", area / "next")
        assert leftovers(area) == [writing]
        assert (area / writing / "model.safetensors").stat().st_size == partial
    finally:
        live.send_signal(signal.SIGCONT)
    assert live.wait(60) == 0, live.stderr.read() if live.stderr else ""
    assert leftovers(area) == []
    assert tree_bytes(area / "live") == tree_bytes(model) == tree_bytes(area / "next")


# ------------------------------------------------------------------------------ 8. escapes in names


EVIL = "model.evil\x1b[31mRED\x1b[0m\nfake line\r\x07"


def test_tensor_names_and_messages_with_escapes_are_printed_escaped(root, tmp_path):
    save_file({EVIL: torch.zeros(4), "ok": torch.zeros(2)}, str(tmp_path / "a.safetensors"))
    save_file({EVIL: torch.ones(4), "ok": torch.zeros(2)}, str(tmp_path / "b.safetensors"))
    add(root, tmp_path / "a.safetensors", "a", message="clear\x1b[2J\nscreen")
    add(root, tmp_path / "b.safetensors", "b")
    outputs = {
        "ls": mp_ok("-C", root, "ls", "a"),
        "diff": mp_ok("-C", root, "diff", "a", "b", "--all"),
        "show": mp_ok("-C", root, "show", "a"),
        "log": mp_ok("-C", root, "log", "a"),
    }
    for what, out in outputs.items():
        assert not any(c in out for c in "\x1b\r\x07"), (what, out)
    assert repr(EVIL) in outputs["ls"] and repr(EVIL) in outputs["diff"]
    assert len(outputs["ls"].splitlines()) == 2  # one line per tensor: no forged line
    assert len(outputs["diff"].splitlines()) == 3
    assert "'clear\\x1b[2J\\nscreen'" in outputs["log"] and "'clear\\x1b[2J\\nscreen'" in outputs["show"]
    # JSON keeps the exact names (--json prints these to_json() documents)
    with Repo.open(root) as repo:
        assert {r.to_json()["name"] for r in repo.ls("a")} == {EVIL, "ok"}
        assert EVIL in {t["name"] for t in repo.diff("a", "b").to_json()["tensors"]}
        assert repo.log("a")[0].to_json()["message"] == "clear\x1b[2J\nscreen"


# ------------------------------------------------------------------------------ 9. checkout into the store


def test_checkout_into_the_store_is_refused(root, family):
    add(root, family["base"], "m")
    before = store_fingerprint(root)
    files = sorted(p.name for p in (root / ".mp").iterdir())
    assert_user_error(run_mp("-C", root, "checkout", "m", "-o", root / ".mp" / "sub"), str(root / ".mp" / "sub"),
                      "inside the repository's store")
    (root.parent / "link").symlink_to(root / ".mp")  # reached through a symlink, too
    with Repo.open(root) as repo:
        for target in (root / ".mp" / "sub" / "deeper", root / ".mp", root.parent / "link" / "sub", root):
            for force in (False, True):
                with pytest.raises(TargetExists):
                    repo.checkout("m", target, force=force)
        assert store_fingerprint(repo) == before
    assert sorted(p.name for p in (root / ".mp").iterdir()) == files
    assert store_fingerprint(root) == before


# ------------------------------------------------------------------------------ 10. long names


def test_overlong_path_components_are_one_line(root, tmp_path, family):
    add(root, family["base"], "m")
    before = store_fingerprint(root)
    work = tmp_path / "work"
    work.mkdir()
    assert_user_error(run_mp("-C", root, "checkout", "m", "-o", work / LONG), "too long")
    with Repo.open(root) as repo:
        with pytest.raises(WriteFailed, match="too long"):
            repo.checkout("m", work / LONG / "sub")
    assert list(work.iterdir()) == []
    assert store_fingerprint(root) == before
    assert_user_error(run_mp("-C", tmp_path / LONG, "log"), "too long")
    assert_user_error(run_mp("init", cwd=work, env={"MP_REPO": str(tmp_path / LONG)}), "too long")
    with pytest.raises(NotARepository, match="too long"):
        Repo.open(tmp_path / LONG / "sub")
    assert list(work.iterdir()) == [] and not (tmp_path / LONG[:255]).exists()
    # a name that fits is fine, even where the temporary sibling's name would not
    fits = work / ("z" * 240)
    mp_ok("-C", root, "checkout", "m", "-o", fits)
    assert tree_bytes(fits) == tree_bytes(family["base"])
    assert os.listdir(work) == [fits.name]
