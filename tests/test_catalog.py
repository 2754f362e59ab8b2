"""The delta catalog (`mp add --base`, `mp analyze`): every entry is what measuring its chunk pair
independently gives, chunks equal to the base get none, entries are shared and measured once, gc
drops them with their chunks, and exact merges that take their first radix pass from the catalog
are bit-identical to merges in a store without one (where the executor sweeps).

Statistics are recomputed here with torch from the safetensors files themselves; the store is
only asked which chunk digests each tensor has, so a chunk's bytes are located in the file.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_user_error, run_mp, store_fingerprint, stored_tensors
from make_family import make_family
from safetensors.torch import load_file, save_file

from mpstore import Repo
from mpstore.merge import catalog
from mpstore.merge.request import MergeRequest
from mpstore.store.ids import digest

CHUNK = 4096
SHAPES = {"hidden": 64, "layers": 2, "vocab": 256}
KINDS = ("dense", "partial", "lora")
EXPERTS = ("e1", "e2", "e3")


@pytest.fixture(scope="module")
def fams(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """One family per float dtype: base, expert-1 (dense), expert-2 (partial), expert-3 (lora)."""
    top = tmp_path_factory.mktemp("catfams")
    return {dt: make_family(top / dt, **SHAPES, dtype=dt, experts=3, kinds=KINDS, seed=11)
            for dt in ("f32", "bf16", "f16")}


def build(root: Path, fam: dict[str, Path], with_base: bool = True, chunk_size: int = CHUNK) -> dict:
    """base and e1..e3 (with or without --base); returns each add's AddResult. Closed again."""
    out = {}
    with Repo.init(root, chunk_size=chunk_size) as repo:
        out["base"] = repo.add(fam["base"], "base")
        for i, name in enumerate(EXPERTS, 1):
            out[name] = repo.add(fam[f"expert-{i}"], name, base="base" if with_base else None)
    return out


def differing(repo: Repo, expert: str, base: str = "base") -> list[tuple[str, int, bytes, bytes]]:
    """(tensor, chunk, expert digest, base digest) wherever the digests differ at one position."""
    et, bt = stored_tensors(repo, expert), stored_tensors(repo, base)
    out = []
    for name, t in et.items():
        b = bt[name]
        assert (t.dtype, t.shape, t.chunk_size) == (b.dtype, b.shape, b.chunk_size)
        out += [(name, c, e, d) for c, (e, d) in enumerate(zip(t.chunks, b.chunks)) if e != d]
    return out


def catalog_entries(repo: Repo) -> dict[bytes, bytes]:
    """Entries by (expert digest + base digest); the key's dtype suffix must be the entry's."""
    with repo.store.read() as r:
        out = {}
        for k, v in r.catalog_entries():
            assert k[32:] == catalog.DeltaStats.decode(v, k).dtype.encode()
            out[k[:32]] = bytes(v)
        return out


