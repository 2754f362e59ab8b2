"""What made `mp add` fast must not change what it stores (speed itself: tools/bench_store.py).

- The compiled catalog measurement (merge/deltakernel.py) gives numpy's numbers bit for bit:
  it is compared with the numpy formulas the catalog used before, kept here as the oracle.
- `add --base` measures the catalog while it reads the expert; its entries are byte for byte
  what `mp analyze` writes into a repository that added the same models without --base.
- The pipelined sink (a writer thread committing batches, frames reused) stores the same
  chunks and objects, whatever the batch size: checkouts are the files, fsck is clean (it also
  re-measures every catalog entry, so a frame reused before its measurement would show).
"""

from __future__ import annotations

import filecmp

import numpy as np
import pytest
from conftest import TINY
from make_family import make_family

from mpstore import Repo
from mpstore.merge import catalog
from mpstore.merge.catalog import BINS, DeltaStats, _float32
from mpstore.store import chunks

CHUNK = 4096


def numpy_measure(expert: bytes, base: bytes, dtype: str) -> DeltaStats:
    """The catalog's measurement as numpy formulas, one pass per statistic (the oracle)."""
    b = _float32(base, dtype)
    mag = np.abs(_float32(expert, dtype) - b)
    hist = np.bincount(mag.view(np.int32) >> 16, minlength=BINS)
    used = np.flatnonzero(hist)
    return DeltaStats(
        dtype=dtype,
        l2=float(np.sqrt(np.square(mag, dtype=np.float64).sum())),
        max_abs=float(mag.max()) if mag.size else 0.0,
        changed=int(np.count_nonzero(mag)),
        base_max=float(np.abs(b).max()) if b.size else 0.0,
        base_l2=float(np.sqrt(np.square(b, dtype=np.float64).sum())),
        bins=used.astype(np.uint16).tobytes(),
        counts=hist[used].astype(np.uint32).tobytes(),
    )


def encode(values: np.ndarray, dtype: str) -> bytes:
    if dtype == "BF16":
        return (values.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).tobytes()
    return values.astype({"F16": np.float16, "F32": np.float32, "F64": np.float64}[dtype]).tobytes()


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32", "F64"])
def test_kernel_equals_numpy_bit_for_bit(dtype):
    rng = np.random.default_rng(7)
    sizes = [0, 1, 7, 8, 9, 127, 128, 129, 1000, 4099, 65536, 262144 + 24, 524288]
    for i, n in enumerate(sizes):
        scale = 10.0 ** rng.integers(-30, 3) if dtype in ("F32", "F64") else 10.0 ** rng.integers(-3, 2)
        base = rng.standard_normal(n) * scale
        expert = base + rng.standard_normal(n) * scale * 1e-2 * (rng.random(n) < 0.6)
        if i % 3 == 2:
            expert[rng.integers(0, n)] = np.inf
        e, b = encode(expert, dtype), encode(base, dtype)
        assert catalog.measure(e, b, dtype).encode() == numpy_measure(e, b, dtype).encode(), (dtype, n)


def test_kernel_nan_is_nan_as_in_numpy():
    base = np.linspace(-1, 1, 1000)
    expert = base.copy()
    expert[10] = np.nan
    got = catalog.measure(encode(expert, "BF16"), encode(base, "BF16"), "BF16")
    want = numpy_measure(encode(expert, "BF16"), encode(base, "BF16"), "BF16")
    assert np.isnan(got.max_abs) and np.isnan(got.l2) and catalog.same(got, want)


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("speedfam"), **TINY, dtype="bf16", experts=3,
                       kinds=("dense", "partial", "lora"), seed=3)


def entries(repo: Repo) -> dict[bytes, bytes]:
    with repo.store.read() as r:
        return {k: bytes(v) for k, v in r.catalog_entries()}


def test_add_base_entries_equal_a_fresh_analyze(tmp_path, fam):
    with Repo.init(tmp_path / "inline", chunk_size=CHUNK) as a, Repo.init(tmp_path / "later", chunk_size=CHUNK) as b:
        for repo in (a, b):
            repo.add(fam["base"], "base")
        for i in (1, 2, 3):
            res = a.add(fam[f"expert-{i}"], f"e{i}", base="base")
            assert res.analyzed is not None and res.analyzed.measured == res.analyzed.pairs
            b.add(fam[f"expert-{i}"], f"e{i}")
            b.analyze(f"e{i}", "base")
        assert entries(a) == entries(b) and len(entries(a)) > 0
        for i in (1, 2, 3):
            assert a.commit(f"e{i}").commit.snapshot == b.commit(f"e{i}").commit.snapshot


@pytest.mark.parametrize("batch", [3 * CHUNK, 64 << 20])
def test_pipelined_add_stores_the_files_whatever_the_batch(tmp_path, fam, batch):
    saved = chunks.BATCH_BYTES
    chunks.BATCH_BYTES = batch
    try:
        with Repo.init(tmp_path / "repo", chunk_size=CHUNK) as repo:
            first = repo.add(fam["base"], "base")
            for i in (1, 2, 3):
                repo.add(fam[f"expert-{i}"], f"e{i}", base="base")
            assert first.new_bytes > 0
            for name, folder in (("base", fam["base"]), ("e1", fam["expert-1"]), ("e3", fam["expert-3"])):
                out = tmp_path / f"co-{name}"
                repo.checkout(name, out)
                same = filecmp.dircmp(folder, out)
                assert not (same.diff_files or same.left_only or same.right_only), name
                assert all(filecmp.cmp(p, out / p.name, shallow=False) for p in folder.iterdir() if p.is_file())
            check = repo.fsck()
            assert check.ok and check.catalog > 0, check.problems
    finally:
        chunks.BATCH_BYTES = saved
