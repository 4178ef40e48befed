"""What a cluster node keeps on disk, behind one small interface (``ReplicaStorage``),
and the replicated state machine every replica applies.

A node hands its storage, once per loop turn, everything every shard's
``Ready`` asks to persist (``ShardWrite``: the promise and commit point, log
records, an installed snapshot, compaction) together with the committed
entries to apply, and gets back the results of the commands it applied.
``save`` returns only when all of it is durable. ``load`` gives a shard's
``PersistedState`` back after a restart. The implementation is
``kvstore.node.storage.WalReplicaStorage``: one log append and one fdatasync per
save, LMDB checkpointed off the write path.

The replicated state machine is the embedded store's: each command is
applied by ``kvstore.machine.data.apply_command`` on the shard's data table,
at revision ``slot + 1`` (revision 0 means "absent"). Around it, a client
session table makes a retried write take effect once (``apply_client_command``),
and two-phase-commit entries go to ``kvstore.machine.twopc``. Everything here
works on an LMDB transaction or on anything that reads and writes like one
(the overlay's view of the tables, ``kvstore.node.storage``).

A chosen value this code cannot apply (a "poisoned" value: a batch that does not
decode, a command of a bad shape or size) is applied as a no-op, logged and
reported as ``POISONED``: every replica skips the same one at the same slot, so
their states stay equal, and a restart replays it the same way instead of failing
at every start. Peers' records are checked before they are accepted
(``kvstore.commands.decode_logged_command``, ``Node._on_paxos``), so only a log written before that
check can hold one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import msgpack

from kvstore.commands import (FENCE_OPS, LOCKED, POISONED, STALE, ClientCommand, DecodedCommands,
                              Txn, TwoPC)
from kvstore.errors import CorruptRecord
from kvstore.paxos.membership import check_membership
from kvstore.paxos.replica import KIND_BATCH, KIND_CONFIG, Membership, PersistedState, Snapshot
from kvstore.machine.fence import apply_fence, fenced_vote
from kvstore.machine.twopc import any_locked, apply_2pc
from kvstore.machine.data import apply_command, scan_rows
from kvstore.machine.leases import LeaseTable, apply_leased

#: Where a shard's ``HardState`` lives in its meta table (msgpack, a 4-item list).
META_PAXOS = b"paxos.hard"
#: Where a shard's membership lives in its meta table once a change was applied (msgpack
#: ``[epoch, start, voters, learners, info]``); absent: the bootstrap one (cluster.toml's).
#: Part of the replicated state: written by the entry that changes it, at its slot, with
#: the applied point (rule 4), and by an installed snapshot.
META_MEMBERSHIP = b"paxos.membership"


class HardState(NamedTuple):
    """This node's Paxos hard state of one shard, as its meta table keeps it (msgpack
    ``[promised, commit, applied, compacted]``, the fields' order)."""

    promised: int  # the promise ballot
    commit: int  # the commit point (-1: none)
    applied: int  # the applied point, moved with the state it describes (rule 4)
    #: log records at or below it are deleted (-1: none); a restart then hands the
    #: replica a snapshot of the state
    compacted: int


#: A shard that has never saved anything.
NO_HARD_STATE = HardState(0, -1, -1, -1)
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

log = logging.getLogger("kvstore.node")


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
    #: The node's commands decoded where they entered it, for apply (``apply_entries``).
    decoded: DecodedCommands | None = None
    #: A list to collect what the applied entries changed (``apply_entries``'s ``changes``:
    #: ``(revision, [(key, value, prev), ...])``), or None: nothing collected.
    changes: list | None = None
    #: Set by the storage: the leases this save's entries granted, refreshed or ended
    #: (``LeaseTable.events``), for the node's expiry clock (``kvstore.node.leases``).
    lease_events: list = field(default_factory=list)


