"""A remote on object storage (`s3://BUCKET/PREFIX`): S3, MinIO, R2, or any S3-protocol server.

Layout under the prefix (docs/architecture.md, "Remote layout on object storage"):
- `config`: msgpack {"format": 1, "chunk_size": N}, created once (If-None-Match: *);
- `HEAD`: the default branch's name, written before `config`, so a usable remote names its HEAD;
- `refs/heads/NAME`, `refs/tags/NAME`: a commit id in hex and a newline, moved only by
  conditional writes (If-Match on the ETag read, or If-None-Match: * to create), so two writers
  racing for a ref cannot both win;
- `packs/ID.pack` and `packs/ID.idx`: immutable, content-addressed packs (`remote.packs`). A put
  uploads a pack before its index, and a pack exists for readers only once its index does, so an
  interrupted put leaves at most one orphan pack that nobody reads.

boto3 does everything on the wire: it reads the endpoint, region and credentials from the
standard AWS chain (environment, ~/.aws/config and credentials, profiles); mpstore never sees a
credential it would print or store. boto3 is imported when a remote is opened, never by
`import mpstore`.

Pack indexes are cached in `<cache>/packs/` (checked against their names when read), so
listing what a remote holds costs one LIST per thousand packs plus one GET per new pack.
"""

from __future__ import annotations

import os
import re
import tempfile
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, NoReturn

import msgpack

from ..errors import RemoteError
from .packs import PACK_BYTES, Location, Pack, Range, build_packs, decode_index, plan_ranges, split_range
from .transport import KINDS, Info, RemoteRef

CONFIG_FORMAT = 1
READERS = 8  # concurrent ranged reads (and index reads); boto3 clients are thread-safe
_CREDENTIALS = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken",
                "ExpiredToken", "403"}
_LOST_RACE = frozenset({"PreconditionFailed", "ConditionalRequestConflict", "412", "409"})
_MISSING = frozenset({"NoSuchKey", "404"})
_OUT_OF_RANGE = frozenset({"InvalidRange", "416"})


def parse_url(url: str) -> tuple[str, str]:
    """(bucket, prefix) of `s3://bucket/some/prefix`, the prefix without outer slashes."""
    if not url.startswith("s3://"):
        raise RemoteError(f"remote {url}: not an s3:// URL")
    bucket, _, prefix = url[len("s3://"):].partition("/")
    if "@" in bucket or ":" in bucket:
        raise RemoteError("malformed s3:// URL: credentials and ports do not belong in it "
                          "(use the AWS environment or config files)")
    if not bucket:
        raise RemoteError(f"remote {url}: no bucket in the URL (s3://BUCKET/PREFIX)")
    if not re.fullmatch(r"[a-zA-Z0-9._-]{3,255}", bucket):
        raise RemoteError(f"remote {url}: {bucket!r} is not a bucket name")
    return bucket, prefix.strip("/")


