"""Derived data the store keeps beside its chunks: the delta catalog's entries.

An entry describes a pair of chunks (an expert's and its base's at the same position), so the
store knows its key layout — the two chunk digests, then a dtype name — and can drop it with its
chunks. What an entry holds, whether its layout is current and whether it is right are the merge
layer's business: gc and fsck take those rules as a `CatalogRules`, handed in by `Repo`, so the
store never imports the merge engine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from .ids import DIGEST_SIZE

if TYPE_CHECKING:
    from .env import Txn


class CatalogRules(Protocol):
    def current(self, key: bytes, value: bytes | memoryview) -> bool:
        """Whether an entry has this version's layout (an outdated one is dropped by gc)."""
        ...

    def verify(self, txn: Txn, key: bytes, value: bytes | memoryview) -> str | None:
        """What is wrong with an entry, in one line, or None."""
        ...


def catalog_key(expert_chunk: bytes, base_chunk: bytes, dtype: str) -> bytes:
    """The two digests, then the dtype's name: the same bytes read as another dtype are another
    delta, so they get their own entry."""
    return expert_chunk + base_chunk + dtype.encode()


def catalog_chunks(key: bytes) -> tuple[bytes, bytes]:
    """The (expert, base) chunk digests an entry describes."""
    return key[:DIGEST_SIZE], key[DIGEST_SIZE:2 * DIGEST_SIZE]


def catalog_dtype(key: bytes) -> bytes:
    return key[2 * DIGEST_SIZE:]
