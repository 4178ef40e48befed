"""A node's ``ReplicaStorage`` on the write-ahead log: one fdatasync per loop turn, LMDB
checkpointed off the write path.

The same engine as the embedded store (``kvstore.storage``: the log in
``<dir>/wal/``, the overlay of what the log holds beyond the last checkpoint,
the checkpointer that moves it into LMDB in one synced write), and the same
directory layout. Each ``save`` (one loop turn, every shard):

1. **snapshot installs first** (rare): everything published is checkpointed,
   then one synced LMDB write replaces the shard's state and moves the
   checkpoint's log position to the log's end;
2. **apply**: each shard's committed entries go through the state code
   (``apply_entries``) on a view of the shard's tables (its pending writes,
   then the overlay's generations, then an LMDB read transaction); the
   results reach the node (``applied``: early answers) before the fsync, as
   before;
3. **one log append** for all shards: a ``PROMISE`` record per shard whose
   promise moved, an ``ENTRY`` record per Paxos record (its slot, ballot,
   kind and payload in the log record's fields, checksummed once by it:
   ``_entry_record``), a ``COMMIT_POINT`` per shard whose commit point moved:
   one ``pwrite`` and one ``fdatasync``.
   Nothing is sent or answered from it before this returns (safety rule 1).
   A save that only moves commit points and applies (a leader learning that
   its entries are chosen) appends nothing: a commit point needs no fsync
   (after a crash the replica learns it again from its peers, and what it
   applied is rebuilt from the log), so it waits for the next append;
4. **publish**: the pending writes join the overlay, now durable: the data
   and transaction tables' changes, the Paxos records in the log table
   (compaction as tombstones) and the hard state (``META_PAXOS``: promise,
   commit, applied, compaction) in the meta table, all of a shard in one
   generation, so a checkpoint writes the applied state and the applied point
   together (safety rule 4).

The checkpointer (``kvstore.storage.checkpoint``) writes a frozen generation of
all four tables of every shard in one synced LMDB transaction with the log
position it covers (``META_LOG_POSITION``), then deletes the log segments below
it. Recovery (``__init__``): LMDB's tables as of the last checkpoint, then the
log kept, read by the replay both engines share (``kvstore.storage.replay``:
promises, entries (a later one for a slot wins, a torn append's dropped) and
commit points), the Paxos records rebuilt from the entries.
What the replay adds is durable in the log only, so it is published into the
overlay as its first generation: the first checkpoint, which moves LMDB's log
position past it, holds it (issue 19: without that, the replicas alone held
it, and once its segment was deleted a restart found holes below the commit
point, or forgot a promise). The applied state is exactly LMDB's at its
applied point; the replica re-applies the chosen entries above it (its first
``Ready``), so nothing is applied twice or lost. Before any replica sees the
recovered state, ``check_recovered`` checks that it is self-consistent; a
state that is not is refused (``CorruptRecord``, one line naming the
directory), never handed to a replica that would vote with it.

A save either completes or changes nothing here: this storage's hard state
and pending commit points move only once its append returned, so after a
failed one (a full disk) ``close`` checkpoints only what was durable.

Reads (``get``, ``scan``, ``snapshot_data``, ``expired_prepares``) look at the
overlay's generations, then LMDB, in that order (``kvstore.storage.overlay``).
"""

from __future__ import annotations

import os

import msgpack

from kvstore._native import decode_record, encode_record, key_slot, record_fields, slot_key
from kvstore.errors import CorruptRecord, StorageError
from kvstore.paxos.ballot import format_ballot
from kvstore.paxos.replica import PersistedState
from kvstore.node.ports import NO_BUGS, NodeBugs
from kvstore.machine.replica import (META_PAXOS, NO_HARD_STATE, apply_entries, install_snapshot,
                                     lease_records, read_membership)
from kvstore.commands import LOCKED
from kvstore.machine.twopc import (expired_prepares, finished_outcomes, key_write_locked, one_round_seen,
                                  range_write_locked, txn_records)
