"""What chunks cost: their logical (raw) bytes against the bytes their stored values take, by
codec (`mp status`, `mp show`). Read from each value's header (store/codecs.py), never by
decoding."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .env import Txn

CODEC_NAMES = {0: "raw", 1: "planes", 2: "delta"}


@dataclass
class Usage:
    """Chunks, logical bytes and stored bytes (codec byte and headers included), per codec name."""

    chunks: dict[str, int] = field(default_factory=dict)
    logical: dict[str, int] = field(default_factory=dict)
    stored: dict[str, int] = field(default_factory=dict)

    def add(self, codec: str, logical: int, stored: int) -> None:
        self.chunks[codec] = self.chunks.get(codec, 0) + 1
        self.logical[codec] = self.logical.get(codec, 0) + logical
        self.stored[codec] = self.stored.get(codec, 0) + stored

    @property
    def ratio(self) -> float | None:
        """Stored bytes per logical byte over every codec; None with no chunk."""
        logical = sum(self.logical.values())
        return sum(self.stored.values()) / logical if logical else None

    def to_json(self) -> dict[str, Any]:
        logical, stored = sum(self.logical.values()), sum(self.stored.values())
        return {"logical_bytes": logical, "stored_bytes": stored, "ratio": self.ratio,
                "codecs": {c: {"chunks": self.chunks[c], "logical_bytes": self.logical[c],
                               "stored_bytes": self.stored[c],
                               "ratio": self.stored[c] / self.logical[c] if self.logical[c] else None}
                           for c in sorted(self.chunks)}}


def usage(txn: Txn, keys: Iterable[bytes] | None = None) -> Usage:
    """The cost of the chunks `keys` (each counted once; None: every chunk in the store). A chunk
    not here (a lazy clone's) is left out."""
    from .codecs import decoded_size

    out = Usage()
    items = txn.chunks() if keys is None else ((k, txn.stored_chunk(k)) for k in dict.fromkeys(keys))
    for _, value in items:
        if value is None or not len(value):
            continue
        codec = CODEC_NAMES.get(value[0], f"codec {value[0]}")
        size = len(value) - 1 if value[0] == 0 else decoded_size(value)
        out.add(codec, size if size is not None else 0, len(value))
    return out
