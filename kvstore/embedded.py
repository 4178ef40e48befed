"""The embedded store: ``kvstore.open(dir)``, one replica in this process.

Writes flow the way they do in a cluster: each command becomes part of a log
entry of its shard, the entry is appended to the shard's log (checksummed
record, ``kvstore._native``), applied in slot order, and the applied slot is
written in the same LMDB transaction. A single replica is its own quorum, so
"committed" means "in that transaction, fsync'd". Concurrent writers share one
such transaction (``GroupCommitter``): many commands per entry, one entry per
shard per commit, one fsync per commit.

Reads go straight to an LMDB read transaction (DESIGN.md, performance rules):
on a single replica the applied state is the committed state.
"""

from __future__ import annotations

import heapq
import itertools
import os
import threading
import weakref
from typing import Sequence

import lmdb

from kvstore import _native
from kvstore.api import KV, Txn
from kvstore.codec import (KIND_COMMANDS, OP_CAS, OP_DELETE, OP_PUT, OP_TXN, OP_TXN_WRITES,
                           decode_commands, encode_commands)
from kvstore.errors import (CorruptRecord, InvalidArgument, KVError, StorageError,
                            TransactionConflict)
from kvstore.groupcommit import GroupCommitter, Request
from kvstore.sharding import shard_of
from kvstore.keys import (MAX_KEY_SIZE, MAX_TXN_SIZE, check_key, check_limit,
                          check_optional_value, check_value, scan_range)
from kvstore.storage import Storage
from kvstore.storage.environment import (META_APPLIED, META_COMMIT, META_LOG_FIRST,
                                         THIRD_PARTY_ERRORS, pack_u64, translate, unpack_u64)
from kvstore.storage.state import (apply_command, apply_writes, reads_still_valid,
                                   revision_of, scan_rows, scan_values, value_of)
from kvstore._native import unpack_rows

#: Log entries kept behind the applied point; older ones are compacted away
#: (a single replica has nobody to catch up, the state itself is the snapshot).
LOG_KEEP_ENTRIES = 10_000
#: How often (in slots) compaction runs; it deletes at most this many records.
LOG_COMPACT_EVERY = 1024
_BALLOT = 0  # a single replica never needs a higher ballot than its first


class _MultiShardTxn:
    """A transaction spanning shards: validated and applied as one, in one LMDB commit."""

    __slots__ = ("parts",)

    def __init__(self, parts: dict) -> None:
        self.parts = parts  # shard -> (reads, ranges, writes)


