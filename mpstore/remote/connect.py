"""From a URL to a transport: `s3://BUCKET/PREFIX` is an object store, anything else a path to
another mpstore repository (`file://PATH` too)."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import RemoteError
from ..units import parse_size
from .transport import Transport


def normal_url(url: str) -> str:
    """The URL as kept in the store: an object store's as given, a path made absolute (so the
    remote means the same folder from wherever a command runs); an unknown scheme is refused."""
    if url.startswith("s3://"):
        bucket = url[len("s3://"):].split("/", 1)[0]
        if not bucket:
            raise RemoteError(f"remote URL {url!r} names no bucket: expected s3://BUCKET[/PREFIX]")
        return url.rstrip("/")
    if url.startswith("file://"):
        url = url[len("file://"):]
    elif "://" in url:
        raise RemoteError(f"remote URL {url!r}: unsupported scheme; use s3://BUCKET[/PREFIX] or a path to "
                          "an mpstore repository")
    if not url:
        raise RemoteError("remote URL is empty")
    return os.path.abspath(Path(url).expanduser())


def open_transport(url: str, cache: Path | None) -> Transport:
    """The transport for `url`; `cache`: where an object store's pack indexes are kept."""
    url = normal_url(url)
    if url.startswith("s3://"):
        from .bucket import PACK_BYTES, Bucket

        size = os.environ.get("MP_PACK_SIZE")  # bytes per pack (default PACK_BYTES), e.g. 4MiB
        return Bucket(url, cache, parse_size(size) if size else PACK_BYTES)
    from .local import RepoRemote

    return RepoRemote(url)
