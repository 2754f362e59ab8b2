"""Fused kernels for the task-arithmetic family and its radix passes, in float32 compute.

The eager methods (task_arithmetic.py, sparsify.py, radix.py) make one torch pass per step over
K × block elements and keep a float32 temporary per step. These kernels do the same arithmetic in
one pass over the stored inputs (bfloat16 or float32 bit patterns, decoded per element), with no
K × block float32 temporary, and release the GIL, so the executor's workers keep every core busy.

They are numba functions compiled once per machine (`cache=True` keeps the machine code next to
this file, or in numba's user cache), chosen over torch.compile (needs a C++ compiler at run time)
and a compiled extension (a build step per platform) by measurement: docs/benchmarks.md.

Bit-identity with the eager path is the contract: every operation is the eager one, in float32,
in its order, and every sum over the inputs follows torch's CPU summation order (a cascade of
16-element levels over the inputs for the vectorised columns; four interleaved accumulators for
the last columns of a block, which torch sums one by one). Where a block's columns are split
between those paths depends on the machine's vector width, so `available()` finds the split by
comparing with torch on this machine once, and turns the kernels off if no split reproduces it.
The split found is kept in the user's cache (`width_cache`), keyed by the versions of torch and
numpy and the processor's features, so a later merge need not import torch to know it: one
whose blocks all run here never imports torch (1 s of start-up), and its float32 output is
rounded to bfloat16 here too (`to_bfloat16`, torch's rounding).
"""

from __future__ import annotations

import functools
import json
import os
import platform
from importlib import metadata
from pathlib import Path

import numba
import numpy as np

from ..lazytorch import torch

# torch sums very narrow blocks differently again; such blocks (a handful of elements) stay eager
MIN_COLUMNS = 32
DISABLE_ENV = "MPSTORE_NO_KERNELS"  # set to 1 for the eager path (A/B benchmarks, debugging)
ENABLED = os.environ.get(DISABLE_ENV, "") in ("", "0")  # tests compare both paths by setting it
NO_TIE_LIMIT = 1 << 62  # a tie range without an upper end
MODE_WHOLE, MODE_TOPK, MODE_CRUMBS, MODE_MASK = 0, 1, 2, 3

_jit = functools.partial(numba.njit, nogil=True, cache=True, error_model="numpy")


@_jit(inline="always")
def _f32(bits: int, shift: int) -> float:
    """The float32 of a stored element: bfloat16 bits (shift 16) or float32 bits (shift 0)."""
    return np.uint32(np.uint32(bits) << shift).view(np.float32)


@_jit(inline="always")
def _column_cascade(v: np.ndarray, k: int, m: int, acc: np.ndarray, out: np.ndarray) -> None:
    """torch's CPU sum over the k rows of v[:, :m] in its vectorised columns: four levels of
    16-row partial sums (`acc` is [4, >= m] scratch). Loops run over contiguous row views, which
    the compiler vectorises."""
    for level in range(4):
        acc[level, :m] = 0
    a0 = acc[0, :m]
    i = 0
    while i + 16 <= k:
        for _ in range(16):
            row = v[i, :m]
            for j in range(m):
                a0[j] += row[j]
            i += 1
        for level in range(1, 4):
            lower = acc[level - 1, :m]
            upper = acc[level, :m]
            for j in range(m):
                upper[j] += lower[j]
                lower[j] = 0
            if i & (15 << (4 * level)):
                break
    while i < k:
        row = v[i, :m]
        for j in range(m):
            a0[j] += row[j]
        i += 1
    a1 = acc[1, :m]
    a2 = acc[2, :m]
    a3 = acc[3, :m]
    o = out[:m]
    for j in range(m):
        o[j] = ((a0[j] + a1[j]) + a2[j]) + a3[j]


@_jit(inline="always")
def _rows_cascade(v: np.ndarray, j: int, start: int, stride: int, size: int) -> float:
    """The same cascade over `size` rows start, start+stride, ... of column j."""
    a = np.zeros(4, np.float32)
    i = 0
    while i + 16 <= size:
        for _ in range(16):
            a[0] += v[start + i * stride, j]
            i += 1
        for level in range(1, 4):
            a[level] += a[level - 1]
            a[level - 1] = 0
            if i & (15 << (4 * level)):
                break
    while i < size:
        a[0] += v[start + i * stride, j]
        i += 1
    return ((a[0] + a[1]) + a[2]) + a[3]


@_jit(inline="always")
def _tail_sum(v: np.ndarray, j: int, k: int) -> float:
    """torch's sum over the k rows of column j in a block's last (not vectorised) columns: four
    accumulators over groups of four rows, the leftover rows into the first."""
    q = k // 4
    p0 = _rows_cascade(v, j, 0, 4, q)
    p1 = _rows_cascade(v, j, 1, 4, q)
    p2 = _rows_cascade(v, j, 2, 4, q)
    p3 = _rows_cascade(v, j, 3, 4, q)
    for i in range(q * 4, k):
        p0 += v[i, j]
    return ((p0 + p1) + p2) + p3


