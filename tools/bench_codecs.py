#!/usr/bin/env python3
"""Benchmark the chunk codecs (mpstore.store.codecs) on a generated model family.

What it measures, on the family's files cut like the store cuts them (each safetensors header
and each tensor's bytes, and every other file, in --chunk-size pieces; identical chunks kept once):
  * stored / raw bytes, each chunk in the codec `codecs.encode` picks (RAW, PLANES, or XOR
    against the base's chunk at the same tensor and position, when that chunk differs):
    the base alone; each expert added to a store holding the base (chunks equal to a base
    chunk cost nothing); the whole family (base + experts, chunk dedup across all of them);
  * the family with chunk dedup alone (every chunk RAW), as the store keeps it without codecs;
  * the dense experts' stored / raw by bucket of relative delta size (RMS of expert - base over
    RMS of base, per tensor), and a sweep of synthetic deltas of set relative sizes on a sample
    of base tensors (real fine-tunes are mostly near 1e-3; make_family's bf16 floor is bf16's eps);
  * baselines in the same run: every file compressed whole with zstd at the codecs' parameters
    (a compressed filesystem) and at level 3; the ZipLLM recipe without chunking (each expert
    tensor XOR its base tensor, all of a model's tensors concatenated, byte planes, zstd; the base
    as byte planes, zstd; headers and other files zstd); ZipNN (byte grouping, its defaults) when
    --zipnn names a python that has it (pip install zipnn in a scratch venv), on each model's
    tensor bytes, and its "byte" delta against the base's;
  * single-thread throughput (MB/s of raw bytes) of encode and decode for PLANES (base chunks)
    and XOR (a dense expert's chunks against the base's), with xxh3-128 hashing and a copy of
    the same chunks as baselines timed in the same loop (median of --repeat runs), with malloc
    tuned as a store's process tunes it (store.env).
Every stored value is decoded and its digest checked against the chunk's.

The family (tools/make_family.py, base + experts cycling dense/partial/lora) is generated into
--work and reused when it is already there with the same parameters; --clean deletes it at exit.

Usage (from the repository root, with the venv's python):
  python tools/bench_codecs.py [--work bench/codecs] [--params 250M] [--experts 8]
      [--dtype bf16|f32] [--chunk-size 1048576] [--repeat 5] [--zipnn PYTHON] [--out FILE] [--clean]
Targets (issue 14): dense bf16 expert with base ≤ 0.30; family ≤ 0.25; bf16 base alone ≤ 0.72;
decode ≥ 1 GB/s per core.
"""

from __future__ import annotations

import argparse
import json
import math
import mmap
import shutil
import statistics
import struct
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import xxhash
import zstandard

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mpstore.store import codecs  # noqa: E402
from mpstore.store.dtypes import ITEMSIZE  # noqa: E402
from mpstore.store.env import _keep_dirty_pages_in_the_heap  # noqa: E402

WORKERS = 2  # threads encoding chunks for the ratios (timings are single-thread)
SAMPLE_CHUNKS = 48  # chunks per throughput measurement
SWEEP = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
SWEEP_BYTES = 32 << 20  # base tensor bytes the synthetic sweep perturbs


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def family(work: Path, params: str, experts: int, dtype: str) -> list[Path]:
    folder = work / f"family-{params}-x{experts}-{dtype}"
    spec = {"params": params, "experts": experts, "dtype": dtype, "kinds": "dense,partial,lora", "seed": 0}
    marker = folder / ".bench-family.json"
    names = ["base", *(f"expert-{i}" for i in range(1, experts + 1))]
    if not (marker.is_file() and json.loads(marker.read_text()) == spec and all((folder / n).is_dir() for n in names)):
        shutil.rmtree(folder, ignore_errors=True)
        log(f"generating family {folder}")
        subprocess.run([sys.executable, str(ROOT / "tools" / "make_family.py"), str(folder), "--params", params,
                        "--experts", str(experts), "--dtype", dtype, "--kinds", spec["kinds"], "--seed", "0"],
                       check=True, stdout=subprocess.DEVNULL)
        marker.write_text(json.dumps(spec))
    return [folder / n for n in names]


