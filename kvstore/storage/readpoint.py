"""A read point: one consistent view of a data directory's tables, held open to be paged.

A backup reads a whole store while writers go on. What it reads must be one
state: the overlay's generations (``kvstore.storage.overlay``: what the log holds
beyond the last checkpoint) and one LMDB read transaction, taken together under
the overlay's lock, exactly as a scan or an embedded transaction takes its
snapshot. The active generation is copied (writers keep publishing into the
original); the frozen one is never mutated, and keeping a reference keeps it
readable after the checkpoint drops it (LMDB then holds the same rows, but this
read transaction predates that commit, so the reference is what shows them).

``page`` returns the rows of one table after a key, bounded in bytes, so that a
caller that streams them (a node answering a backup client, page by page) holds
one page at a time. The read transaction pins LMDB's pages for as long as the
point is open (the file grows meanwhile, as with any long reader): close it.
"""

from __future__ import annotations

import bisect
from typing import Callable, Sequence

from kvstore.storage.overlay import ShardView, items_in_range, merge_rows


class ReadPoint:
    """Overlay generations (copied) and one LMDB read transaction, taken together.

    ``levels``: per overlay index, its generations newest first (``None``: no
    overlay, LMDB alone, as for a store another process owns). ``release(txn)``
    ends the read transaction (``Storage.end_read``).
    """

    def __init__(self, txn, levels: Sequence[list] | None, release: Callable[[object], None],
                 applied: Sequence[int] = (), position: int = 0) -> None:
        self.txn = txn
        self.levels = levels
        self.applied = list(applied)  # the overlay's applied slots at the point
        self.position = position  # the log position the point stands for
        self._release = release
        self._sorted: dict = {}  # overlay index -> sorted (key, raw or None) of its levels

    @classmethod
    def capture(cls, storage, overlay) -> "ReadPoint":
        """The point now: ``overlay``'s generations and a read transaction of ``storage``
        (a ``kvstore.storage.Storage``), under the overlay's lock (one state)."""
        with overlay.lock:
            levels = overlay.snapshot_levels()
            applied, position = list(overlay.applied), overlay.position
            txn = storage.begin_read(False)
        return cls(txn, levels, storage.end_read, applied, position)

    def close(self) -> None:
        txn, self.txn = self.txn, None
        self._sorted.clear()
        if txn is not None:
            self._release(txn)

    @property
    def closed(self) -> bool:
        return self.txn is None

    def view(self, index: int | None, db) -> ShardView:
        """Table ``db`` (overlay index ``index``) as an LMDB transaction reads it."""
        return ShardView(self._levels(index), self.txn, db)

    def _levels(self, index: int | None) -> list:
        if self.levels is None or index is None:
            return []
        return list(self.levels[index])

    def _overlay_items(self, index: int | None) -> list:
        items = self._sorted.get(index)
        if items is None:
            items = self._sorted[index] = items_in_range(self._levels(index), b"", None)
        return items

    def page(self, index: int | None, db, after: bytes | None, max_bytes: int,
             ranges: Sequence[tuple[bytes, bytes | None]] = ((b"", None),)) -> tuple[list, bool]:
        """Rows ``(key, value)`` of table ``db`` with a key past ``after`` (None: from the
        start) inside ``ranges`` (sorted, disjoint ``[lo, hi)``), at least one and about
        ``max_bytes`` in all; and whether they are the last ones."""
        rows: list = []
        size = 0
        for lo, hi in ranges:
            if after is not None:
                if hi is not None and after >= hi:
                    continue
                lo = max(lo, after + b"\x00")
            if size >= max_bytes:
                return rows, False
            for key, raw in self._merged(index, db, lo, hi):
                rows.append((key, raw))
                size += len(key) + len(raw) + 8
                if size >= max_bytes:
                    return rows, self._last(index, db, key, hi, ranges)
        return rows, True

    def _merged(self, index: int | None, db, lo: bytes, hi: bytes | None):
        over = self._overlay_items(index)
        first = bisect.bisect_left(over, (lo,))
        last = len(over) if hi is None else bisect.bisect_left(over, (hi,))
        cursor = self.txn.cursor(db)
        try:
            rows = cursor.iternext() if cursor.set_range(lo) else iter(())
            if hi is not None:
                rows = _until(rows, hi)
            yield from merge_rows(over[first:last], rows)
        finally:
            cursor.close()

    def _last(self, index, db, key: bytes, hi: bytes | None, ranges) -> bool:
        """Whether nothing in ``ranges`` lies past ``key``."""
        for lo, range_hi in ranges:
            if range_hi is not None and key >= range_hi:
                continue
            start = max(lo, key + b"\x00")
            for _row in self._merged(index, db, start, range_hi):
                return False
        return True


def _until(rows, hi: bytes):
    for key, raw in rows:
        if key >= hi:
            return
        yield key, raw


__all__ = ["ReadPoint"]


# -- a store another process owns ---------------------------------------------------------------

def directory_in_use(path: str) -> bool:
    """Whether a process holds the store at ``path`` open (its directory's flock,
    ``Storage._lock_directory``). Probed, then released at once."""
    import errno
    import fcntl
    import os
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return True
        raise
    finally:
        os.close(fd)  # releases the probe's lock
    return False


def open_checkpoint(path: str) -> tuple["ReadPoint", list, list]:
    """A read point at the last checkpoint of the store at ``path`` that another process
    owns and writes: LMDB opened read-only beside it (LMDB's readers need no lock but
    its reader table) and one read transaction over every shard's tables. The
    checkpoint is one LMDB commit of every shard's state at one log position, so the
    point is one state of the whole store; it lacks what the owner's log holds
    beyond that checkpoint (its overlay lives in its memory).

    Returns ``(point, tables, applied)``: per shard its ``ShardTables`` and the applied
    slot the checkpoint recorded. ``StorageError`` if it is no store."""
    import lmdb
    import msgpack

    from kvstore.errors import StorageError
    from kvstore.storage.environment import (MAX_READERS, META_APPLIED, TABLES_PER_SHARD,
                                             ShardTables, translate, unpack_u64)
    env = None
    try:
        env = lmdb.open(path, readonly=True, lock=True, subdir=True, max_readers=MAX_READERS,
                        max_dbs=TABLES_PER_SHARD * 256 + 1, readahead=False)
        txn = env.begin()
        fmt = msgpack.unpackb(txn.get(b"format", db=env.open_db(b"kvstore", txn=txn,
                                                                create=False)))
        nshards = fmt["shards"]
        tables = [ShardTables(*(env.open_db(f"s{i}.{t}".encode(), txn=txn, create=False)
                                for t in ("log", "meta", "data", "txn")))
                  for i in range(nshards)]
        applied = [unpack_u64(txn.get(META_APPLIED, db=t.meta)) for t in tables]
    except (lmdb.Error, OSError, KeyError, TypeError, ValueError) as e:
        if env is not None:
            env.close()
        if isinstance(e, (KeyError, TypeError, ValueError)):
            raise StorageError(f"{path} holds no readable kvstore format record ({e})",
                               path) from e
        raise translate(e, path, "opening the store read-only for a backup") from e

    def release(t) -> None:
        t.abort()
        env.close()

    return ReadPoint(txn, None, release, applied), tables, applied
