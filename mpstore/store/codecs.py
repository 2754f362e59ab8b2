"""Chunk codecs: how a chunk's bytes are kept in its stored value, and back.

A chunk is stored under the xxh3-128 digest of its RAW bytes whatever its codec, so dedup, ids
and every object stay as they are and a store holds chunks in any mix of codecs. This module
only turns bytes into a stored value and back: pure functions, no store, no digests checked
(the caller hashes what `decode` returns: a damaged value that still decodes is caught there).

Stored values (the first byte names the codec; integers little-endian):

    RAW     [0] raw bytes
    PLANES  [1] [itemsize u8] body
    XOR     [2] [itemsize u8] [reference digest, 16 bytes] body
    body  = [transform u8] [size u32] [length u32] * itemsize  plane 0 .. plane itemsize-1  tail

`size` is the raw length; the raw bytes are m = size // itemsize elements of `itemsize` bytes
and a tail of size % itemsize bytes, kept verbatim at the end. Each element w (an unsigned
integer; for XOR with r the reference's element at the same position, else r = 0) becomes
t = transform(w, r), and plane j holds byte j of every t. A plane is kept as one zstd frame
(length < m) or verbatim (length == m: zstd could not make it smaller). Transforms:

    ROTATE = 1       rotl(w ^ r, 1): a bf16's or f32's exponent becomes one whole byte (ZipNN)
    ZIGZAG_DIFF = 2  zigzag(w - r mod 2^bits): a small signed difference, a small number

The encoder uses ROTATE for PLANES and ZIGZAG_DIFF for XOR; the decoder accepts either for
both, so the byte leaves room to choose per chunk later. A new format gets a new transform
number (or codec byte), never a new meaning for an old one.

Choices, measured on the 0.5 GB bf16 and 1 GB f32 families of tools/bench_codecs.py (1 MiB
chunks of every third tensor of a dense expert and its base; the tool prints the tables):
- ROTATE for standalone planes: stored/raw 0.663 vs 0.670 unrotated (bf16), 0.831 vs 0.835 (f32).
- ZIGZAG_DIFF for deltas: 0.450 vs 0.497 for bitwise XOR (ZipLLM's BitX) in bf16, 0.666 vs
  0.689 in f32: a value that moved by a few units in the last place differs by a few units,
  while their XOR flips every bit of a carry chain. The codec keeps its name: it is the delta
  codec, against a reference chunk.
- zstd with the fast strategy, window 2^17, a 2^6-entry hash table and matches of at least 7
  bytes: planes of float bytes are noise with a skewed histogram, which zstd's Huffman stage
  codes; short matches found in noise cost more than the literals they replace. Against level 1
  (level 3 and up compress these planes worse, and slower): bf16 planes 0.663 vs 0.680,
  compression 1.5 vs 0.6 GB/s, decompression 4.4 vs 2.5 GB/s per core.
- MIN_SAVING = 1/16: it separates data whose planes save one bit per element or less (uniform
  31-bit int32 0.969, random bytes 1.000) from every float layout measured (f64 gaussian 0.890,
  int8-quantised 0.879, f32 0.831, fp8 0.806, bf16 0.663), so only the former stay RAW.
- DELTA_GOOD_ENOUGH = 3/4: encode tries XOR first, and PLANES too only when XOR saved less than
  a quarter. PLANES never beat XOR on a changed chunk of either family (bf16: 904 chunks of three
  experts, XOR 0.07-0.75; f32: 1163 chunks, XOR up to 0.86), and trying it costs as much as XOR
  again. A chunk unrelated to its reference and compressible on its own (a zeroed tensor) may
  then be kept as XOR at up to 3/4 of its size where PLANES would be smaller.

Reference chains have depth 1: a reference is a chunk stored RAW or PLANES, never XOR (the
writer enforces it); `decode` receives the reference's raw bytes from the caller.
Thread-safe: each thread has its own zstd contexts; zstd, numpy's ufuncs and the compiled plane
passes release the GIL. One thread decodes PLANES at ~2.5 GB/s and XOR at ~1.3 GB/s of raw bf16
bytes, and encodes at ~1.0 and ~0.7 GB/s (tools/bench_codecs.py, compiled passes). Importing
this module loads neither numpy nor numba: the first plane encoded or decoded loads numpy, and
numba only where the process has loaded it already (see `_kernels`).
"""

