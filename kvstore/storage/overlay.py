"""The in-memory overlay: durable writes the log holds and LMDB does not yet.

DESIGN.md "Storage": the log is the durability point and LMDB is checkpointed
from it off the write path; between checkpoints, reads see every
acknowledged write through this overlay (as etcd's backend read buffer does
over bbolt).

Per shard, the overlay maps a key to its stored value (the exact bytes the
data table will hold: ``state.stored(key, revision, value)``) or ``None``, a
tombstone. It has two generations, newest first:

- ``active``: where each group commit publishes its writes, and only after its
  log append (one ``fdatasync``) returned: a read never sees a write a power
  loss could take back;
- ``frozen``: the generation a checkpoint is writing into LMDB. It is never
  mutated, and it is dropped only after the LMDB commit that holds it is
  durable.

A reader looks at ``active``, then ``frozen``, then LMDB, each strictly after
the previous: data only ever moves down that list (freeze, then checkpoint),
and it is in the next place before it leaves the current one, so a reader
never misses a write that was acknowledged before it started. Scans and
transactions need one snapshot across keys: they take the overlay's items
and open their LMDB read transaction under ``lock``, which freezing and
dropping a generation also take.

``ShardView`` makes (pending writes, generations, an LMDB transaction) look
like an LMDB transaction to ``kvstore.machine.data``'s functions, so the
commit path applies commands with the same code a cluster node uses.
"""

from __future__ import annotations

import heapq
import threading
from typing import Iterable, Iterator, Sequence

#: Returned by ``lookup`` when no generation holds the key (read LMDB).
MISSING = object()
#: Bytes an overlay entry costs besides its key and stored value (dict slot, tuple, objects).
ENTRY_OVERHEAD = 100


def entry_bytes(key: bytes, raw: bytes | None) -> int:
    """What one overlay entry costs in memory, about (the checkpoint's byte bound)."""
    return len(key) + (0 if raw is None else len(raw)) + ENTRY_OVERHEAD


class Overlay:
    """Generations of durable writes beyond the last checkpoint, for ``nshards`` shards.

    ``position`` is the log position just past the last group published;
    ``applied[shard]`` the slot of the shard's last entry published. Both move
    with ``publish`` under ``lock``, so a freeze captures a generation with
    exactly the log position and slots it covers.
    """

    def __init__(self, nshards: int, applied: Sequence[int], position: int) -> None:
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)  # notified on drop, big publishes
        self.active: list[dict] = [{} for _ in range(nshards)]
        self.frozen: list[dict] | None = None
        self.active_bytes = 0
        self.frozen_bytes = 0
        self.applied = list(applied)
        self.position = position
        self.frozen_position = position
        self.frozen_applied = list(applied)
        #: A publish since the last freeze wrote something: there is something to checkpoint
        #: even if the log's position did not move (a save that appended nothing).
        self.unfrozen_writes = False
        self.wake_bytes = 0  # from this active size on, a publish wakes ``changed``'s waiters

    # -- writing (the group-commit leader, one at a time) ---------------------------------

    def publish(self, writes: dict, slots: Iterable[tuple[int, int]], position: int) -> None:
        """Make ``writes`` ({shard: {key: raw or None}}), now durable in the log, visible."""
        with self.lock:
            active = self.active
            added = 0
            for shard, shard_writes in writes.items():
                level = active[shard]
                get = level.get
                for key, raw in shard_writes.items():
                    old = get(key, MISSING)
                    size = 0 if raw is None else len(raw)
                    if old is MISSING:  # entry_bytes, inline: once per write
                        added += len(key) + size + ENTRY_OVERHEAD
                    else:
                        added += size - (0 if old is None else len(old))
                level.update(shard_writes)
            for shard, slot in slots:
                self.applied[shard] = slot
            self.position = position
            self.unfrozen_writes = self.unfrozen_writes or bool(writes)
            self.active_bytes += added
            if self.active_bytes >= self.wake_bytes:
                self.changed.notify_all()  # a checkpoint is due (waking it per write costs
                # a thread switch on the write path; it wakes on its timer otherwise)

    # -- checkpointing --------------------------------------------------------------------

    def freeze(self) -> bool:
        """Turn ``active`` into ``frozen`` (there must be none); False if nothing to freeze.

        ``frozen`` is set before ``active`` is replaced, so a reader that finds
        the new, empty ``active`` then finds the writes in ``frozen``.
        """
        with self.lock:
            assert self.frozen is None
            if not self.has_news():
                return False
            self.frozen = self.active
            self.unfrozen_writes = False
            self.frozen_bytes = self.active_bytes
            self.frozen_position = self.position
            self.frozen_applied = list(self.applied)
            self.active = [{} for _ in self.frozen]
            self.active_bytes = 0
            return True

    def has_news(self) -> bool:
        """Something was published since the last freeze."""
        return self.position != self.frozen_position or self.unfrozen_writes

    def drop_frozen(self) -> None:
        """The frozen generation is durable in LMDB: readers find it there from now on."""
        with self.lock:
            self.frozen = None
            self.frozen_bytes = 0
            self.changed.notify_all()

    @property
    def bytes(self) -> int:
        return self.active_bytes + self.frozen_bytes

    # -- reading ------------------------------------------------------------------------

    def levels(self, shard: int) -> list[dict]:
        """The shard's generations, newest first (take under ``lock`` for a snapshot)."""
        frozen = self.frozen
        active = self.active[shard]
        return [active] if frozen is None else [active, frozen[shard]]

    def snapshot_levels(self) -> list[list[dict]]:
        """Per shard, generations that no writer mutates (``active`` copied); under ``lock``."""
        frozen = self.frozen
        return [[dict(a)] if frozen is None else [dict(a), frozen[s]]
                for s, a in enumerate(self.active)]


