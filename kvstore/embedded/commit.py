"""The embedded store's write path: one group commit's batch applied, appended, published.

``GroupCommitter`` hands the batch of requests the writers queued to one
thread at a time (``commit_batch``): each request is applied onto a view of the
overlay and LMDB (its result computed), the group's entries (one per shard,
``kvstore.embedded.recovery.entry``) and their commit point are appended to the
log in one ``pwrite`` and one ``fdatasync``, and only then are the writes
published into the overlay, what they changed handed to the watch histories
(``kvstore.embedded.watch.WatchHub``: durable changes only) and the results
handed back.

A shard's txns table (its leases: ``kvstore.machine.leases``) sits in the overlay at
index ``nshards + shard`` (its data table at ``shard``), so lease state is written,
published and checkpointed with the data it describes. A shard that never had a
lease (``store._lease_shards``) applies plain commands without a look at it.
"""

from __future__ import annotations

from typing import Sequence

from kvstore.commands import OP_LEASE_GRANT, OP_PUT, OP_TXN_WRITES
from kvstore.embedded.groupcommit import Request
from kvstore.embedded.recovery import entry
from kvstore.errors import CorruptRecord, KVError, StorageError
from kvstore.machine.data import apply_command, previous_value, reads_still_valid, stored
from kvstore.machine.leases import LeaseTable, apply_leased
from kvstore.storage.environment import THIRD_PARTY_ERRORS, translate
from kvstore.storage.overlay import MISSING, LazyRead, ShardView
from kvstore.storage.replay import commit_point


_pack_value = stored


def commit_batch(store, batch: Sequence[Request]) -> None:
    """Apply a batch onto the overlay's view, append its entries (one ``fdatasync``),
    then publish its writes: nothing is visible, nor answered, before it is durable.

    Only the group-commit leader runs this, one at a time, so the state the
    batch was computed on cannot change before its writes are published.
    If the append fails, nothing of the batch is published and every
    request of it gets the error.
    """
    storage = store._storage
    if storage.env is None:
        raise KVError(f"the store at {store.path} is closed")
    overlay = store._overlay
    checkpointer = store._checkpointer
    if overlay.active_bytes + overlay.frozen_bytes >= checkpointer.limit_bytes:
        checkpointer.wait_for_room()
    # No lock: only this thread publishes into ``active``; a freeze in between
    # makes ``frozen`` the ``active`` read here (or a later one), a drop leaves its
    # writes in LMDB, and the read transaction below is begun after both reads.
    active = overlay.active
    frozen = overlay.frozen

    def begin():
        # Begun after the generations were taken: whatever a checkpoint moved from
        # them into LMDB meanwhile, this snapshot holds it with the same values. Not
        # waiting for a checkpoint's commit to be durable: it holds only writes the
        # log made durable already.
        with overlay.lock:
            return storage.begin_read(durable=False)

    txn = LazyRead(begin)
    try:
        puts = _apply_puts(store, batch, active, frozen, txn)
        if puts is not None:
            pending, entries, changes = puts
            _append_and_publish(store, pending, entries, changes, {})
            return  # a put's result is None, as a Request's is
        pending: dict[int, dict] = {}
        leases: dict[int, LeaseTable] = {}
        view, lease_table = _views(store, pending, active, frozen, txn, leases)
        results = _apply_batch(store, view, batch, lease_table)
    except THIRD_PARTY_ERRORS as e:
        raise translate(e, store.path, "applying a write") from e
    finally:
        if txn.txn is not None:
            storage.end_read(txn.txn)
    _append_and_publish(store, pending, results.entries, results.changes, leases)
    for request, result in zip(batch, results):
        if type(result) is _Failed:
            request.error = result.error
        else:
            request.result = result


def _views(store, pending: dict, active: list, frozen: list | None, txn, leases: dict):
    """``view(shard, table)`` and ``lease_table(shard)``: the batch's view of a shard's
    data table (``table`` 0) or txns table (1), and of its leases, made on first use."""
    views: dict[int, ShardView] = {}

    def view(shard: int, table: int = 0) -> ShardView:
        index = shard + table * store._nshards
        v = views.get(index)
        if v is None:
            levels = [pending.setdefault(index, {}), active[index]]
            if frozen is not None:
                levels.append(frozen[index])
            db = store._data[shard] if table == 0 else store._tables[shard].txns
            v = views[index] = ShardView(levels, txn, db)
        return v

    def lease_table(shard: int) -> LeaseTable:
        t = leases.get(shard)
        if t is None:
            t = leases[shard] = LeaseTable(view(shard, 1), store._tables[shard].txns)
        return t

    return view, lease_table


