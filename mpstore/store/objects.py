"""The object kinds of the store and how each is encoded; nothing here touches LMDB.

Every object is a msgpack map with a `type` field, written in a fixed field order so that the
same content always encodes to the same bytes; its id is the xxh3-128 digest of that encoding.
Objects are immutable: a change is a new object with a new id.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cached_property
from typing import Any, ClassVar

import msgpack

from ..errors import CorruptData
from .ids import digest

TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"  # commit and reflog times: UTC, sortable as text


def timestamp(when: datetime | None = None) -> str:
    """A commit or reflog time; gc compares these strings, so every writer uses this one."""
    return (when or datetime.now(timezone.utc)).strftime(TIME_FORMAT)


class Stored:
    """What every object kind shares: canonical bytes and the id they hash to, computed once
    (an object is immutable, and ids are asked for again and again while a commit is built)."""

    TYPE: ClassVar[str]

    def fields(self) -> dict[str, Any]:
        raise NotImplementedError

    @cached_property
    def encoded(self) -> bytes:
        """The canonical bytes: msgpack of `type` then the fields in their fixed order."""
        return msgpack.packb({"type": self.TYPE, **self.fields()}, use_bin_type=True)

    @cached_property
    def id(self) -> bytes:
        return digest(self.encoded)


@dataclass(frozen=True)
class Chunked(Stored):
    """Bytes cut into `chunk_size` pieces, each stored under its digest (a blob or a tensor)."""

    size: int
    chunk_size: int
    chunks: tuple[bytes, ...]

    def spans(self) -> list[tuple[int, int]]:
        """(start, end) byte range of each chunk within the whole."""
        return [
            (i * self.chunk_size, min((i + 1) * self.chunk_size, self.size))
            for i in range(len(self.chunks))
        ]

    def chunk_len(self, c: int) -> int:
        """Bytes of chunk c (the last one may be short)."""
        return min(self.chunk_size, self.size - c * self.chunk_size)


@dataclass(frozen=True)
class Blob(Chunked):
    """A non-tensor file (config, tokenizer, README) or a safetensors header, byte for byte."""

    TYPE: ClassVar[str] = "blob"

    def fields(self) -> dict:
        return {"size": self.size, "chunk_size": self.chunk_size, "chunks": list(self.chunks)}

    @classmethod
    def from_fields(cls, d: dict) -> Blob:
        return cls(d["size"], d["chunk_size"], tuple(d["chunks"]))


@dataclass(frozen=True)
class Tensor(Chunked):
    """A tensor's raw little-endian bytes as chunks, with what is needed to interpret them."""

    TYPE: ClassVar[str] = "tensor"
    dtype: str = ""
    shape: tuple[int, ...] = ()

    def fields(self) -> dict:
        return {
            "dtype": self.dtype,
            "shape": list(self.shape),
            "size": self.size,
            "chunk_size": self.chunk_size,
            "chunks": list(self.chunks),
        }

    @classmethod
    def from_fields(cls, d: dict) -> Tensor:
        return cls(d["size"], d["chunk_size"], tuple(d["chunks"]), d["dtype"], tuple(d["shape"]))


@dataclass(frozen=True)
class Shard:
    """One safetensors file of a snapshot: its name, raw header, and tensors in byte order."""

    file: str
    header: bytes  # blob id of the raw header bytes
    tensors: tuple[str, ...]
    metadata: dict[str, str] | None

    def fields(self) -> dict:
        return {
            "file": self.file,
            "header": self.header,
            "tensors": list(self.tensors),
            "metadata": self.metadata,
        }

    @classmethod
    def from_fields(cls, d: dict) -> Shard:
        return cls(d["file"], d["header"], tuple(d["tensors"]), d["metadata"])


@dataclass(frozen=True)
class Snapshot(Stored):
    """A whole model folder: tensors by name, other files by path, and the shard layout."""

    TYPE: ClassVar[str] = "snapshot"
    tensors: dict[str, bytes]  # tensor name -> tensor id
    files: dict[str, bytes]  # relative path -> blob id (non-tensor files)
    shards: tuple[Shard, ...]

    def fields(self) -> dict:
        return {
            "tensors": dict(sorted(self.tensors.items())),
            "files": dict(sorted(self.files.items())),
            "shards": [s.fields() for s in self.shards],
        }

    @classmethod
    def from_fields(cls, d: dict) -> Snapshot:
        return cls(d["tensors"], d["files"], tuple(Shard.from_fields(s) for s in d["shards"]))


@dataclass(frozen=True)
class Commit(Stored):
    """A snapshot in history: who made it, when, from what, and (for merges) by which plan."""

    TYPE: ClassVar[str] = "commit"
    snapshot: bytes
    parents: tuple[bytes, ...]
    message: str
    author: str
    time: str  # UTC, ISO 8601 with a trailing Z
    base: bytes | None = None  # the commit this model was fine-tuned from (`mp add --base`)
    plan: bytes | None = None  # the merge plan object, for merge commits
    new_bytes: int = 0  # chunk bytes this commit's add wrote that the store did not hold
    stats: dict | None = None  # what a merge really did (bytes read by source, chunks skipped)
    # Where an added model came from: {"hf": "ORG/NAME", "revision": "<40-hex commit>"} for a
    # model from the Hugging Face cache (model/hub.py); None: a folder of unknown origin, or a merge.
    source: dict | None = None

    def fields(self) -> dict:
        optional = {"source": self.source} if self.source is not None else {}
        return {
            "snapshot": self.snapshot,
            "parents": list(self.parents),
            "message": self.message,
            "author": self.author,
            "time": self.time,
            "base": self.base,
            "plan": self.plan,
            "new_bytes": self.new_bytes,
            "stats": self.stats,
            **optional,  # absent when unset, so commits that predate it keep their ids
        }

    @classmethod
    def from_fields(cls, d: dict) -> Commit:
        return cls(
            d["snapshot"], tuple(d["parents"]), d["message"], d["author"], d["time"],
            d["base"], d["plan"], d["new_bytes"], d["stats"], d.get("source"),
        )


