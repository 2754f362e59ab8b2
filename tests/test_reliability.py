"""Reliability: history commands, gc and fsck, SIGKILL at random instants, corruption, and
processes running at the same time. Everything goes through the real `mp` command in real
subprocesses on real files; the store is inspected with lmdb directly where a test damages it.

The crash harness lives in tools/crash_stress.py (which runs it for thousands of kills); here it
runs 52 kills over add, merge, revert and gc --compact. docs/reliability.md has the numbers.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import crash_stress
import lmdb
import psutil
import pytest
from conftest import MP, assert_user_error, edit_db, leftovers, run_mp, store_fingerprint, tree_bytes
from crash_stress import child, random_model, run_and_kill, small_family, tree_digest

from mpstore import Repo

CHUNK = 4096
HEX32 = re.compile(r"[0-9a-f]{32}")


def mp_ok(*args, timeout: float = 120) -> str:
    proc = run_mp(*args, timeout=timeout)
    assert proc.returncode == 0, f"mp {' '.join(map(str, args))}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def new_repo(root: Path, compress: str = "delta") -> Path:
    """An empty repository with 4 KiB chunks, closed again so `mp` can have it."""
    Repo.init(root, chunk_size=CHUNK, compress=compress).close()
    return root


def add(root: Path, src: Path, branch: str, base: str | None = None, message: str | None = None) -> str:
    """A setup commit, made in this process (what `mp add` runs, without a subprocess's start-up;
    `mp add` itself is what the crash tests kill)."""
    with Repo.open(root) as repo:
        return repo.add(src, branch, base=base, message=message).commit.hex()


def resolve(root: Path, spec: str) -> str:
    with Repo.open(root) as repo:
        return repo.resolve(spec).hex()


def checks_out_as(root: Path, spec: str, expected: Path, where: Path) -> None:
    """A checkout of SPEC into a fresh folder gives exactly `expected`'s bytes (in this process:
    the code `mp checkout` runs, without paying for a subprocess at every check)."""
    out = where / f"co-{time.monotonic_ns()}"
    with Repo.open(root) as repo:
        repo.checkout(spec, out)
    assert tree_bytes(out) == tree_bytes(expected)
    shutil.rmtree(out)


def fsck_clean(root: Path) -> dict:
    proc = run_mp("-C", root, "fsck", "--json")
    report = json.loads(proc.stdout)
    assert proc.returncode == 0 and report["ok"] and report["problems"] == [], proc.stdout
    return report


def blocks(root: Path) -> int:
    return os.stat(root / ".mp" / "data.mdb").st_blocks


def wait_for_open(proc: subprocess.Popen, path: Path, timeout: float = 60) -> bool:
    """Poll until `proc` has `path` open; False if it exits first."""
    ps, target = psutil.Process(proc.pid), os.path.realpath(path)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if any(f.path == target for f in ps.open_files()):
                return True
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            return False
        time.sleep(0.001)
    return False


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Small random models, every byte distinct between them (nothing dedups across models)."""
    root = tmp_path_factory.mktemp("models")
    return {f"m{i}": random_model(root / f"m{i}", seed=1000 + i, kib=kib)
            for i, kib in enumerate([256, 256, 512, 1024, 2048, 4096])}


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    return small_family(tmp_path_factory.mktemp("fam"))


# ------------------------------------------------------------------------------ branch, tag, reset


def test_branch_create_list_delete(tmp_path, models):
    root = new_repo(tmp_path / "repo")
    c0 = add(root, models["m0"], "main")
    c1 = add(root, models["m1"], "main")
    assert "branch exp ->" in mp_ok("-C", root, "branch", "exp", "main~1")
    mp_ok("-C", root, "branch", "here")  # no REF: the last branch written
    listed = {b["name"]: b for b in json.loads(mp_ok("-C", root, "branch", "--json"))}
    assert {n: b["id"] for n, b in listed.items()} == {"main": c1, "exp": c0, "here": c1}
    assert [n for n, b in listed.items() if b["head"]] == ["main"]
    text = mp_ok("-C", root, "branch").splitlines()
    assert any(line.startswith("* main") and c1[:12] in line for line in text)
    assert any(line.startswith("  exp") and c0[:12] in line for line in text)
    checks_out_as(root, "exp", models["m0"], tmp_path)

    before = store_fingerprint(root)
    assert_user_error(run_mp("-C", root, "branch", "exp", "main"), "branch 'exp' already exists")
    assert_user_error(run_mp("-C", root, "branch", "x..y", "main"), "invalid branch name")
    assert_user_error(run_mp("-C", root, "branch", "new", "nope"), "unknown ref 'nope'")
    assert_user_error(run_mp("-C", root, "branch", "-d"), "usage: mp branch -d NAME")
    assert store_fingerprint(root) == before

    assert f"deleted branch exp (was {c0[:12]})" in mp_ok("-C", root, "branch", "-d", "exp")
    assert_user_error(run_mp("-C", root, "branch", "-d", "exp"), "unknown branch 'exp'")
    assert_user_error(run_mp("-C", root, "show", "exp"), "unknown ref 'exp'")
    assert {b["name"] for b in json.loads(mp_ok("-C", root, "branch", "--json"))} == {"main", "here"}
    checks_out_as(root, c0, models["m0"], tmp_path)  # the commit itself is still there
    fsck_clean(root)