def load(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def expected_stats(e: torch.Tensor, b: torch.Tensor) -> dict:
    """The statistics of one chunk's delta, recomputed with torch in float32."""
    e32, b32 = e.to(torch.float32), b.to(torch.float32)
    mag = (e32 - b32).abs()
    hist = torch.bincount(mag.view(torch.int32) >> 16, minlength=1 << 16)
    used = hist.nonzero().flatten()
    return {
        "l2": math.sqrt(float((mag.to(torch.float64) ** 2).sum())),
        "max_abs": float(mag.max()),
        "changed": int(torch.count_nonzero(mag)),
        "base_max": float(b32.abs().max()),
        "bins": used.tolist(),
        "counts": hist[used].tolist(),
    }


def full_histogram(e: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    mag = (e.flatten().to(torch.float32) - b.flatten().to(torch.float32)).abs()
    return torch.bincount(mag.view(torch.int32) >> 16, minlength=1 << 16).numpy().astype(np.int64)


# ------------------------------------------------------------------------------ entries


@pytest.mark.parametrize("dtype", ["f32", "bf16", "f16"])
def test_entries_equal_an_independent_measurement(tmp_path, fams, dtype):
    fam = fams[dtype]
    adds = build(tmp_path / "repo", fam)
    assert adds["base"].analyzed is None  # no --base, no catalog work
    files = {n: load(fam[k]) for n, k in (("base", "base"), ("e1", "expert-1"), ("e2", "expert-2"),
                                            ("e3", "expert-3"))}
    with Repo.open(tmp_path / "repo") as repo:
        stored = catalog_entries(repo)
        wanted: set[bytes] = set()
        base_t = stored_tensors(repo, "base")
        for name in EXPERTS:
            diff = differing(repo, name)
            pairs = {e + d for _, _, e, d in diff}
            a = adds[name].analyzed
            assert a is not None and a.pairs == len(pairs) > 0, (name, a)
            assert a.measured == len(pairs - wanted)  # the three experts share no pair
            # both chunks of every newly measured pair were read, once
            sizes = {e + d: 2 * base_t[t].chunk_len(c) for t, c, e, d in diff}
            assert a.bytes_read == sum(sizes[k] for k in pairs - wanted)
            wanted |= pairs
            with repo.store.read() as r:
                for tname, c, e, d in diff:
                    t = base_t[tname]
                    per = t.chunk_size // files["base"][tname].element_size()
                    ev = files[name][tname].flatten()[c * per:(c + 1) * per]
                    bv = files["base"][tname].flatten()[c * per:(c + 1) * per]
                    # the slice of the file really is the stored chunk
                    assert digest(ev.contiguous().view(torch.uint8).numpy().tobytes()) == e
                    assert digest(bv.contiguous().view(torch.uint8).numpy().tobytes()) == d
                    st = catalog.lookup(r, e, d, t.dtype)
                    assert st is not None, (name, tname, c)
                    want = expected_stats(ev, bv)
                    where = f"{name} {tname} chunk {c}"
                    assert st.l2 == pytest.approx(want["l2"], rel=1e-6), where
                    assert st.max_abs == want["max_abs"], where
                    assert st.changed == want["changed"], where
                    assert st.base_max == want["base_max"], where
                    assert np.frombuffer(st.bins, dtype=np.uint16).tolist() == want["bins"], where
                    assert np.frombuffer(st.counts, dtype=np.uint32).tolist() == want["counts"], where
                # a position where the expert's chunk is the base's has no entry (nothing to measure)
                et_equal = [(x, tn) for tn, t in stored_tensors(repo, name).items()
                            for x, y in zip(t.chunks, base_t[tn].chunks) if x == y]
                assert all(catalog.lookup(r, x, x, base_t[tn].dtype) is None for x, tn in et_equal)
                # a tensor's histogram: the catalog's, plus zeros for the chunks equal to the base
                et = stored_tensors(repo, name)
                for tname, t in et.items():
                    h = catalog.tensor_histogram(r, t, base_t[tname])
                    assert h is not None and h.dtype == np.int64 and h.shape == (1 << 16,)
                    assert np.array_equal(h, full_histogram(files[name][tname], files["base"][tname])), tname
                    changed = [c for c, (x, y) in enumerate(zip(t.chunks, base_t[tname].chunks)) if x != y]
                    if len(changed) >= 2:  # `only`: the sum over those chunks alone
                        only = frozenset(changed[::2])
                        per = t.chunk_size // files["base"][tname].element_size()
                        numel = files["base"][tname].numel()
                        idx = torch.cat([torch.arange(c * per, min((c + 1) * per, numel)) for c in sorted(only)])
                        want = full_histogram(files[name][tname].flatten()[idx], files["base"][tname].flatten()[idx])
                        assert np.array_equal(catalog.tensor_histogram(r, t, base_t[tname], only), want), tname
        # exactly the differing pairs have entries: none for chunks equal to the base
        assert set(stored) == wanted
        assert repo.status().to_json()["entries"]["catalog"] == len(wanted)
        res = repo.fsck()
        assert res.problems == [] and res.catalog == len(wanted)


def test_expert_equal_to_the_base_gets_no_entries(tmp_path, fams):
    fam = fams["bf16"]
    with Repo.init(tmp_path / "repo", chunk_size=CHUNK) as repo:
        repo.add(fam["base"], "base")
        res = repo.add(fam["base"], "same", base="base")
        assert (res.analyzed.pairs, res.analyzed.measured, res.analyzed.bytes_read) == (0, 0, 0)
        assert catalog_entries(repo) == {}
        # lora: only the adapted projections' chunks differ, and only they get entries
        res = repo.add(fam["expert-3"], "lora", base="base")
        diff = differing(repo, "lora")
        assert 0 < res.analyzed.pairs == len(diff)
        assert {k[:16] for k in catalog_entries(repo)} == {e for _, _, e, _ in diff}
        assert {t for t, *_ in diff} < set(stored_tensors(repo, "lora"))


def test_entries_are_shared_and_measured_once(tmp_path, fams):
    fam = fams["f32"]
    with Repo.init(tmp_path / "repo", chunk_size=CHUNK) as repo:
        repo.add(fam["base"], "base")
        first = repo.add(fam["expert-1"], "a", base="base").analyzed
        before = catalog_entries(repo)
        assert first.measured == first.pairs == len(before) > 0
        again = repo.add(fam["expert-1"], "b", base="base").analyzed  # the same folder, another name
        assert (again.pairs, again.measured, again.bytes_read) == (first.pairs, 0, 0)
        for spec in ("a", "b", "a"):
            res = repo.analyze(spec, "base")
            assert (res.pairs, res.measured, res.bytes_read) == (first.pairs, 0, 0)
        assert catalog_entries(repo) == before


def test_analyze_after_add_gives_the_same_entries(tmp_path, fams):
    fam = fams["bf16"]
    build(tmp_path / "with", fam, with_base=True)
    adds = build(tmp_path / "without", fam, with_base=False)
    assert all(a.analyzed is None for a in adds.values())
    with Repo.open(tmp_path / "with") as repo:
        want = catalog_entries(repo)
    with Repo.open(tmp_path / "without") as repo:
        assert catalog_entries(repo) == {}
        for name in EXPERTS:
            n = len({e + d for *_, e, d in differing(repo, name)})
            res = repo.analyze(name, "base", threads=2)
            assert res.pairs == res.measured == n, (name, res)
            assert res.bytes_read > 0 and res.seconds >= 0
            assert repo.analyze(name, "base").measured == 0
        assert catalog_entries(repo) == want  # key for key, byte for byte
        assert repo.fsck().problems == []


def test_mp_analyze(tmp_path, fams):
    root = tmp_path / "repo"
    build(root, fams["f32"], with_base=False)
    with Repo.open(root) as repo:
        n = len({e + d for *_, e, d in differing(repo, "e2")})
    line = re.compile(r"(\d+) chunks differ from the base; (\d+) measured \(([\d.]+ (B|KiB|MiB)) read\) in [\d.]+ s")
    proc = run_mp("-C", root, "-q", "analyze", "e2", "--base", "base")
    assert proc.returncode == 0, proc.stderr
    m = line.fullmatch(proc.stdout.strip())
    assert m, proc.stdout
    assert (int(m.group(1)), int(m.group(2))) == (n, n)
    proc = run_mp("-C", root, "-q", "analyze", "e2", "--base", "base")
    m = line.fullmatch(proc.stdout.strip())
    assert m and (int(m.group(1)), int(m.group(2)), m.group(3)) == (n, 0, "0 B"), proc.stdout
    with Repo.open(root) as repo:
        assert len(catalog_entries(repo)) == n
        m3 = len({e + d for *_, e, d in differing(repo, "e3")})
    proc = run_mp("-C", root, "-q", "analyze", "e3", "--base", "base", "--json")
    got = json.loads(proc.stdout)
    assert proc.returncode == 0 and (got["pairs"], got["measured"]) == (m3, m3) and got["bytes_read"] > 0
    before = store_fingerprint(root)
    assert_user_error(run_mp("-C", root, "analyze", "nosuch", "--base", "base"), "nosuch")
    assert_user_error(run_mp("-C", root, "analyze", "e1", "--base", "nosuch"), "nosuch")
    assert store_fingerprint(root) == before


# ------------------------------------------------------------------------------ gc and fsck


def test_gc_drops_entries_whose_chunks_are_gone(tmp_path, fams):
    root = tmp_path / "repo"
    build(root, fams["f32"])
    with Repo.open(root) as repo:
        keys = {name: {e + d for *_, e, d in differing(repo, name)} for name in EXPERTS}
        assert not keys["e1"] & (keys["e2"] | keys["e3"])
        assert set(catalog_entries(repo)) == keys["e1"] | keys["e2"] | keys["e3"]
        assert repo.status(expire="now").to_json()["reclaimable"]["catalog_entries"] == 0
        repo.delete_branch("e1")
        assert repo.status(expire="now").to_json()["reclaimable"]["catalog_entries"] == len(keys["e1"])
        freed = repo.gc(expire="now").to_json()
        assert freed["catalog_entries"] == len(keys["e1"]), freed
        assert set(catalog_entries(repo)) == keys["e2"] | keys["e3"]
        assert repo.fsck().problems == []
        # The base branch goes too, but e2 and e3 name it as their base: it stays, and so do they.
        repo.delete_branch("base")
        assert repo.gc(expire="now").to_json()["catalog_entries"] == 0
        assert set(catalog_entries(repo)) == keys["e2"] | keys["e3"]
        # What remains still serves a budgeted merge.
        req = MergeRequest("task_arithmetic", repo.commit("e2").commit.base.hex(), ["e2", "e3"],
                           [{"weight": 0.5}, {"weight": 0.5}], {}, "F32", None, 0)
        plan = repo.plan(req, budget="50%")
        assert plan.omit and plan.estimate["expert_bytes"] <= plan.budget["bytes"]
        repo.delete_branch("e2")
        repo.delete_branch("e3")
        assert repo.gc(expire="now").to_json()["catalog_entries"] == len(keys["e2"] | keys["e3"])
        assert catalog_entries(repo) == {}
        assert repo.fsck().problems == []


def test_fsck_is_clean_after_adds_with_base(tmp_path, fams):
    root = tmp_path / "repo"
    build(root, fams["bf16"])
    with Repo.open(root) as repo:
        n = len(catalog_entries(repo))
        res = repo.fsck()
    assert res.problems == [] and res.catalog == n > 0
    proc = run_mp("-C", root, "fsck")
    assert proc.returncode == 0 and proc.stdout == "", proc.stdout + proc.stderr
    assert f"{n} catalog entries: 0 problems" in proc.stderr


# ------------------------------------------------------------------------------ exact merges


RADIX_METHODS = {
    "ties": {"p": {"density": 0.3}, "g": {}},
    "breadcrumbs": {"p": {"density": 0.4, "gamma": 0.05}, "g": {}},
    "breadcrumbs_ties": {"p": {"density": 0.35, "gamma": 0.02}, "g": {}},
    "ties-lambda": {"p": {"density": 0.5}, "g": {"lambda": 0.8, "normalize": False}, "method": "ties"},
}


def _radix_request(label: str, weights=(0.6, 0.3, 0.5), compute="F32", out=None) -> MergeRequest:
    spec = RADIX_METHODS[label]
    return MergeRequest(spec.get("method", label), "base", list(EXPERTS),
                        [{"weight": w, **spec["p"]} for w in weights], dict(spec["g"]), compute, out, 0)


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_catalog_accelerated_exact_merges_equal_sweeping_ones(tmp_path, fams, dtype):
    """Stores: every expert with its catalog; none; and e1 only (e2, e3 analyzed later for
    nothing: a tensor with any input lacking entries is swept)."""
    fam = fams[dtype]
    build(tmp_path / "catalog", fam, with_base=True)
    build(tmp_path / "none", fam, with_base=False)
    with Repo.init(tmp_path / "mixed", chunk_size=CHUNK) as repo:
        repo.add(fam["base"], "base")
        repo.add(fam["expert-1"], "e1", base="base")
        repo.add(fam["expert-2"], "e2")
        repo.add(fam["expert-3"], "e3")
    tiny, default = 64 << 10, 1 << 30
    cases = [(label, _radix_request(label), tiny) for label in RADIX_METHODS]
    cases += [(label, _radix_request(label), default) for label in ("ties", "breadcrumbs")]
    cases.append(("ties-out", _radix_request("ties", out="BF16" if dtype == "f32" else "F32"), tiny))
    cases.append(("ties-f64", _radix_request("ties", compute="F64"), tiny))
    got: dict[str, dict] = {}
    for store in ("catalog", "none", "mixed"):
        with Repo.open(tmp_path / store) as repo:
            for n, (label, req, ml) in enumerate(cases):
                if store == "mixed" and ml == default:
                    continue
                res = repo.merge(req, f"m{n}", memory_limit=ml)
                got.setdefault(f"{label}@{ml}", {})[store] = (repo.commit(f"m{n}").commit.snapshot.hex(),
                                                             res.realized)
    for key, by_store in got.items():
        snaps = {s: v[0] for s, v in by_store.items()}
        assert len(set(snaps.values())) == 1, (key, snaps)
        if key.endswith(f"@{64 << 10}"):
            # blocks are not cached: the store with a catalog skips the first radix sweep
            cat, none = by_store["catalog"][1], by_store["none"][1]
            assert cat["read_bytes"] < none["read_bytes"], (key, cat, none)
            assert cat["expert_bytes"] == none["expert_bytes"] and cat["output_bytes"] == none["output_bytes"]
    # the result is the same whatever the memory limit
    for label in ("ties", "breadcrumbs"):
        assert got[f"{label}@{default}"]["catalog"][0] == got[f"{label}@{tiny}"]["catalog"][0]


def test_exact_ties_keeps_exactly_k_entries_with_the_catalog(tmp_path, fams):
    """One expert, weight 1, ties: out != base exactly where the top-k delta entries are (k =
    floor(density * n), the expert being bf16 so base + delta is the expert, exactly)."""
    fam = fams["bf16"]
    build(tmp_path / "repo", fam)
    files = {"base": load(fam["base"]), "e1": load(fam["expert-1"])}
    with Repo.open(tmp_path / "repo") as repo:
        req = MergeRequest("ties", "base", ["e1"], [{"weight": 1.0, "density": 0.3}], {}, "F32", "BF16", 0)
        repo.merge(req, "m", memory_limit=64 << 10)
        repo.checkout("m", tmp_path / "m")
    out = load(tmp_path / "m")
    for name, b in files["base"].items():
        e = files["e1"][name]
        nonzero = int(torch.count_nonzero(e.float() - b.float()))
        k = min(max(1, math.floor(0.3 * b.numel())), nonzero)
        assert int((out[name] != b).sum()) == k, name
        kept = out[name] != b
        assert torch.equal(out[name][kept], e[kept]), name


# ------------------------------------------------------------------------------ dtype of an entry


def _reinterpreted_pair(folder: Path) -> dict[str, Path]:
    """An F16 base and expert, and a BF16 base and expert with the very same bytes."""
    g = torch.Generator().manual_seed(1)
    b16 = (torch.randn(64, 64, generator=g) * 0.02).to(torch.float16)
    e16 = (b16.float() + torch.randn(64, 64, generator=g) * 0.002).to(torch.float16)
    paths = {}
    for name, t in (("hb", b16), ("he", e16), ("bb", b16.view(torch.bfloat16)), ("be", e16.view(torch.bfloat16))):
        p = folder / name
        p.mkdir(parents=True)
        save_file({"w": t}, str(p / "model.safetensors"))
        paths[name] = p
    return paths


def test_an_entry_measured_for_another_dtype_is_not_used(tmp_path):
    paths = _reinterpreted_pair(tmp_path / "models")
    snaps, analyzed = {}, {}
    for label, with_base in (("catalog", True), ("none", False)):
        with Repo.init(tmp_path / label, chunk_size=CHUNK) as repo:
            repo.add(paths["hb"], "hb")
            repo.add(paths["bb"], "bb")
            repo.add(paths["he"], "he", base="hb" if with_base else None)
            res = repo.add(paths["be"], "be", base="bb" if with_base else None)
            analyzed[label] = res.analyzed
            req = MergeRequest("ties", "bb", ["be"], [{"weight": 1.0, "density": 0.3}], {}, "F32", None, 0)
            repo.merge(req, "m")
            snaps[label] = repo.commit("m").commit.snapshot.hex()
            if with_base:
                with repo.store.read() as r:
                    t, b = stored_tensors(repo, "be")["w"], stored_tensors(repo, "bb")["w"]
                    dtypes = [getattr(catalog.lookup(r, e, d, t.dtype), "dtype", None) for e, d in zip(t.chunks, b.chunks)]
    assert snaps["catalog"] == snaps["none"]
    # what steers the BF16 merge must have been measured as BF16
    assert dtypes == ["BF16"] * len(dtypes), dtypes


def test_outdated_entries_are_measured_again_and_collected(tmp_path, fams):
    """Entries of an older layout are derived data: a budget asks for `mp analyze`, which
    measures them again in place; gc drops what no current entry replaced."""
    import msgpack

    root = tmp_path / "repo"
    build(root, fams["f32"])
    with Repo.open(root) as repo:
        fresh = catalog_entries(repo)
        req = MergeRequest("task_arithmetic", "base", list(EXPERTS), [{"weight": 0.3}] * 3, {}, "F32", None, 0)
        want = repo.plan(req, budget="25%").omit

        def downgrade(txn):  # format 1: no base_l2
            for k, v in list(txn.catalog_entries()):
                fields = msgpack.unpackb(v)
                txn.put_catalog(k, msgpack.packb([1, *fields[1:6], *fields[7:]], use_bin_type=True))
            txn.put_catalog(b"\x00" * 32, b"\x91\x01")  # an entry keyed without a dtype

        repo.store.write(downgrade)
        with pytest.raises(Exception, match="mp analyze"):
            repo.plan(req, budget="25%")
        assert len(repo.fsck().problems) == len(fresh) + 1
        measured = sum(repo.analyze(name, "base").measured for name in EXPERTS)
        assert measured == len(fresh)
        assert repo.plan(req, budget="25%").omit == want
        assert repo.gc(expire="now").to_json()["catalog_entries"] == 1
        assert catalog_entries(repo) == fresh and repo.fsck().problems == []
