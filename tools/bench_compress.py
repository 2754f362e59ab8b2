#!/usr/bin/env python3
"""Benchmark chunk compression (issue 14) end to end, with the real `mp` CLI, in one run.

Two repositories side by side, `mp init --compress none` and `mp init --compress delta`, each
holding a generated family (tools/make_family.py: base + experts cycling dense/partial/lora,
every expert added with `--base base`), plus a third, `--compress planes`, holding the base alone.
What it measures:
  * space, for the bf16 family, (--rel-delta) the same family with every delta of one relative
    size (1e-3 × the tensor's RMS, as in real fine-tunes; make_family draws bf16 deltas from
    [7.8e-3, 1e-1]) and (--f32-params) an fp32 family: each model's stored chunk
    bytes (the store's `mp status --json` "space" before and after its add: the chunks it brought,
    as stored) over its folder's bytes; the whole family's data file (allocated blocks of .mp, as
    `du` counts them) and stored chunk bytes over the raw folders' allocated blocks; the base alone
    in the PLANES store; beside them, in the same run, tools/bench_codecs.py's baselines on the same
    files (each file zstd-compressed whole at the codecs' parameters; the ZipLLM recipe: whole-file
    XOR with the base, byte planes, zstd; ZipNN when --zipnn names a python that has it);
  * decode (and encode) throughput per core: tools/bench_codecs.py's measurement (one thread,
    48 whole chunks, median of --repeat), run here on the same families;
  * time, bf16 family only, every `mp` command against its baseline, alternating the order each
    round (tools/bench_store.py's compare: an untimed `sync` before each timed command, page
    cache not dropped, every source read once before), medians of --repeat rounds:
      - an exact ties K=8 merge (tools/bench_merge.py's row: density 0.5, weight 1/K, float32
        compute, bfloat16 out) on a fresh copy of each store (so each run writes its output),
        compressed store vs raw store; the merged snapshot ids must be equal;
      - `mp checkout` of a dense expert and of the merge's output from each store, and `cp -r` of
        the same folder;
      - `mp add --base base` of a dense expert into a copy of each store holding the base alone,
        vs `cp -r` of the folder and vs `cp -r` + `sync` (bench_store's "add --base" row).
The load average is sampled at the start, between phases and at the end: the machine is shared.

Usage (from the repository root, with the venv's python):
  python tools/bench_compress.py [--work /tmp/bench-compress] [--params 250M] [--experts 8]
      [--rel-delta 1e-3 | none] [--f32-params 120M | none] [--repeat 3] [--zipnn PYTHON]
      [--no-baselines] [--no-timings] [--out FILE] [--keep]
  ZipNN 0.5.4 imports torch: a scratch venv whose .pth names this venv's site-packages serves
  (python3 -m venv Z; echo $PWD/.venv/lib/python3.11/site-packages > Z/lib/python3.11/site-packages/
  main.pth; Z/bin/pip install --no-deps zipnn), then --zipnn Z/bin/python.
Targets (issue 14): dense bf16 expert with --base ≤ 0.30 of its bytes; family on disk ≤ 0.25 of
the folders; bf16 base alone, standalone codec ≤ 0.72; decode ≥ 1 GB/s per core; ties K=8 merge
≤ 1.1× the raw store's; checkout ≤ 1.3× the raw store's; add --base ≤ 2.5× `cp`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_codecs as bc  # noqa: E402  (same folder: the family, the baselines, codec throughput)
import bench_store as bs  # noqa: E402  (same folder: run(), compare(), warm(), formatting)
from bench_merge import config as merge_config  # noqa: E402
from bench_store import MP, Timing, b, log, rm, table  # noqa: E402

POLICIES = ("none", "delta")  # the two stores holding the whole family
DENSITY = 0.5  # ties, as tools/bench_merge.py
TARGETS = {  # issue 14: (target, the row's key)
    "dense": 0.30, "family": 0.25, "base": 0.72, "decode": 1000.0, "merge": 1.1, "checkout": 1.3, "add": 2.5,
}


def allocated(path: Path) -> int:
    """Bytes of the blocks allocated to the files under `path`, as `du` counts them."""
    if path.is_file():
        return path.stat().st_blocks * 512
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def loadavg() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def mp_json(repo: Path, *args: str) -> dict:
    return json.loads(bs.mp(repo, *args, "--json", sample=False).stdout)


def copy_repo(src: Path, dst: Path) -> None:
    rm(dst)
    subprocess.run(["cp", "-r", "--sparse=always", str(src), str(dst)], check=True)


def cp_variant(src: Path, dst: Path, durable: bool) -> tuple:
    """A bs.compare variant: `cp -r SRC DST` (then `sync` if durable) into a fresh DST."""

    def prep(i: int) -> list[str]:
        rm(dst)
        return bs.cp_cmd(src, dst, durable)

    return prep, lambda i: rm(dst), False


# ------------------------------------------------------------------------------ space


@dataclass
class Family:
    """One dtype's family in the stores: what each model's add cost, and the baselines."""

    dtype: str
    params: str
    label: str  # how the report names it
    models: list[Path]
    kinds: list[str]
    raw: list[int]  # each folder's bytes
    rel: float | None = None  # every delta's relative size (fixed_delta_family), or make_family's
    stored: dict[str, list[int]] = field(default_factory=dict)  # policy -> stored chunk bytes each add brought
    seconds: dict[str, list[float]] = field(default_factory=dict)  # policy -> each add's wall time
    disk: dict[str, int] = field(default_factory=dict)  # policy -> allocated bytes of .mp
    chunks: dict[str, int] = field(default_factory=dict)  # policy -> stored chunk bytes of the store
    codecs: dict[str, dict] = field(default_factory=dict)  # policy -> status "space" codecs
    folders_disk: int = 0  # allocated bytes of the raw folders
    base_planes: tuple[int, int] = (0, 0)  # stored chunk bytes, allocated .mp of the PLANES store
    zstd: list[int] = field(default_factory=list)  # bench_codecs baselines, bytes per model
    zipllm: list[int] = field(default_factory=list)
    zipnn: list[tuple[int, int, int | None]] | str = "not run"
    throughput: list[tuple[str, float, float, float, float]] = field(default_factory=list)

    def ratio(self, policy: str, i: int) -> float:
        return self.stored[policy][i] / self.raw[i]

    def dense(self, values: list[int]) -> float:
        """Sum over the dense experts of `values` over their raw bytes."""
        idx = [i for i, k in enumerate(self.kinds) if k == "dense"]
        return sum(values[i] for i in idx) / sum(self.raw[i] for i in idx)

    def zipnn_size(self, i: int, delta: bool) -> int | None:
        """ZipNN's bytes for model i (headers and other files counted raw), or None."""
        if isinstance(self.zipnn, str):
            return None
        n, alone, d = self.zipnn[i]
        size = d if delta and d is not None else alone
        return size + self.raw[i] - n


