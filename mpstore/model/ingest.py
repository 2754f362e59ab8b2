"""Turning a Hugging Face folder or a .safetensors file into chunks and objects (`mp add`).

Everything about the input is validated before the first byte is written, so bad input leaves
the store as it was. Bytes are then read sequentially in chunk-sized pieces (never a whole
tensor), hashed, and only chunks the store lacks are kept; they are written in batches of their
own transactions, and the objects plus the ref move in one final transaction. A crash before
that transaction leaves only unreferenced chunks, which the branch never points to.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadInput
from ..store.chunks import ChunkSink
from ..store.objects import Blob, Shard, Tensor
from .header import Header, read_header
from .paths import check_relpath

WEIGHTS_SUFFIX = ".safetensors"
INDEX_SUFFIX = ".safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
SKIP_DIRS = {".git"}


@dataclass(frozen=True)
class Source:
    """A validated input: weight files with parsed headers, and every other file."""

    root: Path
    weights: dict[str, Header]  # file name -> header
    files: list[str]  # relative paths of non-tensor files


def _walk(root: Path) -> list[str]:
    """Every regular file below `root`, as '/'-paths; symlinks must stay inside `root`."""
    real_root = root.resolve()
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        here = Path(dirpath)
        for d in dirnames:
            if (here / d).is_symlink():
                raise BadInput(f"{here / d}: symlinked folders are not supported")
        for name in sorted(filenames):
            p = here / name
            rel = p.relative_to(root).as_posix()
            check_relpath(rel)
            if p.is_symlink():
                try:
                    target = p.resolve(strict=True)
                except (OSError, RuntimeError):
                    raise BadInput(f"{p}: broken or looping symlink") from None
                if real_root not in target.parents:
                    raise BadInput(f"{p}: symlink points outside the folder")
            try:
                mode = os.stat(p).st_mode
            except OSError as e:
                raise BadInput(f"{p}: cannot read: {e.strerror}") from None
            if not stat.S_ISREG(mode):
                raise BadInput(f"{p}: not a regular file")
            found.append(rel)
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


def scan(path: Path) -> Source:
    """Validate `path` completely (headers, index, names) without storing anything."""
    if not path.exists():
        raise BadInput(f"{path}: no such file or folder")
    if path.is_file():
        if not path.name.endswith(WEIGHTS_SUFFIX):
            raise BadInput(f"{path}: not a .safetensors file or a model folder")
        check_relpath(path.name)
        return Source(path.parent, {path.name: read_header(path)}, [])
    if not path.is_dir():
        raise BadInput(f"{path}: not a regular file or folder")
    rels = _walk(path)
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


def read_blob(sink: ChunkSink, path: Path, where: str) -> Blob:
    size = path.stat().st_size
    with open(path, "rb") as f:
        return Blob(size, sink.chunk_size, sink.consume(f, size, where))


def read_weights(sink: ChunkSink, path: Path, header: Header) -> dict[str, Tensor]:
    """Every tensor of one safetensors file, read in file order."""
    tensors: dict[str, Tensor] = {}
    with open(path, "rb") as f:
        f.seek(header.data_start)
        for t in header.tensors:
            size = t.end - t.begin
            chunks = sink.consume(f, size, f"{path}: tensor {t.name!r}")
            tensors[t.name] = Tensor(size, sink.chunk_size, chunks, t.dtype, t.shape)
    return tensors



def total_bytes(source: Source) -> int:
    return sum((source.root / r).stat().st_size for r in [*source.weights, *source.files])


def shard_record(file: str, header: Header, header_id: bytes) -> Shard:
    return Shard(file, header_id, tuple(t.name for t in header.tensors), header.metadata)
