"""The embedded store: ``kvstore.open(dir)``, one replica in this process.

Writes flow the way they do in a cluster: each command becomes part of a log
entry of its shard, and a group of entries is made durable by one append to
the write-ahead log (``kvstore.storage.wal``, in ``<dir>/wal/``): one
``pwrite`` and one ``fdatasync``, the GIL released. A single replica is its own
quorum, so "committed" means "appended and fsync'd". Concurrent writers share
one append (``GroupCommitter``): many commands per entry, one entry per shard
per group, one ``fdatasync`` per group.

An append holds, after its entries, one ``KIND_COMMIT_POINT`` record naming
every ``(shard, slot)`` the group chose: recovery applies a group's entries
only once it has read that record, so a torn last append (a multi-shard
transaction's entries included) is applied wholly or not at all.

Once appended, a group's writes go to the in-memory overlay
(``kvstore.storage.overlay``) that reads consult before LMDB; a background
checkpoint (``kvstore.storage.checkpoint``) moves them into LMDB in one synced
write transaction holding the log position it covers, then deletes the log
segments below it. Open = LMDB at its checkpoint + a replay of the log after
it. A directory without ``wal/`` (written before the log existed) opens as a
checkpoint with an empty log.
"""

from __future__ import annotations

import heapq
import itertools
import os
import struct
import threading
import weakref
from typing import Sequence

from kvstore import _native
from kvstore.api import KV
from kvstore.commands import (KIND_COMMANDS, OP_CAS, OP_DELETE, OP_PUT, OP_TXN, OP_TXN_WRITES,
                           decode_commands, encode_commands)
from kvstore.errors import (CorruptRecord, InvalidArgument, KVError, StorageError,
                            TransactionConflict)
from kvstore.embedded.groupcommit import GroupCommitter, Request
from kvstore.sharding import shard_of
from kvstore.keys import (MAX_KEY_SIZE, MAX_TXN_SIZE, MAX_VALUE_SIZE, check_key,
                          check_limit, check_optional_value, check_value, scan_range)
from kvstore.storage import Storage
from kvstore.txnbuffer import NOT_WRITTEN, BufferedTxn, TxnBuffer, entry_bytes
from kvstore.storage.checkpoint import Checkpointer
from kvstore.storage.environment import (META_APPLIED, META_LOG_CLOSED, META_LOG_FIRST,
                                         META_LOG_POSITION, THIRD_PARTY_ERRORS, translate)
from kvstore.storage.overlay import (MISSING, LazyRead, Overlay, ShardView, items_in_range,
                                     lookup, merge_rows)
from kvstore.machine.data import (apply_command, apply_writes, reads_still_valid,
                                   revision_of, scan_rows, scan_values, value_of)
from kvstore.storage.wal import (KIND_CHECKPOINT, KIND_COMMIT_POINT, KIND_ENTRY,
                                 RECORD_OVERHEAD, Record, WriteAheadLog)
from kvstore._native import unpack_rows

#: The log's directory inside the data directory (a cluster node uses the same one).
WAL_DIR = "wal"
#: Bytes of one log segment (preallocated; smaller ones on a nearly full disk). Opening
#: reads the segments after the checkpoint whole: 4 MiB keeps that near 10 ms.
WAL_SEGMENT_BYTES = 4 * 1024 * 1024
#: A checkpoint runs at least this often while there are new writes ...
CHECKPOINT_SECONDS = 1.0
#: ... and sooner once the overlay's active generation holds this many bytes.
CHECKPOINT_BYTES = 8 * 1024 * 1024
#: Writers wait (for a checkpoint) while the overlay holds this many bytes.
OVERLAY_LIMIT_BYTES = 64 * 1024 * 1024
_BALLOT = 0  # a single replica never needs a higher ballot than its first
_PAIR = struct.Struct("<HQ")  # (shard, slot) in a commit point's payload


def commit_point(chosen: list[tuple[int, int]]) -> Record:
    """The record that chooses a group's entries: its first ``(shard, slot)`` in the
    header (as a cluster node's per-shard commit point), any others in the payload."""
    (shard, slot), rest = chosen[0], chosen[1:]
    return Record(KIND_COMMIT_POINT, shard, slot, _BALLOT,
                  b"".join(_PAIR.pack(s, n) for s, n in rest))


