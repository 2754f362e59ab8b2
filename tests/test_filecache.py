"""The file-identity cache (store/filecache.py): re-adding an unchanged folder reads nothing and
commits exactly what a full read commits; a file changed in any way a write can leave visible
(size, mtime, ctime), or recorded within the racy window, is read again; gc removes entries
whose objects it collects, and a damaged entry is a miss.

"Reads nothing" is measured with the kernel's count of bytes this process read (`rchar` in
/proc/self/io); snapshots are compared with those of a fresh repository that read every byte.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from conftest import TINY, stored_tensors
from make_family import make_family

from mpstore import Repo
from mpstore.merge import catalog
from mpstore.store import filecache

CHUNK = 4096
LONG_AGO = 1_600_000_000  # seconds since the epoch: far outside the racy window


def age(folder: Path, seconds: int = LONG_AGO) -> None:
    """Give every file an old mtime (what a model downloaded yesterday has)."""
    for p in folder.rglob("*"):
        if p.is_file():
            os.utime(p, (seconds, seconds))


def read_bytes() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def snapshot_id(repo: Repo, spec: str) -> bytes:
    return repo.commit(spec).commit.snapshot


def fresh_snapshot(tmp_path: Path, folder: Path) -> bytes:
    """The snapshot a repository that has never seen `folder` makes of it (a full read)."""
    root = tmp_path / f"fresh-{time.monotonic_ns()}"
    with Repo.init(root, chunk_size=CHUNK) as fresh:
        fresh.add(folder, "m")
        return snapshot_id(fresh, "m")


def add_reading(repo: Repo, folder: Path, name: str, **kw) -> int:
    """Add and return how many bytes the add read."""
    before = read_bytes()
    repo.add(folder, name, **kw)
    return read_bytes() - before


@pytest.fixture(scope="module")
def fam(tmp_path_factory) -> dict[str, Path]:
    # big enough (a few MB) that what else the process reads (/proc/self/maps, ~64 KB) is noise
    shapes = {**TINY, "hidden": 128, "vocab": 4096}
    return make_family(tmp_path_factory.mktemp("fcfam"), **shapes, experts=2, kinds=("dense", "partial"), seed=5)


@pytest.fixture
def model(tmp_path, fam) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(fam["base"], dst)
    (dst / "notes").mkdir()
    (dst / "notes" / "a.txt").write_text("a file that is not a tensor\n")
    age(dst)
    return dst


@pytest.fixture
def repo(tmp_path) -> Repo:
    r = Repo.init(tmp_path / "repo", chunk_size=CHUNK)
    yield r
    r.close()


def entries(repo: Repo) -> dict[bytes, filecache.Entry | None]:
    with repo.store.read() as r:
        return dict(filecache.entries(r))


def test_readd_unchanged_reads_nothing_and_commits_the_same(tmp_path, repo, model):
    size = folder_size(model)
    assert add_reading(repo, model, "first") >= size
    assert len(entries(repo)) == len([p for p in model.rglob("*") if p.is_file()])
    assert add_reading(repo, model, "again") < size // 10  # headers only (they are parsed again)
    assert snapshot_id(repo, "again") == snapshot_id(repo, "first") == fresh_snapshot(tmp_path, model)
    assert repo.fsck().ok


def test_a_file_in_the_racy_window_is_read_again(tmp_path, repo, model):
    """Recorded while its mtime is as new as the read: a same-size write whose mtime is set
    back must still be seen (git's racily clean entries)."""
    weights = model / "model.safetensors"
    os.utime(weights, None)  # modified just now: the entry recorded next is racy
    repo.add(model, "first")
    st = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # the last byte of the last tensor: same size
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime as recorded
    assert weights.stat().st_size == st.st_size and weights.stat().st_mtime_ns == st.st_mtime_ns
    assert add_reading(repo, model, "second") >= st.st_size
    assert snapshot_id(repo, "second") == fresh_snapshot(tmp_path, model) != snapshot_id(repo, "first")


def test_racy_entries_are_not_trusted_even_when_stat_matches(repo, model):
    """The rule itself, on a real entry: identical identity, but recorded less than MARGIN_NS
    after the mtime, is a miss; recorded later, a hit."""
    repo.add(model, "first")
    path = model / "notes" / "a.txt"
    now = filecache.Identity.of(path.stat())
    with repo.store.read() as r:
        value = r.meta_bytes(now.key)
        assert value is not None
        entry = filecache.Entry.decode(now.key, value)
        assert entry is not None and entry.identity == now and entry.trusted
        assert filecache.lookup(r, now, filecache.BLOB) == entry.ids
        assert filecache.lookup(r, now, filecache.WEIGHTS) is None  # another kind of entry
    for began, hit in ((now.mtime_ns + filecache.MARGIN_NS // 2, False), (now.mtime_ns, False),
                       (now.mtime_ns + filecache.MARGIN_NS + 1, True)):
        racy = filecache.Entry(now, began, filecache.BLOB, entry.ids)
        repo.store.write(lambda txn, e=racy: filecache.record(txn, [e]))
        with repo.store.read() as r:
            assert (filecache.lookup(r, now, filecache.BLOB) is not None) is hit, began


def test_a_changed_file_with_a_new_mtime_is_read_again(tmp_path, repo, model):
    repo.add(model, "first")
    text = model / "notes" / "a.txt"
    text.write_text("another text of the same len\n"[: len(text.read_text())])
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-2] ^= 0x01
    weights.write_bytes(bytes(data))
    age(model, LONG_AGO + 100)  # old, but not the recorded mtime
    assert add_reading(repo, model, "second") >= folder_size(model)
    assert snapshot_id(repo, "second") == fresh_snapshot(tmp_path, model) != snapshot_id(repo, "first")


def test_gc_removes_entries_of_collected_objects(tmp_path, repo, model):
    repo.add(model, "first")
    first = snapshot_id(repo, "first")
    assert entries(repo)
    repo.delete_branch("first")
    freed = repo.gc(expire="now").freed
    assert freed.file_cache_entries == len([p for p in model.rglob("*") if p.is_file()])
    assert entries(repo) == {}
    assert repo.fsck().ok
    assert add_reading(repo, model, "back") >= folder_size(model)  # nothing to trust: read again
    assert snapshot_id(repo, "back") == first


def test_entries_of_live_objects_survive_gc_and_a_damaged_entry_is_a_miss(repo, model):
    repo.add(model, "first")
    repo.gc(expire="now")
    kept = entries(repo)
    assert kept and all(e is not None for e in kept.values())
    key = next(iter(kept))
    repo.store.write(lambda txn: txn.set_meta_bytes(key, b"\x00" * 40))
    assert entries(repo)[key] is None
    assert add_reading(repo, model, "again") >= min(e.identity.size for e in kept.values() if e)
    assert snapshot_id(repo, "again") == snapshot_id(repo, "first")
    assert all(e is not None for e in entries(repo).values())  # the add recorded it anew


def test_cached_expert_still_gets_its_catalog(tmp_path, fam):
    """An expert the cache vouches for, added --base another base, is measured from the store:
    its entries are those a fresh analyze writes."""
    expert = tmp_path / "expert"
    shutil.copytree(fam["expert-1"], expert)
    age(expert)
    with Repo.init(tmp_path / "a", chunk_size=CHUNK) as repo:
        repo.add(fam["base"], "base")
        repo.add(fam["expert-2"], "other")
        repo.add(expert, "e", base="base")
        before = read_bytes()
        res = repo.add(expert, "e2", base="other")
        assert read_bytes() - before < folder_size(expert) // 10
        assert res.analyzed is not None and res.analyzed.measured > 0
        base_t, exp_t = stored_tensors(repo, "other"), stored_tensors(repo, "e2")
        with repo.store.read() as r:
            for name, t in exp_t.items():
                for e, b in zip(t.chunks, base_t[name].chunks):
                    if e != b:
                        st = catalog.lookup(r, e, b, t.dtype)
                        assert st is not None
                        assert catalog.same(st, catalog.measure(r.chunk(e), r.chunk(b), t.dtype))