@_jit(inline="always")
def _sums(v: np.ndarray, k: int, m: int, vectorised: int, acc: np.ndarray, out: np.ndarray) -> None:
    """Column sums of v[:k, :m] as torch gives them, columns from `vectorised` on in the tail's order."""
    _column_cascade(v, k, m, acc, out)
    for j in range(max(0, vectorised), m):
        out[j] = _tail_sum(v, j, k)


@_jit
def _column_sums(x: np.ndarray, width: int, out: np.ndarray) -> None:
    k, n = x.shape
    _sums(x, k, n, n - n % width, np.empty((4, n), np.float32), out)


def column_sums(x: np.ndarray, width: int) -> np.ndarray:
    """Column sums of a float32 [k, n] array in torch's order, its first n - n % width columns
    summed as torch's vectorised loop does: what `available` compares with torch."""
    out = np.empty(x.shape[1], np.float32)
    _column_sums(x, width, out)
    return out


@_jit(inline="always")
def _tied(a: float, thr: float, r: int, c: int, count: np.ndarray, before: np.ndarray,
          first: np.ndarray, last: np.ndarray) -> bool:
    """An entry equal to cut c of row r: kept if its position among the tensor's entries equal to
    that cut (index order) is within [first, last]; counts it either way."""
    if a != thr:
        return False
    count[r, c] += 1
    pos = before[r, c] + count[r, c]
    return first[r, c] <= pos <= last[r, c]


TILE = 512  # columns per step: the [k, TILE] float32 working rows stay in the core's cache


@_jit
def _combine(base: np.ndarray, models: np.ndarray, shift: int, w: np.ndarray, mode: np.ndarray,
             hi: np.ndarray, lo: np.ndarray, before: np.ndarray, first: np.ndarray, last: np.ndarray,
             mask: np.ndarray, scale: np.ndarray, scaled: bool, consensus: bool, normalize: bool,
             divisor: float, lam: float, scaled_by_lambda: bool, width: int, out: np.ndarray) -> None:
    k, n = models.shape
    v = np.empty((k, TILE), np.float32)  # weighted kept deltas
    agreeing = np.empty((k, TILE), np.float32)  # consensus: weight of each agreeing delta
    d_tile = np.empty(TILE, np.float32)
    f_tile = np.empty(TILE, np.float32)  # 1 where an entry is kept, else 0
    b_tile = np.empty(TILE, np.float32)
    total = np.empty(TILE, np.float32)
    mixed = np.empty(TILE, np.float32)
    div = np.empty(TILE, np.float32)
    acc = np.empty((4, TILE), np.float32)
    count = np.zeros((k, 2), np.int64)
    one = np.float32(1)
    zero = np.float32(0)
    main = n - n % width
    for t0 in range(0, n, TILE):
        m = min(TILE, n - t0)
        b = b_tile[:m]
        d = d_tile[:m]
        f = f_tile[:m]
        src = base[t0:t0 + m]
        for j in range(m):
            b[j] = _f32(src[j], shift)
        for r in range(k):
            src = models[r, t0:t0 + m]
            vr = v[r, :m]
            wr = w[r]
            for j in range(m):
                d[j] = _f32(src[j], shift) - b[j]
            md = mode[r]
            if md == MODE_WHOLE:
                for j in range(m):
                    vr[j] = d[j] * wr
                continue
            ties = 0
            h = hi[r]
            low = lo[r]
            if md == MODE_TOPK:
                for j in range(m):
                    a = abs(d[j])
                    f[j] = one if a > h else zero
                    ties += a == h
            elif md == MODE_CRUMBS:  # strictly inside the cuts; the tied are settled below
                for j in range(m):
                    a = abs(d[j])
                    f[j] = one if (a > low) & (a < h) else zero
                    ties += (a == h) | (a == low)
            else:
                keep = mask[r, t0:t0 + m]
                for j in range(m):
                    f[j] = one if keep[j] != 0 else zero
            factor = scale[r] if scaled else one
            if scaled:
                for j in range(m):
                    vr[j] = ((d[j] * f[j]) * factor) * wr
            else:
                for j in range(m):
                    vr[j] = (d[j] * f[j]) * wr
            if ties:  # in index order: an entry's place among the tied decides
                for j in range(m):
                    a = abs(d[j])
                    at_hi = _tied(a, h, r, 0, count, before, first, last)
                    at_lo = md == MODE_CRUMBS and h != low and _tied(a, low, r, 1, count, before, first, last)
                    if at_hi or at_lo:
                        kept = d[j] * one
                        if scaled:
                            kept = kept * factor
                        vr[j] = kept * wr
        _sums(v, k, m, main - t0, acc, total)
        if consensus:
            tot = total[:m]
            for r in range(k):
                vr = v[r, :m]
                ag = agreeing[r, :m]
                wr = w[r]
                for j in range(m):
                    x = vr[j]
                    agree = x > zero if tot[j] >= zero else x < zero
                    ag[j] = (one if agree else zero) * wr
                    vr[j] = x if agree else zero
            _sums(v, k, m, main - t0, acc, mixed)
            _sums(agreeing, k, m, main - t0, acc, div)
            dv = div[:m]
            for j in range(m):
                dv[j] = one if dv[j] == zero else dv[j]
        else:
            mixed[:m] = total[:m]
            div[:m] = divisor
        mx = mixed[:m]
        dv = div[:m]
        o = out[t0:t0 + m]
        for j in range(m):
            x = mx[j]
            if normalize:
                x = x / dv[j]
            if scaled_by_lambda:
                x = x * lam
            o[j] = b[j] + x