def commit_pairs(record: Record) -> list[tuple[int, int]]:
    """Inverse of ``commit_point``."""
    payload = record.payload
    if len(payload) % _PAIR.size:
        raise CorruptRecord(f"a commit point of {len(payload)} payload bytes")
    return [(record.shard, record.slot)] + [_PAIR.unpack_from(payload, i)
                                            for i in range(0, len(payload), _PAIR.size)]


def chosen_entries(records, shards: int):
    """``(entries, end)`` per group of ``(position, group, Record)`` whose commit point
    was read (``WriteAheadLog.replay_groups``).

    ``entries`` are the group's ``KIND_ENTRY`` records in log order; ``end`` the
    position just past its commit point. A commit point chooses the entries of
    its own append only: those of an append whose commit point was torn off
    (its entries survived, it was never acknowledged, and the next append
    reuses its slots) are never chosen, then or later.
    """
    pending: list[Record] = []
    pending_group = None
    for position, group, record in records:
        if group != pending_group:  # a new append: what the last one left is orphaned
            pending, pending_group = [], group
        if record.kind == KIND_ENTRY:
            if record.shard >= shards:
                raise CorruptRecord(f"a log entry of shard {record.shard} at position "
                                    f"{position}; the store has {shards} shard(s)")
            pending.append(record)
        elif record.kind == KIND_COMMIT_POINT:
            chosen = dict(commit_pairs(record))
            entries = [e for e in pending if e.slot <= chosen.get(e.shard, -1)]
            pending = [e for e in pending if e.slot > chosen.get(e.shard, -1)]
            yield entries, position + RECORD_OVERHEAD + len(record.payload)


class _MultiShardTxn:
    """A transaction spanning shards: validated and applied as one, in one LMDB commit."""

    __slots__ = ("parts",)

    def __init__(self, parts: dict) -> None:
        self.parts = parts  # shard -> (reads, ranges, writes)


