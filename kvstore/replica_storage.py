"""What a cluster node keeps on disk, behind one small interface (``ReplicaStorage``).

A node hands its storage, once per loop turn, everything every shard's
``Ready`` asks to persist (``ShardWrite``: the promise and commit point, log
records, an installed snapshot, compaction) together with the committed
entries to apply, and gets back the results of the commands it applied.
``save`` returns only when all of it is durable. ``load`` gives a shard's
``PersistedState`` back after a restart.

``LmdbReplicaStorage`` is the implementation on the existing storage engine
(``kvstore.storage``: one LMDB environment, per-shard log/meta/data/txn
tables). Everything of one ``save`` is ONE synced LMDB write transaction, so
for all shards together a loop turn costs one fsync:

- the log records (overwrite by slot) and the hard state (promise, commit
  point) are durable before any message announcing them leaves the node
  (safety rule 1: the node sends only after ``save`` returns);
- the applied state and the applied point move in that same transaction
  (safety rule 4).

Issue 12's write-ahead log slots in here: ``save`` becomes one log append
plus fdatasync for the records and the hard state, and the apply moves to
LMDB checkpoints off the write path; the node does not change.

The replicated state machine is the embedded store's: each command is
applied by ``kvstore.storage.state.apply_command`` on the shard's data table,
at revision ``slot + 1`` (revision 0 means "absent"). Around it, a client
session table makes a retried write take effect once (``apply_client_command``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import msgpack

from kvstore._native import key_slot, slot_key
from kvstore.codec import OP_2PC, OP_CAS, OP_DELETE, OP_PUT, OP_TXN
from kvstore.errors import CorruptRecord
from kvstore.paxos.replica import KIND_BATCH, PersistedState, Snapshot
from kvstore.storage import Storage
from kvstore.replica_txn import (LOCKED, any_locked, apply_2pc, expired_prepares, key_write_locked,
                                 range_write_locked)
from kvstore.storage.state import apply_command, read_value, scan_rows
from kvstore.txn import TxnPrepare
from kvstore.txn import decode as decode_2pc

#: This node's Paxos hard state in each shard's meta table:
#: msgpack [promised, commit, applied, compacted] (compacted: log records at or below it
#: are deleted, -1 if none; then a restart hands the replica a snapshot of the state).
META_PAXOS = b"paxos.hard"
_NO_HARD_STATE = (0, -1, -1, -1)
#: Client sessions live in the shard's txn table under this prefix (issue 14's
#: transaction records use other keys of that table).
SESSION_PREFIX = b"\x00session\x00"
#: Sessions not heard from for this many slots are forgotten (a retry older than
#: that could apply twice; clients retry within seconds, slots pass far slower
#: than this at any load we reach).
SESSION_TTL_SLOTS = 200_000
#: How often (in slots) expired sessions are swept; sweeps are deterministic by
#: slot so every replica forgets the same sessions at the same point.
SESSION_SWEEP_EVERY = 4096
#: Results kept per session at most (one per write the client has in flight).
SESSION_RESULTS_MAX = 4096

#: A command ``(client, seq)`` at or below its session's floor: already answered, ignored.
STALE = "stale"


@dataclass
class ShardWrite:
    """What one shard's Ready asks to persist, and what it committed."""

    shard: int
    promised: int | None = None
    commit_index: int | None = None
    records: list = field(default_factory=list)  # encoded records, slot ascending
    snapshot: Snapshot | None = None
    compacted_through: int | None = None
    committed: list = field(default_factory=list)  # paxos Entry list, slot order
    applied_index: int | None = None  # set by the storage after applying ``committed``


class ReplicaStorage(Protocol):
    """Durable state of every shard replica of one node."""

    nshards: int

    def load(self, shard: int) -> PersistedState: ...

    def save(self, writes: list, applied=None) -> list:
        """Persist and apply ``writes`` durably in one step; ``[(shard, slot, key, result)]``
        for every client command applied (``key`` = ``(client_id, seq)``).

        ``applied(results)``, if given, is called with those results once they are
        computed, possibly before they are durable: the caller may act on the ones
        whose log entries were durable before this call (see ``kvstore.node``)."""

    def get(self, shard: int, key: bytes) -> tuple | str:
        """``(value, revision)``, or ``LOCKED`` while a prepared transaction writes it."""

    def scan(self, shard: int, lo: bytes, hi: bytes | None, limit: int | None) -> list | str:
        """``[(key, value, revision)]``, or ``LOCKED`` as for ``get``."""

    def expired_prepares(self, shard: int, now_ms: int) -> list:
        """Prepared cross-shard transactions past their deadline (``kvstore.replica_txn``)."""

    def close(self) -> None: ...


