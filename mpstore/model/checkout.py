"""Rebuilding a snapshot as a folder (`mp checkout`), byte for byte, or not at all.

Every chunk is hash-checked as it is read, by the thread that writes it from the store's memory
map (files and parts of files are written in parallel: see "writing" below). The folder is
written under a temporary sibling name and renamed into place only when complete, so the target
is either untouched or whole; file names are checked again here so that no snapshot, however it
was made, writes outside its target, and no target may lie inside the store. A checkout killed
before its rename leaves the temporary folder; the next checkout into the same parent folder
removes it once it can prove its writer dead (see `remove_stale`).
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import secrets
import shutil
import struct
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

from ..errors import CorruptData, TargetExists, WriteFailed
from ..progress import Progress
from ..store.env import RELEASE_EVERY, Store, Txn, checked_chunk
from ..store.objects import Chunked, Snapshot
from .paths import check_relpath, inside


def chunk_views(txn: Txn, obj: Chunked, what: str) -> Iterator[memoryview]:
    """The object's bytes chunk by chunk, verified; a bad chunk is reported as `what`."""
    for key in obj.chunks:
        try:
            yield txn.chunk(key)
        except CorruptData as e:
            raise CorruptData(f"{what}: {e}") from None


NAME_MAX, PATH_MAX = 255, 4096  # Linux's limits, where the file system does not say
# A leftover of a checkout: `.NAME.mp-tmp-PID-START-TOKEN` (the folder being written) or
# `.NAME.mp-old-PID-START-TOKEN` (a replaced folder moved aside), NAME cut to STEM_BYTES.
_LEFTOVER = re.compile(r"\.(.*)\.mp-(tmp|old)-(\d+)-(\d+)-[0-9a-f]{8}", re.S)
STEM_BYTES = 120
_CUT = "\u2026"  # marks a stem cut short: its target cannot be named


def _limit(folder: Path | None, key: str, default: int) -> int:
    """A pathconf limit of the file system holding `folder`; `default` where it names none."""
    try:
        value = os.pathconf(folder, key) if folder is not None else -1
    except (OSError, ValueError):
        value = -1
    return value if value > 0 else default


def too_long(path: Path) -> str | None:
    """Why the system cannot name `path` (a component or the whole path too long), or None."""
    ancestor = next((p for p in (path, *path.parents) if os.path.isdir(p)), None)
    name_max = _limit(ancestor, "PC_NAME_MAX", NAME_MAX)
    path_max = _limit(ancestor, "PC_PATH_MAX", PATH_MAX)
    for part in path.parts:
        n = len(os.fsencode(part))
        if n > name_max:
            shown = part if len(part) <= 24 else part[:24] + "..."
            return f"the name {shown!r} is too long: {n} bytes, where the file system allows {name_max}"
    n = len(os.fsencode(str(path)))
    if n >= path_max:
        return f"the path is too long: {n} bytes, where the system allows {path_max - 1}"
    return None


def _prepare_target(out: Path, force: bool, store_path: Path) -> None:
    problem = too_long(out)
    if problem:
        raise WriteFailed(f"cannot check out to {out}: {problem}")
    store_path = store_path.resolve()
    target = out.resolve()
    if target == store_path or store_path in target.parents:
        raise TargetExists(f"{out} is inside the repository's store {store_path}; choose a folder outside it")
    if target in store_path.parents:
        raise TargetExists(f"{out} holds the repository itself; choose another folder")
    if out.exists() or out.is_symlink():
        if not out.is_dir() or out.is_symlink():
            raise TargetExists(f"{out} exists and is not a folder")
        if any(out.iterdir()) and not force:
            raise TargetExists(f"{out} is not empty (use --force to replace it)")


# ---------------------------------------------------------------------------- leftovers
# A checkout writes beside its target. Killed (SIGKILL, power cut), it leaves its temporary
# folder there; the next checkout into the same parent folder removes it once it can prove its
# writer dead: the folder's name carries the writer's pid and process start time, and the writer
# holds an flock on the folder for as long as it lives (the kernel drops it when it dies). Both
# must say "dead": the lock is free, and no process with that pid and start time exists.


