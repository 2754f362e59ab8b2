"""Generated bad input (hypothesis): malformed safetensors files and model folders are refused
with one clean error (an MpError whose message is one line; through the CLI: one stderr line
`mp: error: ...`, exit 1, no traceback) and leave every key and value of the store as it was.
Pickle files are never unpickled. Checkout writes nothing outside its target, whatever file names
a snapshot holds.

Most examples call the Repo API in this process (what the CLI wraps); a handful go through `mp`.
Each kind of damage is its own test (a strategy per kind, 40 examples, derandomized so a run is
reproducible), so a bug shows up under the name of what triggers it; docs/reliability.md counts them.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import assert_user_error, run_mp, store_fingerprint, tree_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from mpstore import Repo
from mpstore.errors import MpError
from mpstore.store.dtypes import ITEMSIZE
from mpstore.store.env import framed
from mpstore.store.ids import digest
from mpstore.store.objects import Blob, Commit, Shard, Snapshot
from mpstore.store.refs import BRANCH_PREFIX

CHUNK = 4096
FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])
DTYPES = sorted(ITEMSIZE)


# ------------------------------------------------------------------------------ shared repository

CASES: Counter = Counter()  # examples run per test and kind, printed at the end (pytest -s)


@pytest.fixture(scope="module", autouse=True)
def _count_cases():
    yield
    print("\nfuzz cases run: " + json.dumps(dict(sorted(CASES.items())), indent=1) + f"\ntotal {sum(CASES.values())}")



@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def repo(work):
    """One repository for the in-process examples, holding a base model, open throughout."""
    r = Repo.init(work / "repo", chunk_size=CHUNK)
    src = work / "base"
    src.mkdir()
    save_file({"w": torch.arange(3000, dtype=torch.float32), "b": torch.ones(7)}, str(src / "model.safetensors"))
    (src / "config.json").write_text('{"model_type": "x"}')
    r.add(src, "base")
    yield r
    r.close()


def scratch(work: Path) -> Path:
    return Path(tempfile.mkdtemp(dir=work, prefix="case-"))


def refused(repo: Repo, path: Path, must_fail: bool = True) -> str | None:
    """Add `path`; the store must be unchanged and the error one line. Returns the message, or
    None when the input was accepted (only allowed if not must_fail; then it must round-trip)."""
    before = store_fingerprint(repo)
    try:
        repo.add(path, "fuzz")
    except MpError as e:
        assert store_fingerprint(repo) == before, "a refused add changed the store"
        msg = str(e)
        assert msg and "\n" not in msg and "\r" not in msg, repr(msg)
        return msg
    assert not must_fail, f"accepted {path}"
    out = path.parent / "roundtrip"
    repo.checkout("fuzz", out)
    want = {path.name: path.read_bytes()} if path.is_file() else tree_bytes(path)
    assert tree_bytes(out) == want
    return None


# ------------------------------------------------------------------------------ safetensors files


def layout(entries: list[tuple[str, str, list]], metadata: dict | None) -> tuple[dict, int]:
    """A header dict with offsets tiling the data section in list order, and the data size."""
    header: dict = {} if metadata is None else {"__metadata__": metadata}
    pos = 0
    for name, dtype, shape in entries:
        n = ITEMSIZE[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + n]}
        pos += n
    return header, pos


def st_file(raw: bytes, data: bytes, length: int | None = None) -> bytes:
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


tensor_names = st.text(st.characters(exclude_categories=("Cs",)), max_size=10).filter(lambda n: n != "__metadata__")
json_values = st.recursive(st.none() | st.booleans() | st.integers(-10, 10) | st.floats(allow_nan=False) | st.text(max_size=4),
                           lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=3), kids, max_size=2),
                           max_leaves=5)
not_int = st.one_of(st.floats(allow_nan=False), st.text(max_size=3), st.booleans(), st.none(), st.just([1]))

KINDS = [
    "length", "truncated_json", "invalid_utf8", "not_an_object", "deep_json", "random_header",
    "offsets_overlap", "offsets_past_end", "offsets_huge", "offsets_reversed", "offsets_bad_type",
    "shape_mismatch", "shape_bad", "shape_huge", "dtype_unknown", "entry_not_an_object",
    "metadata_bad", "data_short", "data_long", "surrogate_name",
]


@dataclass
class BadFile:
    kind: str
    data: bytes
    must_fail: bool

    def __repr__(self) -> str:
        return f"BadFile({self.kind}, {len(self.data)} bytes: {self.data[:120]!r})"


@st.composite
def bad_files(draw, kinds=tuple(KINDS)) -> BadFile:
    """A valid safetensors layout with exactly one thing broken (or, for `random_header`,
    random bytes as its header: these may by chance be valid)."""
    names = draw(st.lists(tensor_names, min_size=1, max_size=4, unique=True))
    entries = [(n, draw(st.sampled_from(DTYPES)), draw(st.lists(st.integers(0, 6), max_size=3))) for n in names]
    metadata = draw(st.none() | st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2))
    header, size = layout(entries, metadata)
    data = draw(st.binary(min_size=size, max_size=size))
    kind = draw(st.sampled_from(kinds))
    nonzero = [n for n, _, _ in entries if header[n]["data_offsets"][1] > header[n]["data_offsets"][0]]
    if kind.startswith(("offsets_overlap", "offsets_past", "offsets_rev", "shape_mismatch", "data_short")) and not nonzero:
        # give the layout a non-empty tensor to break
        entries.append(("x" if "x" not in names else "x2", "F32", [draw(st.integers(1, 6))]))
        header, size = layout(entries, metadata)
        data = bytes(range(size % 256)) + bytes(size - size % 256)
        nonzero = [n for n, _, _ in entries if header[n]["data_offsets"][1] > header[n]["data_offsets"][0]]
    raw = json.dumps(header).encode()
    length = None
    must_fail = True
    if kind == "length":
        length = draw(st.one_of(st.integers(0, len(raw) - 1), st.integers(len(raw) + 1, 2**64 - 1)))
    elif kind == "truncated_json":
        raw = raw[: draw(st.integers(0, len(raw) - 1))]
    elif kind == "invalid_utf8":
        i = draw(st.integers(0, len(raw)))
        raw = raw[:i] + draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80"])) + raw[i:]
    elif kind == "not_an_object":
        raw = json.dumps(draw(st.one_of(st.lists(json_values, max_size=3), st.integers(), st.text(max_size=5), st.none()))).encode()
    elif kind == "deep_json":
        d = draw(st.integers(500, 200_000))
        raw = draw(st.sampled_from([b"[" * d + b"]" * d, b'{"a":' * d + b"1" + b"}" * d]))
    elif kind == "random_header":
        raw = draw(st.binary(max_size=40))
        must_fail = False
    elif kind == "offsets_overlap":
        name = draw(st.sampled_from(nonzero))
        b, e = header[name]["data_offsets"]
        if b == 0:  # move the first non-empty tensor onto the next one instead
            k = draw(st.integers(1, e))
            header[name]["data_offsets"] = [b + k, e + k] if e + k <= size else [b, e - k]
        else:
            k = draw(st.integers(1, b))
            header[name]["data_offsets"] = [b - k, e - k]
    elif kind == "offsets_past_end":
        name = draw(st.sampled_from(nonzero))
        b, e = header[name]["data_offsets"]
        k = draw(st.integers(1, 1 << 20))
        header[name]["data_offsets"] = draw(st.sampled_from([[b + k, e + k], [size + k, size + k + (e - b)]]))
    elif kind == "offsets_huge":
        name = draw(st.sampled_from(names))
        big = draw(st.integers(2**40, 2**70))
        b, e = header[name]["data_offsets"]
        header[name]["data_offsets"] = draw(st.sampled_from([[big, big + e - b], [b, big], [big, big]]))
    elif kind == "offsets_reversed":
        name = draw(st.sampled_from(nonzero))
        b, e = header[name]["data_offsets"]
        header[name]["data_offsets"] = [e, b]
    elif kind == "offsets_bad_type":
        name = draw(st.sampled_from(names))
        header[name]["data_offsets"] = draw(st.one_of(
            st.lists(not_int, min_size=2, max_size=2), st.lists(st.integers(0, 9), max_size=1),
            st.lists(st.integers(0, 9), min_size=3, max_size=4), st.tuples(st.integers(-9, -1), st.integers(0, 9)).map(list),
            not_int))
    elif kind == "shape_mismatch":
        name = draw(st.sampled_from(nonzero))
        shape = list(header[name]["shape"])
        how = draw(st.sampled_from(["grow", "append", "drop"] if any(d != 1 for d in shape) else ["grow", "append"]))
        if how == "grow" and shape:
            i = draw(st.integers(0, len(shape) - 1))
            shape[i] += draw(st.integers(1, 3))
        elif how == "drop" and shape:
            shape.pop(next(i for i, d in enumerate(shape) if d != 1))
        else:
            shape.append(draw(st.integers(2, 4)))
        header[name]["shape"] = shape
    elif kind == "shape_bad":
        name = draw(st.sampled_from(names))
        header[name]["shape"] = draw(st.one_of(
            st.lists(st.integers(-5, -1), min_size=1, max_size=2),
            st.lists(not_int, min_size=1, max_size=2), st.integers(), st.text(max_size=3), st.none()))
    elif kind == "shape_huge":
        big = draw(st.integers(2**64, 2**100))
        header[draw(st.sampled_from(["huge", "huge0"]))] = {
            "dtype": "F32", "shape": draw(st.sampled_from([[big, 0], [0, big], [big]])), "data_offsets": [size, size]}
    elif kind == "dtype_unknown":
        name = draw(st.sampled_from(names))
        header[name]["dtype"] = draw(st.one_of(
            st.text(max_size=6).filter(lambda t: t not in ITEMSIZE), st.sampled_from([d.lower() for d in DTYPES]),
            st.lists(st.sampled_from(DTYPES), max_size=2), st.dictionaries(st.text(max_size=2), st.integers(), max_size=1),
            st.integers(), st.none()))
    elif kind == "entry_not_an_object":
        header[draw(st.sampled_from(names))] = draw(st.one_of(st.lists(json_values, max_size=2), st.integers(), st.text(max_size=4), st.none()))
    elif kind == "metadata_bad":
        header["__metadata__"] = draw(st.one_of(
            st.lists(json_values, max_size=2), st.integers(), st.text(max_size=3),
            st.dictionaries(st.text(max_size=3), st.one_of(st.integers(), st.none(), st.lists(st.text(max_size=2), max_size=1)), min_size=1, max_size=2)))
    elif kind == "data_short":
        data = data[: -draw(st.integers(1, len(data)))]
    elif kind == "data_long":
        data += draw(st.binary(min_size=1, max_size=64))
    elif kind == "surrogate_name":
        header[draw(st.sampled_from(["\udcff", "a\ud800b", "\udfff" * 3]))] = {"dtype": "U8", "shape": [0], "data_offsets": [size, size]}
    if kind in ("offsets_overlap", "offsets_past_end", "offsets_huge", "offsets_reversed", "offsets_bad_type", "shape_mismatch",
                "shape_bad", "shape_huge", "dtype_unknown", "entry_not_an_object", "metadata_bad", "surrogate_name"):
        raw = json.dumps(header).encode()
    if draw(st.booleans()) and kind not in ("length", "truncated_json"):
        raw += b" " * draw(st.integers(1, 7))  # writers pad the header to a multiple of 8 with spaces
    return BadFile(kind, st_file(raw, data, length), must_fail)


def _model_dir(work: Path, weights: bytes, name: str = "model.safetensors") -> Path:
    folder = scratch(work) / "model"
    folder.mkdir()
    (folder / name).write_bytes(weights)
    (folder / "config.json").write_text('{"model_type": "x"}')
    return folder


@pytest.mark.parametrize("kind", KINDS)
def test_malformed_safetensors_in_a_folder_is_refused_cleanly(repo, work, kind):
    @FUZZ
    @given(bad=bad_files(kinds=(kind,)))
    def case(bad):
        CASES[f"folder with bad model.safetensors: {kind}"] += 1
        msg = refused(repo, _model_dir(work, bad.data), bad.must_fail)
        if msg is not None:
            assert "model.safetensors" in msg

    case()


@pytest.mark.parametrize("kind", KINDS)
def test_malformed_single_safetensors_file_is_refused_cleanly(repo, work, kind):
    @settings(FUZZ, max_examples=10)
    @given(bad=bad_files(kinds=(kind,)))
    def case(bad):
        CASES[f"single .safetensors file: {kind}"] += 1
        path = scratch(work) / "one.safetensors"
        path.write_bytes(bad.data)
        msg = refused(repo, path, bad.must_fail)
        if msg is not None:
            assert "one.safetensors" in msg

    case()


# ------------------------------------------------------------------------------ model folders


def _good_weights() -> bytes:
    raw = json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                      "b": {"dtype": "U8", "shape": [3], "data_offsets": [8, 11]}}).encode()
    return st_file(raw, bytes(range(11)))


def _shard(names: list[str]) -> bytes:
    header, size = layout([(n, "F32", [2]) for n in names], None)
    return st_file(json.dumps(header).encode(), bytes(size))


FOLDER_KINDS = [
    "control_char_name", "backslash_name", "non_utf8_name", "symlink_outside", "symlink_dir",
    "symlink_loop", "dangling_symlink", "fifo", "index_bad_shard_name", "index_bad_json",
    "index_lies", "duplicate_tensor", "no_weights", "bad_shard",
]


@dataclass
class BadFolder:
    kind: str
    detail: object

    def build(self, root: Path) -> Path:
        """Write the folder under `root` (which also holds an `outside.txt`); return the folder."""
        folder = root / "model"
        folder.mkdir()
        (root / "outside.txt").write_text("not yours")
        (folder / "config.json").write_text('{"model_type": "x"}')
        k, d = self.kind, self.detail
        if k not in ("index_bad_shard_name", "index_bad_json", "index_lies", "duplicate_tensor", "no_weights", "bad_shard"):
            (folder / "model.safetensors").write_bytes(_good_weights())
        if k == "control_char_name":
            where, name = d
            (folder / where).mkdir(parents=True, exist_ok=True)
            (folder / where / name).write_text("x")
        elif k == "backslash_name":
            (folder / d).write_text("x")
        elif k == "non_utf8_name":
            with open(os.path.join(os.fsencode(folder), d), "wb") as f:
                f.write(b"x")
        elif k == "symlink_outside":
            name, target = d
            os.symlink(str(root / "outside.txt") if target == "ABS" else target, folder / name)
        elif k == "symlink_dir":
            (root / "elsewhere").mkdir()
            os.symlink(root / "elsewhere" if d else folder, folder / "linked")
        elif k == "symlink_loop":
            if d == 1:
                os.symlink("self.txt", folder / "self.txt")
            else:
                os.symlink("b.txt", folder / "a.txt")
                os.symlink("a.txt", folder / "b.txt")
        elif k == "dangling_symlink":
            os.symlink(d, folder / "tokenizer.json")
        elif k == "fifo":
            os.mkfifo(folder / d)
        elif k == "index_bad_shard_name":
            (folder / "model-1.safetensors").write_bytes(_shard(["a"]))
            target = d.replace("ABS", str(folder))
            (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": target}}))
        elif k == "index_bad_json":
            (folder / "model-1.safetensors").write_bytes(_shard(["a"]))
            (folder / "model.safetensors.index.json").write_bytes(d)
        elif k == "index_lies":
            (folder / "model-1.safetensors").write_bytes(_shard(["a"]))
            (folder / "model-2.safetensors").write_bytes(_shard(["b"]))
            (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-2.safetensors", "b": "model-2.safetensors"}}))
        elif k == "duplicate_tensor":
            (folder / "model-1.safetensors").write_bytes(_shard(["a", d]))
            (folder / "model-2.safetensors").write_bytes(_shard([d, "c"]))
        elif k == "no_weights":
            for name in d:
                (folder / name).write_bytes(b"\x80\x04not loaded")
        elif k == "bad_shard":
            (folder / "model-1.safetensors").write_bytes(_shard(["a"]))
            (folder / "model-2.safetensors").write_bytes(d.data)
        return folder

    def __repr__(self) -> str:
        return f"BadFolder({self.kind}, {repr(self.detail)[:200]})"


CONTROL = [chr(c) for c in [*range(1, 32), 127]]
safe_part = st.text("abc._-", min_size=0, max_size=4)


# a second shard broken in its layout (the header checks themselves are fuzzed above)
LAYOUT_KINDS = ("length", "truncated_json", "offsets_overlap", "offsets_past_end", "offsets_reversed",
                "shape_mismatch", "data_short", "data_long")


@st.composite
def bad_folders(draw, kinds=tuple(FOLDER_KINDS)) -> BadFolder:
    kind = draw(st.sampled_from(kinds))
    if kind == "control_char_name":
        name = draw(safe_part) + draw(st.sampled_from(CONTROL)) + draw(safe_part)
        return BadFolder(kind, (draw(st.sampled_from([".", "sub", "a/b"])), name))
    if kind == "backslash_name":
        return BadFolder(kind, draw(safe_part) + "\\" + draw(safe_part))
    if kind == "non_utf8_name":
        return BadFolder(kind, draw(safe_part).encode() + bytes([draw(st.integers(0x80, 0xFF))]) + draw(safe_part).encode())
    if kind == "symlink_outside":
        return BadFolder(kind, (draw(st.sampled_from(["tokenizer.json", "model.safetensors.index.json", "sub.txt"])),
                                draw(st.sampled_from(["ABS", "../outside.txt", "../../../../../../etc/hostname", "/etc/hostname"]))))
    if kind == "symlink_dir":
        return BadFolder(kind, draw(st.booleans()))
    if kind == "symlink_loop":
        return BadFolder(kind, draw(st.sampled_from([1, 2])))
    if kind == "dangling_symlink":
        return BadFolder(kind, draw(st.sampled_from(["nowhere.json", "sub/nowhere", "../nowhere"])))
    if kind == "fifo":
        return BadFolder(kind, draw(st.sampled_from(["pipe", "tokenizer.json"])))
    if kind == "index_bad_shard_name":
        return BadFolder(kind, draw(st.sampled_from([
            "../model-1.safetensors", "ABS/model-1.safetensors", "/etc/passwd", "./model-1.safetensors",
            "sub/../model-1.safetensors", "model-1.safetensors\x00", "model-1.safetensors\n", "", "missing.safetensors",
            "model-1.safetensors/", "MODEL-1.safetensors"])))
    if kind == "index_bad_json":
        d = draw(st.integers(1000, 100_000))
        return BadFolder(kind, draw(st.sampled_from([
            b"{ nope", b"", b"\xff\xfe", b"[1, 2]", b'{"weight_map": [1]}', b'{"weight_map": {"a": 1}}',
            b'{"weight_map": null}', b'{"metadata": {}}', b"[" * d + b"]" * d,
            b'{"weight_map": ' * d + b"{}" + b"}" * d])))
    if kind == "index_lies":
        return BadFolder(kind, None)
    if kind == "duplicate_tensor":
        return BadFolder(kind, draw(st.sampled_from(["a", "b", "shared.weight"])))
    if kind == "no_weights":
        return BadFolder(kind, draw(st.lists(st.sampled_from(["pytorch_model.bin", "model.pt", "weights.pth", "x.ckpt"]), max_size=3, unique=True)))
    return BadFolder(kind, draw(bad_files(kinds=LAYOUT_KINDS)))


@pytest.mark.parametrize("kind", FOLDER_KINDS)
def test_bad_model_folders_are_refused_cleanly(repo, work, kind):
    @FUZZ
    @given(bad=bad_folders(kinds=(kind,)))
    def case(bad):
        CASES[f"model folder: {kind}"] += 1
        refused(repo, bad.build(scratch(work)))

    case()


# ------------------------------------------------------------------------------ through the CLI


@pytest.fixture(scope="module")
def cli_repo(work) -> Path:
    root = work / "cli-repo"
    with Repo.init(root, chunk_size=CHUNK) as r:
        src = work / "cli-base"
        src.mkdir()
        (src / "model.safetensors").write_bytes(_good_weights())
        r.add(src, "base")
    return root


@pytest.mark.parametrize("what", ["file", "folder"])
def test_bad_input_through_the_cli_gets_one_line_and_exit_1(cli_repo, work, what):
    strategy = bad_folders() if what == "folder" else bad_files(kinds=tuple(k for k in KINDS if k != "random_header"))

    @settings(FUZZ, max_examples=6)
    @given(bad=strategy)
    def case(bad):
        CASES[f"through the CLI: {what} ({bad.kind})"] += 1
        path = bad.build(scratch(work)) if what == "folder" else _model_dir(work, bad.data)
        before = store_fingerprint(cli_repo)
        assert_user_error(run_mp("-C", cli_repo, "add", path, "--name", "fuzz"))
        assert store_fingerprint(cli_repo) == before

    case()


# ------------------------------------------------------------------------------ pickles


class _Payload:
    """Unpickling this runs code that writes a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('unpickled')",)