def lookup(levels: Sequence[dict], key: bytes):
    """The newest raw value (or ``None``, a tombstone) of ``key``, else ``MISSING``."""
    for level in levels:
        raw = level.get(key, MISSING)
        if raw is not MISSING:
            return raw
    return MISSING


def items_in_range(levels: Sequence[dict], lo: bytes, hi: bytes | None) -> list:
    """Sorted ``(key, raw or None)`` of the generations in ``[lo, hi)``, newest wins."""
    merged: dict = {}
    for level in reversed(levels):  # oldest first: newer ones overwrite
        if hi is None:
            merged.update((k, v) for k, v in level.items() if k >= lo)
        else:
            merged.update((k, v) for k, v in level.items() if lo <= k < hi)
    return sorted(merged.items())


def merge_rows(overlay_items: list, rows: Iterable, limit: int | None = None) -> Iterator:
    """``(key, raw)`` rows of LMDB (key order) with ``overlay_items`` laid over them.

    An overlay tombstone hides the row; an overlay value replaces it. Stops
    after ``limit`` rows (None: all).
    """
    if limit == 0:
        return
    count = 0
    tagged_over = ((k, 0, raw) for k, raw in overlay_items)
    tagged_rows = ((k if type(k) is bytes else bytes(k), 1, raw) for k, raw in rows)
    last = None
    for key, source, raw in heapq.merge(tagged_over, tagged_rows, key=lambda t: (t[0], t[1])):
        if key == last:  # the overlay's entry came first and wins
            continue
        last = key
        if raw is None:
            continue
        yield key, raw
        count += 1
        if limit is not None and count >= limit:
            return


class _MergedCursor:
    """The part of an LMDB cursor ``state.scan_rows`` uses, over a ``ShardView``."""

    def __init__(self, view: "ShardView") -> None:
        self._view = view
        self._lo = b""

    def set_range(self, lo: bytes) -> bool:
        self._lo = bytes(lo)
        return True

    def iternext(self) -> Iterator:
        view = self._view
        cursor = view.txn.cursor(view.db)
        try:
            rows = cursor.iternext() if cursor.set_range(self._lo) else iter(())
            yield from merge_rows(items_in_range(view.levels, self._lo, None), rows)
        finally:
            cursor.close()

    def close(self) -> None:
        pass


class LazyRead:
    """The part of an LMDB read transaction ``ShardView`` uses, begun on first use:
    most batches are blind puts that never read LMDB. ``txn`` is None until then."""

    __slots__ = ("_begin", "txn")

    def __init__(self, begin) -> None:
        self._begin = begin
        self.txn = None

    def get(self, key: bytes, default=None, db=None):
        txn = self.txn
        if txn is None:
            txn = self.txn = self._begin()
        return txn.get(key, default, db)

    def cursor(self, db=None):
        if self.txn is None:
            self.txn = self._begin()
        return self.txn.cursor(db)


class ShardView:
    """One shard's state as ``kvstore.machine.data`` sees an LMDB transaction.

    Reads go through ``levels`` (newest first: the batch's own pending
    writes, then the overlay's generations) to ``txn``; writes land in
    ``levels[0]``, the batch's pending dict, published only once durable.
    """

    __slots__ = ("levels", "txn", "db")

    def __init__(self, levels: list[dict], txn, db) -> None:
        self.levels = levels
        self.txn = txn
        self.db = db

    def get(self, key: bytes, default=None, db=None):
        raw = lookup(self.levels, key)
        if raw is MISSING:
            raw = self.txn.get(key, None, self.db)
        return default if raw is None else raw

    def put(self, key: bytes, value: bytes, db=None) -> bool:
        self.levels[0][key] = value
        return True

    def delete(self, key: bytes, db=None) -> bool:
        existed = self.get(key) is not None
        if existed:
            self.levels[0][key] = None
        return existed

    def cursor(self, db=None) -> _MergedCursor:
        return _MergedCursor(self)


__all__ = ["Overlay", "ShardView", "LazyRead", "MISSING", "lookup", "items_in_range", "merge_rows",
           "entry_bytes"]
