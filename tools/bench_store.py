#!/usr/bin/env python3
"""Benchmark mpstore's store against plain `cp` on a generated model family.

What it measures (each timed command is run --repeat times; the median is compared, the min shown):
  * `mp add` of a model into an empty repository vs `cp -r` of the same folder to a fresh folder
    on the same filesystem, and vs `cp -r` followed by `sync` (a durable copy: `mp add` fsyncs);
  * `mp add` of the same, unchanged folder again (the file-identity cache vouches for every
    file: nothing but the headers is read) vs `cp -r`;
  * `mp add --base` of the family's first dense expert into a repository holding the base (the
    delta catalog is measured while the expert is read) vs `cp -r` of the expert;
  * `mp checkout` of that model vs `cp -r`, and checkout's floor: the base's files read from the
    page cache, xxh3-checked and written again in 1 MiB pieces in this process;
  * the store's size after adding the whole family (data.mdb's allocated blocks — the file is sparse up to the map size — and LMDB's used pages)
    vs the bytes of the family's unique chunks, computed here from the files themselves;
  * peak RSS of `mp add` and `mp checkout` (wait4's ru_maxrss of the CLI process, which counts
    mapped store pages too) and the peak of its RssAnon, sampled from /proc/PID/status;
  * with --chunk-sweep, a fresh repository per chunk size (256 KiB, 1 MiB, 4 MiB): time to add the
    whole family, checkout time, store size and dedup.

Page cache: nothing is dropped. Every source is read once before timing, so both `mp` and `cp`
read warm files; `sync` runs (untimed) before each timed command so that one command's dirty
pages are not written back during the next one.

The family (tools/make_family.py, bf16, base + experts cycling dense/partial/lora) is generated
into --work and reused when it is already there with the same parameters.

Usage (from the repository root, with the venv's python):
  python tools/bench_store.py [--work bench/store] [--out results.md] [--repeat 3]
      [--params 250M] [--experts 8] [--quick] [--chunk-sweep] [--keep]
  The ~3 GB rows of issue 12: --params 1.5B --experts 1 (one dense expert). Targets: add ≤ 1.5×
  `cp` at ≥ 2 GiB, ≤ 2× `cp` + `sync` below; add --base ≤ 2.5× `cp`; re-add ≤ 0.3× `cp`;
  checkout ≤ 1.0× `cp` at ≥ 2 GiB, ≤ 1.5× below. MP_BENCH_COMMAND=/path/to/mp runs another
  `mp` (a frozen copy of the code while others edit the tree).
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import shlex
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import lmdb
import psutil
import xxhash

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MP = os.environ.get("MP_BENCH_COMMAND") or str(BIN / "mp")  # another `mp` (e.g. a copy of the code)
MIB = 1 << 20
RSS_TARGET = 512 * MIB
BIG_BYTES = 2 << 30  # from this base folder size on, the ~3 GB targets apply
SWEEP_SIZES = ("256KiB", "1MiB", "4MiB")
POLL_S = 0.01
STATUS_KEYS = ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ running commands


@dataclass
class Run:
    seconds: float
    maxrss: int  # bytes: the command's ru_maxrss (via GNU time; see run()), the kernel's exact peak
    peaks: dict[str, int] = field(default_factory=dict)  # sampled maxima of /proc/PID/status
    stdout: str = ""


def _poll_status(pid: int, stop: threading.Event, peaks: dict[str, int], via_time: bool) -> None:
    if via_time:  # sample the command that /usr/bin/time started, not time itself
        while not stop.is_set():
            try:
                kids = psutil.Process(pid).children()
            except psutil.Error:
                return
            if kids:
                pid = kids[0].pid
                break
            stop.wait(0.001)
    path = f"/proc/{pid}/status"
    while True:
        try:
            with open(path) as f:
                text = f.read()
        except OSError:
            return
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key in STATUS_KEYS:
                peaks[key] = max(peaks.get(key, 0), int(value.split()[0]) * 1024)
        if stop.wait(POLL_S):
            return


def run(cmd: list[str], sample: bool = False) -> Run:
    """Run `cmd` once: wall time from spawn to reaping; peak RSS (ru_maxrss) from GNU time.

    Why GNU time: a child's ru_maxrss also counts the memory of the process that spawned it
    (Linux records the old mm's high-water mark at exec, and subprocess spawns with vfork), so
    wait4 on a direct child reports at least this script's own peak. /usr/bin/time is a tiny
    process that forks the command, so its %M is the command's own peak."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile(mode="r") as rss:
        full = [GNU_TIME, "-f", "%M", "-o", rss.name, *cmd] if GNU_TIME else cmd
        t0 = time.perf_counter()
        p = subprocess.Popen(full, stdout=out, stderr=err)
        peaks: dict[str, int] = {}
        stop = threading.Event()
        poller = None
        if sample:
            poller = threading.Thread(target=_poll_status, args=(p.pid, stop, peaks, bool(GNU_TIME)), daemon=True)
            poller.start()
        _, status, usage = os.wait4(p.pid, 0)
        seconds = time.perf_counter() - t0
        stop.set()
        if poller:
            poller.join()
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
        maxrss = usage.ru_maxrss * 1024
        if GNU_TIME:
            lines = rss.read().split()
            maxrss = int(lines[-1]) * 1024 if lines and lines[-1].isdigit() else 0
    if p.returncode:
        raise SystemExit(f"command failed ({p.returncode}): {shlex.join(cmd)}\n{stderr}")
    return Run(seconds, maxrss, peaks, stdout)


def _gnu_time() -> str | None:
    try:
        v = subprocess.run(["/usr/bin/time", "--version"], capture_output=True, text=True)
        ok = "GNU" in v.stdout + v.stderr
    except OSError:
        return None
    return "/usr/bin/time" if ok else None


GNU_TIME = _gnu_time()


def mp(repo: Path, *args: str, sample: bool = True) -> Run:
    return run([MP, "-C", str(repo), "--quiet", *args], sample=sample)


def cp_cmd(src: Path, dst: Path, durable: bool) -> list[str]:
    if durable:
        return ["sh", "-c", f"cp -r {shlex.quote(str(src))} {shlex.quote(str(dst))} && sync"]
    return ["cp", "-r", str(src), str(dst)]


def rm(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def warm(paths: list[Path]) -> None:
    """Read every file once so that timed commands read from the page cache."""
    buf = bytearray(8 * MIB)
    for root in paths:
        for p in sorted(root.rglob("*")) if root.is_dir() else [root]:
            if p.is_file():
                with open(p, "rb", buffering=0) as f:
                    while f.readinto(buf):
                        pass


@dataclass
class Timing:
    runs: list[Run]

    @property
    def median(self) -> float:
        return statistics.median(r.seconds for r in self.runs)

    @property
    def min(self) -> float:
        return min(r.seconds for r in self.runs)

    def peak(self, key: str | None = None) -> int:
        return max((r.maxrss if key is None else r.peaks.get(key, 0)) for r in self.runs)

    def text(self) -> str:
        return f"{self.median:.3f} s (min {self.min:.3f})"


def compare(variants: dict[str, tuple], repeat: int) -> dict[str, Timing]:
    """variants: name -> (prepare(i) -> cmd, cleanup(i) or None, sample). Runs them interleaved,
    rotating the order each repetition, with an untimed sync before every timed command."""
    names = list(variants)
    runs: dict[str, list[Run]] = {n: [] for n in names}
    for i in range(repeat):
        order = names[i % len(names):] + names[: i % len(names)]
        for name in order:
            prepare, cleanup, sample = variants[name]
            cmd = prepare(i)
            os.sync()
            r = run(cmd, sample=sample)
            runs[name].append(r)
            log(f"  {name} #{i + 1}: {r.seconds:.3f} s, maxrss {r.maxrss / MIB:.0f} MiB")
            if cleanup:
                cleanup(i)
    return {n: Timing(rs) for n, rs in runs.items()}


# ------------------------------------------------------------------------------ family


def pretouch(gib: float) -> float:
    """Write `gib` GiB of anonymous memory (1 GiB at a time, all held until the end), then free it."""
    import numpy as np

    avail = psutil.virtual_memory().available / (1 << 30)
    gib = min(gib, avail - 2)
    t0 = time.perf_counter()
    held = [np.ones(1 << 30, dtype=np.uint8) for _ in range(max(0, int(gib)))]
    del held
    return time.perf_counter() - t0


def read_hash_floor(folder: Path, chunk_size: int) -> float:
    """Seconds to read every file of `folder` and xxh3 it in chunk_size pieces, in this process:
    what any add must at least do when it does not trust file metadata (no interpreter start)."""
    buf = bytearray(chunk_size)
    view = memoryview(buf)
    t0 = time.perf_counter()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            with open(p, "rb", buffering=0) as f:
                while n := f.readinto(buf):
                    xxhash.xxh3_128_digest(view[:n])
    return time.perf_counter() - t0


def checkout_floor(folder: Path, out: Path, chunk_size: int) -> float:
    """Seconds to read every file of `folder` (from the page cache) in chunk_size pieces, xxh3
    each piece and write it to a new file under `out`, in this process: what a checkout that
    checks every chunk must at least do (no interpreter start, no decoding, no store lookups)."""
    rm(out)
    out.mkdir(parents=True)
    buf = bytearray(chunk_size)
    view = memoryview(buf)
    t0 = time.perf_counter()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            with open(p, "rb", buffering=0) as f, open(out / p.name, "wb", buffering=0) as g:
                while n := f.readinto(buf):
                    xxhash.xxh3_128_digest(view[:n])
                    g.write(view[:n])
    seconds = time.perf_counter() - t0
    rm(out)
    return seconds


def family(work: Path, params: str, experts: int) -> tuple[Path, list[Path]]:
    folder = work / f"family-{params}-x{experts}"
    spec = {"params": params, "experts": experts, "dtype": "bf16", "kinds": "dense,partial,lora", "seed": 0}
    marker = folder / ".bench-family.json"
    names = ["base", *(f"expert-{i}" for i in range(1, experts + 1))]
    if marker.is_file() and json.loads(marker.read_text()) == spec and all((folder / n).is_dir() for n in names):
        log(f"reusing family {folder}")
    else:
        rm(folder)
        log(f"generating family {folder} ({params} params, {experts} experts)")
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, str(ROOT / "tools" / "make_family.py"), str(folder), "--params", params,
             "--experts", str(experts), "--dtype", spec["dtype"], "--kinds", spec["kinds"],
             "--seed", str(spec["seed"])],
            check=True, stdout=subprocess.DEVNULL,
        )
        marker.write_text(json.dumps(spec))
        log(f"generated in {time.perf_counter() - t0:.1f} s")
    return folder, [folder / n for n in names]


