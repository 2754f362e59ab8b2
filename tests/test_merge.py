"""`mp merge`, `mp replay`, `mp revert` and the lineage they record, through the real command
and a real store: plans shown and replayed, per-model values and MergeKit YAML, validation
before any write, chunks where every expert is the base never read, results independent of
threads and memory limit, reverting a merge, and SIGKILL in the middle of a merge.

Every `mp merge` process imports torch (about 2 s of start-up on 2 cores), so the runs that do
not depend on one another (the bad requests and two good ones) start together, each against its
own store, from one module fixture; each test then checks its own run.
"""

from __future__ import annotations

import json
import math
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import lmdb
import pytest
import torch
import yaml
from conftest import MP, assert_user_error, run_mp, store_fingerprint, tensors_of, tree_bytes
from make_family import make_family
from safetensors.torch import load_file, save_file

from mpstore import Repo
from mpstore.merge.request import MergeRequest

HEX32 = re.compile(r"[0-9a-f]{32}")
CHUNK = 4096
FAMILY = {"hidden": 64, "layers": 2, "vocab": 256, "dtype": "f32"}
Q0 = "model.layers.0.self_attn.q_proj.weight"  # 64 x 64 float32: 4 chunks
UP1 = "model.layers.1.mlp.up_proj.weight"  # 192 x 64 float32: 12 chunks
EMBED = "model.embed_tokens.weight"


@pytest.fixture(scope="module")
def fam(tmp_path_factory) -> dict[str, Path]:
    """float32 base, expert-1 (dense), expert-2 (partial)."""
    return make_family(tmp_path_factory.mktemp("f32fam"), **FAMILY, experts=2, kinds=("dense", "partial"), seed=4)


def new_store(root: Path, fam: dict[str, Path], chunk_size: int = CHUNK) -> Path:
    """base, e1 and e2 on their branches; closed again so `mp` may own it."""
    with Repo.init(root, chunk_size=chunk_size) as r:
        r.add(fam["base"], "base", message="base")
        r.add(fam["expert-1"], "e1", base="base", message="e1")
        r.add(fam["expert-2"], "e2", base="base", message="e2")
    return root


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    return proc.stdout


def snapshot(repo: Repo, spec: str):
    with repo.store.read() as r:
        return r.object(repo.commit(spec).commit.snapshot)


def layer_t(name: str) -> float:
    """MergeKit's gradient position: layer i of 2 at i/(2-1); other tensors at 0."""
    m = re.search(r"\.layers\.(\d+)\.", name)
    return float(m.group(1)) if m else 0.0


def ties_reference(base: torch.Tensor, models: list[torch.Tensor], weights: list[float],
                   densities: list[float], lam: float = 1.0, tied: bool = True) -> torch.Tensor:
    """docs/merge_methods.md §2.2-2.3 (ties, normalize on), whole tensors, float32. The k largest
    |delta| are kept; entries tied with the k-th are all kept (tied=True) or all dropped."""
    deltas = []
    for m, rho in zip(models, densities):
        d = (m - base).flatten()
        if rho < 1:
            kth = torch.topk(d.abs(), max(1, math.floor(rho * d.numel()))).values[-1]
            d = torch.where(d.abs() >= kth if tied else d.abs() > kth, d, 0)
        deltas.append(d)
    w = torch.tensor(weights, dtype=torch.float32).unsqueeze(1)
    weighted = torch.stack(deltas) * w
    elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
    agree = torch.sign(weighted) == elected
    divisor = torch.where(agree, w, 0).sum(0)
    divisor[divisor == 0] = 1
    mixed = torch.where(agree, weighted, 0).sum(0) / divisor * lam
    return (base.flatten() + mixed).reshape(base.shape)


def assert_ties(got: torch.Tensor, base, models, weights, densities, name: str, lam: float = 1.0,
                rtol: float = 2e-5, atol: float = 1e-7) -> None:
    """`got` is the ties merge, elementwise, up to how entries tied exactly at the top-k cut are
    broken. These family deltas are often a few float32 steps of the base, so |delta| has exact
    ties at the cut: MergeKit keeps an arbitrary subset of them (§2.3); only an element where
    such a tie lies may take the value of either extreme."""
    keep = ties_reference(base, models, weights, densities, lam, tied=True)
    drop = ties_reference(base, models, weights, densities, lam, tied=False)
    g = got.float()
    ok_ = torch.isclose(g, keep, rtol=rtol, atol=atol) | torch.isclose(g, drop, rtol=rtol, atol=atol)
    bad = (~ok_).nonzero()
    assert bad.numel() == 0, (f"{name}: {len(bad)} of {g.numel()} elements differ from the reference, first at "
                              f"{bad[0].tolist()}: {g[tuple(bad[0])].item()!r} vs {keep[tuple(bad[0])].item()!r}")