from __future__ import annotations

import struct
import sys
import threading
import types
from collections.abc import Callable
from typing import TYPE_CHECKING

import zstandard

from ..errors import CorruptData

if TYPE_CHECKING:  # numpy is imported where a plane is made: reading RAW chunks never needs it
    import numpy as np

RAW, PLANES, XOR = 0, 1, 2
ROTATE, ZIGZAG_DIFF = 1, 2  # transforms (store.planekernel computes them)
TRANSFORMS = (ROTATE, ZIGZAG_DIFF)
WORDS = {1: "<u1", 2: "<u2", 4: "<u4", 8: "<u8"}  # element width -> its unsigned word, little-endian
DIGEST_SIZE = 16
BODY = struct.Struct("<BI")  # transform, size
LENGTH = struct.Struct("<I")
MAX_SIZE = (1 << 32) - 1  # `size` is a u32; chunks are at most 64 MiB (repo.MAX_CHUNK_SIZE)
# A compressed value must be at least this much smaller than the raw one, or the chunk stays
# RAW (decoding costs CPU on every read): see the module docstring.
MIN_SAVING = 1 / 16
# An XOR value at most this fraction of the raw size is kept without trying PLANES too, which
# would cost as much again: see the module docstring.
DELTA_GOOD_ENOUGH = 3 / 4
ZSTD_PARAMS = zstandard.ZstdCompressionParameters(
    strategy=zstandard.STRATEGY_FAST, window_log=17, hash_log=6, chain_log=6, search_log=1,
    min_match=7, target_length=0, write_content_size=True, write_checksum=False)

_local = threading.local()


def _compressor() -> zstandard.ZstdCompressor:
    """This thread's zstd compressor (a context must not be used by two threads at once)."""
    c: zstandard.ZstdCompressor | None = getattr(_local, "compressor", None)
    if c is None:
        c = _local.compressor = zstandard.ZstdCompressor(compression_params=ZSTD_PARAMS)
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    d: zstandard.ZstdDecompressor | None = getattr(_local, "decompressor", None)
    if d is None:
        d = _local.decompressor = zstandard.ZstdDecompressor()
    return d


def _bytes(data: bytes | bytearray | memoryview) -> memoryview:
    view = memoryview(data)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _words(data: memoryview, itemsize: int, count: int) -> np.ndarray:
    """The first `count` elements of `data` as read-only unsigned words (read-only always, so the
    kernels are compiled for one array type per width)."""
    import numpy as np

    words = np.frombuffer(data, dtype=WORDS[itemsize], count=count)
    words.flags.writeable = False
    return words


def encode(raw: bytes | memoryview, itemsize: int,
           reference: tuple[bytes, bytes | memoryview] | None = None) -> bytes:
    """The stored value of chunk `raw` (elements of `itemsize` bytes) in whichever codec is
    smallest: XOR against `reference` = (its digest, its raw bytes) when given and of the same
    length, PLANES (not tried when XOR saved a quarter: DELTA_GOOD_ENOUGH), or RAW when neither
    saves MIN_SAVING of the raw bytes (decoding would cost more than it saves)."""
    if itemsize not in WORDS:
        raise ValueError(f"itemsize must be one of {tuple(WORDS)}, not {itemsize}")
    data = _bytes(raw)
    size = len(data)
    best: bytes | None = None
    if 0 < size <= MAX_SIZE:
        if reference is not None and len(_bytes(reference[1])) == size:
            ref_digest, ref_raw = reference
            if len(ref_digest) != DIGEST_SIZE:
                raise ValueError(f"a reference digest has {DIGEST_SIZE} bytes, not {len(ref_digest)}")
            best = _value(bytes((XOR, itemsize)) + ref_digest, data, itemsize, ZIGZAG_DIFF, _bytes(ref_raw))
        if best is None or len(best) > DELTA_GOOD_ENOUGH * size:
            planes = _value(bytes((PLANES, itemsize)), data, itemsize, ROTATE, None)
            if best is None or len(planes) < len(best):
                best = planes
    if best is None or len(best) > (1 - MIN_SAVING) * (1 + size):
        return bytes((RAW,)) + bytes(data)
    return best


