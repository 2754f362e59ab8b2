"""Shared fixtures: a tiny generated model family, fresh repositories, the `mp` command as a real
subprocess, and helpers that read folders and the LMDB store byte for byte."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import lmdb
import pytest

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS.parent / "tools"))

from make_family import make_family  # noqa: E402
from s3server import s3_endpoint, s3_strict, s3_url  # noqa: E402,F401  (S3 server fixtures)

from mpstore import Repo  # noqa: E402

# Tiny shapes keep every model a few hundred KB; the suite's cost is subprocess start-up.
TINY = {"hidden": 64, "layers": 2, "vocab": 256}

_MP_SCRIPT = Path(sys.executable).parent / "mp"
MP = [str(_MP_SCRIPT)] if _MP_SCRIPT.exists() else [sys.executable, "-c", "from mpstore.cli import main; main()"]


# ------------------------------------------------------------------------------ helpers


def load_dir(folder: Path) -> dict:
    """Every tensor of a model folder's safetensors files: {name: torch tensor}."""
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def tensors_of(repo: Repo, spec: str, where: Path) -> dict:
    """Check a commit out (every chunk is hash-checked) into a fresh folder under `where` and
    load its weights."""
    out = where / f"co-{spec.replace('/', '_')}-{time.monotonic_ns()}"
    repo.checkout(spec, out)
    return load_dir(out)


def stored_tensors(repo: Repo, spec: str) -> dict:
    """A commit's tensor objects as stored (chunk digests, dtype, shape), by name."""
    with repo.store.read() as r:
        snap = r.snapshot_of(repo.resolve(spec))
        return {n: r.tensor(t) for n, t in snap.tensors.items()}


def tree_bytes(folder: Path) -> dict[str, bytes]:
    """Every regular file below `folder` as {'/'-relative path: bytes}."""
    folder = Path(folder)
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def store_fingerprint(where) -> dict[bytes, dict[bytes, bytes]]:
    """Every key and value of every named database of a store, read with lmdb directly.

    `where` is a repository folder, or an open `Repo` (lmdb refuses to open one environment
    twice in a process, so an open repository is read through its own environment handle)."""
    if isinstance(where, Repo):
        return _dump(where.store.env)
    env = lmdb.open(str(Path(where) / ".mp"), readonly=True, lock=False, max_dbs=16, subdir=True)
    try:
        return _dump(env)
    finally:
        env.close()


def _dump(env: lmdb.Environment) -> dict[bytes, dict[bytes, bytes]]:
    with env.begin() as txn:
        names = [k for k, _ in txn.cursor()]
        out = {}
        for name in names:
            db = env.open_db(name, txn=txn, create=False)
            out[name] = dict(txn.cursor(db=db))
    return out


def edit_db(root: Path, db: bytes, fn) -> None:
    """fn(txn, db handle) in a raw LMDB write transaction, as a disk fault or a stray tool would
    change the store: mpstore is out of the way (the repository must be closed)."""
    env = lmdb.open(str(Path(root) / ".mp"), max_dbs=16, subdir=True)
    try:
        with env.begin(write=True) as txn:
            fn(txn, env.open_db(db, txn=txn, create=False))
    finally:
        env.close()


def leftovers(parent: Path) -> list[str]:
    """Temporary or moved-aside folders that checkout might leave next to its target."""
    return sorted(p.name for p in Path(parent).iterdir() if ".mp-tmp-" in p.name or ".mp-old-" in p.name)


def safetensors_bytes(header: dict | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    """A safetensors file by hand: 8-byte little-endian header length, header, data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def run_mp(*args, cwd=None, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `mp ARGS` as a real subprocess; MP_REPO is unset unless `env` sets it."""
    e = dict(os.environ)
    e.pop("MP_REPO", None)
    e["MP_AUTHOR"] = "tester"
    e.update(env or {})
    return subprocess.run(
        [*MP, *map(str, args)], cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout
    )


def assert_user_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """The CLI contract for user errors: exit 1, one line `mp: error: ...`, no traceback."""
    err = proc.stderr
    assert proc.returncode == 1, f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {err}"
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    assert lines[0].startswith("mp: error: "), lines[0]
    for f in fragments:
        assert f in lines[0], f"{f!r} not in {lines[0]!r}"
    return lines[0]


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def family(tmp_path_factory) -> dict[str, Path]:
    """base, expert-1 (dense), expert-2 (partial), expert-3 (lora); one model.safetensors each."""
    return make_family(tmp_path_factory.mktemp("family"), **TINY, experts=3, seed=0)


@pytest.fixture(scope="session")
def sharded_family(tmp_path_factory) -> dict[str, Path]:
    """The same shapes written as ~50 KB shards with a model.safetensors.index.json."""
    return make_family(tmp_path_factory.mktemp("sharded"), **TINY, experts=1, kinds=("partial",),
                       seed=1, shard_size_mb=0.05)


@pytest.fixture
def repo(tmp_path) -> Repo:
    """A fresh, empty repository with the default chunk size, opened in this process."""
    r = Repo.init(tmp_path / "repo")
    yield r
    r.close()


@pytest.fixture
def copy_model(tmp_path):
    """Copy a model folder to a scratch place so a test may edit it."""

    def copy(src: Path, name: str = "model") -> Path:
        dst = tmp_path / "copies" / name
        shutil.copytree(src, dst)
        return dst

    return copy