# ------------------------------------------------------------------------------ the tour

def test_merge_show_replay_and_graph(tmp_path, fam):
    root = new_store(tmp_path / "repo", fam)
    proc = run_mp("-C", root, "merge", "--method", "ties", "--base", "base", "e1", "e2",
                  "--weight", "0.5", "--density", "0.4", "-b", "merged", "-m", "v1")
    cid = ok(proc).strip()
    assert HEX32.fullmatch(cid), proc.stdout
    with Repo.open(root) as repo:
        ids = {n: repo.resolve(n).hex() for n in ("base", "e1", "e2", "merged")}
        got = tensors_of(repo, "merged", tmp_path)
        inputs = {n: tensors_of(repo, n, tmp_path) for n in ("base", "e1", "e2")}
    assert ids["merged"] == cid
    for n, t in got.items():
        assert_ties(t, inputs["base"][n], [inputs["e1"][n], inputs["e2"][n]], [0.5, 0.5], [0.4, 0.4], n)

    text = ok(run_mp("-C", root, "show", "merged"))
    plan_line = next(line for line in text.splitlines() if line.startswith("plan"))
    assert "ties" in plan_line and "seed 0" in plan_line, plan_line
    assert f"base    {ids['base'][:12]}" in text
    inputs_shown = [line for line in text.splitlines() if line.strip().startswith("input")]
    assert [line.split()[1] for line in inputs_shown] == [ids["e1"][:12], ids["e2"][:12]]
    for line in inputs_shown:
        assert "weight=0.5" in line and "density=0.4" in line, line
    assert "v1" in text

    doc = json.loads(ok(run_mp("-C", root, "show", "merged", "--json")))
    assert doc["id"] == cid
    assert doc["parents"] == [ids["base"], ids["e1"], ids["e2"]]
    plan = doc["plan"]
    assert plan["method"] == "ties" and plan["seed"] == 0
    assert plan["base"] == ids["base"] and plan["models"] == [ids["e1"], ids["e2"]]
    assert [q["weight"][0] for q in plan["model_params"]] == [0.5, 0.5]
    assert [q["density"][0] for q in plan["model_params"]] == [0.4, 0.4]
    assert plan["global_params"]["normalize"][-1] is True  # ties normalizes by default
    assert set(doc["stats"]) >= {"base_bytes", "expert_bytes", "chunks_skipped", "tensors_copied"}

    replay = run_mp("-C", root, "replay", "merged")
    assert replay.returncode == 0 and replay.stdout.strip() == "identical", replay.stdout + replay.stderr

    lines = ok(run_mp("-C", root, "log", "--graph", "merged")).splitlines()
    assert lines[0].startswith(cid[:12]) and "v1" in lines[0] and "[ties]" in lines[0], lines
    assert lines[1:] == [f"├── {ids['base'][:12]}  base", f"├── {ids['e1'][:12]}  e1",
                         f"└── {ids['e2'][:12]}  e2"], lines


# ------------------------------------------------------------------------------ runs started together

def _odd_models(folder: Path) -> dict[str, Path]:
    """Hand-built models that cannot be merged with `base`: another shape, another dtype, a
    tensor missing."""
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(4, 8, generator=g), torch.randn(16, generator=g)
    variants = {"base": {"a": a, "b": b}, "wide": {"a": torch.randn(4, 9, generator=g), "b": b},
                "half": {"a": a.half(), "b": b}, "lacking": {"a": a + 1}}
    paths = {}
    for name, tensors in variants.items():
        p = folder / name
        p.mkdir(parents=True)
        save_file(tensors, str(p / "model.safetensors"))
        (p / "config.json").write_text('{"model_type": "toy"}\n')
        paths[name] = p
    return paths


