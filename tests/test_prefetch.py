"""The merge's prefetch (store.prefetch): values are located in the data file without being read,
the prefetcher brings exactly those bytes into the page cache, the map's read-ahead is off only
while it runs (and nested uses keep it off), and a merge gives the same bytes with and without it.

The page-cache check (mincore) needs a file system whose pages POSIX_FADV_DONTNEED can drop (not
tmpfs), and is skipped elsewhere.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import time
from pathlib import Path

import pytest
from make_family import make_family

from mpstore import Repo
from mpstore.merge.request import MergeRequest
from mpstore.store.prefetch import GAP, Prefetcher

CHUNK = 16 << 10  # values of five pages: several overflow pages each


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    top = tmp_path_factory.mktemp("prefetch")
    fam = make_family(top / "fam", hidden=64, layers=2, vocab=256, dtype="bf16", experts=2,
                      kinds=("dense", "partial"), seed=3)
    with Repo.init(top / "repo", chunk_size=CHUNK) as repo:
        repo.add(fam["base"], "base")
        for i in (1, 2):
            repo.add(fam[f"expert-{i}"], f"e{i}", base="base")
    return top / "repo"


def chunk_keys(repo: Repo, spec: str) -> list[bytes]:
    """Every chunk of a model's tensors, tensor by tensor."""
    with repo.store.read() as r:
        snap = r.snapshot_of(repo.resolve(spec))
        return [k for tid in snap.tensors.values() for k in r.tensor(tid).chunks]


def read_ahead_off(root: Path) -> bool:
    """Whether this process maps the store's data file with read-ahead off (VM_RAND_READ: "rr")."""
    data = str((root / ".mp" / "data.mdb").resolve())
    lines = Path("/proc/self/smaps").read_text().splitlines()
    flags = [lines[j].split()[1:] for i, line in enumerate(lines) if line.rstrip().endswith(data)
             for j in range(i + 1, len(lines)) if lines[j].startswith("VmFlags:")][:1]
    assert flags, "the data file is not mapped"
    return "rr" in flags[0]


def cached(path: Path, offset: int, length: int) -> bool:
    """Whether [offset, offset + length) of the file is in the page cache (mincore on a private
    mapping of it: asking touches nothing, where a read would start read-ahead)."""
    libc = ctypes.CDLL(None, use_errno=True)
    page = mmap.PAGESIZE
    start = offset // page * page
    pages = (offset + length - start + page - 1) // page
    vec = (ctypes.c_ubyte * pages)()
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as m:
        view = (ctypes.c_char * len(m)).from_buffer(m)
        try:
            if libc.mincore(ctypes.c_void_p(ctypes.addressof(view) + start), ctypes.c_size_t(pages * page), vec):
                raise OSError(ctypes.get_errno(), "mincore failed")
        finally:
            del view
    return all(v & 1 for v in vec)


def test_extent_locates_a_value_without_reading_it(store):
    with Repo.open(store) as repo, repo.store.read() as r:
        keys = chunk_keys(repo, "e1")
        data = store / ".mp" / "data.mdb"
        located = 0
        with open(data, "rb") as f:
            for key in keys:
                extent = r.extent(b"chunks", key)
                if extent is None:  # a small chunk, kept in its leaf
                    assert len(r.chunk(key)) < 2048
                    continue
                offset, length = extent
                assert os.pread(f.fileno(), length, offset) == bytes(r.stored_chunk(key))  # as stored
                located += 1
        assert located > 10
        assert r.extent(b"chunks", b"\1" * 16) is None