# make_family with every changed tensor's delta of one relative size (its RMS over the base
# tensor's), instead of sizes drawn log-uniformly from [eps(dtype), 1e-1]: the standard family's
# bf16 deltas are mostly 1e-2..1e-1 of the weights, real fine-tunes' nearer 1e-3
FIXED_DELTA = """
import sys
sys.path.insert(0, sys.argv[1])
import make_family
rel = float(sys.argv[2])
make_family._relative_scale = lambda g, dtype: rel
make_family.main(sys.argv[3:])
"""


def fixed_delta_family(work: Path, params: str, experts: int, dtype: str, rel: float) -> list[Path]:
    """tools/make_family.py's family (same base, same kinds and seed) with every delta `rel` × RMS."""
    folder = work / f"family-{params}-x{experts}-{dtype}-rel{rel:g}"
    rm(folder)
    log(f"generating family {folder}")
    subprocess.run([sys.executable, "-c", FIXED_DELTA, str(bc.ROOT / "tools"), str(rel), str(folder), "--params",
                    params, "--experts", str(experts), "--dtype", dtype, "--kinds", "dense,partial,lora",
                    "--seed", "0"], check=True, stdout=subprocess.DEVNULL)
    return [folder / n for n in ("base", *(f"expert-{i}" for i in range(1, experts + 1)))]