def _process(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of a process, from /proc; None if there is
    no such process or no /proc to ask."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2:].split()  # after the command name, which may hold anything
    return fields[0].decode(), int(fields[19])  # fields 3 (state) and 22 (starttime) of proc(5)


def _start_time() -> int:
    """This process's start time (0 where /proc cannot tell)."""
    me = _process(os.getpid())
    return me[1] if me else 0


def _alive(pid: int, start: int) -> bool:
    """Whether the process that wrote a leftover may still be running (True when unsure)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass  # EPERM: it exists, and belongs to someone else
    proc = _process(pid)
    if proc is None:
        return start == 0 or os.path.isdir(f"/proc/{pid}")  # vanished just now, or no /proc to ask
    state, started = proc
    if state in ("Z", "X"):  # killed, not yet reaped: it holds nothing any more
        return False
    return start == 0 or started == start  # another process that got the pid later is not it


def _lock_dir(path: Path, wait: bool) -> int | None:
    """An fd of folder `path` holding an exclusive flock on it, or None if that is not possible
    now (held by a live process, or gone)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except OSError:
        os.close(fd)
        return None
    return fd


def _sibling(out: Path, kind: str) -> Path:
    """A fresh name beside `out` for a folder this process writes (`kind`: tmp or old)."""
    name = os.fsencode(out.name)
    stem = name.decode(errors="surrogateescape")
    if len(name) > STEM_BYTES:
        stem = name[:STEM_BYTES].decode(errors="ignore") + _CUT
    return out.parent / f".{stem}.mp-{kind}-{os.getpid()}-{_START}-{secrets.token_hex(4)}"


def remove_stale(parent: Path) -> list[str]:
    """Remove the leftovers of checkouts into `parent` whose writer is provably dead; returns
    their names. A replaced folder moved aside is removed only once its target is in place (a
    writer killed between the two renames leaves the old folder as the only one)."""
    removed: list[str] = []
    try:
        entries = [e for e in os.scandir(parent) if _LEFTOVER.fullmatch(e.name)]
    except OSError:
        return removed
    for entry in entries:
        m = _LEFTOVER.fullmatch(entry.name)
        assert m is not None
        stem, kind, pid, start = m.group(1), m.group(2), int(m.group(3)), int(m.group(4))
        try:
            if not entry.is_dir(follow_symlinks=False):
                continue
            if kind == "old" and (stem.endswith(_CUT) or not (parent / stem).is_dir()):
                continue
        except OSError:
            continue
        fd = _lock_dir(parent / entry.name, wait=False)
        if fd is None:
            continue  # a live writer holds it
        try:
            if _alive(pid, start):
                continue
            shutil.rmtree(parent / entry.name, ignore_errors=True)
            removed.append(entry.name)
        finally:
            os.close(fd)
    return removed


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Atomically put `tmp` at `out`; an existing folder is moved aside first and then removed."""
    if out.exists():
        aside = _sibling(out, "old")
        fd = _lock_dir(out, wait=False)  # marks the moved-aside folder as this live process's
        try:
            os.rename(out, aside)
            os.rename(tmp, out)
            shutil.rmtree(aside)
        finally:
            if fd is not None:
                os.close(fd)
    else:
        os.rename(tmp, out)


_START = _start_time()


def snapshot_size(txn: Txn, snap: Snapshot) -> int:
    """Total bytes of the folder a snapshot rebuilds (from its objects: no chunk is read)."""
    return sum(size for _, size, _ in _files(txn, snap))


# ---------------------------------------------------------------------------- writing
# A checkout writes straight from the store's memory map. Each file's pieces (views of stored
# chunks, and the few bytes made here) are cut into ranges, and threads take the ranges as the
# main thread finds their chunks, each writing through a descriptor of its own. Every chunk is
# hash-checked by the thread that writes it, just before writing it, so one thread checks while
# another writes (a file takes one writer at a time; different files are written at once); the
# views stay valid because the read transaction outlives the threads. Measured against `cp -r`
# (0.5 GB and 3 GB models, ext4): two writers of one file spent 5% of the CPU spinning in the
# kernel on the file's write lock (hence `_Range.lock`), and batches of 16 MiB (checked, then
# written) were slower than 4 MiB ones.
RANGE_BYTES = 16 << 20  # a thread's unit of work: about this many bytes of one file
BATCH_BYTES = 4 << 20  # chunks checked, then written by one writev while still in the CPU cache
IOV_MAX = 1024  # buffers one writev takes (Linux and the BSDs; POSIX promises at least 16)
THREADS = min(4, os.cpu_count() or 1)  # a file is written by one thread at a time: more threads
# only check more ranges ahead, and map more store pages at once
AHEAD = 2  # ranges found ahead of the writers, per thread: enough to keep them busy, and the
# store pages mapped at once (released in write order, see Store.touched) stay a few ranges


@dataclass(frozen=True)
class _Piece:
    """Bytes of a file: a stored chunk's view, checked against `key` before it is written, or
    bytes made here (`key` None: a shard's header length). `what` names it in errors."""

    data: memoryview
    key: bytes | None
    what: str


@dataclass
class _Range:
    """Consecutive pieces of one file, starting `offset` bytes into it. `lock` is the file's:
    ranges of a file are checked at once but written one at a time (the kernel serialises writes
    to one file anyway, and a writer waiting in the kernel spins on a CPU the others need)."""

    path: Path
    lock: threading.Lock
    offset: int
    pieces: list[_Piece] = field(default_factory=list)
    size: int = 0


def _pieces(txn: Txn, obj: Chunked, what: str) -> Iterator[_Piece]:
    for key in obj.chunks:
        try:
            view = txn.unchecked_chunk(key)
        except CorruptData as e:
            raise CorruptData(f"{what}: {e}") from None
        yield _Piece(view, key, what)


def _files(txn: Txn, snap: Snapshot) -> list[tuple[str, int, Iterator[_Piece]]]:
    """Every file of the snapshot's folder: (name, size, its pieces in file order, found as they
    are taken). A shard is its 8-byte little-endian header length, its header, then its tensors
    in file order (safetensors files have no holes: ingest refuses them), so byte for byte."""
    files = []
    for rel, blob_id in snap.files.items():
        blob = txn.blob(blob_id)
        files.append((rel, blob.size, _pieces(txn, blob, rel)))
    for shard in snap.shards:
        header = txn.blob(shard.header)
        tensors = [(name, txn.tensor(snap.tensors[name])) for name in shard.tensors]
        pieces = chain([_Piece(memoryview(struct.pack("<Q", header.size)), None, shard.file)],
                       _pieces(txn, header, f"{shard.file}: header"),
                       *(_pieces(txn, t, f"{shard.file}: tensor {name!r}") for name, t in tensors))
        files.append((shard.file, 8 + header.size + sum(t.size for _, t in tensors), pieces))
    return files


def _ranges(path: Path, pieces: Iterator[_Piece]) -> Iterator[_Range]:
    """`pieces` cut into ranges of about RANGE_BYTES (a chunk is never split)."""
    lock = threading.Lock()
    r = _Range(path, lock, 0)
    for piece in pieces:
        if r.size >= RANGE_BYTES:
            yield r
            r = _Range(path, lock, r.offset + r.size)
        r.pieces.append(piece)
        r.size += len(piece.data)
    if r.size:
        yield r


def _create(path: Path) -> None:
    """Create the (empty) file its ranges are written into. Not preallocated: on ext4, writes into
    fallocate'd (unwritten) extents cost more kernel time than delayed allocation at 3 GB."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666))


def _write_all(fd: int, views: list[memoryview]) -> None:
    """writev until every view is written (one call may take fewer bytes)."""
    i = 0
    while i < len(views):
        n = os.writev(fd, views[i:i + IOV_MAX])
        if n == 0:
            raise OSError(errno.EIO, "the file system took no bytes")
        while i < len(views) and n >= len(views[i]):
            n -= len(views[i])
            i += 1
        if n:
            views[i] = views[i][n:]


def _write_range(r: _Range) -> None:
    """Check and write one range through a descriptor of its own, positioned at the range's start
    (writev, not pwritev, so the descriptor's position shows how far the write got)."""
    fd = os.open(r.path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.lseek(fd, r.offset, os.SEEK_SET)
        batch: list[memoryview] = []
        size = 0
        for piece in r.pieces:
            if piece.key is not None:
                try:
                    checked_chunk(piece.key, piece.data)
                except CorruptData as e:
                    raise CorruptData(f"{piece.what}: {e}") from None
            if piece.data:
                batch.append(piece.data)
                size += len(piece.data)
            if size >= BATCH_BYTES:
                with r.lock:
                    _write_all(fd, batch)
                batch, size = [], 0
        with r.lock:
            _write_all(fd, batch)
    finally:
        os.close(fd)


def _write(files: list[tuple[str, int, Iterator[_Piece]]], tmp: Path, store: Store, progress: Progress) -> None:
    """Create every file under `tmp` and write its ranges on THREADS threads (writev releases the
    GIL), at most AHEAD per thread found ahead. Progress follows the ranges in order, on this
    thread; every RELEASE_EVERY bytes the threads are let finish and the store pages they read
    are released (releasing under them would unmap pages they are about to read, and each would
    be faulted in twice). On an error, ranges not yet started are cancelled and running ones
    finish before this returns (their views must not outlive the transaction)."""
    pending: deque[tuple[int, Future[None]]] = deque()
    mapped = 0  # bytes of store pages handed to the threads since the last release

    def settle(limit: int) -> None:
        while len(pending) > limit:
            size, future = pending.popleft()
            future.result()
            progress.advance(size)

    with ThreadPoolExecutor(THREADS) as pool:
        try:
            for rel, size, pieces in files:
                target = inside(tmp, rel)
                target.parent.mkdir(parents=True, exist_ok=True)
                _create(target)
                written = 0
                for r in _ranges(target, pieces):
                    pending.append((r.size, pool.submit(_write_range, r)))
                    written += r.size
                    mapped += r.size
                    if mapped >= RELEASE_EVERY:
                        settle(0)
                        store.release_pages()
                        mapped = 0
                    settle(AHEAD * THREADS)
                if written != size:
                    raise CorruptData(f"{rel}: its chunks hold {written} bytes where its objects say {size}")
            settle(0)
        finally:
            for _, future in pending:
                future.cancel()


def checkout(store: Store, snapshot_id: bytes, out: Path, force: bool, progress: Progress) -> None:
    """Write the snapshot's folder at `out`; raises before touching `out` if anything is wrong."""
    out = Path(os.path.abspath(out))
    try:
        _prepare_target(out, force, store.path)
    except OSError as e:
        raise WriteFailed(f"cannot check out to {out}: {e.strerror or e}") from None
    with store.read() as txn:
        snap = txn.snapshot(snapshot_id)
        for rel in [*snap.files, *(s.file for s in snap.shards)]:
            check_relpath(rel)
        files = _files(txn, snap)
        tmp = _sibling(out, "tmp")
        lock: int | None = None
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            remove_stale(out.parent)
            tmp.mkdir()
            lock = _lock_dir(tmp, wait=True)  # held until this process ends or the folder is in place
        except OSError as e:
            raise WriteFailed(f"{out}: cannot create the folder: {e.strerror}") from None
        progress.start("checkout", sum(size for _, size, _ in files))
        try:
            _write(files, tmp, store, progress)
            _swap_into_place(tmp, out)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise WriteFailed(f"{out}: cannot write: {e.strerror or e}") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            if lock is not None:
                os.close(lock)
            progress.finish()
            store.release_pages()
