"""The delta catalog's measurement of one chunk pair in one compiled pass (see catalog.measure).

numpy needed a pass per statistic (difference, magnitude, histogram, two float64 squares, sums,
maxima), each with a temporary: about 4 ms per 1 MiB chunk, which made `mp add --base` several
times slower than the add itself. This kernel does the elementwise work in one pass and the two
float64 sums of squares in numpy's own order (pairwise summation: 8 interleaved accumulators
over blocks of at most 128 elements, halves split at multiples of 8, added to the identity 0),
so every number is the one numpy gave bit for bit (tests/test_add_speed.py compares them). It
releases the GIL, so `mp add` measures on every core while it reads and writes.

It imports numba, so only catalog.measure imports it, when it first measures.
"""

from __future__ import annotations

import numba
import numpy as np

PAIRWISE_BLOCK = 128  # numpy's PW_BLOCKSIZE
MAX_DEPTH = 64  # halvings: far more than any array has
_jit = numba.njit(nogil=True, cache=True, error_model="numpy")


@_jit
def _leaf(x: np.ndarray, lo: int, n: int) -> float:
    """numpy's pairwise_sum for n <= PAIRWISE_BLOCK elements (of the squares)."""
    if n < 8:
        res = 0.0
        for i in range(lo, lo + n):
            v = np.float64(x[i])
            res += v * v
        return res
    a, b, c, d = np.float64(x[lo]), np.float64(x[lo + 1]), np.float64(x[lo + 2]), np.float64(x[lo + 3])
    e, f, g, h = np.float64(x[lo + 4]), np.float64(x[lo + 5]), np.float64(x[lo + 6]), np.float64(x[lo + 7])
    r0, r1, r2, r3, r4, r5, r6, r7 = a * a, b * b, c * c, d * d, e * e, f * f, g * g, h * h
    i = lo + 8
    whole = lo + n - n % 8
    while i < whole:
        a, b, c, d = np.float64(x[i]), np.float64(x[i + 1]), np.float64(x[i + 2]), np.float64(x[i + 3])
        e, f, g, h = np.float64(x[i + 4]), np.float64(x[i + 5]), np.float64(x[i + 6]), np.float64(x[i + 7])
        r0 += a * a
        r1 += b * b
        r2 += c * c
        r3 += d * d
        r4 += e * e
        r5 += f * f
        r6 += g * g
        r7 += h * h
        i += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < lo + n:
        v = np.float64(x[i])
        res += v * v
        i += 1
    return res


@_jit
def _sum_squares(x: np.ndarray) -> float:
    """Σ float64(x[i])² in numpy's order (np.square(x, dtype=np.float64).sum()): halves split at
    a multiple of 8 until a block has at most PAIRWISE_BLOCK elements, each block summed by
    `_leaf`, the halves' sums added, the total added to 0. The recursion runs on an explicit
    stack (numba's cache does not keep recursive functions reliably)."""
    lo = np.zeros(MAX_DEPTH, dtype=np.int64)
    size = np.zeros(MAX_DEPTH, dtype=np.int64)
    stage = np.zeros(MAX_DEPTH, dtype=np.int64)
    left = np.zeros(MAX_DEPTH, dtype=np.float64)
    size[0] = x.size
    depth = 0
    ret = 0.0
    while depth >= 0:
        n = size[depth]
        if n <= PAIRWISE_BLOCK:
            ret = _leaf(x, lo[depth], n)
            depth -= 1
            continue
        half = n // 2
        half -= half % 8
        if stage[depth] == 0:  # first the left half
            stage[depth] = 1
            lo[depth + 1], size[depth + 1], stage[depth + 1] = lo[depth], half, 0
            depth += 1
        elif stage[depth] == 1:  # left done: the right half
            left[depth] = ret
            stage[depth] = 2
            lo[depth + 1], size[depth + 1], stage[depth + 1] = lo[depth] + half, n - half, 0
            depth += 1
        else:
            ret = left[depth] + ret
            depth -= 1
    return 0.0 + ret


@_jit
def delta_stats(expert: np.ndarray, base: np.ndarray, hist: np.ndarray,
                mag: np.ndarray) -> tuple[float, float, int, float, float]:
    """(Σ|Δ|², max |Δ|, count of Δ ≠ 0, max |base|, Σ base²) of two float32 arrays, and `hist`
    (int64[65536], zeroed here) counting the high 16 bits of float32 |Δ|. `mag`: room for |Δ|
    (float32, at least as long; a caller's buffer, reused from chunk to chunk).

    Maxima are taken over bit patterns: for numbers without a sign bit the order of the
    patterns is the order of the values, and a NaN's pattern is above infinity's, so a NaN
    makes the maximum NaN, as numpy's max does; integer loops also vectorise."""
    n = expert.size
    mag = mag[:n]
    for i in range(n):
        mag[i] = np.abs(expert[i] - base[i])
    hist[:] = 0
    top = np.uint32(0)
    changed = 0
    for bits in mag.view(np.uint32):
        hist[bits >> 16] += 1
        top = max(top, bits)
        changed += bits != 0  # |Δ| has no sign bit: only +0 has all bits clear
    base_top = np.uint32(0)
    for bits in base.view(np.uint32):
        base_top = max(base_top, bits & np.uint32(0x7FFFFFFF))
    return _sum_squares(mag), _as_float32(top), changed, _as_float32(base_top), _sum_squares(base)


@_jit
def _as_float32(bits: int) -> float:
    one = np.empty(1, dtype=np.uint32)
    one[0] = bits
    return one.view(np.float32)[0]


@_jit
def bf16_to_float32(raw: np.ndarray, out: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) as float32 values (the top half of a float32), written
    into `out` (uint32, at least as long): its first raw.size elements, as float32."""
    out = out[:raw.size]
    for i in range(raw.size):
        out[i] = np.uint32(raw[i]) << 16
    return out.view(np.float32)
