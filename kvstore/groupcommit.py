"""Group commit: concurrent writers share one durable commit.

A writer that finds nobody committing becomes the leader: it takes every
request queued so far, commits them in one transaction (one fsync), answers
them, and hands leadership to the first request that queued meanwhile. A lone
writer therefore pays no thread hand-off at all, and N concurrent writers pay
about one fsync per batch instead of N. Each thread leads at most one batch,
so nobody is stuck committing for others forever.

Without more, batches alternate between one and N-1: the writers answered by
a commit come back one at a time, and the first finds nobody committing. So a
leader whose previous batch held several writers lingers (at most
``LINGER_SECONDS``, far less than an fsync) until as many have queued again, as
MySQL's binlog group commit and Kafka's ``linger.ms`` do. A lone writer never
lingers.
"""

from __future__ import annotations

import threading
from typing import Callable, Sequence

#: Requests taken into one commit at most; a bound keeps one commit's latency bounded.
MAX_BATCH = 4096
_allocate_lock = threading.Lock
#: The longest a leader waits for the writers of its previous batch to come back.
LINGER_SECONDS = 0.0002


class Request:
    """One writer's request and, once committed, its outcome."""

    __slots__ = ("payload", "result", "error", "done", "wakeup")

    def __init__(self, payload: object) -> None:
        self.payload = payload
        self.result: object = None
        self.error: BaseException | None = None
        self.done = False
        # A lock held from queueing until the request is answered or handed
        # leadership: a bare lock is the cheapest one-shot wake-up CPython has.
        self.wakeup: threading.Lock | None = None

    def outcome(self) -> object:
        if self.error is not None:
            raise self.error
        return self.result


class GroupCommitter:
    """Serialises commits; ``commit_batch(requests)`` sets each request's result or error."""

    def __init__(self, commit_batch: Callable[[Sequence[Request]], None],
                 linger_seconds: float = LINGER_SECONDS) -> None:
        self._commit_batch = commit_batch
        self._linger_seconds = linger_seconds
        self._cond = threading.Condition(threading.Lock())
        self._queue: list[Request] = []
        self._busy = False
        self._last_batch = 1
        self._wake_at = MAX_BATCH  # queue length at which a lingering leader wakes
        self.commits = 0  # batches committed (or failed), for tests and status

    def submit(self, request: Request) -> object:
        """Commit ``request`` (alone or with others); its result, or raise its error."""
        cond = self._cond
        with cond:
            if self._busy:
                request.wakeup = _allocate_lock()
                request.wakeup.acquire()
                self._queue.append(request)
                if len(self._queue) >= self._wake_at:
                    cond.notify()
                leader = False
            else:
                self._busy = True
                leader = True
        if not leader:
            request.wakeup.acquire()  # released by the leader that answers us
            if request.done:
                return request.outcome()
            # Handed leadership: our request was taken off the queue for us to commit.
        with cond:
            expected = min(self._last_batch - 1, MAX_BATCH - 1)
            if len(self._queue) < expected and self._linger_seconds > 0:
                self._wake_at = expected
                cond.wait(self._linger_seconds)
                self._wake_at = MAX_BATCH
            take = MAX_BATCH - 1
            batch = [request]
            batch.extend(self._queue[:take])
            del self._queue[:take]
        self._last_batch = len(batch)
        try:
            self._commit_batch(batch)
        except BaseException as e:  # the whole commit failed: every request learns why
            for r in batch:
                if not r.done:
                    r.error = e
        finally:
            self.commits += 1
            for r in batch:
                r.done = True
                if r is not request:
                    r.wakeup.release()
            with cond:
                if self._queue:
                    self._queue.pop(0).wakeup.release()  # not done: it leads the next batch
                else:
                    self._busy = False
        return request.outcome()
