"""Compressed chunks in a real store: identity unchanged, byte-identical reads, bit-identical
merges against a raw store, deltas kept whole by gc and fsck, damaged references never decoded
into wrong bytes, recompression (killed at random instants too), and deltas across remotes."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from conftest import MP, assert_user_error, edit_db, run_mp, tree_bytes
from make_family import make_family

from mpstore import Repo
from mpstore.errors import CorruptData
from mpstore.merge.request import MergeRequest
from mpstore.store.codecs import reference_of

CHUNK_SIZE = 4096
MODELS = (("base", "base", None), ("expert-1", "e1", "base"), ("expert-2", "e2", "base"), ("expert-3", "e3", "base"))


def _filled(path, family, compress: str) -> Repo:
    repo = Repo.init(path, chunk_size=CHUNK_SIZE, compress=compress)
    for folder, branch, base in MODELS:
        repo.add(family[folder], branch, base=base)
    return repo


def _codecs(repo: Repo) -> dict[str, int]:
    return repo.status().space.chunks


@pytest.fixture
def delta_repo(tmp_path, family) -> Repo:
    repo = _filled(tmp_path / "delta", family, "delta")
    yield repo
    repo.close()


def test_ids_and_bytes_are_those_of_a_raw_store(tmp_path, family, delta_repo):
    with _filled(tmp_path / "raw", family, "none") as raw:
        for _, branch, _ in MODELS:
            assert delta_repo.resolve(branch) != b""  # commits differ in time; snapshots must not
            assert delta_repo.commit(branch).commit.snapshot == raw.commit(branch).commit.snapshot
        assert set(_codecs(raw)) == {"raw"}
    codecs = _codecs(delta_repo)
    assert codecs.get("delta", 0) > 0 and codecs.get("planes", 0) > 0
    space = delta_repo.status().space
    assert space.ratio is not None and space.ratio < 0.8
    for folder, branch, _ in MODELS:
        delta_repo.checkout(branch, tmp_path / "out" / branch)
        assert tree_bytes(tmp_path / "out" / branch) == tree_bytes(family[folder])
    assert delta_repo.fsck().ok


@pytest.mark.parametrize("method,params,budget", [
    ("ties", {"weight": 1.0, "density": 0.5}, None),
    ("task_arithmetic", {"weight": 0.5}, None),
    ("dare_ties", {"weight": 1.0, "density": 0.3}, None),
    ("ties", {"weight": 1.0, "density": 0.5}, "30%"),
])
def test_merges_are_bit_identical_to_a_raw_store(tmp_path, family, delta_repo, method, params, budget):
    request = MergeRequest(method, "base", ["e1", "e2", "e3"], [dict(params)] * 3, {}, "F32", "BF16")
    with _filled(tmp_path / "raw", family, "none") as raw:
        want = raw.merge(request, "m", budget=budget)
        with raw.store.read() as r:
            snap = r.commit(want.commit).snapshot
    got = delta_repo.merge(request, "m", budget=budget)
    with delta_repo.store.read() as r:
        assert r.commit(got.commit).snapshot == snap
        # new output chunks are deltas against the base's chunk at their position (the encoder is
        # handed the block's decoded base chunk); fsck below decodes each against its reference
        merged, base = r.snapshot(snap), r.snapshot(r.commit(delta_repo.resolve("base")).snapshot)
        refs = {reference_of(v) for name, t in merged.tensors.items()
                for c in r.tensor(t).chunks if c not in r.tensor(base.tensors[name]).chunks
                if (v := r.stored_chunk(c)) is not None}
        assert refs - {None} and refs - {None} <= {c for t in base.tensors.values() for c in r.tensor(t).chunks}
    assert delta_repo.fsck().ok


def test_a_store_mixing_codecs_merges_as_a_raw_one(tmp_path, family):
    """Models added under different policies (recompress switches them midway) merge the same."""
    request = MergeRequest("ties", "base", ["e1", "e2"], [{"weight": 1.0, "density": 0.5}] * 2, {}, "F32", None)
    with Repo.init(tmp_path / "mixed", chunk_size=CHUNK_SIZE, compress="none") as repo:
        repo.add(family["base"], "base")
        repo.gc(recompress="planes")
        repo.add(family["expert-1"], "e1", base="base")
        repo.gc(recompress="delta")
        repo.add(family["expert-2"], "e2", base="base")
        assert {"planes", "delta"} <= set(_codecs(repo))
        got = repo.merge(request, "m")
        with repo.store.read() as r:
            snap = r.commit(got.commit).snapshot
    with _filled(tmp_path / "raw", family, "none") as raw:
        want = raw.merge(request, "m")
        with raw.store.read() as r:
            assert r.commit(want.commit).snapshot == snap


def _a_delta_and_its_reference(repo: Repo, branch: str) -> tuple[bytes, bytes]:
    with repo.store.read() as r:
        for tid in r.snapshot_of(repo.resolve(branch)).tensors.values():
            for key in r.tensor(tid).chunks:
                value = r.stored_chunk(key)
                if value is not None and value[0] == 2:
                    ref = reference_of(value)
                    assert ref is not None
                    return key, ref
    raise AssertionError("no delta chunk")


def test_a_damaged_reference_is_never_decoded_into_wrong_bytes(tmp_path, family, delta_repo):
    key, ref = _a_delta_and_its_reference(delta_repo, "e1")
    delta_repo.close()
    root = tmp_path / "delta"

    def flip(txn, db):
        value = bytearray(txn.get(ref, db=db))
        value[len(value) // 2] ^= 0x01
        txn.put(ref, bytes(value), db=db)

    edit_db(root, b"chunks", flip)
    proc = run_mp("checkout", "e1", "-o", tmp_path / "out", cwd=root)
    assert_user_error(proc, ref.hex())
    assert not (tmp_path / "out").exists()
    fsck = run_mp("fsck", cwd=root)
    assert fsck.returncode == 1 and ref.hex() in fsck.stdout
    with Repo.open(root) as repo, repo.store.read() as r, pytest.raises(CorruptData):
        r.chunk(key)


def test_gc_keeps_the_references_of_live_deltas(tmp_path, family, delta_repo):
    _, ref = _a_delta_and_its_reference(delta_repo, "e1")
    for branch in ("base", "e2", "e3"):
        delta_repo.delete_branch(branch)
    freed = delta_repo.gc(expire="now")
    assert freed.freed.chunks > 0
    with delta_repo.store.read() as r:
        assert r.has_chunk(ref)  # the base is gone from every ref, its chunk is not
    delta_repo.checkout("e1", tmp_path / "out")
    assert tree_bytes(tmp_path / "out") == tree_bytes(family["expert-1"])
    assert delta_repo.fsck().ok


def test_recompress_round_trip(tmp_path, family, delta_repo):
    before = delta_repo.status().space
    snapshots = {b: delta_repo.commit(b).commit.snapshot for _, b, _ in MODELS}
    for policy in ("none", "planes", "delta", "none"):
        done = delta_repo.gc(recompress=policy, compact=True)
        assert done.recompressed is not None
        codecs = set(_codecs(delta_repo))
        assert codecs == {"none": {"raw"}, "planes": {"planes", "raw"}, "delta": {"delta", "planes", "raw"}}[policy]
        assert {b: delta_repo.commit(b).commit.snapshot for _, b, _ in MODELS} == snapshots
        assert delta_repo.fsck().ok
        for folder, branch, _ in MODELS[:2]:
            out = tmp_path / f"{policy}-{branch}-{time.monotonic_ns()}"
            delta_repo.checkout(branch, out)
            assert tree_bytes(out) == tree_bytes(family[folder])
    assert delta_repo.status().compress == "none"
    after_raw = delta_repo.status().space
    assert sum(before.stored.values()) < 0.8 * sum(after_raw.stored.values())
    assert_user_error(run_mp("gc", "--recompress", "zip", cwd=tmp_path / "delta"), "invalid compression")


@pytest.fixture(scope="module")
def medium_family(tmp_path_factory):
    """~6 MB models: enough work that a kill lands while chunks are being stored again."""
    return make_family(tmp_path_factory.mktemp("medium"), experts=3, seed=3)


def test_sigkill_during_recompression_leaves_a_valid_store(tmp_path, medium_family):
    """Kill `mp gc --recompress` after its first transactions (a little later each time),
    alternating the policy: after every kill fsck is clean and every model checks out
    byte-identical; at least one kill lands with chunks half stored again; a rerun finishes."""
    root = tmp_path / "repo"
    _filled(root, medium_family, "none").close()
    data = root / ".mp" / "data.mdb"
    env = {**os.environ, "MP_AUTHOR": "t"}
    midway = 0
    for i, policy in enumerate(["delta", "planes", "delta", "none"]):
        with Repo.open(root) as repo:
            before = _codecs(repo)
        proc = subprocess.Popen([*MP, "gc", "--recompress", policy], cwd=root, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(3):  # gc's, the policy's, then a first batch of chunks stored again
            written = data.stat().st_mtime_ns
            while proc.poll() is None and data.stat().st_mtime_ns == written:
                time.sleep(0.002)
        time.sleep(0.02 * i)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        with Repo.open(root) as repo:
            assert repo.fsck().ok
            midway += proc.returncode == -signal.SIGKILL and _codecs(repo) != before
            for folder, branch, _ in MODELS:
                out = tmp_path / f"o-{i}-{branch}"
                repo.checkout(branch, out)
                assert tree_bytes(out) == tree_bytes(medium_family[folder])
    assert midway
    assert run_mp("gc", "--recompress", "delta", cwd=root).returncode == 0
    with Repo.open(root) as repo:
        assert repo.fsck().ok and repo.status().compress == "delta"


@pytest.mark.parametrize("kind", ["path", "s3"])
def test_deltas_travel_with_their_references(tmp_path, family, delta_repo, kind, request):
    """Chunks travel as stored: deltas arrive after their references and are checked against
    them; a lazy clone reading a delta fetches its reference too."""
    if kind == "s3":
        url = request.getfixturevalue("s3_url")
    else:
        Repo.init(tmp_path / "remote", chunk_size=CHUNK_SIZE, compress="none").close()
        url = str(tmp_path / "remote")
    delta_repo.remote_add("origin", url)
    pushed = delta_repo.push("origin", ["e1"])  # e1 only: its deltas' references come along
    raw_bytes = sum(delta_repo.status().space.logical.values())
    assert pushed.chunk_bytes < raw_bytes
    for lazy in (False, True):
        repo, _ = Repo.clone(url, tmp_path / f"clone-{lazy}", lazy=lazy)
        with repo:
            repo.checkout("origin/e1", tmp_path / f"out-{lazy}")
            assert tree_bytes(tmp_path / f"out-{lazy}") == tree_bytes(family["expert-1"])
            assert repo.fsck().ok
            assert "delta" in _codecs(repo)


def test_a_reference_is_decoded_once_for_both_readers():
    """What `mp add --base`'s catalog and encoder both need: decoded by the first to ask, the
    other waits for it; a failed decode is not kept; the oldest go past the limit."""
    import threading

    from mpstore.store.chunks import Decoded

    kept = Decoded(2)
    calls: list[bytes] = []
    started, release = threading.Event(), threading.Event()

    def slow() -> memoryview:
        calls.append(b"a")
        started.set()
        release.wait(5)
        return memoryview(b"A" * 10)

    got: list[bytes] = []
    first = threading.Thread(target=lambda: got.append(bytes(kept.get(b"a", slow))))
    first.start()
    started.wait(5)
    second = threading.Thread(target=lambda: got.append(bytes(kept.get(b"a", slow))))
    second.start()
    release.set()
    first.join(5)
    second.join(5)
    assert got == [b"A" * 10] * 2 and calls == [b"a"]  # decoded once, both got it

    def broken() -> memoryview:
        raise CorruptData("damaged")

    with pytest.raises(CorruptData):
        kept.get(b"b", broken)
    assert bytes(kept.get(b"a", lambda: memoryview(b"again"))) == b"again"  # the second reader took it away
    assert bytes(kept.get(b"b", lambda: memoryview(b"B"))) == b"B"  # the failure was not kept
    kept.get(b"c", lambda: memoryview(b"C"))
    kept.get(b"d", lambda: memoryview(b"D"))
    assert bytes(kept.get(b"b", lambda: memoryview(b"new"))) == b"new"  # pushed out by c and d: decoded anew