def build(work: Path, dtype: str, params: str, experts: int, args: argparse.Namespace,
          rel: float | None = None) -> tuple[Family, dict]:
    """Add the family (deltas of relative size `rel`, or make_family's) to a none and a delta
    store (and its base to a planes store), measure space and the baselines; return it and the
    repositories (policy -> path; 'base-POLICY': a copy of that store taken when it held the
    base alone, for the standard bf16 family)."""
    if rel is None:
        models = bc.family(work, params, experts, dtype)
        label = dtype if dtype == "bf16" else f"{dtype} ({params})"
    else:
        models = fixed_delta_family(work, params, experts, dtype, rel)
        label = f"{dtype}, deltas {rel:g} × RMS"
    fam = Family(dtype, params, label, models, [bc.kind(m) for m in models], [bs.folder_bytes(m) for m in models],
                 rel)
    fam.folders_disk = sum(allocated(m) for m in models)
    log(f"{label} family {params}: {b(sum(fam.raw))} in {len(models)} folders; warming the page cache")
    bs.warm(models)
    root = work / f"repos-{dtype}"
    rm(root)
    root.mkdir()
    repos = {p: root / p for p in ((*POLICIES, "planes") if rel is None else POLICIES)}
    for policy, repo in repos.items():
        bs.run([MP, "-C", str(repo), "--quiet", "init", "--compress", policy])
    for policy in [p for p in ("planes", *POLICIES) if p in repos]:
        repo = repos[policy]
        fam.stored[policy], fam.seconds[policy] = [], []
        for i, m in enumerate(models if policy != "planes" else models[:1]):
            before = mp_json(repo, "status")["space"]["stored_bytes"]
            os.sync()
            r = bs.mp(repo, "add", str(m), "--name", m.name, *(["--base", "base"] if i else []), sample=False)
            after = mp_json(repo, "status")["space"]["stored_bytes"]
            fam.stored[policy].append(after - before)
            fam.seconds[policy].append(r.seconds)
            log(f"  {policy}: add {m.name} ({fam.kinds[i]}) {r.seconds:.2f} s, stored {fam.ratio(policy, i):.3f}")
            if i == 0 and policy in POLICIES and dtype == "bf16" and rel is None:
                repos[f"base-{policy}"] = root / f"base-{policy}"
                copy_repo(repo, repos[f"base-{policy}"])
        status = mp_json(repo, "status")
        fam.chunks[policy] = status["space"]["stored_bytes"]
        fam.codecs[policy] = status["space"]["codecs"]
        fam.disk[policy] = allocated(repo / ".mp")
    if "planes" in repos:  # the base alone (the same base in every bf16 family)
        fam.base_planes = (fam.stored["planes"][0], allocated(repos["planes"] / ".mp"))
        if not args.keep:
            rm(repos.pop("planes"))
    log(f"  delta store {fam.chunks['delta'] / sum(fam.raw):.3f} of the folders in chunks; load {loadavg()}")
    if args.no_baselines:
        fam.zipnn = "skipped (--no-baselines)"
    else:
        log(f"  baselines (tools/bench_codecs.py): zstd per file, ZipLLM recipe, ZipNN; throughput; load {loadavg()}")
        loaded = [bc.load(m) for m in models]
        try:
            fast = bc.zstandard.ZstdCompressor(compression_params=bc.codecs.ZSTD_PARAMS)
            fam.zstd = bc.zstd_files(loaded, fast)
            fam.zipllm = bc.zipllm(loaded, fast)
            fam.zipnn = bc.zipnn(args.zipnn, loaded, dtype)
            fam.throughput = bc.throughput(loaded, 1 << 20, args.repeat_codecs)
        finally:
            for model in loaded:
                model.close()
    return fam, repos


