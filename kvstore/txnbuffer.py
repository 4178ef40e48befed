"""The I/O-free state of a transaction, shared by every engine: ``TxnBuffer``.

The embedded store's transaction (``kvstore.embedded.store.EmbeddedTxn``) and the
cluster's (``kvstore.client.txn.ClusterTxn``, which the asyncio client drives too)
keep here what they read, what they scanned and what they will write; their own
code only fetches rows (from LMDB and the overlay, or from the nodes) and
commits. So one piece of code decides, for every engine:

- **read-your-writes**: ``written(key)`` answers from the buffered writes first;
- **the read set**: the revision each key had when it was first read
  (``record_read``), and each scanned range with the rows it saw (``ScanMerge``),
  validated at commit;
- **the write set, bounded in bytes** (``WriteBuffer``): a put or delete that
  would carry the keys and values written past the engine's limit raises
  ``InvalidArgument`` and leaves the transaction as it was. The limits differ
  because the entries do: an embedded transaction is one local log entry
  (``MAX_TXN_SIZE``), a cluster one travels as one request and one replicated
  log entry (``MAX_CLUSTER_TXN_SIZE``, ``kvstore.keys``);
- **the scan merge** (``ScanMerge``): buffered writes laid over the rows the
  engine returns, with enough rows fetched that buffered deletes cannot starve
  a limit, and the range recorded only as far as it was really read;
- **the lifecycle** (``BufferedTxn``): new, open inside ``with``, then committed
  or discarded, and the errors of a transaction used outside it.
"""

from __future__ import annotations

import abc

from kvstore.api import Txn
from kvstore.errors import InvalidArgument
from kvstore.keys import check_scan

#: ``TxnBuffer.written``'s answer for a key this transaction has not written.
NOT_WRITTEN = object()


class WriteBuffer(dict):
    """``key -> value or None`` (None deletes), with ``size``: the bytes of the keys and
    values held. Invariant: ``size <= limit``."""

    def __init__(self, limit: int, limit_name: str) -> None:
        super().__init__()
        self.limit = limit
        self.limit_name = limit_name
        self.size = 0

    def size_with(self, key: bytes, value: bytes | None) -> int:
        """The size once ``value`` is written at ``key``; ``InvalidArgument`` past the limit."""
        old = self.get(key)
        size = self.size + len(value or b"") - len(old or b"") + (0 if key in self else len(key))
        if size > self.limit:
            what = "put" if value is not None else "delete"
            raise InvalidArgument(
                f"this {what} would make the transaction's writes {size} bytes; the largest "
                f"allowed is {self.limit_name} = {self.limit}: split it into smaller "
                f"transactions (the transaction is unchanged)")
        return size

    def write(self, key: bytes, value: bytes | None) -> None:
        """Buffer a put (``value``) or a delete (None), or raise and change nothing."""
        size = self.size_with(key, value)
        self[key] = value
        self.size = size

    def in_range(self, lo: bytes, hi: bytes | None) -> dict:
        """The buffered writes with ``lo <= key < hi`` (None: no upper bound)."""
        return {k: v for k, v in self.items() if k >= lo and (hi is None or k < hi)}


class TxnBuffer:
    """A transaction's reads, scanned ranges and buffered writes, per shard.

    ``reads``: shard -> {key: revision when first read}; ``ranges``: shard ->
    ``[(lo, hi, [(key, revision)])]``, each a range read with every row it saw
    (``hi`` None: to the end); ``writes``: a ``WriteBuffer``. Keys are checked
    ``bytes`` (``kvstore.keys.check_key``) before they reach it."""

    __slots__ = ("reads", "ranges", "writes")

    def __init__(self, limit: int, limit_name: str) -> None:
        self.reads: dict[int, dict[bytes, int]] = {}
        self.ranges: dict[int, list] = {}
        self.writes = WriteBuffer(limit, limit_name)

    def written(self, key: bytes):
        """The value this transaction wrote at ``key`` (None: it deleted it), or
        ``NOT_WRITTEN``: then a read must ask the engine (and ``record_read``)."""
        return self.writes.get(key, NOT_WRITTEN)

    def record_read(self, shard: int, key: bytes, revision: int) -> None:
        """``key`` read at ``revision``; the first read of a key is the one validated."""
        shard_reads = self.reads.get(shard)
        if shard_reads is None:
            shard_reads = self.reads[shard] = {}
        shard_reads.setdefault(key, revision)

    def put(self, key: bytes, value: bytes) -> None:
        """Buffer a put; past the limit ``InvalidArgument`` and nothing changed."""
        self.writes.write(key, value)

    def check_delete(self, key: bytes) -> None:
        """Raise now if a delete of ``key`` would cross the limit (before it reads anything)."""
        self.writes.size_with(key, None)

    def delete(self, key: bytes) -> None:
        """Buffer a delete; past the limit ``InvalidArgument`` and nothing changed."""
        self.writes.write(key, None)

    def scan(self, prefix, start, end, limit) -> "ScanMerge | None":
        """Start a scan (its arguments checked as ``KV.scan``'s, ``InvalidArgument`` if
        bad), or None if it can answer nothing: ask each shard for ``fetch`` rows of
        ``[lo, hi)``, ``add`` them, then take the ``result``."""
        args = check_scan(prefix, start, end, limit)
        return None if args is None else ScanMerge(self, *args)

    def entry_bytes(self) -> int:
        """About the bytes this transaction adds to a log entry (what it read counts too)."""
        return entry_bytes([r for shard_reads in self.reads.values() for r in shard_reads.items()],
                           [g for shard_ranges in self.ranges.values() for g in shard_ranges],
                           self.writes.items())