def kind(folder: Path) -> str:
    for line in (folder / "README.md").read_text().splitlines():
        if line.startswith("Kind: "):
            return line[len("Kind: "):].split(".")[0]
    return "?"


# ------------------------------------------------------------------------------ a model's chunks


@dataclass
class Piece:
    """A run of bytes the store chunks on its own: a tensor, a safetensors header, another file."""

    name: str  # file, or file:tensor
    itemsize: int
    data: memoryview
    dtype: str | None = None


@dataclass
class Model:
    folder: Path
    kind: str
    pieces: dict[str, Piece]
    files: dict[str, memoryview]  # file -> whole contents
    maps: list[mmap.mmap] = field(default_factory=list)

    @property
    def raw(self) -> int:
        return sum(len(v) for v in self.files.values())

    def close(self) -> None:
        self.pieces.clear()
        self.files.clear()
        for m in self.maps:
            m.close()


def load(folder: Path) -> Model:
    model = Model(folder, kind(folder), {}, {})
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        with open(path, "rb") as f:
            m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if path.stat().st_size else None
        view = memoryview(m) if m is not None else memoryview(b"")
        if m is not None:
            model.maps.append(m)
        model.files[path.name] = view
        if not path.name.endswith(".safetensors"):
            model.pieces[path.name] = Piece(path.name, 1, view)
            continue
        (n,) = struct.unpack("<Q", view[:8])
        model.pieces[path.name] = Piece(path.name, 1, view[8:8 + n])
        doc = json.loads(bytes(view[8:8 + n]))
        doc.pop("__metadata__", None)
        for tensor, entry in doc.items():
            begin, end = entry["data_offsets"]
            model.pieces[f"{path.name}:{tensor}"] = Piece(tensor, ITEMSIZE[entry["dtype"]],
                                                          view[8 + n + begin:8 + n + end], entry["dtype"])
    return model


def chunks(data: memoryview, size: int) -> Iterator[memoryview]:
    for at in range(0, len(data), size):
        yield data[at:at + size]