def encode_client_command(client_id: bytes, seq: int, floor: int, command: list) -> bytes:
    """A client write as a log command: msgpack ``[client_id, seq, floor, command]``."""
    return msgpack.packb([client_id, seq, floor, command], use_bin_type=True)


def decode_client_command(raw: bytes) -> tuple:
    client_id, seq, floor, command = msgpack.unpackb(raw, raw=False, use_list=True)
    return client_id, seq, floor, command


def check_command(command) -> list:
    """A client's command as the state code takes it; ``ValueError`` if malformed.

    Checked on the node that proposes it, so every replica applies only
    commands ``apply_command`` accepts (an error at apply would differ nowhere,
    but would waste a slot).
    """
    if type(command) is not list or not command:
        raise ValueError("a command is a non-empty list")
    op = command[0]

    def is_bytes(v, optional=False):
        return type(v) is bytes or (optional and v is None)

    if op == OP_PUT and len(command) == 3 and is_bytes(command[1]) and is_bytes(command[2]):
        return command
    if op == OP_DELETE and len(command) == 2 and is_bytes(command[1]):
        return command
    if (op == OP_CAS and len(command) == 4 and is_bytes(command[1])
            and is_bytes(command[2], True) and is_bytes(command[3], True)):
        return command
    if op == OP_TXN and len(command) == 4:
        _, reads, ranges, writes = command
        ok = (type(reads) is list and all(type(r) is list and len(r) == 2 and is_bytes(r[0])
                                          and type(r[1]) is int and r[1] >= 0 for r in reads)
              and type(ranges) is list
              and all(type(g) is list and len(g) == 3 and is_bytes(g[0]) and is_bytes(g[1], True)
                      and type(g[2]) is list
                      and all(type(s) is list and len(s) == 2 and is_bytes(s[0])
                              and type(s[1]) is int and s[1] >= 0 for s in g[2])
                      for g in ranges)
              and type(writes) is list
              and all(type(w) is list and len(w) == 2 and is_bytes(w[0]) and is_bytes(w[1], True)
                      for w in writes))
        if ok:
            return command
    if op == OP_2PC and len(command) == 2 and is_bytes(command[1]):
        decode_2pc(command[1])  # ValueError if malformed
        return command
    raise ValueError("malformed command")


def command_keys(command: list) -> list:
    """The keys a (checked) command reads or writes; a 2PC decision or resolve has none."""
    op = command[0]
    if op == OP_TXN:
        _, reads, ranges, writes = command
        return [k for k, _ in reads] + [k for k, _ in writes] + [k for g in ranges for k, _ in g[2]]
    if op == OP_2PC:
        entry = decode_2pc(command[1])
        if isinstance(entry, TxnPrepare):
            return [k for k, _ in entry.reads] + [k for k, _ in entry.writes]
        return []
    return [command[1]]


