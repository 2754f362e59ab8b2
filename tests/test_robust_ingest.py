"""Adversarial input to `mp add`, found by a user trying to break it: the repository's own store,
unreadable files and folders, over-long names, Hugging Face cache symlinks, colons, empty
folders, fractional sizes, over-long branch names, and generated file and folder names.

The contract is the one of tests/test_bad_input.py: bad input is refused with one line
`mp: error: ...` naming the problem and the path, exit 1, no traceback, and every key and value
of the store exactly as it was; good input is stored and checks out byte for byte. Everything is
real: LMDB stores, files on disk, the `mp` command as a subprocess where the exit status matters.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import MP, assert_user_error, run_mp, store_fingerprint, tree_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from mpstore import Repo
from mpstore.errors import BadInput, MpError

CHUNK = 4096
FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large, HealthCheck.filter_too_much])


def tiny_model(folder: Path, fill: float = 0.0) -> Path:
    """A few-KB model folder: one safetensors file and a config; `fill` changes its weights."""
    folder.mkdir(parents=True)
    w = torch.arange(600, dtype=torch.float32) + fill
    save_file({"w": w, "b": torch.ones(3)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text('{"model_type": "x"}\n')
    return folder


@pytest.fixture
def store(tmp_path) -> Path:
    """A closed repository (chunk size 4 KiB) holding a tiny model on branch `base`."""
    root = tmp_path / "repo"
    with Repo.init(root, chunk_size=CHUNK) as r:
        r.add(tiny_model(tmp_path / "base"), "base")
    return root


def refused(store: Path, path: Path | str, *fragments: str, cwd: Path | None = None) -> str:
    """`mp add PATH` must fail in one line holding `fragments` and leave the store as it was."""
    before = store_fingerprint(store)
    line = assert_user_error(run_mp("-C", store, "add", path, "--name", "bad", cwd=cwd), *fragments)
    assert store_fingerprint(store) == before
    return line


def checked_out(store: Path, ref: str, out: Path) -> dict[str, bytes]:
    proc = run_mp("-C", store, "checkout", ref, "-o", out)
    assert proc.returncode == 0, proc.stderr
    return tree_bytes(out)


def snapshot_files(root: Path, ref: str) -> list[str]:
    with Repo.open(root) as r, r.store.read() as txn:
        snap = txn.snapshot_of(r.resolve(ref))
        return [*snap.files, *(s.file for s in snap.shards)]


# ------------------------------------------------------------------------------ 1. the store itself


def test_add_dot_in_the_repository_does_not_store_its_own_store(tmp_path):
    root = tiny_model(tmp_path / "work")  # the model's files lie in the repository's root
    Repo.init(root, chunk_size=CHUNK, map_size=1 << 24).close()
    want = {k: v for k, v in tree_bytes(root).items() if not k.startswith(".mp/")}
    proc = run_mp("add", ".", "--name", "m", cwd=root)
    assert proc.returncode == 0, proc.stderr
    assert sorted(snapshot_files(root, "m")) == sorted(want)
    with Repo.open(root) as r:
        assert r.commit("m").commit.message == "add work"  # the folder's real name, not ""
    assert checked_out(root, "m", tmp_path / "out") == want


def test_add_of_a_folder_holding_the_repository_does_not_store_its_store(tmp_path):
    parent = tiny_model(tmp_path / "parent")
    root = parent / "repo"
    Repo.init(root, chunk_size=CHUNK, map_size=1 << 24).close()
    (root / "notes.txt").write_text("the user's own file next to .mp")
    want = {k: v for k, v in tree_bytes(parent).items() if not k.startswith("repo/.mp/")}
    proc = run_mp("add", "..", "--name", "m", cwd=root)
    assert proc.returncode == 0, proc.stderr
    assert sorted(snapshot_files(root, "m")) == sorted(want)
    with Repo.open(root) as r:
        assert r.commit("m").commit.message == "add parent"
    assert checked_out(root, "m", tmp_path / "out") == want


@pytest.mark.parametrize("inside", [".mp", ".mp/../.mp"])
def test_add_of_the_store_itself_is_refused(store, inside):
    refused(store, inside, ".mp", "the repository's own store", cwd=store)


# ------------------------------------------------------------------------------ 2. unreadable input

PR_CAPBSET_DROP = 24
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2


def _drop_file_permission_override() -> None:
    """In the child, before exec: remove root's power to ignore file modes (the two DAC
    capabilities) from the bounding set, so the exec'd `mp` obeys chmod like any user."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _unprivileged(argv: list[str]) -> subprocess.CompletedProcess:
    """Run `argv` as a process that file permissions apply to (as root: without the DAC
    capabilities; otherwise the user already is one)."""
    e = dict(os.environ)
    e.pop("MP_REPO", None)
    e["MP_AUTHOR"] = "tester"
    return subprocess.run(argv, env=e, capture_output=True, text=True, timeout=120,
                          preexec_fn=_drop_file_permission_override if os.geteuid() == 0 else None)