def test_pickle_files_are_never_unpickled(tmp_path):
    marker = tmp_path / "UNPICKLED"
    evil = pickle.dumps(_Payload(marker))
    # the payload is live: unpickling it (in another process) does write its marker
    probe = tmp_path / "probe-marker"
    subprocess.run([sys.executable, "-c", "import pickle, sys; pickle.loads(sys.stdin.buffer.read())"],
                   input=pickle.dumps(_Payload(probe)), check=True, timeout=60)
    assert probe.read_text() == "unpickled"

    root = tmp_path / "repo"
    assert run_mp("-C", root, "init", "--chunk-size", str(CHUNK)).returncode == 0
    only = tmp_path / "only-pickles"
    only.mkdir()
    for name in ("pytorch_model.bin", "model.pt", "optimizer.pth", "rng.ckpt", "x.pkl"):
        (only / name).write_bytes(evil)
    before = store_fingerprint(root)
    assert_user_error(run_mp("-C", root, "add", only, "--name", "p"), "no .safetensors weights", "never loaded")
    assert_user_error(run_mp("-C", root, "add", only / "model.pt", "--name", "p"), "not a .safetensors file")
    assert store_fingerprint(root) == before

    mixed = tmp_path / "mixed"
    shutil.copytree(only, mixed)
    (mixed / "model.safetensors").write_bytes(_good_weights())
    for args in (["add", mixed, "--name", "m"], ["show", "m"], ["ls", "m"], ["log", "m"], ["diff", "m", "m"],
                 ["checkout", "m", "-o", tmp_path / "out"], ["fsck"], ["gc"], ["status"]):
        proc = run_mp("-C", root, *args)
        assert proc.returncode == 0, proc.stderr
    assert tree_bytes(tmp_path / "out") == tree_bytes(mixed)  # stored and given back as plain bytes
    with Repo.open(root) as r:
        assert r.diff("m", "m").tensors and r.show("m").to_json()["tensors"] == 2
    assert not marker.exists()