from kvstore.storage import Storage
from kvstore.storage.checkpoint import Checkpointer
from kvstore.storage.environment import (META_APPLIED, META_LOG_POSITION, ShardTables, pack_u64,
                                         unpack_u64)
from kvstore.storage.overlay import Overlay, ShardView
from kvstore.machine.data import read_value, scan_rows
from kvstore.storage.replay import commit_point, replay
from kvstore.storage.wal import (KIND_COMMIT_POINT, KIND_ENTRY, KIND_PROMISE, WAL_DIR, Record,
                                 WriteAheadLog)

#: A checkpoint runs this often, or once the overlay holds CHECKPOINT_BYTES.
CHECKPOINT_SECONDS = 0.5
CHECKPOINT_BYTES = 32 * 1024 * 1024
#: Beyond this the node's loop waits for a checkpoint (bounded memory).
OVERLAY_LIMIT_BYTES = 512 * 1024 * 1024
WAL_SEGMENT_BYTES = 64 * 1024 * 1024
#: A shard's four tables, in the overlay: shard s, table t at ``overlay_index(s, t)``.
LOG, META, DATA, TXNS = range(4)
_TABLES = ("log", "meta", "data", "txns")


def overlay_index(shard: int, table: int) -> int:
    """Where ``table`` (``LOG``, ``META``... the index in ``_TABLES``) of ``shard`` sits
    in the overlay."""
    return len(_TABLES) * shard + table


class _View:
    """What the state code takes for an LMDB transaction (``get``/``put``/``delete``/
    ``cursor`` with ``db=``), over a shard's ``ShardView`` per table."""

    __slots__ = ("views",)

    def __init__(self, views: dict) -> None:
        self.views = views

    def get(self, key: bytes, default=None, db=None):
        return self.views[db].get(key, default)

    def put(self, key: bytes, value: bytes, db=None) -> bool:
        return self.views[db].put(key, value)

    def delete(self, key: bytes, db=None) -> bool:
        return self.views[db].delete(key)

    def cursor(self, db=None):
        return self.views[db].cursor()