class LmdbReplicaStorage:
    """``ReplicaStorage`` on one LMDB environment (``kvstore.storage.Storage``)."""

    def __init__(self, path: str, shards: int) -> None:
        self.storage = Storage(path, shards=shards)
        self.path = self.storage.path
        self.nshards = self.storage.nshards
        self.tables = self.storage.shards

    # -- loading -----------------------------------------------------------------------

    def load(self, shard: int) -> PersistedState:
        t = self.tables[shard]

        def read(txn):
            raw = txn.get(META_PAXOS, db=t.meta)
            promised, commit, applied, compacted = _NO_HARD_STATE if raw is None else msgpack.unpackb(raw)
            records = [bytes(v) for _k, v in txn.cursor(t.log)]
            return PersistedState(promised=promised, commit_index=commit, records=records,
                                  applied_index=applied), applied, compacted

        state, applied, compacted = self.storage.read(read)
        if compacted >= 0:
            # Log records below the applied point are gone: the state itself, at the
            # applied point, is the snapshot a lagging peer will need.
            state.snapshot_index = applied
            state.snapshot_data = self.snapshot_data(shard)
        return state

    # -- the one durable write -----------------------------------------------------------

    def save(self, writes: list, applied=None) -> list:
        return self.storage.write(lambda txn: self._save(txn, writes, applied))

    def _save(self, txn, writes: list, applied_hook=None) -> list:
        results: list = []
        for w in writes:
            t = self.tables[w.shard]
            raw = txn.get(META_PAXOS, db=t.meta)
            promised, commit, applied, compacted = _NO_HARD_STATE if raw is None else msgpack.unpackb(raw)
            if w.promised is not None:
                promised = w.promised
            if w.commit_index is not None:
                commit = max(commit, w.commit_index)
            if w.snapshot is not None:
                self._install_snapshot(txn, w.shard, w.snapshot)
                applied = w.snapshot.index
                commit = max(commit, w.snapshot.index)
                compacted = max(compacted, w.snapshot.index)
            for rec in w.records:
                txn.put(slot_key(int.from_bytes(rec[8:16], "little")), rec, db=t.log)
            if w.compacted_through is not None:
                self._delete_log_through(txn, t.log, w.compacted_through)
                compacted = max(compacted, w.compacted_through)
            sessions = SessionCache(txn, t.txns)
            for entry in w.committed:
                if entry.slot <= applied:
                    continue  # already in the state (a snapshot covered it)
                if entry.kind == KIND_BATCH:
                    for raw_cmd in entry.commands:
                        key, result = apply_client_command(txn, t, entry.slot, raw_cmd, sessions)
                        results.append((w.shard, entry.slot, key, result))
                if entry.slot % SESSION_SWEEP_EVERY == 0:
                    sessions.flush()
                    sessions = SessionCache(txn, t.txns)
                    expire_sessions(txn, t.txns, entry.slot)
                applied = entry.slot
            sessions.flush()
            w.applied_index = applied
            txn.put(META_PAXOS, msgpack.packb([promised, commit, applied, compacted]), db=t.meta)
        if applied_hook is not None and results:
            applied_hook(results)
        return results

    def _delete_log_through(self, txn, db, through: int) -> None:
        cursor = txn.cursor(db)
        try:
            if not cursor.first():
                return
            while True:
                key = cursor.key()  # b"" once the last record is deleted
                if not key or key_slot(key) > through or not cursor.delete():
                    break
        finally:
            cursor.close()

    def _install_snapshot(self, txn, shard: int, snapshot: Snapshot) -> None:
        """Replace the shard's state (data, sessions, 2PC records) with a snapshot's."""
        t = self.tables[shard]
        try:
            rows, txn_rows = msgpack.unpackb(snapshot.data, raw=False)
        except Exception as e:
            raise CorruptRecord(f"undecodable snapshot through slot {snapshot.index}: {e}") from e
        txn.drop(t.data, delete=False)
        for key, raw in rows:
            txn.put(key, raw, db=t.data)
        txn.drop(t.txns, delete=False)  # sessions and 2PC records: the snapshot's replace them
        for key, raw in txn_rows:
            txn.put(key, raw, db=t.txns)
        self._delete_log_through(txn, t.log, snapshot.index)

    def snapshot_data(self, shard: int) -> bytes:
        """The shard's whole state as a snapshot (what ``_install_snapshot`` reads)."""
        t = self.tables[shard]

        def read(txn):
            rows = [(bytes(k), bytes(v)) for k, v in txn.cursor(t.data)]
            txn_rows = [(bytes(k), bytes(v)) for k, v in txn.cursor(t.txns)]
            return msgpack.packb([rows, txn_rows], use_bin_type=True)

        return self.storage.read(read)

    # -- reads of the applied state ---------------------------------------------------------

    def get(self, shard: int, key: bytes) -> tuple | str:
        """``(value or None, revision)``: revision 0 for an absent key; ``LOCKED`` if a
        prepared cross-shard transaction is to write the key (ask again later)."""
        t = self.tables[shard]

        def read(txn):
            if key_write_locked(txn, t, key):
                return LOCKED
            return read_value(key, txn.get(key, db=t.data))

        return self.storage.read(read)

    def scan(self, shard: int, lo: bytes, hi: bytes | None, limit: int | None) -> list | str:
        """``[(key, value, revision)]`` with ``lo <= key < hi``, at most ``limit``;
        ``LOCKED`` if a prepared cross-shard transaction is to write in the range."""
        t = self.tables[shard]

        def read(txn):
            if range_write_locked(txn, t, lo, hi):
                return LOCKED
            return [(k, *read_value(k, raw)) for k, raw in scan_rows(txn, t.data, lo, hi, limit)]

        return self.storage.read(read)

    def expired_prepares(self, shard: int, now_ms: int) -> list:
        """The shard's prepared transactions past their deadline (``TxnPrepare`` list)."""
        return self.storage.read(lambda txn: expired_prepares(txn, self.tables[shard], now_ms))

    def close(self) -> None:
        self.storage.close()


