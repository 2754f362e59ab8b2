"""Turning a Hugging Face folder or a .safetensors file into chunks and objects (`mp add`).

Everything about the input is validated before the first byte is written, so bad input leaves
the store as it was. Bytes are then read sequentially in chunk-sized pieces (never a whole
tensor), hashed, and only chunks the store lacks are kept; they are written in batches of their
own transactions, and the objects plus the ref move in one final transaction. A crash before
that transaction leaves only unreferenced chunks, which the branch never points to. Each read
also reports the file's identity while it was read (`Observed`), for the file-identity cache
(store/filecache.py) that lets the next add of the unchanged file skip it.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..errors import BadInput
from ..store.chunks import ChunkSink, Watch
from ..store.dtypes import ITEMSIZE
from ..store.filecache import Identity, Observed
from ..store.objects import Blob, Shard, Tensor
from .header import Header, read_header
from .paths import check_relpath

WEIGHTS_SUFFIX = ".safetensors"
INDEX_SUFFIX = ".safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
SKIP_DIRS = {".git"}
HF_CACHE_PREFIXES = ("models--", "datasets--", "spaces--")  # huggingface_hub cache repository folders


@dataclass(frozen=True)
class Source:
    """A validated input: weight files with parsed headers, and every other file."""

    root: Path
    weights: dict[str, Header]  # file name -> header
    files: list[str]  # relative paths of non-tensor files


def _cannot_read(path: Path, e: OSError) -> BadInput:
    return BadInput(f"{path}: cannot read: {e.strerror or e}")


def link_roots(real_root: Path) -> tuple[Path, ...]:
    """Where symlinks below the (resolved) folder may point: the folder itself and, for a
    Hugging Face cache snapshot (`models--org--name/snapshots/<rev>/...`, whose files are links
    to `../../blobs/<hash>`), that same cache repository's `blobs/` folder — nowhere else in it
    (not its refs, not another snapshot) and never another cache repository."""
    for folder in (real_root, *real_root.parents):
        cache_repo = folder.parent.parent
        if folder.parent.name == "snapshots" and cache_repo.name.startswith(HF_CACHE_PREFIXES):
            return real_root, cache_repo / "blobs"
    return (real_root,)


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _walk(root: Path, skip: tuple[int, int] | None = None) -> list[str]:
    """Every regular file below `root`, as '/'-paths, files of a folder before its subfolders.

    Refuses (BadInput, naming the path) anything that would not come back as it is at checkout:
    an unreadable file or folder, an empty folder, a symlinked folder, a symlink that is broken
    or leads outside the folder (see `link_roots`), anything not a regular file. Folders named
    in SKIP_DIRS and the folder with identity `skip` (the repository's own store) are left out.
    """
    real_root = root.resolve()
    allowed = link_roots(real_root)
    found: list[str] = []

    def visit(folder: Path, prefix: str) -> None:
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            raise BadInput(f"{folder}: cannot read the folder: {e.strerror or e}") from None
        if prefix and not entries:
            raise BadInput(f"{folder}: empty folder {prefix[:-1]!r}: a snapshot holds files only, so it would "
                           "not come back at checkout; remove it or put a file in it")
        subfolders: list[tuple[Path, str]] = []
        for entry in entries:
            p = folder / entry.name
            rel = check_relpath(prefix + entry.name)
            try:  # from the folder listing; a stat (which may fail) only where it lacks the type
                is_link, is_dir = entry.is_symlink(), entry.is_dir(follow_symlinks=False)
            except OSError as e:
                raise _cannot_read(p, e) from None
            if is_link:
                try:
                    target = p.resolve(strict=True)
                except (OSError, RuntimeError) as e:
                    why = f" ({e.strerror})" if isinstance(e, OSError) and e.strerror else ""
                    raise BadInput(f"{p}: broken or looping symlink{why}") from None
                if target.is_dir():
                    if entry.name in SKIP_DIRS:
                        continue
                    raise BadInput(f"{p}: symlinked folders are not supported")
                if not any(root in target.parents for root in allowed):
                    raise BadInput(f"{p}: symlink points outside the folder")
            elif is_dir:
                if entry.name in SKIP_DIRS:
                    continue
                try:
                    ident = _identity(entry.stat(follow_symlinks=False))
                except OSError as e:
                    raise _cannot_read(p, e) from None
                if ident != skip:
                    subfolders.append((p, rel + "/"))
                continue
            try:
                mode = os.stat(p).st_mode
                if stat.S_ISREG(mode):
                    os.close(os.open(p, os.O_RDONLY | os.O_NONBLOCK))  # readable: refuse it now, not halfway
            except OSError as e:
                raise _cannot_read(p, e) from None
            if not stat.S_ISREG(mode):
                raise BadInput(f"{p}: not a regular file")
            found.append(rel)
        for sub, sub_prefix in subfolders:
            visit(sub, sub_prefix)

    visit(root, "")
    return found


def _check_index(root: Path, index_name: str, weights: dict[str, Header]) -> None:
    """A shard index must name existing shards and say truthfully where each tensor is."""
    path = root / index_name
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise BadInput(f"{path}: not a valid JSON shard index: {type(e).__name__}") from None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise BadInput(f"{path}: no weight_map of tensor names to shard files")
    prefix = index_name.rsplit("/", 1)[0] + "/" if "/" in index_name else ""
    for tensor, shard in weight_map.items():
        header = weights.get(prefix + shard)
        if header is None:
            raise BadInput(f"{path}: names shard {shard!r}, which is missing")
        if all(t.name != tensor for t in header.tensors):
            raise BadInput(f"{path}: says {tensor!r} is in {shard!r}, but it is not")


def scan(path: Path, store: Path | None = None) -> Source:
    """Validate `path` completely (headers, index, names) without storing anything.

    `store`: the repository's own store folder, which is never ingested (`mp add .` in the
    repository, or any folder holding it); adding the store itself, or a path in it, is refused."""
    try:
        st = os.stat(path)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            raise BadInput(f"{path}: no such file or folder") from None
        raise _cannot_read(path, e) from None
    skip = None
    if store is not None:
        try:
            skip = _identity(os.stat(store))
        except OSError:
            skip = None
        real_store = store.resolve()
        real = path.resolve()
        if real == real_store or real_store in real.parents:
            raise BadInput(f"{path}: is the repository's own store ({store}); add a model folder instead")
    if stat.S_ISREG(st.st_mode):
        if not path.name.endswith(WEIGHTS_SUFFIX):
            raise BadInput(f"{path}: not a .safetensors file or a model folder")
        check_relpath(path.name)
        return Source(path.parent, {path.name: read_header(path)}, [])
    if not stat.S_ISDIR(st.st_mode):
        raise BadInput(f"{path}: not a regular file or folder")
    rels = _walk(path, skip)
    weight_names = [r for r in rels if "/" not in r and r.endswith(WEIGHTS_SUFFIX)]
    if not weight_names:
        pickles = [r for r in rels if r.endswith(PICKLE_SUFFIXES)]
        hint = f" (pickle files such as {pickles[0]} are never loaded: convert to safetensors)" if pickles else ""
        raise BadInput(f"{path}: no .safetensors weights in this folder{hint}")
    weights = {r: read_header(path / r) for r in weight_names}
    owner: dict[str, str] = {}
    for file, header in weights.items():
        for t in header.tensors:
            if t.name in owner:
                raise BadInput(f"{path}: tensor {t.name!r} is in both {owner[t.name]} and {file}")
            owner[t.name] = file
    for r in rels:
        if "/" not in r and r.endswith(INDEX_SUFFIX):
            _check_index(path, r, weights)
    return Source(path, weights, [r for r in rels if r not in weights])


def identity(path: Path) -> Identity:
    """The file's identity now, for a file-identity cache lookup (see store.filecache)."""
    try:
        return Identity.of(os.stat(path))
    except OSError as e:
        raise _cannot_read(path, e) from None


