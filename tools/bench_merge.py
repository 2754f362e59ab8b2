#!/usr/bin/env python3
"""Benchmark `mp merge` against MergeKit (mergekit-yaml) on a generated model family.

What it measures:
  * for each method (ties with density 0.5, task_arithmetic; weight 1/K for every expert;
    float32 compute, bfloat16 out) with K = --experts experts: the wall time and peak RSS of
    `mp -C REPO --quiet merge --config cfg.yml -b NAME` with the models already added (median of
    --repeat runs, each on a fresh copy of the same repository, so every run writes its output
    chunks) vs one `mergekit-yaml cfg.yml OUT --no-copy-tokenizer --no-write-model-card --quiet`
    (paths as models, HF_HUB_OFFLINE=1);
  * mp end to end: `mp init` + `mp add` of the base and the K experts into a fresh repository
    (each add timed once) plus the merge, vs MergeKit;
  * that both tools computed the same model: `mp checkout` of the merge vs MergeKit's output,
    the fraction of bitwise-equal bf16 elements over all tensors (and the largest difference);
  * wall time vs K (K = 2, 4, 6, 8 by default; --full-sweep for every K from 2) for both tools,
    as a markdown table and a PNG plot (--plot).

  * the floor of each merge (tools/merge_floor.py: reading every input chunk once from the page
    cache plus one fused pass of the method's arithmetic, on all cores): mp / floor is the gap left.

Targets (issue 12): mp merge ≤ 1/10 of MergeKit's wall time for ties, ≤ 1/5 for task_arithmetic,
≤ 3× the floor; mp's peak RSS ≤ 1 GiB.

Timing conventions are tools/bench_store.py's (whose helpers this imports): wall clock from
spawn to reaping, peak RSS as GNU time's %M (the command's ru_maxrss: for mp it counts the mapped
store pages it touched, RssFile), RssAnon/RssFile sampled from /proc/PID/status. Nothing is
dropped from the page cache: the family and the repository are read (or written) before timing
so both tools read warm files; an untimed `sync` precedes every timed command.

Usage (from the repository root, with the venv's python):
  python tools/bench_merge.py [--work bench/store] [--out results.md] [--plot results.png]
      [--repeat 3] [--quick] [--full-sweep | --ks 2,4,6,8] [--sweep-methods ties,task_arithmetic]
      [--mergekit PATH] [--keep]
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
import bench_store as bs  # noqa: E402  (same folder: run(), family(), machine facts, formatting)
from bench_store import MIB, MP, ROOT, Run, b, log, rm, table, warm  # noqa: E402

GIB = 1 << 30
RSS_TARGET = 1 * GIB
TARGETS = {"ties": 1 / 10, "task_arithmetic": 1 / 5}  # mp merge wall time / MergeKit's (issue 12)
TARGET_TEXT = {"ties": "≤ 1/10", "task_arithmetic": "≤ 1/5"}
FLOOR_TARGET = 3.0  # mp merge wall time / the floor (tools/merge_floor.py)
METHODS = ("ties", "task_arithmetic")
DENSITY = 0.5


# ------------------------------------------------------------------------------ configs


def config(method: str, base: str, experts: list[str], density: float) -> str:
    """A MergeKit YAML document: `base` and `experts` are paths (MergeKit) or refs (mp)."""
    k = len(experts)
    lines = [f"merge_method: {method}", f"base_model: {json.dumps(base)}", "models:"]
    for e in experts:
        params = {"weight": round(1 / k, 6)}
        if method == "ties":
            params["density"] = density
        lines += [f"  - model: {json.dumps(e)}", f"    parameters: {json.dumps(params)}"]
    lines += ["dtype: float32", "out_dtype: bfloat16", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ comparing outputs


def safetensors_map(folder: Path) -> dict[str, Path]:
    from safetensors import safe_open

    out: dict[str, Path] = {}
    for p in sorted(folder.glob("*.safetensors")):
        with safe_open(str(p), framework="pt") as f:
            for name in f.keys():
                out[name] = p
    return out


def ulp_order(t):
    """16-bit floats as integers in the order of their values: adjacent floats differ by 1."""
    import torch

    bits = t.view(torch.int16).to(torch.int32)
    return bits.where(bits >= 0, -(bits & 0x7FFF))


def agreement(mp_dir: Path, mk_dir: Path) -> dict:
    """Element-wise comparison of two checkpoints, tensor by tensor (one pair in memory at a time)."""
    import torch
    from safetensors import safe_open

    a, c = safetensors_map(mp_dir), safetensors_map(mk_dir)
    common = sorted(a.keys() & c.keys())
    res = {"tensors": len(common), "only_mp": sorted(a.keys() - c.keys()), "only_mk": sorted(c.keys() - a.keys()),
           "elements": 0, "equal": 0, "within_ulp": 0, "tensors_equal": 0, "max_abs": 0.0, "dtypes": set(),
           "mismatched_shape": []}
    handles: dict[Path, object] = {}

    def get(p: Path, name: str) -> torch.Tensor:
        if p not in handles:
            handles[p] = safe_open(str(p), framework="pt").__enter__()
        return handles[p].get_tensor(name)

    for name in common:
        x, y = get(a[name], name), get(c[name], name)
        res["dtypes"].add(f"{x.dtype}/{y.dtype}".replace("torch.", ""))
        if x.shape != y.shape:
            res["mismatched_shape"].append(name)
            continue
        n = x.numel()
        eq = int((x == y).sum()) if x.dtype == y.dtype else int((x.float() == y.float()).sum())
        res["elements"] += n
        res["equal"] += eq
        res["tensors_equal"] += eq == n
        if eq != n:
            res["max_abs"] = max(res["max_abs"], float((x.float() - y.float()).abs().max()))
        if res["within_ulp"] is not None and x.dtype == y.dtype and x.dtype in (torch.bfloat16, torch.float16):
            res["within_ulp"] += int((ulp_order(x) - ulp_order(y)).abs().le(1).sum())
        else:
            res["within_ulp"] = None  # only counted when every tensor is a 16-bit float
    for h in handles.values():
        h.__exit__(None, None, None)
    res["dtypes"] = sorted(res["dtypes"])
    return res


def agreement_text(method: str, r: dict) -> str:
    frac = r["equal"] / r["elements"] if r["elements"] else 0.0
    text = (f"- {method}: {r['equal']:,} of {r['elements']:,} elements bitwise equal ({100 * frac:.4f} %), "
            f"{r['tensors_equal']} of {r['tensors']} tensors identical; "
            + (f"{100 * r['within_ulp'] / r['elements']:.4f} % within 1 ulp; " if r["within_ulp"] is not None else "")
            + f"largest difference {r['max_abs']:.3g}; dtypes mp/MergeKit {', '.join(r['dtypes'])}")
    for key, label in (("only_mp", "only in mp's output"), ("only_mk", "only in MergeKit's output"),
                       ("mismatched_shape", "shape differs")):
        if r[key]:
            text += f"; {label}: {', '.join(r[key][:5])}" + (" ..." if len(r[key]) > 5 else "")
    return text


# ------------------------------------------------------------------------------ the benchmark


@dataclass
class Case:
    method: str
    k: int
    mp: list[Run] = field(default_factory=list)
    mk: list[Run] = field(default_factory=list)
    stats: dict = field(default_factory=dict)  # `mp show --json`'s realized stats of the merge
    floor: dict = field(default_factory=dict)  # tools/merge_floor.py's measurement of the same merge

    @property
    def mp_s(self) -> float:
        return statistics.median(r.seconds for r in self.mp)

    @property
    def mk_s(self) -> float:
        return statistics.median(r.seconds for r in self.mk)


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path, models: list[Path], mergekit: str):
        self.args, self.work, self.models, self.mergekit = args, work, models, mergekit
        self.tmp = work / "tmp-merge"
        self.added = self.tmp / "added"  # every model added once; copied for every mp merge
        self.add_runs: list[tuple[str, Run]] = []
        self.failed: list[str] = []

    # pieces -----------------------------------------------------------------------------
    def add_all(self) -> None:
        """`mp init` + `mp add` of the base and every expert, each timed once (end to end)."""
        rm(self.added)
        os.sync()
        self.add_runs.append(("init", bs.run([MP, "-C", str(self.added), "--quiet", "init"])))
        for m in self.models:
            extra = [] if m == self.models[0] else ["--base", self.models[0].name]
            os.sync()
            r = bs.mp(self.added, "add", str(m), "--name", m.name, *extra)
            self.add_runs.append((m.name, r))
            log(f"  add {m.name}: {r.seconds:.2f} s, maxrss {r.maxrss / MIB:.0f} MiB")

    def adds_seconds(self, k: int) -> float:
        """init + base + the first k experts."""
        return sum(r.seconds for _, r in self.add_runs[: 2 + k])

    def fresh_repo(self, label: str) -> Path:
        repo = self.tmp / f"repo-{label}"
        rm(repo)
        subprocess.run(["cp", "-r", "--sparse=always", str(self.added), str(repo)], check=True)
        os.sync()
        return repo

    def write_configs(self, method: str, k: int) -> tuple[Path, Path]:
        experts = self.models[1: 1 + k]
        d = self.tmp / "cfg"
        d.mkdir(exist_ok=True)
        mp_cfg, mk_cfg = d / f"{method}-k{k}-mp.yml", d / f"{method}-k{k}-mk.yml"
        mp_cfg.write_text(config(method, self.models[0].name, [e.name for e in experts], self.args.density))
        mk_cfg.write_text(config(method, str(self.models[0]), [str(e) for e in experts], self.args.density))
        return mp_cfg, mk_cfg

    def mp_merge(self, method: str, k: int, cfg: Path, i: int, keep_repo: bool = False) -> tuple[Run, Path]:
        repo = self.fresh_repo(f"{method}-k{k}-{i}")
        branch = f"merged-{method}-k{k}"
        cmd = [MP, "-C", str(repo), "--quiet", "merge", "--config", str(cfg), "-b", branch]
        if self.args.threads:
            cmd += ["--threads", str(self.args.threads)]
        r = bs.run(cmd, sample=True)
        if not keep_repo:
            rm(repo)
        return r, repo

    def mk_merge(self, method: str, k: int, cfg: Path, keep_out: bool = False) -> tuple[Run, Path]:
        out = self.tmp / f"mk-{method}-k{k}"
        rm(out)
        os.sync()
        r = bs.run([self.mergekit, str(cfg), str(out), "--no-copy-tokenizer", "--no-write-model-card", "--quiet"],
                   sample=True)
        if not keep_out:
            rm(out)
        return r, out

    def case(self, method: str, k: int, repeat: int, check: bool) -> tuple[Case, dict | None]:
        """mp `repeat` times, MergeKit --mk-repeat times; with `check`, compare their outputs."""
        mp_cfg, mk_cfg = self.write_configs(method, k)
        c = Case(method, k)
        branch = f"merged-{method}-k{k}"
        repo = mk_out = None
        for i in range(repeat):
            r, rp = self.mp_merge(method, k, mp_cfg, i, keep_repo=(i == 0))
            c.mp.append(r)
            log(f"  mp merge {method} K={k} #{i + 1}: {r.seconds:.2f} s, maxrss {r.maxrss / MIB:.0f} MiB, "
                f"RssAnon {r.peaks.get('RssAnon', 0) / MIB:.0f} MiB")
            if i == 0:
                repo = rp
                info = json.loads(bs.mp(repo, "show", "--json", branch, sample=False).stdout)
                c.stats = info.get("stats") or {}
        for i in range(self.args.mk_repeat):
            r, out = self.mk_merge(method, k, mk_cfg, keep_out=(check and i == 0))
            c.mk.append(r)
            log(f"  MergeKit {method} K={k} #{i + 1}: {r.seconds:.2f} s, maxrss {r.maxrss / MIB:.0f} MiB")
            if i == 0 and check:
                mk_out = out
        log(f"  floor of {method} K={k} (tools/merge_floor.py)")
        c.floor = json.loads(subprocess.run(
            [sys.executable, str(Path(__file__).with_name("merge_floor.py")), str(repo), str(mp_cfg), "--repeat", "3"]
            + (["--threads", str(self.args.threads)] if self.args.threads else []),
            check=True, capture_output=True, text=True).stdout)
        log(f"  floor: {c.floor['seconds']:.2f} s (runs {c.floor['runs']})")
        agree = None
        if check:
            co = self.tmp / f"co-{method}-k{k}"
            rm(co)
            bs.run([MP, "-C", str(repo), "--quiet", "checkout", branch, "-o", str(co)])
            log(f"  comparing mp's output with MergeKit's ({method}, K={k})")
            agree = agreement(co, mk_out)
            rm(co)
            rm(mk_out)
        rm(repo)
        return c, agree

    # the run ----------------------------------------------------------------------------
    def go(self) -> dict:
        args = self.args
        rm(self.tmp)
        self.tmp.mkdir(parents=True)
        K = len(self.models) - 1
        log("warming the page cache with the family's files")
        warm(self.models)
        log(f"mp end to end: init + add base and {K} experts")
        self.add_all()
        warm([self.added / ".mp" / "data.mdb"])

        mk_help = bs.run([self.mergekit, "--help"])
        log(f"mergekit-yaml --help: {mk_help.seconds:.2f} s")
        mp_help = bs.run([MP, "--help"])

        main: dict[str, Case] = {}
        agree: dict[str, dict] = {}
        for method in METHODS:
            log(f"{method}, K={K}: mp ×{args.repeat}, MergeKit ×{args.mk_repeat}")
            main[method], agree[method] = self.case(method, K, args.repeat, check=True)

        sweep: dict[tuple[str, int], Case] = {}
        if args.ks:
            for method in args.sweep_methods:
                for k in args.ks:
                    if k > K:
                        continue
                    if k == K:
                        sweep[(method, k)] = main[method]
                        continue
                    log(f"sweep {method}, K={k}")
                    try:
                        sweep[(method, k)], _ = self.case(method, k, args.sweep_repeat, check=False)
                    except SystemExit as e:  # bs.run's failure: keep the other points
                        log(f"  FAILED: {str(e).splitlines()[0]}")
                        self.failed.append(f"{method} K={k}: {str(e).strip()[:300]}")
        return {"K": K, "main": main, "agree": agree, "sweep": sweep, "mk_help": mk_help, "mp_help": mp_help}


# ------------------------------------------------------------------------------ report


def row(metric: str, mpv: str, base: str, ratio: float | None, target: float | None = None,
        target_text: str = "") -> list[str]:
    ratio_s = "-" if ratio is None else f"{ratio:.3f}"
    if target is None:
        return [metric, mpv, base, ratio_s, "-", "info"]
    return [metric, mpv, base, ratio_s, target_text, "PASS" if ratio <= target else "FAIL"]


def secs(runs: list[Run]) -> str:
    ts = sorted(r.seconds for r in runs)
    med = statistics.median(ts)
    return f"{med:.2f} s" + (f" (min {ts[0]:.2f}, max {ts[-1]:.2f}, n={len(ts)})" if len(ts) > 1 else "")


def rss(runs: list[Run], key: str | None = None) -> int:
    return max((r.maxrss if key is None else r.peaks.get(key, 0)) for r in runs)


def plot(res: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.8))
    colors = {"ties": "tab:red", "task_arithmetic": "tab:blue"}
    for method in dict.fromkeys(m for m, _ in res["sweep"]):
        ks = sorted(k for m, k in res["sweep"] if m == method)
        cases = [res["sweep"][(method, k)] for k in ks]
        col = colors.get(method)
        ax.plot(ks, [c.mk_s for c in cases], "s--", color=col, label=f"MergeKit 0.1.5 {method}")
        ax.plot(ks, [c.mp_s for c in cases], "o-", color=col, label=f"mp merge {method} (models added)")
        ax.plot(ks, [c.mp_s + res["bench"].adds_seconds(c.k) for c in cases], "^:", color=col, alpha=0.6,
                label=f"mp adds + merge {method}")
        ax.plot(ks, [c.floor["seconds"] for c in cases], "v-.", color=col, alpha=0.6,
                label=f"floor {method} (reads + fused pass)")
    ax.set_xticks(sorted({k for _, k in res["sweep"]}))
    ax.set_xlabel("K (experts merged)")
    ax.set_ylabel("wall time (s)")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(args: argparse.Namespace, res: dict, params: str, experts: int, models: list[Path]) -> str:
    bench: Bench = res["bench"]
    K = res["K"]
    rows: list[list[str]] = []
    for method in METHODS:
        c = res["main"][method]
        rows.append(row(f"{method} K={K}: `mp merge` (models added) vs MergeKit", secs(c.mp), secs(c.mk),
                        c.mp_s / c.mk_s, TARGETS[method], TARGET_TEXT[method]))
    for method in METHODS:
        c = res["main"][method]
        rows.append(row(f"{method} K={K}: `mp merge` vs the measured floor (tools/merge_floor.py)", secs(c.mp),
                        f"{c.floor['seconds']:.2f} s (runs {', '.join(f'{x:.2f}' for x in c.floor['runs'])})",
                        c.mp_s / c.floor["seconds"], FLOOR_TARGET, "≤ 3"))
    for method in METHODS:
        c = res["main"][method]
        rows.append(row(f"{method} K={K}: peak RSS `mp merge` (ru_maxrss, incl. mapped store pages)",
                        b(rss(c.mp)), f"limit {b(RSS_TARGET)}", rss(c.mp) / RSS_TARGET, 1.0, "≤ 1"))
    for method in METHODS:
        c = res["main"][method]
        e2e = bench.adds_seconds(K) + c.mp_s
        rows.append(row(f"{method} K={K}: end to end, `mp init` + {K + 1} adds + merge vs MergeKit",
                        f"{e2e:.2f} s ({bench.adds_seconds(K):.2f} + {c.mp_s:.2f})", secs(c.mk), e2e / c.mk_s))
    for method in METHODS:
        c = res["main"][method]
        rows.append(row(f"{method} K={K}: peak RSS, mp vs MergeKit (ru_maxrss)", b(rss(c.mp)), b(rss(c.mk)),
                        rss(c.mp) / rss(c.mk)))
    rows.append(row("start-up: `mp --help` vs `mergekit-yaml --help`", f"{res['mp_help'].seconds:.2f} s",
                    f"{res['mk_help'].seconds:.2f} s", res["mp_help"].seconds / res["mk_help"].seconds))

    detail = []
    for method in METHODS:
        c = res["main"][method]
        for tool, runs in (("mp merge", c.mp), ("MergeKit", c.mk)):
            detail.append([method, tool, ", ".join(f"{r.seconds:.2f}" for r in runs), b(rss(runs)),
                           b(rss(runs, "RssAnon")), b(rss(runs, "RssFile"))])

    realized = []
    for method in METHODS:
        st = res["main"][method].stats
        if st:
            realized.append(f"- {method}: read {b(st['expert_bytes'])} of experts and {b(st['base_bytes'])} of base "
                            f"(all passes), {st['chunks_skipped']} expert chunks skipped, "
                            f"{st['tensors_copied']} tensors copied unchanged")

    adds = [[name, f"{r.seconds:.2f}", b(r.maxrss)] for name, r in bench.add_runs]

    sweep_md = ""
    if res["sweep"]:
        srows = []
        for (method, k), c in sorted(res["sweep"].items()):
            e2e = bench.adds_seconds(k) + c.mp_s
            srows.append([method, str(k), f"{c.mp_s:.2f}" + (f" (n={len(c.mp)})" if len(c.mp) > 1 else ""),
                          f"{c.floor['seconds']:.2f}", f"{c.mp_s / c.floor['seconds']:.2f}",
                          f"{e2e:.2f}", f"{c.mk_s:.2f}", f"{c.mp_s / c.mk_s:.3f}", f"{e2e / c.mk_s:.3f}",
                          b(rss(c.mp)), b(rss(c.mk))])
        sweep_md = (
            "## Wall time vs K\n\n"
            f"Each point: mp merge {'median of ' + str(args.sweep_repeat) + ' runs' if args.sweep_repeat > 1 else 'one run'}"
            f" (the K={K} points are the runs above), MergeKit one run; experts 1..K; "
            "`mp e2e` = init + adds of the base and experts 1..K (from the adds below) + merge."
            + (f" Plot: `{args.plot}`." if args.plot else "") + "\n\n"
            + table(["method", "K", "mp merge (s)", "floor (s)", "mp/floor", "mp e2e (s)", "MergeKit (s)", "mp/MK",
                     "e2e/MK",
                     "mp peak RSS", "MK peak RSS"], srows) + "\n"
        )

    kinds = ", ".join(f"{m.name}={bs.model_kind(m)}" for m in models[1:])
    repro = shlex.join([os.path.relpath(sys.executable), os.path.relpath(__file__), *sys.argv[1:]])
    load = res["load"]
    md = [
        "# mpstore merge benchmark: `mp merge` vs MergeKit 0.1.5\n",
        f"Reproduce: `cd {shlex.quote(os.getcwd())} && {repro}`\n",
        f"Family: `tools/make_family.py --params {params} --experts {experts} --dtype bf16` (kinds cycle dense, "
        f"partial, lora: {kinds}); base folder {b(bs.folder_bytes(models[0]))}. Merges: weight 1/K for each "
        f"expert, ties with density {args.density} (normalize and the other parameters at their defaults), "
        "`dtype: float32`, `out_dtype: bfloat16`, one YAML per tool (refs for mp, paths for MergeKit). "
        f"`mp merge`: median of {args.repeat} runs, each on a fresh copy (untimed `cp -r --sparse=always`) of a "
        "repository holding every model, so every run writes its output chunks; default threads "
        f"({args.threads or os.cpu_count()}), memory limit 1GB. MergeKit: `{bench.mergekit} cfg.yml OUT "
        "--no-copy-tokenizer --no-write-model-card --quiet` with HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1, "
        f"{args.mk_repeat} run(s) per configuration. Wall clock from spawn to exit, interpreter start-up and "
        "imports included for both. Peak RSS: "
        + ("GNU time's %M (ru_maxrss of the command itself; for mp it counts mapped LMDB pages it touched); "
           if bs.GNU_TIME else "ru_maxrss from wait4 (GNU time missing: may include this script's own peak); ")
        + f"RssAnon/RssFile sampled from /proc/PID/status every {bs.POLL_S * 1000:.0f} ms. Page cache not "
        f"dropped; sources read once beforehand. Load average at start {load[0]}, at end {load[1]} "
        f"(other processes may have been running: timings are noisy). The whole benchmark took {res['took']:.0f} s.\n",
        "## Results\n",
        table(["metric", "mp", "MergeKit / limit", "ratio", "target", "pass"], rows) + "\n",
        "## Agreement of the merged models (mp checkout vs MergeKit's output)\n",
        "\n".join(agreement_text(m, res["agree"][m]) for m in METHODS) + "\n",
        "ties cannot agree bit for bit: both keep exactly k = density·n deltas per tensor, but among the "
        "deltas tied with the k-th magnitude mp keeps the first in index order and MergeKit an arbitrary "
        "subset (its argsort is not stable; docs/merge_methods.md §2.3), and deltas of bf16 weights tie "
        "heavily (a dense expert's deltas are mostly a few bf16 ulps). task_arithmetic should agree "
        "exactly.\n",
        "## Runs in detail\n",
        table(["method", "tool", "wall times (s)", "peak RSS (ru_maxrss)", "peak RssAnon (sampled)",
               "peak RssFile (sampled)"], detail) + "\n",
    ]
    if realized:
        md += ["What `mp merge` read (`mp show --json`, realized stats):\n", "\n".join(realized) + "\n"]
    md += [f"`mp init` and adds (one run each, {b(sum(bs.folder_bytes(m) for m in models))} in all; "
           "`--base base` for the experts):\n",
           table(["step", "seconds", "peak RSS"], adds) + "\n"]
    if sweep_md:
        md.append(sweep_md)
    if bench.failed:
        md += ["Sweep points that failed (left out):\n", "\n".join(f"- `{f}`" for f in bench.failed) + "\n"]
    return "\n".join(md)


def versions(mergekit: str) -> list[tuple[str, str]]:
    import torch

    py = Path(mergekit).parent / "python"
    mk = subprocess.run([str(py), "-c", "import importlib.metadata as m; print(m.version('mergekit'), "
                         "m.version('torch'), m.version('transformers'))"], capture_output=True, text=True)
    mk_v = mk.stdout.split() if mk.returncode == 0 else ["?", "?", "?"]
    src = subprocess.run([str(Path(MP).parent / "python"), "-c", "import mpstore; print(mpstore.__file__)"],
                         capture_output=True, text=True, cwd="/").stdout.strip()
    return [("mpstore imported by `mp` from", str(Path(src).parent) if src else "?"),
            ("mergekit-yaml", mergekit), ("mergekit / its torch / transformers", " / ".join(mk_v)),
            ("mpstore's torch", torch.__version__), ("torch threads (mp)", str(torch.get_num_threads()))]


# ------------------------------------------------------------------------------ main


def find_mergekit(given: str | None) -> str:
    for cand in ([given] if given else [str(ROOT / ".venv-mergekit" / "bin" / "mergekit-yaml"),
                                         "/tmp/mkvenv/bin/mergekit-yaml"]):
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return str(Path(cand).resolve())  # resolved: a symlinked venv may move during a long run
    raise SystemExit("mergekit-yaml not found: pass --mergekit PATH (docs/merge_methods.md §10 installs it)")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="bench/store", help="work folder: family and scratch repos (default ./bench/store)")
    ap.add_argument("--out", help="also write the markdown (plus machine facts) here")
    ap.add_argument("--plot", help="write the wall-time-vs-K plot here (PNG)")
    ap.add_argument("--repeat", type=int, default=3, help="mp merge runs per method at K=--experts (median)")
    ap.add_argument("--mk-repeat", type=int, default=1, help="MergeKit runs per configuration (median)")
    ap.add_argument("--sweep-repeat", type=int, default=1, help="mp merge runs per point of the K sweep")
    ap.add_argument("--params", default="250M", help="family size (make_family --params)")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--density", type=float, default=DENSITY, help="ties density")
    ap.add_argument("--ks", default="2,4,6,8", help="K values of the sweep (comma-separated; empty: no sweep)")
    ap.add_argument("--full-sweep", action="store_true", help="sweep every K from 2 to --experts")
    ap.add_argument("--sweep-methods", default="ties,task_arithmetic", help="methods of the K sweep")
    ap.add_argument("--threads", type=int, help="pass --threads to mp merge (default: mp's, all cores)")
    ap.add_argument("--quick", action="store_true", help="small family (20M params, 3 experts) for a smoke run")
    ap.add_argument("--mergekit", help="mergekit-yaml to run (default: .venv-mergekit/bin, else /tmp/mkvenv/bin)")
    ap.add_argument("--keep", action="store_true", help="keep WORK/tmp-merge (the repository holding every model, the configs)")
    args = ap.parse_args(argv)
    if not Path(MP).exists():
        raise SystemExit(f"{MP} not found: run with the venv's python (pip install -e . first)")
    mergekit = find_mergekit(args.mergekit)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    params, experts = ("20M", 3) if args.quick else (args.params, args.experts)
    if args.full_sweep:
        args.ks = list(range(2, experts + 1))
    else:
        args.ks = sorted({int(k) for k in args.ks.split(",") if k.strip()})
        if args.quick and args.ks:
            args.ks = [k for k in args.ks if k < experts] + [experts]
    args.sweep_methods = [m for m in args.sweep_methods.split(",") if m]
    for m in args.sweep_methods:
        if m not in METHODS:
            raise SystemExit(f"--sweep-methods: {m!r} is not one of {', '.join(METHODS)}")

    work = Path(args.work).absolute()
    work.mkdir(parents=True, exist_ok=True)
    _, models = bs.family(work, params, experts)
    bench = Bench(args, work, models, mergekit)
    load0 = " ".join(f"{x:.2f}" for x in os.getloadavg())
    t0 = time.perf_counter()
    try:
        res = bench.go()
    finally:
        if not args.keep:
            rm(bench.tmp)
    res["bench"] = bench
    res["load"] = (load0, " ".join(f"{x:.2f}" for x in os.getloadavg()))
    res["took"] = time.perf_counter() - t0
    log(f"benchmark took {res['took']:.0f} s")
    md = report(args, res, params, experts, models)
    facts = bs.machine_facts(work).rstrip("\n")
    facts += "\n" + "\n".join(f"- {k}: {v}" for k, v in versions(mergekit)) + "\n"
    md += "\n" + facts
    print(md)
    if args.out:
        Path(args.out).write_text(md)
        log(f"wrote {args.out}")
    if args.plot and res["sweep"]:
        plot(res, Path(args.plot), f"mp merge vs MergeKit 0.1.5: {params} bf16 family, f32 compute, bf16 out")
        log(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