def test_tags_never_move(tmp_path, models):
    root = new_repo(tmp_path / "repo")
    c0 = add(root, models["m0"], "main")
    mp_ok("-C", root, "tag", "v1")  # no REF: the last branch written
    mp_ok("-C", root, "tag", "v0", c0[:8])
    c1 = add(root, models["m1"], "main")  # the branch moves on; the tags stay
    before = store_fingerprint(root)
    assert_user_error(run_mp("-C", root, "tag", "v1", "main"), "tag 'v1' already exists")
    assert_user_error(run_mp("-C", root, "tag", "tags/x", "main"), "invalid tag name")
    assert_user_error(run_mp("-C", root, "tag", "-d", "nope"), "unknown tag 'nope'")
    assert store_fingerprint(root) == before
    assert resolve(root, "tags/v1") == resolve(root, "tags/v0") == c0
    assert resolve(root, "main") == c1
    assert json.loads(mp_ok("-C", root, "tag", "--json")) == [{"name": "v0", "id": c0}, {"name": "v1", "id": c0}]
    checks_out_as(root, "tags/v1", models["m0"], tmp_path)
    mp_ok("-C", root, "tag", "-d", "v1")
    assert_user_error(run_mp("-C", root, "show", "tags/v1"), "unknown ref 'tags/v1'")
    mp_ok("-C", root, "tag", "v1", "main")  # a deleted tag's name can be used again
    assert resolve(root, "tags/v1") == c1
    fsck_clean(root)


def test_reset_moves_a_branch_and_only_an_existing_one(tmp_path, models):
    root = new_repo(tmp_path / "repo")
    c0 = add(root, models["m0"], "main")
    c1 = add(root, models["m1"], "main")
    add(root, models["m2"], "other")
    assert c0[:12] in mp_ok("-C", root, "reset", "main", "main~1")
    assert resolve(root, "main") == c0
    checks_out_as(root, "main", models["m0"], tmp_path)
    mp_ok("-C", root, "reset", "main", c1)
    assert resolve(root, "main") == c1
    mp_ok("-C", root, "reset", "main", "other")
    assert resolve(root, "main") == resolve(root, "other")
    before = store_fingerprint(root)
    assert_user_error(run_mp("-C", root, "reset", "nope", "main"), "unknown branch 'nope'")
    assert_user_error(run_mp("-C", root, "reset", "main", "nope"), "unknown ref 'nope'")
    assert store_fingerprint(root) == before
    assert not any(b["name"] == "nope" for b in json.loads(mp_ok("-C", root, "branch", "--json")))


def test_reflog_records_every_move(tmp_path, family):
    """add, add, merge, revert, reset, branch: each move is one reflog entry with the old id, the
    new id, the time and the command, in order; `mp reflog` prints them newest first."""
    root = new_repo(tmp_path / "repo")
    moves = []  # (old, new, command prefix)
    a1 = add(root, family["base"], "work")
    moves.append((None, a1, "add "))
    a2 = add(root, family["expert-2"], "work", base=a1)
    moves.append((a1, a2, "add "))
    add(root, family["expert-1"], "e1", base=a1)
    m = mp_ok("-C", root, "--quiet", "merge", "--method", "ties", "--base", a1, "e1", "work",
              "--weight", "0.5", "--density", "0.5", "-b", "work").strip()
    assert HEX32.fullmatch(m), m
    moves.append((a2, m, "merge ties"))
    r = mp_ok("-C", root, "revert", "work", "-b", "work").strip()
    moves.append((m, r, f"revert {m[:12]}"))
    mp_ok("-C", root, "reset", "work", a1)
    moves.append((r, a1, f"reset work {a1}"))
    mp_ok("-C", root, "branch", "side", "work")

    entries = json.loads(mp_ok("-C", root, "reflog", "work", "--json"))
    assert [(e["old"], e["new"]) for e in entries] == [(o, n) for o, n, _ in moves]
    for e, (_, _, command) in zip(entries, moves):
        assert e["command"].startswith(command), (e["command"], command)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", e["time"])
    assert [e["time"] for e in entries] == sorted(e["time"] for e in entries)
    lines = mp_ok("-C", root, "reflog", "work").splitlines()
    assert len(lines) == len(moves)
    assert lines[0].startswith("work@{0}") and f"{r[:12]} -> {a1[:12]}" in lines[0] and "reset work" in lines[0]
    assert lines[-1].startswith(f"work@{{{len(moves) - 1}}}") and "(new)" in lines[-1]
    side = json.loads(mp_ok("-C", root, "reflog", "side", "--json"))
    assert [(e["old"], e["new"], e["command"]) for e in side] == [(None, a1, "branch side work")]
    # the reverted merge and the merge itself are still whole
    checks_out_as(root, a2, family["expert-2"], tmp_path)
    assert_user_error(run_mp("-C", root, "reflog", "nope"), "unknown branch 'nope'")
    fsck_clean(root)


