"""The LMDB store underneath: a map that grows by itself, the format check on open, corruption
caught on read (and never written out), and readers that only ever see committed state."""

from __future__ import annotations

import subprocess

import lmdb
import pytest
import torch
from conftest import MP, assert_user_error, edit_db, leftovers, run_mp, store_fingerprint, tree_bytes
from safetensors.torch import save_file

from mpstore import Repo
from mpstore.errors import CorruptData, FormatMismatch, MpError, NotARepository
from mpstore.store.env import framed
from mpstore.store.ids import digest


def raw_env(root, **kw) -> lmdb.Environment:
    """The store's LMDB environment opened with lmdb itself, bypassing mpstore."""
    return lmdb.open(str(root / ".mp"), max_dbs=8, subdir=True, **kw)


# ------------------------------------------------------------------------------ map size


def test_the_map_grows_by_itself(tmp_path):
    g = torch.Generator().manual_seed(5)
    src = tmp_path / "model"
    src.mkdir()
    save_file({f"w{i}": torch.randn(256 * 1024, generator=g) for i in range(6)}, str(src / "model.safetensors"))
    root = tmp_path / "repo"
    with Repo.init(root, map_size=1 << 20) as repo:
        assert repo.store.env.info()["map_size"] == 1 << 20
        res = repo.add(src, "big")  # 6 MiB into a 1 MiB map
        assert res.new_bytes == res.total_bytes - 8
        assert repo.store.env.info()["map_size"] > res.total_bytes
        repo.checkout("big", tmp_path / "out")
    assert tree_bytes(tmp_path / "out") == tree_bytes(src)
    with Repo.open(root) as repo:
        repo.checkout("big", tmp_path / "again")
    assert tree_bytes(tmp_path / "again") == tree_bytes(src)


def test_a_transaction_that_fills_the_map_is_rerun_on_a_larger_one(tmp_path):
    """More than the store reserves beforehand (its 64 MiB slack) in one write: MapFullError is
    caught, the map doubled, the transaction rerun, and the caller sees only the result."""
    chunks = {}
    for i in range(72):
        payload = i.to_bytes(4, "little") * (1 << 18)  # 1 MiB each, all different
        chunks[digest(payload)] = framed(payload)
    calls = []

    def put_all(txn):
        calls.append(1)
        return sum(txn.put_chunk(k, v) for k, v in chunks.items())

    with Repo.init(tmp_path / "repo", map_size=1 << 20) as repo:
        assert repo.store.write(put_all) == 72
        assert len(calls) == 2
        with repo.store.read() as r:
            assert all(bytes(r.chunk(k)) == v[1:] for k, v in chunks.items())


# ------------------------------------------------------------------------------ format


@pytest.mark.parametrize("value", [b"2", b"0", b"", None])
def test_the_format_version_is_checked_on_open(tmp_path, family, value):
    root = tmp_path / "repo"
    with Repo.init(root) as repo:
        repo.add(family["base"], "base")
    if value is None:
        edit_db(root, b"meta", lambda txn, db: txn.delete(b"format", db=db))
    else:
        edit_db(root, b"meta", lambda txn, db: txn.put(b"format", value, db=db))
    shown = "None" if value is None else value.decode()
    with pytest.raises(FormatMismatch, match=f"store format {shown}, this mpstore reads format 1"):
        Repo.open(root)
    assert_user_error(run_mp("-C", root, "log"), "store format")


def test_a_store_that_is_not_lmdb_is_reported_not_crashed_on(tmp_path):
    root = tmp_path / "repo"
    (root / ".mp").mkdir(parents=True)
    (root / ".mp" / "data.mdb").write_bytes(b"this is not an LMDB environment\n" * 4096)
    with pytest.raises(MpError):
        Repo.open(root)
    assert_user_error(run_mp("-C", root, "log"))


def test_an_lmdb_store_without_our_databases_is_not_a_repository(tmp_path):
    root = tmp_path / "repo"
    (root / ".mp").mkdir(parents=True)
    env = raw_env(root)
    with env.begin(write=True) as txn:
        txn.put(b"someone", b"else's data")
    env.close()
    with pytest.raises(NotARepository):
        Repo.open(root)


# ------------------------------------------------------------------------------ corruption

VICTIM = "model.layers.1.mlp.up_proj.weight"


@pytest.fixture
def corrupt_setup(tmp_path, family):
    """base and the dense expert-1 (which shares no tensor bytes with it) in a closed repo of raw
    chunks (the damage is to raw values: tests/test_compression.py damages compressed ones),
    plus the key of the chunk that holds the base's VICTIM tensor."""
    root = tmp_path / "repo"
    with Repo.init(root, compress="none") as repo:
        repo.add(family["base"], "base")
        repo.add(family["expert-1"], "dense", base="base")
        with repo.store.read() as r:
            snap = r.object(r.object(repo.resolve("base")).snapshot)
            (key,) = r.object(snap.tensors[VICTIM]).chunks
    return root, key


def _flip(key: bytes, offset: int):
    """A raw edit that flips one bit of the stored value of chunk `key` at `offset`."""

    def fn(txn, db):
        value = bytearray(txn.get(key, db=db))
        value[offset] ^= 0x01
        txn.put(key, bytes(value), db=db)

    return fn