class WalReplicaStorage:
    """``ReplicaStorage`` on the log, the overlay and LMDB checkpoints (module docstring)."""

    def __init__(self, path: str, shards: int, *, checkpoint_seconds: float = CHECKPOINT_SECONDS,
                 checkpoint_bytes: int = CHECKPOINT_BYTES,
                 overlay_limit_bytes: int = OVERLAY_LIMIT_BYTES,
                 segment_bytes: int = WAL_SEGMENT_BYTES, files=None,
                 checkpoint_thread: bool = True, bugs: NodeBugs = NO_BUGS) -> None:
        """``files``: the log's file system port (``kvstore.storage.wal.OsFiles`` unless
        given; the simulator gives its twin that loses what was not synced).
        ``checkpoint_thread=False``: no background checkpoints; whoever drives this
        storage calls ``checkpointer.checkpoint()`` (the simulator schedules it as a
        step; a save past the overlay's bound then checkpoints inline)."""
        self.bugs = bugs
        self._checkpoint_thread = checkpoint_thread
        self.storage = Storage(path, shards=shards)
        self.path = self.storage.path
        self.nshards = self.storage.nshards
        self.tables = self.storage.shards
        self.wal: WriteAheadLog | None = None
        self.checkpointer: Checkpointer | None = None
        try:
            hard, records, position = self.storage.read(self._read_checkpoint)
            self.wal = WriteAheadLog.open(os.path.join(self.path, WAL_DIR), files=files,
                                          segment_bytes=segment_bytes)
            self._check_log_covers(position)
            checkpointed = [dict(r) for r in records]
            self._replay(hard, records, position)
            check_recovered(self.path, hard, records)
            self._hard = hard  # per shard [promised, commit, applied, compacted]
            self._records = records  # per shard {slot: record}, handed to load() once
            self._commit_points: dict = {}  # shard -> commit point not in the log yet
            self.overlay = Overlay(4 * self.nshards,
                                   [max(h[2], 0) for h in hard for _ in _TABLES], position)
            # What the replay added is durable in the log only: it joins the overlay, so
            # that the first checkpoint, which moves LMDB's log position past it, holds it.
            self.overlay.publish(self._replayed(hard, records, checkpointed), (), self.wal.end)
            # the checkpointer writes overlay index i into table i % 4 of shard i // 4
            targets = [ShardTables(t.log, t.meta, getattr(t, name), t.txns)
                       for t in self.tables for name in _TABLES]
            self.checkpointer = Checkpointer(
                self.overlay, self.storage.write, targets, self._after_checkpoint,
                checkpoint_seconds, checkpoint_bytes, overlay_limit_bytes, self.path,
                yield_gil=checkpoint_thread)
            if checkpoint_thread:
                self.checkpointer.start()
        except BaseException:
            self.close()
            raise

    # -- recovery ----------------------------------------------------------------------------

    def _read_checkpoint(self, txn):
        hard, records, positions = [], [], []
        for shard, t in enumerate(self.tables):
            raw = txn.get(META_PAXOS, db=t.meta)
            if raw is None and txn.get(META_APPLIED, db=t.meta) is not None:
                raise _embedded_store(self.path)
            value = list(NO_HARD_STATE) if raw is None else msgpack.unpackb(raw)
            if type(value) is not list or len(value) != 4 or \
                    any(type(v) is not int for v in value):
                raise _inconsistent(self.path, shard,
                                    f"its hard state {value!r} is not four integers")
            hard.append(value)
            records.append({key_slot(bytes(k)): bytes(v) for k, v in txn.cursor(t.log)})
            positions.append(unpack_u64(txn.get(META_LOG_POSITION, db=t.meta)))
        return hard, records, min(positions)

    def _check_log_covers(self, position: int) -> None:
        """Refuse a log that lost records LMDB says it held (deleted, cut, restored from
        an older copy): promises and acceptances may be gone, and a replica that forgot
        them could break Paxos (an amnesiac acceptor). Refuse, do not guess."""
        wal = self.wal
        if wal.first_position <= position <= wal.end:
            return
        where = (f"ends at position {wal.end}" if wal.end < position
                 else f"starts at position {wal.first_position}")
        raise CorruptRecord(
            f"the write-ahead log in {wal.path} {where} but the last checkpoint covers it "
            f"up to {position}: records this node acknowledged are missing. Restore the "
            f"directory whole, or wipe it and let the node rejoin from its peers (it then "
            f"receives a snapshot)", offset=wal.end, path=wal.path)

    def _replay(self, hard: list, records: list, checkpoint_position: int) -> None:
        """Lay what the log adds over the checkpoint's hard state and records
        (``kvstore.storage.replay``: a later record for a slot wins, torn
        acceptances dropped), the Paxos records rebuilt from the log's entries.

        The whole log kept is replayed, not only what lies past the checkpoint's
        position: a record it holds is never older than LMDB's for its slot (LMDB
        has only what the log held before that position, and the log kept is
        its newest part), and a directory written before issue 19's fix may have
        checkpointed a position past records that never reached LMDB."""
        logs = replay(self._log_records(checkpoint_position), self.nshards,
                      [(h[0], h[1]) for h in hard], checkpoint_position)
        for shard_hard, shard_records, log in zip(hard, records, logs):
            shard_hard[0], shard_hard[1] = log.promised, log.commit
            for slot, e in log.entries.items():
                shard_records[slot] = encode_record(slot, e.ballot, e.kind, e.payload)

    def _log_records(self, checkpoint_position: int):
        """The log kept, as ``replay`` reads it (less the append the planted bug skips)."""
        records = self.wal.replay_groups(self.wal.first_position)
        if not self.bugs.replay_past_checkpoint:
            return records
        return _skip_first_append_past(records, checkpoint_position)

    def _replayed(self, hard: list, records: list, checkpointed: list) -> dict:
        """The overlay's first generation: per shard, the hard state and every record
        the replay added or changed (above the compaction point)."""
        generation = {}
        for s, (shard_hard, shard_records) in enumerate(zip(hard, records)):
            before = checkpointed[s]
            log_level = {slot_key(slot): rec for slot, rec in shard_records.items()
                         if slot > shard_hard[3] and before.get(slot) != rec}
            if log_level:
                generation[overlay_index(s, LOG)] = log_level
            generation[overlay_index(s, META)] = {META_PAXOS: msgpack.packb(shard_hard)}
        return generation

    def load(self, shard: int) -> PersistedState:
        promised, commit, applied, compacted = self._hard[shard]
        records = [rec for slot, rec in sorted(self._records[shard].items()) if slot > compacted]
        self._records[shard] = {}  # the replica holds them from now on
        state = PersistedState(promised=promised, commit_index=commit, records=records,
                               applied_index=applied, membership=self.membership(shard))
        if compacted >= 0:
            # Log records below the applied point are gone: the state itself, at the
            # applied point, is the snapshot a lagging peer will need.
            state.snapshot_index = applied
            state.snapshot_data = self.snapshot_data(shard)
        return state

    # -- the one durable write -----------------------------------------------------------------

    def _levels(self, shard: int) -> list:
        """The overlay's generations of each of ``shard``'s tables, captured now: before
        the LMDB read transaction they are read with begins (data only moves from the
        overlay into LMDB, and is in LMDB before it leaves the overlay, so a reader
        that looks at the generations first and LMDB second misses nothing)."""
        levels, first = self.overlay.levels, overlay_index(shard, LOG)
        return [levels(first), levels(first + 1), levels(first + 2), levels(first + 3)]

    def _view(self, txn, shard: int, levels: list, pending: list | None = None) -> _View:
        """``shard``'s tables in ``txn`` under ``levels`` (``_levels``), and first the
        ``pending`` writes of a save, where its writes go."""
        t = self.tables[shard]
        views = {}
        for i, name in enumerate(_TABLES):
            db = getattr(t, name)
            views[db] = ShardView(levels[i] if pending is None else [pending[i]] + levels[i],
                                  txn, db)
        return _View(views)

    def _read(self, shard: int, fn):
        """``fn(view, tables)`` on the overlay, then LMDB (``_levels``)."""
        levels = self._levels(shard)
        return self.storage.read(lambda txn: fn(self._view(txn, shard, levels),
                                                self.tables[shard]))

    def save(self, writes: list, applied=None) -> list:
        for w in writes:
            if w.snapshot is not None:
                self._install_snapshot(w.shard, w.snapshot)
        results: list = []
        records: list = []
        # Promises go last in the append: a torn tail keeps a prefix, so a promise on disk
        # implies the records and commit points before it are too. A node that lost its disk
        # persists its first promise only once it has recovered and holds the chosen values
        # (``kvstore.paxos.replica``, "Wiped nodes"): that promise must not outlive them.
        promises: list = []
        published: dict = {}
        slots: list = []
        # the hard states and commit points this save moves: this storage's own copies
        # change only once the save is durable (a failed append leaves them as on disk)
        hards: dict = {}
        commit_points = dict(self._commit_points)

        # the overlay's generations, before the transaction: only a write that reads
        # (applies entries, or compacts the log) needs them
        levels = {w.shard: self._levels(w.shard) for w in writes
                  if w.committed or w.compacted_through is not None}

        def apply(txn):
            for w in writes:
                s = w.shard
                hard = hards[s] = list(hards.get(s, self._hard[s]))
                pending = [{}, {}, {}, {}]
                if w.promised is not None and w.promised != hard[0]:
                    hard[0] = w.promised
                    promises.append(Record(KIND_PROMISE, s, ballot=w.promised))
                for rec in w.records:
                    record = _entry_record(s, rec)
                    records.append(record)
                    pending[LOG][slot_key(record.slot)] = rec
                if w.commit_index is not None and w.commit_index > hard[1]:
                    hard[1] = w.commit_index
                    commit_points[s] = w.commit_index
                if w.compacted_through is not None and w.compacted_through > hard[3]:
                    self._compact(txn, s, levels[s][LOG], w.compacted_through, pending[LOG])
                    hard[3] = w.compacted_through
                if w.committed:
                    view = self._view(txn, s, levels[s], pending)
                    hard[2] = apply_entries(view, self.tables[s], s, w.committed, hard[2], results,
                                             w.decoded, w.changes, w.lease_events)
                w.applied_index = hard[2]
                pending[META][META_PAXOS] = msgpack.packb(hard)
                first = overlay_index(s, LOG)  # the shard's four tables follow in _TABLES' order
                for i, level in enumerate(pending):
                    if level:
                        published[first + i] = level
                # the overlay's applied slots end up as META_APPLIED (the embedded store's
                # name; the node's own point is in META_PAXOS): never negative there
                applied_slot = max(hard[2], 0)
                slots.extend(((first, applied_slot), (first + 1, applied_slot),
                              (first + 2, applied_slot), (first + 3, applied_slot)))

        if self._checkpoint_thread:
            self.checkpointer.wait_for_room()
        elif self.overlay.active_bytes + self.overlay.frozen_bytes >= self.checkpointer.limit_bytes:
            self.checkpointer.checkpoint()  # no checkpoint thread: inline (the simulator)
        if any(w.committed or w.compacted_through is not None for w in writes):
            self.storage.read(apply)
        else:
            apply(None)  # records and hard state only (a leader's proposal): no LMDB read
        if applied is not None and results:
            applied(results)
        if records or promises:
            # the commit points ride with the next append that has to be synced anyway
            records += [commit_point([(s, c)]) for s, c in commit_points.items()]
            records += promises  # last: a promise on disk implies what came before it
            commit_points.clear()
            if self.bugs.commit_point_before_records:  # planted: the commit points first
                ahead = [r for r in records if r.kind == KIND_COMMIT_POINT]
                if ahead and len(ahead) < len(records):
                    self.wal.append(ahead)
                    records = [r for r in records if r.kind != KIND_COMMIT_POINT]
            sync = not (self.bugs.skip_promise_fsync
                        and any(r.kind == KIND_PROMISE for r in records))
            position = self.wal.append(records, sync=sync)
        else:
            position = self.wal.end
        for s, hard in hards.items():
            self._hard[s] = hard
        self._commit_points = commit_points
        self.overlay.publish(published, slots, position)
        return results

    def _compact(self, txn, shard: int, levels: list, through: int, log_level: dict) -> None:
        """Tombstones for the shard's log records at or below ``through``."""
        t = self.tables[shard]
        keys = {k for level in levels for k in level if key_slot(k) <= through}
        keys.update(k for k, _raw in scan_rows(txn, t.log, b"", slot_key(through + 1), None))
        for key in keys:
            log_level[key] = None

    def _install_snapshot(self, shard: int, snapshot) -> None:
        """Replace ``shard``'s state with a snapshot's, durably, before this save's append.

        Everything published is checkpointed first, so that the log from its
        end on is all a restart needs; then one synced LMDB write holds the
        snapshot's state, the hard state at its index, and that log position."""
        cp = self.checkpointer
        cp.checkpoint()
        hard = list(self._hard[shard])  # this storage's copy changes once the write is durable
        hard[1] = max(hard[1], snapshot.index)
        hard[2] = snapshot.index
        hard[3] = max(hard[3], snapshot.index)
        t = self.tables[shard]
        position = self.wal.end

        def install(txn):
            install_snapshot(txn, t, snapshot)
            for key, _raw in scan_rows(txn, t.log, b"", slot_key(snapshot.index + 1), None):
                txn.delete(key, db=t.log)
            txn.put(META_PAXOS, msgpack.packb(hard), db=t.meta)
            for other in self.tables:
                txn.put(META_LOG_POSITION, pack_u64(position), db=other.meta)

        with cp.holding():
            self.storage.write(install)
        self._hard[shard] = hard

    def _after_checkpoint(self, position: int) -> None:
        self.wal.truncate_before(position)

    # -- reads of the applied state -----------------------------------------------------------

    def snapshot_data(self, shard: int) -> bytes:
        """The shard's whole state as a snapshot (what ``install_snapshot`` reads)."""
        def read(view, t):
            rows = [(k, bytes(v)) for k, v in scan_rows(view, t.data, b"", None, None)]
            txn_rows = [(k, bytes(v)) for k, v in scan_rows(view, t.txns, b"", None, None)]
            return msgpack.packb([rows, txn_rows], use_bin_type=True)

        return self._read(shard, read)

    def membership(self, shard: int):
        """The shard's membership at its applied point (None: the bootstrap one), as its
        replicated state holds it (``kvstore.machine.replica.META_MEMBERSHIP``)."""
        try:
            return self._read(shard, read_membership)
        except CorruptRecord as e:
            raise CorruptRecord(f"shard {shard} in {self.path}: {e}", path=self.path) from None

    def get(self, shard: int, key: bytes) -> tuple | str:
        """``(value or None, revision)``; ``LOCKED`` while a prepared transaction writes it."""
        def read(view, t):
            if key_write_locked(view, t, key):
                return LOCKED
            return read_value(key, view.get(key, db=t.data))

        return self._read(shard, read)

    def scan(self, shard: int, lo: bytes, hi: bytes | None, limit: int | None) -> list | str:
        """``[(key, value, revision)]``; ``LOCKED`` if a prepared transaction writes in range."""
        def read(view, t):
            if range_write_locked(view, t, lo, hi):
                return LOCKED
            return [(k, *read_value(k, raw)) for k, raw in scan_rows(view, t.data, lo, hi, limit)]

        return self._read(shard, read)

    def expired_prepares(self, shard: int, now_ms: int) -> list:
        return self._read(shard, lambda view, t: expired_prepares(view, t, now_ms))

    def txn_records(self, shard: int) -> dict:
        """The 2PC records ``shard`` keeps: ``{"finished", "decided", "prepared": count}``."""
        return self._read(shard, txn_records)

    def finished_outcomes(self, shard: int, limit: int) -> list:
        """``[(txn_id, outcome, participants or None)]`` that ``shard`` keeps (the resolver's sweep)."""
        return self._read(shard, lambda view, t: finished_outcomes(view, t, limit))

    def one_round_seen(self, shard: int) -> bool:
        """Whether ``shard`` applied a one-round prepare (then it takes ``TxnForget``)."""
        return self._read(shard, one_round_seen)

    def leases(self, shard: int) -> list:
        """Every lease of ``shard``: ``[(lease_id, ttl_ms, refreshed_revision)]``."""
        return self._read(shard, lease_records)

    def close(self) -> None:
        """Checkpoint what the log holds (a clean stop restarts without a replay), and close."""
        cp, self.checkpointer = self.checkpointer, None
        try:
            if cp is not None:
                cp.stop()
                try:
                    cp.checkpoint()
                except Exception:  # the log has it all: the next start replays it
                    pass
        finally:
            wal, self.wal = self.wal, None
            if wal is not None:
                wal.close()
            self.storage.close()