SCAN = 2048  # elements whose magnitude bits are computed (vectorised) before they are counted


@_jit(inline="always")
def _magnitude_bits(base: np.ndarray, row: np.ndarray, shift: int, t0: int, bits: np.ndarray) -> int:
    """The float32 bits of |row - base| (they order like the magnitude) for elements
    [t0, t0 + SCAN) into `bits`; returns how many there were."""
    m = min(SCAN, row.shape[0] - t0)
    r = row[t0:t0 + m]
    b = base[t0:t0 + m]
    out = bits[:m]
    for j in range(m):
        out[j] = np.float32(abs(_f32(r[j], shift) - _f32(b[j], shift))).view(np.uint32)
    return m


@_jit
def _high_hist(base: np.ndarray, row: np.ndarray, shift: int, hist: np.ndarray) -> None:
    bits = np.empty(SCAN, np.uint32)
    for t0 in range(0, row.shape[0], SCAN):
        for j in range(_magnitude_bits(base, row, shift, t0, bits)):
            hist[bits[j] >> np.uint32(16)] += 1


@_jit
def _low_hist(base: np.ndarray, row: np.ndarray, shift: int, high: int, hist: np.ndarray) -> None:
    want = np.uint32(high)
    bits = np.empty(SCAN, np.uint32)
    for t0 in range(0, row.shape[0], SCAN):
        for j in range(_magnitude_bits(base, row, shift, t0, bits)):
            x = bits[j]
            if np.uint32(x >> np.uint32(16)) == want:
                hist[np.uint32(x & np.uint32(0xFFFF))] += 1


@_jit
def _count_equal(base: np.ndarray, row: np.ndarray, shift: int, value: float) -> int:
    n = 0
    for j in range(row.shape[0]):
        if abs(_f32(row[j], shift) - _f32(base[j], shift)) == value:
            n += 1
    return n


def _matches(x: np.ndarray, want: np.ndarray, width: int) -> bool:
    return bool(np.array_equal(column_sums(x, width).view(np.uint32), want))


def width_cache() -> Path:
    """Where the split found on this machine is kept ($XDG_CACHE_HOME or ~/.cache)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mpstore" / "kernel-width.json"


def _machine() -> str:
    """What torch's summation order depends on: its version, numpy's (the kernels' inputs), the
    processor's features and the capability torch is told to use."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = next((line.split(":", 1)[1] for line in f if line.startswith("flags")), "")
    except OSError:
        flags = ""
    features = " ".join(sorted(flags.split())) or f"{platform.machine()} {platform.processor()}"
    return json.dumps([metadata.version("torch"), np.__version__, os.environ.get("ATEN_CPU_CAPABILITY", ""),
                       features])


@functools.cache
def _calibration() -> tuple[int | None, int | None]:
    """(width, lanes): how many leading columns of a block torch sums vectorised, as a multiple
    of `width` (None: no split reproduces torch's sums here, the kernels stay off), and the lanes
    of torch's vectorised sum of one contiguous row (`vector_sum`; None: not reproduced). From
    the cache, else measured against torch and kept there (a cache that cannot be written is
    measured again next time)."""
    path, machine = width_cache(), _machine()
    known: dict = {}
    try:
        loaded = json.loads(path.read_text())
        known = loaded if isinstance(loaded, dict) else {}
        found = known.get(machine)
        if isinstance(found, list) and len(found) == 2 and all(v is None or isinstance(v, int) for v in found):
            return found[0], found[1]
    except (OSError, ValueError):
        pass
    width, lanes = _measured()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps({**known, machine: [width, lanes]}))
        os.replace(tmp, path)
    except OSError:
        pass
    return width, lanes


