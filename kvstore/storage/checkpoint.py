"""Checkpoints: the overlay's frozen generation into LMDB, off the write path.

One checkpoint is one synced LMDB write transaction holding a frozen
generation's writes and, per shard, the slot and the log position it covers
(``META_APPLIED``, ``META_COMMIT``, ``META_LOG_POSITION``): the state and the
point of the log it stands for move together (safety rule 4). LMDB is never
committed unsynced: a power loss in the middle of an unsynced commit can
corrupt it, so the durable LMDB state only moves by synced commits, while the
log carries durability between them.

The background thread (``Checkpointer``) runs a checkpoint every
``interval`` seconds, or sooner once the active generation holds
``trigger_bytes``. Writers never wait for a checkpoint unless the overlay
holds ``limit_bytes`` (bounded memory); then they wait for the frozen
generation to reach LMDB. Applying a generation yields the GIL every few
hundred rows, so the group-commit leader is not held behind it longer than a
GIL switch.
"""

from __future__ import annotations

import threading
import time
import weakref
from typing import Callable, Sequence

from kvstore.errors import StorageError
from kvstore.ops.histogram import CHECKPOINT_BUCKETS, Histogram
from kvstore.storage.environment import (META_APPLIED, META_COMMIT, META_LOG_CLOSED,
                                         META_LOG_POSITION, ShardTables, pack_u64)
from kvstore.storage.overlay import Overlay

#: Rows applied between two GIL yields while writing a generation into LMDB.
YIELD_EVERY = 64


def write_generation(txn, tables: Sequence[ShardTables], frozen: Sequence[dict],
                     applied: Sequence[int], position: int, closing: bool = False,
                     yield_gil: bool = True) -> int:
    """Write a frozen generation and the point it covers into LMDB ``txn``; rows written.

    ``closing``: the last checkpoint of a clean close, which covers the whole
    log; recorded so that a log lost after it (``META_LOG_CLOSED``) loses
    nothing, and can be started afresh.

    Idempotent: ``Storage.write`` may run it again on a fresh transaction
    after growing the map.
    """
    rows = 0
    for shard, level in enumerate(frozen):
        db = tables[shard].data
        # Not sorted first: sorting a second's writes is one C call holding the GIL for
        # milliseconds (a writer stall). Chunks of YIELD_EVERY rows, the GIL let go
        # between two, keep a writer's wait for it near 0.1 ms.
        items = list(level.items())
        cursor = txn.cursor(db)
        try:
            for first in range(0, len(items), YIELD_EVERY):
                chunk = items[first:first + YIELD_EVERY]
                cursor.putmulti([(k, raw) for k, raw in chunk if raw is not None])
                for k, raw in chunk:
                    if raw is None:
                        txn.delete(k, db=db)
                rows += len(chunk)
                if yield_gil:
                    time.sleep(0)  # let the group-commit leader and the writers run
        finally:
            cursor.close()
    for shard, t in enumerate(tables):
        slot = pack_u64(applied[shard])
        txn.put(META_APPLIED, slot, db=t.meta)
        txn.put(META_COMMIT, slot, db=t.meta)
        txn.put(META_LOG_POSITION, pack_u64(position), db=t.meta)
        txn.put(META_LOG_CLOSED, pack_u64(position if closing else 0), db=t.meta)
    return rows


