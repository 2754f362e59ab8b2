"""The object-store transport against a real S3-protocol server (moto, a subprocess) through real,
unpatched boto3: packs and their indexes, the index cache, refs by compare-and-swap, interrupted
uploads, damaged packs, and one-line errors for every way a remote can be wrong."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from s3server import Strict, aws_env, client

from mpstore.errors import MpError, RemoteError
from mpstore.remote.bucket import Bucket, parse_url
from mpstore.remote.packs import Location, build_packs, plan_ranges
from mpstore.remote.transport import CATALOG, CHUNK, KINDS, OBJECT, RemoteRef


@pytest.fixture
def remotes() -> Iterator[list[Bucket]]:
    """Buckets a test opens, closed after it."""
    opened: list[Bucket] = []
    yield opened
    for b in opened:
        b.close()


def open_remote(remotes: list[Bucket], url: str, cache: Path | None = None, pack_bytes: int = 4096) -> Bucket:
    b = Bucket(url, cache, pack_bytes)
    remotes.append(b)
    return b


def entries(n: int, seed: int = 0) -> list[tuple[int, bytes, bytes]]:
    """n entries of every kind, of sizes 1 B to 3 KB, with random keys and bytes."""
    rng = random.Random(seed)
    return [(KINDS[i % 3], rng.randbytes(16), rng.randbytes(rng.randint(1, 3000))) for i in range(n)]


def server_keys(url: str, under: str) -> list[str]:
    bucket, prefix = parse_url(url)
    got = client(os.environ["AWS_ENDPOINT_URL"]).list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/{under}")
    return sorted(o["Key"][len(prefix) + 1:] for o in got.get("Contents", []))


def rewrite(url: str, name: str, change) -> None:
    """Replace object `name` on the server with change(its bytes), as a fault or a stray tool."""
    bucket, prefix = parse_url(url)
    s3 = client(os.environ["AWS_ENDPOINT_URL"])
    body = s3.get_object(Bucket=bucket, Key=f"{prefix}/{name}")["Body"].read()
    s3.put_object(Bucket=bucket, Key=f"{prefix}/{name}", Body=change(body))


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert isinstance(err.value, MpError) and "\n" not in text and "Traceback" not in text, text
    return text


# ------------------------------------------------------------------------------ packs, pure


def test_ranges_join_neighbours_within_gap_and_cap():
    locs = [(b"a", Location("p", 0, 10, 0)), (b"c", Location("p", 30, 10, 0)),
            (b"b", Location("p", 12, 10, 0)), (b"d", Location("q", 0, 5, 0)),
            (b"e", Location("p", 100, 10, 0))]
    ranges = plan_ranges(locs, gap=20, cap=60)
    assert [(r.pack, r.start, r.end, [k for k, _ in r.members]) for r in ranges] == [
        ("p", 0, 40, [b"a", b"b", b"c"]), ("p", 100, 110, [b"e"]), ("q", 0, 5, [b"d"])]
    capped = plan_ranges(locs, gap=20, cap=25)
    assert [(r.start, r.end) for r in capped if r.pack == "p"] == [(0, 22), (30, 40), (100, 110)]
    assert [(r.start, r.end) for r in plan_ranges([(b"big", Location("p", 0, 99, 0))], cap=10)] == [(0, 99)]


def test_packs_close_at_target_and_keep_order():
    ents = entries(30)
    packs = list(build_packs(ents, target=5000))
    assert len(packs) > 3 and all(len(p.data) >= 5000 for p in packs[:-1])
    assert [(k, key) for p in packs for k, key, _ in p.entries] == [(k, key) for k, key, _ in ents]
    for p in packs:
        for _, key, loc in p.entries:
            assert p.data[loc.offset:loc.end] == next(d for _, k, d in ents if k == key)
    assert [p.id for p in build_packs(ents, target=5000)] == [p.id for p in packs]  # content-addressed


def test_import_does_not_load_boto3():
    code = "import sys, mpstore.remote.bucket; assert not {'boto3', 'botocore', 'torch'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------ round trips


def test_put_holdings_get_round_trip(s3_url, remotes):
    ents = entries(80)
    writer = open_remote(remotes, s3_url)
    sent = writer.put(iter(ents))
    names = [Path(k) for k in server_keys(s3_url, "packs/")]
    n_packs = len(names) // 2
    assert n_packs > 5 and {p.stem for p in names if p.suffix == ".pack"} == {p.stem for p in names if p.suffix == ".idx"}
    data_bytes = sum(len(d) for _, _, d in ents)
    assert sent == writer.sent_bytes and data_bytes < sent < data_bytes * 1.05

    reader = open_remote(remotes, s3_url)
    for kind in KINDS:
        assert reader.holdings(kind) == {key for k, key, _ in ents if k == kind}
    before = reader.requests
    got = dict(reader.get(CHUNK, [key for k, key, _ in ents if k == CHUNK] + [b"\0" * 16]))
    assert got == {key: d for k, key, d in ents if k == CHUNK}  # the unknown key is skipped
    with_chunks = [p for p in build_packs(ents, 4096) if any(k == CHUNK for k, _, _ in p.entries)]
    # One LIST (a key it does not know: packs pushed since?), then one ranged read per pack.
    assert reader.requests - before == 1 + len(with_chunks)
    assert reader.received_bytes >= sum(map(len, got.values()))
    assert dict(reader.get(OBJECT, [ents[0][1]])) == {ents[0][1]: ents[0][2]}
    assert dict(reader.get(CATALOG, [ents[0][1]])) == {}  # held, but as another kind


def test_listing_pages_through_many_packs(s3_url, remotes):
    ents = entries(20)
    open_remote(remotes, s3_url, pack_bytes=1).put(ents)  # one pack per entry: 40 objects
    reader = open_remote(remotes, s3_url)
    reader.list_page = 7
    assert reader.holdings(OBJECT) == {key for k, key, _ in ents if k == OBJECT}
    assert reader.requests == 6 + 20  # LIST pages, then one GET per index
    assert reader.holdings(CHUNK) == {key for k, key, _ in ents if k == CHUNK}
    assert reader.requests == 2 * 6 + 20  # listed again; no index read again


def test_index_cache_is_reused_and_checked(s3_url, remotes, tmp_path):
    ents = entries(30)
    open_remote(remotes, s3_url).put(ents)
    first = open_remote(remotes, s3_url, cache=tmp_path / "cache")
    want = first.holdings(CHUNK)
    n_packs = first.requests - 1
    assert n_packs > 3 and len(list((tmp_path / "cache" / "packs").glob("*.idx"))) == n_packs

    second = open_remote(remotes, s3_url, cache=tmp_path / "cache")
    assert second.holdings(CHUNK) == want and second.requests == 1  # one LIST, no index read

    damaged = sorted((tmp_path / "cache" / "packs").glob("*.idx"))[0]
    damaged.write_bytes(damaged.read_bytes()[:-1])
    third = open_remote(remotes, s3_url, cache=tmp_path / "cache")
    assert third.holdings(CHUNK) == want and third.requests == 2  # the damaged copy is read again
    assert len(list((tmp_path / "cache" / "packs").iterdir())) == n_packs  # no temporary left


def test_config_and_head(s3_url, remotes):
    remote = open_remote(remotes, s3_url)
    assert remote.info().chunk_size is None and remote.info().head is None
    remote.init(1 << 20, "main")
    remote.init(1 << 20, "other")  # a no-op: the remote is initialised
    again = open_remote(remotes, s3_url)
    assert (again.info().chunk_size, again.info().head) == (1 << 20, "main")
    with pytest.raises(RemoteError) as err:
        again.init(2 << 20, "main")
    assert "chunk size" in one_line(err) and s3_url in str(err.value)


# ------------------------------------------------------------------------------ refs


def test_refs_compare_and_swap(s3_url, remotes):
    remote = open_remote(remotes, s3_url)
    a, b, c = (bytes([i]) * 16 for i in (1, 2, 3))
    assert remote.refs() == {}
    assert remote.set_ref("heads/main", None, a)
    assert remote.set_ref("tags/v1.0", None, a)
    assert not remote.set_ref("heads/main", None, b)  # exists: a create is refused
    stale = remote.refs()["heads/main"]
    assert stale.id == a
    assert remote.set_ref("heads/main", stale, b)
    assert not remote.set_ref("heads/main", stale, c)  # moved since it was read
    assert not remote.set_ref("heads/main", RemoteRef(a, '"not-an-etag"'), c)
    now = open_remote(remotes, s3_url).refs()
    assert {n: r.id for n, r in now.items()} == {"heads/main": b, "tags/v1.0": a}
    assert remote.set_ref("heads/main", now["heads/main"], c)


def test_racing_writers_one_wins(s3_url, remotes):
    remote = open_remote(remotes, s3_url)
    assert remote.set_ref("heads/main", None, b"\0" * 16)
    seen = remote.refs()["heads/main"]
    writers = [open_remote(remotes, s3_url) for _ in range(4)]
    start = threading.Barrier(len(writers))
    won: list[bool] = [False] * len(writers)

    def push(i: int) -> None:
        start.wait()
        won[i] = writers[i].set_ref("heads/main", seen, bytes([i + 1]) * 16)

    threads = [threading.Thread(target=push, args=(i,)) for i in range(len(writers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert won.count(True) == 1
    assert remote.refs()["heads/main"].id == bytes([won.index(True) + 1]) * 16


def test_damaged_ref_is_reported(s3_url, remotes):
    remote = open_remote(remotes, s3_url)
    remote.set_ref("heads/main", None, b"\1" * 16)
    rewrite(s3_url, "refs/heads/main", lambda body: b"not a commit id\n")
    with pytest.raises(RemoteError) as err:
        remote.refs()
    assert "ref heads/main is damaged" in one_line(err)


# ------------------------------------------------------------------------------ failures


def test_interrupted_put_leaves_whole_packs_and_a_rerun_sends_the_rest(s3_url, remotes):
    ents = [(CHUNK, os.urandom(16), os.urandom(1500)) for _ in range(12)]  # 3 entries per pack

    def failing() -> Iterator[tuple[int, bytes, bytes]]:
        yield from ents[:7]  # two packs complete, a third begun
        raise KeyboardInterrupt

    remote = open_remote(remotes, s3_url)
    with pytest.raises(KeyboardInterrupt):
        remote.put(failing())
    assert len(server_keys(s3_url, "packs/")) == 4  # two packs and their indexes, nothing more
    later = open_remote(remotes, s3_url)
    assert later.holdings(CHUNK) == {key for _, key, _ in ents[:6]}
    assert remote.holdings(CHUNK) == later.holdings(CHUNK)

    have = later.holdings(CHUNK)
    rest = [e for e in ents if e[1] not in have]
    sent = later.put(rest)
    assert sent < sum(len(d) for _, _, d in rest) + 1024
    assert dict(open_remote(remotes, s3_url).get(CHUNK, [k for _, k, _ in ents])) == {k: d for _, k, d in ents}


@pytest.mark.parametrize("damage", [lambda body: body[:100] + bytes([body[100] ^ 1]) + body[101:],
                                    lambda body: body[:100]], ids=["flipped-byte", "truncated"])
def test_damaged_pack_is_detected(s3_url, remotes, damage):
    ents = entries(12)
    open_remote(remotes, s3_url).put(ents)
    pack = next(k for k in server_keys(s3_url, "packs/") if k.endswith(".pack"))
    rewrite(s3_url, pack, damage)
    reader = open_remote(remotes, s3_url)
    with pytest.raises(RemoteError) as err:
        for kind in KINDS:
            list(reader.get(kind, [key for k, key, _ in ents if k == kind]))
    assert f"pack {Path(pack).stem} is damaged" in one_line(err)


def test_damaged_index_is_detected(s3_url, remotes, tmp_path):
    open_remote(remotes, s3_url).put(entries(12))
    idx = next(k for k in server_keys(s3_url, "packs/") if k.endswith(".idx"))
    rewrite(s3_url, idx, lambda body: body[:-1] + bytes([body[-1] ^ 1]))
    reader = open_remote(remotes, s3_url, cache=tmp_path / "cache")
    with pytest.raises(RemoteError) as err:
        reader.holdings(CHUNK)
    assert f"pack index {Path(idx).stem} is damaged" in one_line(err)
    assert not (tmp_path / "cache" / "packs" / Path(idx).name).exists()


def test_missing_bucket(s3_url, remotes):
    url = f"s3://{parse_url(s3_url)[0]}-gone/x"
    with pytest.raises(RemoteError) as err:
        open_remote(remotes, url).info()
    assert "does not exist" in one_line(err) and url in str(err.value)


def test_bad_credentials(s3_strict: Strict, monkeypatch, tmp_path, remotes):
    url = f"s3://{s3_strict.bucket}/p"
    aws_env(monkeypatch, s3_strict.endpoint, tmp_path, s3_strict.key_id, s3_strict.secret)
    assert open_remote(remotes, url).info().chunk_size is None  # the right key works
    for key_id, secret in ((s3_strict.key_id, "wrong-secret-123"), ("AKIAUNKNOWNKEY000000", s3_strict.secret)):
        aws_env(monkeypatch, s3_strict.endpoint, tmp_path, key_id, secret)
        with pytest.raises(RemoteError) as err:
            open_remote(remotes, url).info()
        line = one_line(err)
        assert "access denied" in line and url in line and secret not in line


def test_no_credentials(s3_url, monkeypatch, remotes):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(RemoteError) as err:
        open_remote(remotes, s3_url).info()
    assert "no AWS credentials" in one_line(err)


def test_unreachable_endpoint(s3_url, monkeypatch, remotes):
    with socket.socket() as s:  # a port nobody listens on once this closes
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    with pytest.raises(RemoteError) as err:
        open_remote(remotes, s3_url).refs()
    assert "cannot reach the endpoint" in one_line(err) and s3_url in str(err.value)


@pytest.mark.parametrize("url", ["s3://", "s3:///prefix", "s3://AKIA:topsecret@bucket/p", "gs://bucket/p",
                                 "s3://Not_A_Bucket!/p"])
def test_malformed_urls(s3_url, url, remotes):
    with pytest.raises(RemoteError) as err:
        open_remote(remotes, url).info()
    assert "topsecret" not in one_line(err)