# ------------------------------------------------------------------------------ time


@dataclass
class Timings:
    merge: dict[str, list[float]] = field(default_factory=dict)
    snapshots: dict[str, set[str]] = field(default_factory=dict)
    checkout: dict[str, dict[str, Timing]] = field(default_factory=dict)  # what -> variant -> timing
    add: dict[str, Timing] = field(default_factory=dict)
    merge_stats: dict[str, dict] = field(default_factory=dict)


def timings(work: Path, fam: Family, repos: dict, repeat: int) -> Timings:
    models = fam.models
    experts = models[1:]
    dense = next(m for m, k in zip(models, fam.kinds) if k == "dense")
    tmp = work / "tmp"
    rm(tmp)
    tmp.mkdir()
    out = Timings()
    for policy in POLICIES:
        bs.warm([repos[policy] / ".mp"])

    # merge: a fresh copy of each store per run, alternating which store goes first ----------
    cfg = tmp / "ties.yml"
    cfg.write_text(merge_config("ties", models[0].name, [e.name for e in experts], DENSITY))
    log(f"ties K={len(experts)} merge, compressed vs raw store, {repeat} rounds; load {loadavg()}")
    merged = {p: tmp / f"merged-{p}" for p in POLICIES}
    for i in range(repeat):
        for policy in POLICIES[i % 2:] + POLICIES[: i % 2]:
            repo = merged[policy]
            copy_repo(repos[policy], repo)
            os.sync()
            r = bs.run([MP, "-C", str(repo), "--quiet", "merge", "--config", str(cfg), "-b", "merged"])
            info = mp_json(repo, "show", "merged")
            out.merge.setdefault(policy, []).append(r.seconds)
            out.snapshots.setdefault(policy, set()).add(info["snapshot"])
            out.merge_stats[policy] = info.get("stats") or {}
            log(f"  {policy} #{i + 1}: {r.seconds:.2f} s, snapshot {info['snapshot'][:12]}")
    for policy in POLICIES:  # the last round's copies stay, for the checkouts of the merge
        bs.warm([merged[policy] / ".mp"])

    # checkout of a dense expert and of the merge, from each store, vs cp -r ------------------
    reference = tmp / "merged-reference"
    bs.run([MP, "-C", str(merged["none"]), "--quiet", "checkout", "merged", "-o", str(reference)])
    for what, ref, repo_of, source in (
        (f"{dense.name} (dense)", dense.name, repos, dense),
        ("the ties merge", "merged", merged, reference),
    ):
        log(f"checkout of {what}; load {loadavg()}")
        variants: dict[str, tuple] = {}
        for policy in POLICIES:
            dst = tmp / f"co-{policy}"

            def prep(i: int, dst: Path = dst, repo: Path = repo_of[policy], ref: str = ref) -> list[str]:
                rm(dst)
                return [MP, "-C", str(repo), "--quiet", "checkout", ref, "-o", str(dst)]

            def check(i: int, dst: Path = dst, source: Path = source) -> None:
                if i == 0:
                    diff = subprocess.run(["diff", "-rq", str(source), str(dst)], capture_output=True, text=True)
                    if diff.returncode:
                        raise SystemExit(f"checkout differs from {source}:\n{diff.stdout}{diff.stderr}")
                rm(dst)

            variants[policy] = (prep, check, False)
        variants["cp -r"] = cp_variant(source, tmp / "cp", False)
        out.checkout[what] = bs.compare(variants, repeat)
    rm(reference)
    for policy in POLICIES:
        rm(merged[policy])

    # add --base of a dense expert into a store holding the base, vs cp -r (and + sync) -------
    log(f"add --base of {dense.name}; load {loadavg()}")
    variants = {}
    for policy in POLICIES:
        repo = tmp / f"add-{policy}"

        def prep_add(i: int, repo: Path = repo, policy: str = policy) -> list[str]:
            copy_repo(repos[f"base-{policy}"], repo)
            return [MP, "-C", str(repo), "--quiet", "add", str(dense), "--name", dense.name, "--base", "base"]

        variants[policy] = (prep_add, lambda i, repo=repo: rm(repo), False)
    variants["cp -r"] = cp_variant(dense, tmp / "cp", False)
    variants["cp -r + sync"] = cp_variant(dense, tmp / "cp-sync", True)
    out.add = bs.compare(variants, repeat)
    rm(tmp)
    return out