@dataclass(frozen=True)
class Plan(Stored):
    """Everything a merge needs to be executed again bit for bit, and nothing else."""

    TYPE: ClassVar[str] = "plan"
    method: str
    base: bytes | None  # base commit id (None for methods without a base)
    models: tuple[bytes, ...]  # the other inputs' commit ids, in order
    model_params: tuple[dict, ...]  # per input: {parameter: [value at model level, global, default]}
    global_params: dict  # {parameter: [value at global level, default]}
    seed: int
    compute_dtype: str | None  # safetensors dtype name; None: each tensor's own dtype
    out_dtype: str | None  # None: the compute dtype
    chunk_size: int
    engine: int  # executor version: a replay under another engine may legitimately differ
    # A budgeted merge: {tensor: [bitmap of the input's omitted chunks, or None, per input]};
    # omitted chunks are read as the base's (zero delta). None: every chunk is read.
    omit: dict | None = None
    budget: dict | None = None  # {"spec", "bytes", "select"} as the user asked
    estimate: dict | None = None  # the planner's prediction: bytes by source, error bound, time
    # MergeKit `slices:` (docs/architecture.md, "Plan"): per output slice {"sources": [[input, first
    # layer, end layer], ...], "base": input or None, "model_params": [chains per source],
    # "global_params": {chains}}; inputs number `models`. None: one slice, every layer of `models`.
    slices: list | None = None
    # Per input of (base, *models): the commit id of a LoRA adapter applied to it (`model+adapter`),
    # or None. None: no adapters.
    adapters: list | None = None
    # `tokenizer_source` / `tokenizer:`: {"source": "base" | "union" | input number, "tokens": {...},
    # "pad_to_multiple_of": int or None}; None: the template's tokenizer files as they are.
    tokenizer: dict | None = None
    chat_template: str | None = None  # as the YAML gives it: "auto", a built-in name or a template

    def fields(self) -> dict:
        omit = None if self.omit is None else dict(sorted(self.omit.items()))
        optional = {k: v for k, v in (("omit", omit), ("budget", self.budget), ("estimate", self.estimate),
                                      ("slices", self.slices), ("adapters", self.adapters),
                                      ("tokenizer", self.tokenizer), ("chat_template", self.chat_template))
                    if v is not None}
        return {
            "method": self.method,
            "base": self.base,
            "models": list(self.models),
            "model_params": [dict(sorted(m.items())) for m in self.model_params],
            "global_params": dict(sorted(self.global_params.items())),
            "seed": self.seed,
            "compute_dtype": self.compute_dtype,
            "out_dtype": self.out_dtype,
            "chunk_size": self.chunk_size,
            "engine": self.engine,
            **optional,  # absent when unset, so plans that predate them keep their ids
        }

    def to_json(self) -> dict[str, Any]:
        """The plan as JSON: ids in hex, omission bitmaps as the omitted chunk numbers."""
        out = self.fields()
        out["base"] = self.base.hex() if self.base else None
        out["models"] = [m.hex() for m in self.models]
        if self.omit:
            out["omit"] = {name: [None if bits is None else sorted(bitmap_members(bits)) for bits in per_input]
                           for name, per_input in out["omit"].items()}
        if self.adapters:
            out["adapters"] = [a.hex() if a else None for a in self.adapters]
        if self.tokenizer:
            out["tokenizer"] = _hexed(self.tokenizer)
        return out

    @classmethod
    def from_fields(cls, d: dict) -> Plan:
        return cls(
            d["method"], d["base"], tuple(d["models"]), tuple(d["model_params"]), d["global_params"],
            d["seed"], d["compute_dtype"], d["out_dtype"], d["chunk_size"], d["engine"],
            d.get("omit"), d.get("budget"), d.get("estimate"), d.get("slices"), d.get("adapters"),
            d.get("tokenizer"), d.get("chat_template"),
        )


def _hexed(value: Any) -> Any:
    """`value` with every commit id (bytes) written in hex, for JSON."""
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {k: _hexed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_hexed(v) for v in value]
    return value


def bitmap(members: Iterable[int], n: int) -> bytes:
    """A plan's omission bitmap: bit c (byte c // 8, bit c % 8) set for each member c < n."""
    out = bytearray((n + 7) // 8)
    for c in members:
        out[c >> 3] |= 1 << (c & 7)
    return bytes(out)


def bitmap_members(bits: bytes) -> frozenset[int]:
    return frozenset(c for c in range(len(bits) * 8) if bits[c >> 3] >> (c & 7) & 1)


KINDS = {k.TYPE: k for k in (Blob, Tensor, Snapshot, Commit, Plan)}
StoredObject = Blob | Tensor | Snapshot | Commit | Plan


def decode(data: bytes | memoryview, oid: bytes | None = None) -> StoredObject:
    """Rebuild an object; undecodable bytes are reported as corruption of `oid`."""
    try:
        d = msgpack.unpackb(data, raw=False)
        return KINDS[d.pop("type")].from_fields(d)
    except Exception as e:  # any failure here means the stored bytes are not what we wrote
        where = f" {oid.hex()}" if oid else ""
        raise CorruptData(f"object{where} does not decode: {e}") from None