class SessionCache:
    """The client sessions one save touches: each read once, written once at ``flush``."""

    def __init__(self, txn, db) -> None:
        self.txn = txn
        self.db = db
        self.sessions: dict = {}  # client_id -> [floor, last_slot, {seq: result}]
        self.dirty: set = set()

    def get(self, client_id: bytes) -> list:
        s = self.sessions.get(client_id)
        if s is None:
            raw = self.txn.get(SESSION_PREFIX + client_id, db=self.db)
            if raw is None:
                s = [0, 0, {}]
            else:
                floor, last, pairs = msgpack.unpackb(raw, raw=False, strict_map_key=False)
                s = [floor, last, dict(pairs)]
            self.sessions[client_id] = s
        return s

    def flush(self) -> None:
        for client_id in self.dirty:
            floor, last, results = self.sessions[client_id]
            kept = sorted(sq for sq in results if sq >= floor)[-SESSION_RESULTS_MAX:]
            if kept and len(kept) == SESSION_RESULTS_MAX:
                floor = max(floor, kept[0])
            self.sessions[client_id] = s = [floor, last, {sq: results[sq] for sq in kept}]
            self.txn.put(SESSION_PREFIX + client_id,
                         msgpack.packb([s[0], s[1], list(s[2].items())], use_bin_type=True),
                         db=self.db)
        self.dirty.clear()


def apply_client_command(txn, tables, slot: int, raw: bytes, sessions: SessionCache) -> tuple:
    """Apply one client command of the entry at ``slot``, at most once per ``(client, seq)``.

    The session of a client holds its floor (every seq below it was answered,
    so a late duplicate of one is ignored) and the results of its seqs at or
    above the floor (a retry of one gets the first result back, with no
    second effect). Returns ``((client_id, seq), result)``; ``result`` is
    ``STALE`` for an ignored late duplicate.
    """
    client_id, seq, floor, command = decode_client_command(raw)
    session = sessions.get(client_id)
    key = (client_id, seq)
    if seq < session[0]:
        return key, STALE
    if floor > session[0]:
        session[0] = floor  # results below it are dropped at flush
        sessions.dirty.add(client_id)
    results = session[2]
    if seq in results:
        return key, results[seq]
    if command[0] == OP_2PC:
        result = apply_2pc(txn, tables, slot + 1, command[1])
    elif any_locked(txn, tables, command_keys(command)):
        # a prepared cross-shard transaction holds one of its keys: nothing applied
        result = False if command[0] == OP_TXN else LOCKED
    else:
        result = apply_command(txn, tables.data, slot + 1, command)
    session[1] = slot
    results[seq] = result
    sessions.dirty.add(client_id)
    return key, result


def expire_sessions(txn, db, slot: int) -> int:
    """Forget sessions last used more than ``SESSION_TTL_SLOTS`` before ``slot``."""
    cutoff = slot - SESSION_TTL_SLOTS
    if cutoff <= 0:
        return 0
    dropped = 0
    cursor = txn.cursor(db)
    try:
        if not cursor.set_range(SESSION_PREFIX):
            return 0
        while cursor.key().startswith(SESSION_PREFIX):
            _floor, last, _pairs = msgpack.unpackb(cursor.value(), raw=False, strict_map_key=False)
            if last < cutoff:
                dropped += 1
                if not cursor.delete():
                    break
            elif not cursor.next():
                break
    finally:
        cursor.close()
    return dropped