class EmbeddedKV(KV):
    """``kvstore.open(path)``: a durable, thread-safe, transactional store in this process."""

    def __init__(self, path: str | os.PathLike, *, shards: int | None = None,
                 map_size: int | None = None, create: bool = True,
                 wal_files=None) -> None:
        """``wal_files``: the log's file system port (``wal.OsFiles`` by default);
        tests pass a twin that loses what was not synced at a simulated power loss."""
        self._storage = Storage(path, shards=shards, map_size=map_size, create=create)
        self.path = self._storage.path
        self._nshards = self._storage.nshards
        self._tables = self._storage.shards
        self._data = [t.data for t in self._tables]
        self._begin = self._storage.env.begin
        self._active_readers = self._storage._active_readers
        self._db0 = self._data[0] if self._nshards == 1 else None
        self._closed = False
        self._close_lock = threading.Lock()
        self._committer = GroupCommitter(self._commit_batch)
        self._wal: WriteAheadLog | None = None
        self._checkpointer: Checkpointer | None = None
        self._checkpoint_record: Record | None = None  # rides on the next append
        try:
            applied, position, closed_at = self._storage.read(
                self._checkpointed_point, "reading the applied points", True)
            self._overlay = Overlay(self._nshards, applied, position)
            self._wal = WriteAheadLog.open(os.path.join(self.path, WAL_DIR), wal_files,
                                           segment_bytes=WAL_SEGMENT_BYTES)
            self._checkpointer = Checkpointer(
                self._overlay, lambda fn: self._storage.write(fn), self._tables,
                self._after_checkpoint, CHECKPOINT_SECONDS, CHECKPOINT_BYTES,
                OVERLAY_LIMIT_BYTES, self.path)
            self._recover(position, closed_at)
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
        over = [items_in_range(shard_levels, lo, hi) for shard_levels in levels]

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

    def put(self, key, value) -> None:
        # The hot write path, flat like get's: the checks' slow paths only off bytes.
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

    def cas(self, key, expected, new) -> bool:
        key = check_key(key)
        expected = check_optional_value(expected, "expected")
        new = check_optional_value(new, "new")
        size = len(key) + len(expected or b"") + len(new or b"")
        return self._submit((self._shard(key), (OP_CAS, key, expected, new)), size)

    # -- transactions ---------------------------------------------------------------------

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

    # -- the commit path -----------------------------------------------------------------

    def _commit_batch(self, batch: Sequence[Request]) -> None:
        """Apply a batch onto the overlay's view, append its entries (one ``fdatasync``),
        then publish its writes: nothing is visible, nor answered, before it is durable.

        Only the group-commit leader runs this, one at a time, so the state the
        batch was computed on cannot change before its writes are published.
        If the append fails, nothing of the batch is published and every
        request of it gets the error.
        """
        if self._storage.env is None:
            raise KVError(f"the store at {self.path} is closed")
        self._checkpointer.wait_for_room()
        overlay, storage = self._overlay, self._storage
        # No lock: only this thread publishes into ``active``; a freeze in between
        # makes ``frozen`` the ``active`` read here (or a later one), a drop leaves its
        # writes in LMDB, and the read transaction below is begun after both reads.
        active = overlay.active
        frozen = overlay.frozen

        def begin():
            # Begun after the generations were taken: whatever a checkpoint moved from
            # them into LMDB meanwhile, this snapshot holds it with the same values.
            with overlay.lock:
                return storage.begin_read()

        txn = LazyRead(begin)
        pending: dict[int, dict] = {}
        views: dict[int, ShardView] = {}

        def view(shard: int) -> ShardView:
            v = views.get(shard)
            if v is None:
                levels = [pending.setdefault(shard, {}), active[shard]]
                if frozen is not None:
                    levels.append(frozen[shard])
                v = views[shard] = ShardView(levels, txn, self._data[shard])
            return v

        try:
            results = self._apply_batch(view, batch)
        except THIRD_PARTY_ERRORS as e:
            raise translate(e, self.path, "applying a write") from e
        finally:
            if txn.txn is not None:
                storage.end_read(txn.txn)
        entries = results.entries
        if entries:  # else barriers only (close waits behind in-flight commits)
            records = [Record(KIND_ENTRY, shard, slot, _BALLOT, encode_commands(commands),
                              KIND_COMMANDS) for shard, slot, commands in entries]
            slots = [(shard, slot) for shard, slot, _ in entries]
            records.append(commit_point(slots))
            checkpoint = self._checkpoint_record  # set by the checkpoint thread
            if checkpoint is not None:
                records.append(checkpoint)
            try:
                end = self._wal.append(records)
            except StorageError as e:  # nothing of the batch is published
                raise self._log_error(e) from e
            if self._checkpoint_record is checkpoint:
                self._checkpoint_record = None
            overlay.publish(pending, slots, end)
        for request, result in zip(batch, results):
            if type(result) is _Failed:
                request.error = result.error
            else:
                request.result = result

    def _log_error(self, e: StorageError) -> StorageError:
        """A failed append as the store's error: it names the data directory."""
        if e.path == self.path or isinstance(e, CorruptRecord):
            return e
        hint = ("" if "disk full" in str(e) else
                "; the log refuses writes until the store is closed and opened again")
        return StorageError(f"{e}{hint}", self.path)

    def _apply_batch(self, view, batch: Sequence[Request]) -> "_BatchResults":
        applied = self._overlay.applied
        data = self._data
        entries: dict[int, list] = {}
        results = _BatchResults()
        for request in batch:
            payload = request.payload
            if payload is None:  # a barrier (close waits behind in-flight commits)
                results.append(None)
            elif type(payload) is tuple:
                shard, command = payload
                try:
                    result = apply_command(view(shard), data[shard], applied[shard] + 1,
                                           command)
                except CorruptRecord as e:  # a corrupt value read by this command: it alone
                    results.append(_Failed(translate(e, self.path, "applying a write")))
                    continue
                commands = entries.get(shard)
                if commands is None:
                    commands = entries[shard] = []
                commands.append(command)
                results.append(result)
            else:
                try:
                    results.append(self._apply_multi_shard(view, payload, entries))
                except CorruptRecord as e:
                    results.append(_Failed(translate(e, self.path, "applying a transaction")))
        results.entries = [(shard, applied[shard] + 1, commands)
                           for shard, commands in sorted(entries.items())]
        return results

    def _apply_multi_shard(self, view, payload: _MultiShardTxn, entries: dict) -> bool:
        data, applied = self._data, self._overlay.applied
        for shard, (reads, ranges, _writes) in payload.parts.items():
            if not reads_still_valid(view(shard), data[shard], reads, ranges):
                return False
        for shard, (_reads, _ranges, writes) in payload.parts.items():
            if writes:
                apply_writes(view(shard), data[shard], applied[shard] + 1, writes)
                entries.setdefault(shard, []).append((OP_TXN_WRITES, writes))
        return True

    # -- checkpoints and recovery ----------------------------------------------------------

    def _checkpointed_point(self, txn) -> tuple[list[int], int, int]:
        """``(applied slot per shard, log position, closed at)`` of LMDB's last
        checkpoint; ``closed at`` is its position if a clean close made it, else 0.

        A directory written before the log existed has no log position: 0.
        """
        applied = [self._applied_point(txn, s) for s in range(self._nshards)]
        meta = self._storage.meta_int
        position = min(meta(txn, s, META_LOG_POSITION) for s in range(self._nshards))
        closed_at = min(meta(txn, s, META_LOG_CLOSED) for s in range(self._nshards))
        return applied, position, closed_at

    def _applied_point(self, txn, shard: int) -> int:
        """The shard's applied point in LMDB: what its checkpoints recorded in meta, or,
        in a directory written before the log existed (whose commits each appended to
        the ``log`` table and recorded meta only at compactions), the last slot there.
        """
        recorded = self._storage.meta_int(txn, shard, META_APPLIED)
        cursor = txn.cursor(self._tables[shard].log)
        try:
            last = 0
            if cursor.last():
                key, raw = cursor.key(), cursor.value()
                if len(key) != 8 or len(raw) < _native.RECORD_HEADER_SIZE:
                    raise CorruptRecord(f"the last log record of shard {shard} is malformed "
                                        f"({len(key)}-byte key, {len(raw)} bytes)")
                last = _native.key_slot(key)
                said = int.from_bytes(bytes(raw[8:16]), "little")  # the header's slot
                if said != last:
                    raise CorruptRecord(f"the last log record of shard {shard} is stored "
                                        f"under slot {last} but says slot {said}", slot=last)
        finally:
            cursor.close()
        return max(recorded, last)

    def _recover(self, position: int, closed_at: int) -> None:
        """Replay the log after LMDB's checkpoint into the overlay (nothing twice)."""
        wal = self._wal
        if wal.end < position and closed_at == position:
            wal.restart_at(position)  # a clean close checkpointed all of it: nothing lost
        if wal.end < position:
            raise CorruptRecord(
                f"corrupt log record in {wal.path}: the log ends at position {wal.end} but "
                f"the state in {self.path} was checkpointed up to position {position}, so "
                f"records it held are missing or were cut as corrupt; restore it from a "
                f"replica or a backup", offset=wal.end, path=self.path)
        for entries, end in chosen_entries(wal.replay_groups(position), self._nshards):
            self._replay_group(entries, end)
            if self._overlay.active_bytes >= CHECKPOINT_BYTES:
                self._checkpointer.checkpoint()

    def _replay_group(self, entries: list[Record], end: int) -> None:
        """Apply one recovered group's entries (those the checkpoint lacks) to the overlay."""
        overlay = self._overlay
        applied = list(overlay.applied)
        pending: dict[int, dict] = {}
        slots = []

        def replay(txn):
            for record in entries:
                shard, slot = record.shard, record.slot
                if slot <= applied[shard]:
                    continue  # already in LMDB's checkpoint
                if slot != applied[shard] + 1:
                    raise CorruptRecord(
                        f"the log of {self.path} jumps from slot {applied[shard]} to {slot} "
                        f"in shard {shard}: entries are missing", slot=slot, path=self.path)
                view = ShardView([pending.setdefault(shard, {}), *overlay.levels(shard)],
                                 txn, self._data[shard])
                for command in decode_commands(record.payload, slot):
                    apply_command(view, self._data[shard], slot, command)
                applied[shard] = slot
                slots.append((shard, slot))

        self._storage.read(replay, "replaying the log", False)
        overlay.publish(pending, slots, end)

    def _after_checkpoint(self, position: int) -> None:
        """LMDB holds everything below ``position``: say so in the log, drop what it covers."""
        self._checkpoint_record = Record(KIND_CHECKPOINT, slot=position)
        self._wal.truncate_before(position)

    # -- introspection --------------------------------------------------------------------

    def verify(self) -> dict:
        """Check everything that carries a checksum, and the state against the log.

        Every log record still kept (the write-ahead log's, and the ``log``
        table's of a directory written before it) is decoded and checksummed,
        every stored value's checksum is verified (LMDB's and the overlay's),
        and the state (the overlay over LMDB, one snapshot) is compared with
        the log where the log still covers it (``_compare_with_log``). The
        first problem raises ``CorruptRecord`` naming the path, shard and key
        or slot.

        Before that, every page of LMDB's B-trees is checked (``storage.pages``).

        Returns ``{"pages": n, "records": n, "bytes": n, "values": n, "keys_compared": n}``.
        """
        self._check_open()
        try:  # LMDB then holds every acknowledged write, and its pages are checked below
            self._checkpointer.checkpoint()
        except CorruptRecord:
            raise
        except StorageError:
            pass  # a full disk: the overlay is compared all the same
        pages = self._storage.check_pages()
        with self._checkpointer.holding():  # no segment is deleted while we read them
            def read(txn, levels, position):
                wal_ops = self._verify_wal(position)  # the log up to the snapshot's point
                out = {"pages": pages, "records": 0, "bytes": 0, "values": 0,
                       "keys_compared": 0}
                for shard, tables in enumerate(self._tables):
                    ops, first, last = self._verify_log(txn, shard, out)
                    first, last = _join_ranges(ops, first, last, wal_ops[shard], out)
                    view = ShardView([{}, *levels[shard]], txn, tables.data)
                    for key, raw in scan_rows(view, tables.data, b"", None, None):
                        try:
                            value = value_of(key, raw)
                        except CorruptRecord as e:
                            raise CorruptRecord(f"{e} in {self.path}, shard {shard}; "
                                                f"restore it from a replica or a backup",
                                                path=self.path) from e
                        out["values"] += 1
                        key_ops = ops.pop(key, None)
                        if first is not None:
                            problem = _compare_with_log(revision_of(raw), value, key_ops,
                                                        first, last)
                            if problem:
                                self._disagree(shard, key, problem)
                            out["keys_compared"] += 1
                    for key, key_ops in ops.items():  # written in the log, absent in the state
                        slot, kind, value, _expected = key_ops[-1]
                        if kind == "put":
                            self._disagree(shard, key, f"the log writes it at slot {slot} and "
                                                       f"nothing after, but the state lacks it")
                        out["keys_compared"] += 1
                return out

            return self._snapshot(read, "checking")

    def _verify_wal(self, position: int) -> list:
        """Per shard, ``(ops by key, first slot, last slot, records, bytes)`` of the
        write-ahead log's chosen entries below ``position`` (checksummed as read)."""
        found = [({}, None, None, 0, 0) for _ in range(self._nshards)]
        records = ((p, g, r) for p, g, r in self._wal.replay_groups(0) if p < position)
        for entries, _end in chosen_entries(records, self._nshards):
            for record in entries:
                ops, first, last, count, size = found[record.shard]
                slot = record.slot
                try:
                    for command in decode_commands(record.payload, slot):
                        _collect_ops(ops, slot, command)
                except (TypeError, ValueError, IndexError) as e:
                    raise CorruptRecord(f"corrupt command in the log of {self.path}, shard "
                                        f"{record.shard} slot {slot}: {e}", slot=slot,
                                        path=self.path) from e
                found[record.shard] = (ops, slot if first is None else first, slot,
                                       count + 1, size + RECORD_OVERHEAD + len(record.payload))
        return found
    def _verify_log(self, txn, shard: int, out: dict):
        """Checksum the shard's log; ``(ops by key, first slot, last slot)`` it covers."""
        ops: dict[bytes, list] = {}
        first = last = None
        cursor = txn.cursor(self._tables[shard].log)
        try:
            for raw_key, raw in cursor:
                try:
                    if len(raw_key) != 8:
                        raise CorruptRecord(f"a log key of {len(raw_key)} bytes")
                    slot = _native.key_slot(raw_key)
                    _, _, kind, payload = _native.decode_record(raw, slot)
                    if kind == KIND_COMMANDS:
                        for command in decode_commands(payload, slot):
                            _collect_ops(ops, slot, command)
                except CorruptRecord as e:
                    where = f"slot {e.slot}" if e.slot is not None else f"key {raw_key!r}"
                    raise CorruptRecord(f"corrupt log record in {self.path}, shard {shard} "
                                        f"{where}: {e}", slot=e.slot, offset=e.offset,
                                        path=self.path) from e
                except (TypeError, ValueError, IndexError) as e:  # a command of a bad shape
                    raise CorruptRecord(f"corrupt command in the log of {self.path}, shard "
                                        f"{shard} slot {slot}: {e}", slot=slot,
                                        path=self.path) from e
                if first is None:
                    first = slot
                last = slot
                out["records"] += 1
                out["bytes"] += len(raw)
        finally:
            cursor.close()
        return ops, first, last

    def _disagree(self, shard: int, key: bytes, problem: str) -> None:
        shown = key[:64] + (b"..." if len(key) > 64 else b"")
        raise CorruptRecord(f"the state of {self.path}, shard {shard}, disagrees with its log "
                            f"on key {shown!r}: {problem}; restore it from a replica or a "
                            f"backup", path=self.path)

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
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        # Wait for an in-flight commit by queueing behind it: submit a no-op batch.
        try:
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


