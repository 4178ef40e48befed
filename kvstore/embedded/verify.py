"""``EmbeddedKV.verify``: every checksum, and the state against the log.

Every log record still kept (the write-ahead log's, and the ``log`` table's of
a directory written before it) is decoded and checksummed, every stored
value's checksum is verified (LMDB's and the overlay's), and the state (the
overlay over LMDB, one snapshot) is compared with the log where the log still
covers it (``_compare_with_log``). The first problem raises ``CorruptRecord``
naming the path, shard and key or slot. Before that, every page of LMDB's
B-trees is checked (``storage.pages``).
"""

from __future__ import annotations

from kvstore import _native
from kvstore.commands import (KIND_COMMANDS, OP_CAS, OP_DELETE, OP_INCR, OP_PUT, OP_TXN,
                              OP_TXN_WRITES, OP_CAS_LEASE, OP_PUT_LEASE, OP_PUT_TTL, LEASE_OPS,
                              counter_value, decode_commands)
from kvstore.embedded.recovery import chosen_logs, entry_commands
from kvstore.errors import CorruptRecord, StorageError
from kvstore.machine.data import revision_of, scan_rows, value_of
from kvstore.storage.overlay import ShardView
from kvstore.storage.wal import RECORD_OVERHEAD


def verify_store(store) -> dict:
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
    try:  # LMDB then holds every acknowledged write, and its pages are checked below
        store._checkpointer.checkpoint()
    except CorruptRecord:
        raise
    except StorageError:
        pass  # a full disk: the overlay is compared all the same
    pages = store._storage.check_pages()
    with store._checkpointer.holding():  # no segment is deleted while we read them
        def read(txn, levels, position):
            wal_ops = _verify_wal(store, position)  # the log up to the snapshot's point
            out = {"pages": pages, "records": 0, "bytes": 0, "values": 0,
                   "keys_compared": 0}
            for shard, tables in enumerate(store._tables):
                ops, first, last = _verify_log(store, txn, shard, out)
                first, last = _join_ranges(ops, first, last, wal_ops[shard], out)
                view = ShardView([{}, *levels[shard]], txn, tables.data)
                for key, raw in scan_rows(view, tables.data, b"", None, None):
                    try:
                        value = value_of(key, raw)
                    except CorruptRecord as e:
                        raise CorruptRecord(f"{e} in {store.path}, shard {shard}; "
                                            f"restore it from a replica or a backup",
                                            path=store.path) from e
                    out["values"] += 1
                    key_ops = ops.pop(key, None)
                    if first is not None:
                        problem = _compare_with_log(revision_of(raw), value, key_ops,
                                                    first, last)
                        if problem:
                            _disagree(store, shard, key, problem)
                        out["keys_compared"] += 1
                for key, key_ops in ops.items():  # written in the log, absent in the state
                    slot, kind, value, _expected = key_ops[-1]
                    if kind in ("put", "incr"):
                        _disagree(store, shard, key, f"the log writes it at slot {slot} and "
                                                   f"nothing after, but the state lacks it")
                    out["keys_compared"] += 1
            return out

        return store._snapshot(read, "checking")


def _verify_wal(store, position: int) -> list:
    """Per shard, ``(ops by key, first slot, last slot, records, bytes)`` of the
    write-ahead log's chosen entries below ``position`` (checksummed as read)."""
    found = [({}, None, None, 0, 0) for _ in range(store._nshards)]
    records = ((p, g, r) for p, g, r in store._wal.replay_groups(0) if p < position)
    for shard, log in enumerate(chosen_logs(records, store._nshards)):
        for slot in sorted(s for s in log.entries if s <= log.commit):
            e = log.entries[slot]
            ops, first, last, count, size = found[shard]
            try:
                for command in entry_commands(e):
                    _collect_ops(ops, slot, command)
            except (CorruptRecord, TypeError, ValueError, IndexError) as err:
                raise CorruptRecord(f"corrupt command in the log of {store.path}, shard "
                                    f"{shard} slot {slot}: {err}", slot=slot,
                                    path=store.path) from err
            found[shard] = (ops, slot if first is None else first, slot,
                            count + 1, size + RECORD_OVERHEAD + len(e.payload))
    return found


def _verify_log(store, txn, shard: int, out: dict):
    """Checksum the shard's ``log`` table (a directory written before the write-ahead log:
    its entries are ``KIND_COMMANDS`` records of ``encode_commands``); ``(ops by key, first
    slot, last slot)`` it covers."""
    ops: dict[bytes, list] = {}
    first = last = None
    cursor = txn.cursor(store._tables[shard].log)
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
                raise CorruptRecord(f"corrupt log record in {store.path}, shard {shard} "
                                    f"{where}: {e}", slot=e.slot, offset=e.offset,
                                    path=store.path) from e
            except (TypeError, ValueError, IndexError) as e:  # a command of a bad shape
                raise CorruptRecord(f"corrupt command in the log of {store.path}, shard "
                                    f"{shard} slot {slot}: {e}", slot=slot,
                                    path=store.path) from e
            if first is None:
                first = slot
            last = slot
            out["records"] += 1
            out["bytes"] += len(raw)
    finally:
        cursor.close()
    return ops, first, last


def _disagree(store, shard: int, key: bytes, problem: str) -> None:
    shown = key[:64] + (b"..." if len(key) > 64 else b"")
    raise CorruptRecord(f"the state of {store.path}, shard {shard}, disagrees with its log "
                        f"on key {shown!r}: {problem}; restore it from a replica or a "
                        f"backup", path=store.path)


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
    they found (a transaction's writes depend on its reads), "incr" for an incr (its
    value depends on what it found; the key is present after it either way).
    """
    op = command[0]
    if op == OP_PUT:
        ops.setdefault(command[1], []).append((slot, "put", command[2], None))
    elif op == OP_DELETE:
        ops.setdefault(command[1], []).append((slot, "del", None, None))
    elif op == OP_CAS:
        _, key, expected, new = command
        ops.setdefault(key, []).append((slot, "cas", new, expected))
    elif op == OP_INCR:
        ops.setdefault(command[1], []).append((slot, "incr", None, None))
    elif op == OP_TXN:
        for key, value in command[3]:
            ops.setdefault(key, []).append((slot, "cond", value, None))
    elif op == OP_TXN_WRITES:
        for key, value in command[1]:
            ops.setdefault(key, []).append(
                (slot, "put" if value is not None else "del", value, None))
    elif op == OP_CAS_LEASE:  # refused without its lease, or when it does not compare
        ops.setdefault(command[1], []).append((slot, "cond", command[3], None))
    elif op == OP_PUT_LEASE or op == OP_PUT_TTL:
        # refused without its lease; and a revoke or an expiry may delete it later
        ops.setdefault(command[1], []).append((slot, "cond", command[2], None))
    elif op in LEASE_OPS:
        pass  # the keys a revoke or an expiry deletes depend on the lease's state
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
        since = at[max(last_sure, 0):]
        possible = [op[2] for op in since if op[1] != "del"]
        counted = any(op[1] == "incr" for op in since) and counter_value(value) is not None
        if value not in possible and not counted:
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


__all__ = ["verify_store"]