def test_prefetch_brings_exactly_the_named_values_into_the_page_cache(store):
    data = store / ".mp" / "data.mdb"
    fd = os.open(data, os.O_RDONLY)  # for the drop
    # read-ahead off from the start and the file dropped: only the pages touched from now on
    # (objects, B-tree pages) are cached, not the values beside them
    with Repo.open(store) as repo, repo.store.no_read_ahead(), repo.store.read() as r:
        try:
            repo.store.release_pages()
            os.sync()
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            keys = chunk_keys(repo, "e2")
            named = keys[: len(keys) // 2]
            wanted = [e for k in named if (e := r.extent(b"chunks", k)) is not None]
            # the other values, but those a run may take with it (within GAP of a named value)
            other = [e for k in keys[len(keys) // 2:] if k not in named
                     and (e := r.extent(b"chunks", k)) is not None
                     and all(abs(e[0] - w[0]) > GAP + CHUNK for w in wanted)]
            assert len(wanted) > 5 and len(other) > 5
            if any(cached(data, *e) for e in wanted + other):
                pytest.skip("the page cache of this file system cannot be dropped")
            before = [repo.store.uncached(*e) for e in other]
            with Prefetcher(repo.store, r, iter(named)) as p:
                deadline = time.monotonic() + 10
                while not all(cached(data, *e) for e in wanted) and time.monotonic() < deadline:
                    time.sleep(0.01)
                assert all(cached(data, *e) for e in wanted)
                assert all(repo.store.uncached(*e) == [] for e in wanted)
                p.reached(named[-1])
            assert [repo.store.uncached(*e) for e in other] == before  # nothing more of the others
        finally:
            os.close(fd)


def test_read_ahead_stays_off_until_the_outermost_use_ends(store):
    with Repo.open(store) as repo, repo.store.read():
        assert not read_ahead_off(store)
        with repo.store.no_read_ahead():
            with repo.store.no_read_ahead():
                assert read_ahead_off(store)
            assert read_ahead_off(store)
        assert not read_ahead_off(store)


def test_a_prefetcher_turns_read_ahead_back_on_when_it_ends_or_fails(store):
    def keys():
        yield b"\1" * 16
        raise RuntimeError("the outline failed")

    with Repo.open(store) as repo, repo.store.read() as r:
        with pytest.raises(RuntimeError, match="the outline failed"):
            Prefetcher(repo.store, r, keys())
        assert not read_ahead_off(store)
        keys = chunk_keys(repo, "e1")
        repo.store.release_pages()
        data = store / ".mp" / "data.mdb"
        with open(data, "rb") as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # cold: it does not step aside
        if not repo.store.uncached(0, data.stat().st_size):
            pytest.skip("the page cache of this file system cannot be dropped")
        with Prefetcher(repo.store, r, iter(keys)):
            assert read_ahead_off(store)
        assert not read_ahead_off(store)


def test_on_a_warm_cache_the_prefetcher_steps_aside(store):
    (store / ".mp" / "data.mdb").read_bytes()  # every page cached
    with Repo.open(store) as repo, repo.store.read() as r:
        keys = chunk_keys(repo, "e1")
        with Prefetcher(repo.store, r, iter(keys)) as p:
            assert not read_ahead_off(store)
            p.reached(keys[-1])
            assert not read_ahead_off(store)


@pytest.mark.parametrize("memory", [1 << 30, 64 << 10])  # blocks cached; not (every pass rereads)
def test_a_budgeted_merge_is_the_same_with_and_without_prefetch(store, monkeypatch, memory):
    req = MergeRequest("ties", "base", ["e1", "e2"], [{"weight": 0.5, "density": 0.5}] * 2, {}, "F32", "BF16")
    out = {}
    with Repo.open(store) as repo:
        for on in ("0", "1"):
            monkeypatch.setenv("MP_PREFETCH", on)
            branch = f"m-{memory}-{on}"
            res = repo.merge(req, branch, budget="30%", memory_limit=memory)
            assert res.realized["chunks_omitted"] > 0
            out[on] = (repo.commit(branch).commit.snapshot, res.realized["expert_bytes"], res.realized["base_bytes"])
            assert not read_ahead_off(store)
    assert out["0"] == out["1"]


@pytest.mark.parametrize("memory", [1 << 30, 64 << 10])
@pytest.mark.parametrize("budget", [None, "30%"])
def test_the_chunks_named_are_the_chunks_the_merge_reads(store, budget, memory):
    """Outline.chunks_read names every chunk the executor reads, and no other: their bytes are
    the merge's realized base + expert bytes (each distinct chunk counted once)."""
    from mpstore.merge import methods
    from mpstore.merge.executor import tasks
    from mpstore.merge.outline import outline

    req = MergeRequest("ties", "base", ["e1", "e2"], [{"weight": 0.5, "density": 0.5}] * 2, {}, "F32", "BF16")
    with Repo.open(store) as repo:
        plan = repo.plan(req, budget, memory_limit=memory)
        method = methods.get(plan.method)
        with repo.store.read() as r:
            todo = tasks(r, plan, method)
            sizes = {t.chunks[c]: t.chunk_len(c) for task in todo for t in [task.ref, *task.models]
                     for c in range(len(t.chunks))}
            named = {k for task in todo if task.copy is None
                     for k in outline(r, task, method, memory, counting=True).chunks_read()}
        res = repo.merge(req, f"named-{(budget or 'exact').rstrip('%')}-{memory}", budget=budget, memory_limit=memory)
    assert sum(sizes[k] for k in named) == res.realized["base_bytes"] + res.realized["expert_bytes"]