def _apply_puts(store, batch: Sequence[Request], active: list, frozen: list | None, txn):
    """The most common batch, every request a plain put to a shard that never had a
    lease, applied with no view objects: ``(pending, entries, changes)`` as
    ``_apply_batch`` makes them. None, having done nothing, for any other batch.

    A put is ``apply_command``'s: the value stored at the entry's slot, and the
    change (with the value it replaces, for watchers) noted.
    """
    lease_shards = store._lease_shards
    for request in batch:
        payload = request.payload
        if type(payload) is not tuple or payload[1][0] != OP_PUT or lease_shards[payload[0]]:
            return None
    applied = store._overlay.applied
    data = store._data
    pending: dict[int, dict] = {}
    commands_of: dict[int, list] = {}
    changes: dict[int, list] = {}
    for request in batch:
        shard, command = request.payload
        level = pending.get(shard)
        if level is None:
            level = pending[shard] = {}
            commands_of[shard] = []
            changes[shard] = []
        key, value = command[1], command[2]
        raw = level.get(key, MISSING)  # the view's levels, newest first, then LMDB
        if raw is MISSING:
            raw = active[shard].get(key, MISSING)
            if raw is MISSING:
                raw = MISSING if frozen is None else frozen[shard].get(key, MISSING)
                if raw is MISSING:
                    raw = txn.get(key, None, data[shard])
        level[key] = _pack_value(key, applied[shard] + 1, value)
        changes[shard].append((key, value, previous_value(key, raw)))
        commands_of[shard].append(command)
    entries = [(shard, applied[shard] + 1, commands)
               for shard, commands in sorted(commands_of.items())]
    return pending, entries, changes


def _append_and_publish(store, pending: dict, entries: list, changes: dict,
                        leases: dict) -> None:
    """Append the batch's ``entries`` (and their commit point) in one durable append,
    then publish its ``pending`` writes, its ``changes`` and its lease events."""
    if not entries:  # barriers only (close waits behind in-flight commits)
        return
    pack = store._pack_command
    records = [entry(shard, slot, commands, pack) for shard, slot, commands in entries]
    if len(entries) == 1:
        shard, slot, _commands = entries[0]
        slots = [(shard, slot)]
        records.append(commit_point(slots))
        slots.append((shard + store._nshards, slot))
    else:
        slots = [(shard, slot) for shard, slot, _ in entries]
        records.append(commit_point(slots))
        # the txns tables' overlay slots move with their shards' (the checkpoint's meta)
        slots += [(shard + store._nshards, slot) for shard, slot in slots]
    checkpoint = store._checkpoint_record  # set by the checkpoint thread
    if checkpoint is not None:
        records.append(checkpoint)
    try:
        end = store._wal.append(records)
    except StorageError as e:  # nothing of the batch is published
        raise _log_error(store, e) from e
    if store._checkpoint_record is checkpoint:
        store._checkpoint_record = None
    store._overlay.publish(pending, slots, end)
    hub = store._watch
    if hub is not None:
        hub.publish([(shard, slot, changes.get(shard, ()))
                      for shard, slot, _commands in entries])
    for shard, table in leases.items():
        store._reaper.note(shard, table.events)


def _log_error(store, e: StorageError) -> StorageError:
    """A failed append as the store's error: it names the data directory."""
    if e.path == store.path or isinstance(e, CorruptRecord):
        return e
    hint = ("" if "disk full" in str(e) else
            "; the log refuses writes until the store is closed and opened again")
    return StorageError(f"{e}{hint}", store.path)


def _apply_batch(store, view, batch: Sequence[Request], lease_table) -> "_BatchResults":
    applied = store._overlay.applied
    data = store._data
    lease_shards = store._lease_shards
    entries: dict[int, list] = {}
    results = _BatchResults()
    changes = results.changes
    for request in batch:
        payload = request.payload
        if payload is None:  # a barrier (close waits behind in-flight commits)
            results.append(None)
        elif type(payload) is tuple:
            shard, command = payload
            shard_changes = changes.get(shard)
            if shard_changes is None:
                shard_changes = changes[shard] = []
            try:
                if command[0] >= OP_LEASE_GRANT or lease_shards[shard]:
                    lease_shards[shard] = True  # from now on, plain writes detach keys
                    result = apply_leased(view(shard), data[shard], applied[shard] + 1,
                                          command, lease_table(shard), shard_changes)
                else:
                    result = apply_command(view(shard), data[shard], applied[shard] + 1,
                                           command, shard_changes)
            except CorruptRecord as e:  # a corrupt value read by this command: it alone
                results.append(_Failed(translate(e, store.path, "applying a write")))
                continue
            commands = entries.get(shard)
            if commands is None:
                commands = entries[shard] = []
            commands.append(command)
            results.append(result)
        else:
            try:
                results.append(_apply_multi_shard(store, view, payload, entries, changes,
                                                  lease_table))
            except CorruptRecord as e:
                results.append(_Failed(translate(e, store.path, "applying a transaction")))
    results.entries = [(shard, applied[shard] + 1, commands)
                       for shard, commands in sorted(entries.items())]
    return results


def _apply_multi_shard(store, view, payload, entries: dict, changes: dict,
                       lease_table) -> bool:
    data, applied = store._data, store._overlay.applied
    for shard, (reads, ranges, _writes) in payload.parts.items():
        if not reads_still_valid(view(shard), data[shard], reads, ranges):
            return False
    for shard, (_reads, _ranges, writes) in payload.parts.items():
        if writes:
            command = (OP_TXN_WRITES, writes)
            apply_leased(view(shard), data[shard], applied[shard] + 1, command,
                         lease_table(shard) if store._lease_shards[shard] else None,
                         changes.setdefault(shard, []))
            entries.setdefault(shard, []).append(command)
    return True


class _Failed:
    """A request of a batch that failed alone (the others commit)."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


class _BatchResults(list):
    """Per-request results of one batch, plus the ``(shard, slot, commands)`` entries
    it makes, and per shard what they changed (``(key, value, prev)``, for watchers)."""

    entries: list = []

    def __init__(self) -> None:
        super().__init__()
        self.changes: dict[int, list] = {}


__all__ = ["commit_batch"]