# ------------------------------------------------------------------------------ report


def met(value: float, key: str) -> str:
    target = TARGETS[key]
    ok = value >= target if key == "decode" else value <= target
    return "yes" if ok else "**no**"


def r3(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def space_rows(fam: Family) -> list[list[str]]:
    """The summary rows of one family's space: dense expert, family, base alone."""
    label = fam.label
    i = next(j for j, k in enumerate(fam.kinds) if k == "dense")
    rows = []
    zn = fam.zipnn_size(i, delta=True)
    base_line = "" if not fam.zstd else (f"zstd file {fam.zstd[i] / fam.raw[i]:.3f}, ZipLLM "
                                          f"{fam.zipllm[i] / fam.raw[i]:.3f}"
                                          + (f", ZipNN delta {zn / fam.raw[i]:.3f}" if zn is not None else ""))
    dense_idx = [j for j, k in enumerate(fam.kinds) if k == "dense"]
    rows.append([f"{label}: stored / raw bytes of a dense fine-tune added with --base ({fam.models[i].name}; "
                 f"all {len(dense_idx)} dense: {fam.dense(fam.stored['delta']):.3f})",
                 f"**{fam.ratio('delta', i):.3f}**", f"{fam.ratio('none', i):.3f}", base_line,
                 "≤ 0.30" if fam.dtype == "bf16" else "report",
                 met(fam.ratio("delta", i), "dense") if fam.dtype == "bf16" else "-"])
    total = sum(fam.raw)
    zn_all = [fam.zipnn_size(j, delta=j > 0) for j in range(len(fam.raw))]
    base_line = "" if not fam.zstd else (f"zstd file {sum(fam.zstd) / total:.3f}, ZipLLM {sum(fam.zipllm) / total:.3f}"
                                         + (f", ZipNN {sum(z for z in zn_all if z is not None) / total:.3f}"
                                            if all(z is not None for z in zn_all) else ""))
    rows.append([f"{label}: whole family, .mp on disk (du) / raw folders (du) (stored chunk bytes / raw: "
                 f"{fam.chunks['delta'] / total:.3f})",
                 f"**{fam.disk['delta'] / fam.folders_disk:.3f}**", f"{fam.disk['none'] / fam.folders_disk:.3f}",
                 base_line, "≤ 0.25" if fam.dtype == "bf16" else "report",
                 met(fam.disk["delta"] / fam.folders_disk, "family") if fam.dtype == "bf16" else "-"])
    if fam.rel is not None:
        return rows
    zn = fam.zipnn_size(0, delta=False)
    base_line = "" if not fam.zstd else (f"zstd file {fam.zstd[0] / fam.raw[0]:.3f}, ZipLLM planes "
                                          f"{fam.zipllm[0] / fam.raw[0]:.3f}"
                                          + (f", ZipNN {zn / fam.raw[0]:.3f}" if zn is not None else ""))
    stored, disk = fam.base_planes
    rows.append([f"{label}: base alone, `--compress planes`, stored chunk bytes / raw (.mp on disk / raw: "
                 f"{disk / allocated(fam.models[0]):.3f})",
                 f"**{stored / fam.raw[0]:.3f}**", f"{fam.ratio('none', 0):.3f}", base_line,
                 "≤ 0.72" if fam.dtype == "bf16" else "report",
                 met(stored / fam.raw[0], "base") if fam.dtype == "bf16" else "-"])
    return rows


def report(args: argparse.Namespace, fams: list[Family], t: Timings | None, loads: list[tuple[str, str]],
           wall: float) -> str:
    rows = []
    for fam in fams:
        rows += space_rows(fam)
    for fam in fams:
        for what, enc, dec, hsh, _ in fam.throughput:
            if what.startswith("PLANES") or what.startswith("XOR"):
                codec = what.split(" ")[0]
                rows.append([f"{fam.label}: decode throughput per core, {codec} (encode {enc:.0f} MB/s)",
                             f"**{dec:.0f} MB/s**", "-", f"xxh3-128 {hsh:.0f} MB/s", "≥ 1000 MB/s",
                             met(dec, "decode")])
    if t is not None:
        n = min(len(v) for v in t.merge.values())
        med = {p: statistics.median(v) for p, v in t.merge.items()}
        same = len(t.snapshots["none"] | t.snapshots["delta"]) == 1
        rows.append([f"ties K={len(fams[0].models) - 1} merge wall time, compressed store / raw store "
                     f"(median of {n}; snapshots {'equal' if same else '**DIFFER**'})",
                     f"**{med['delta'] / med['none']:.3f}**", f"{med['delta']:.2f} s vs {med['none']:.2f} s",
                     "", "≤ 1.1×", met(med["delta"] / med["none"], "merge")])
        for what, tm in t.checkout.items():
            ratio = tm["delta"].median / tm["none"].median
            rows.append([f"checkout of {what}, compressed store / raw store", f"**{ratio:.3f}**",
                         f"{tm['delta'].median:.3f} s vs {tm['none'].median:.3f} s",
                         f"cp -r {tm['cp -r'].median:.3f} s: delta {tm['delta'].median / tm['cp -r'].median:.2f}×, "
                         f"none {tm['none'].median / tm['cp -r'].median:.2f}×", "≤ 1.3×", met(ratio, "checkout")])
        a = t.add
        rows.append(["`mp add --base` of a dense expert, compressed store / `cp -r`",
                     f"**{a['delta'].median / a['cp -r'].median:.2f}**",
                     f"{a['delta'].median:.3f} s vs cp -r {a['cp -r'].median:.3f} s",
                     f"raw store {a['none'].median / a['cp -r'].median:.2f}× cp; vs cp -r + sync "
                     f"({a['cp -r + sync'].median:.3f} s): delta {a['delta'].median / a['cp -r + sync'].median:.2f}×,"
                     f" none {a['none'].median / a['cp -r + sync'].median:.2f}×; delta / none "
                     f"{a['delta'].median / a['none'].median:.2f}×", "≤ 2.5×",
                     met(a["delta"].median / a["cp -r"].median, "add")])
    repro = shlex.join([os.path.relpath(sys.executable), os.path.relpath(__file__), *sys.argv[1:]])
    md = [
        f"Reproduce: `cd {shlex.quote(os.getcwd())} && {repro}` ({wall / 60:.1f} min; load average "
        + ", ".join(f"{k} {v}" for k, v in loads) + ")\n",
        table(["what", "compressed (delta store)", "raw store / detail", "baselines (same files, same run)",
               "target", "met"], rows) + "\n",
    ]
    for fam in fams:
        md.append(f"Per model, {fam.label}" + ("" if fam.params in fam.label else f" ({fam.params})") + ": stored chunk bytes each `mp add` brought / the "
                  "folder's bytes, and each add's wall time (one run)\n")
        prow = []
        for i, m in enumerate(fam.models):
            zn = fam.zipnn_size(i, delta=i > 0)
            prow.append([m.name, fam.kinds[i], b(fam.raw[i]), f"**{fam.ratio('delta', i):.3f}**",
                         f"{fam.ratio('none', i):.3f}",
                         r3(fam.zstd[i] / fam.raw[i] if fam.zstd else None),
                         r3(fam.zipllm[i] / fam.raw[i] if fam.zipllm else None),
                         r3(zn / fam.raw[i] if zn is not None else None),
                         f"{fam.seconds['delta'][i]:.2f}", f"{fam.seconds['none'][i]:.2f}"])
        md.append(table(["model", "kind", "size", "delta store", "raw store", "zstd file", "ZipLLM recipe",
                         "ZipNN" + (" (delta vs base)" if len(fam.models) > 1 else ""), "add delta (s)",
                         "add raw (s)"], prow) + "\n")
        codecs = "; ".join(f"{c} {v['chunks']} chunks, {b(v['logical_bytes'])} → {b(v['stored_bytes'])}"
                           for c, v in fam.codecs["delta"].items())
        md.append(f"Delta store's chunks by codec: {codecs}. Data files: delta {b(fam.disk['delta'])}, raw "
                  f"{b(fam.disk['none'])}; folders {b(fam.folders_disk)}."
                  + (f" ZipNN: {fam.zipnn}." if isinstance(fam.zipnn, str) else "") + "\n")
    if t is not None:
        runs = "; ".join(f"{p}: " + ", ".join(f"{s:.2f}" for s in v) for p, v in t.merge.items())
        md.append(f"Merge runs (s): {runs}. Executor stats (delta store, last run): "
                  + json.dumps({k: v for k, v in t.merge_stats.get("delta", {}).items()
                                if isinstance(v, (int, float))}) + "\n")
        add = ", ".join(f"{k} {v.median:.3f} s (min {v.min:.3f})" for k, v in t.add.items())
        md.append(f"add --base medians: {add}.\n")
    return "\n".join(md)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-compress"), help="families, repositories")
    ap.add_argument("--params", default="250M", help="the bf16 family's size (make_family --params)")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--f32-params", default="120M", help="the fp32 family's size, or 'none' to skip it")
    ap.add_argument("--rel-delta", default="1e-3",
                    help="also a bf16 family whose every delta is this × the tensor's RMS (space only), or 'none'")
    ap.add_argument("--repeat", type=int, default=3, help="rounds of each timed comparison (medians)")
    ap.add_argument("--repeat-codecs", type=int, default=5, help="runs of bench_codecs' throughput loop")
    ap.add_argument("--zipnn", default="", help="a python with zipnn installed (else ZipNN is skipped)")
    ap.add_argument("--no-baselines", action="store_true", help="skip bench_codecs' baselines and throughput")
    ap.add_argument("--no-timings", action="store_true", help="space only")
    ap.add_argument("--out", type=Path, help="also write the markdown here")
    ap.add_argument("--keep", action="store_true", help="keep --work (families and repositories) at exit")
    args = ap.parse_args()
    if not Path(MP).exists():
        raise SystemExit(f"{MP} not found: run with the venv's python (pip install -e . first)")
    bc._keep_dirty_pages_in_the_heap()  # as bench_codecs' throughput expects (store/env.py)
    work = args.work.absolute()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    loads = [("start", loadavg())]
    try:
        fams, t = [], None
        bf16, repos = build(work, "bf16", args.params, args.experts, args)
        fams.append(bf16)
        loads.append(("after the bf16 stores", loadavg()))
        if not args.no_timings:
            t = timings(work, bf16, repos, args.repeat)
            loads.append(("after the timings", loadavg()))
        for repo in repos.values():
            rm(repo)
        if args.rel_delta != "none":
            fine, repos = build(work, "bf16", args.params, args.experts, args, float(args.rel_delta))
            fams.append(fine)
            for repo in repos.values():
                rm(repo)
            rm(fine.models[0].parent)
        if args.f32_params != "none":
            f32, repos = build(work, "f32", args.f32_params, args.experts, args)
            fams.append(f32)
            for repo in repos.values():
                rm(repo)
        loads.append(("end", loadavg()))
        md = report(args, fams, t, loads, time.perf_counter() - t0) + "\n" + bs.machine_facts(work)
    finally:
        if not args.keep:
            rm(work)
    print(md)
    if args.out:
        args.out.write_text(md)
        log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