class ReplicaStorage(Protocol):
    """Durable state of every shard replica of one node."""

    nshards: int

    def load(self, shard: int) -> PersistedState: ...

    def save(self, writes: list, applied=None) -> list:
        """Persist and apply ``writes`` durably in one step; ``[(shard, slot, key, result)]``
        for every client command applied (``key`` = ``(client_id, seq)``).

        ``applied(results)``, if given, is called with those results once they are
        computed, possibly before they are durable: the caller may act on the ones
        whose log entries were durable before this call (see ``kvstore.node.loop``)."""

    def get(self, shard: int, key: bytes) -> tuple | str:
        """``(value, revision)``, or ``LOCKED`` while a prepared transaction writes it."""

    def scan(self, shard: int, lo: bytes, hi: bytes | None, limit: int | None) -> list | str:
        """``[(key, value, revision)]``, or ``LOCKED`` as for ``get``."""

    def expired_prepares(self, shard: int, now_ms: int) -> list:
        """Prepared cross-shard transactions past their deadline (``kvstore.machine.twopc``)."""

    def leases(self, shard: int) -> list:
        """Every lease of the shard: ``[(lease_id, ttl_ms, refreshed_revision)]``."""

    def close(self) -> None: ...


def check_snapshot_data(data: bytes) -> bool:
    """Whether ``data`` is a shard's state as ``install_snapshot`` takes it (checked
    before an installed snapshot replaces anything: ``Config.snapshot_ok``)."""
    try:
        rows, txn_rows = msgpack.unpackb(data, raw=False, use_list=True)
    except Exception:  # msgpack's classes, or not a pair
        return False
    return (type(rows) is list and type(txn_rows) is list
            and all(type(r) is list and len(r) == 2 and type(r[0]) is bytes and type(r[1]) is bytes
                    for table in (rows, txn_rows) for r in table))


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


def apply_client_command(txn, tables, slot: int, logged: ClientCommand, sessions: SessionCache,
                         changes: list | None = None, leases: LeaseTable | None = None) -> tuple:
    """Apply one client command of the entry at ``slot``, at most once per ``(client, seq)``.

    The session of a client holds its floor (every seq below it was answered,
    so a late duplicate of one is ignored) and the results of its seqs at or
    above the floor (a retry of one gets the first result back, with no
    second effect). ``logged`` is typed (``kvstore.commands.decode_logged_command``).
    ``leases``: the shard's ``LeaseTable`` in ``txn`` (lease commands, and plain writes
    detaching their keys); None applies no lease command.
    Returns ``((client_id, seq), result)``; ``result`` is ``STALE`` for an ignored late
    duplicate. ``changes``: the keys it changed (``kvstore.machine.data.apply_writes``).
    """
    client_id, seq, floor, command = logged
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
    if type(command) is TwoPC:
        result = fenced_vote(txn, tables, command.entry)  # a backup's fence refuses it
        if result is None:
            if leases is not None and leases.attached:
                leases.before_2pc(command.entry)
            result = apply_2pc(txn, tables, slot + 1, command.entry, changes)
    elif command.op in FENCE_OPS:
        result = apply_fence(txn, tables, command)
    elif any_locked(txn, tables, command.keys()):
        # a prepared cross-shard transaction holds one of its keys: nothing applied
        result = False if type(command) is Txn else LOCKED
    elif leases is not None:
        result = apply_leased(txn, tables.data, slot + 1, command, leases, changes)
    else:
        result = apply_command(txn, tables.data, slot + 1, command, changes)
    session[1] = slot
    results[seq] = result
    sessions.dirty.add(client_id)
    return key, result


def pack_membership(m: Membership) -> bytes:
    """A membership as the meta table keeps it (``META_MEMBERSHIP``)."""
    return msgpack.packb([m.epoch, m.start, list(m.voters), list(m.learners), m.info],
                         use_bin_type=True)


def read_membership(txn, t) -> Membership | None:
    """The membership a shard's meta table holds (tables ``t``), or None (the bootstrap
    one); ``CorruptRecord`` if what it holds is not one."""
    raw = txn.get(META_MEMBERSHIP, db=t.meta)
    if raw is None:
        return None
    try:
        epoch, start, voters, learners, info = msgpack.unpackb(bytes(raw), raw=False)
        m = Membership(epoch, start, tuple(voters), tuple(learners), info)
        if type(epoch) is not int or type(start) is not int or epoch < 1 or start < 1 \
                or list(m.voters) != sorted(set(m.voters)) or type(info) is not bytes \
                or list(m.learners) != sorted(set(m.learners)):
            raise ValueError("fields out of range")
        check_membership(m)
    except (ValueError, TypeError) as e:
        raise CorruptRecord(f"the shard's membership on disk is not one: {e}") from None
    except Exception as e:  # msgpack's own classes
        raise CorruptRecord(f"the shard's membership on disk does not decode: "
                            f"{type(e).__name__}") from None
    return m


