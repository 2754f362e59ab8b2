"""Remotes: clone, fetch, pull, push and lazy clones against another repository on a path and
against a real S3-protocol server (moto's, started by the tests), with the real boto3 client.

Every round trip is checked byte for byte against the folders that were added; every refusal is
one line with the store unchanged."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import MP, assert_user_error, run_mp, store_fingerprint, tree_bytes

from mpstore import Repo
from mpstore.errors import Rejected
from mpstore.remote.connect import open_transport
from mpstore.remote.transport import CHUNK, OBJECT

CHUNK_SIZE = 4096  # tiny models: many chunks each


@pytest.fixture(params=["path", "s3"])
def remote(request, tmp_path) -> str:
    """An empty remote of either kind: a fresh repository's folder, or a fresh bucket prefix."""
    if request.param == "s3":
        return request.getfixturevalue("s3_url")
    Repo.init(tmp_path / "remote", chunk_size=CHUNK_SIZE).close()
    return str(tmp_path / "remote")


@pytest.fixture
def source(tmp_path, family) -> Repo:
    """A repository holding base and experts 1 and 2 (each with --base base) on branches."""
    r = Repo.init(tmp_path / "src", chunk_size=CHUNK_SIZE)
    r.add(family["base"], "base")
    r.add(family["expert-1"], "e1", base="base")
    r.add(family["expert-2"], "e2", base="base")
    yield r
    r.close()


def _checked_out(repo: Repo, ref: str, where: Path) -> dict[str, bytes]:
    repo.checkout(ref, where)
    return tree_bytes(where)


def test_push_then_clone_is_byte_identical(source, remote, family, tmp_path):
    source.remote_add("origin", remote)
    sent = source.push("origin", ["base", "e1", "e2"])
    assert sorted(n for n, _, _ in sent.refs) == ["heads/base", "heads/e1", "heads/e2"]
    repo, got = Repo.clone(remote, tmp_path / "clone")
    with repo:
        assert got.chunks == sent.chunks and got.objects == sent.objects
        assert got.catalog == sent.catalog > 0  # budgeted merges in the clone plan without reading
        for ref, folder in (("origin/base", "base"), ("origin/e1", "expert-1"), ("origin/e2", "expert-2")):
            assert _checked_out(repo, ref, tmp_path / "out" / folder) == tree_bytes(family[folder])
            assert repo.resolve(ref) == source.resolve(folder.replace("expert-", "e"))
        assert repo.fsck().ok
        assert [c.id for c in repo.log("origin/e2")] == [c.id for c in source.log("e2")]


def test_push_sends_only_what_the_remote_lacks(source, remote, family, tmp_path):
    source.remote_add("origin", remote)
    first = source.push("origin", ["base"])
    with source.store.read() as r:
        base_chunks = {k for t in r.snapshot_of(source.resolve("base")).tensors.values() for k in r.tensor(t).chunks}
        e2_chunks = {k for t in r.snapshot_of(source.resolve("e2")).tensors.values() for k in r.tensor(t).chunks}
    second = source.push("origin", ["e2"])
    new = e2_chunks - base_chunks
    assert 0 < len(new) < len(e2_chunks)  # a partial fine-tune shares chunks with its base
    assert second.chunks <= len(new) + 8  # the partial expert's new tensor chunks, plus its config and header blobs
    assert first.chunks + second.chunks == len(_remote_keys(remote, CHUNK))
    again = source.push("origin", ["e2"])
    assert again.chunks == 0 and again.up_to_date == ["heads/e2"]


def _remote_keys(url: str, kind: int) -> set[bytes]:
    t = open_transport(url, None)
    try:
        return t.holdings(kind)
    finally:
        t.close()


def test_fetch_and_pull_fast_forward(source, remote, family, tmp_path):
    source.remote_add("origin", remote)
    source.push("origin", ["base"])
    repo, _ = Repo.clone(remote, tmp_path / "clone")
    with repo:
        assert repo.current_branch() == "base"
        source.add(family["expert-1"], "base", message="expert on base")  # base moves on at the source
        source.push("origin", ["base"])
        pulled = repo.pull("origin")
        assert pulled.new == source.resolve("base") and pulled.old != pulled.new
        assert repo.resolve("base") == source.resolve("base")
        assert _checked_out(repo, "base", tmp_path / "o") == tree_bytes(family["expert-1"])
        repo.add(family["expert-2"], "base", message="local work")  # diverge: the clone moves on alone
        source.add(family["expert-3"], "base", message="remote work")
        source.push("origin", ["base"])
        before = repo.resolve("base")
        with pytest.raises(Rejected, match="not a fast-forward"):
            repo.pull("origin")
        assert repo.resolve("base") == before
        assert repo.resolve("origin/base") == source.resolve("base")  # the fetch itself happened