YAML_OK = """\
merge_method: ties
base_model: base
models:
  - model: base
  - model: e1
    parameters:
      weight: 0.6
      density: [0.3, 0.7]
  - model: e2
    parameters:
      weight:
        - filter: mlp
          value: 0.2
        - value: 0.4
      density: 0.5
parameters:
  normalize: true
  lambda: 0.9
dtype: float32
out_dtype: bfloat16
"""

YAML_SLICES = """\
merge_method: linear
slices:
  - sources:
      - {model: e1, layer_range: [0, 2]}
      - {model: e2, layer_range: [0, 1]}
parameters: {weight: 0.5}
"""

YAML_HALF = """\
merge_method: task_arithmetic
base_model: base
models:
  - {model: half, parameters: {weight: 1.0}}
"""

YAML_NORMALIZE = """\
merge_method: linear
models:
  - model: e1
  - model: e2
parameters: {weight: 0.5}
normalize: true
"""

YAML_TYPO = """\
merge_method: ties
base_model: base
models:
  - model: e1
    parameters: {weight: 0.5, densty: 0.3}
  - model: e2
    parameters: {weight: 0.5}
"""

M = ["merge", "-b", "out"]
TIES = [*M, "--method", "ties", "--base", "base", "e1", "e2"]


@dataclass
class Case:
    args: list
    fragments: tuple = ()
    store: str = "fam"  # or "odd"
    yaml: str | None = None


BAD = {
    "unknown-method": Case([*M, "--method", "tiess", "--base", "base", "e1", "--weight", "1"],
                           ("unknown merge method 'tiess'",)),
    "density-above-1": Case([*TIES, "--weight", "0.5", "--density", "1.5"], ("density 1.5", "outside (0, 1]")),
    "della-epsilon": Case([*M, "--method", "della", "--base", "base", "e1", "--weight", "1", "--density", "0.5",
                           "--epsilon", "0.6"], ("epsilon 0.6",)),
    "slerp-two-models": Case([*M, "--method", "slerp", "--base", "base", "e1", "e2", "--t", "0.5"],
                             ("slerp", "exactly 1", "got 2")),
    "linear-weights-sum-to-zero": Case([*M, "--method", "linear", "e1", "e2", "--weight", "1,-1"], ("sum to zero",)),
    "weight-count": Case([*TIES, "--weight", "0.5,0.3,0.2"], ("--weight has 3 values for 2 models",)),
    "shape-mismatch": Case([*M, "--method", "task_arithmetic", "--base", "base", "wide", "--weight", "1"],
                           ("'a'", "[4, 9]", "[4, 8]"), store="odd"),
    # without a compute dtype each tensor computes in its own: inputs must agree (with one, as
    # MergeKit, every input is converted to it)
    "dtype-mismatch": Case([*M, "--config", "{yaml}"], ("'a'", "F16", "F32"), store="odd", yaml=YAML_HALF),
    "tensor-missing": Case([*M, "--method", "task_arithmetic", "--base", "base", "lacking", "--weight", "1"],
                           ("'b'", "missing"), store="odd"),
    "yaml-slices": Case([*M, "--config", "{yaml}"], ("slices[0]", "different numbers of layers"), yaml=YAML_SLICES),
    "yaml-misplaced-key": Case([*M, "--config", "{yaml}"], ("normalize", "under `parameters:`"), yaml=YAML_NORMALIZE),
    "yaml-unknown-parameter": Case([*M, "--config", "{yaml}"], ("'densty'",), yaml=YAML_TYPO),
}
GOOD = {
    "weight-list": Case(["merge", "--method", "task_arithmetic", "--base", "base", "e1", "e2",
                         "--weight", "0.5,0.3", "-b", "wl"]),
    "yaml": Case(["merge", "--config", "{yaml}", "-b", "cfg", "-m", "from yaml"], yaml=YAML_OK),
}


@dataclass
class Ran:
    root: Path
    proc: subprocess.CompletedProcess
    before: dict
    after: dict