def _join_ranges(ops: dict, first: int | None, last: int | None, found: tuple,
                 out: dict) -> tuple[int | None, int | None]:
    """Add the write-ahead log's ``found`` (``_verify_wal``) to the ``log`` table's
    ``ops`` of one shard; the ``(first, last)`` slots the two cover without a gap."""
    wal_ops, wal_first, wal_last, count, size = found
    out["records"] += count
    out["bytes"] += size
    if wal_first is None:
        return first, last
    for key, key_ops in wal_ops.items():  # the log table's slots all come before
        ops.setdefault(key, []).extend(key_ops)
    if first is None or last + 1 < wal_first:  # only the log's own range is covered
        first = wal_first
    return first, wal_last


def _collect_ops(ops: dict, slot: int, command) -> None:
    """Record what ``command`` (of the entry at ``slot``) may have written, per key.

    ``kind`` is "put" or "del" for writes that always take effect (a delete leaves
    the key absent either way), "cas" and "cond" for writes that depend on what
    they found (a transaction's writes depend on its reads).
    """
    op = command[0]
    if op == OP_PUT:
        ops.setdefault(command[1], []).append((slot, "put", command[2], None))
    elif op == OP_DELETE:
        ops.setdefault(command[1], []).append((slot, "del", None, None))
    elif op == OP_CAS:
        _, key, expected, new = command
        ops.setdefault(key, []).append((slot, "cas", new, expected))
    elif op == OP_TXN:
        for key, value in command[3]:
            ops.setdefault(key, []).append((slot, "cond", value, None))
    elif op == OP_TXN_WRITES:
        for key, value in command[1]:
            ops.setdefault(key, []).append(
                (slot, "put" if value is not None else "del", value, None))
    else:
        raise CorruptRecord(f"unknown command op {op!r} in slot {slot}", slot=slot)


