"""Leases as a shard's replicated state: the records, which keys each holds, and applying
the lease commands (``kvstore.commands``: LeaseGrant ... LeaseExpire).

Everything lives in the shard's ``txns`` table (replicated, snapshotted and
checkpointed with the data: safety rule 4), under keys of its own::

    LEASE_RECORD + id (8 bytes)         -> msgpack [ttl_ms, refreshed_revision]
    LEASE_KEYS + id (8 bytes) + key     -> b""   (lease -> its keys, in key order)
    LEASE_OF + key                      -> id (8 bytes)   (key -> its lease)
    LEASE_ATTACHED                      -> 8 bytes: how many keys are attached

A key is attached by ``PutLease``/``PutTTL``; any other write of it (put, delete,
cas, incr, transaction, 2PC resolve) detaches it, so it then lives for good.
``LeaseRevoke`` and ``LeaseExpire`` delete the lease's keys, each reported to a
``changes`` collector as a delete (the watch's events). No clock here: *when* a lease
expires is the node's business (``kvstore.node.leases``); the state machine only
applies the LeaseExpire the leader wrote, and only if the lease was not refreshed
since the revision it names (a keep-alive that won the race keeps the lease).

The hot path stays free of lease work on a shard with no attached key:
``LeaseTable.attached`` is read once per table (once per save or batch), and a
plain write looks anything up only when it is not zero.

``PutTTL`` makes an anonymous lease: its id is ``ANON_BASE + (revision << 12)``,
probed upward past ids in use (several PutTTLs of one entry share a revision),
deterministic on every replica; clients cannot name those ids (``LEASE_ID_MAX``).
"""

from __future__ import annotations

import msgpack

from kvstore.commands import (Cas, LEASE_ID_MAX, LEASE_OPS, LOCKED, NO_LEASE, OP_CAS, OP_DELETE,
                              OP_CAS_LEASE, OP_INCR, OP_LEASE_EXPIRE, OP_LEASE_GRANT, OP_LEASE_KEEPALIVE,
                              OP_LEASE_REVOKE, OP_PUT, OP_PUT_LEASE, OP_PUT_TTL, OP_TXN,
                              OP_TXN_WRITES)
from kvstore.errors import CorruptRecord
from kvstore.machine.data import apply_command, stored, value_of
from kvstore.machine.twopc import TXN_LOCK, TXN_PREPARED

LEASE_RECORD = b"\x00lease.rec\x00"
LEASE_KEYS = b"\x00lease.keys\x00"
LEASE_OF = b"\x00lease.of\x00"
LEASE_ATTACHED = b"\x00lease.attached"


def _prefix_range(prefix: bytes) -> tuple[bytes, bytes]:
    return prefix, prefix[:-1] + bytes((prefix[-1] + 1,))


#: Every row of the leases in a shard's ``txns`` table, as sorted disjoint ``[lo, hi)``
#: ranges (what a backup copies of that table: sessions and 2PC records are not leases).
LEASE_ROW_RANGES = tuple(sorted([(LEASE_ATTACHED, LEASE_ATTACHED + b"\x00"),
                                 _prefix_range(LEASE_KEYS), _prefix_range(LEASE_OF),
                                 _prefix_range(LEASE_RECORD)]))
#: Anonymous leases (``PutTTL``) have ids from here on: no client can name one.
ANON_BASE = LEASE_ID_MAX + 1


def _id_bytes(lease_id: int) -> bytes:
    return lease_id.to_bytes(8, "big")