@pytest.mark.parametrize(
    "damage,message",
    [
        ("payload", "does not match its digest"),
        ("codec", "unknown codec"),
        ("missing", "is missing"),
    ],
)
def test_a_damaged_chunk_fails_checkout_and_writes_nothing(corrupt_setup, tmp_path, family, damage, message):
    root, key = corrupt_setup
    if damage == "payload":
        edit_db(root, b"chunks", _flip(key, 1 + 1000))
    elif damage == "codec":  # a codec byte no version wrote (flipping bit 0 of RAW makes it PLANES)
        edit_db(root, b"chunks", lambda txn, db: txn.put(key, b"\x7f" + bytes(txn.get(key, db=db))[1:], db=db))
    else:
        edit_db(root, b"chunks", lambda txn, db: txn.delete(key, db=db))
    before = store_fingerprint(root)
    area = tmp_path / "area"
    area.mkdir()
    with Repo.open(root) as repo:
        with pytest.raises(CorruptData) as err:
            repo.checkout("base", area / "out")
        assert VICTIM in str(err.value) and message in str(err.value)
        assert list(area.iterdir()) == []  # no target, no temporary folder
        # an existing folder replaced with --force survives a failed checkout
        keep = area / "keep"
        keep.mkdir()
        (keep / "mine.txt").write_text("mine")
        with pytest.raises(CorruptData):
            repo.checkout("base", keep, force=True)
        assert tree_bytes(keep) == {"mine.txt": b"mine"}
        assert leftovers(area) == []
        # the damage is contained: a model that does not use the chunk still checks out
        repo.checkout("dense", area / "dense")
        assert tree_bytes(area / "dense") == tree_bytes(family["expert-1"])
        # diff reads the tensor's values, so it finds the damage too
        with pytest.raises(CorruptData, match=message):
            repo.diff("base", "dense")
    line = assert_user_error(run_mp("-C", root, "checkout", "base", "-o", area / "cli"), VICTIM, message)
    assert key.hex() in line
    assert not (area / "cli").exists()
    assert store_fingerprint(root) == before  # reading never repairs or rewrites anything


def test_an_undecodable_object_is_reported_as_corruption(corrupt_setup, tmp_path):
    root, _ = corrupt_setup
    with Repo.open(root) as repo:
        cid = repo.resolve("base")
    edit_db(root, b"objects", lambda txn, db: txn.put(cid, b"\xc1 not msgpack", db=db))
    with Repo.open(root) as repo:
        with pytest.raises(CorruptData, match=f"object {cid.hex()} does not match its id"):
            repo.show("base")
    assert_user_error(run_mp("-C", root, "checkout", "base", "-o", tmp_path / "o"), "does not match its id")
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------ isolation


def test_readers_see_committed_state_only(tmp_path, family):
    root = tmp_path / "repo"
    with Repo.init(root) as repo:
        old = repo.add(family["base"], "base").commit
        with repo.store.read() as r:
            before_refs = r.refs()
            # another process commits twice while this read transaction is open
            for args in (["add", family["expert-2"], "--name", "base"], ["add", family["expert-3"], "--name", "new"]):
                proc = subprocess.run([*MP, "-C", str(root), "--quiet", *map(str, args)],
                                      capture_output=True, text=True, timeout=60)
                assert proc.returncode == 0, proc.stderr
            new = bytes.fromhex(proc.stdout.strip())
            assert r.refs() == before_refs
            assert r.ref("heads/base") == old and r.ref("heads/new") is None
            assert not r.has_object(new)
            assert r.meta("HEAD") == "base"
        # a fresh read sees both commits, whole
        assert repo.resolve("new") == new
        assert repo.resolve("base~1") == old
        assert repo.current_branch() == "new"
        repo.checkout("base", tmp_path / "out")
    assert tree_bytes(tmp_path / "out") == tree_bytes(family["expert-2"])


def test_a_map_grown_by_another_process_is_adopted(tmp_path):
    """This process keeps a 1 MiB map open while `mp add` (another process) writes 4 MiB: the
    next transaction here meets MapResizedError and must adopt the larger map, for reads and
    for writes."""
    g = torch.Generator().manual_seed(8)
    src = tmp_path / "model"
    src.mkdir()
    save_file({f"w{i}": torch.randn(1 << 18, generator=g) for i in range(4)}, str(src / "model.safetensors"))
    save_file({"x": torch.randn(1 << 18, generator=g)}, str(tmp_path / "x.safetensors"))
    with Repo.init(tmp_path / "repo", map_size=1 << 20) as repo:
        proc = run_mp("-C", repo.root, "--quiet", "add", src, "--name", "big")
        assert proc.returncode == 0, proc.stderr
        assert repo.resolve("big").hex() == proc.stdout.strip()
        assert repo.store.env.info()["map_size"] > 4 << 20
        repo.checkout("big", tmp_path / "out")
        assert tree_bytes(tmp_path / "out") == tree_bytes(src)
        assert repo.add(tmp_path / "x.safetensors", "x").new_bytes == (tmp_path / "x.safetensors").stat().st_size - 8


def test_concurrent_adds_to_one_branch_lose_no_commit(tmp_path, family):
    """Two `mp add` processes race on one branch: each reads the branch head inside its final
    transaction, so the branch ends with both commits chained, not one overwriting the other."""
    root = tmp_path / "repo"
    with Repo.init(root) as repo:
        first = repo.add(family["base"], "x").commit
    procs = [
        subprocess.Popen([*MP, "-C", str(root), "--quiet", "add", str(family[e]), "--name", "x"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for e in ("expert-1", "expert-3")
    ]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    ids = {bytes.fromhex(o.strip()) for o, _ in outs}
    with Repo.open(root) as repo:
        head = repo.resolve("x")
        (middle,) = repo.commit("x").commit.parents
        assert {head, middle} == ids
        assert repo.commit("x~1").commit.parents == (first,)
        assert len(repo.log("x")) == 3
