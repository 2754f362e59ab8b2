"""What moves between a store and a remote, and the checks on everything that arrives.

Fetch and push are one walk: from the commits wanted, follow commits to their parents, base,
plan and inputs, snapshots to tensors, files and headers, and those to their chunks; what the
receiving side lacks moves, in the order that keeps both sides valid at every instant:

- into a store (fetch, lazy fills): chunks first, in transactions of `BATCH` bytes (each kept if
  the fetch is interrupted, so a rerun fetches only the rest), then every object, the catalog
  entries and the remote-tracking refs in one final transaction. An object present locally
  therefore always has its whole closure (chunks aside in a lazy clone), and the walk stops at
  objects the store has.
- to a remote (push): chunks, then catalog entries, then objects, then each ref by
  compare-and-swap on the remote, so a ref never names a commit whose closure has not arrived.
  A push walks its commits' whole closure locally (cheap: objects only) and sends what the
  remote's holdings lack; it never trusts that an object there implies its closure, because an
  object store may complete packs out of order.

Every entry is verified on arrival: an object must hash to its id and decode, a chunk must
decode (in the codec it is stored in) to bytes that hash to its digest. A damaged entry stops
the transfer with one line naming it; nothing of its batch is written.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..errors import CorruptData, MpError, Rejected, RemoteError
from ..store.derived import catalog_chunks
from ..store.env import Store, Txn, checked_stored, delta_reference
from ..store.ids import digest, short
from ..store.objects import Chunked, Commit, Plan, Snapshot, StoredObject, decode, timestamp
from ..store.refs import BRANCH_PREFIX, REMOTES_PREFIX, TAG_PREFIX
from .transport import CATALOG, CHUNK, OBJECT, RemoteRef, Transport

BATCH = 32 << 20  # chunk bytes per local write transaction


@dataclass
class Moved:
    """What one fetch, push or fill moved."""

    objects: int = 0
    chunks: int = 0
    chunk_bytes: int = 0  # chunk bytes as stored that moved
    catalog: int = 0
    wire_bytes: int = 0  # bytes the transport sent or received (packs and indexes included)
    refs: list[tuple[str, bytes | None, bytes]] = field(default_factory=list)  # name, old, new
    up_to_date: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # refs left alone, with why

    def to_json(self) -> dict[str, Any]:
        return {"objects": self.objects, "chunks": self.chunks, "chunk_bytes": self.chunk_bytes,
                "catalog_entries": self.catalog, "wire_bytes": self.wire_bytes,
                "refs": [{"name": n, "old": o.hex() if o else None, "new": v.hex()} for n, o, v in self.refs],
                "up_to_date": self.up_to_date, "skipped": self.skipped}


def tracking(remote: str, name: str) -> str:
    """The local ref that follows remote ref `name` (`heads/B` -> `remotes/R/B`)."""
    return f"{REMOTES_PREFIX}{remote}/{name[len(BRANCH_PREFIX):]}"


def _children(obj: StoredObject) -> tuple[list[bytes], tuple[bytes, ...]]:
    """(object ids, chunk digests) an object refers to."""
    if isinstance(obj, Commit):
        return [*obj.parents, *([obj.base] if obj.base else []), *([obj.plan] if obj.plan else []),
                obj.snapshot], ()
    if isinstance(obj, Plan):
        return [*([obj.base] if obj.base else []), *obj.models, *(a for a in obj.adapters or [] if a)], ()
    if isinstance(obj, Snapshot):
        return [*obj.tensors.values(), *obj.files.values(), *(s.header for s in obj.shards)], ()
    assert isinstance(obj, Chunked)
    return [], obj.chunks


def checked_object(oid: bytes, data: bytes | memoryview) -> StoredObject:
    """The object an arriving encoding holds, if it hashes to `oid` and decodes; else CorruptData."""
    if digest(data) != oid:
        raise CorruptData(f"object {oid.hex()} does not match its id")
    return decode(data, oid)


@dataclass
class Closure:
    """Objects (id -> encoding, in the order found) and chunk digests (in order) a walk found."""

    objects: dict[bytes, bytes] = field(default_factory=dict)
    chunks: dict[bytes, None] = field(default_factory=dict)


def walk(roots: Iterable[bytes], get: Callable[[list[bytes]], Iterable[tuple[bytes, bytes]]],
         known: Callable[[bytes], bool], where: str) -> Closure:
    """Everything reachable from `roots` that `known` does not vouch for, read level by level
    through `get` (one batch per level: few round trips to a remote), each object checked."""
    out = Closure()
    seen: set[bytes] = set()
    frontier = [r for r in dict.fromkeys(roots) if not known(r)]
    seen.update(frontier)
    while frontier:
        got = dict(get(frontier))
        following: list[bytes] = []
        for oid in frontier:
            if oid not in got:
                raise RemoteError(f"{where} lacks object {oid.hex()}: its history is incomplete")
            obj = checked_object(oid, got[oid])
            out.objects[oid] = got[oid]
            kids, chunks = _children(obj)
            for k in kids:
                if k not in seen and not known(k):
                    seen.add(k)
                    following.append(k)
            out.chunks.update(dict.fromkeys(chunks))
        frontier = following
    return out


def _local_get(store: Store) -> Callable[[list[bytes]], Iterator[tuple[bytes, bytes]]]:
    def get(ids: list[bytes]) -> Iterator[tuple[bytes, bytes]]:
        with store.read() as r:
            for oid in ids:
                data = r.encoded(oid)
                if data is not None:
                    yield oid, bytes(data)
    return get


def _has_object(store: Store) -> Callable[[bytes], bool]:
    def has(oid: bytes) -> bool:
        with store.read() as r:
            return r.has_object(oid)
    return has


# into the store ---------------------------------------------------------------------------
def fill(store: Store, transport: Transport, keys: Iterable[bytes]) -> Moved:
    """Fetch the chunks among `keys` the store lacks, verified, in transactions of at most a
    pack; returns what moved. A lazy clone's readers call it before they read. A delta chunk
    whose reference is neither here nor among the chunks fetched brings its reference too."""
    with store.read() as r:
        wanted = [k for k in dict.fromkeys(keys) if not r.has_chunk(k)]
    moved = Moved()
    if not wanted:
        return moved
    before = transport.received_bytes
    arrivals = _Arrivals(store, transport, moved)
    asked = set(wanted)
    with store.writing():
        for key, data in transport.get(CHUNK, wanted):
            arrivals.take(key, data)
            if arrivals.waiting and arrivals.size == 0:  # a batch was just kept: its references too
                arrivals.retry()
        while arrivals.waiting:  # deltas whose reference had not arrived when they did
            refs = {ref for _, data in arrivals.waiting if (ref := delta_reference(data)) is not None} - asked
            asked |= refs
            for key, data in transport.get(CHUNK, refs):
                arrivals.take(key, data)
            if not arrivals.retry():
                raise RemoteError(f"remote {transport.url} lacks the reference of delta chunk "
                                  f"{arrivals.waiting[0][0].hex()}")
        arrivals.flush()
    store.sync()
    if not asked <= arrivals.seen:
        raise RemoteError(f"remote {transport.url} lacks {len(asked - arrivals.seen)} of the chunks asked for")
    moved.wire_bytes = transport.received_bytes - before
    return moved


class _Arrivals:
    """Chunks arriving from a remote: each checked (a delta against its reference, from the
    store or from this transfer) before it is kept, and kept in transactions of at most a pack."""

    def __init__(self, store: Store, transport: Transport, moved: Moved):
        self.store, self.transport, self.moved = store, transport, moved
        self.pending: dict[bytes, bytes] = {}
        self.size = 0
        self.waiting: list[tuple[bytes, bytes]] = []  # deltas whose reference has not arrived
        self.seen: set[bytes] = set()

    def take(self, key: bytes, data: bytes) -> None:
        self.seen.add(key)
        ref = delta_reference(data)
        try:
            if ref is None:
                checked_stored(key, data)
            elif ref in self.pending:
                checked_stored(key, data, lambda r: checked_stored(r, self.pending[r]))
            else:
                with self.store.read() as t:
                    if not t.has_chunk(ref):
                        self.waiting.append((key, data))
                        return
                    checked_stored(key, data, t.reference)
        except CorruptData as e:
            raise RemoteError(f"remote {self.transport.url}: {e}; nothing of it was stored") from None
        self.pending[key] = data
        self.size += len(data)
        self.moved.chunks += 1
        self.moved.chunk_bytes += len(data)
        if self.size >= min(BATCH, self.transport.batch_bytes):
            self.flush()

    def retry(self) -> bool:
        """Check the waiting deltas again; whether any could be."""
        waiting, self.waiting = self.waiting, []
        for key, data in waiting:
            self.take(key, data)
        return len(self.waiting) < len(waiting)

    def flush(self) -> None:
        batch = self.pending

        def put(t: Txn) -> None:
            for key, data in batch.items():
                t.put_stored_chunk(key, data)

        if batch:
            self.store.write(put, reserve=self.size + (1 << 20))
        self.pending, self.size = {}, 0


def fetch(store: Store, transport: Transport, remote: str, lazy: bool = False) -> Moved:
    """Bring the remote's branches (as `remotes/REMOTE/B`) and tags (as `tags/T`, where no tag of
    that name points elsewhere) with everything they reach; chunks too unless `lazy`."""
    before = transport.received_bytes
    refs = transport.refs()
    closure = walk([r.id for r in refs.values()], lambda ids: transport.get(OBJECT, ids), _has_object(store),
                   f"remote {transport.url}")
    moved = Moved() if lazy else fill(store, transport, closure.chunks)
    catalog: list[tuple[bytes, bytes]] = []
    if closure.chunks:
        with store.read() as r:
            wanted = [k for k in transport.holdings(CATALOG)
                      if catalog_chunks(k)[0] in closure.chunks and r.catalog(k) is None]
        catalog = list(transport.get(CATALOG, wanted))
    when = timestamp()

    def land(t: Txn) -> None:
        for oid, data in closure.objects.items():
            t.put_encoded(oid, data)
        for key, value in catalog:
            t.put_catalog(key, value)
        moved.refs.clear()
        moved.up_to_date.clear()
        moved.skipped.clear()
        for name, ref in sorted(refs.items()):
            local = tracking(remote, name) if name.startswith(BRANCH_PREFIX) else name
            old = t.ref(local)
            if old == ref.id:
                moved.up_to_date.append(local)
            elif name.startswith(TAG_PREFIX) and old is not None:
                moved.skipped.append(f"{local}: a local tag of that name points at {short(old)}")
            else:
                t.set_ref_if_equals(local, old, ref.id, f"fetch {remote}", when)
                moved.refs.append((local, old, ref.id))

    store.write(land, reserve=sum(map(len, closure.objects.values())) + (1 << 20))
    store.sync()
    moved.objects, moved.catalog = len(closure.objects), len(catalog)
    moved.wire_bytes = transport.received_bytes - before
    return moved


# to the remote ----------------------------------------------------------------------------
def is_ancestor(txn: Txn, old: bytes, new: bytes) -> bool:
    """Whether commit `old` is `new` or in its history (every parent followed)."""
    todo, seen = [new], set()
    while todo:
        cid = todo.pop()
        if cid == old:
            return True
        if cid in seen or not txn.has_object(cid):
            continue
        seen.add(cid)
        todo.extend(txn.commit(cid).parents)
    return False


def _check_push(txn: Txn, name: str, old: RemoteRef | None, new: bytes, force: bool) -> None:
    if old is None or force or old.id == new:
        return
    if name.startswith(TAG_PREFIX):
        raise Rejected(f"rejected {name}: the remote's tag points at {short(old.id)}; tags never move (--force)")
    if not txn.has_object(old.id):
        raise Rejected(f"rejected {name}: the remote has commit {short(old.id)}, which this repository lacks; "
                       "fetch first, then merge or reset (or push --force)")
    if not is_ancestor(txn, old.id, new):
        raise Rejected(f"rejected {name}: not a fast-forward (the remote's {short(old.id)} is not in the history of "
                       f"{short(new)}); fetch, then merge or reset (or push --force)")


def push(store: Store, transport: Transport, remote: str, names: list[str], force: bool = False,
         lazy_source: Transport | None = None) -> Moved:
    """Send the closure of the refs `names` (store names, `heads/B` or `tags/T`) that the remote
    lacks, then move each remote ref by compare-and-swap; a ref that is not a fast-forward of
    the remote's is refused before anything is sent, unless `force`."""
    with store.read() as r:
        chunk_size = int(r.meta("chunk_size") or 0)
        current = r.meta("HEAD")
        local = {}
        for name in names:
            cid = r.ref(name)
            if cid is None:
                raise MpError(f"nothing to push: no {name.split('/', 1)[0][:-1]} {name.split('/', 1)[1]!r}")
            local[name] = cid
    pushed = [n[len(BRANCH_PREFIX):] for n in names if n.startswith(BRANCH_PREFIX)]
    # a new remote's HEAD (the branch a clone starts on): the current branch if pushed, else the first
    transport.init(chunk_size, current if current in pushed else next(iter(pushed), None))
    remote_refs = transport.refs()
    with store.read() as r:
        for name, cid in local.items():
            _check_push(r, name, remote_refs.get(name), cid, force)
    moved = Moved()
    todo = {n: c for n, c in local.items() if remote_refs.get(n) is None or remote_refs[n].id != c}
    moved.up_to_date = sorted(set(local) - set(todo))
    if not todo:
        return moved
    closure = walk(todo.values(), _local_get(store), lambda _: False, "this repository")
    have = {kind: transport.holdings(kind) for kind in (OBJECT, CHUNK, CATALOG)}
    chunks = [c for c in closure.chunks if c not in have[CHUNK]]
    if lazy_source is not None:  # a lazy clone holds only the chunks it has read
        fill(store, lazy_source, chunks)
    with store.read() as r:  # a delta's reference goes where the delta goes
        refs = [ref for c in chunks if (ref := delta_reference(r.stored_chunk(c))) is not None
                and ref not in have[CHUNK]]
    chunks = list(dict.fromkeys([*refs, *chunks]))
    before = transport.sent_bytes
    transport.put(_entries(store, closure, chunks, have, moved))
    moved.wire_bytes = transport.sent_bytes - before
    branches = [n for n in todo if n.startswith(BRANCH_PREFIX)]
    for name, cid in todo.items():
        if not transport.set_ref(name, remote_refs.get(name), cid):
            raise Rejected(f"rejected {name}: another push moved it on the remote first; fetch, then push again "
                           f"({len(moved.refs)} other refs were pushed)")
        moved.refs.append((name, remote_refs[name].id if name in remote_refs else None, cid))
    when = timestamp()

    def track(t: Txn) -> None:
        for name in branches:  # the remote's branch is now ours: so is its tracking ref
            local = tracking(remote, name)
            t.set_ref_if_equals(local, t.ref(local), todo[name], f"push {remote}", when)

    if branches:
        store.write(track)
    return moved


def _entries(store: Store, closure: Closure, chunks: list[bytes], have: dict[int, set[bytes]],
             moved: Moved) -> Iterator[tuple[int, bytes, bytes]]:
    """What a push sends, chunks first and objects last, counted into `moved` as it goes."""
    wanted = set(closure.chunks)
    with store.read() as r:
        for deltas in (False, True):  # references first: a receiver checks a delta against its reference
            for key in chunks:
                stored = r.stored_chunk(key)
                if stored is None:
                    raise CorruptData(f"chunk {key.hex()} is missing from this repository (run mp fsck)")
                if (delta_reference(stored) is not None) != deltas:
                    continue
                moved.chunks += 1
                moved.chunk_bytes += len(stored)
                yield CHUNK, key, bytes(stored)
        for key, value in r.catalog_entries():
            if catalog_chunks(key)[0] in wanted and key not in have[CATALOG]:
                moved.catalog += 1
                yield CATALOG, key, bytes(value)
    for oid, data in closure.objects.items():
        if oid not in have[OBJECT]:
            moved.objects += 1
            yield OBJECT, oid, data


def is_fast_forward(store: Store, old: bytes | None, new: bytes) -> bool:
    with store.read() as r:
        return old is None or is_ancestor(r, old, new)