class Checkpointer:
    """Moves the overlay into LMDB: in a background thread, or now (``checkpoint``)."""

    def __init__(self, overlay: Overlay, write: Callable[[Callable], int],
                 tables: Sequence[ShardTables], after: Callable[[int], None],
                 interval: float, trigger_bytes: int, limit_bytes: int,
                 path: str | None = None, yield_gil: bool = True) -> None:
        self._overlay = overlay
        self._write = write  # Storage.write: one synced LMDB commit
        self._tables = tables
        self._after = after  # called with the position a checkpoint made durable
        self._path = path  # named by the errors of this layer
        self._yield_gil = yield_gil  # False: no other thread to let run (the simulator)
        self.interval = interval
        self.trigger_bytes = trigger_bytes
        overlay.wake_bytes = trigger_bytes  # a publish past it wakes the thread at once
        self.limit_bytes = limit_bytes
        self._round = threading.Lock()  # one checkpoint at a time
        self._stop = False
        self._thread: threading.Thread | None = None
        self.error: StorageError | None = None  # the last checkpoint's, until one succeeds
        self.checkpoints = 0
        self.last_seconds = 0.0
        self.latency = Histogram(CHECKPOINT_BUCKETS)  # seconds per checkpoint (one writer)
        self._since = time.monotonic()  # when the thread's last round started

    def start(self) -> None:
        """Start the background thread. It holds this object only weakly between
        rounds: a store dropped without ``close()`` is still collected (and its
        directory released), and the thread then ends."""
        self._thread = threading.Thread(target=_run, name="kvstore-checkpoint", daemon=True,
                                        args=(weakref.ref(self), self._overlay.changed))
        self._thread.start()
        weakref.finalize(self, _wake, self._overlay.lock, self._overlay.changed)

    def stop(self) -> None:
        """End the thread (after the checkpoint under way, if any)."""
        with self._overlay.lock:  # changed's lock (not ``with changed``: kvstore.storage.wakeups)
            self._stop = True
            self._overlay.changed.notify_all()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def holding(self) -> threading.Lock:
        """A context manager during which no checkpoint runs (nor deletes log segments)."""
        return self._round

    def checkpoint(self, closing: bool = False) -> bool:
        """Checkpoint everything published so far; False if there was nothing new.

        A generation a failed round left frozen goes first, then the active one:
        when this returns, LMDB holds every write published before the call.
        ``closing``: no write follows (a clean close): said in LMDB, even when
        there is nothing new.
        """
        with self._round:
            ov = self._overlay
            wrote = False
            if ov.frozen is not None:  # a failed round's generation: retried first
                self._write_frozen(False)
                wrote = True
            if ov.freeze() or closing:
                self._write_frozen(closing)
                wrote = True
            return wrote

    def _write_frozen(self, closing: bool) -> None:
        """One synced LMDB commit of the frozen generation (none: the point alone)."""
        ov = self._overlay
        frozen, applied, position = ov.frozen or (), ov.frozen_applied, ov.frozen_position
        started = time.perf_counter()
        try:
            self._write(lambda txn: write_generation(txn, self._tables, frozen, applied,
                                                     position, closing, self._yield_gil))
        except StorageError as e:
            with ov.lock:  # changed's lock
                self.error = e  # the frozen generation stays; the next round retries it
                ov.changed.notify_all()
            raise
        ov.drop_frozen()
        self.error = None
        self.checkpoints += 1
        self.last_seconds = time.perf_counter() - started
        self.latency.observe(self.last_seconds)
        self._after(position)

    def wait_for_room(self) -> None:
        """Block a writer while the overlay is over its bound (bounded memory).

        Raises the checkpoint's ``StorageError`` if checkpoints fail meanwhile
        (a full disk): a writer is told, never left hanging.
        """
        ov = self._overlay
        if ov.active_bytes + ov.frozen_bytes < self.limit_bytes:
            return
        with ov.changed:
            while ov.active_bytes + ov.frozen_bytes >= self.limit_bytes:
                if self.error is not None:
                    raise self.error
                if self._stop:
                    return
                ov.changed.notify_all()  # wake the checkpoint thread
                ov.changed.wait(1.0)

    def _due(self, since: float) -> bool:
        ov = self._overlay
        if ov.frozen is not None:  # a failed round's generation waits for its retry
            return time.monotonic() - since >= self.interval
        if not ov.has_news():
            return False
        return (ov.active_bytes >= self.trigger_bytes
                or ov.active_bytes + ov.frozen_bytes >= self.limit_bytes
                or time.monotonic() - since >= self.interval)

    def _round_in_thread(self) -> float | None:
        """The thread's step: a checkpoint if one is due; else how long to wait
        (None: stop)."""
        if self._stop:
            return None
        if not self._due(self._since):  # looks again at least every second
            return min(1.0, max(0.001, self.interval - (time.monotonic() - self._since)))
        self._since = time.monotonic()
        try:
            self.checkpoint()
        except StorageError:
            pass  # kept in self.error for writers; retried after the interval
        except BaseException as e:  # never a traceback from a worker thread
            with self._overlay.changed:
                self.error = StorageError(f"a checkpoint of {self._path} failed: "
                                          f"{type(e).__name__}: {e}", self._path)
                self._overlay.changed.notify_all()
        return 0.0


def _run(ref, changed: threading.Condition) -> None:
    """The checkpoint thread: holds its ``Checkpointer`` only while it works."""
    while True:
        checkpointer = ref()
        if checkpointer is None:
            return
        wait = checkpointer._round_in_thread()
        checkpointer = None
        if wait is None:
            return
        if wait > 0:
            with changed:  # woken by a publish, a drop or stop()
                changed.wait(wait)


def _wake(lock: threading.Lock, changed: threading.Condition) -> None:
    with lock:  # changed's; not ``with changed`` (kvstore.storage.wakeups): any thread runs this
        changed.notify_all()


__all__ = ["Checkpointer", "write_generation", "YIELD_EVERY"]