def as_float(piece: Piece) -> np.ndarray:
    """A float tensor's values in float64 (bf16: the top half of a float32)."""
    if piece.dtype == "BF16":
        return (np.frombuffer(piece.data, np.uint16).astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return np.frombuffer(piece.data, {"F16": np.float16, "F32": np.float32, "F64": np.float64}[piece.dtype or ""]
                         ).astype(np.float64)


def rms(x: np.ndarray) -> float:
    return math.sqrt(float(np.mean(x * x))) if x.size else 0.0


# ------------------------------------------------------------------------------ codec ratios


@dataclass
class Tally:
    raw: int = 0
    stored: int = 0
    codecs: dict[int, int] = field(default_factory=lambda: defaultdict(int))  # codec -> raw bytes

    def add(self, raw: int, stored: int, codec: int | None = None) -> None:
        self.raw += raw
        self.stored += stored
        if codec is not None:
            self.codecs[codec] += raw

    @property
    def ratio(self) -> float:
        return self.stored / self.raw if self.raw else 0.0

    def mix(self) -> str:
        names = {codecs.RAW: "raw", codecs.PLANES: "planes", codecs.XOR: "xor"}
        total = sum(self.codecs.values()) or 1
        return ", ".join(f"{names[c]} {100 * n / total:.0f}%" for c, n in sorted(self.codecs.items()))


def stored_size(chunk: memoryview, itemsize: int, ref: memoryview | None) -> tuple[int, int]:
    """(stored length, codec) of a chunk as encode stores it; decoded and digest-checked."""
    key = xxhash.xxh3_128_digest(chunk)
    reference = (xxhash.xxh3_128_digest(ref), ref) if ref is not None else None
    value = codecs.encode(chunk, itemsize, reference)
    back = codecs.decode(value, lambda d: ref if ref is not None else b"")
    if xxhash.xxh3_128_digest(back) != key:
        raise SystemExit(f"round trip failed for a chunk of {len(chunk)} bytes (codec {value[0]})")
    return len(value), value[0]


def measure(models: list[Model], chunk_size: int, pool: ThreadPoolExecutor) -> dict:
    """Per-model and family tallies of encode's choices (see the module docstring)."""
    base = models[0]
    base_keys: set[bytes] = set()
    family_keys: set[bytes] = set()
    family, per_model = Tally(), []
    unique_bytes = 0
    buckets: dict[str, Tally] = defaultdict(Tally)
    for i, model in enumerate(models):
        alone = Tally()
        jobs = []
        for key, piece in model.pieces.items():
            base_piece = base.pieces.get(key) if i else None
            same_shape = base_piece is not None and len(base_piece.data) == len(piece.data)
            bucket = None
            if model.kind == "dense" and piece.dtype is not None and same_shape:
                assert base_piece is not None
                b = as_float(base_piece)
                bucket = relative_bucket(rms(as_float(piece) - b) / (rms(b) or 1.0))
            refs = chunks(base_piece.data, chunk_size) if same_shape and base_piece is not None else None
            for chunk in chunks(piece.data, chunk_size):
                ref = next(refs) if refs is not None else None
                digest = xxhash.xxh3_128_digest(chunk)
                new_in_model = digest not in base_keys if i else True
                new_in_family = digest not in family_keys
                family_keys.add(digest)
                if i == 0:
                    base_keys.add(digest)
                if new_in_model or new_in_family:
                    use_ref = ref if ref is not None and bytes(ref) != bytes(chunk) else None
                    jobs.append((pool.submit(stored_size, chunk, piece.itemsize, use_ref), len(chunk),
                                 new_in_model, new_in_family, bucket))
                elif bucket is not None:
                    buckets[bucket].add(len(chunk), 0)
        for future, n, new_in_model, new_in_family, bucket in jobs:
            stored, codec = future.result()
            if new_in_model:
                alone.add(n, stored, codec)
            if new_in_family:
                family.add(n, stored, codec)
                unique_bytes += n
            if bucket is not None:
                buckets[bucket].add(n, stored if new_in_model else 0)
        alone.raw = model.raw  # stored / the folder's bytes: chunks shared with the base cost nothing
        per_model.append(alone)
        log(f"{model.folder.name} ({model.kind}): {alone.ratio:.3f}")
    family.raw = sum(m.raw for m in models)
    return {"models": per_model, "family": family, "buckets": dict(buckets), "unique": len(family_keys),
            "unique_bytes": unique_bytes}


def relative_bucket(rel: float) -> str:
    if rel == 0:
        return "0 (unchanged)"
    e = math.floor(math.log10(rel))
    return f"[1e{e}, 1e{e + 1})"


def sweep(base: Model, chunk_size: int, pool: ThreadPoolExecutor) -> list[tuple[float, float]]:
    """stored / raw of synthetic dense deltas of each relative size in SWEEP, on the first
    SWEEP_BYTES of the base's large tensors: expert = round(base + rel * rms(base) * N(0, 1))."""
    pieces, total = [], 0
    for piece in base.pieces.values():
        if piece.dtype in ("BF16", "F16", "F32") and len(piece.data) >= 4 * chunk_size and total < SWEEP_BYTES:
            pieces.append(piece)
            total += len(piece.data)
    rng = np.random.default_rng(0)
    rows = []
    for rel in SWEEP:
        tally = Tally()
        jobs = []
        for piece in pieces:
            b = as_float(piece)
            e = b + rel * rms(b) * rng.standard_normal(b.size)
            if piece.dtype == "BF16":  # round to nearest even, as torch's cast does
                bits = e.astype(np.float32).view(np.uint32)
                raw = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16).tobytes()
            else:
                raw = e.astype({"F16": np.float16, "F32": np.float32}[piece.dtype or ""]).tobytes()
            for chunk, ref in zip(chunks(memoryview(raw), chunk_size), chunks(piece.data, chunk_size)):
                jobs.append((pool.submit(stored_size, chunk, piece.itemsize, ref), len(chunk)))
        for future, n in jobs:
            tally.add(n, future.result()[0])
        rows.append((rel, tally.ratio))
    return rows


# ------------------------------------------------------------------------------ baselines


