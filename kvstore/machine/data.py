"""The applied key-value state of a shard: apply commands, read values, validate reads.

Each data-table value is the 8-byte big-endian revision that wrote it, a
CRC32C of the key, revision and value, then the user's value
(``kvstore._native.pack_value``; the format is in ``logcodec_py``). Every read
of a value verifies its checksum (``value_of``), so a flipped byte on disk is a
``CorruptRecord``, never data. A shard's revision is the slot of the log entry
that wrote it, so revisions only grow, and a reader (which sees whole entries,
as LMDB commits them atomically) can name exactly the version it read.

These functions work inside an LMDB transaction handed to them; they do no
commits, so the caller writes the applied slot in the same transaction
(safety rule 4).
"""

from __future__ import annotations

from typing import Iterable

from kvstore import _native
from kvstore.commands import OP_CAS, OP_DELETE, OP_INCR, OP_PUT, OP_TXN, OP_TXN_WRITES, incremented
from kvstore.errors import CorruptRecord

#: Bytes of the revision at the start of a stored value.
REVISION_SIZE = 8
#: Bytes before the user's value in a stored value: revision, then checksum.
VALUE_HEADER_SIZE = _native.VALUE_HEADER_SIZE

#: ``stored(key, revision, value)``: the data-table value for ``value`` at ``revision``.
stored = _native.pack_value
#: ``value_of(key, raw)``: the user's value of a stored value (None for None), checksum
#: verified; a mismatch raises ``CorruptRecord``.
value_of = _native.unpack_value
#: ``revision_of(raw)``: revision of a stored value; 0 for an absent key.
revision_of = _native.unpack_revision
_pack = _native.pack_value
_collect_values = _native.collect_values


def read_value(key: bytes, raw: bytes | None) -> tuple[bytes | None, int]:
    """``(value or None, revision)`` of a stored value, its checksum verified."""
    return value_of(key, raw), revision_of(raw)


def scan_rows(txn, db, lo: bytes, hi: bytes | None, limit: int | None) -> list[tuple[bytes, bytes]]:
    """Stored ``(key, raw)`` rows with ``lo <= key < hi``, in key order, at most ``limit``.

    In a transaction begun with ``buffers=True`` each ``raw`` is a buffer valid
    until the transaction ends: decode it (``value_of``) before then.
    """
    rows: list[tuple[bytes, bytes]] = []
    if limit == 0:
        return rows
    cursor = txn.cursor(db)
    try:
        if not cursor.set_range(lo):
            return rows
        for key, raw in cursor.iternext():
            if type(key) is not bytes:  # a buffer (a transaction begun with buffers=True)
                key = bytes(key)
            if hi is not None and key >= hi:
                break
            rows.append((key, raw))
            if limit is not None and len(rows) >= limit:
                break
    finally:
        cursor.close()
    return rows


def scan_values(txn, db, lo: bytes, hi: bytes | None,
                limit: int | None) -> list[tuple[bytes, bytes]]:
    """User-visible ``(key, value)`` pairs with ``lo <= key < hi``, at most ``limit``.

    The read path of ``scan``: one kernel loop over the cursor that stops at ``hi``
    or ``limit``, verifies every checksum and drops the headers.
    """
    if limit == 0:
        return []
    cursor = txn.cursor(db)
    try:
        if not cursor.set_range(lo):
            return []
        return _collect_values(cursor.iternext(), hi, limit)
    finally:
        cursor.close()


def reads_still_valid(txn, db, reads: Iterable, ranges: Iterable) -> bool:
    """True if every key read and every range scanned is as the transaction saw it."""
    get = txn.get
    for key, revision in reads:
        if revision_of(get(key, db=db)) != revision:
            return False
    for lo, hi, seen in ranges:
        rows = scan_rows(txn, db, lo, hi, None)
        if len(rows) != len(seen):
            return False
        for (key, raw), (seen_key, seen_revision) in zip(rows, seen):
            if key != seen_key or revision_of(raw) != seen_revision:
                return False
    return True


def apply_writes(txn, db, revision: int, writes: Iterable, changes: list | None = None) -> None:
    """Write a transaction's ``(key, value or None)`` list at ``revision``.

    ``changes``: if a list, ``(key, value or None, previous value or None)`` is appended
    for each key changed (a delete of an absent key changes nothing); None costs nothing."""
    put, delete = txn.put, txn.delete
    if changes is None:
        for key, value in writes:
            if value is None:
                delete(key, db=db)
            else:
                put(key, _pack(key, revision, value), db=db)
        return
    get = txn.get
    for key, value in writes:
        raw = get(key, db=db)
        if value is None:
            if raw is not None:
                delete(key, db=db)
                changes.append((key, None, previous_value(key, raw)))
        else:
            put(key, _pack(key, revision, value), db=db)
            changes.append((key, value, previous_value(key, raw)))


def previous_value(key: bytes, raw) -> bytes | None:
    """The user's value of a stored value about to be replaced, for a change's report:
    None if absent, or if its checksum fails (the report is not the state: a corrupt
    old value must not make the write fail here when it would not without a watcher)."""
    if raw is None:
        return None
    try:
        return value_of(key, raw)
    except CorruptRecord:
        return None


def apply_command(txn, db, revision: int, command, changes: list | None = None) -> object:
    """Apply one command (see ``kvstore.commands``) at ``revision``; its result.

    ``changes``: as for ``apply_writes`` (what a watch is told); None costs nothing."""
    op = command[0]
    if op == OP_PUT:
        key = command[1]
        if changes is not None:
            changes.append((key, command[2], previous_value(key, txn.get(key, db=db))))
        txn.put(key, _pack(key, revision, command[2]), db=db)
        return None
    if op == OP_DELETE:
        if changes is None:
            return txn.delete(command[1], db=db)
        key = command[1]
        raw = txn.get(key, db=db)
        if raw is None:
            return False
        prev = previous_value(key, raw)
        txn.delete(key, db=db)
        changes.append((key, None, prev))
        return True
    if op == OP_CAS:
        _, key, expected, new = command
        raw = txn.get(key, db=db)
        current = value_of(key, raw)  # a corrupt value fails this command alone
        if current != expected:
            return False
        if new is None:
            if raw is not None:
                txn.delete(key, db=db)
                if changes is not None:
                    changes.append((key, None, current))
        else:
            txn.put(key, _pack(key, revision, new), db=db)
            if changes is not None:
                changes.append((key, new, current))
        return True
    if op == OP_INCR:
        key = command[1]
        before = value_of(key, txn.get(key, db=db))
        result = incremented(before, command[2])
        if type(result) is int:  # else a refusal (not an integer, overflow): nothing written
            value = b"%d" % result
            txn.put(key, _pack(key, revision, value), db=db)
            if changes is not None:
                changes.append((key, value, before))
        return result
    if op == OP_TXN:
        _, reads, ranges, writes = command
        if not reads_still_valid(txn, db, reads, ranges):
            return False
        apply_writes(txn, db, revision, writes, changes)
        return True
    if op == OP_TXN_WRITES:
        apply_writes(txn, db, revision, command[1], changes)
        return True
    raise CorruptRecord(f"unknown command op {op!r} at revision {revision}")
