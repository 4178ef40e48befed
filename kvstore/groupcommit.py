"""Group commit: concurrent writers share one durable commit.

A writer that finds nobody committing becomes the leader: it takes every
request queued so far, commits them in one transaction (one fsync), answers
them, and hands leadership to the first request that queued meanwhile. A lone
writer therefore pays no thread hand-off at all, and N concurrent writers pay
about one fsync per batch instead of N. Each thread leads at most one batch,
so nobody is stuck committing for others forever.
"""

from __future__ import annotations

import threading
from typing import Callable, Sequence

#: Requests taken into one commit at most; a bound keeps one commit's latency bounded.
MAX_BATCH = 4096


class Request:
    """One writer's request and, once committed, its outcome."""

    __slots__ = ("payload", "result", "error", "done", "lead", "event")

    def __init__(self, payload: object) -> None:
        self.payload = payload
        self.result: object = None
        self.error: BaseException | None = None
        self.done = False
        self.lead = False
        self.event: threading.Event | None = None

    def outcome(self) -> object:
        if self.error is not None:
            raise self.error
        return self.result


class GroupCommitter:
    """Serialises commits; ``commit_batch(requests)`` sets each request's result or error."""

    def __init__(self, commit_batch: Callable[[Sequence[Request]], None]) -> None:
        self._commit_batch = commit_batch
        self._lock = threading.Lock()
        self._queue: list[Request] = []
        self._busy = False

    def submit(self, request: Request) -> object:
        """Commit ``request`` (alone or with others); its result, or raise its error."""
        with self._lock:
            if self._busy:
                request.event = threading.Event()
                self._queue.append(request)
                leader = False
            else:
                self._busy = True
                leader = True
        if not leader:
            request.event.wait()
            if request.done:
                return request.outcome()
            # Handed leadership: our request was taken off the queue for us to commit.
        with self._lock:
            batch = [request]
            take = MAX_BATCH - 1
            batch.extend(self._queue[:take])
            del self._queue[:take]
        try:
            self._commit_batch(batch)
        except BaseException as e:  # the whole commit failed: every request learns why
            for r in batch:
                if not r.done:
                    r.error, r.done = e, True
        finally:
            for r in batch:
                r.done = True
                if r.event is not None and r is not request:
                    r.event.set()
            with self._lock:
                if self._queue:
                    nxt = self._queue.pop(0)
                    nxt.lead = True
                    nxt.event.set()
                else:
                    self._busy = False
        return request.outcome()