def _value(prefix: bytes, data: memoryview, itemsize: int, transform: int, ref: memoryview | None) -> bytes:
    """`prefix` + body(data) (see the module docstring): planes of transformed elements, each
    compressed unless that makes it larger; joined once (a copy holds the GIL)."""
    import numpy as np

    size = len(data)
    m = size // itemsize
    planes = np.empty(m * itemsize, dtype=np.uint8)
    ref_words = _words(ref if ref is not None else memoryview(b""), itemsize, m if ref is not None else 0)
    _kernels(m, itemsize).split(_words(data, itemsize, m), ref_words, transform, planes)
    compressor = _compressor()
    parts = []
    for j in range(itemsize):
        plane = planes[j * m:(j + 1) * m].data
        packed = compressor.compress(plane) if m else b""
        parts.append(packed if len(packed) < m else plane)
    header = BODY.pack(transform, size) + b"".join(LENGTH.pack(len(p)) for p in parts)
    return b"".join((prefix, header, *parts, data[m * itemsize:]))


def codec_of(value: bytes | memoryview) -> int:
    """The codec of a stored value (RAW, PLANES, XOR; anything else is not a chunk value)."""
    if len(value) == 0:
        raise CorruptData("a stored chunk is empty (not even its codec byte)")
    return int(_bytes(value)[0])


def reference_of(value: bytes | memoryview) -> bytes | None:
    """The digest of the chunk an XOR value is a delta against (gc keeps it, fsck checks it);
    None for a value that needs no other chunk."""
    view = _bytes(value)
    if codec_of(view) != XOR:
        return None
    if len(view) < 2 + DIGEST_SIZE:
        raise CorruptData("a stored delta chunk is truncated before its reference's digest")
    return bytes(view[2:2 + DIGEST_SIZE])


def decoded_size(value: bytes | memoryview) -> int | None:
    """The raw length a value decodes to, read from its header without decoding (for status);
    None for a value too damaged to say."""
    view = _bytes(value)
    if len(view) == 0:
        return None
    if view[0] == RAW:
        return len(view) - 1
    start = {PLANES: 2, XOR: 2 + DIGEST_SIZE}.get(view[0])
    if start is None or len(view) < start + BODY.size:
        return None
    return int(BODY.unpack_from(view, start)[1])


def decode(value: bytes | memoryview, reference: Callable[[bytes], bytes | memoryview],
           into: memoryview | None = None) -> memoryview:
    """The raw bytes of a stored value (RAW: a view of the value itself, no copy). `into`: a
    writable buffer a compressed value is decoded into (a merge block's row), instead of a new
    one; CorruptData if the value decodes to another length.

    `reference(digest)` gives an XOR value's reference chunk's raw bytes (the caller finds and
    checks it). A malformed value (unknown codec or transform, truncated, bad zstd frame, wrong
    length, a reference of another length) raises CorruptData in one line: what comes back has
    the length the value promises. Its digest is for the caller to check."""
    view = _bytes(value)
    codec = codec_of(view)
    if codec == RAW:
        return view[1:]
    if codec not in (PLANES, XOR):
        raise CorruptData(f"a stored chunk has unknown codec {codec}")
    start = 2 if codec == PLANES else 2 + DIGEST_SIZE
    if len(view) < start + BODY.size:
        raise CorruptData("a stored chunk is truncated inside its header")
    itemsize = view[1]
    transform, size = BODY.unpack_from(view, start)
    if itemsize not in WORDS or transform not in TRANSFORMS:
        raise CorruptData(f"a stored chunk has an unknown layout (itemsize {itemsize}, transform {transform})")
    m = size // itemsize
    at = start + BODY.size + itemsize * LENGTH.size
    if len(view) < at:
        raise CorruptData("a stored chunk is truncated inside its plane table")
    lengths = [LENGTH.unpack_from(view, start + BODY.size + j * LENGTH.size)[0] for j in range(itemsize)]
    if any(n > m for n in lengths) or at + sum(lengths) + size % itemsize != len(view):
        raise CorruptData("a stored chunk's planes do not add up to its length (truncated or damaged)")
    frames = []
    for n in lengths:
        frames.append(view[at:at + n])
        at += n
    for frame in frames:  # before allocating anything: a damaged size must not allocate gigabytes
        if len(frame) < m and _content_size(frame) != m:
            raise CorruptData("a stored chunk's plane decompresses to the wrong length")
    ref_words = _words(memoryview(b""), itemsize, 0)
    if codec == XOR:
        ref_raw = _bytes(reference(bytes(view[2:2 + DIGEST_SIZE])))
        if len(ref_raw) != size:
            raise CorruptData(f"a delta chunk's reference has {len(ref_raw)} bytes, not {size}")
        ref_words = _words(ref_raw, itemsize, m)
    import numpy as np

    if into is not None and len(into) != size:
        raise CorruptData(f"a stored chunk decodes to {size} bytes where {len(into)} were expected")
    out = np.frombuffer(into, dtype=np.uint8) if into is not None else np.empty(size, dtype=np.uint8)
    out[m * itemsize:] = np.frombuffer(view[at:], dtype=np.uint8)
    if m:
        planes = tuple(_plane(frame, m) for frame in frames)
        _kernels(m, itemsize).merge(planes, ref_words, transform, out[:m * itemsize].view(WORDS[itemsize]))
    return out.data


