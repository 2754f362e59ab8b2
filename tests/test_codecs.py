"""Chunk codecs (store.codecs): every value decodes to the bytes it was made from, for every
dtype, codec and length; a damaged value raises CorruptData or decodes to bytes of the promised
length (whose digest the store then checks), never anything else."""

from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest
import xxhash

from mpstore.errors import CorruptData
from mpstore.store import codecs
from mpstore.store.dtypes import FLOATS, ITEMSIZE

RNG_SEED = 14
N = 96 << 10  # bytes of the test chunks: large enough to compress, small enough to be quick


def digest(data: bytes | memoryview) -> bytes:
    return xxhash.xxh3_128_digest(data)


def values(dtype: str, size: int, seed: int = RNG_SEED) -> bytes:
    """`size` bytes shaped like a tensor of `dtype`: gaussian floats in that width (with NaN,
    infinities and signed zeros among them), small integers for integer dtypes."""
    rng = np.random.default_rng(seed)
    k = ITEMSIZE[dtype]
    n = size // k
    if dtype in FLOATS:
        x = rng.standard_normal(n) * 0.02
        x[::97], x[1::97], x[2::97], x[3::97] = np.nan, np.inf, -np.inf, -0.0
        if k == 8:
            words = x.view(np.uint64)
        elif k == 4:
            words = x.astype(np.float32).view(np.uint32)
        elif k == 2:  # bf16 or f16 alike: the top half of a float32
            words = (x.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
        else:  # fp8: the top byte of a float32
            words = (x.astype(np.float32).view(np.uint32) >> 24).astype(np.uint8)
    else:
        words = rng.integers(-3, 4, n).astype(codecs.WORDS[k]) if dtype != "BOOL" else rng.integers(0, 2, n)
        words = words.astype(codecs.WORDS[k])
    return words.tobytes() + rng.integers(0, 256, size - n * k, dtype=np.uint8).tobytes()


def nudged(raw: bytes, itemsize: int, seed: int = RNG_SEED + 1) -> bytes:
    """`raw` with each element moved by a few units in its last place (a fine-tune's delta)."""
    word = codecs.WORDS[itemsize]
    n = len(raw) // itemsize
    steps = np.random.default_rng(seed).integers(-2, 3, n).astype(word)
    return (np.frombuffer(raw, word, count=n) + steps).tobytes() + raw[n * itemsize:]


def forced(codec: int, raw: bytes, itemsize: int, ref: bytes | None = None) -> bytes:
    """A value in `codec` whatever encode would choose: the format must decode what it can
    describe (e.g. a chunk smaller than one element, which encode keeps RAW)."""
    if codec == codecs.RAW:
        return bytes((codecs.RAW,)) + raw
    if codec == codecs.PLANES:
        return codecs._value(bytes((codecs.PLANES, itemsize)), memoryview(raw), itemsize, codecs.ROTATE, None)
    assert ref is not None
    return codecs._value(bytes((codecs.XOR, itemsize)) + digest(ref), memoryview(raw), itemsize,
                         codecs.ZIGZAG_DIFF, memoryview(ref))


def decode(value: bytes | memoryview, ref: bytes | None = None) -> bytes:
    def reference(d: bytes) -> bytes:
        assert ref is not None and d == digest(ref)
        return ref

    return bytes(codecs.decode(value, reference))


@pytest.mark.parametrize("dtype", sorted(ITEMSIZE))
def test_every_dtype_round_trips_in_the_codec_encode_picks(dtype: str) -> None:
    k = ITEMSIZE[dtype]
    raw = values(dtype, N)
    planes = codecs.encode(raw, k)
    assert codecs.codec_of(planes) == codecs.PLANES and len(planes) < 0.9 * N
    assert decode(planes) == raw and codecs.decoded_size(planes) == N and codecs.reference_of(planes) is None

    expert = nudged(raw, k)
    delta = codecs.encode(expert, k, (digest(raw), raw))
    assert codecs.codec_of(delta) == codecs.XOR and len(delta) < len(codecs.encode(expert, k))
    assert codecs.reference_of(delta) == digest(raw) and codecs.decoded_size(delta) == N
    assert decode(delta, raw) == expert

    noise = np.random.default_rng(RNG_SEED).integers(0, 256, N, dtype=np.uint8).tobytes()
    kept = codecs.encode(noise, k, (digest(raw), raw))
    assert codecs.codec_of(kept) == codecs.RAW and kept == b"\x00" + noise
    assert decode(kept) == noise and codecs.decoded_size(kept) == N


@pytest.mark.parametrize("itemsize", sorted(codecs.WORDS))
@pytest.mark.parametrize("size", [0, 1, 3, 7, 8, 9, 4095, N + 5])
def test_every_length_round_trips_in_every_codec(itemsize: int, size: int) -> None:
    """Odd lengths (a tail of size % itemsize bytes), chunks shorter than one element or one plane."""
    raw = values("F32" if itemsize == 4 else "F64" if itemsize == 8 else "BF16" if itemsize == 2 else "U8", size)
    ref = nudged(raw, itemsize)
    for codec in (codecs.RAW, codecs.PLANES, codecs.XOR):
        value = forced(codec, raw, itemsize, ref)
        assert decode(value, ref) == raw, codec
        assert codecs.decoded_size(value) == size
    chosen = codecs.encode(raw, itemsize, (digest(ref), ref))
    assert decode(chosen, ref) == raw
    if size < 64:  # the header costs more than compression saves
        assert codecs.codec_of(chosen) == codecs.RAW


def test_raw_decodes_to_a_view_of_the_value_without_a_copy() -> None:
    value = bytearray(b"\x00abc")
    view = codecs.decode(value, lambda d: b"")
    value[1] = ord("z")
    assert bytes(view) == b"zbc"


def test_misaligned_and_writable_buffers_encode_alike() -> None:
    """The store hands encode a frame's payload (one byte past the codec byte) and decode a
    view into LMDB's map: neither is aligned to the element width."""
    raw = values("F32", N)
    frame = bytearray(1 + N)
    frame[1:] = raw
    ref_frame = bytearray(1 + N)
    ref_frame[1:] = nudged(raw, 4)
    ref = memoryview(ref_frame)[1:]
    value = codecs.encode(memoryview(frame)[1:], 4, (digest(ref), ref))
    assert value == codecs.encode(raw, 4, (digest(ref), bytes(ref)))
    shifted = bytearray(1 + len(value))
    shifted[1:] = value
    assert bytes(codecs.decode(memoryview(shifted)[1:], lambda d: ref)) == raw


def test_a_reference_of_another_length_is_not_used() -> None:
    raw = values("BF16", N)
    other = nudged(raw, 2)[:-2]
    value = codecs.encode(raw, 2, (digest(other), other))
    assert codecs.codec_of(value) == codecs.PLANES and decode(value) == raw


def test_a_zero_chunk_costs_next_to_nothing() -> None:
    value = codecs.encode(bytes(1 << 20), 4)
    assert codecs.codec_of(value) == codecs.PLANES and len(value) < 256
    assert decode(value) == bytes(1 << 20)


def test_bad_arguments_to_encode_are_programming_errors() -> None:
    with pytest.raises(ValueError):
        codecs.encode(b"abcd", 3)
    with pytest.raises(ValueError):
        codecs.encode(b"abcd", 2, (b"short", b"abce"))


def damaged_values() -> list[tuple[bytes, bytes | None, bytes]]:
    """(value, reference, raw) for a PLANES and an XOR value with compressed and verbatim planes
    and a tail."""
    raw = values("F32", N + 3)
    ref = nudged(raw, 4)
    return [(codecs.encode(raw, 4), None, raw), (codecs.encode(raw, 4, (digest(ref), ref)), ref, raw)]


def decodes_safely(value: bytes, ref: bytes | None, size: int) -> bytes | None:
    """What decode gives for a damaged value: None for CorruptData, else bytes that must have the
    promised length. A flipped payload byte that zstd does not notice decodes to wrong bytes of
    the right length, and a codec byte flipped to RAW (which has no length of its own) to the
    value's other bytes: the store checks the digest of every decoded chunk, which catches both."""

    def reference(d: bytes) -> bytes:  # as the store looks a reference up: by its digest
        if ref is None or d != digest(ref):
            raise CorruptData(f"chunk {d.hex()} is missing")
        return ref

    try:
        out = bytes(codecs.decode(value, reference))
    except CorruptData as e:
        assert "\n" not in str(e)
        return None
    assert len(out) == size or value[0] == codecs.RAW
    return out


def test_a_flipped_byte_anywhere_raises_or_keeps_the_length() -> None:
    for value, ref, raw in damaged_values():
        table_end = 2 + (16 if value[0] == codecs.XOR else 0) + codecs.BODY.size + 4 * 4
        rng = np.random.default_rng(RNG_SEED)
        for at in [*range(table_end + 32), *rng.integers(table_end, len(value), 300)]:
            for mask in (0x01, 0x80, 0xFF):
                bad = bytearray(value)
                bad[at] ^= mask
                out = decodes_safely(bytes(bad), ref, len(raw))
                if at < table_end:  # the header and plane table are checked (a RAW codec byte: by the digest)
                    assert out is None or (at == 0 and digest(out) != digest(raw)), (at, mask)
                elif out is not None and out != raw:
                    assert digest(out) != digest(raw)


def test_a_truncated_or_extended_value_raises() -> None:
    for value, ref, raw in damaged_values():
        rng = np.random.default_rng(RNG_SEED)
        for n in [*range(80), *rng.integers(80, len(value), 200)]:
            assert decodes_safely(value[:n], ref, len(raw)) is None, n
        assert decodes_safely(value + b"\x00", ref, len(raw)) is None


@pytest.mark.parametrize("codec", [3, 7, 255])
def test_an_unknown_codec_raises(codec: int) -> None:
    with pytest.raises(CorruptData, match="unknown codec"):
        codecs.decode(bytes((codec,)) + values("BF16", 64), lambda d: b"")
    assert codecs.decoded_size(bytes((codec, 2))) is None
    with pytest.raises(CorruptData):
        codecs.codec_of(b"")


def test_a_wrong_reference_raises_or_fails_the_digest() -> None:
    (_, _, raw), (delta, ref, _) = damaged_values()
    assert ref is not None
    with pytest.raises(CorruptData, match="reference"):
        codecs.decode(delta, lambda d: ref[:-4])
    with pytest.raises(CorruptData, match="reference"):
        codecs.decode(delta, lambda d: ref + b"\x00")
    other = nudged(ref, 4, seed=99)  # the right length, other bytes: only the digest tells
    assert digest(codecs.decode(delta, lambda d: other)) != digest(raw)
    with pytest.raises(CorruptData):
        codecs.reference_of(delta[:10])


def test_threads_encode_and_decode_alike() -> None:
    chunks = [(values(dtype, N, seed), ITEMSIZE[dtype]) for seed, dtype in enumerate(["BF16", "F32", "F64", "I8"] * 2)]
    refs = [nudged(raw, k) for raw, k in chunks]
    expected = [codecs.encode(raw, k, (digest(ref), ref)) for (raw, k), ref in zip(chunks, refs)]
    errors: list[str] = []

    def work() -> None:
        for _ in range(3):
            for (raw, k), ref, want in zip(chunks, refs, expected):
                got = codecs.encode(raw, k, (digest(ref), ref))
                if got != want or bytes(codecs.decode(got, lambda d, r=ref: r)) != raw:
                    errors.append(f"chunk of itemsize {k} differs")

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_importing_the_codecs_loads_neither_numba_nor_torch() -> None:
    code = "import sys, mpstore.store.codecs; print(sorted({'numba', 'torch'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("itemsize", [1, 2, 4, 8])
@pytest.mark.parametrize("transform", [codecs.ROTATE, codecs.ZIGZAG_DIFF])
@pytest.mark.parametrize("with_ref", [False, True])
def test_numpy_passes_equal_the_compiled_ones(itemsize, transform, with_ref) -> None:
    """numpy's passes and numba's give the same planes and words, so a chunk's encoding does not
    depend on which ran."""
    from mpstore.store import numpyplanes, planekernel

    rng = np.random.default_rng(itemsize * 10 + transform)
    word = codecs.WORDS[itemsize]
    n = 1000
    words = rng.integers(0, 256, n * itemsize, dtype=np.uint8).view(word)
    words[:8] = np.array([0, 1, -1, 2, -2, 3, 127, 128]).astype(word)  # wrap-around edges
    ref = rng.integers(0, 256, n * itemsize, dtype=np.uint8).view(word) if with_ref else np.empty(0, word)
    planes = {}
    for kernels in (planekernel, numpyplanes):
        out = np.empty(n * itemsize, dtype=np.uint8)
        kernels.split(words, ref, transform, out)
        planes[kernels] = out
    assert np.array_equal(planes[planekernel], planes[numpyplanes])
    split = tuple(planes[planekernel][j * n:(j + 1) * n] for j in range(itemsize))
    for kernels in (planekernel, numpyplanes):
        back = np.empty(n, dtype=word)
        kernels.merge(split, ref, transform, back)
        assert np.array_equal(back, words)


def test_a_process_without_numba_codes_chunks_without_loading_it() -> None:
    """A checkout or a plain add of a small model never loads numba for its chunks (numpy's
    passes); a process that has loaded it (a merge), or has passed COMPILE_AFTER elements through
    numpy's passes, uses the compiled ones: the stored bytes are the same."""
    code = """
import hashlib, sys, numpy as np
from mpstore.store import codecs
if sys.argv[1] == "numba":
    import numba
if sys.argv[1] == "switch":  # past COMPILE_AFTER elements, numba's passes load on a thread
    codecs.COMPILE_AFTER = 1 << 16
    value = codecs.encode(np.arange(1 << 17, dtype=np.float32).tobytes(), 4)
    for _ in range(5000):
        if codecs._compiled is not None:
            break
        codecs.decode(value, lambda _: b"")
    assert codecs._compiled is not None
rng = np.random.default_rng(5)
raw = (rng.standard_normal(1 << 18) * 0.02).astype(np.float32)
ref = (raw + 1e-4).astype(np.float32).tobytes()
out = []
for reference in (None, (b"r" * 16, ref)):
    value = codecs.encode(raw.tobytes(), 4, reference)
    assert value[0] != codecs.RAW and bytes(codecs.decode(value, lambda _: ref)) == raw.tobytes()
    out.append(hashlib.sha256(value).hexdigest())
print("numba" in sys.modules, "mpstore.store.planekernel" in sys.modules, *out)
"""
    runs = {how: subprocess.run([sys.executable, "-c", code, how], capture_output=True, text=True, check=True
                                ).stdout.split() for how in ("plain", "numba", "switch")}
    assert runs["plain"][:2] == ["False", "False"]
    assert runs["numba"][:2] == ["True", "True"]
    assert runs["switch"][:2] == ["True", "True"]
    assert runs["plain"][2:] == runs["numba"][2:] == runs["switch"][2:]
