"""Content ids: the xxh3-128 digest that names every chunk and object.

One function so that chunks and objects can never disagree on how a key is made.
"""

from __future__ import annotations

import xxhash

DIGEST_SIZE = 16


def digest(data: bytes | bytearray | memoryview) -> bytes:
    """The 16-byte key of `data`; xxh3-128 is fast enough to hash every byte we read or write."""
    return xxhash.xxh3_128_digest(data)


def short(obj_id: bytes, n: int = 12) -> str:
    """A commit id as people read it: hex, cut to `n` characters."""
    return obj_id.hex()[:n]