def model_kind(folder: Path) -> str:
    readme = (folder / "README.md").read_text()
    for line in readme.splitlines():
        if line.startswith("Kind: "):
            return line[len("Kind: "):].split(".")[0]
    return "?"


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------ unique chunks


def unique_chunks(models: list[Path], chunk_size: int) -> dict:
    """The chunks mpstore would keep, computed from the files: each safetensors header (without
    its 8-byte length) and each tensor's bytes, and every other file, cut at `chunk_size` and
    named by xxh3-128; identical chunks counted once."""
    seen: dict[bytes, int] = {}
    buf = bytearray(chunk_size)
    total_files = 0

    def stream(f: io.RawIOBase | io.BufferedIOBase, size: int) -> None:
        view = memoryview(buf)
        while size:
            n = min(chunk_size, size)
            got = f.readinto(view[:n])
            assert got == n, "short read"
            seen.setdefault(xxhash.xxh3_128_digest(view[:n]), n)
            size -= n

    for folder in models:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            rel = path.relative_to(folder).as_posix()
            if rel.startswith(".git/") or rel.startswith(".bench"):
                continue
            size = path.stat().st_size
            total_files += size
            with open(path, "rb") as f:
                if "/" not in rel and rel.endswith(".safetensors"):
                    (n,) = struct.unpack("<Q", f.read(8))
                    raw = f.read(n)
                    stream(io.BytesIO(raw), n)
                    doc = json.loads(raw)
                    doc.pop("__metadata__", None)
                    for begin, end in sorted(v["data_offsets"] for v in doc.values()):
                        f.seek(8 + n + begin)
                        stream(f, end - begin)
                else:
                    stream(f, size)
    return {"bytes": sum(seen.values()), "count": len(seen), "total_files": total_files}