@pytest.fixture(scope="module")
def runs(tmp_path_factory, fam) -> dict[str, Ran]:
    """Every case of BAD and GOOD, each on its own fresh store, run three at a time."""
    top = tmp_path_factory.mktemp("runs")
    odd = _odd_models(top / "odd-models")
    prepared = {}
    for name, case in {**BAD, **GOOD}.items():
        root = top / name
        if case.store == "odd":
            with Repo.init(root, chunk_size=CHUNK) as r:
                for m, p in odd.items():
                    r.add(p, m)
        else:
            new_store(root, fam)
        args = list(case.args)
        if case.yaml is not None:
            (top / f"{name}.yml").write_text(case.yaml)
            args = [a.replace("{yaml}", str(top / f"{name}.yml")) for a in args]
        prepared[name] = (root, args, store_fingerprint(root))
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {name: pool.submit(run_mp, "-C", root, *args) for name, (root, args, _) in prepared.items()}
        procs = {name: f.result() for name, f in futures.items()}
    return {name: Ran(root, procs[name], before, store_fingerprint(root))
            for name, (root, _, before) in prepared.items()}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_merge_requests_are_refused_before_any_write(runs, case):
    ran = runs[case]
    assert_user_error(ran.proc, *BAD[case].fragments)
    assert ran.proc.stdout == ""
    assert ran.after == ran.before


def test_per_model_weight_lists(runs, tmp_path):
    ran = runs["weight-list"]
    cid = ok(ran.proc).strip()
    with Repo.open(ran.root) as repo:
        assert repo.resolve("wl").hex() == cid
        plan = repo.show("wl").to_json()["plan"]
        assert [q["weight"][0] for q in plan["model_params"]] == [0.5, 0.3]
        got = tensors_of(repo, "wl", tmp_path)
        b, e1, e2 = (tensors_of(repo, n, tmp_path) for n in ("base", "e1", "e2"))
    for n, t in got.items():  # task_arithmetic, normalize off: B + 0.5 d1 + 0.3 d2
        want = b[n] + 0.5 * (e1[n] - b[n]) + 0.3 * (e2[n] - b[n])
        torch.testing.assert_close(t, want, rtol=1e-5, atol=1e-7, msg=lambda m, n=n: f"{n}: {m}")