class EmbeddedKV(KV):
    """``kvstore.open(path)``: a durable, thread-safe, transactional store in this process."""

    def __init__(self, path: str | os.PathLike, *, shards: int | None = None,
                 map_size: int | None = None, create: bool = True) -> None:
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
        try:
            self._applied = self._storage.read(
                lambda txn: [self._applied_point(txn, s) for s in range(self._nshards)],
                "reading the applied points", True)
        except BaseException:
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
        db = self._db0 or self._data[shard_of(key, self._nshards)]
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
            try:
                txn = self._begin()
                raw = txn.get(key, None, db)
                if storage.committing:  # a commit in flight: is our snapshot durable?
                    storage.await_durable(txn)
                value = value_of(key, raw)  # the checksum verified: never corrupt data
                txn.commit()
                return value
            except CorruptRecord as e:
                raise translate(e, self.path, "reading") from e
            except THIRD_PARTY_ERRORS as e:
                self._check_open()
                raise translate(e, self.path, "reading") from e
            finally:
                active.pop()

    def scan(self, prefix=b"", start=None, end=None, limit=None):
        self._check_open()
        lo, hi = scan_range(prefix, start, end)
        limit = check_limit(limit)
        if hi is not None and hi <= lo:
            return []

        def read(txn):
            per_shard = [scan_values(txn, db, lo, hi, limit) for db in self._data]
            if len(per_shard) == 1:
                return per_shard[0]
            # One snapshot across shards; each holds its own first ``limit`` keys.
            return list(itertools.islice(heapq.merge(*per_shard), limit))

        return self._storage.read(read, "scanning")

    # -- single-key writes -------------------------------------------------------------------

    def put(self, key, value) -> None:
        key = check_key(key)
        value = check_value(value)
        self._submit((self._shard(key), (OP_PUT, key, value)), len(key) + len(value))

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
        """Append one log entry per touched shard, apply it, and commit: one fsync."""
        if self._storage.env is None:
            raise KVError(f"the store at {self.path} is closed")
        results = self._storage.write(lambda txn: self._apply_batch(txn, batch), True)
        for request, result in zip(batch, results):
            if type(result) is _Failed:
                request.error = result.error
            else:
                request.result = result
        for shard, slot in results.slots:
            self._applied[shard] = slot

    def _apply_batch(self, txn, batch: Sequence[Request]) -> "_BatchResults":
        applied = self._applied
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
                    result = apply_command(txn, data[shard], applied[shard] + 1, command)
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
                    results.append(self._apply_multi_shard(txn, payload, entries))
                except CorruptRecord as e:
                    results.append(_Failed(translate(e, self.path, "applying a transaction")))
        for shard, commands in entries.items():
            slot = applied[shard] + 1
            tables = self._tables[shard]
            record = _native.encode_record(slot, _BALLOT, KIND_COMMANDS,
                                           encode_commands(commands))
            _native.append_log(txn, tables.log, [(slot, record)])
            if slot % LOG_COMPACT_EVERY == 0:
                self._compact_log(txn, shard, slot)
            results.slots.append((shard, slot))
        return results

    def _apply_multi_shard(self, txn, payload: _MultiShardTxn, entries: dict) -> bool:
        data, applied = self._data, self._applied
        for shard, (reads, ranges, _writes) in payload.parts.items():
            if not reads_still_valid(txn, data[shard], reads, ranges):
                return False
        for shard, (_reads, _ranges, writes) in payload.parts.items():
            if writes:
                apply_writes(txn, data[shard], applied[shard] + 1, writes)
                entries.setdefault(shard, []).append((OP_TXN_WRITES, writes))
        return True

    def _applied_point(self, txn, shard: int) -> int:
        """The shard's commit and applied point: the last slot in its log.

        A single replica appends, chooses and applies an entry in one
        transaction, so its log's last slot is both points. Meta records them
        only at each log compaction (which always keeps the newest entries):
        rewriting meta on every commit cost one more dirty page per fsync, about
        a tenth of a lone durable put.
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
        if recorded > last:  # compaction always keeps the newest entries
            raise CorruptRecord(f"shard {shard}'s meta says slot {recorded} is applied, past "
                                f"the last slot of its log ({last})")
        return last

    def _compact_log(self, txn, shard: int, slot: int) -> None:
        tables = self._tables[shard]
        encoded = pack_u64(slot)
        txn.put(META_APPLIED, encoded, db=tables.meta)
        txn.put(META_COMMIT, encoded, db=tables.meta)
        first = unpack_u64(txn.get(META_LOG_FIRST, db=tables.meta), 1)
        keep_from = slot - LOG_KEEP_ENTRIES
        if keep_from <= first:
            return
        cursor = txn.cursor(tables.log)
        try:
            if cursor.set_range(_native.slot_key(first)):
                while _native.key_slot(cursor.key()) < keep_from:
                    if not cursor.delete():
                        break
        finally:
            cursor.close()
        txn.put(META_LOG_FIRST, pack_u64(keep_from), db=tables.meta)

    # -- introspection --------------------------------------------------------------------

    def verify(self) -> dict:
        """Check everything that carries a checksum, and the state against the log.

        Every log record still kept is decoded and checksummed, every stored
        value's checksum is verified, and the state is compared with the log
        where the log still covers it (``_compare_with_log``). The first
        problem raises ``CorruptRecord`` naming the path, shard and key or slot.

        Before that, every page of LMDB's B-trees is checked (``storage.pages``).

        Returns ``{"pages": n, "records": n, "bytes": n, "values": n, "keys_compared": n}``.
        """
        self._check_open()
        pages = self._storage.check_pages()

        def read(txn):
            out = {"pages": pages, "records": 0, "bytes": 0, "values": 0, "keys_compared": 0}
            for shard, tables in enumerate(self._tables):
                ops, first, last = self._verify_log(txn, shard, out)
                cursor = txn.cursor(tables.data)
                try:
                    for key, raw in cursor:
                        key = bytes(key)  # at most 64 KiB, inside the file's slack
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
                finally:
                    cursor.close()
                for key, key_ops in ops.items():  # written in the log, absent in the state
                    slot, kind, value, _expected = key_ops[-1]
                    if kind == "put":
                        self._disagree(shard, key, f"the log writes it at slot {slot} and "
                                                   f"nothing after, but the state lacks it")
                    out["keys_compared"] += 1
            return out

        return self._storage.read(read, "checking", True)

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

        def read(txn):
            shards = []
            for s, tables in enumerate(self._tables):
                applied = self._applied_point(txn, s)
                shards.append({
                    "shard": s,
                    "leader": "local",
                    "commit_index": applied,
                    "applied_index": applied,
                    "log_first": self._storage.meta_int(txn, s, META_LOG_FIRST, 1),
                    "keys": txn.stat(tables.data)["entries"],
                    "replicas": {"local": applied},
                })
            return shards

        shards = self._storage.read(read, "reading the status", True)
        return {
            "mode": "embedded",
            "path": self.path,
            "implementation": _native.IMPLEMENTATION,
            "nodes": [{"id": "local", "address": None, "state": "up",
                       "role": "leader", "path": self.path}],
            "shards": shards,
            "disk_bytes": self._storage.disk_usage(),
            "map_size": self._storage.map_size,
        }

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
            self._storage.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<kvstore.EmbeddedKV {self.path!r} shards={self._nshards} {state}>"


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
    size = 0
    for reads, ranges, writes in parts.values():
        for key, _revision in reads:
            size += len(key) + 9
        for lo, hi, seen in ranges:
            size += len(lo) + len(hi or b"") + sum(len(k) + 9 for k, _ in seen)
        for key, value in writes:
            size += len(key) + len(value or b"") + 2
    return size


#: Every open store of this process, so a child of fork() finds them closed.
_open_stores: "weakref.WeakSet[EmbeddedKV]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for store in list(_open_stores):
        store._closed = True  # every call now fails in _check_open, naming fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


class _BatchResults(list):
    """Per-request results of one batch, plus the ``(shard, slot)`` entries it wrote."""

    def __init__(self) -> None:
        super().__init__()
        self.slots: list[tuple[int, int]] = []


class EmbeddedTxn(Txn):
    """Optimistic, serializable: reads come from one LMDB snapshot (taken at the first
    read) plus this transaction's own writes; at commit the keys and ranges it read are
    checked unchanged, in the same commit that applies its writes, or it raises
    ``TransactionConflict`` and nothing of it is applied.

    A ``Txn`` belongs to the thread that made it.
    """

    def __init__(self, store: EmbeddedKV) -> None:
        self._store = store
        self._snapshot = None
        self._finalizer = None
        self._reads: dict[int, dict[bytes, int]] = {}
        self._ranges: dict[int, list] = {}
        self._writes: dict[bytes, bytes | None] = {}
        self._write_bytes = 0  # keys and values in _writes: at most MAX_TXN_SIZE
        self._state = "new"  # new -> open -> committed | discarded

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> "EmbeddedTxn":
        if self._state != "new":
            raise InvalidArgument(f"this transaction is {self._state}; start a new one with "
                                  f"db.transaction()")
        self._state = "open"
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._state != "open":
            return
        if exc_type is not None:
            self._finish("discarded")
            return
        self.commit()

    def commit(self) -> None:
        """Commit now (the context manager does this on a clean exit)."""
        self._check_usable()
        try:
            ok = self._store._commit_txn(self._reads, self._ranges, self._writes)
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
        if self._state == "open":
            self._store._check_open()
            return
        if self._state == "new":
            raise InvalidArgument("use the transaction inside 'with db.transaction() as txn:'")
        raise InvalidArgument(f"this transaction is already {self._state}; start a new one")

    def _view(self):
        if self._snapshot is None:
            storage = self._store._storage
            self._snapshot = storage.begin_read(True)  # buffers: lengths checked first
            self._finalizer = weakref.finalize(self, storage.end_read, self._snapshot)
        return self._snapshot

    # -- operations ------------------------------------------------------------------------

    def get(self, key):
        self._check_usable()
        key = check_key(key)
        if key in self._writes:
            return self._writes[key]
        return self._read(key)

    def _read(self, key: bytes) -> bytes | None:
        store = self._store
        shard = store._shard(key)
        try:
            raw = self._view().get(key, db=store._data[shard])
            value = value_of(key, raw)
            revision = revision_of(raw)
        except (CorruptRecord, *THIRD_PARTY_ERRORS) as e:
            raise translate(e, store.path, "reading in a transaction") from e
        shard_reads = self._reads.setdefault(shard, {})
        shard_reads.setdefault(key, revision)
        return value

    def put(self, key, value) -> None:
        self._check_usable()
        key = check_key(key)
        value = check_value(value)
        old = self._writes.get(key)
        size = self._write_bytes + len(value) - (0 if old is None else len(old))
        if key not in self._writes:
            size += len(key)
        if size > MAX_TXN_SIZE:
            raise InvalidArgument(
                f"this put would make the transaction's writes {size} bytes; the largest "
                f"allowed is MAX_TXN_SIZE = {MAX_TXN_SIZE}: split it into smaller "
                f"transactions (the transaction is unchanged)")
        self._writes[key] = value
        self._write_bytes = size

    def delete(self, key) -> bool:
        self._check_usable()
        key = check_key(key)
        existed = (self._writes[key] if key in self._writes else self._read(key)) is not None
        old = self._writes.get(key)
        if key not in self._writes:
            self._write_bytes += len(key)
        elif old is not None:
            self._write_bytes -= len(old)
        self._writes[key] = None
        return existed

    def scan(self, prefix=b"", start=None, end=None, limit=None):
        self._check_usable()
        lo, hi = scan_range(prefix, start, end)
        limit = check_limit(limit)
        if (hi is not None and hi <= lo) or limit == 0:
            return []
        local = {k: v for k, v in self._writes.items() if k >= lo and (hi is None or k < hi)}
        # Enough underlying rows that local deletes cannot starve the limit.
        fetch = None if limit is None else limit + sum(1 for v in local.values() if v is None)
        view = self._view()
        merged: dict[bytes, bytes | None] = {}
        seen_hi = hi  # every shard's rows are complete below this bound
        for shard, db in enumerate(self._store._data):
            try:
                rows = scan_rows(view, db, lo, hi, fetch)
                values = unpack_rows(rows)  # every checksum verified
                revisions = [(k, revision_of(raw)) for k, raw in rows]
            except (CorruptRecord, *THIRD_PARTY_ERRORS) as e:
                raise translate(e, self._store.path, "scanning in a transaction") from e
            covered_hi = hi
            if fetch is not None and len(rows) == fetch:
                covered_hi = rows[-1][0] + b"\x00"  # this shard was read only up to here
                if seen_hi is None or covered_hi < seen_hi:
                    seen_hi = covered_hi
            self._ranges.setdefault(shard, []).append((lo, covered_hi, revisions))
            merged.update(values)
        merged.update(local)
        # A shard cut at ``seen_hi`` alone holds >= limit live rows below it, so
        # the first ``limit`` results all lie below it.
        out = [(k, v) for k, v in sorted(merged.items())
               if v is not None and (seen_hi is None or k < seen_hi)]
        return out if limit is None else out[:limit]