def zstd_files(models: list[Model], compressor: zstandard.ZstdCompressor) -> list[int]:
    """Each model's files compressed whole (one frame per file), bytes per model."""
    return [sum(len(compressor.compress(v)) for v in m.files.values()) for m in models]


def zipllm(models: list[Model], compressor: zstandard.ZstdCompressor) -> list[int]:
    """Each model as the ZipLLM recipe without chunking stores it: tensors XOR the base's tensor
    of the same name (the base: no XOR), concatenated per element width, byte planes, zstd per
    plane; headers and other files zstd whole."""
    base = models[0]
    out = []
    for i, model in enumerate(models):
        size = 0
        by_width: dict[int, list[np.ndarray]] = defaultdict(list)
        for key, piece in model.pieces.items():
            if piece.dtype is None:
                size += len(compressor.compress(piece.data))
                continue
            word = codecs.WORDS[piece.itemsize]
            words = np.frombuffer(piece.data, word)
            other = base.pieces.get(key)
            if i and other is not None and len(other.data) == len(piece.data):
                words = words ^ np.frombuffer(other.data, word)
            by_width[piece.itemsize].append(words)
        for width, parts in by_width.items():
            planes = np.concatenate(parts).view(np.uint8).reshape(-1, width).T
            size += sum(len(compressor.compress(np.ascontiguousarray(p))) for p in planes)
        out.append(size)
    return out


ZIPNN_SCRIPT = r"""
import json, struct, sys, zipnn
def tensors(path):  # read afresh for every call: zipnn's compress changes its input buffer in place
    data = open(path, "rb").read()
    (n,) = struct.unpack("<Q", data[:8])
    return data[8 + n:]
files, dtype = json.loads(sys.argv[1]), sys.argv[2]
out = []
for i, path in enumerate(files):
    z = zipnn.ZipNN(input_format="byte", bytearray_dtype=dtype, threads=1)
    alone = len(z.compress(tensors(path)))
    delta = None
    if i:
        zd = zipnn.ZipNN(input_format="byte", bytearray_dtype=dtype, threads=1, delta_compressed_type="byte")
        delta = len(zd.compress(tensors(path), delta_second_data=tensors(files[0])))
    out.append([len(tensors(path)), alone, delta])
print(json.dumps(out))
"""


def zipnn(python: str, models: list[Model], dtype: str) -> list[tuple[int, int, int | None]] | str:
    """ZipNN's sizes of each model's tensor bytes (alone; as a byte delta against the base's),
    or why it was skipped."""
    if not python or not Path(python).exists():
        return "skipped: no --zipnn python (pip install zipnn in a scratch venv)"
    files = [str(next(m.folder.glob("*.safetensors"))) for m in models]
    name = {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}[dtype]
    run = subprocess.run([python, "-c", ZIPNN_SCRIPT, json.dumps(files), name], capture_output=True, text=True)
    if run.returncode:
        return f"skipped: zipnn failed ({run.stderr.strip().splitlines()[-1] if run.stderr.strip() else run.returncode})"
    return [tuple(row) for row in json.loads(run.stdout.strip().splitlines()[-1])]


# ------------------------------------------------------------------------------ throughput


def rates(items: list[tuple[memoryview, int, memoryview | None]], repeat: int) -> tuple[str, list[float]]:
    """(codecs encode chose, MB/s of [encode, decode, xxh3-128, copy]) of the chunks `items`
    (chunk, itemsize, reference or None), one thread, the four interleaved, median of `repeat`."""
    refs = [(xxhash.xxh3_128_digest(r), r) if r is not None else None for _, _, r in items]
    values = [codecs.encode(c, k, ref) for (c, k, _), ref in zip(items, refs)]
    lookup = {ref[0]: ref[1] for ref in refs if ref is not None}
    chosen: dict[int, int] = defaultdict(int)
    for v in values:
        chosen[v[0]] += 1
    steps: list[Callable[[], object]] = [
        lambda: [codecs.encode(c, k, ref) for (c, k, _), ref in zip(items, refs)],
        lambda: [codecs.decode(v, lookup.__getitem__) for v in values],
        lambda: [xxhash.xxh3_128_digest(c) for c, _, _ in items],
        lambda: [bytes(c) for c, _, _ in items],
    ]
    times: list[list[float]] = [[] for _ in steps]
    for _ in range(repeat):
        for step, runs in zip(steps, times):
            t0 = time.perf_counter()
            step()
            runs.append(time.perf_counter() - t0)
    nbytes = sum(len(c) for c, _, _ in items)
    names = {codecs.RAW: "raw", codecs.PLANES: "planes", codecs.XOR: "xor"}
    return (", ".join(f"{names[c]} {n}" for c, n in sorted(chosen.items())),
            [nbytes / statistics.median(runs) / 1e6 for runs in times])