def _entry_record(shard: int, rec: bytes) -> Record:
    """The log record of a Paxos record the replica made: its header's slot, ballot and
    kind in the log record's, its payload as the entry's (checksummed once, by the
    log record; ``_replay`` rebuilds the Paxos record). The replica's own record is
    trusted (this process made it): its header is read, its CRC not checked again."""
    slot, ballot, kind, payload = record_fields(rec)
    return Record(KIND_ENTRY, shard, slot, ballot, payload, kind)


def _skip_first_append_past(records, position: int):
    """``records`` without the first append at or past ``position`` (a planted bug:
    ``NodeBugs.replay_past_checkpoint``)."""
    skipped = None
    for item in records:
        if item[0] >= position and skipped in (None, item[1]):
            skipped = item[1]
            continue
        yield item


def check_recovered(path: str, hard: list, records: list) -> None:
    """Refuse a recovered state that is not self-consistent, in one line naming ``path``.

    Run at every recovery, before any replica sees the state. Per shard, with
    ``[promised, commit, applied, compacted]`` and the records above the
    compaction point: ``-1 <= compacted <= applied <= commit``; every record
    validates, sits at its own slot, and above the commit point was accepted at
    a ballot the promise covers (the replay dropped torn acceptances; a promise of 0, a
    node recovering from a lost disk, covers what it learned); and every slot above
    the compaction point up to the commit point is held (the replica applies them, and serves them to its peers). A state
    that fails this was damaged on disk, or by a bug: the node must not vote
    with it."""
    for shard, (shard_hard, shard_records) in enumerate(zip(hard, records)):
        problem = _inconsistency(shard_hard, shard_records)
        if problem is not None:
            raise _inconsistent(path, shard, problem)


