"""Rebuilding a snapshot as a folder (`mp checkout`), byte for byte, or not at all.

Every chunk is hash-checked as it is read. The folder is written under a temporary sibling name
and renamed into place only when complete, so the target is either untouched or whole; file names
are checked again here so that no snapshot, however it was made, writes outside its target, and
no target may lie inside the store. A checkout killed before its rename leaves the temporary
folder; the next checkout into the same parent folder removes it once it can prove its writer
dead (see `remove_stale`).
"""

from __future__ import annotations

import fcntl
import os
import re
import secrets
import shutil
import struct
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

from ..errors import CorruptData, TargetExists, WriteFailed
from ..progress import Progress
from ..store.env import Store, Txn
from ..store.objects import Chunked, Snapshot
from .paths import check_relpath, inside


def chunk_views(txn: Txn, obj: Chunked, what: str, pool: ThreadPoolExecutor | None = None,
                window: int = 8) -> Iterator[memoryview]:
    """The object's bytes chunk by chunk, verified; a bad chunk is reported as `what`. With a
    `pool`, compressed chunks are decoded on it, up to `window` ahead of the reader."""
    ahead: deque[Future[memoryview] | memoryview] = deque()
    try:
        for key in obj.chunks:
            p = txn.pending(key)
            ahead.append(p.open() if pool is None or p.raw else pool.submit(p.open))
            while len(ahead) > (window if pool is not None else 0):
                yield _result(ahead.popleft())
        while ahead:
            yield _result(ahead.popleft())
    except CorruptData as e:
        raise CorruptData(f"{what}: {e}") from None


def _result(item: Future[memoryview] | memoryview) -> memoryview:
    return item.result() if isinstance(item, Future) else item


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
    """Total bytes of the folder a snapshot rebuilds."""
    total = sum(txn.blob(b).size for b in snap.files.values())
    for shard in snap.shards:
        total += 8 + txn.blob(shard.header).size
        total += sum(txn.tensor(snap.tensors[n]).size for n in shard.tensors)
    return total


class _Writer:
    """Writes verified chunks to files and releases store pages as it goes."""

    def __init__(self, store: Store, txn: Txn, progress: Progress, pool: ThreadPoolExecutor, window: int):
        self.store, self.txn, self.progress, self.pool, self.window = store, txn, progress, pool, window

    def write(self, f: BinaryIO, obj: Chunked, what: str) -> None:
        for view in chunk_views(self.txn, obj, what, self.pool, self.window):
            f.write(view)
            self.progress.advance(len(view))
            self.store.touched(len(view))


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
        tmp = _sibling(out, "tmp")
        lock: int | None = None
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            remove_stale(out.parent)
            tmp.mkdir()
            lock = _lock_dir(tmp, wait=True)  # held until this process ends or the folder is in place
        except OSError as e:
            raise WriteFailed(f"{out}: cannot create the folder: {e.strerror}") from None
        progress.start("checkout", snapshot_size(txn, snap))
        workers = os.cpu_count() or 1
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mp-decode")
        try:
            writer = _Writer(store, txn, progress, pool, 2 * workers)
            for rel, blob_id in snap.files.items():
                target = inside(tmp, rel)
                target.parent.mkdir(parents=True, exist_ok=True)
                with open(target, "wb") as f:
                    writer.write(f, txn.blob(blob_id), rel)
            for shard in snap.shards:
                header = txn.blob(shard.header)
                with open(inside(tmp, shard.file), "wb") as f:
                    f.write(struct.pack("<Q", header.size))
                    writer.write(f, header, f"{shard.file}: header")
                    for name in shard.tensors:
                        writer.write(f, txn.tensor(snap.tensors[name]), f"{shard.file}: tensor {name!r}")
            _swap_into_place(tmp, out)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise WriteFailed(f"{out}: cannot write: {e.strerror or e}") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            pool.shutdown(cancel_futures=True)
            if lock is not None:
                os.close(lock)
            progress.finish()
            store.release_pages()