def test_reflog_of_a_branch_deleted_and_created_again(tmp_path, models):
    """The deletion stays in the branch's reflog (new id nil); listing it must not crash."""
    root = new_repo(tmp_path / "repo")
    c0 = add(root, models["m0"], "main")
    mp_ok("-C", root, "branch", "b", "main")
    mp_ok("-C", root, "branch", "-d", "b")
    mp_ok("-C", root, "branch", "b", "main")
    proc = run_mp("-C", root, "reflog", "b", "--json")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert [(e["old"], e["new"]) for e in json.loads(proc.stdout)] == [(None, c0), (c0, None), (None, c0)]
    proc = run_mp("-C", root, "reflog", "b")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stdout.splitlines()) == 3


# ------------------------------------------------------------------------------ status, gc, fsck


def test_status_lists_refs_size_and_what_gc_could_reclaim(tmp_path, models):
    root = new_repo(tmp_path / "repo")
    c0 = add(root, models["m0"], "main")
    c1 = add(root, models["m1"], "other")
    mp_ok("-C", root, "tag", "v1", "main")
    st = json.loads(mp_ok("-C", root, "status", "--json"))
    assert st["head"] == "other"
    assert st["branches"] == {"main": c0, "other": c1} and st["tags"] == {"v1": c0}
    assert st["chunk_size"] == CHUNK
    assert st["store_bytes"] == blocks(root) * 512 > 0
    report = fsck_clean(root)
    assert st["entries"]["chunks"] == report["checked"]["chunks"]
    assert st["entries"]["objects"] == report["checked"]["objects"]
    assert st["reclaimable"] == {"objects": 0, "chunks": 0, "chunk_bytes": 0, "reflog_entries": 0, "catalog_entries": 0,
                                "file_cache_entries": 0}
    text = mp_ok("-C", root, "status")
    assert re.search(rf"^\* other\s+{c1[:12]}", text, re.M) and re.search(rf"^  main\s+{c0[:12]}", text, re.M)
    assert "tags/v1" in text and "reclaimable by gc: 0 B in 0 chunks and 0 objects" in text


def test_gc_keeps_what_a_live_reflog_entry_names_then_frees_it_once_expired(tmp_path, models):
    root = new_repo(tmp_path / "repo", compress="none")  # freed bytes are compared with the files'
    c0 = add(root, models["m0"], "main")
    c1 = add(root, models["m2"], "main")
    mp_ok("-C", root, "reset", "main", c0)  # c1 is now named only by main's reflog
    kept = json.loads(mp_ok("-C", root, "gc", "--json"))  # default: entries younger than 30 days live
    assert kept["objects"] == kept["chunks"] == kept["reflog_entries"] == 0
    checks_out_as(root, c1, models["m2"], tmp_path)
    fsck_clean(root)

    freed = json.loads(mp_ok("-C", root, "gc", "--expire", "now", "--json"))
    # c1's commit, snapshot, header blob, config and tokenizer blobs and every tensor
    assert freed["objects"] >= 5 and freed["reflog_entries"] == 3
    assert freed["chunk_bytes"] >= 0.9 * sum(len(b) for b in tree_bytes(models["m2"]).values())
    assert_user_error(run_mp("-C", root, "show", c1), f"unknown ref '{c1}'")
    checks_out_as(root, "main", models["m0"], tmp_path)
    fsck_clean(root)
    again = json.loads(mp_ok("-C", root, "gc", "--expire", "now", "--json"))
    assert again["objects"] == again["chunks"] == 0


def test_gc_expire_now_expires_what_was_just_deleted(tmp_path, models):
    """`--expire now` expires every reflog entry ("now (expire everything)" in gc.parse_expire),
    including one written a moment ago: `mp branch -d junk && mp gc --expire now` frees junk."""
    with Repo.init(tmp_path / "repo", chunk_size=CHUNK) as repo:
        repo.add(models["m0"], "main")
        repo.add(models["m1"], "junk")
        time.sleep(1.02 - time.time() % 1)  # start of a second: what follows happens within it
        repo.delete_branch("junk")
        freed = repo.gc("now").to_json()
        assert freed["reflog_entries"] == 3 and freed["objects"] > 0, freed