def _observed(f: BinaryIO, before: os.stat_result, began_ns: int) -> Observed | None:
    """The file's identity during a read that began at `began_ns`, or None if it changed meanwhile
    (what was read is still stored, but the cache must not vouch for it)."""
    seen = Identity.of(before)
    return Observed(seen, began_ns) if Identity.of(os.fstat(f.fileno())) == seen else None


def read_blob(sink: ChunkSink, path: Path, where: str) -> tuple[Blob, Observed | None]:
    try:
        with open(path, "rb") as f:
            began = time.time_ns()
            before = os.fstat(f.fileno())
            blob = Blob(before.st_size, sink.chunk_size, sink.consume(f, before.st_size, where))
            return blob, _observed(f, before, began)
    except OSError as e:  # validated readable; this is the file changing or failing under us
        raise _cannot_read(path, e) from None


WatchTensor = Callable[[str, str, tuple[int, ...]], Watch | None]  # name, dtype, shape -> its chunks' watcher


def read_weights(sink: ChunkSink, path: Path, header: Header, watch: WatchTensor | None = None,
                 base: dict[str, Tensor] | None = None) -> tuple[dict[str, Tensor], Observed | None]:
    """Every tensor of one safetensors file, read in file order; `watch` sees each chunk as it
    is hashed (the delta catalog measures it then). `base`: the base model's tensors by name, whose
    chunks a new chunk may be stored as a delta against (same dtype, shape and chunk size)."""
    tensors: dict[str, Tensor] = {}
    try:
        with open(path, "rb") as f:
            began = time.time_ns()
            before = os.fstat(f.fileno())
            f.seek(header.data_start)
            for t in header.tensors:
                size = t.end - t.begin
                b = (base or {}).get(t.name)
                same = b is not None and (b.dtype, b.shape, b.chunk_size) == (t.dtype, t.shape, sink.chunk_size)
                chunks = sink.consume(f, size, f"{path}: tensor {t.name!r}",
                                      watch(t.name, t.dtype, t.shape) if watch is not None else None,
                                      ITEMSIZE.get(t.dtype, 1), b.chunks if same and b is not None else None)
                tensors[t.name] = Tensor(size, sink.chunk_size, chunks, t.dtype, t.shape)
            return tensors, _observed(f, before, began)
    except OSError as e:
        raise _cannot_read(path, e) from None


def total_bytes(source: Source) -> int:
    total = 0
    for rel in [*source.weights, *source.files]:
        try:
            total += (source.root / rel).stat().st_size
        except OSError as e:
            raise _cannot_read(source.root / rel, e) from None
    return total


def shard_record(file: str, header: Header, header_id: bytes) -> Shard:
    return Shard(file, header_id, tuple(t.name for t in header.tensors), header.metadata)