def test_push_refuses_non_fast_forward_unless_forced(source, remote, family, tmp_path):
    source.remote_add("origin", remote)
    source.push("origin", ["base"])
    repo, _ = Repo.clone(remote, tmp_path / "clone")
    with repo:
        repo.add(family["expert-1"], "base", message="theirs")
        repo.push("origin")
        source.add(family["expert-2"], "base", message="ours")
        with pytest.raises(Rejected, match="fetch first"):
            source.push("origin", ["base"])
        source.fetch("origin")
        with pytest.raises(Rejected, match="not a fast-forward"):
            source.push("origin", ["base"])
        assert _remote_ref(remote, "heads/base") == repo.resolve("base")
        source.push("origin", ["base"], force=True)
        assert _remote_ref(remote, "heads/base") == source.resolve("base")


def _remote_ref(url: str, name: str) -> bytes:
    t = open_transport(url, None)
    try:
        return t.refs()[name].id
    finally:
        t.close()


def test_racing_pushes_one_wins(source, remote, family, tmp_path):
    """Two processes push different commits to one branch at once: exactly one wins, the other
    is told to fetch, and the remote holds the winner's history whole."""
    source.remote_add("origin", remote)
    source.push("origin", ["base"])
    for i in range(2):
        with Repo.clone(remote, tmp_path / f"c{i}")[0] as c:
            c.add(family[f"expert-{i + 1}"], "base", message=f"work {i}")
    e = {**os.environ, "MP_AUTHOR": "t"}
    procs = [subprocess.Popen([*MP, "push"], cwd=tmp_path / f"c{i}", env=e, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    results = [(p.wait(60), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 1], results
    winner = next(i for i, (code, _) in enumerate(results) if code == 0)
    assert "fetch" in results[1 - winner][1] and "Traceback" not in results[1 - winner][1]
    with Repo.open(tmp_path / f"c{winner}") as w:
        assert _remote_ref(remote, "heads/base") == w.resolve("base")
    repo, _ = Repo.clone(remote, tmp_path / "after")
    with repo:
        assert repo.fsck().ok
        assert _checked_out(repo, "base", tmp_path / "o") == tree_bytes(family[f"expert-{winner + 1}"])


def test_lazy_clone_fetches_only_what_it_reads(source, remote, family, tmp_path):
    source.remote_add("origin", remote)
    source.push("origin", ["base", "e1", "e2"])
    repo, got = Repo.clone(remote, tmp_path / "lazy", lazy=True)
    with repo:
        assert got.chunks == 0 and got.objects > 0
        with repo.store.read() as r:
            assert r.entries(b"chunks") == 0
        fsck = repo.fsck()
        assert fsck.ok and fsck.not_fetched > 0
        assert _checked_out(repo, "origin/e1", tmp_path / "o1") == tree_bytes(family["expert-1"])
        with repo.store.read() as r:
            held = r.entries(b"chunks")
        assert held > 0
        assert _checked_out(repo, "origin/e1", tmp_path / "o2") == tree_bytes(family["expert-1"])
        with repo.store.read() as r:
            assert r.entries(b"chunks") == held  # kept: the second checkout fetched nothing


def test_lazy_budgeted_merge_downloads_its_plan(source, remote, tmp_path):
    from mpstore.merge.request import MergeRequest

    source.remote_add("origin", remote)
    source.push("origin", ["base", "e1", "e2"])
    request = MergeRequest("ties", "origin/base", ["origin/e1", "origin/e2"], [{"weight": 1.0, "density": 0.5}] * 2,
                           {}, "F32", None)
    repo, _ = Repo.clone(remote, tmp_path / "lazy", lazy=True)
    with repo:
        plan = repo.plan(request, budget="10%")
        predicted = repo.network_bytes(plan)
        est = plan.estimate
        assert predicted is not None and 0 < predicted <= est["expert_bytes"] + est["base_bytes"]
        with repo.store.read() as r:
            before = sum(len(v) - 1 for _, v in r.chunks())
        merged = repo.merge(request, "m", budget="10%")
        with repo.store.read() as r:
            fetched = sum(len(v) - 1 for k, v in r.chunks()) - before
            snap = r.commit(merged.commit).snapshot
        new_output = merged.realized["output_bytes"]
        assert fetched <= predicted + new_output + 64 << 10  # what it read, its output, a few small files
    full, _ = Repo.clone(remote, tmp_path / "full")
    with full:
        again = full.merge(request, "m", budget="10%")
        with full.store.read() as r:
            assert r.commit(again.commit).snapshot == snap  # the same bytes as a merge of a full clone
        assert full.network_bytes(full.plan(request, budget="10%")) is None


def test_corrupt_pack_byte_is_refused_on_fetch(source, s3_url, tmp_path):
    import boto3

    source.remote_add("origin", s3_url)
    source.push("origin", ["base"])
    repo = Repo.init(tmp_path / "dst", chunk_size=CHUNK_SIZE)
    repo.remote_add("origin", s3_url)
    repo.close()
    bucket, prefix = s3_url[len("s3://"):].split("/", 1)
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    pack = next(o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]
                if o["Key"].endswith(".pack"))
    body = bytearray(s3.get_object(Bucket=bucket, Key=pack)["Body"].read())
    body[len(body) // 2] ^= 0x20
    s3.put_object(Bucket=bucket, Key=pack, Body=bytes(body))
    before = store_fingerprint(tmp_path / "dst")
    proc = run_mp("fetch", cwd=tmp_path / "dst")
    assert_user_error(proc, pack.rsplit("/", 1)[1].split(".")[0])
    after = store_fingerprint(tmp_path / "dst")
    assert after[b"chunks"] == before[b"chunks"] and after[b"refs"] == before[b"refs"]


def test_bad_remotes_are_one_line_and_write_nothing(tmp_path, s3_url, source):
    bucket = s3_url[len("s3://"):].split("/", 1)[0]
    cases = [
        (["clone", str(tmp_path / "nowhere"), tmp_path / "c1"], "not an mpstore repository"),
        (["clone", "ftp://host/x", tmp_path / "c2"], "unsupported scheme"),
        (["clone", "s3://", tmp_path / "c3"], "names no bucket"),
        (["clone", f"s3://{bucket}-missing/p", tmp_path / "c4"], "does not exist"),
    ]
    for args, fragment in cases:
        assert_user_error(run_mp(*args), fragment)
        assert not Path(args[-1]).exists()
    source.remote_add("origin", s3_url)
    source.close()
    before = store_fingerprint(tmp_path / "src")
    proc = run_mp("push", "origin", "base", cwd=tmp_path / "src", env={"AWS_ENDPOINT_URL": "http://127.0.0.1:9"})
    assert_user_error(proc, "cannot reach")
    assert store_fingerprint(tmp_path / "src") == before


def test_bad_credentials_are_one_line_and_write_nothing(tmp_path, s3_strict, source):
    """A server that checks signatures: a wrong secret is refused, the secret is never printed,
    and neither side changes; the right key works."""
    url = f"s3://{s3_strict.bucket}/test-remote"  # the strict server is shared by the session: a prefix of its own
    source.remote_add("origin", url)
    source.close()
    src = tmp_path / "src"
    before = store_fingerprint(src)
    good = {"AWS_ENDPOINT_URL": s3_strict.endpoint, "AWS_ACCESS_KEY_ID": s3_strict.key_id,
            "AWS_SECRET_ACCESS_KEY": s3_strict.secret, "AWS_DEFAULT_REGION": "us-east-1"}
    wrong = {**good, "AWS_SECRET_ACCESS_KEY": "not-the-secret-0123456789"}
    for args, where in ((["push", "origin", "base"], src), (["clone", url, tmp_path / "c"], tmp_path)):
        proc = run_mp(*args, cwd=where, env=wrong)
        line = assert_user_error(proc, url)
        assert "not-the-secret" not in line and s3_strict.key_id not in line
    assert store_fingerprint(src) == before and not (tmp_path / "c").exists()
    assert run_mp("push", "origin", "base", cwd=src, env=good).returncode == 0
    cloned = run_mp("clone", url, tmp_path / "c", env=good)
    assert cloned.returncode == 0, cloned.stderr


def test_cli_round_trip_and_remote_names(source, remote, family, tmp_path):
    source.close()
    src = tmp_path / "src"
    assert run_mp("remote", "add", "origin", remote, cwd=src).returncode == 0
    assert_user_error(run_mp("remote", "add", "origin", remote, cwd=src), "already exists")
    assert_user_error(run_mp("remote", "add", "a/b", remote, cwd=src), "remote name")
    listed = run_mp("remote", "-v", cwd=src)
    assert listed.stdout.split() == ["origin", remote if remote.startswith("s3://") else str(Path(remote))]
    pushed = run_mp("push", "origin", "base", "e1", cwd=src)
    assert pushed.returncode == 0, pushed.stderr
    cloned = run_mp("clone", remote, tmp_path / "c")
    assert cloned.returncode == 0, cloned.stderr
    out = run_mp("checkout", "origin/e1", "-o", tmp_path / "o", cwd=tmp_path / "c")
    assert out.returncode == 0, out.stderr
    assert tree_bytes(tmp_path / "o") == tree_bytes(family["expert-1"])
    assert_user_error(run_mp("fetch", "nosuch", cwd=src), "no remote named 'nosuch'")
    assert run_mp("remote", "remove", "origin", cwd=src).returncode == 0
    assert run_mp("remote", cwd=src).stdout == ""
    with Repo.open(src) as r:
        assert not r.branches_of("origin")


@pytest.mark.parametrize("verb", ["push", "fetch"])
def test_sigkill_mid_transfer_then_rerun(verb, tmp_path, s3_url, sharded_family):
    """Killed while packs are moving, both sides stay valid, and the rerun completes the rest."""
    src = tmp_path / "src"
    with Repo.init(src, chunk_size=CHUNK_SIZE) as r:
        r.add(sharded_family["base"], "base")
        r.add(sharded_family["expert-1"], "e1", base="base")
        r.remote_add("origin", s3_url)
    env = {"MP_PACK_SIZE": "16KiB"}  # many packs, so the kill lands between two of them
    if verb == "fetch":
        assert run_mp("push", "origin", "base", "e1", cwd=src, env=env).returncode == 0
        Repo.init(tmp_path / "dst", chunk_size=CHUNK_SIZE).close()
        assert run_mp("remote", "add", "origin", s3_url, cwd=tmp_path / "dst").returncode == 0
        where, args = tmp_path / "dst", ["fetch", "origin"]
    else:
        where, args = src, ["push", "origin", "base", "e1"]
    total = _pack_count(s3_url) if verb == "fetch" else None
    e = {**os.environ, "MP_AUTHOR": "t", **env}
    proc = subprocess.Popen([*MP, *args], cwd=where, env=e, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline and not _progressed(verb, s3_url, where):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL  # killed mid-way, not finished
    if verb == "push":
        assert 0 < _pack_count(s3_url)  # some packs arrived before the kill
        assert "heads/e1" not in _refs(s3_url)  # refs move last
    else:
        with Repo.open(where) as r:
            assert r.fsck().ok and not r.branches_of("origin")
    with Repo.open(where) as r, r.store.read() as t:
        here_before = t.entries(b"chunks")
    there_before = len(_remote_keys(s3_url, CHUNK))
    again = run_mp(*args, "--json", cwd=where, env=env)
    assert again.returncode == 0, again.stderr
    moved = json.loads(again.stdout)
    with Repo.open(where) as r, r.store.read() as t:
        here_after = t.entries(b"chunks")
    if verb == "fetch":  # the rerun fetches only what had not arrived
        assert total == _pack_count(s3_url) and moved["chunks"] == here_after - here_before > 0
    else:  # the rerun sends only what had not arrived
        assert moved["chunks"] == len(_remote_keys(s3_url, CHUNK)) - there_before > 0
    if verb == "fetch":
        with Repo.open(where) as r:
            assert r.fsck().ok
            assert r.resolve("origin/e1") == Repo.open(src).resolve("e1")
    repo, _ = Repo.clone(s3_url, tmp_path / "check")
    with repo:
        assert repo.fsck().ok
        assert _checked_out(repo, "origin/e1", tmp_path / "o") == tree_bytes(sharded_family["expert-1"])


def _pack_count(url: str) -> int:
    """Complete packs on the remote (those whose index arrived)."""
    import boto3

    bucket, prefix = url[len("s3://"):].split("/", 1)
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/packs/")
    return sum(o["Key"].endswith(".idx") for page in pages for o in page.get("Contents", []))


def _refs(url: str) -> dict:
    t = open_transport(url, None)
    try:
        return t.refs()
    finally:
        t.close()


def _progressed(verb: str, url: str, where: Path) -> bool:
    """Whether a transfer in flight has moved some, but not all, of its data yet."""
    if verb == "push":
        return _pack_count(url) >= 2
    with Repo.open(where) as r, r.store.read() as t:
        return t.entries(b"chunks") > 0


def test_remote_tracking_refs_in_log_diff_merge(source, remote, tmp_path):
    source.remote_add("origin", remote)
    source.push("origin", ["base", "e1"])
    repo, _ = Repo.clone(remote, tmp_path / "c")
    with repo:
        assert repo.log("origin/e1")[0].id == source.resolve("e1")
        assert repo.diff("origin/base", "origin/e1").counts() == source.diff("base", "e1").counts()
        assert set(repo.branches_of("origin")) == {"base", "e1"}
        assert _remote_keys(remote, OBJECT)


def test_tags_travel_and_never_move(source, remote, family, tmp_path):
    source.remote_add("origin", remote)
    source.tag("v1", "e1")
    source.push("origin", ["base", "v1"])
    repo, _ = Repo.clone(remote, tmp_path / "c")
    with repo:
        assert repo.tags() == {"v1": source.resolve("e1")}
        repo.tag("v2", "origin/base")
        repo.push("origin", ["v2"])
    source.delete_tag("v1")
    source.tag("v1", "e2")  # the same name, elsewhere: the remote's tag must not move
    with pytest.raises(Rejected, match="tags never move"):
        source.push("origin", ["v1"])
    fetched = source.fetch("origin")
    assert source.tags()["v2"] == source.resolve("base")
    assert any(s.startswith("tags/v1") for s in fetched.skipped)  # the local v1 is kept, and said so
    assert source.tags()["v1"] == source.resolve("e2")


def test_lazy_clone_diff_and_push_elsewhere(source, remote, family, tmp_path):
    """A lazy clone diffs by fetching the differing chunks only, and pushing it to another remote
    first fetches what that remote lacks, so the second remote is complete."""
    source.remote_add("origin", remote)
    source.push("origin", ["base", "e2"])
    repo, _ = Repo.clone(remote, tmp_path / "lazy", lazy=True)
    with repo:
        assert repo.diff("origin/base", "origin/e2").counts() == source.diff("base", "e2").counts()
        with repo.store.read() as r:
            after_diff = r.entries(b"chunks")
        assert 0 < after_diff < len(_remote_keys(remote, CHUNK))
        Repo.init(tmp_path / "other", chunk_size=CHUNK_SIZE).close()
        repo.remote_add("other", str(tmp_path / "other"))
        repo.push("other", ["e2"])
    with Repo.open(tmp_path / "other") as other:
        assert other.fsck().ok
        assert _checked_out(other, "e2", tmp_path / "o") == tree_bytes(family["expert-2"])


def test_pull_and_fetch_on_the_command_line(source, remote, family, tmp_path):
    source.remote_add("origin", remote)
    source.push("origin", ["base"])
    source.close()
    assert run_mp("clone", remote, tmp_path / "c").returncode == 0
    with Repo.open(tmp_path / "src") as s:
        s.add(family["expert-1"], "base", message="next")
        s.push("origin", ["base"])
        head = s.resolve("base")
    fetched = run_mp("fetch", "--json", cwd=tmp_path / "c")
    assert fetched.returncode == 0, fetched.stderr
    assert [r["name"] for r in json.loads(fetched.stdout)["refs"]] == ["remotes/origin/base"]
    pulled = run_mp("pull", cwd=tmp_path / "c")
    assert pulled.returncode == 0, pulled.stderr
    assert "fast-forward" in pulled.stdout
    with Repo.open(tmp_path / "c") as c:
        assert c.resolve("base") == head
    assert_user_error(run_mp("pull", "origin", "nosuch", cwd=tmp_path / "c"), "no branch 'nosuch'")
    assert_user_error(run_mp("push", "origin", "nosuch", cwd=tmp_path / "c"), "nosuch")
