"""The plane passes of store.planekernel in numpy: byte for byte the same planes and words.

Each step is one in-place ufunc over the whole chunk (no temporaries but one scratch array), so a
1 MiB chunk splits or merges in 0.1-0.3 ms: for bfloat16, splitting as fast as numba's compiled
loop and merging 0.1 ms slower, while zstd's own work is ~0.4 ms per chunk. Importing numba and
loading its compiled passes costs ~0.4 s per process, what 3 GB of chunks gain from them, so a
process that has not loaded numba for other work (a checkout, a plain add) uses these
(store.codecs chooses)."""

from __future__ import annotations

import numpy as np

from .codecs import ROTATE


def split(words: np.ndarray, ref: np.ndarray, transform: int, out: np.ndarray) -> None:
    """As planekernel.split: plane j of `out` holds byte j of every transformed element."""
    word = words.dtype.type
    top = word(8 * words.itemsize - 1)
    t = np.empty_like(words)
    s = np.empty_like(words)
    if ref.size:
        (np.bitwise_xor if transform == ROTATE else np.subtract)(words, ref, out=t)  # unsigned: wraps
    else:
        np.copyto(t, words)
    np.right_shift(t, top, out=s)  # the top bit
    if transform != ROTATE:  # zigzag: all ones for a negative difference
        np.negative(s, out=s)
    np.left_shift(t, word(1), out=t)
    (np.bitwise_or if transform == ROTATE else np.bitwise_xor)(t, s, out=t)
    n = words.size
    for j in range(words.itemsize):
        if j:
            np.right_shift(t, word(8), out=t)
        np.copyto(out[j * n:(j + 1) * n], t, casting="unsafe")  # the low byte


def merge(planes: tuple[np.ndarray, ...], ref: np.ndarray, transform: int, words: np.ndarray) -> None:
    """As planekernel.merge: the words from their planes, the transform undone."""
    word = words.dtype.type
    np.copyto(words, planes[-1], casting="unsafe")
    for p in reversed(planes[:-1]):
        np.left_shift(words, word(8), out=words)
        np.bitwise_or(words, p, out=words, casting="unsafe")
    s = np.empty_like(words)
    np.right_shift(words, word(1), out=s)
    if transform == ROTATE:
        np.left_shift(words, word(8 * words.itemsize - 1), out=words)
        np.bitwise_or(words, s, out=words)
        if ref.size:
            np.bitwise_xor(words, ref, out=words)
    else:
        np.bitwise_and(words, word(1), out=words)
        np.negative(words, out=words)
        np.bitwise_xor(words, s, out=words)
        if ref.size:
            np.add(words, ref, out=words)
