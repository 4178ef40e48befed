"""The embedded store: ``kvstore.open(dir)``, one replica in this process.

Writes flow the way they do in a cluster: each command becomes part of a log
entry of its shard, and a group of entries is made durable by one append to
the write-ahead log (``kvstore.storage.wal``, in ``<dir>/wal/``): one
``pwrite`` and one ``fdatasync``, the GIL released. A single replica is its own
quorum, so "committed" means "appended and fsync'd". Concurrent writers share
one append (``GroupCommitter``): many commands per entry, one entry per shard
per group, one ``fdatasync`` per group.

An append holds, after its entries, one ``KIND_COMMIT_POINT`` record naming
every ``(shard, slot)`` the group chose: recovery applies an entry only once
it has read that record, so a torn last append (a multi-shard transaction's
entries included) is applied wholly or not at all. The log's records, and
their replay, are a cluster node's (``kvstore.storage.replay``); what is the
embedded store's own is in ``kvstore.embedded.commit`` (the write path: a
group applied, appended, published), ``kvstore.embedded.recovery`` (its
entries, and applying them at open) and ``kvstore.embedded.verify``. This
module keeps the store's API and its transaction classes.

Once appended, a group's writes go to the in-memory overlay
(``kvstore.storage.overlay``) that reads consult before LMDB; a background
checkpoint (``kvstore.storage.checkpoint``) moves them into LMDB in one synced
write transaction holding the log position it covers, then deletes the log
segments below it. Open = LMDB at its checkpoint + a replay of the log after
it. A directory without ``wal/`` (written before the log existed) opens as a
checkpoint with an empty log.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import os
import threading
import weakref

from kvstore import _native
from kvstore.api import KV
from kvstore.commands import (NO_LEASE, OP_CAS, OP_DELETE, OP_PUT, OP_TXN, cas_lease,
                              check_delta, check_ttl, incr, incr_result, lease_grant,
                              lease_keepalive, lease_revoke, put_lease, put_ttl)
from kvstore.errors import (CorruptRecord, InvalidArgument, KVError, LeaseExpired, StorageError,
                            TransactionConflict)
from kvstore.embedded.commit import commit_batch
from kvstore.embedded.groupcommit import GroupCommitter, Request
from kvstore.embedded.reaper import LeaseReaper
from kvstore.embedded.recovery import checkpointed_point, command_packer, recover
from kvstore.lease import lease_id_of
from kvstore.machine.leases import LeaseTable
from kvstore.embedded.verify import verify_store
from kvstore.embedded.watch import DEFAULT_HISTORY_BYTES, Watch, WatchHub
from kvstore.events import watch_range
from kvstore.sharding import shard_of
from kvstore.keys import (MAX_KEY_SIZE, MAX_TXN_SIZE, MAX_VALUE_SIZE, check_key,
                          check_limit, check_optional_value, check_value, scan_range)
from kvstore.storage import Storage
from kvstore.txnbuffer import NOT_WRITTEN, BufferedTxn, TxnBuffer, entry_bytes
from kvstore.storage.checkpoint import Checkpointer
from kvstore.storage.environment import META_LOG_FIRST, THIRD_PARTY_ERRORS, ShardTables, translate
from kvstore.storage.overlay import MISSING, Overlay, ShardView, items_in_range, lookup, merge_rows
from kvstore.machine.data import revision_of, scan_rows, scan_values, value_of
from kvstore.storage.wal import KIND_CHECKPOINT, WAL_DIR, Record, WriteAheadLog
from kvstore._native import unpack_rows

#: Bytes of one log segment (preallocated; smaller ones on a nearly full disk). Opening
#: reads the segments after the checkpoint whole: 4 MiB keeps that near 10 ms.
WAL_SEGMENT_BYTES = 4 * 1024 * 1024
#: A checkpoint runs at least this often while there are new writes ...
CHECKPOINT_SECONDS = 1.0
#: ... and sooner once the overlay's active generation holds this many bytes.
CHECKPOINT_BYTES = 8 * 1024 * 1024
#: Writers wait (for a checkpoint) while the overlay holds this many bytes.
OVERLAY_LIMIT_BYTES = 64 * 1024 * 1024


class _MultiShardTxn:
    """A transaction spanning shards: validated and applied as one, in one LMDB commit."""

    __slots__ = ("parts",)

    def __init__(self, parts: dict) -> None:
        self.parts = parts  # shard -> (reads, ranges, writes)


class EmbeddedKV(KV):
    """``kvstore.open(path)``: a durable, thread-safe, transactional store in this process."""

    def __init__(self, path: str | os.PathLike, *, shards: int | None = None,
                 map_size: int | None = None, create: bool = True,
                 wal_files=None, watch_history_bytes: int = DEFAULT_HISTORY_BYTES) -> None:
        """``wal_files``: the log's file system port (``wal.OsFiles`` by default);
        tests pass a twin that loses what was not synced at a simulated power loss.
        ``watch_history_bytes``: the changes kept in memory for watchers (all shards)."""
        self._storage = Storage(path, shards=shards, map_size=map_size, create=create)
        self.path = self._storage.path
        self._nshards = self._storage.nshards
        self._tables = self._storage.shards
        self._data = [t.data for t in self._tables]
        self._begin = self._storage.env.begin
        self._active_readers = self._storage._active_readers
        self._db0 = self._data[0] if self._nshards == 1 else None
        self._closed = False  # close() was called: every call refused
        self._close_done = False  # and it ran to its end (else the next close() finishes it)
        self._close_lock = threading.Lock()
        self._committer = GroupCommitter(functools.partial(commit_batch, self))
        self._pack_command = command_packer()  # the committing thread's (one at a time)
        self._wal: WriteAheadLog | None = None
        self._checkpointer: Checkpointer | None = None
        self._checkpoint_record: Record | None = None  # rides on the next append
        self._watch: WatchHub | None = None  # set once recovered: watchers see what follows
        #: per shard: it has (had) a lease, so plain writes detach keys (``commit``)
        self._lease_shards = [False] * self._nshards
        self._reaper = LeaseReaper(self)
        try:
            applied, position, closed_at = self._storage.read(
                lambda txn: checkpointed_point(self, txn), "reading the applied points", True)
            # the overlay holds every shard's data table at ``shard`` and its txns table
            # (leases) at ``nshards + shard`` (``kvstore.embedded.commit``)
            self._overlay = Overlay(2 * self._nshards, applied + applied, position)
            self._wal = WriteAheadLog.open(os.path.join(self.path, WAL_DIR), wal_files,
                                           segment_bytes=WAL_SEGMENT_BYTES)
            self._checkpointer = Checkpointer(
                self._overlay, lambda fn: self._storage.write(fn),
                self._tables + [ShardTables(t.log, t.meta, t.txns, t.txns) for t in self._tables],
                self._after_checkpoint, CHECKPOINT_SECONDS, CHECKPOINT_BYTES,
                OVERLAY_LIMIT_BYTES, self.path)
            recover(self, position, closed_at)
            self._load_leases()
            self._watch = WatchHub(self._nshards, watch_history_bytes,
                                   self._overlay.applied[:self._nshards], self.path)
            self._checkpointer.start()
            weakref.finalize(self, self._wal.close)  # dropped without close(): its files
        except BaseException:
            if self._wal is not None:
                self._wal.close()
            self._storage.close()
            raise
        _open_stores.add(self)

    # -- helpers --------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            if self._storage.forked:
                self._storage.check_usable()  # says fork() and what to do
            raise KVError(f"the store at {self.path} is closed")

    def _shard(self, key: bytes) -> int:
        n = self._nshards
        return 0 if n == 1 else shard_of(key, n)

    def _submit(self, payload, size: int) -> object:
        self._check_open()
        return self._committer.submit(Request(payload, size))

    # -- leases (``kvstore.machine.leases``, ``kvstore.embedded.reaper``) -----------------

    def _load_leases(self) -> None:
        """At open: which shards have leases, and a full ttl for each lease from now."""
        n = self._nshards

        def read(txn, levels, _position):
            return [LeaseTable(ShardView([{}, *levels[n + s]], txn, t.txns), t.txns).all_records()
                    for s, t in enumerate(self._tables)]

        for shard, records in enumerate(self._snapshot(read, "reading the leases")):
            if records:
                self._lease_shards[shard] = True
                self._reaper.load(shard, records)

    def _lease_grant(self, lease_id: int, ttl_ms: int) -> None:
        for shard in range(self._nshards):
            self._submit((shard, lease_grant(lease_id, ttl_ms)), 16)

    def _lease_keepalive(self, lease_id: int) -> bool:
        return all([self._submit((shard, lease_keepalive(lease_id)), 8)
                    for shard in range(self._nshards)])

    def _lease_revoke(self, lease_id: int) -> int:
        deleted = [self._submit((shard, lease_revoke(lease_id)), 8)
                   for shard in range(self._nshards)]
        return sum(d for d in deleted if type(d) is int)

    def _expire_lease(self, shard: int, command) -> object:
        """The reaper's LeaseExpire, through group commit like any write."""
        return self._submit((shard, command), 16)

    def _put_leased(self, key, value, lease, ttl) -> None:
        """``put`` with ``lease=`` or ``ttl=`` (one of them)."""
        key, value = check_key(key), check_value(value)
        if lease is not None and ttl is not None:
            raise InvalidArgument("put takes lease= or ttl=, not both")
        if lease is not None:
            lease_id = lease_id_of(lease)
            if self._submit((self._shard(key), put_lease(key, value, lease_id)),
                            len(key) + len(value)) == NO_LEASE:
                raise LeaseExpired(f"lease {lease_id} is gone (expired or revoked): "
                                   f"{key[:40]!r} was not written")
        else:
            self._submit((self._shard(key), put_ttl(key, value, check_ttl(ttl))),
                         len(key) + len(value))

    # -- reads ----------------------------------------------------------------------------

    def get(self, key):
        # The hot read path, kept flat on purpose: every attribute lookup and call
        # here is measured against a raw LMDB get (bench/embedded.py).
        if type(key) is not bytes or not 0 < len(key) <= MAX_KEY_SIZE:
            key = check_key(key)
        if self._closed:
            self._check_open()
        shard = 0 if self._db0 is not None else shard_of(key, self._nshards)
        overlay = self._overlay
        raw = overlay.active[shard].get(key, MISSING)  # active, then frozen, then LMDB
        if raw is MISSING:
            frozen = overlay.frozen
            if frozen is not None:
                raw = frozen[shard].get(key, MISSING)
        if raw is not MISSING:
            try:
                return value_of(key, raw)
            except CorruptRecord as e:
                raise translate(e, self.path, "reading") from e
        db = self._db0 or self._data[shard]
        active = self._active_readers
        storage = self._storage
        active.append(None)  # the reader gate of Storage.begin_read, inlined
        if storage._growing:  # the map is being grown: take the slow, waiting path
            active.pop()
            raw = storage.read(lambda txn: value_of(key, txn.get(key, None, db)),
                               "reading", True)
            self._check_open()
            return raw
        else:
            # Every LMDB commit is a checkpoint of writes already durable in the log:
            # a snapshot LMDB shows before its own sync is durable all the same.
            try:
                txn = self._begin()
                value = value_of(key, txn.get(key, None, db))  # checksum verified
                txn.commit()
                return value
            except CorruptRecord as e:
                raise translate(e, self.path, "reading") from e
            except THIRD_PARTY_ERRORS as e:
                self._check_open()
                raise translate(e, self.path, "reading") from e
            finally:
                active.pop()

    def _snapshot(self, fn, doing: str):
        """``fn(txn, levels, position)``: an LMDB read transaction and, per shard, the
        overlay's generations (the active one copied, so that writers may go on),
        taken together under the overlay's lock (one consistent view), and the log
        position that view stands for.
        """
        overlay, storage = self._overlay, self._storage
        with overlay.lock:
            levels = overlay.snapshot_levels()
            position = overlay.position
            txn = storage.begin_read(True)
        return storage.run_read(txn, lambda t: fn(t, levels, position), doing)

    def scan(self, prefix=b"", start=None, end=None, limit=None):
        self._check_open()
        lo, hi = scan_range(prefix, start, end)
        limit = check_limit(limit)
        if hi is not None and hi <= lo:
            return []

        overlay = self._overlay
        with overlay.lock:  # the overlay and the LMDB snapshot together; a copy of the
            levels = overlay.snapshot_levels()  # active generation (a C loop) holds the
            txn = self._storage.begin_read(True)  # lock less long than filtering it would
        over = [items_in_range(shard_levels, lo, hi) for shard_levels in levels[:self._nshards]]

        def read(txn):
            per_shard = [scan_values(txn, db, lo, hi, limit) if not over[s]
                         else merged_values(txn, db, over[s], lo, hi, limit)
                         for s, db in enumerate(self._data)]
            if len(per_shard) == 1:
                return per_shard[0]
            # One snapshot across shards; each holds its own first ``limit`` keys.
            return list(itertools.islice(heapq.merge(*per_shard), limit))

        return self._storage.run_read(txn, read, "scanning")

    # -- single-key writes -------------------------------------------------------------------

    def put(self, key, value, lease=None, ttl=None) -> None:
        # The hot write path, flat like get's: the checks' slow paths only off bytes.
        if lease is not None or ttl is not None:
            return self._put_leased(key, value, lease, ttl)
        if type(key) is not bytes or not 0 < len(key) <= MAX_KEY_SIZE:
            key = check_key(key)
        if type(value) is not bytes or len(value) > MAX_VALUE_SIZE:
            value = check_value(value)
        if self._closed:
            self._check_open()
        shard = 0 if self._db0 is not None else shard_of(key, self._nshards)
        self._committer.submit(Request((shard, (OP_PUT, key, value)), len(key) + len(value)))

    def delete(self, key) -> bool:
        key = check_key(key)
        return self._submit((self._shard(key), (OP_DELETE, key)), len(key))

    def cas(self, key, expected, new, *, lease=None) -> bool:
        key = check_key(key)
        expected = check_optional_value(expected, "expected")
        new = check_optional_value(new, "new")
        size = len(key) + len(expected or b"") + len(new or b"")
        if lease is None:
            return self._submit((self._shard(key), (OP_CAS, key, expected, new)), size)
        lease_id = lease_id_of(lease)
        result = self._submit((self._shard(key), cas_lease(key, expected, new, lease_id)), size)
        if result == NO_LEASE:
            raise LeaseExpired(f"lease {lease_id} is gone (expired or revoked): {key[:40]!r} "
                               f"was not compared nor written")
        return bool(result)

    def incr(self, key, delta=1) -> int:
        command = incr(check_key(key), check_delta(delta))
        return incr_result(command, self._submit((self._shard(command.key), command),
                                                 len(command.key) + 8))

    # -- transactions ---------------------------------------------------------------------

    def watch(self, key=None, prefix=None, start_revision=None, *,
              prev_value: bool = False) -> Watch:
        """Every change of ``key``, of keys under ``prefix``, or of every key (neither),
        from ``start_revision`` on (None: from now; an int: that revision of every shard
        concerned; a dict: a ``Watch.position``): a ``Watch`` (docs/watch.md)."""
        self._check_open()
        lo, _hi, key = watch_range(key, prefix)
        shards = [self._shard(key)] if key is not None else list(range(self._nshards))
        return Watch(self._watch, shards, key=key, prefix=None if key is not None else lo,
                     start_revision=start_revision, prev_value=prev_value)

    def transaction(self) -> "EmbeddedTxn":
        self._check_open()
        return EmbeddedTxn(self)

    def _commit_txn(self, reads: dict, ranges: dict, writes: dict) -> bool:
        """Submit a transaction's read and write sets; True if it committed."""
        parts: dict[int, tuple[list, list, list]] = {}

        def part(shard):
            p = parts.get(shard)
            if p is None:
                p = parts[shard] = ([], [], [])
            return p

        for shard, shard_reads in reads.items():
            part(shard)[0].extend(shard_reads.items())
        for shard, shard_ranges in ranges.items():
            part(shard)[1].extend(shard_ranges)
        for key, value in writes.items():
            part(self._shard(key))[2].append((key, value))
        if not any(p[2] for p in parts.values()):
            return True  # read-only: its snapshot already is a serializable view
        size = _txn_size(parts)
        if size > 2 * MAX_TXN_SIZE:  # its writes are checked at put; its reads count here
            raise InvalidArgument(
                f"this transaction's log entry would be {size} bytes (its writes and the keys "
                f"it read or scanned); the largest allowed is 2 x MAX_TXN_SIZE = "
                f"{2 * MAX_TXN_SIZE}: split it into smaller transactions")
        if len(parts) == 1:
            (shard, (r, g, w)), = parts.items()
            return self._submit((shard, (OP_TXN, r, g, w)), size)
        return self._submit(_MultiShardTxn(parts), size)

    # -- checkpoints and recovery (``kvstore.embedded.recovery``) ---------------------------

    def _after_checkpoint(self, position: int) -> None:
        """LMDB holds everything below ``position``: say so in the log, drop what it covers."""
        self._checkpoint_record = Record(KIND_CHECKPOINT, slot=position)
        self._wal.truncate_before(position)

    # -- introspection --------------------------------------------------------------------

    def verify(self) -> dict:
        """Check everything that carries a checksum, and the state against the log
        (``kvstore.embedded.verify``). Returns ``{"pages": n, "records": n, "bytes": n,
        "values": n, "keys_compared": n}``; the first problem raises ``CorruptRecord``."""
        self._check_open()
        return verify_store(self)

    def status(self) -> dict:
        self._check_open()
        overlay = self._overlay

        def read(txn, levels, _position):
            shards = []
            for s, tables in enumerate(self._tables):
                keys = txn.stat(tables.data)["entries"]
                for key, raw in items_in_range(levels[s], b"", None):
                    in_lmdb = txn.get(key, None, tables.data) is not None
                    keys += (raw is not None) - in_lmdb
                applied = overlay.applied[s]
                shards.append({
                    "shard": s,
                    "leader": "local",
                    "commit_index": applied,
                    "applied_index": applied,
                    "checkpoint_index": overlay.frozen_applied[s]
                    if overlay.frozen is not None else None,
                    "log_first": self._storage.meta_int(txn, s, META_LOG_FIRST, 1),
                    "keys": keys,
                    "replicas": {"local": applied},
                })
            return shards

        shards = self._snapshot(read, "reading the status")
        wal = self._wal
        return {
            "mode": "embedded",
            "path": self.path,
            "implementation": _native.IMPLEMENTATION,
            "nodes": [{"id": "local", "address": None, "state": "up",
                       "role": "leader", "path": self.path}],
            "shards": shards,
            "disk_bytes": self._storage.disk_usage(),
            "map_size": self._storage.map_size,
            "log": {"path": wal.path, "first_position": wal.first_position,
                    "end_position": wal.end, "appends": wal.appends,
                    "checkpoints": self._checkpointer.checkpoints,
                    "overlay_bytes": overlay.bytes},
        }

    def checkpoint(self) -> bool:
        """Move every acknowledged write into LMDB now (the background thread does this
        on its own every ``CHECKPOINT_SECONDS``); False if there was nothing new."""
        self._check_open()
        return self._checkpointer.checkpoint()

    def close(self) -> None:
        """Close the store: wait for writes in flight, checkpoint, release the directory.
        A close() interrupted (Ctrl-C) is finished by the next one."""
        with self._close_lock:  # held throughout: a second close() waits for the first
            self._closed = True
            if self._close_done or self._storage.forked:  # a child of fork() leaves the
                return  # parent's store alone
            self._close()
            self._close_done = True

    def _close(self) -> None:
        if self._watch is not None:
            self._watch.close()  # waiting watchers end with "the store is closed"
        self._reaper.stop()  # no expiry is written after close
        # Wait for an in-flight commit by queueing behind it: submit a no-op batch.
        try:
            if self._storage.env is not None:  # else an interrupted close() got this far
                self._committer.submit(Request(None))
        finally:
            self._committer.stop()
            try:
                if not self._storage.forked:
                    self._checkpointer.stop()
                    try:  # the next open then replays nothing; the log has it all anyway
                        self._checkpointer.checkpoint(closing=True)
                    except StorageError:
                        pass
            finally:
                self._wal.close()
                self._storage.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<kvstore.EmbeddedKV {self.path!r} shards={self._nshards} {state}>"


