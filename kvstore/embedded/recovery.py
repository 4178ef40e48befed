"""Opening an embedded store: LMDB at its last checkpoint, then the log after it.

An entry of the embedded store is a log entry like a cluster node's
(``kvstore.storage.replay``): kind ``KIND_BATCH``, ballot 0 (a single replica
never needs a higher ballot than its first), its payload a batch
(``kvstore.paxos.batch``) whose commands are each msgpack of a bare command
(``kvstore.commands``); a node's batch holds client-session commands. The
batch is one; the command differs.

Each append holds, after its entries, one commit point naming every
``(shard, slot)`` of the group (``commit_point``), so a torn last append
(a multi-shard transaction's entries included) is applied wholly or not at
all: ``replay`` drops an entry above its shard's commit point (the store
makes no promise), and ``recover`` applies each shard's entries from its
checkpointed applied point up to its commit point, in slot order, each
exactly once.
"""

from __future__ import annotations

import msgpack

from kvstore import _native
from kvstore.errors import CorruptRecord
from kvstore.machine.leases import LeaseTable, apply_leased
from kvstore.paxos.batch import decode_batch, encode_batch
from kvstore.paxos.replica import KIND_BATCH
from kvstore.storage.environment import META_APPLIED, META_LOG_CLOSED, META_LOG_POSITION
from kvstore.storage.overlay import ShardView
from kvstore.storage.replay import LogEntry, ShardLog, entry_record, replay
from kvstore.storage.wal import Record

#: The ballot of every embedded entry.
BALLOT = 0
#: Entries applied per LMDB read transaction while replaying.
_REPLAY_CHUNK = 256


def entry(shard: int, slot: int, commands: list, pack=None) -> Record:
    """The log record of an entry of ``commands`` (bare commands, ``kvstore.commands``).

    ``pack``: a ``command_packer()``'s, reused by the one thread that commits a group
    (making a ``msgpack.Packer`` costs more than packing a few commands with it)."""
    pack = pack or command_packer()
    payload = encode_batch([pack(c) for c in commands])
    return entry_record(shard, LogEntry(slot, BALLOT, KIND_BATCH, payload))


def command_packer():
    """What ``entry`` packs each command with: msgpack, bytes as bin (never pickle)."""
    return msgpack.Packer(use_bin_type=True).pack


def entry_commands(e: LogEntry) -> list:
    """The commands of an embedded entry; ``CorruptRecord`` if it holds anything else."""
    if e.kind != KIND_BATCH:
        raise CorruptRecord(f"the log entry at slot {e.slot} is of kind {e.kind}, not a batch",
                            slot=e.slot)
    try:
        commands = [msgpack.unpackb(c, raw=False, use_list=True) for c in decode_batch(e.payload)]
    except Exception as err:  # msgpack raises several unrelated classes
        raise CorruptRecord(f"undecodable command batch in slot {e.slot}: {err}"[:300],
                            slot=e.slot) from None
    if not all(type(c) is list and c for c in commands):
        raise CorruptRecord(f"a command of slot {e.slot} is not a command", slot=e.slot)
    return commands


def chosen_logs(records, shards: int, applied: list[int] | None = None) -> list[ShardLog]:
    """Per shard, the chosen entries of ``records`` (``WriteAheadLog.replay_groups``) above
    ``applied`` (default: all), with its commit point; ``replay`` drops the others."""
    base = None if applied is None else [(-1, a) for a in applied]
    return replay(records, shards, base)


def checkpointed_point(store, txn) -> tuple[list[int], int, int]:
    """``(applied slot per shard, log position, closed at)`` of LMDB's last
    checkpoint; ``closed at`` is its position if a clean close made it, else 0.

    A directory written before the log existed has no log position: 0.
    """
    n = store._nshards
    applied = [applied_point(store, txn, s) for s in range(n)]
    meta = store._storage.meta_int
    position = min(meta(txn, s, META_LOG_POSITION) for s in range(n))
    closed_at = min(meta(txn, s, META_LOG_CLOSED) for s in range(n))
    return applied, position, closed_at