# numpy's passes merge planes 2-4x slower than numba's compiled ones, which take ~0.4 s of CPU to
# load: a process without numba starts loading them, on a thread of its own while numpy's passes go
# on, once it has passed this many elements (512 MiB of bfloat16) through numpy's: a checkout of a
# few GB then gains ~0.5 ms of CPU per delta chunk, and a small one never pays the load.
COMPILE_AFTER = 1 << 28

_compiled: types.ModuleType | None = None  # the compiled passes, once loaded and warm
_loader: threading.Thread | None = None
_numpy_elements = 0
_lock = threading.Lock()


def _kernels(m: int, itemsize: int) -> types.ModuleType:
    """The plane passes for a chunk of m elements: numba's where they are loaded, or where the
    process has loaded numba for other work (a merge's kernels, add --base's catalog); else
    numpy's (store.numpyplanes: the same bytes, so switching midway changes nothing stored)."""
    global _compiled, _loader, _numpy_elements
    if _compiled is not None:
        return _compiled
    with _lock:
        if _loader is None and "numba" in sys.modules:
            from . import planekernel

            _compiled = planekernel
            return planekernel
        _numpy_elements += m
        if _loader is None and _numpy_elements >= COMPILE_AFTER:
            _loader = threading.Thread(target=_load_compiled, args=(itemsize,), name="mp-numba-load", daemon=True)
            _loader.start()
    from . import numpyplanes

    return numpyplanes


def _load_compiled(itemsize: int) -> None:
    """Import the compiled passes and load their machine code for chunks of `itemsize` (the
    types codecs passes them: read-only words and planes, writable outputs), then use them."""
    global _compiled
    import numpy as np

    from . import planekernel

    n = 64
    words = _words(memoryview(bytes(n * itemsize)), itemsize, n)
    planes = tuple(_words(memoryview(bytes(n)), 1, n) for _ in range(itemsize))
    out = np.empty(n * itemsize, dtype=np.uint8)
    for ref in (words, _words(memoryview(b""), itemsize, 0)):
        planekernel.split(words, ref, ROTATE, out)
        planekernel.merge(planes, ref, ROTATE, out.view(WORDS[itemsize]))
    _compiled = planekernel


def _content_size(frame: memoryview) -> int:
    try:
        return int(zstandard.frame_content_size(frame))
    except zstandard.ZstdError:
        raise CorruptData("a stored chunk's plane is not a zstd frame") from None


def _plane(frame: memoryview, m: int) -> np.ndarray:
    """A plane of m bytes from its frame: verbatim, or decompressed (checked to be m bytes)."""
    if len(frame) < m:
        try:
            data: bytes | memoryview = _decompressor().decompress(frame)
        except zstandard.ZstdError as e:
            raise CorruptData(f"a stored chunk's plane does not decompress ({e})") from None
        if len(data) != m:
            raise CorruptData("a stored chunk's plane decompresses to the wrong length")
    else:
        data = frame
    return _words(_bytes(data), 1, m)