def _txn_size(parts: dict) -> int:
    """The bytes a transaction's command adds to a log entry, about."""
    return sum(entry_bytes(reads, ranges, writes) for reads, ranges, writes in parts.values())


#: Every open store of this process, so a child of fork() finds them closed.
_open_stores: "weakref.WeakSet[EmbeddedKV]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for store in list(_open_stores):
        store._closed = True  # every call now fails in _check_open, naming fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


def merged_rows(txn, db, over: list, lo: bytes, hi: bytes | None,
                limit: int | None) -> list[tuple[bytes, bytes]]:
    """A shard's ``(key, raw)`` rows in ``[lo, hi)``: LMDB's with the overlay's
    ``over`` (``items_in_range``) laid over them, at most ``limit``.

    LMDB is read for ``limit + len(over)`` rows: each overlay item hides at most
    one, so the first ``limit`` merged rows all lie within what was read.
    """
    fetch = None if limit is None else limit + len(over)
    return list(merge_rows(over, scan_rows(txn, db, lo, hi, fetch), limit))


def merged_values(txn, db, over: list, lo: bytes, hi: bytes | None,
                  limit: int | None) -> list[tuple[bytes, bytes]]:
    """``merged_rows`` as user-visible ``(key, value)`` pairs, checksums verified."""
    return unpack_rows(merged_rows(txn, db, over, lo, hi, limit))


