"""The compiled passes of the chunk codecs (store.codecs): elements to byte planes and back.

Each step is a plain loop over contiguous arrays that LLVM vectorises (5-10 GB/s per core for
1 MiB chunks), generic over the element width (the arrays' integer dtype: numba compiles one
version per width, cached on disk), and releases the GIL, so threads encode and decode on every
core. Merging planes runs 2-4x faster than numpy's passes (store.numpyplanes), which is worth
it only where numba is loaded already: store.codecs chooses, and only it imports this module.
"""

from __future__ import annotations

import numba
import numpy as np

from .codecs import ROTATE

_jit = numba.njit(nogil=True, cache=True, error_model="numpy")


@_jit
def _forward(words: np.ndarray, ref: np.ndarray, transform: int, t: np.ndarray) -> None:
    """t[i] = transform(words[i], ref[i]), in the words' width: numba widens narrow integers
    in arithmetic, so each step is cast back, which is what makes the difference wrap."""
    n = words.size
    word = words.dtype.type
    one, top, zero = word(1), word(8 * words.itemsize - 1), word(0)
    if transform == ROTATE:  # else ZIGZAG_DIFF (codecs.decode admits no other)
        if ref.size:
            for i in range(n):
                w = word(words[i] ^ ref[i])
                t[i] = (w << one) | (w >> top)
        else:
            for i in range(n):
                w = words[i]
                t[i] = (w << one) | (w >> top)
    else:
        if ref.size:
            for i in range(n):
                d = word(words[i] - ref[i])
                t[i] = word(d << one) ^ word(zero - (d >> top))
        else:
            for i in range(n):
                d = words[i]
                t[i] = word(d << one) ^ word(zero - (d >> top))


@_jit
def split(words: np.ndarray, ref: np.ndarray, transform: int, out: np.ndarray) -> None:
    """out[j * n + i] = byte j of t(words[i], ref[i]), for n = words.size elements of k bytes:
    plane j holds byte j of every element. `ref` is empty for no reference (r = 0)."""
    n = words.size
    t = np.empty_like(words)
    _forward(words, ref, transform, t)
    for j in range(words.itemsize):
        s = words.dtype.type(8 * j)
        p = out[j * n:(j + 1) * n]
        for i in range(n):
            p[i] = np.uint8(t[i] >> s)


@_jit
def merge(planes: tuple[np.ndarray, ...], ref: np.ndarray, transform: int, words: np.ndarray) -> None:
    """The inverse of `split`: words[i] from byte i of each plane (planes[j] holds byte j)."""
    n = words.size
    one = words.dtype.type(1)
    top = words.dtype.type(8 * words.itemsize - 1)
    zero = words.dtype.type(0)
    p0 = planes[0]
    for i in range(n):
        words[i] = p0[i]
    j = 0
    for p in planes:
        if j:
            s = words.dtype.type(8 * j)
            for i in range(n):
                words[i] |= words.dtype.type(p[i]) << s
        j += 1
    if transform == ROTATE:
        if ref.size:
            for i in range(n):
                t = words[i]
                words[i] = ((t >> one) | (t << top)) ^ ref[i]
        else:
            for i in range(n):
                t = words[i]
                words[i] = (t >> one) | (t << top)
    else:
        if ref.size:
            for i in range(n):
                t = words[i]
                words[i] = ((t >> one) ^ (zero - (t & one))) + ref[i]
        else:
            for i in range(n):
                t = words[i]
                words[i] = (t >> one) ^ (zero - (t & one))