def applied_point(store, txn, shard: int) -> int:
    """The shard's applied point in LMDB: what its checkpoints recorded in meta, or,
    in a directory written before the log existed (whose commits each appended to
    the ``log`` table and recorded meta only at compactions), the last slot there.
    """
    recorded = store._storage.meta_int(txn, shard, META_APPLIED)
    cursor = txn.cursor(store._tables[shard].log)
    try:
        last = 0
        if cursor.last():
            key, raw = cursor.key(), cursor.value()
            if len(key) != 8 or len(raw) < _native.RECORD_HEADER_SIZE:
                raise CorruptRecord(f"the last log record of shard {shard} is malformed "
                                    f"({len(key)}-byte key, {len(raw)} bytes)")
            last = _native.key_slot(key)
            said = _native.record_fields(raw)[0]  # the header's slot
            if said != last:
                raise CorruptRecord(f"the last log record of shard {shard} is stored "
                                    f"under slot {last} but says slot {said}", slot=last)
    finally:
        cursor.close()
    return max(recorded, last)


def recover(store, position: int, closed_at: int) -> None:
    """Replay the log after LMDB's checkpoint into the store's overlay (nothing twice)."""
    wal, overlay = store._wal, store._overlay
    if wal.end < position and closed_at == position:
        wal.restart_at(position)  # a clean close checkpointed all of it: nothing lost
    if wal.end < position:
        raise CorruptRecord(
            f"corrupt log record in {wal.path}: the log ends at position {wal.end} but "
            f"the state in {store.path} was checkpointed up to position {position}, so "
            f"records it held are missing or were cut as corrupt; restore it from a "
            f"replica or a backup", offset=wal.end, path=store.path)
    applied = list(overlay.applied)
    logs = chosen_logs(wal.replay_groups(position), store._nshards, applied)
    for shard, log in enumerate(logs):
        slots = sorted(s for s in log.entries if applied[shard] < s <= log.commit)
        if log.commit > applied[shard] and (not slots or slots[-1] != log.commit or
                                            slots[0] != applied[shard] + 1 or
                                            len(slots) != slots[-1] - slots[0] + 1):
            missing = next(s for s in range(applied[shard] + 1, log.commit + 1)
                           if s not in log.entries)
            raise CorruptRecord(
                f"the log of {store.path} lacks slot {missing} of shard {shard}, at or below "
                f"its commit point {log.commit}: entries are missing; restore it from a "
                f"replica or a backup", slot=missing, path=store.path)
        for i in range(0, len(slots), _REPLAY_CHUNK):
            _apply(store, shard, [log.entries[s] for s in slots[i:i + _REPLAY_CHUNK]])
            if overlay.active_bytes >= overlay.wake_bytes:
                store._checkpointer.checkpoint()  # bounded memory while replaying
    # The overlay stood for the checkpoint's position while replaying (a checkpoint
    # meanwhile covers no more of the log than that); it now holds all of it.
    overlay.publish({}, (), wal.end)


def _apply(store, shard: int, entries: list[LogEntry]) -> None:
    """Apply one shard's recovered entries (consecutive slots) to the overlay."""
    overlay = store._overlay
    pending: dict = {}
    pending_txns: dict = {}  # the shard's txns table (its leases) sits at nshards + shard
    txns_index = store._nshards + shard
    db = store._data[shard]
    txns_db = store._tables[shard].txns

    def apply(txn):
        view = ShardView([pending, *overlay.levels(shard)], txn, db)
        leases = LeaseTable(ShardView([pending_txns, *overlay.levels(txns_index)], txn, txns_db),
                            txns_db)
        for e in entries:
            for command in entry_commands(e):
                apply_leased(view, db, e.slot, command, leases)

    store._storage.read(apply, "replaying the log", False)
    slot = entries[-1].slot
    overlay.publish({shard: pending, txns_index: pending_txns},
                    [(shard, slot), (txns_index, slot)], overlay.position)


__all__ = ["entry", "command_packer", "entry_commands", "chosen_logs", "checkpointed_point", "applied_point",
           "recover", "BALLOT"]