class LeaseTable:
    """A shard's leases inside one (LMDB or overlay-view) transaction ``txn``, table ``db``
    (the shard's txns table). ``events``: what the node's expiry clock learns from this
    apply: ``(lease_id, ttl_ms, refreshed_revision)`` for a lease granted or refreshed,
    ``(lease_id, None, None)`` for one that ended."""

    __slots__ = ("txn", "db", "attached", "events")

    def __init__(self, txn, db) -> None:
        self.txn = txn
        self.db = db
        raw = txn.get(LEASE_ATTACHED, db=db)
        self.attached = 0 if raw is None else int.from_bytes(bytes(raw), "big")
        self.events: list = []

    # -- records ---------------------------------------------------------------------------

    def record(self, lease_id: int) -> list | None:
        """``[ttl_ms, refreshed_revision]`` of a lease, or None if this shard has none."""
        raw = self.txn.get(LEASE_RECORD + _id_bytes(lease_id), db=self.db)
        if raw is None:
            return None
        try:
            record = msgpack.unpackb(bytes(raw))
        except Exception as e:  # msgpack raises several unrelated classes
            raise CorruptRecord(f"undecodable lease record {lease_id}: {e}"[:200]) from None
        if (type(record) is not list or len(record) != 2
                or not all(type(v) is int for v in record)):
            raise CorruptRecord(f"malformed lease record {lease_id}")
        return record

    def _set_record(self, lease_id: int, ttl_ms: int, revision: int) -> None:
        self.txn.put(LEASE_RECORD + _id_bytes(lease_id), msgpack.packb([ttl_ms, revision]),
                     db=self.db)
        self.events.append((lease_id, ttl_ms, revision))

    def all_records(self) -> list:
        """Every lease of the shard: ``[(lease_id, ttl_ms, refreshed_revision)]``."""
        out = []
        for key, _raw in _prefixed(self.txn, self.db, LEASE_RECORD):
            lease_id = int.from_bytes(key, "big")
            ttl_ms, revision = self.record(lease_id)
            out.append((lease_id, ttl_ms, revision))
        return out

    def keys_of(self, lease_id: int) -> list:
        """The keys attached to a lease, in key order."""
        return [k for k, _ in _prefixed(self.txn, self.db, LEASE_KEYS + _id_bytes(lease_id))]

    def lease_of(self, key: bytes) -> int | None:
        raw = self.txn.get(LEASE_OF + key, db=self.db)
        return None if raw is None else int.from_bytes(bytes(raw), "big")

    # -- attaching ---------------------------------------------------------------------------

    def _count(self, delta: int) -> None:
        self.attached += delta
        self.txn.put(LEASE_ATTACHED, self.attached.to_bytes(8, "big"), db=self.db)

    def attach(self, key: bytes, lease_id: int) -> None:
        current = self.lease_of(key)
        if current == lease_id:
            return
        if current is not None:
            self._unlink(key, current)
            self._end_if_anonymous(current)
        else:
            self._count(1)
        self.txn.put(LEASE_OF + key, _id_bytes(lease_id), db=self.db)
        self.txn.put(LEASE_KEYS + _id_bytes(lease_id) + key, b"", db=self.db)

    def detach(self, key: bytes) -> None:
        """``key`` was written by a plain write: it no longer lives with a lease."""
        current = self.lease_of(key)
        if current is not None:
            self._unlink(key, current)
            self.txn.delete(LEASE_OF + key, db=self.db)
            self._count(-1)
            self._end_if_anonymous(current)

    def _unlink(self, key: bytes, lease_id: int) -> None:
        self.txn.delete(LEASE_KEYS + _id_bytes(lease_id) + key, db=self.db)

    def _end_if_anonymous(self, lease_id: int) -> None:
        """A ``PutTTL``'s lease held its one key, now written again: it ends here (no
        expiry entry is needed for a lease with nothing left to delete)."""
        if lease_id >= ANON_BASE:
            self.txn.delete(LEASE_RECORD + _id_bytes(lease_id), db=self.db)
            self.events.append((lease_id, None, None))

    def detach_written(self, command, result) -> None:
        """After a plain command applied: detach every key it wrote (only when
        ``attached``: the caller checks, so a shard without leases pays nothing)."""
        op = command[0]
        if op == OP_PUT or op == OP_DELETE:
            self.detach(command[1])
        elif op == OP_CAS:
            if result is True:
                self.detach(command[1])
        elif op == OP_INCR:
            if type(result) is int:
                self.detach(command[1])
        elif op == OP_TXN:
            if result is True:
                for key, _value in command[3]:
                    self.detach(key)
        elif op == OP_TXN_WRITES:
            for key, _value in command[1]:
                self.detach(key)

    def before_2pc(self, entry) -> None:
        """Before a 2PC entry applies: a resolve that commits writes its prepared keys,
        which then leave their leases (an abort writes nothing)."""
        from kvstore.txn import COMMIT, TxnResolve
        from kvstore.txn import decode as decode_entry
        if type(entry) is not TxnResolve or entry.outcome != COMMIT:
            return
        raw = self.txn.get(TXN_PREPARED + entry.txn_id, db=self.db)
        if raw is not None:
            for key, _value in decode_entry(bytes(raw)).writes:
                self.detach(key)

    # -- the lease commands ------------------------------------------------------------------

    def apply(self, data_txn, data_db, revision: int, command, changes: list | None = None):
        """Apply one lease command at ``revision`` (``data_txn``/``data_db``: the shard's
        data table, where its keys live); its result (``kvstore.commands``)."""
        op = command[0]
        if op == OP_LEASE_GRANT:
            self._set_record(command[1], command[2], revision)
            return True
        if op == OP_LEASE_KEEPALIVE:
            record = self.record(command[1])
            if record is None:
                return False
            self._set_record(command[1], record[0], revision)
            return True
        if op == OP_LEASE_REVOKE:
            if self.record(command[1]) is None:
                return False
            return self._end(data_txn, data_db, command[1], changes)
        if op == OP_LEASE_EXPIRE:
            record = self.record(command[1])
            if record is None or record[1] != command[2]:
                return False  # gone already, or refreshed since the leader decided
            return self._end(data_txn, data_db, command[1], changes)
        if op == OP_PUT_LEASE:
            _, key, value, lease_id = command
            if self.record(lease_id) is None:
                return NO_LEASE
            self._put(data_txn, data_db, revision, key, value, changes)
            self.attach(key, lease_id)
            return None
        if op == OP_CAS_LEASE:
            return self._cas(data_txn, data_db, revision, command, changes)
        if op == OP_PUT_TTL:
            _, key, value, ttl_ms = command
            lease_id = self._anonymous_id(revision)
            self._set_record(lease_id, ttl_ms, revision)
            self._put(data_txn, data_db, revision, key, value, changes)
            self.attach(key, lease_id)
            return None
        raise CorruptRecord(f"unknown lease op {op!r} at revision {revision}")

    def _cas(self, data_txn, data_db, revision: int, command, changes) -> object:
        """``CasLease``: refused (``NO_LEASE``) without its lease; else a cas whose new
        value is attached to the lease (a delete leaves the key's lease behind)."""
        _, key, expected, new, lease_id = command
        if self.record(lease_id) is None:
            return NO_LEASE
        # the cas itself is the plain one (``kvstore.machine.data``): one rule for both
        if apply_command(data_txn, data_db, revision, Cas(OP_CAS, key, expected, new),
                         changes) is not True:
            return False
        if new is None:
            self.detach(key)
        else:
            self.attach(key, lease_id)
        return True

    def _anonymous_id(self, revision: int) -> int:
        lease_id = ANON_BASE + ((revision << 12) & LEASE_ID_MAX)
        while self.record(lease_id) is not None:
            lease_id = ANON_BASE + ((lease_id + 1 - ANON_BASE) & LEASE_ID_MAX)
        return lease_id

    @staticmethod
    def _put(data_txn, data_db, revision, key, value, changes) -> None:
        if changes is not None:
            raw = data_txn.get(key, db=data_db)
            changes.append((key, value, None if raw is None else value_of(key, raw)))
        data_txn.put(key, stored(key, revision, value), db=data_db)

    def _end(self, data_txn, data_db, lease_id: int, changes: list | None):
        """Delete the lease and its keys: their number, or ``LOCKED`` (nothing changed)
        while a prepared cross-shard transaction holds one of them (its isolation
        comes first; the leader or the client tries again)."""
        keys = self.keys_of(lease_id)
        get = self.txn.get
        if any(get(TXN_LOCK + key, db=self.db) is not None for key in keys):
            return LOCKED
        prefix = LEASE_KEYS + _id_bytes(lease_id)
        deleted = 0
        for key in keys:
            raw = data_txn.get(key, db=data_db)
            if raw is not None:
                data_txn.delete(key, db=data_db)
                deleted += 1
                if changes is not None:
                    changes.append((key, None, value_of(key, raw)))
            self.txn.delete(prefix + key, db=self.db)
            self.txn.delete(LEASE_OF + key, db=self.db)
        if keys:
            self._count(-len(keys))
        self.txn.delete(LEASE_RECORD + _id_bytes(lease_id), db=self.db)
        self.events.append((lease_id, None, None))
        return deleted