def store_stats(repo: Path) -> dict:
    """Sizes of the store as LMDB sees it, read directly with py-lmdb (no writer may be running)."""
    path = repo / ".mp"
    env = lmdb.open(str(path), readonly=True, lock=False, max_dbs=8, subdir=True)
    try:
        info, st = env.info(), env.stat()
        psize = st["psize"]
        out = {"file": os.stat(path / "data.mdb").st_blocks * 512, "used": (info["last_pgno"] + 1) * psize,
               "psize": psize, "dbs": {}}
        with env.begin(buffers=True) as txn:
            db_pages = st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]  # the main db
            for name in (b"chunks", b"objects", b"refs", b"meta", b"catalog"):
                db = env.open_db(name, txn=txn, create=False)
                s = txn.stat(db)
                pages = s["branch_pages"] + s["leaf_pages"] + s["overflow_pages"]
                db_pages += pages
                values = 0
                for value in txn.cursor(db).iternext(keys=False, values=True):
                    values += len(value)
                out["dbs"][name.decode()] = {"entries": s["entries"], "pages": pages, "value_bytes": values}
        # the chunks' own bytes: compressed values decode to more (`mp status`'s logical bytes)
        out["chunk_bytes"] = json.loads(subprocess.run([MP, "-C", str(repo), "status", "--json"], check=True,
                                                       capture_output=True, text=True).stdout)["space"]["logical_bytes"]
        out["free_pages"] = info["last_pgno"] + 1 - 2 - db_pages  # 2 meta pages; the rest is LMDB's freelist
        return out
    finally:
        env.close()


