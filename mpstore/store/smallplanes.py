"""The plane passes of store.planekernel in numpy, for small chunks: byte for byte the same
planes and words, whole-array steps instead of compiled loops. numpy's passes are slower per
byte, but a small chunk is decoded long before numba (which the compiled passes import) would
have loaded: a process that reads only small chunks never pays for it (store.codecs chooses)."""

from __future__ import annotations

import numpy as np

from .codecs import ROTATE


def split(words: np.ndarray, ref: np.ndarray, transform: int, out: np.ndarray) -> None:
    """As planekernel.split: plane j of `out` holds byte j of every transformed element."""
    word = words.dtype.type
    one, top = word(1), word(8 * words.itemsize - 1)
    if transform == ROTATE:
        w = words ^ ref if ref.size else words
        t = (w << one) | (w >> top)
    else:
        d = words - ref if ref.size else words  # unsigned: wraps, as the compiled pass
        t = (d << one) ^ (word(0) - (d >> top))
    n = words.size
    for j in range(words.itemsize):
        out[j * n:(j + 1) * n] = (t >> word(8 * j)).astype(np.uint8)


def merge(planes: tuple[np.ndarray, ...], ref: np.ndarray, transform: int, words: np.ndarray) -> None:
    """As planekernel.merge: the words from their planes, the transform undone."""
    word = words.dtype.type
    one, top = word(1), word(8 * words.itemsize - 1)
    t = planes[0].astype(words.dtype)
    for j, p in enumerate(planes[1:], 1):
        t |= p.astype(words.dtype) << word(8 * j)
    if transform == ROTATE:
        w = (t >> one) | (t << top)
        words[:] = w ^ ref if ref.size else w
    else:
        d = (t >> one) ^ (word(0) - (t & one))
        words[:] = d + ref if ref.size else d