class EmbeddedTxn(BufferedTxn):
    """Optimistic, serializable: reads come from one snapshot (taken at the first read:
    the overlay's generations and an LMDB read transaction) plus this transaction's own
    writes; at commit the keys and ranges it read are
    checked unchanged, in the same commit that applies its writes, or it raises
    ``TransactionConflict`` and nothing of it is applied.

    A ``Txn`` belongs to the thread that made it.
    """

    def __init__(self, store: EmbeddedKV) -> None:
        self._store = store
        self._snapshot = None
        self._levels: list = []
        self._finalizer = None
        self._buffer = TxnBuffer(MAX_TXN_SIZE, "MAX_TXN_SIZE")  # reads, ranges, writes
        self._state = "new"  # new -> open -> committed | discarded

    # -- lifecycle (``BufferedTxn``) ---------------------------------------------------------

    def commit(self) -> None:
        """Commit now (the context manager does this on a clean exit)."""
        self._check_usable()
        try:
            buffer = self._buffer
            ok = self._store._commit_txn(buffer.reads, buffer.ranges, buffer.writes)
        finally:
            self._finish("committed")
        if not ok:
            self._state = "discarded"
            raise TransactionConflict(
                "a concurrent write changed what this transaction read; nothing of it was "
                "applied (run_transaction retries automatically)")

    def discard(self) -> None:
        """Drop every write of this transaction."""
        if self._state in ("new", "open"):
            self._finish("discarded")

    def _finish(self, state: str) -> None:
        self._state = state
        if self._finalizer is not None:
            self._finalizer()  # ends the snapshot's read transaction
            self._finalizer = None
        self._snapshot = None

    def _check_usable(self) -> None:
        self._check_state()
        self._store._check_open()

    def _view(self):
        """The LMDB snapshot, and beside it ``self._levels``: per shard, the overlay's
        generations taken with it (the active one copied), so all reads of this
        transaction see one state."""
        if self._snapshot is None:
            store = self._store
            storage, overlay = store._storage, store._overlay
            with overlay.lock:
                self._levels = overlay.snapshot_levels()
                self._snapshot = storage.begin_read(True)  # buffers: lengths checked first
            self._finalizer = weakref.finalize(self, storage.end_read, self._snapshot)
        return self._snapshot

    # -- operations ------------------------------------------------------------------------

    def get(self, key):
        self._check_usable()
        key = check_key(key)
        value = self._buffer.written(key)
        return self._read(key) if value is NOT_WRITTEN else value

    def _read(self, key: bytes) -> bytes | None:
        store = self._store
        shard = store._shard(key)
        try:
            txn = self._view()
            raw = lookup(self._levels[shard], key)
            if raw is MISSING:
                raw = txn.get(key, db=store._data[shard])
            value = value_of(key, raw)
            revision = revision_of(raw)
        except (CorruptRecord, *THIRD_PARTY_ERRORS) as e:
            raise translate(e, store.path, "reading in a transaction") from e
        self._buffer.record_read(shard, key, revision)
        return value

    def put(self, key, value) -> None:
        self._check_usable()
        key = check_key(key)
        self._buffer.put(key, check_value(value))

    def delete(self, key) -> bool:
        self._check_usable()
        key = check_key(key)
        self._buffer.check_delete(key)  # past the limit: raise before reading anything
        existed = self.get(key) is not None
        self._buffer.delete(key)
        return existed

    def scan(self, prefix=b"", start=None, end=None, limit=None):
        self._check_usable()
        scan = self._buffer.scan(prefix, start, end, limit)
        if scan is None:
            return []
        lo, hi = scan.lo, scan.hi
        view = self._view()
        for shard, db in enumerate(self._store._data):
            try:
                over = items_in_range(self._levels[shard], lo, hi)
                rows = merged_rows(view, db, over, lo, hi, scan.fetch)
                values = unpack_rows(rows)  # every checksum verified
                scan.add(shard, [(k, v, revision_of(raw))
                                 for (k, v), (_k, raw) in zip(values, rows)])
            except (CorruptRecord, *THIRD_PARTY_ERRORS) as e:
                raise translate(e, self._store.path, "scanning in a transaction") from e
        return scan.result()