def apply_leased(txn, db, revision: int, command, leases: LeaseTable | None,
                 changes: list | None = None):
    """``kvstore.machine.data.apply_command`` with leases: a lease command goes to
    ``leases``, a plain write detaches the keys it wrote from theirs. ``leases`` None
    (the embedded store's shard that never saw a lease), or no key attached, is the
    plain apply, with one test more."""
    op = command[0]
    if op < OP_LEASE_GRANT or op not in LEASE_OPS:  # the lease ops follow the plain ones
        result = apply_command(txn, db, revision, command, changes)
        if leases is not None and leases.attached:
            leases.detach_written(command, result)
        return result
    if leases is None:
        raise CorruptRecord(f"a lease command (op {op}) with no lease table")
    return leases.apply(txn, db, revision, command, changes)


def _prefixed(txn, db, prefix: bytes):
    """``(key without prefix, value)`` of every row under ``prefix``."""
    cursor = txn.cursor(db)
    try:
        if not cursor.set_range(prefix):
            return
        for key, value in cursor.iternext():
            key = bytes(key)
            if not key.startswith(prefix):
                return
            yield key[len(prefix):], value
    finally:
        cursor.close()


__all__ = ["LeaseTable", "apply_leased", "LEASE_RECORD", "LEASE_KEYS", "LEASE_OF",
           "LEASE_ATTACHED", "LEASE_ROW_RANGES", "ANON_BASE"]