def _measured() -> tuple[int | None, int | None]:
    """The calibration, measured: sums of random blocks and rows against torch's."""
    rng = np.random.default_rng(12)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        def case(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
            x = (rng.standard_normal(shape) * np.exp(rng.standard_normal(shape) * 3)).astype(np.float32)
            return x, torch.from_numpy(x).sum(dim=0).numpy().view(np.uint32)

        cases = [case((k, 4096 + 63)) for k in (3, 5, 6, 7, 8, 13, 17, 40)]  # every column path
        width = next((w for w in (32, 16, 64, 8) if all(_matches(x, want, w) for x, want in cases)), None)
        rows = [case((k, 1)) for k in range(1, 80) for _ in range(20)]
        lanes = next((n for n in (8, 16, 4) if all(
            np.array([vector_sum(x[:, 0], n)]).view(np.uint32)[0] == want[0] for x, want in rows)), None)
        return width, lanes
    finally:
        torch.set_num_threads(torch_threads)


def vector_sum(x: np.ndarray, lanes: int) -> np.float32:
    """torch's sum of a contiguous float32 row (a [k, 1] tensor summed over dim 0): fewer than
    `lanes` elements one by one in four interleaved accumulators (the order `column_sums` gives
    a block's last columns); more as that many lanes (each lane's elements in the same order),
    the leftover elements then the lanes added one by one."""
    n = x.size
    whole = 1 << 30  # a width no block reaches: every column summed in the tail's order
    if n < lanes:
        return np.float32(column_sums(x.reshape(-1, 1), whole)[0])
    vectors = n // lanes
    total = np.float32(0)
    for v in (*x[vectors * lanes:], *column_sums(x[:vectors * lanes].reshape(vectors, lanes), whole)):
        total = np.float32(total + v)
    return total


def _width() -> int | None:
    return _calibration()[0]


def sum_lanes() -> int | None:
    """The lanes `vector_sum` reproduces torch with here, or None."""
    return _calibration()[1]


def available() -> bool:
    """The kernels are on and reproduce torch's float32 sums on this machine (checked once)."""
    return ENABLED and _width() is not None


def width() -> int:
    found = _width()
    if found is None:
        raise AssertionError("kernels used where available() is False")
    return found


def combine(base: np.ndarray, models: np.ndarray, shift: int, w: np.ndarray, mode: np.ndarray,
            hi: np.ndarray, lo: np.ndarray, before: np.ndarray, first: np.ndarray, last: np.ndarray,
            mask: np.ndarray, scale: np.ndarray | None, consensus: bool, normalize: bool,
            divisor: float, lam: float) -> np.ndarray:
    """base + the (sparsified, weighted, consensus-filtered, normalised, lambda-scaled) mix of the
    deltas, in one pass over the block; per-row arguments as `sparsify.KernelRows` describes them
    (`TaskArithmetic._fused` makes them). Without `scale` no rescale multiply is made at all (the
    kernel still takes an array there: the weights stand in, unread)."""
    out = np.empty(models.shape[1], np.float32)
    _combine(base, models, shift, w, mode, hi, lo, before, first, last, mask,
             scale if scale is not None else w, scale is not None, consensus, normalize,
             np.float32(divisor), np.float32(lam), lam != 1, width(), out)
    return out


@_jit
def _bfloat16(values: np.ndarray, out: np.ndarray) -> bool:
    """out[i] = values[i] rounded to bfloat16 as torch rounds (to nearest, ties to even); False
    at the first NaN, whose pattern torch's vectorised and scalar paths make differently."""
    bits = values.view(np.uint32)
    for i in range(bits.size):
        b = bits[i]
        if (b & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
            return False
        out[i] = np.uint16((b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))
    return True


def to_bfloat16(values: np.ndarray) -> np.ndarray | None:
    """float32 values as bfloat16 bit patterns (uint16), bit for bit torch's `.to(torch.bfloat16)`,
    or None where a value is NaN (the caller converts with torch)."""
    out = np.empty(values.size, np.uint16)
    return out if _bfloat16(values, out) else None


def high_histogram(base: np.ndarray, row: np.ndarray, shift: int) -> np.ndarray:
    """The radix HIGH_BITS histogram of one input's |delta| (float32 bits >> 16)."""
    hist = np.zeros(1 << 16, np.int64)
    _high_hist(base, row, shift, hist)
    return hist


def low_histogram(base: np.ndarray, row: np.ndarray, shift: int, high: int) -> np.ndarray:
    """The radix LOW_BITS histogram of the entries of |delta| whose high bits are `high`."""
    hist = np.zeros(1 << 16, np.int64)
    _low_hist(base, row, shift, high, hist)
    return hist


def count_equal(base: np.ndarray, row: np.ndarray, shift: int, value: float) -> int:
    """Entries of |delta| equal to `value` (a radix cut)."""
    return int(_count_equal(base, row, shift, np.float32(value)))