def test_gc_frees_unreachable_chunks_and_objects_and_says_how_much(tmp_path, models):
    root = new_repo(tmp_path / "repo")
    add(root, models["m0"], "main")
    junk = add(root, models["m1"], "junk")
    mp_ok("-C", root, "branch", "-d", "junk")
    # an add killed halfway through its model leaves chunks no object names
    weights = models["m4"] / "model.safetensors"
    size = weights.stat().st_size
    run = run_and_kill(child(root, "add", models["m4"], "--name", "main"), root / ".mp" / "gc.lock",
                       watch=weights, at=size // 2)
    assert run.killed and run.position < size
    st = json.loads(mp_ok("-C", root, "status", "--json"))["reclaimable"]
    assert st["chunks"] > 0 and st["objects"] == 0  # junk is still named by its reflog
    freed = json.loads(mp_ok("-C", root, "gc", "--json"))
    assert {k: freed[k] for k in st} == st
    text = mp_ok("-C", root, "gc")
    assert text.startswith("freed 0 objects, 0 chunks")
    freed = json.loads(mp_ok("-C", root, "gc", "--expire", "now", "--json"))
    assert freed["objects"] > 0 and freed["chunks"] > 0 and freed["reflog_entries"] > 0
    assert_user_error(run_mp("-C", root, "show", junk), "unknown ref")
    assert json.loads(mp_ok("-C", root, "status", "--json"))["reclaimable"]["chunks"] == 0
    checks_out_as(root, "main", models["m0"], tmp_path)
    fsck_clean(root)


def test_gc_compact_gives_space_back_and_everything_still_checks_out(tmp_path, models):
    root = new_repo(tmp_path / "repo")
    c0 = add(root, models["m0"], "main")
    c1 = add(root, models["m2"], "main")
    add(root, models["m3"], "keep")
    mp_ok("-C", root, "tag", "old", c0)
    add(root, models["m5"], "junk")  # 4 MiB
    mp_ok("-C", root, "branch", "-d", "junk")
    mp_ok("-C", root, "gc", "--expire", "now")
    plain = blocks(root)  # LMDB keeps freed pages in its file for reuse
    out = mp_ok("-C", root, "gc", "--compact", "--json")
    report = json.loads(out)
    after = blocks(root)
    assert report["file_bytes_after"] == after * 512 <= report["file_bytes_before"]
    assert after * 512 < plain * 512 - (3 << 20), (plain, after)  # the 4 MiB of junk went
    assert not (root / ".mp" / "compact.tmp").exists()
    checks_out_as(root, "main", models["m2"], tmp_path)
    checks_out_as(root, "tags/old", models["m0"], tmp_path)
    checks_out_as(root, "keep", models["m3"], tmp_path)
    assert resolve(root, "main~1") == c0 and resolve(root, "main") == c1
    fsck_clean(root)
    # the compacted store takes writes as before
    add(root, models["m4"], "after")
    checks_out_as(root, "after", models["m4"], tmp_path)
    text = mp_ok("-C", root, "gc", "--compact")
    assert re.search(r"data file: .* -> ", text)
    fsck_clean(root)


def test_fsck_is_clean_on_a_healthy_store(tmp_path, models):
    root = new_repo(tmp_path / "repo")
    empty = fsck_clean(root)
    assert empty["checked"] == {"objects": 0, "chunks": 0, "refs": 0, "chunk_bytes": 0, "catalog": 0,
                                "not_fetched": 0}
    for i in range(3):
        add(root, models[f"m{i}"], f"b{i}")
    mp_ok("-C", root, "tag", "t", "b0")
    report = fsck_clean(root)
    raw = store_fingerprint(root)
    assert report["checked"] == {"refs": 4, "objects": len(raw[b"objects"]), "chunks": len(raw[b"chunks"]),
                                 "chunk_bytes": sum(len(v) - 1 for v in raw[b"chunks"].values()),
                                 "catalog": len(raw[b"catalog"]), "not_fetched": 0}
    proc = run_mp("-C", root, "fsck")
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr.strip().endswith(": 0 problems")


# ------------------------------------------------------------------------------ SIGKILL

# 52 kills in all; tools/crash_stress.py runs the same scenarios for thousands
KILLS = {"add": 29, "revert": 10, "gc": 10, "merge": 3}
assert sum(KILLS.values()) >= 50


@pytest.mark.parametrize("command", list(KILLS))
def test_sigkill_at_random_instants_leaves_a_whole_store(tmp_path, command):
    """See tools/crash_stress.py for what is checked after each kill."""
    stats = crash_stress.run_scenario(command, tmp_path / "work", KILLS[command], seed=20261128, cli_fsck_every=8)
    print(f"{command}: {stats.to_json()}")
    assert stats.kills >= KILLS[command]


# ------------------------------------------------------------------------------ corruption


def flip(key: bytes, offset: int, bit: int = 0):
    """Flip one bit of the stored value of `key` (offsets past the end wrap into the payload)."""

    def fn(txn, db):
        value = bytearray(txn.get(key, db=db))
        i = offset if offset < len(value) else 1 + offset % (len(value) - 1)
        value[i] ^= 1 << bit
        txn.put(key, bytes(value), db=db)

    return fn


@pytest.fixture
def two_models(tmp_path, models):
    """`base` (m3) and `other` (m2) in a closed 4 KiB-chunk repository of raw chunks (the damage
    below is to raw bytes; tests/test_compression.py damages compressed ones), plus their ids."""
    root = new_repo(tmp_path / "repo", compress="none")
    return root, add(root, models["m3"], "base", message="the base"), add(root, models["m2"], "other")


def _chunk_of(root: Path, spec: str, what: str) -> tuple[bytes, str]:
    """A chunk of `spec`'s snapshot and the name fsck should give for its user."""
    with Repo.open(root) as repo, repo.store.read() as r:
        snap = r.object(r.object(repo.resolve(spec)).snapshot)
        if what == "tensor":
            name = sorted(snap.tensors)[len(snap.tensors) // 2]
            chunks = r.object(snap.tensors[name]).chunks
            return chunks[len(chunks) // 2], f"tensor {name!r}"
        if what == "header":
            return r.object(snap.shards[0].header).chunks[0], f"header of {snap.shards[0].file!r}"
        return r.object(snap.files["config.json"]).chunks[0], "file 'config.json'"


@pytest.mark.parametrize("what", ["tensor", "header", "file"])
def test_a_flipped_byte_in_a_chunk_is_caught_by_fsck_and_checkout(two_models, tmp_path, models, what):
    root, base, other = two_models
    key, user = _chunk_of(root, "base", what)
    edit_db(root, b"chunks", flip(key, 1 + random.Random(what).randrange(100), bit=3))
    before = store_fingerprint(root)

    proc = run_mp("-C", root, "fsck")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    (line,) = proc.stdout.splitlines()
    assert line == (f"chunk {key.hex()}: bytes do not match its digest "
                    f"(used by {user} of commit {base[:12]} (the base))")
    report = json.loads(run_mp("-C", root, "fsck", "--json").stdout)
    assert report["ok"] is False and report["problems"] == [line]

    # checkout refuses in one line naming the damaged tensor or file, and writes nothing
    named = {"tensor": "model.safetensors: " + user, "header": "model.safetensors: header",
             "file": "config.json: chunk"}[what]
    area = tmp_path / "area"
    area.mkdir()
    assert_user_error(run_mp("-C", root, "checkout", "base", "-o", area / "out"), named, key.hex(),
                      "does not match its digest")
    assert list(area.iterdir()) == []  # no target, no temporary folder
    (area / "mine").mkdir()
    (area / "mine" / "keep.txt").write_text("keep")
    assert_user_error(run_mp("-C", root, "checkout", "base", "-o", area / "mine", "--force"), named)
    assert tree_bytes(area / "mine") == {"keep.txt": b"keep"} and leftovers(area) == []
    checks_out_as(root, "other", models["m2"], tmp_path)  # the damage is contained
    assert store_fingerprint(root) == before  # reading never rewrites anything


def test_every_random_corruption_is_detected(two_models):
    """Seeded: 40 single-bit flips in random chunks (codec byte or payload), 10 in random objects,
    5 deleted chunks, each on its own and undone after: fsck reports every one."""
    root, base, other = two_models
    rng = random.Random(7)
    with Repo.open(root) as repo, repo.store.read() as r:
        chunk_keys = sorted(k for k, _ in r.chunks())
        object_keys = sorted(k for k, _ in r.objects())
    cases = [("chunk", k) for k in rng.sample(chunk_keys, 40)] + [("object", k) for k in rng.sample(object_keys, 10)]
    cases += [("missing", k) for k in rng.sample(chunk_keys, 5)]
    detected = 0
    for kind, key in cases:
        db = b"objects" if kind == "object" else b"chunks"
        saved = {}
        edit_db(root, db, lambda txn, d, key=key, saved=saved: saved.setdefault("v", bytes(txn.get(key, db=d))))
        if kind == "missing":
            edit_db(root, db, lambda txn, d, key=key: txn.delete(key, db=d))
        else:
            edit_db(root, db, flip(key, rng.randrange(len(saved["v"])), rng.randrange(8)))
        with Repo.open(root) as repo:
            problems = repo.fsck().problems
        hit = [p for p in problems if key.hex() in p]
        assert hit, (kind, key.hex(), problems)
        if kind != "object":
            assert all("used by " in p and " of commit " in p for p in hit), hit
        detected += 1
        edit_db(root, db, lambda txn, d, key=key, saved=saved: txn.put(key, saved["v"], db=d))
    with Repo.open(root) as repo:
        assert repo.fsck().problems == []
    print(f"corruptions detected: {detected} of {len(cases)}")
    assert detected == len(cases) == 55


def test_a_ref_to_a_missing_commit_is_reported(two_models):
    root, base, other = two_models
    edit_db(root, b"objects", lambda txn, d: txn.delete(bytes.fromhex(other), db=d))
    proc = run_mp("-C", root, "fsck")
    assert proc.returncode == 1
    assert f"ref heads/other: object {other} is missing" in proc.stdout.splitlines()


# ------------------------------------------------------------------------------ concurrency


def test_readers_see_the_old_or_the_new_state_while_a_merge_writes(tmp_path, family):
    """checkout, diff and log run in a loop, as `mp` subprocesses, while `mp merge` writes to the
    branch they read (its chunks in 64 KiB transactions, one thread): every one succeeds and
    shows the branch as it was (the base) or as the merge left it, byte for byte."""
    root = tmp_path / "repo"
    with Repo.init(root, chunk_size=CHUNK) as repo:
        repo.add(family["base"], "base")
        repo.add(family["expert-1"], "e1", base="base")
        repo.add(family["expert-2"], "e2", base="base")
        repo.create_branch("m", "base")
    merge = ["merge", "--method", "task_arithmetic", "--base", "base", "e1", "e2", "-b", "m"]

    def state() -> tuple:
        """What `mp checkout m`, `mp diff base m --json` and `mp log m --json` show now."""
        out = tmp_path / f"state-{time.monotonic_ns()}"
        with Repo.open(root) as repo:
            repo.checkout("m", out)
            diff = json.dumps(repo.diff("base", "m").to_json(), indent=2) + "\n"
            log = json.dumps([e.to_json() for e in repo.log("m")], indent=2) + "\n"
        st = (json.dumps(tree_digest(out)), diff, log)
        shutil.rmtree(out)
        return st

    old = state()
    proc = subprocess.Popen(child(root, *merge, "--weight", "0.7", "--threads", "1", "--memory-limit", "1MB"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=crash_stress.child_env())
    assert wait_for_open(proc, root / ".mp" / "gc.lock"), proc.communicate()
    writing_since = time.monotonic()
    seen: list[tuple[str, float, str]] = []  # (what, start, result)
    errors: list[str] = []

    def reader(kind: str, i: int) -> None:
        while proc.poll() is None:
            start = time.monotonic()
            if kind == "checkout":
                out = tmp_path / f"r{i}-{time.monotonic_ns()}"
                p = run_mp("-C", root, "checkout", "m", "-o", out)
                result = json.dumps(tree_digest(out)) if p.returncode == 0 else None
                shutil.rmtree(out, ignore_errors=True)
            else:
                p = run_mp("-C", root, kind, *(["base", "m"] if kind == "diff" else ["m"]), "--json")
                result = p.stdout
            if p.returncode != 0 or "Traceback" in p.stderr:
                errors.append(f"{kind}: exit {p.returncode}: {p.stderr}")
            seen.append((kind, start, result))

    threads = [threading.Thread(target=reader, args=(k, i)) for i, k in enumerate(["checkout", "diff", "log"])]
    for t in threads:
        t.start()
    out, err = proc.communicate(timeout=120)
    merge_end = time.monotonic()
    for t in threads:
        t.join()
    assert proc.returncode == 0, err
    new = state()
    assert errors == []
    slot = {"checkout": 0, "diff": 1, "log": 2}
    for kind, _start, result in seen:
        assert result in (old[slot[kind]], new[slot[kind]]), f"{kind} saw a state that is neither old nor new"
    during = [s for s in seen if s[1] >= writing_since]
    assert len(during) >= 3, f"only {len(during)} reads ran while the merge was writing"
    assert all(start < merge_end for _, start, _ in seen)
    assert old != new and resolve(root, "m") == out.strip()
    fsck_clean(root)


def test_two_writers_at_once_serialise_and_no_reader_sees_half_a_commit(tmp_path, models):
    root = new_repo(tmp_path / "repo")
    c0 = add(root, models["m0"], "x")
    sources = {"m3": models["m3"], "m4": models["m4"], "m0": models["m0"]}
    digests = {name: tree_digest(src) for name, src in sources.items()}
    stop = threading.Event()
    reads: list[str] = []
    problems: list[str] = []

    def reader() -> None:
        """Reads every branch in this process while both writers run: each must be whole."""
        with Repo.open(root) as repo:
            while not stop.is_set():
                for branch in repo.branches():
                    out = tmp_path / f"read-{time.monotonic_ns()}"
                    try:
                        repo.checkout(branch, out)
                        d = tree_digest(out)
                        if d not in digests.values():
                            problems.append(f"{branch} checked out as none of the models")
                        reads.append(branch)
                    except Exception as e:  # noqa: BLE001 - any failure is the finding
                        problems.append(f"{branch}: {type(e).__name__}: {e}")
                    finally:
                        shutil.rmtree(out, ignore_errors=True)

    def both(args_a, args_b) -> list[str]:
        procs = [subprocess.Popen(child(root, *a), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=crash_stress.child_env()) for a in (args_a, args_b)]
        outs = [p.communicate(timeout=120) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outs
        return [o.strip() for o, _ in outs]

    t = threading.Thread(target=reader)
    t.start()
    try:
        # two adds to one branch: both commits end up chained on it, in some order
        ids = both(["add", models["m3"], "--name", "x"], ["add", models["m4"], "--name", "x"])
        # two adds to two new branches
        y, z = both(["add", models["m4"], "--name", "y"], ["add", models["m3"], "--name", "z"])
    finally:
        stop.set()
        t.join()
    assert problems == []
    assert len(reads) > 0
    head, mid = resolve(root, "x"), resolve(root, "x~1")
    assert {head, mid} == set(ids) and resolve(root, "x~2") == c0
    by_id = dict(zip(ids, ["m3", "m4"]))
    checks_out_as(root, head, sources[by_id[head]], tmp_path)
    checks_out_as(root, mid, sources[by_id[mid]], tmp_path)
    assert resolve(root, "y") == y and resolve(root, "z") == z
    checks_out_as(root, "y", models["m4"], tmp_path)
    checks_out_as(root, "z", models["m3"], tmp_path)
    assert json.loads(mp_ok("-C", root, "status", "--json"))["head"] in ("y", "z")
    fsck_clean(root)


def test_gc_during_a_slow_add_neither_breaks_it_nor_frees_its_chunks(tmp_path, models):
    root = new_repo(tmp_path / "repo")
    add(root, models["m0"], "main")
    add(root, models["m3"], "junk")
    mp_ok("-C", root, "branch", "-d", "junk")
    src = models["m5"]
    proc = subprocess.Popen(child(root, "add", src, "--name", "slow"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=crash_stress.child_env())
    assert wait_for_open(proc, root / ".mp" / "gc.lock"), proc.communicate()
    gcs = []
    while proc.poll() is None and len(gcs) < 4:
        gcs.append((time.monotonic(), subprocess.Popen([*MP, "-C", str(root), "gc", "--expire", "now", "--json"],
                                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
        time.sleep(0.05)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    freed = []
    for _started, g in gcs:
        o, e = g.communicate(timeout=120)
        assert g.returncode == 0, e
        freed.append(json.loads(o))
    assert gcs, "the add finished before any gc could start"
    assert sum(f["objects"] for f in freed) > 0  # the junk went, the add's chunks did not
    assert resolve(root, "slow") == out.strip()
    checks_out_as(root, "slow", src, tmp_path)
    checks_out_as(root, "main", models["m0"], tmp_path)
    fsck_clean(root)


def _pause_when_writing(proc: subprocess.Popen) -> None:
    """SIGSTOP `proc` once it has written into a weights file in checkout's temporary folder."""
    ps = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            if any(".mp-tmp-" in f.path and f.path.endswith(".safetensors") and f.position > 0
                   for f in ps.open_files()):
                proc.send_signal(signal.SIGSTOP)
                return
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            break
    raise AssertionError(f"checkout ended before it was seen writing weights: {proc.communicate()}")


def test_gc_while_a_checkout_reads(tmp_path, models):
    """A checkout paused halfway keeps its view: meanwhile its branch is deleted and gc frees every
    chunk it is reading, yet it completes bit-exact. gc --compact refuses while it has the store."""
    root = new_repo(tmp_path / "repo")
    add(root, models["m0"], "keep")
    gone = add(root, models["m5"], "gone")
    out = tmp_path / "out"
    proc = subprocess.Popen([*MP, "-C", str(root), "checkout", "gone", "-o", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _pause_when_writing(proc)
        mp_ok("-C", root, "branch", "-d", "gone")
        freed = json.loads(mp_ok("-C", root, "gc", "--expire", "now", "--json"))
        assert freed["chunks"] >= 1000  # every chunk of the model the checkout is reading
        add(root, models["m4"], "new")  # and new writes may reuse the freed pages
        busy = run_mp("-C", root, "gc", "--compact")
        assert_user_error(busy, "another process has the repository open")
    finally:
        proc.send_signal(signal.SIGCONT)
    o, e = proc.communicate(timeout=120)
    assert proc.returncode == 0, e
    assert tree_bytes(out) == tree_bytes(models["m5"])
    assert_user_error(run_mp("-C", root, "show", gone), "unknown ref")
    checks_out_as(root, "new", models["m4"], tmp_path)
    fsck_clean(root)


def _holds_exclusive_flock(pid: int, path: Path) -> bool:
    ino = os.stat(path).st_ino
    with open("/proc/locks") as f:
        for line in f:
            fields = line.split()
            if "->" in fields:
                continue
            if (fields[1] == "FLOCK" and fields[3] == "WRITE" and int(fields[4]) == pid
                    and int(fields[5].rsplit(":", 1)[1]) == ino):
                return True
    return False


def test_an_add_started_while_gc_compacts_keeps_its_commit(tmp_path, models):
    """gc --compact holds the store to itself; an `mp add` that starts meanwhile waits for it and
    must then write into the compacted file, not into the old one that the rename replaced.
    (The compaction is paused with SIGSTOP while it holds its exclusive lock, to make the window
    as wide as a long compaction of a large store.)"""
    root = new_repo(tmp_path / "repo")
    add(root, models["m3"], "main")
    add(root, models["m5"], "junk")
    mp_ok("-C", root, "branch", "-d", "junk")
    gc = subprocess.Popen([*MP, "-C", str(root), "gc", "--expire", "now", "--compact"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    late = None
    try:
        while not _holds_exclusive_flock(gc.pid, root / ".mp" / "open.lock"):
            assert gc.poll() is None, f"gc ended before it was seen compacting: {gc.communicate()}"
        gc.send_signal(signal.SIGSTOP)
        late = subprocess.Popen([*MP, "-C", str(root), "--quiet", "add", str(models["m4"]), "--name", "late"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # it opens the lock file (before or after mapping the data file) and waits for the lock
        assert wait_for_open(late, root / ".mp" / "open.lock", timeout=30)
        time.sleep(0.3)
    finally:
        gc.send_signal(signal.SIGCONT)
    g_out, g_err = gc.communicate(timeout=120)
    assert gc.returncode == 0, g_err
    out, err = late.communicate(timeout=120)
    assert late.returncode == 0, err
    printed = out.strip()
    st = json.loads(mp_ok("-C", root, "status", "--json"))
    assert st["branches"].get("late") == printed, f"`mp add` printed {printed} and exited 0, but branches are {st['branches']}"
    checks_out_as(root, "late", models["m4"], tmp_path)
    fsck_clean(root)


def _in_read_txn(env: lmdb.Environment, pid: int) -> bool:
    """Whether process `pid` has a read transaction open on the store (LMDB's reader table)."""
    for line in env.readers().splitlines()[1:]:
        fields = line.split()
        if len(fields) == 3 and fields[0] == str(pid) and fields[2] != "-":
            return True
    return False


def test_a_branch_made_while_gc_runs_names_a_whole_commit(tmp_path, models):
    """`mp branch rescue ID` while `mp gc --expire now` runs, ID being a commit only an expired
    reflog entry names: either the branch cannot be made (the commit is gone) or the commit must
    survive whole. gc is paused (SIGSTOP) while it decides what is garbage (its read transaction,
    seen in LMDB's reader table, with gc.lock held); `mp branch` starts (and is made at once or
    waits for gc); gc goes on."""
    import torch
    from safetensors.torch import save_file

    root = new_repo(tmp_path / "repo")
    add(root, models["m0"], "main")
    junk = tmp_path / "junk"
    junk.mkdir()
    g = torch.Generator().manual_seed(5)  # many small objects: gc takes a while to decide
    save_file({f"t{k}": torch.randn(3, generator=g) for k in range(4000)}, str(junk / "model.safetensors"))
    cid = add(root, junk, "junk")
    mp_ok("-C", root, "branch", "-d", "junk")
    env = lmdb.open(str(root / ".mp"), max_dbs=8, subdir=True, readonly=True)
    gc = subprocess.Popen(child(root, "gc", "--expire", "now"), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=crash_stress.child_env())
    ps = psutil.Process(gc.pid)
    lock = os.path.realpath(root / ".mp" / "gc.lock")
    paused = False
    try:
        while gc.poll() is None and not paused:
            if _in_read_txn(env, gc.pid):
                gc.send_signal(signal.SIGSTOP)
                if _in_read_txn(env, gc.pid) and any(f.path == lock for f in ps.open_files()):
                    paused = True
                else:
                    gc.send_signal(signal.SIGCONT)
        assert paused, "gc finished before it was seen deciding what to delete"
        rescue = subprocess.Popen([*MP, "-C", str(root), "branch", "rescue", cid], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        try:
            rescue.wait(timeout=3)  # made at once, or waiting for gc to finish
        except subprocess.TimeoutExpired:
            pass
    finally:
        gc.send_signal(signal.SIGCONT)
        env.close()
    gc.communicate(timeout=120)
    assert gc.returncode == 0
    out, err = rescue.communicate(timeout=120)
    if rescue.returncode != 0:  # refused: the commit was gone by the time the branch was made
        assert_user_error(subprocess.CompletedProcess(rescue.args, rescue.returncode, out, err), cid[:12])
        fsck_clean(root)
        return
    assert resolve(root, "rescue") == cid
    fsck_clean(root)
    checks_out_as(root, "rescue", junk, tmp_path)


def test_fsck_catches_a_catalog_entry_that_does_not_match_its_chunks(tmp_path, family):
    """A wrong catalog entry would silently steer budgeted merges: fsck re-measures each one."""
    import msgpack

    root = new_repo(tmp_path / "repo")
    add(root, family["base"], "base")
    add(root, family["expert-1"], "e1", base="base")
    report = fsck_clean(root)
    entries = store_fingerprint(root)[b"catalog"]
    assert report["checked"]["catalog"] == len(entries) > 0
    key, value = sorted(entries.items())[len(entries) // 2]
    fields = msgpack.unpackb(value)
    fields[2] *= 1.5  # the L2 norm

    edit_db(root, b"catalog", lambda txn, db: txn.put(key, msgpack.packb(fields, use_bin_type=True), db=db))
    proc = run_mp("-C", root, "fsck")
    assert proc.returncode == 1 and proc.stdout.splitlines() == [f"catalog entry {key.hex()} does not match its chunks"]
    edit_db(root, b"catalog", lambda txn, db: txn.put(key, b"\x93garbage", db=db))
    proc = run_mp("-C", root, "fsck")
    assert proc.returncode == 1 and proc.stdout.splitlines() == [
        f"catalog entry {key.hex()} is outdated or damaged (`mp gc` removes it)"]
    assert "1 catalog entries" in mp_ok("-C", root, "gc", "--expire", "now")  # derived data: dropped
    assert fsck_clean(root)["checked"]["catalog"] == len(entries) - 1