def run_mp_unprivileged(*args) -> subprocess.CompletedProcess:
    return _unprivileged([*MP, *map(str, args)])


def api_add_unprivileged(store: Path, folder: Path) -> str:
    """`Repo.add` in an unprivileged process: the class name of what it raised, or 'ok'."""
    code = ("import sys\nfrom mpstore import Repo\n"
            "try:\n    Repo.open(sys.argv[1]).add(sys.argv[2], 'bad')\nexcept BaseException as e:\n"
            "    print(type(e).__name__)\nelse:\n    print('ok')")
    proc = _unprivileged([sys.executable, "-c", code, str(store), str(folder)])
    return proc.stdout.strip() or proc.stderr


def test_unprivileged_runner_really_obeys_file_modes(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("x")
    secret.chmod(0)
    probe = subprocess.run(["cat", str(secret)], capture_output=True, preexec_fn=_drop_file_permission_override
                           if os.geteuid() == 0 else None)
    assert probe.returncode != 0 and b"Permission denied" in probe.stderr


@pytest.mark.parametrize("what,mode", [
    ("tokenizer.json", 0o000),  # a non-tensor file nobody may read
    ("sub", 0o000),  # a subfolder nobody may list
    ("sub", 0o600),  # a subfolder that can be listed but not entered
    ("model.safetensors", 0o000),
])
def test_unreadable_file_or_folder_is_refused(store, tmp_path, what, mode):
    folder = tiny_model(tmp_path / "model", fill=1.0)  # chunks the store lacks
    (folder / "tokenizer.json").write_text("{}")
    (folder / "sub").mkdir()
    (folder / "sub" / "extra.txt").write_text("inside")
    (folder / what).chmod(mode)
    before = store_fingerprint(store)
    try:
        proc = run_mp_unprivileged("-C", store, "add", folder, "--name", "bad")
        raised = api_add_unprivileged(store, folder)
    finally:
        (folder / what).chmod(0o755)
    assert_user_error(proc, what, "Permission denied")
    assert raised == "BadInput"  # refused by validation, not an OSError caught on the way out
    assert store_fingerprint(store) == before


# ------------------------------------------------------------------------------ 3. long names

LONG = "x" * 300  # longer than any file system's 255-byte component limit


def _long_source(tmp_path: Path) -> Path:
    return tmp_path / LONG


def _long_file_in_folder(tmp_path: Path) -> Path:
    return tiny_model(tmp_path / "model") / (LONG + ".safetensors")


def _long_folder_in_path(tmp_path: Path) -> Path:
    return tmp_path / LONG / "model"


def _symlink_to_long_name(tmp_path: Path) -> Path:
    folder = tiny_model(tmp_path / "model")
    os.symlink(LONG, folder / "tokenizer.json")
    return folder


def _deeper_than_path_max(tmp_path: Path) -> Path:
    """A folder whose files lie deeper than PATH_MAX (4096 bytes): each component is legal."""
    folder = tiny_model(tmp_path / "model")
    fd = os.open(folder, os.O_RDONLY)
    try:
        for _ in range(22):
            os.mkdir("d" * 200, dir_fd=fd)
            inner = os.open("d" * 200, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = inner
        out = os.open("deep.txt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(out, b"deep")
        os.close(out)
    finally:
        os.close(fd)
    return folder


@pytest.mark.parametrize("make", [_long_source, _long_file_in_folder, _long_folder_in_path, _symlink_to_long_name,
                                  _deeper_than_path_max], ids=lambda f: f.__name__.strip("_"))
def test_overlong_path_components_are_refused_in_one_line(store, tmp_path, make):
    path = make(tmp_path)
    refused(store, path, "too long")
    with Repo.open(store) as r:  # refused by validation, as an MpError, through the API as well
        with pytest.raises(BadInput, match="too long"):
            r.add(path, "bad")


# ------------------------------------------------------------------------------ 4. Hugging Face cache


def hf_cache(hub: Path, model: Path, repo_name: str = "models--org--tiny") -> Path:
    """The layout huggingface_hub downloads into: blobs named by hash, and a snapshot folder of
    relative symlinks `../../blobs/<hash>` (one more `../` per subfolder). Returns the snapshot."""
    repo = hub / repo_name
    rev = "0123456789abcdef" * 2 + "01234567"
    blobs, snap = repo / "blobs", repo / "snapshots" / rev
    blobs.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    for rel, data in tree_bytes(model).items():
        blob = blobs / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    return snap


@pytest.fixture
def hf_model(tmp_path, family) -> Path:
    model = tmp_path / "original"
    shutil.copytree(family["base"], model)
    (model / "tokenizer").mkdir()
    (model / "tokenizer" / "vocab.json").write_text('{"a": 1}')
    (model / "tokenizer" / "copy-of-config.json").write_bytes((model / "config.json").read_bytes())  # a shared blob
    return model


def test_hugging_face_cache_snapshot_is_stored_as_regular_files(store, tmp_path, hf_model):
    snap = hf_cache(tmp_path / "hub", hf_model)
    assert all(p.is_symlink() for p in snap.rglob("*") if not p.is_dir())
    proc = run_mp("-C", store, "add", snap, "--name", "hf")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    assert checked_out(store, "hf", out) == tree_bytes(hf_model)
    for p in out.rglob("*"):
        assert not p.is_symlink() and (p.is_dir() or p.is_file())
    assert run_mp("-C", store, "fsck").returncode == 0


def _link_outside_the_cache_repo(hub: Path, snap: Path) -> None:
    (hub / "outside.txt").write_text("not in the cache repository")
    os.symlink("../../../outside.txt", snap / "evil.txt")


def _link_into_another_cache_repo(hub: Path, snap: Path) -> None:
    other = hub / "models--org--other" / "blobs"
    other.mkdir(parents=True)
    (other / "abc").write_text("another model's blob")
    os.symlink("../../../models--org--other/blobs/abc", snap / "evil.txt")


def _absolute_link_out(hub: Path, snap: Path) -> None:
    (hub / "outside.txt").write_text("not in the cache repository")
    os.symlink(hub / "outside.txt", snap / "evil.txt")


@pytest.mark.parametrize("escape", [_link_outside_the_cache_repo, _link_into_another_cache_repo, _absolute_link_out],
                         ids=lambda f: f.__name__.strip("_"))
def test_hugging_face_cache_links_escaping_the_cache_repo_are_refused(store, tmp_path, hf_model, escape):
    hub = tmp_path / "hub"
    snap = hf_cache(hub, hf_model)
    escape(hub, snap)
    refused(store, snap, "evil.txt", "symlink points outside")


def test_cache_like_links_outside_a_cache_layout_are_refused(store, tmp_path, hf_model):
    """The same relative links, but the folder above `snapshots/` is not a cache repository."""
    snap = hf_cache(tmp_path / "hub", hf_model, repo_name="my-models")
    refused(store, snap, "symlink points outside")


# ------------------------------------------------------------------------------ 5. colons


COLON_NAMES = ["a:b.txt", "sub/c:d.json", "::", "weird:name:", "sub/C:", "ab:/x"]


def test_colon_in_a_file_name_is_accepted(store, tmp_path):
    folder = tiny_model(tmp_path / "model")
    for name in COLON_NAMES:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(f"colon {name}")
    proc = run_mp("-C", store, "add", folder, "--name", "colon")
    assert proc.returncode == 0, proc.stderr
    assert set(COLON_NAMES) <= set(snapshot_files(store, "colon"))
    assert checked_out(store, "colon", tmp_path / "out") == tree_bytes(folder)


@pytest.mark.parametrize("name", ["C:/x", "z:", "a\\b"])
def test_names_absolute_on_windows_are_refused(store, tmp_path, name):
    folder = tiny_model(tmp_path / "model")
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("drive")
    refused(store, folder, repr(name.split("/")[0]))


# ------------------------------------------------------------------------------ 6. empty folders


@pytest.mark.parametrize("empty", ["empty", "sub/deeper"])
def test_empty_folder_is_refused_not_dropped(store, tmp_path, empty):
    folder = tiny_model(tmp_path / "model")
    (folder / empty).mkdir(parents=True)
    (folder / "sub").mkdir(exist_ok=True)
    (folder / "sub" / "file.txt").write_text("keeps sub non-empty")
    refused(store, folder, repr(empty), "empty folder")


# ------------------------------------------------------------------------------ 7. fractional sizes


@pytest.mark.parametrize("size", ["4096.7", "4100.5", "0.3k", "4096.000001"])
def test_fractional_chunk_size_is_refused(tmp_path, size):
    assert_user_error(run_mp("-C", tmp_path / "r", "init", "--chunk-size", size), repr(size), "whole number of bytes")
    assert not (tmp_path / "r" / ".mp").exists()


@pytest.mark.parametrize("size,bytes_", [("4096.0", 4096), ("1.5MiB", 1536 << 10), ("8k", 8192)])
def test_whole_chunk_sizes_written_with_a_fraction_are_accepted(tmp_path, size, bytes_):
    proc = run_mp("-C", tmp_path / "r", "init", "--chunk-size", size)
    assert proc.returncode == 0, proc.stderr
    with Repo.open(tmp_path / "r") as r:
        assert r.chunk_size == bytes_


@pytest.mark.parametrize("size", [4096.7, 4096.0, "4096", True])
def test_chunk_size_that_is_not_an_int_is_refused_by_the_api(tmp_path, size):
    with pytest.raises(MpError, match="chunk size"):
        Repo.init(tmp_path / "r", chunk_size=size)
    assert not (tmp_path / "r" / ".mp").exists()


# ------------------------------------------------------------------------------ 8. long branch names


def test_overlong_branch_name_is_refused_before_anything_is_written(store, tmp_path):
    folder = tiny_model(tmp_path / "model")
    (folder / "new.txt").write_text("chunks the store lacks")
    before = store_fingerprint(store)
    assert_user_error(run_mp("-C", store, "add", folder, "--name", "a" * 600), "name")
    assert store_fingerprint(store) == before


# ------------------------------------------------------------------------------ 9. generated names

_LEGAL = [*"ab.:-_ ", "é", "中", "\u2028", "🙂"]
_ILLEGAL = ["\\", "\x1b", "\x7f", "\udcff"]  # backslash, control characters, an undecodable byte


def _components(alphabet: list[str]) -> st.SearchStrategy[str]:
    return st.one_of(
        st.text(st.sampled_from(alphabet), min_size=1, max_size=8),
        st.sampled_from(["a:b", "C:", "x:", ".hidden", "...", "a.", ".mp", "con", "..x", "x..", "~", "a b"]),
        st.integers(200, 255).map(lambda n: "n" * n),  # long, yet within the 255-byte limit
        st.integers(100, 127).map(lambda n: "é" * n),  # long in bytes (2 each)
    ).filter(lambda c: c not in (".", "..", ".git") and len(os.fsencode(c)) <= 255)


# mostly entries that may well be fine, plus at most one that is likely bad
_good = st.tuples(st.lists(_components(_LEGAL), min_size=1, max_size=3), st.sampled_from(["file", "link_inside"]))
_bad = st.tuples(st.lists(_components(_LEGAL + _ILLEGAL), min_size=1, max_size=3),
                 st.sampled_from(["file", "dir", "link_outside", "link_long"]))
entries = st.tuples(st.lists(_good, max_size=4), st.none() | _bad).map(lambda t: t[0] + ([t[1]] if t[1] else []))


def build_tree(root: Path, spec: list[tuple[list[str], str]]) -> Path:
    """A tiny model folder plus the generated entries (those the file system refuses to create,
    such as a file below a file, are left out)."""
    folder = tiny_model(root / "model")
    (root / "outside.txt").write_text("not yours")
    for i, (parts, kind) in enumerate(spec):
        p = folder.joinpath(*parts)
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            if kind == "file":
                p.write_bytes(f"file {i}".encode() * i)
            elif kind == "dir":
                p.mkdir()
            elif kind == "link_inside":
                os.symlink(os.path.relpath(folder / "config.json", p.parent), p)
            elif kind == "link_outside":
                os.symlink(os.path.relpath(root / "outside.txt", p.parent), p)
            else:
                os.symlink(LONG, p)
        except OSError:
            continue
    return folder


def should_refuse(folder: Path) -> bool:
    """An independent statement of the rules: names with control characters, backslashes or
    undecodable bytes, a first component that is a Windows drive, empty folders, and symlinks
    that do not lead to a regular file inside the folder are refused; all else is accepted."""
    real = os.path.realpath(folder)
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        if here != folder and not dirnames and not filenames:
            return True
        for name in dirnames + filenames:
            p = here / name
            rel = p.relative_to(folder).as_posix()
            if re.search(r"[\x00-\x1f\x7f\\]", rel) or re.fullmatch(r"[A-Za-z]:", rel.split("/")[0]):
                return True
            try:
                rel.encode()
            except UnicodeEncodeError:
                return True
            if p.is_symlink():
                target = os.path.realpath(p)
                if not target.startswith(real + os.sep) or not os.path.isfile(target) or os.path.isdir(p):
                    return True
    return False


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("names")


@pytest.fixture(scope="module")
def fuzz_repo(work):
    r = Repo.init(work / "repo", chunk_size=CHUNK)
    r.add(tiny_model(work / "base"), "base")
    yield r
    r.close()


@settings(FUZZ, max_examples=80)
@given(spec=entries)
def test_generated_file_and_folder_names_round_trip_or_are_refused_cleanly(fuzz_repo, work, spec):
    root = Path(tempfile.mkdtemp(dir=work, prefix="case-"))
    folder = build_tree(root, spec)
    refuse = should_refuse(folder)
    before = store_fingerprint(fuzz_repo)
    try:
        fuzz_repo.add(folder, "fuzz")
    except MpError as e:
        assert store_fingerprint(fuzz_repo) == before, "a refused add changed the store"
        assert str(e) and "\n" not in str(e) and "\r" not in str(e), repr(str(e))
        assert refuse, f"refused a valid folder: {e}"
        return
    assert not refuse, "accepted a folder that breaks the rules"
    fuzz_repo.checkout("fuzz", root / "out")
    assert tree_bytes(root / "out") == tree_bytes(folder)


@pytest.fixture(scope="module")
def fuzz_cli_repo(work) -> Path:
    root = work / "cli-repo"
    with Repo.init(root, chunk_size=CHUNK) as r:
        r.add(tiny_model(work / "cli-base"), "base")
    return root


@settings(FUZZ, max_examples=8)
@given(spec=entries)
def test_generated_names_through_the_cli(fuzz_cli_repo, work, spec):
    root = Path(tempfile.mkdtemp(dir=work, prefix="cli-"))
    folder = build_tree(root, spec)
    before = store_fingerprint(fuzz_cli_repo)
    proc = run_mp("-C", fuzz_cli_repo, "add", folder, "--name", "fuzz")
    if should_refuse(folder):
        assert_user_error(proc)
        assert store_fingerprint(fuzz_cli_repo) == before
    else:
        assert proc.returncode == 0, proc.stderr
        assert checked_out(fuzz_cli_repo, "fuzz", root / "out") == tree_bytes(folder)