def test_mergekit_yaml_config(runs, tmp_path):
    """Per-model parameters, the base listed among the models, a layer gradient, a {filter,
    value} list with a fallback, global parameters, dtype float32 and out_dtype bfloat16."""
    ran = runs["yaml"]
    cid = ok(ran.proc).strip()
    with Repo.open(ran.root) as repo:
        ids = {n: repo.resolve(n).hex() for n in ("base", "e1", "e2", "cfg")}
        info = repo.show("cfg").to_json()
        out = tensors_of(repo, "cfg", tmp_path)
        b, e1, e2 = (tensors_of(repo, n, tmp_path) for n in ("base", "e1", "e2"))
        rows = repo.ls("cfg")
        repo.checkout("cfg", tmp_path / "cfg-folder")
    assert ids["cfg"] == cid
    assert info["parents"] == [ids["base"], ids["e1"], ids["e2"]]  # the base is not an input
    plan = info["plan"]
    assert plan["models"] == [ids["e1"], ids["e2"]]
    assert plan["compute_dtype"] == "F32" and plan["out_dtype"] == "BF16"
    assert {r.dtype for r in rows} == {"BF16"}
    assert json.loads((tmp_path / "cfg-folder" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    for n, t in out.items():
        assert t.dtype == torch.bfloat16, n
        density1 = 0.3 + 0.4 * layer_t(n)
        w2 = 0.2 if "mlp" in n else 0.4
        # computed in float32, rounded once to bf16: within one bf16 step of the f32 reference
        assert_ties(t, b[n], [e1[n], e2[n]], [0.6, w2], [density1, 0.5], n, lam=0.9, rtol=2 ** -7, atol=1e-30)


# ------------------------------------------------------------------------------ what is read

def _edited(fam: dict[str, Path], folder: Path, edits: dict[str, callable]) -> Path:
    """A copy of the base folder with some tensors changed in place."""
    shutil.copytree(fam["base"], folder)
    tensors = load_file(str(folder / "model.safetensors"))
    for name, edit in edits.items():
        tensors[name] = edit(tensors[name].clone())
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def test_chunks_where_every_expert_is_the_base_are_not_read(tmp_path, fam):
    """Expert A changes rows 0..3 of q_proj (its first chunk) and all of layer 1's up_proj;
    expert B changes the same rows of q_proj only. Everything else is the base in both."""
    g = torch.Generator().manual_seed(9)

    def rows(t):
        t[:4] += torch.randn(t[:4].shape, generator=g)
        return t

    a = _edited(fam, tmp_path / "A", {Q0: rows, UP1: lambda t: t + torch.randn(t.shape, generator=g)})
    b = _edited(fam, tmp_path / "B", {Q0: rows})
    with Repo.init(tmp_path / "repo", chunk_size=CHUNK) as repo:
        repo.add(fam["base"], "base")
        repo.add(a, "A", base="base")
        repo.add(b, "B", base="base")
        base_snap = snapshot(repo, "base")
        with repo.store.read() as r:
            sizes = {n: r.object(t).size for n, t in base_snap.tensors.items()}
            base_q = r.object(base_snap.tensors[Q0])
        full = sum(sizes.values())
        assert sizes[Q0] == 4 * CHUNK and sizes[UP1] == 12 * CHUNK

        req = MergeRequest("task_arithmetic", "base", ["A", "B"], [{"weight": 0.5}, {"weight": 0.5}], {}, "F32", None, 0)
        res = repo.merge(req, "ta")
        st = repo.show("ta").to_json()["stats"]
        assert st == res.realized
        # every changed chunk of each expert is read at least once; nothing else is
        changed_chunks = (1 + 12) + 1  # A: q_proj chunk 0 and up_proj; B: q_proj chunk 0
        assert changed_chunks * CHUNK <= st["expert_bytes"] <= 2 * (1 + 12) * CHUNK, st
        assert st["base_bytes"] <= (1 + 12) * CHUNK, st
        assert st["tensors_copied"] == len(sizes) - 2, st
        assert st["chunks_skipped"] >= 2 * ((full - sizes[Q0] - sizes[UP1]) // CHUNK + 3), st
        merged = snapshot(repo, "ta")
        for n, tid in base_snap.tensors.items():
            if n not in (Q0, UP1):
                assert merged.tensors[n] == tid, n
        with repo.store.read() as r:
            q = r.object(merged.tensors[Q0])
        assert q.chunks[1:] == base_q.chunks[1:]  # the three untouched chunks are the base's own
        out, tb, ta, tbb = (tensors_of(repo, s, tmp_path) for s in ("ta", "base", "A", "B"))
        want_q = tb[Q0] + 0.5 * (ta[Q0] - tb[Q0]) + 0.5 * (tbb[Q0] - tb[Q0])
        torch.testing.assert_close(out[Q0], want_q, rtol=1e-5, atol=1e-7)
        assert torch.equal(out[Q0][4:], tb[Q0][4:])
        torch.testing.assert_close(out[UP1], tb[UP1] + 0.5 * (ta[UP1] - tb[UP1]), rtol=1e-5, atol=1e-7)

        # The same with a method that needs tensor-global passes (top-k thresholds).
        req = MergeRequest("ties", "base", ["A", "B"], [{"weight": 0.5, "density": 0.3}] * 2, {}, "F32", None, 0)
        res = repo.merge(req, "ties")
        assert res.realized["chunks_skipped"] > 0
        assert res.realized["expert_bytes"] < 2 * full
        merged = snapshot(repo, "ties")
        assert {n for n in base_snap.tensors if merged.tensors[n] != base_snap.tensors[n]} == {Q0, UP1}
        out = tensors_of(repo, "ties", tmp_path)
        assert torch.equal(out[Q0][4:], tb[Q0][4:])


# ------------------------------------------------------------------------------ determinism

@pytest.mark.parametrize("method,extra", [("ties", {"density": 0.4}), ("dare_ties", {"density": 0.5}),
                                          ("della", {"density": 0.5, "epsilon": 0.2}),
                                          ("model_stock", None)])
def test_result_does_not_depend_on_threads_or_memory_limit(tmp_path, fam, method, extra):
    root = new_store(tmp_path / "repo", fam)
    p = [{"weight": 0.6, **extra}, {"weight": 0.4, **extra}] if extra is not None else [{}, {}]
    snaps = {}
    with Repo.open(root) as repo:
        for label, kw in {"threads=1": {"threads": 1}, "threads=2": {"threads": 2},
                          "1 MiB": {"threads": 2, "memory_limit": 1 << 20},
                          "64 KiB": {"threads": 2, "memory_limit": 64 << 10}}.items():
            req = MergeRequest(method, "base", ["e1", "e2"], p, {}, "F32", None, 3)
            res = repo.merge(req, f"m-{len(snaps)}", **kw)
            snaps[label] = repo.commit(res.commit.hex()).commit.snapshot.hex()
        assert len(set(snaps.values())) == 1, snaps
        assert snaps["threads=1"] != snapshot_id(repo, "base")


def snapshot_id(repo: Repo, spec: str) -> str:
    return repo.commit(spec).commit.snapshot.hex()


# ------------------------------------------------------------------------------ revert

def test_revert_a_merge(tmp_path, fam):
    root = new_store(tmp_path / "repo", fam)
    with Repo.open(root) as repo:
        req = MergeRequest("task_arithmetic", "base", ["e2"], [{"weight": 1.0}], {}, "F32", None, 0)
        merge_id = repo.merge(req, "work", message="merge e2").commit.hex()
        clean_id = repo.merge(req, "clean", message="merge e2 again").commit.hex()
        base_snap, merged = snapshot(repo, "base"), snapshot(repo, "work")
        changed = sorted(n for n in base_snap.tensors if merged.tensors[n] != base_snap.tensors[n])
        assert changed and EMBED not in changed
        target = changed[0]
        # a later commit on `work` changes again one tensor the merge changed, and one it did not
        folder = tmp_path / "later"
        repo.checkout("work", folder)
        tensors = load_file(str(folder / "model.safetensors"))
        tensors[target] = tensors[target] * 1.5
        tensors[EMBED] = tensors[EMBED] + 1
        save_file(tensors, str(folder / "model.safetensors"))
        later_id = repo.add(folder, "work", message="later").commit.hex()
        later = snapshot(repo, "work")

    # No conflict: `clean` still holds the merge itself, so the revert gives back the base's tensors.
    rid = ok(run_mp("-C", root, "revert", clean_id, "-b", "clean")).strip()
    assert HEX32.fullmatch(rid)
    with Repo.open(root) as repo:
        assert repo.resolve("clean").hex() == rid
        assert repo.commit("clean").commit.parents == (bytes.fromhex(clean_id),)
        assert snapshot(repo, "clean").tensors == base_snap.tensors
        got, want = tensors_of(repo, "clean", tmp_path), tensors_of(repo, "base", tmp_path)
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in got)

    # Conflict: `target` was changed again since; nothing is written.
    before = store_fingerprint(root)
    line = assert_user_error(run_mp("-C", root, "revert", merge_id, "-b", "work"), target, "--force")
    assert EMBED not in line
    assert store_fingerprint(root) == before

    # --force takes the parent's version of every tensor the merge changed, the rest stays.
    rid = ok(run_mp("-C", root, "revert", merge_id, "-b", "work", "--force")).strip()
    with Repo.open(root) as repo:
        assert repo.resolve("work").hex() == rid
        assert repo.commit("work").commit.parents == (bytes.fromhex(later_id),)
        reverted = snapshot(repo, "work")
    for n, tid in reverted.tensors.items():
        assert tid == (base_snap.tensors[n] if n in changed else later.tensors[n]), n
    assert reverted.tensors[EMBED] == later.tensors[EMBED] != base_snap.tensors[EMBED]


# ------------------------------------------------------------------------------ SIGKILL

BATCH = 1 << 20  # chunk bytes per write transaction in the killed runs (64 MiB by default)
MERGE_SMALL_BATCHES = [
    sys.executable, "-c",
    "import sys, mpstore.store.chunks as chunks; chunks.BATCH_BYTES = int(sys.argv.pop(1)); "
    "from mpstore.cli import main; main()",
    str(BATCH),
]


def run_and_kill(cmd: list[str], root: Path, after_txns: int, timeout: float = 60) -> tuple[int, int]:
    """Run `cmd`; SIGKILL it once the store has committed `after_txns` more write transactions
    (LMDB's last transaction id, read live from its lock file by a reader in this process).
    Returns (exit status, transactions seen at the kill, or in all if it finished first)."""
    env = lmdb.open(str(root / ".mp"), readonly=True, lock=True, max_dbs=16, subdir=True)
    try:
        start = env.info()["last_txnid"]
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seen = 0
        try:
            while proc.poll() is None and time.monotonic() - t0 < timeout:
                seen = env.info()["last_txnid"] - start
                if seen >= after_txns:
                    proc.send_signal(signal.SIGKILL)
                    break
                time.sleep(0.001)
        finally:
            if proc.poll() is None and time.monotonic() - t0 >= timeout:
                proc.kill()
            proc.wait(timeout)
        if proc.returncode != -signal.SIGKILL:
            seen = env.info()["last_txnid"] - start
        return proc.returncode, seen
    finally:
        env.close()


def test_killed_merge_leaves_the_store_valid(tmp_path):
    """A ~13 MB float32 family merged with dare_ties (a new seed per attempt, so each attempt
    writes new chunks) in 1 MiB chunk batches, killed at seeded instants: after a few of the
    batches, half-way, and around the final commit."""
    fam = make_family(tmp_path / "fam", hidden=256, layers=4, vocab=1024, dtype="f32", experts=2,
                      kinds=("dense",), seed=6)
    root = tmp_path / "repo"
    with Repo.init(root, chunk_size=16384) as repo:
        ids = {n: repo.add(fam[k], n, message=n).commit for n, k in
               (("base", "base"), ("e1", "expert-1"), ("e2", "expert-2"))}
    originals = {n: tree_bytes(fam[k]) for n, k in (("base", "base"), ("e1", "expert-1"), ("e2", "expert-2"))}
    out_bytes = sum(f.stat().st_size for f in fam["base"].glob("*.safetensors"))
    batches = out_bytes // BATCH + 1  # batch transactions of a whole merge, the final flush included

    def merge_cmd(prefix, seed):
        return [*prefix, "-C", str(root), "-q", "merge", "--method", "dare_ties", "--base", "base", "e1", "e2",
                "--weight", "0.5", "--density", "0.5", "--seed", str(seed), "-b", "m", "-m", f"seed {seed}",
                "--threads", "2"]

    rng = random.Random(20261128)
    attempts = [rng.randint(1, 4), rng.randint(5, batches - 3), batches]
    head = None  # the branch does not exist before the first merge
    kills = 0
    for n, after in enumerate(attempts):
        seed = 100 + n
        rc, seen = run_and_kill(merge_cmd(MERGE_SMALL_BATCHES, seed), root, after)
        kills += rc == -signal.SIGKILL
        with Repo.open(root) as repo:
            assert repo.fsck().problems == []  # every object and chunk hashes to its key, refs resolve
            now = repo.branches().get("m")
            if rc == -signal.SIGKILL and seen <= batches - 2:
                assert now == head, f"killed after {seen} of {batches} batches, yet branch m moved"
            if now != head:  # the kill came after the commit was durable: it must be whole
                c = repo.commit("m").commit
                assert c.parents == (ids["base"], ids["e1"], ids["e2"], *([head] if head else []))
                assert repo.replay("m").identical
                tensors_of(repo, "m", tmp_path)  # every chunk present and hash-checked
                head = now
            out = tmp_path / f"base-{n}"
            repo.checkout("base", out)
            assert tree_bytes(out) == originals["base"]
            shutil.rmtree(out)
    assert kills >= 2, f"only {kills} of {len(attempts)} merges were killed while running"

    # Rerun the merge of the attempt killed half-way: its leftover chunks are reused as they are.
    proc = subprocess.run(merge_cmd(MP, 101), capture_output=True, text=True, timeout=120)
    new = ok(proc).strip()
    with Repo.open(root) as repo:
        assert repo.resolve("m").hex() == new
        assert repo.commit("m").commit.parents == (ids["base"], ids["e1"], ids["e2"], *([head] if head else []))
        assert repo.replay("m").identical
        tensors_of(repo, "m", tmp_path)
        assert repo.fsck().problems == []
        for name, files in originals.items():
            repo.checkout(name, tmp_path / f"final-{name}")
            assert tree_bytes(tmp_path / f"final-{name}") == files


STAGES = """\
name: soup
merge_method: linear
models:
  - {model: e1, parameters: {weight: 0.5}}
  - {model: e2, parameters: {weight: 0.5}}
dtype: float16
---
merge_method: task_arithmetic
base_model: base
models:
  - {model: soup, parameters: {weight: 0.7}}
  - {model: e1, parameters: {weight: 0.3}}
dtype: float32
"""


def test_multi_stage_config_commits_each_stage_and_replays_the_chain(tmp_path, fam):
    """A mergekit-multi config through `mp merge --config`: the first stage commits on its
    `name:` branch, the second uses it by that name and commits on -b; replay replays both.
    The first stage's config.json names float16, the dtype its tensors were written in (a
    `dtype:` without `out_dtype`)."""
    root = new_store(tmp_path / "r", fam)
    cfg = tmp_path / "stages.yml"
    cfg.write_text(STAGES)
    lines = ok(run_mp("-C", root, "merge", "--config", cfg, "-b", "final")).split("\n")
    assert [line.split()[1] for line in lines if line] == ["soup", "final"]
    with Repo.open(root) as repo:
        soup, final = repo.resolve("soup"), repo.resolve("final")
        assert repo.commit("final").commit.parents[1] == soup  # [base, soup, e1]
        assert {r.dtype for r in repo.ls("soup")} == {"F16"}
        repo.checkout("soup", tmp_path / "soup")
    assert json.loads((tmp_path / "soup" / "config.json").read_text())["torch_dtype"] == "float16"
    assert ok(run_mp("-C", root, "replay", "final")).split() == ["identical", soup.hex()[:12], "identical",
                                                                 final.hex()[:12]]
    assert_user_error(run_mp("-C", root, "plan", "--config", cfg), "one-stage config")
    bad = tmp_path / "unnamed.yml"
    bad.write_text(STAGES.replace("name: soup\n", ""))
    assert_user_error(run_mp("-C", root, "merge", "--config", bad, "-b", "x"), "needs `name:`")


@pytest.mark.parametrize("doc, fragments", [
    ({"merge_method": "linear", "models": [{"model": "e1"}], "parameters": {"weight": 1.0}, "normalize": True},
     ["normalize", "under `parameters:`"]),
    ({"merge_method": "linear", "models": [{"model": "e1", "parameters": {"weight": 1.0}}],
      "parameters": {"dtype": "float16"}}, ["dtype is a top-level key"]),
    ({"merge_method": "slerp", "base_model": "base", "models": [{"model": "e1", "parameters": {"weight": 0.5}}],
      "parameters": {"t": 0.5}}, ["slerp has no parameter 'weight'", "MergeKit would ignore it"]),
    ({"merge_method": "linear", "models": [{"model": "e1"}], "chat_template": "chatml"},
     ["built-in templates", "Jinja"]),
    ({"merge_method": "linear", "models": [{"model": "e1"}], "tokenizer_source": "union",
      "tokenizer": {"source": "union"}}, ["not both"]),
    ({"merge_method": "linear", "models": [{"model": "e1"}], "mystery": 1},
     ["unknown key 'mystery'", "MergeKit 0.1.5 ignores unknown top-level keys"]),
])
def test_keys_mergekit_would_ignore_are_refused_with_where_they_belong(runs, tmp_path, doc, fragments):
    """Item 10 of issue 11: refused (safer than MergeKit, which ignores them), in one line that
    says where the key belongs; no hint about `models:` where it makes no sense."""
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(doc))
    proc = run_mp("-C", runs["yaml"].root, "merge", "--config", path, "-b", "never")
    message = assert_user_error(proc, *fragments)
    assert "use `models:`" not in message


def test_replay_says_which_engine_recorded_an_older_plan(tmp_path, fam, monkeypatch):
    """A plan keeps the engine version that made it; replay under another engine says so (its
    result may legitimately differ), and says nothing for plans of this engine."""
    from mpstore.merge import executor

    root = new_store(tmp_path / "r", fam)
    with Repo.open(root) as repo:
        req = MergeRequest("task_arithmetic", "base", ["e1", "e2"], global_params={"weight": 0.5})
        monkeypatch.setattr(executor, "ENGINE_VERSION", executor.ENGINE_VERSION - 1)
        older = repo.merge(req, "older")
        monkeypatch.undo()
        current = repo.merge(req, "current")
        assert older.plan.engine == executor.ENGINE_VERSION - 1 and current.plan.engine == executor.ENGINE_VERSION
        assert repo.replay("older").engine == executor.ENGINE_VERSION - 1
        assert repo.replay("current").engine is None