# ------------------------------------------------------------------------------ checkout's target

name_parts = st.one_of(
    st.text(st.sampled_from(["a", "b", ".", "/", "\\", "\n", "\x1b", "\x00", ":", " ", "\u2028", "é"]), min_size=0, max_size=10),
    st.sampled_from(["..", ".", "", "../x", "../../x", "../../../x", "a/../../x", "sub/../../../x", "/abs", "ABS/x", "ABS",
                     "./a", "a//b", "a/", "C:\\x", "C:x", "x" * 300, "ok.txt", "dir/ok.txt", "dir", ".mp", ".mp/data.mdb",
                     "..\\x", "~/x", "$HOME/x"]),
)
snapshot_names = st.lists(st.lists(name_parts, min_size=1, max_size=3).map("/".join), min_size=1, max_size=5, unique=True)


def _sandbox_listing(base: Path, skip: Path) -> dict[str, bytes | None]:
    """Every path below `base` except `skip` and what is below it: files with their bytes."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(base):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if here / d != skip]
        for n in dirnames:
            out[str((here / n).relative_to(base))] = None
        for n in filenames:
            p = here / n
            out[str(p.relative_to(base))] = p.read_bytes() if p.is_file() and not p.is_symlink() else b"<special>"
    return out


@FUZZ
@given(files=snapshot_names, shards=st.lists(st.lists(name_parts, min_size=1, max_size=2).map("/".join), max_size=2))
def test_checkout_never_writes_outside_its_target(repo, work, files, shards):
    CASES["checkout of a crafted snapshot"] += 1
    base = scratch(work)
    sandbox = base / "l1" / "l2" / "sandbox"
    area = sandbox / "area"
    area.mkdir(parents=True)
    (sandbox / "sentinel.txt").write_text("mine")
    (base / "x").write_text("mine too")
    out = area / "out"
    fix = lambda n: n.replace("ABS", str(sandbox))  # noqa: E731
    files = [fix(n) for n in files]
    shards = [fix(n) for n in shards if fix(n) not in files]
    header = b'{"__metadata__":{"k":"v"}}      '

    def write(txn):
        blobs = {}
        for i, rel in enumerate(files):
            data = f"file {i}".encode()
            key = digest(data)
            txn.put_chunk(key, framed(data))
            blobs[rel] = txn.put_object(Blob(len(data), CHUNK, (key,)))
        hkey = digest(header)
        txn.put_chunk(hkey, framed(header))
        hid = txn.put_object(Blob(len(header), CHUNK, (hkey,)))
        snap = txn.put_object(Snapshot({}, blobs, tuple(Shard(s, hid, (), {"k": "v"}) for s in shards)))
        cid = txn.put_object(Commit(snap, (), "crafted", "t", "2026-01-01T00:00:00Z"))
        txn.set_ref_if_equals(BRANCH_PREFIX + "crafted", txn.ref(BRANCH_PREFIX + "crafted"), cid, "test", "2026-01-01T00:00:00Z")

    repo.store.write(write)
    before = _sandbox_listing(base, out)
    try:
        repo.checkout("crafted", out)
    except MpError as e:
        assert "\n" not in str(e)
        assert not out.exists()
        assert _sandbox_listing(base, out) == before
        return
    assert _sandbox_listing(base, out) == before
    written = tree_bytes(out)
    assert set(written) == {*files, *shards}
    for i, rel in enumerate(files):
        assert written[rel] == f"file {i}".encode()
    for rel in shards:
        assert written[rel] == struct.pack("<Q", len(header)) + header
    for p in out.rglob("*"):
        assert out.resolve() in p.resolve().parents