# ------------------------------------------------------------------------------ formatting


def b(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def row(metric: str, mpv: str, base: str, ratio: float | None, target: float | None, lower: str = "") -> list[str]:
    ratio_s = "-" if ratio is None else f"{ratio:.2f}×"
    if target is None:
        return [metric, mpv, base, ratio_s, "-", "info"]
    return [metric, mpv, base, ratio_s, f"≤ {target:g}×", "PASS" if ratio <= target else "FAIL"]


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def machine_facts(work: Path) -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    fs = "?"
    try:
        fs = subprocess.run(["df", "-T", str(work)], capture_output=True, text=True).stdout.splitlines()[1].split()[1]
    except (OSError, IndexError):
        pass
    cp_version = subprocess.run(["cp", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "?"
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "mpstore"], capture_output=True,
                           text=True).stdout.strip()
    facts = [
        ("date", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")),
        ("mpstore commit", commit + (" (mpstore/ modified)" if dirty else "")),
        ("nproc", f"{len(os.sched_getaffinity(0))} (os.cpu_count {os.cpu_count()})"),
        ("CPU", cpu),
        ("RAM", b(psutil.virtual_memory().total)),
        ("kernel", platform.release()),
        ("filesystem of --work", fs),
        ("python", sys.version.split()[0]),
        ("py-lmdb / LMDB", f"{lmdb.__version__} / {'.'.join(map(str, lmdb.version()))}"),
        ("xxhash", xxhash.VERSION),
        ("cp", cp_version),
    ]
    return "## Machine\n\n" + "\n".join(f"- {k}: {v}" for k, v in facts) + "\n"


# ------------------------------------------------------------------------------ benchmark


def bench(args: argparse.Namespace) -> str:
    work = Path(args.work).absolute()
    work.mkdir(parents=True, exist_ok=True)
    params, experts = ("20M", 3) if args.quick else (args.params, args.experts)
    fam, models = family(work, params, experts)
    touched = 0.0
    if args.pretouch_gib:
        log(f"pre-touching {args.pretouch_gib} GiB of memory")
        touched = pretouch(args.pretouch_gib)
        log(f"  took {touched:.1f} s")
    base = models[0]
    tmp = work / "tmp"
    rm(tmp)
    tmp.mkdir()
    R = args.repeat
    log("warming the page cache with the family's files")
    warm(models)
    base_bytes = folder_bytes(base)
    big = base_bytes >= BIG_BYTES  # issue 12's targets differ for a ~3 GB model and the 0.5 GB family
    rows: list[list[str]] = []
    notes: list[str] = []
    try:
        # 1. add a new model: empty repo each time ------------------------------------------
        log(f"add new ({b(base_bytes)})")
        repo = tmp / "repo"

        def prep_add(i: int) -> list[str]:
            rm(repo)
            run([MP, "-C", str(repo), "--quiet", "init"])
            return [MP, "-C", str(repo), "--quiet", "add", str(base), "--name", "base"]

        def cp_variant(durable: bool) -> tuple:
            dst = tmp / ("cp-sync" if durable else "cp")
            return (lambda i: (rm(dst), cp_cmd(base, dst, durable))[1], lambda i: rm(dst), False)

        t = compare({"mp add": (prep_add, None, True), "cp -r": cp_variant(False),
                     "cp -r + sync": cp_variant(True)}, R)
        add_new, cp1, cps = t["mp add"], t["cp -r"], t["cp -r + sync"]
        rows.append(row("add new model (base, empty repo)", add_new.text(), "cp -r: " + cp1.text(),
                        add_new.median / cp1.median, 1.5 if big else None))
        rows.append(row("add new model, durable baseline", add_new.text(), "cp -r + sync: " + cps.text(),
                        add_new.median / cps.median, None if big else 2.0))

        # 2. add the identical model again: every chunk already stored -----------------------
        log("re-add identical")
        t = compare({"mp add again": (lambda i: [MP, "-C", str(repo), "--quiet", "add", str(base), "--name",
                                                 f"again-{i}"], None, True),
                     "cp -r": cp_variant(False)}, R)
        readd, cp2 = t["mp add again"], t["cp -r"]
        rows.append(row("re-add unchanged folder (file-identity cache)", readd.text(), "cp -r: " + cp2.text(),
                        readd.median / cp2.median, 0.3))

        # 2b. add --base of a dense expert: the delta catalog measured while the expert is read --
        expert = next((m for m in models[1:] if model_kind(m) == "dense"), None)
        add_base = None
        if expert is not None:
            log(f"add --base of the dense {expert.name} ({b(folder_bytes(expert))})")
            brepo = tmp / "repo-base"

            def prep_add_base(i: int) -> list[str]:
                rm(brepo)
                run([MP, "-C", str(brepo), "--quiet", "init"])
                run([MP, "-C", str(brepo), "--quiet", "add", str(base), "--name", "base"])
                return [MP, "-C", str(brepo), "--quiet", "add", str(expert), "--name", expert.name, "--base", "base"]

            log("  untimed warm-up (compiles the catalog kernel once, if this code never ran)")
            run(prep_add_base(0))
            cpe = tmp / "cp-expert"
            t = compare({"mp add --base": (prep_add_base, None, True),
                         "cp -r": (lambda i: (rm(cpe), cp_cmd(expert, cpe, False))[1], lambda i: rm(cpe), False)}, R)
            add_base, cp4 = t["mp add --base"], t["cp -r"]
            rows.append(row(f"add --base of a dense expert ({expert.name}, catalog measured)", add_base.text(),
                            "cp -r: " + cp4.text(), add_base.median / cp4.median, 2.5))
            rows.append(row("catalog's cost: add --base of the expert vs add of the base (same size)",
                            add_base.text(), "add new: " + add_new.text(), add_base.median / add_new.median, None))
            rm(brepo)

        # 3. checkout ----------------------------------------------------------------------
        log("checkout")
        warm([repo / ".mp" / "data.mdb"])
        co = tmp / "co"

        def prep_co(i: int) -> list[str]:
            rm(co)
            return [MP, "-C", str(repo), "--quiet", "checkout", "base", "-o", str(co)]

        def check_co(i: int) -> None:
            if i == 0:
                same = subprocess.run(["diff", "-rq", str(base), str(co)], capture_output=True, text=True)
                if same.returncode:
                    raise SystemExit(f"checkout differs from the source:\n{same.stdout}{same.stderr}")
            rm(co)

        t = compare({"mp checkout": (prep_co, check_co, True), "cp -r": cp_variant(False)}, R)
        checkout, cp3 = t["mp checkout"], t["cp -r"]
        rows.append(row("checkout (base)", checkout.text(), "cp -r: " + cp3.text(), checkout.median / cp3.median,
                        1.0 if big else 1.5))
        rm(repo)

        # 4. the whole family in one repo: store size vs unique chunk bytes -------------------
        log("adding the whole family to one repository")
        full = tmp / "full"
        run([MP, "-C", str(full), "--quiet", "init"])
        per_model = []
        family_adds: list[Run] = []
        for m in models:
            extra = [] if m == base else ["--base", "base"]
            os.sync()
            r = mp(full, "add", str(m), "--name", m.name, *extra)
            family_adds.append(r)
            info = json.loads(mp(full, "show", "--json", m.name, sample=False).stdout)
            per_model.append((m.name, model_kind(m), info["size"], info["new_bytes"], r))
            log(f"  {m.name}: {r.seconds:.2f} s, {b(info['new_bytes'])} new of {b(info['size'])}")
        stats = store_stats(full)
        log("computing unique chunk bytes from the files")
        uniq = unique_chunks(models, 1 * MIB)
        if uniq["bytes"] != stats["chunk_bytes"] or uniq["count"] != stats["dbs"]["chunks"]["entries"]:
            notes.append(f"**Mismatch**: files give {uniq['count']} unique chunks of {uniq['bytes']} bytes, the "
                         f"store's chunks db holds {stats['dbs']['chunks']['entries']} of {stats['chunk_bytes']}.")
        ub = uniq["bytes"]
        rows.append(row(f"store size: data.mdb allocated blocks ({len(models)} models)", b(stats["file"]),
                        f"unique chunk bytes: {b(ub)}", stats["file"] / ub, 1.05))
        rows.append(row("store size: LMDB used pages ((last_pgno+1)×psize)", b(stats["used"]),
                        f"unique chunk bytes: {b(ub)}", stats["used"] / ub, 1.05))
        rows.append(row("dedup: store file vs all models' bytes", b(stats["file"]),
                        f"sum of folders: {b(uniq['total_files'])}", stats["file"] / uniq["total_files"], None))

        # 5. peak RSS ------------------------------------------------------------------------
        all_adds = Timing(add_new.runs + readd.runs + family_adds + (add_base.runs if add_base else []))
        for label, tm in (("mp add", all_adds), ("mp checkout", checkout)):
            rows.append(row(f"peak RSS {label} (ru_maxrss, incl. mapped store pages)", b(tm.peak()),
                            f"limit {b(RSS_TARGET)}", tm.peak() / RSS_TARGET, 1.0))
            rows.append(row(f"peak RssAnon {label} (sampled every {POLL_S * 1000:.0f} ms)", b(tm.peak("RssAnon")),
                            f"limit {b(RSS_TARGET)}", tm.peak("RssAnon") / RSS_TARGET, None))
            rows.append(row(f"peak RssFile {label} (sampled)", b(tm.peak("RssFile")), "-", None, None))
        startup = Timing([run([MP, "--help"]) for _ in range(R)])
        rows.append(row("`mp --help` (interpreter + import overhead)", startup.text(), "-", None, None))
        floor = sorted(read_hash_floor(base, MIB) for _ in range(R))
        rows.append(row("floor: read + xxh3 the base folder in-process (no process start)",
                        f"{statistics.median(floor):.3f} s (min {floor[0]:.3f})", "cp -r (re-add row): "
                        + cp2.text(), statistics.median(floor) / cp2.median, None))
        cfloor = []
        for _ in range(R):
            os.sync()
            cfloor.append(checkout_floor(base, tmp / "floor", MIB))
        cfloor.sort()
        rows.append(row("floor: checkout's work in-process (read + xxh3 + write each 1 MiB; no start-up, no decoding)",
                        f"{statistics.median(cfloor):.3f} s (min {cfloor[0]:.3f})", "cp -r (checkout row): "
                        + cp3.text(), statistics.median(cfloor) / cp3.median, None))

        detail = [[name, kind, b(size), b(new), f"{r.seconds:.2f}", f"{size / MIB / r.seconds:.0f}",
                   b(r.maxrss), b(r.peaks.get("RssAnon", 0))] for name, kind, size, new, r in per_model]
        dbs = stats["dbs"]
        breakdown = [
            [name, str(d["entries"]), str(d["pages"]), b(d["pages"] * stats["psize"]), b(d["value_bytes"])]
            for name, d in dbs.items()
        ] + [["(freelist / unaccounted)", "-", str(stats["free_pages"]), b(stats["free_pages"] * stats["psize"]), "-"]]

        # 6. chunk-size sweep ----------------------------------------------------------------
        sweep_md = ""
        if args.chunk_sweep:
            rm(full)
            sweep_rows = []
            for cs in SWEEP_SIZES:
                log(f"chunk sweep: {cs}")
                srepo = tmp / f"sweep-{cs}"
                run([MP, "-C", str(srepo), "--quiet", "init", "--chunk-size", cs])
                seconds, peak = 0.0, 0
                for m in models:
                    extra = [] if m == base else ["--base", "base"]
                    os.sync()
                    r = mp(srepo, "add", str(m), "--name", m.name, *extra)
                    seconds += r.seconds
                    peak = max(peak, r.maxrss)
                warm([srepo / ".mp" / "data.mdb"])
                os.sync()
                cot = mp(srepo, "checkout", "base", "-o", str(tmp / "sweep-co"))
                rm(tmp / "sweep-co")
                st = store_stats(srepo)
                size = int(cs[:-3]) << {"K": 10, "M": 20}[cs[-3]]
                u = unique_chunks(models, size)
                ok = "" if u["bytes"] == st["chunk_bytes"] else " (≠ store!)"
                sweep_rows.append([
                    cs, f"{seconds:.2f}", f"{uniq['total_files'] / MIB / seconds:.0f}", f"{cot.seconds:.2f}",
                    str(st["dbs"]["chunks"]["entries"]), b(st["chunk_bytes"]) + ok, b(st["dbs"]["objects"]["value_bytes"]),
                    b(st["file"]), f"{st['file'] / u['bytes']:.3f}", f"{st['chunk_bytes'] / uniq['total_files']:.3f}",
                    b(peak),
                ])
                rm(srepo)
            sweep_md = (
                "## Chunk-size sweep\n\n"
                f"A fresh repository per chunk size; all {len(models)} models added once each (single run, not a "
                "median), then `mp checkout base` once. `stored/total` is the fraction of the family's bytes kept "
                "(lower = better dedup).\n\n"
                + table(["chunk size", "add all (s)", "add MiB/s", "checkout base (s)", "chunks", "chunk bytes",
                         "objects db bytes", "data.mdb", "data.mdb / unique", "stored / total", "peak RSS add"],
                        sweep_rows) + "\n"
            )
    finally:
        if not args.keep:
            rm(tmp)

    repro = shlex.join([os.path.relpath(sys.executable), os.path.relpath(__file__), *sys.argv[1:]])
    md = [
        "# mpstore store benchmark\n",
        f"Reproduce: `cd {shlex.quote(os.getcwd())} && {repro}`\n",
        f"Family: `tools/make_family.py --params {params} --experts {experts} --dtype bf16` "
        f"(kinds cycle dense, partial, lora): {len(models)} models, base folder {b(base_bytes)}, "
        f"all folders {b(uniq['total_files'])}. Timings: median of {R} runs (min in parentheses), wall clock "
        "from spawn to exit, run interleaved with their baseline. Page cache: **not dropped**; sources are "
        "read once beforehand so both sides read warm files, and an untimed `sync` precedes each timed "
        "command. `mp add` fsyncs (each 32 MiB batch, committed by a writer thread while the next is "
        "read, and at the end); `cp -r` does not, hence the `cp -r + sync` row. `mp` runs as the installed console script with `-C REPO --quiet`. Unique chunk "
        "bytes are computed from the safetensors files (header + each tensor's bytes, and every other file, "
        "cut into 1 MiB chunks, xxh3-128, deduplicated) and cross-checked against the sum of the store's "
        "chunks-db values (less the codec byte). Peak RSS: "
        + ("the command's ru_maxrss as GNU time reports it (counts mapped store pages: RssFile); "
           if GNU_TIME else "ru_maxrss from wait4 (GNU time missing: may include this script's own peak); ")
        + f"RssAnon/RssFile are maxima sampled from /proc/PID/status every {POLL_S * 1000:.0f} ms. "
        + (f"Before timing, {args.pretouch_gib:g} GiB of memory was written once and freed "
           f"(took {touched:.1f} s; see --pretouch-gib).\n" if args.pretouch_gib else "\n"),
        "## Results\n",
        table(["metric", "mp", "baseline", "ratio", "target", "pass"], rows) + "\n",
    ]
    md += [f"{n}\n" for n in notes]
    md += [
        "## Adding the family, model by model (one repository, 1 MiB chunks)\n",
        table(["model", "kind", "size", "new bytes", "add (s)", "MiB/s", "peak RSS", "peak RssAnon"], detail) + "\n",
        f"Store breakdown (page size {stats['psize']}): file {b(stats['file'])}, used {b(stats['used'])}, "
        f"unique chunks {uniq['count']} / {b(ub)}.\n",
        table(["db", "entries", "pages", "page bytes", "value bytes"], breakdown) + "\n",
    ]
    if sweep_md:
        md.append(sweep_md)
    return "\n".join(md)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="bench/store", help="work folder: family and scratch repos (default ./bench/store)")
    ap.add_argument("--out", help="also write the markdown (plus machine facts) here")
    ap.add_argument("--repeat", type=int, default=5, help="runs per timed command (median reported)")
    ap.add_argument("--params", default="250M", help="family size (make_family --params)")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="small family (20M params, 3 experts) for a smoke run")
    ap.add_argument("--chunk-sweep", action="store_true", help="also sweep chunk sizes 256 KiB, 1 MiB, 4 MiB")
    ap.add_argument("--keep", action="store_true", help="keep the scratch repositories under WORK/tmp")
    ap.add_argument("--pretouch-gib", type=float, default=0, metavar="N",
                    help="first write N GiB of memory once and free it: on a VM whose guest memory the host "
                         "backs lazily, the first use of a page is slow, which makes page-cache writes "
                         "(both mp's and cp's) erratic until the memory has been touched")
    args = ap.parse_args(argv)
    if not Path(MP).exists():
        raise SystemExit(f"{MP} not found: run with the venv's python (pip install -e . first)")
    md = bench(args)
    md += "\n" + machine_facts(Path(args.work).absolute())
    print(md)
    if args.out:
        Path(args.out).write_text(md)
        log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