class ScanMerge:
    """One scan inside a transaction: the engine's rows of each shard, with this
    transaction's writes laid over them.

    Each shard is asked for ``fetch`` rows of the range (None: all): ``limit`` plus
    one per buffered delete in the range, since each can hide one row. A shard that
    returns exactly ``fetch`` rows may have more: its range is recorded only up to
    just past its last row. The answer needs no cut there: the deletes can hide at
    most ``fetch - limit`` of that shard's rows, so ``limit`` live rows lie below
    the cut and the first ``limit`` results with them.
    """

    __slots__ = ("_buffer", "lo", "hi", "limit", "fetch", "_local", "_merged")

    def __init__(self, buffer: TxnBuffer, lo: bytes, hi: bytes | None, limit: int | None) -> None:
        self._buffer = buffer
        self.lo, self.hi, self.limit = lo, hi, limit
        self._local = buffer.writes.in_range(lo, hi)
        deletes = sum(1 for v in self._local.values() if v is None)
        self.fetch = None if limit is None else limit + deletes
        self._merged: dict[bytes, bytes] = {}

    def add(self, shard: int, rows) -> None:
        """``rows``: ``[(key, value, revision)]`` in key order, at most ``fetch``, as
        ``shard`` holds them at the transaction's read point."""
        covered_hi = self.hi
        if self.fetch is not None and len(rows) == self.fetch:
            covered_hi = rows[-1][0] + b"\x00"  # this shard was read only up to here
        self._buffer.ranges.setdefault(shard, []).append(
            (self.lo, covered_hi, [(k, revision) for k, _v, revision in rows]))
        self._merged.update((k, v) for k, v, _revision in rows)

    def result(self) -> list[tuple[bytes, bytes]]:
        """The ``(key, value)`` rows the scan answers, in key order, at most ``limit``."""
        merged = self._merged
        merged.update(self._local)
        out = [(k, v) for k, v in sorted(merged.items()) if v is not None]
        return out if self.limit is None else out[:self.limit]


def entry_bytes(reads, ranges, writes) -> int:
    """About the bytes a transaction adds to a log entry: ``reads`` ``(key, revision)``,
    ``ranges`` ``(lo, hi, [(key, revision)])``, ``writes`` ``(key, value or None)``."""
    size = 0
    for key, _revision in reads:
        size += len(key) + 9
    for lo, hi, seen in ranges:
        size += len(lo) + len(hi or b"") + sum(len(k) + 9 for k, _ in seen)
    for key, value in writes:
        size += len(key) + len(value or b"") + 2
    return size


class BufferedTxn(Txn):
    """The lifecycle every engine's transaction shares: ``_state`` goes new -> open
    (``with``) -> committed | discarded; a clean exit commits, an exception discards.
    Subclasses hold a ``TxnBuffer`` and give ``commit`` and ``discard``."""

    _state: str = "new"

    def __enter__(self):
        if self._state != "new":
            raise InvalidArgument(f"this transaction is {self._state}; start a new one with "
                                  f"db.transaction()")
        self._state = "open"
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._state != "open":
            return
        if exc_type is not None:
            self.discard()
            return
        self.commit()

    def _check_state(self) -> None:
        """``InvalidArgument`` unless the transaction is open (inside its ``with``)."""
        if self._state == "open":
            return
        if self._state == "new":
            raise InvalidArgument("use the transaction inside 'with db.transaction() as txn:'")
        raise InvalidArgument(f"this transaction is already {self._state}; start a new one")

    @abc.abstractmethod
    def commit(self) -> None:
        """Commit now (the context manager does this on a clean exit)."""

    @abc.abstractmethod
    def discard(self) -> None:
        """Drop every write of this transaction (the context manager does this on an error)."""