def _embedded_store(path: str) -> StorageError:
    """A node started on an embedded store's directory: its checkpoints wrote an applied
    point (``META_APPLIED``) but never a Paxos hard state, which a node's always write
    together. Its log holds bare commands, not a node's: refused, never read as one."""
    return StorageError(
        f"{path} is an embedded store's directory (kvstore.open), not a node's: make a "
        f"node's directory from it with kvstore-server --init-from {path} --config FILE "
        f"--id NAME --data NEW_DIR (docs/operations.md, \"From one process to a cluster\")",
        path)


def _inconsistent(path: str, shard: int, problem: str) -> CorruptRecord:
    return CorruptRecord(
        f"the persisted state of shard {shard} in {path} is inconsistent: {problem}. Wipe "
        f"the directory and let the node rejoin from its peers (it then receives a "
        f"snapshot)", path=path)


def _inconsistency(hard: list, records: dict) -> str | None:
    """What is wrong with one shard's recovered state (``check_recovered``), or None."""
    promised, commit, applied, compacted = hard
    points = (f"(promised {format_ballot(promised)}, commit {commit}, applied {applied}, "
              f"compacted {compacted})")
    if promised < 0 or not -1 <= compacted <= applied <= commit:
        return f"its points are out of order {points}"
    for slot in sorted(records):
        if slot <= compacted:
            continue
        try:
            record_slot, ballot, _kind, _payload = decode_record(records[slot])
        except CorruptRecord as e:
            return f"the log record at slot {slot} does not validate ({e})"
        if record_slot != slot:
            return f"the log record kept at slot {slot} is slot {record_slot}'s"
        if ballot > promised and slot > commit and promised > 0:
            # (A promise of 0 is a node recovering from a lost disk: it holds no vote, and
            # what it holds above its commit point are chosen values it learned with holes
            # below them, which its replica drops at start: paxos/replica.py, "Wiped nodes".)
            return (f"slot {slot} was accepted at ballot {format_ballot(ballot)}, above the "
                    f"promise {points}")
    missing = [slot for slot in range(compacted + 1, commit + 1) if slot not in records]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        return (f"{_slot_ranges(missing)}, at or below the commit point, {verb} not in the "
                f"log {points}")
    return None


def _slot_ranges(slots: list, shown: int = 4) -> str:
    """``slots 3 and 7-9`` for sorted ``slots``: the first ``shown`` runs, then a count."""
    runs: list = []
    for slot in slots:
        if runs and runs[-1][1] == slot - 1:
            runs[-1][1] = slot
        else:
            runs.append([slot, slot])
    text = [str(a) if a == b else f"{a}-{b}" for a, b in runs[:shown]]
    if len(runs) > shown:
        text.append(f"{len(runs) - shown} more ranges")
    word = "slot" if len(slots) == 1 else "slots"
    return f"{word} {', '.join(text[:-1]) + ' and ' if len(text) > 1 else ''}{text[-1]}"


__all__ = ["WalReplicaStorage", "check_recovered", "WAL_DIR"]