def throughput(models: list[Model], chunk_size: int, repeat: int) -> list[tuple[str, float, float, float, float]]:
    """(what, encode MB/s, decode MB/s, xxh3 MB/s, copy MB/s), single thread, on SAMPLE_CHUNKS
    whole chunks spread evenly over the tensors: PLANES on the base's, XOR on the first dense
    expert's against the base's."""
    base = models[0]
    dense = next((m for m in models[1:] if m.kind == "dense"), None)
    full = [(key, start) for key, p in base.pieces.items() if p.dtype is not None
            for start in range(0, len(p.data) - chunk_size + 1, chunk_size)]
    at = full[::max(1, len(full) // SAMPLE_CHUNKS)][:SAMPLE_CHUNKS]

    def cut(model: Model, key: str, start: int) -> memoryview:
        return model.pieces[key].data[start:start + chunk_size]

    cases = [("PLANES", [(cut(base, key, start), base.pieces[key].itemsize, None) for key, start in at])]
    if dense is not None:
        cases.append(("XOR", [(cut(dense, key, start), base.pieces[key].itemsize, cut(base, key, start))
                              for key, start in at]))
    rows = []
    for label, items in cases:
        chosen, (enc, dec, hsh, cpy) = rates(items, repeat)
        rows.append((f"{label} ({len(items)} chunks; encode chose {chosen})", enc, dec, hsh, cpy))
    return rows


# ------------------------------------------------------------------------------ report


def report(args: argparse.Namespace, models: list[Model], m: dict, zf: list[int], z3: list[int], zl: list[int],
           zn: list[tuple[int, int, int | None]] | str, sw: list[tuple[float, float]], tp: list) -> str:
    raw = [model.raw for model in models]
    lines = [
        f"Family: `tools/make_family.py --params {args.params} --experts {args.experts} --dtype {args.dtype}` "
        f"(kinds cycle dense, partial, lora), {len(models)} models, {sum(raw) / 2**30:.2f} GiB; chunks of "
        f"{args.chunk_size} bytes, {m['unique']} unique. Ratios are stored / raw bytes (lower is better).",
        "",
        "| model | kind | raw MiB | codecs (per chunk, dedup vs base) | chosen | zstd whole file (codecs' params) "
        "| zstd -3 whole file | ZipLLM recipe (whole-file XOR + planes + zstd) | ZipNN alone | ZipNN byte delta |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, (model, tally) in enumerate(zip(models, m["models"])):
        zn_alone = zn_delta = "-"
        if not isinstance(zn, str):
            n, alone, delta = zn[i]
            zn_alone = f"{(alone + raw[i] - n) / raw[i]:.3f}"  # headers and other files counted raw
            zn_delta = f"{(delta + raw[i] - n) / raw[i]:.3f}" if delta is not None else "-"
        lines.append(f"| {model.folder.name} | {model.kind} | {raw[i] / 2**20:.1f} | **{tally.ratio:.3f}** | "
                     f"{tally.mix()} | {zf[i] / raw[i]:.3f} | {z3[i] / raw[i]:.3f} | {zl[i] / raw[i]:.3f} | "
                     f"{zn_alone} | {zn_delta} |")
    fam = m["family"]
    lines += [
        f"| **family** | all | {sum(raw) / 2**20:.1f} | **{fam.ratio:.3f}** | {fam.mix()} | "
        f"{sum(zf) / sum(raw):.3f} | {sum(z3) / sum(raw):.3f} | {sum(zl) / sum(raw):.3f} | "
        + (f"{sum(a + r - n for (n, a, _), r in zip(zn, raw)) / sum(raw):.3f} | "
           f"{sum((d if d is not None else a) + r - n for (n, a, d), r in zip(zn, raw)) / sum(raw):.3f} |"
           if not isinstance(zn, str) else "- | - |"),
    ]
    lines.append(f"| family, chunk dedup only (all RAW) | all | {sum(raw) / 2**20:.1f} | "
                 f"{m['unique_bytes'] / sum(raw):.3f} | | | | | | |")
    dense = [t for model, t in zip(models, m["models"]) if model.kind == "dense"]
    if dense:
        lines.append(f"| dense experts | dense | {sum(t.raw for t in dense) / 2**20:.1f} | "
                     f"**{sum(t.stored for t in dense) / sum(t.raw for t in dense):.3f}** | | | | | | |")
    if isinstance(zn, str):
        lines += ["", f"ZipNN: {zn}."]
    lines += ["", "Dense experts by relative delta size of each tensor (RMS(expert - base) / RMS(base)):", "",
              "| relative delta | raw MiB | stored / raw |", "|---|---|---|"]
    for bucket, tally in sorted(m["buckets"].items(), key=lambda kv: kv[0]):
        lines.append(f"| {bucket} | {tally.raw / 2**20:.1f} | {tally.ratio:.3f} |")
    lines += ["", f"Synthetic dense deltas on {SWEEP_BYTES >> 20} MiB of base tensors "
              "(expert = base + rel × RMS(base) × N(0, 1), rounded to the dtype), per chunk, vs the base:", "",
              "| relative delta | " + " | ".join(f"{r:g}" for r, _ in sw) + " |",
              "|---|" + "---|" * len(sw),
              "| stored / raw | " + " | ".join(f"{x:.3f}" for _, x in sw) + " |"]
    lines += ["", f"Throughput, one thread, MB/s of raw bytes (median of {args.repeat}), {args.dtype}:", "",
              "| codec | encode | decode | xxh3-128 (baseline) | copy (baseline) | encode / xxh3 | decode / xxh3 |",
              "|---|---|---|---|---|---|---|"]
    for what, enc, dec, hsh, cpy in tp:
        lines.append(f"| {what} | {enc:.0f} | {dec:.0f} | {hsh:.0f} | {cpy:.0f} | {hsh / enc:.1f}× slower "
                     f"| {hsh / dec:.1f}× slower |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "codecs")
    ap.add_argument("--params", default="250M")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--dtype", choices=("bf16", "f16", "f32"), default="bf16")
    ap.add_argument("--chunk-size", type=int, default=1 << 20)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--zipnn", default="", help="a python with zipnn installed (else ZipNN is skipped)")
    ap.add_argument("--out", type=Path, help="also write the table here")
    ap.add_argument("--clean", action="store_true", help="delete the generated family at exit")
    args = ap.parse_args()
    # malloc tuned as in every process that opens a store (env.py): without it each decoded chunk's
    # fresh buffers are new mappings, faulted in page by page (decode measured 1.4× slower)
    _keep_dirty_pages_in_the_heap()
    paths = family(args.work, args.params, args.experts, args.dtype)
    models = [load(p) for p in paths]
    try:
        with ThreadPoolExecutor(WORKERS) as pool:
            log("encoding every chunk")
            m = measure(models, args.chunk_size, pool)
            log("synthetic delta sweep")
            sw = sweep(models[0], args.chunk_size, pool)
        log("throughput")
        tp = throughput(models, args.chunk_size, args.repeat)
        log("baselines: zstd per file")
        fast = zstandard.ZstdCompressor(compression_params=codecs.ZSTD_PARAMS)
        zf = zstd_files(models, fast)
        z3 = zstd_files(models, zstandard.ZstdCompressor(level=3))
        log("baseline: ZipLLM recipe")
        zl = zipllm(models, fast)
        log("baseline: ZipNN")
        zn = zipnn(args.zipnn, models, args.dtype)
        text = report(args, models, m, zf, z3, zl, zn, sw, tp)
    finally:
        for model in models:
            model.close()
        if args.clean:
            shutil.rmtree(paths[0].parent, ignore_errors=True)
    print(text, end="")
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