class Bucket:
    """The remote at `url`; `cache` is a folder for pack indexes (None: keep them in memory).

    `sent_bytes` and `received_bytes` count object bodies moved (packs, indexes, refs, config);
    `requests` counts requests made."""

    def __init__(self, url: str, cache: Path | None = None, pack_bytes: int = PACK_BYTES):
        import boto3
        from botocore.config import Config

        self.bucket, self.prefix = parse_url(url)
        self.url = url.rstrip("/")
        self.cache = cache / "packs" if cache is not None else None
        self.pack_bytes = pack_bytes
        self.batch_bytes = pack_bytes  # a fetch commits at least once a pack (transport.Transport)
        self.sent_bytes = 0
        self.received_bytes = 0
        self.requests = 0
        self._counting = threading.Lock()  # reader threads add to the counters
        self.list_page = 1000  # keys per LIST request (S3's most)
        # A dead endpoint fails in seconds, not minutes; throttling and 5xx still get a retry.
        config = Config(connect_timeout=3, read_timeout=60, max_pool_connections=READERS + 4,
                        retries={"max_attempts": 2, "mode": "standard"})
        try:
            self._s3 = boto3.session.Session().client("s3", config=config)
        except Exception as e:  # a malformed profile, region or endpoint in the AWS config
            self._fail(e)
        self._readers = ThreadPoolExecutor(READERS, thread_name_prefix="mp-s3-get")
        self._uploader = ThreadPoolExecutor(1, thread_name_prefix="mp-s3-put")
        self._loaded: set[str] = set()  # packs whose index is in `_where`
        self._where: dict[int, dict[bytes, Location]] = {k: {} for k in KINDS}
        self._written: dict[str, float] = {}  # object name -> when it was written (from listings)

    # ---------------------------------------------------------------- requests and errors

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def _call(self, op: str, expect: frozenset[str] = frozenset(), **kw: Any) -> Any:
        """One request, counted. A refusal whose code is in `expect` raises `_Refused` for the
        caller to handle; every other failure a user can cause becomes one RemoteError line."""
        with self._counting:
            self.requests += 1
        try:
            return getattr(self._s3, op)(Bucket=self.bucket, **kw)
        except Exception as e:
            self._fail(e, expect)

    def _fail(self, e: Exception, expect: frozenset[str] = frozenset()) -> NoReturn:
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectionError,
            NoCredentialsError,
            ParamValidationError,
        )

        where = f"remote {self.url}"
        if isinstance(e, ClientError):
            error = e.response.get("Error", {})
            code = str(error.get("Code") or e.response.get("ResponseMetadata", {}).get("HTTPStatusCode"))
            if code in expect:
                raise _Refused(code) from None
            if code == "NoSuchBucket":
                raise RemoteError(f"{where}: bucket {self.bucket!r} does not exist") from None
            if code in _CREDENTIALS:
                raise RemoteError(f"{where}: access denied ({code}): check the AWS credentials "
                                  "and their permissions on this bucket") from None
            raise RemoteError(f"{where}: the server refused ({code}: {_line(error.get('Message'))})") from None
        if isinstance(e, NoCredentialsError):
            raise RemoteError(f"{where}: no AWS credentials found (set AWS_ACCESS_KEY_ID and "
                              "AWS_SECRET_ACCESS_KEY, or a profile in ~/.aws)") from None
        if isinstance(e, ConnectionError):
            raise RemoteError(f"{where}: cannot reach the endpoint ({type(e).__name__})") from None
        if isinstance(e, ParamValidationError):
            raise RemoteError(f"{where}: malformed bucket name or key ({_line(e)})") from None
        if isinstance(e, BotoCoreError):
            raise RemoteError(f"{where}: {_line(e)}") from None
        raise e

    def _read(self, name: str, missing: frozenset[str] = _MISSING, **kw: Any) -> tuple[bytes, str] | None:
        """(body, ETag) of object `name`, or of a range of it; None if it does not exist (or for
        any refusal in `missing`)."""
        try:
            got = self._call("get_object", missing, Key=self._key(name), **kw)
        except _Refused:
            return None
        try:
            body = got["Body"].read()
        except Exception as e:  # the connection dropped, or fewer bytes came than announced
            self._fail(e)
        with self._counting:
            self.received_bytes += len(body)
        return body, got["ETag"]

    def _write(self, name: str, body: bytes | bytearray, **conditions: str) -> bool:
        """Upload `body` as `name`; False when a condition (IfMatch, IfNoneMatch) failed."""
        try:
            self._call("put_object", _LOST_RACE, Key=self._key(name), Body=body, **conditions)
        except _Refused:
            return False
        with self._counting:
            self.sent_bytes += len(body)
        return True

    def _damaged(self, what: str, why: str) -> RemoteError:
        return RemoteError(f"remote {self.url}: {what} is damaged ({why})")

    # ---------------------------------------------------------------- config, HEAD, refs

    def info(self) -> Info:
        config = self._read("config")
        if config is None:
            return Info(None, None)
        head = self._read("HEAD")
        return Info(self._chunk_size(config[0]), head[0].decode("utf-8", "replace") if head else None)

    def _chunk_size(self, raw: bytes) -> int:
        try:
            config = msgpack.unpackb(raw)
            size = config["chunk_size"]
            ok = config["format"] == CONFIG_FORMAT and isinstance(size, int) and size > 0
        except (ValueError, TypeError, KeyError, msgpack.UnpackException):
            ok = False
        if not ok:
            raise self._damaged("its config object", "not a format-1 config")
        return int(size)

    def init(self, chunk_size: int, head: str | None) -> None:
        if head is not None:  # first: a remote with a config always names its HEAD
            self._write("HEAD", head.encode(), IfNoneMatch="*")
        config = msgpack.packb({"format": CONFIG_FORMAT, "chunk_size": chunk_size})
        if self._write("config", config, IfNoneMatch="*"):
            return
        have = self.info().chunk_size
        if have != chunk_size:
            raise RemoteError(f"remote {self.url} has chunk size {have}, this repository {chunk_size}: "
                              "chunks would not line up")

    def refs(self) -> dict[str, RemoteRef]:
        out = {}
        for key in self._list("refs/"):
            got = self._read(key)
            if got is None:  # deleted since the listing
                continue
            body, etag = got
            name = key[len("refs/"):]
            if len(body) != 33 or body[32:] != b"\n" or not _is_hex(body[:32]):
                raise self._damaged(f"ref {name}", "not a commit id in hex")
            out[name] = RemoteRef(bytes.fromhex(body[:32].decode()), etag)
        return out

    def set_ref(self, name: str, old: RemoteRef | None, new: bytes) -> bool:
        condition = {"IfNoneMatch": "*"} if old is None else {"IfMatch": old.token}
        return self._write(f"refs/{name}", f"{new.hex()}\n".encode(), **condition)

    def _list(self, under: str) -> Iterator[str]:
        """Names (relative to the prefix) of every object under `under`, page by page; when each
        was written goes into `_written`."""
        root = len(self._key(""))
        page_token: dict[str, str] = {}
        while True:
            page = self._call("list_objects_v2", frozenset(), Prefix=self._key(under), MaxKeys=self.list_page,
                              **page_token)
            for obj in page.get("Contents", []):
                name = obj["Key"][root:]
                if "LastModified" in obj:
                    self._written[name] = obj["LastModified"].timestamp()
                yield name
            if not page.get("IsTruncated"):
                return
            page_token = {"ContinuationToken": page["NextContinuationToken"]}

    # ---------------------------------------------------------------- holdings

    def holdings(self, kind: int) -> set[bytes]:
        self._refresh()
        return set(self._where[kind])

    def _refresh(self) -> None:
        """Learn every pack whose index is on the remote and not yet known here."""
        names = [key[len("packs/"):-len(".idx")] for key in self._list("packs/") if key.endswith(".idx")]
        new = [name for name in names if name not in self._loaded]
        for name, entries in zip(new, self._readers.map(self._index, new)):
            self._learn(name, entries)

    def _index(self, name: str) -> list[tuple[int, bytes, Location]]:
        """Pack `name`'s entries, from the cache if it holds a sound copy, else from the remote."""
        if self.cache is not None and (self.cache / f"{name}.idx").is_file():
            try:
                return decode_index(name, (self.cache / f"{name}.idx").read_bytes())
            except ValueError:
                pass  # a damaged copy in the cache: read the remote's
        got = self._read(f"packs/{name}.idx")
        if got is None:
            raise RemoteError(f"remote {self.url}: pack index {name} vanished while being read")
        try:
            entries = decode_index(name, got[0])
        except ValueError as e:
            raise self._damaged(f"pack index {name}", str(e)) from None
        self._cache(name, got[0])
        return entries

    def _cache(self, name: str, raw: bytes) -> None:
        """Keep an index in the cache, written whole (temporary file, then rename) or not at all.
        The cache only saves requests: where it cannot be written, the index is read again."""
        if self.cache is None:
            return
        tmp = None
        try:
            self.cache.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.cache, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(raw)
            os.replace(tmp, self.cache / f"{name}.idx")
        except OSError:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)

    def _learn(self, name: str, entries: list[tuple[int, bytes, Location]]) -> None:
        for kind, key, loc in entries:
            self._where[kind].setdefault(key, loc)
        self._loaded.add(name)

    # ---------------------------------------------------------------- get

    def sizes(self, kind: int, keys: Iterable[bytes]) -> dict[bytes, int]:
        wanted = dict.fromkeys(keys)
        if not self._loaded or any(k not in self._where[kind] for k in wanted):
            self._refresh()
        return {k: self._where[kind][k].length for k in wanted if k in self._where[kind]}

    def get(self, kind: int, keys: Iterable[bytes]) -> Iterator[tuple[bytes, bytes]]:
        """Entries by ranged reads of their packs, READERS at a time, yielded as ranges arrive:
        at most READERS ranges (each up to `packs.RANGE_CAP` bytes, or one larger entry) are
        held at once. Each entry is checked against its index's checksum."""
        wanted = dict.fromkeys(keys)
        where = self._where[kind]
        if not self._loaded or any(k not in where for k in wanted):
            self._refresh()  # packs pushed since the last look
        age = {n[len("packs/"):-len(".idx")]: t for n, t in self._written.items() if n.endswith(".idx")}
        ranges = iter(plan_ranges(((k, where[k]) for k in wanted if k in where), age=age))
        running: set[Future[tuple[Range, bytes | None]]] = set()
        try:
            while True:
                while len(running) < READERS and (r := next(ranges, None)) is not None:
                    running.add(self._readers.submit(self._fetch, r))
                if not running:
                    return
                done, running = wait(running, return_when=FIRST_COMPLETED)
                for f in done:
                    r, body = f.result()
                    if body is None:
                        raise self._damaged(f"pack {r.pack}", "missing, or shorter than its index says")
                    try:
                        yield from split_range(r, body)
                    except ValueError as e:
                        raise self._damaged(f"pack {r.pack}", str(e)) from None
        finally:
            for f in running:
                f.cancel()

    def _fetch(self, r: Range) -> tuple[Range, bytes | None]:
        got = self._read(f"packs/{r.pack}.pack", _MISSING | _OUT_OF_RANGE, Range=f"bytes={r.start}-{r.end - 1}")
        return r, got[0] if got else None

    # ---------------------------------------------------------------- put

    def put(self, entries: Iterable[tuple[int, bytes, bytes]]) -> int:
        """Entries in packs of about `pack_bytes`, the next one built while the last uploads (two
        in memory at most). A pack that was complete when the entries failed is still uploaded."""
        sent = 0
        pending: Future[int] | None = None
        try:
            for pack in build_packs(entries, self.pack_bytes):
                if pending is not None:
                    sent += pending.result()
                pending = self._uploader.submit(self._upload, pack)
        finally:
            if pending is not None:
                sent += pending.result()
        return sent

    def _upload(self, pack: Pack) -> int:
        """Pack, then index: readers see the pack once its index is there."""
        self._write(f"packs/{pack.id}.pack", pack.data)
        self._write(f"packs/{pack.id}.idx", pack.index)
        self._cache(pack.id, pack.index)
        self._learn(pack.id, pack.entries)
        return len(pack.data) + len(pack.index)

    def close(self) -> None:
        self._readers.shutdown(wait=True, cancel_futures=True)
        self._uploader.shutdown(wait=True, cancel_futures=True)
        self._s3.close()


class _Refused(Exception):
    """A refusal the caller expected (a lost conditional write, a missing key), by its code."""


def _line(text: object) -> str:
    """A server's or library's message as part of one line."""
    return " ".join(str(text or "no message").split())


def _is_hex(raw: bytes) -> bool:
    return all(c in b"0123456789abcdef" for c in raw)


def open_bucket(url: str, cache: Path | None = None) -> Bucket:
    """The remote at an `s3://` URL (see `Bucket`)."""
    return Bucket(url, cache)