def _compare_with_log(revision: int, value: bytes, key_ops: list | None, first: int,
                      last: int) -> str | None:
    """Why a stored ``(revision, value)`` cannot be what the log ``[first, last]`` wrote,
    or None if it can."""
    key_ops = key_ops or []
    if revision > last:
        return f"its revision {revision} is past the log's last slot {last}"
    if revision >= first:
        at = [op for op in key_ops if op[0] == revision]
        if not at:
            return f"its revision is {revision}, but the log entry at that slot does not write it"
        last_sure = max((i for i, op in enumerate(at) if op[1] in ("put", "del")), default=-1)
        possible = [op[2] for op in at[max(last_sure, 0):] if op[1] != "del"]
        if value not in possible:
            return (f"the log entry at slot {revision} writes another value "
                    f"({len(value)} bytes in the state)")
    for slot, kind, _new, expected in key_ops:
        if slot <= revision:
            continue
        if kind in ("put", "del"):
            return f"the log {'writes' if kind == 'put' else 'deletes'} it later, at slot {slot}"
        if kind == "cas" and expected == value:
            return f"a compare-and-set at slot {slot} would have replaced it"
    return None


class _Failed:
    """A request of a batch that failed alone (the others commit)."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


def _txn_size(parts: dict) -> int:
    """The bytes a transaction's command adds to a log entry, about."""
    return sum(entry_bytes(reads, ranges, writes) for reads, ranges, writes in parts.values())


#: Every open store of this process, so a child of fork() finds them closed.
_open_stores: "weakref.WeakSet[EmbeddedKV]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for store in list(_open_stores):
        store._closed = True  # every call now fails in _check_open, naming fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


class _BatchResults(list):
    """Per-request results of one batch, plus the ``(shard, slot, commands)`` entries
    it makes."""

    def __init__(self) -> None:
        super().__init__()
        self.entries: list[tuple[int, int, list]] = []


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