def install_snapshot(txn, t, snapshot: Snapshot) -> None:
    """Replace a shard's state (data, sessions, 2PC records: tables ``t``) with a snapshot's,
    its membership included (none: the bootstrap one)."""
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
    if snapshot.membership is not None and snapshot.membership.epoch > 0:
        txn.put(META_MEMBERSHIP, pack_membership(snapshot.membership), db=t.meta)
    else:
        txn.delete(META_MEMBERSHIP, db=t.meta)


def apply_entries(txn, tables, shard: int, entries, applied: int, results: list,
                  decoded: DecodedCommands | None = None, changes: list | None = None,
                  lease_events: list | None = None) -> int:
    """Apply a shard's committed ``entries`` above ``applied`` on ``txn`` (an LMDB write
    transaction, or a view of the overlay over one); append ``(shard, slot, key,
    result)`` to ``results`` for every client command; return the new applied point.
    ``decoded``: the node's commands decoded where they entered it (a command not there,
    as after a restart, is decoded and checked here). ``changes``: if a list,
    ``(revision, [(key, value or None, previous value or None), ...])`` is appended for
    every entry that changed a key (what the node's watch history takes).
    ``lease_events``: if a list, the leases granted, refreshed or ended are appended
    (``LeaseTable.events``)."""
    if decoded is None:
        decoded = DecodedCommands()
    sessions = SessionCache(txn, tables.txns)
    leases = LeaseTable(txn, tables.txns)
    for entry in entries:
        if entry.slot <= applied:
            continue  # already in the state (a snapshot covered it)
        entry_changes = None if changes is None else []
        if entry.error is not None:
            _poisoned(shard, entry.slot, entry.error, results)
        elif entry.kind == KIND_BATCH:
            for raw_cmd in entry.commands:
                try:
                    logged = decoded.take(raw_cmd)
                except ValueError as e:
                    _poisoned(shard, entry.slot, str(e), results)
                    continue
                key, result = apply_client_command(txn, tables, entry.slot, logged, sessions,
                                                   changes=entry_changes, leases=leases)
                results.append((shard, entry.slot, key, result))
        elif entry.kind == KIND_CONFIG and entry.membership is not None:
            txn.put(META_MEMBERSHIP, pack_membership(entry.membership), db=tables.meta)
        if entry_changes:
            changes.append((entry.slot + 1, entry_changes))
        if entry.slot % SESSION_SWEEP_EVERY == 0:
            sessions.flush()
            sessions = SessionCache(txn, tables.txns)
            expire_sessions(txn, tables.txns, entry.slot)
        applied = entry.slot
    sessions.flush()
    if lease_events is not None:
        lease_events.extend(leases.events)
    return applied


def lease_records(txn, tables) -> list:
    """Every lease of a shard: ``[(lease_id, ttl_ms, refreshed_revision)]`` (the node's
    expiry clock starts from these at start and after a snapshot is installed)."""
    return LeaseTable(txn, tables.txns).all_records()


_poisoned_count = 0


def _poisoned(shard: int, slot: int, why: str, results: list) -> None:
    """A chosen value (or one command of it) that cannot be applied: applied as a no-op,
    logged (1st, 2nd, 4th, 8th... time in this process) and reported to the node as a
    ``POISONED`` result, which it counts."""
    global _poisoned_count
    _poisoned_count += 1
    n = _poisoned_count
    if n & (n - 1) == 0:
        log.error("shard %d slot %d: a chosen value cannot be applied; applied as a no-op "
                  "(%d so far): %s", shard, slot, n, why[:200],
                  extra={"event": "poisoned_value", "shard": shard, "slot": slot, "count": n})
    results.append((shard, slot, None, POISONED))


def expire_sessions(txn, db, slot: int) -> int:
    """Forget sessions last used more than ``SESSION_TTL_SLOTS`` before ``slot``."""
    cutoff = slot - SESSION_TTL_SLOTS
    if cutoff <= 0:
        return 0
    expired = []
    for key, raw in scan_rows(txn, db, SESSION_PREFIX, SESSION_PREFIX[:-1] + b"\x01", None):
        _floor, last, _pairs = msgpack.unpackb(raw, raw=False, strict_map_key=False)
        if last < cutoff:
            expired.append(key)
    for key in expired:
        txn.delete(key, db=db)
    return len(expired)

