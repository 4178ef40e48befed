"""Watch on the cluster clients: ``db.watch(...)`` on ``kvstore.connect`` and ``kvstore.aio``.

A watch long-polls ``OP_WATCH`` (docs/watch.md: any node answers from its own
history) on every shard it concerns, one outstanding poll per shard, and keeps
per shard the next revision to ask for. Every poll names that position, so a poll
is idempotent: the engine (``kvstore.client.core``) may send it to another node
after a timeout or a dropped connection (a SIGKILLed leader, a restart, a
reconnect) and whichever answer comes first is the right one. Revisions below the
position are never delivered again, a node that lags simply parks the poll until
it catches up: exactly once, in order, per shard.

- ``WatchPoller`` is the polling, shared by the user's ``Watch`` and the coherent
  cache (``kvstore.client.cache``): "from now" (the commit point in a node's
  status), routing by the engine (the shard's leader first, learned from answers
  marked ``current``; then any node), "compacted" answers (the other nodes are
  asked one by one; ``kvstore.Compacted`` only when none has the revision), a
  resumed poll after ``os.fork()``.
- ``Watch`` (sync) buffers ONE reply's events per shard and polls that shard
  again only once its consumer took them all: the client's memory is bounded by
  ``max_bytes`` per shard, and a slow consumer just polls later (the node holds
  nothing for it). ``AsyncWatch`` is the same buffer awaited on an event loop.

``position`` is ``{shard: next revision to deliver}``; ``start_revision=position``
resumes in another process. A revision whose events were taken in part is
delivered again whole from such a position (its events share one revision).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import weakref
from collections import deque

from kvstore.client.core import ATTEMPT_SECONDS, AuthenticationFailed, renew_locks_after_fork
from kvstore.client.requests import shard_for
from kvstore.errors import Compacted, KVError, Timeout, Unavailable
from kvstore.events import check_start_revision, events_of, watch_range
from kvstore.transport import wire

OP_WATCH = wire.OP_WATCH
#: How long a node parks a user watch's poll with nothing to report. A node that
#: stops answering (SIGSTOP) is left after this plus ``ATTEMPT_SECONDS``.
POLL_WAIT_MS = 2_000
#: Bytes of events one poll asks for (a reply holds at least one revision).
POLL_MAX_BYTES = 1 << 20


def start_positions(start_revision, shards: list) -> dict:
    """``{shard: first revision}`` (None: from now) of ``start_revision``: None, an
    int for every shard, or a ``{shard: revision}`` dict (``Watch.position``)."""
    start = check_start_revision(start_revision, shards)
    return {s: (None if start is None else start[s]) for s in shards}


class _Cursor:
    """One shard's polling state (under ``WatchPoller._lock``)."""
    __slots__ = ("shard", "next_from", "token", "polling", "target", "candidates", "oldest",
                 "eager")

    def __init__(self, shard: int, next_from) -> None:
        self.shard = shard
        self.next_from = next_from  # next revision to ask for; None: "from now" unresolved
        self.token = 0  # the outstanding poll's number: a late answer to an older one is dropped
        self.polling = False  # a poll is outstanding
        self.target = None  # None: the engine routes; an address while asking after "compacted"
        self.candidates: list = []  # nodes still to ask after a "compacted" answer
        self.oldest: list = []  # the oldest revisions the nodes that said "compacted" keep
        self.eager = True  # the first poll waits for nothing: a node's word on it at once


class WatchPoller:
    """Long-polls ``OP_WATCH`` for ``[lo, hi)`` on ``shards`` and hands each reply to
    ``sink.delivered(shard, events, next_from, current, sent_at) -> bool`` (True:
    poll again now; False: the sink calls ``resume(shard)`` once its consumer took
    the events) or an error that ends the watch to ``sink.failed(error)``."""

    def __init__(self, core, shards: list, lo: bytes, hi, prev: bool, start: dict, sink,
                 wait_ms: int = POLL_WAIT_MS, max_bytes: int = POLL_MAX_BYTES) -> None:
        self._core = core
        self._lo, self._hi, self._prev = lo, hi, bool(prev)
        self._sink = weakref.ref(sink)  # a watch its user dropped stops polling
        self._wait_ms, self._max_bytes = int(wait_ms), int(max_bytes)
        self._cursors = {s: _Cursor(s, start.get(s)) for s in shards}
        self._lock = threading.Lock()
        self._closed = False
        self._pid = os.getpid()
        renew_locks_after_fork(self)

    def _renew_locks(self) -> None:
        self._lock = threading.Lock()

    def start(self) -> None:
        """Learn where the shards watched "from now" stand, then poll every shard."""
        if any(c.next_from is None for c in self._cursors.values()):
            self._resolve()
        else:
            for s in self._cursors:
                self.resume(s)

    def _resolve(self) -> None:
        """"From now" is the revision after each shard's commit point: one ``OP_STATUS``
        (to the first such shard's leader if known: its commit point is the latest),
        whose ``commit_index`` is a slot (revision ``commit_index + 1``)."""
        core = self._core
        first = next(c.shard for c in self._cursors.values() if c.next_from is None)
        leader = core.leaders.get(first)
        target = core.nodes[leader] if leader is not None and leader < len(core.nodes) else None
        try:
            future = core.submit(wire.OP_STATUS, first, [], target=target)
        except KVError as e:  # the connection is closed
            self._end(e)
            return
        future.add_done_callback(self._resolved)

    def _resolved(self, future) -> None:
        error = future.exception()
        if error is not None:
            if isinstance(error, Unavailable) and not isinstance(error, AuthenticationFailed):
                if not self._closed:
                    self._resolve()  # the engine tried every node it could: again
                return
            self._end(error)
            return
        shards = future.result()["shards"]
        now = []
        with self._lock:
            for c in self._cursors.values():
                if c.next_from is None and not self._closed:
                    c.next_from = shards[c.shard]["commit_index"] + 2
                    now.append(c)
        for c in now:
            if self._deliver(c.shard, [], c.next_from, False, 0.0):
                self.resume(c.shard)

    def close(self) -> None:
        """No more polls; an answer still on its way is dropped."""
        with self._lock:
            self._closed = True

    def resume(self, shard: int) -> None:
        """Poll ``shard`` (its consumer took the previous reply's events)."""
        with self._lock:
            request = self._next_poll(self._cursors[shard])
        self._submit(request)

    def check_fork(self) -> None:
        """In a child after ``os.fork()``: the parent's outstanding polls are answered
        to the parent; ask again from the same positions."""
        if self._pid == os.getpid():
            return
        with self._lock:
            if self._pid == os.getpid():
                return
            self._pid = os.getpid()
            requests = [self._next_poll(c) for c in self._cursors.values() if c.polling]
            unresolved = any(c.next_from is None for c in self._cursors.values())
        for r in requests:
            self._submit(r)
        if unresolved:
            self._resolve()

    # -- under the lock: what to send ---------------------------------------------------
    def _next_poll(self, c: _Cursor):
        if self._closed:
            return None
        c.token += 1
        c.polling = True
        wait_ms = 0 if c.eager else self._wait_ms
        c.eager = False
        args = [c.shard, self._lo, self._hi, c.next_from, self._max_bytes, wait_ms, self._prev]
        return c, c.token, args, c.target, wait_ms / 1000.0

    def _submit(self, request) -> None:
        if request is None:
            return
        c, token, args, target, wait = request
        sent_at = time.monotonic()
        try:
            future = self._core.submit(OP_WATCH, c.shard, args, timeout=wait + self._core.timeout,
                                       target=target, attempt=wait + ATTEMPT_SECONDS)
        except KVError as e:  # the connection is closed
            self._end(e)
            return
        future.add_done_callback(lambda f: self._answered(c, token, f, sent_at))

    # -- an answer (on the engine's I/O thread) -------------------------------------------
    def _answered(self, c: _Cursor, token: int, future, sent_at: float) -> None:
        error = future.exception()
        with self._lock:
            if self._closed or token != c.token:
                return
            c.polling = False
            if error is not None:
                outcome = self._on_failure(c, error)
            else:
                outcome = self._on_reply(c, future.result())
        kind, what = outcome
        if kind == "poll":
            self._submit(what)
        elif kind == "fail":
            self._end(what)
        else:
            events, current = what
            if self._deliver(c.shard, events, c.next_from, current, sent_at):
                self.resume(c.shard)

    def _on_failure(self, c: _Cursor, error: BaseException):
        if not isinstance(error, Unavailable) or isinstance(error, AuthenticationFailed):
            return "fail", error  # refused (bad arguments, keys, a closed connection)
        if c.target is not None:  # a node asked after "compacted" did not answer
            return self._ask_next_node(c)
        return "poll", self._next_poll(c)  # the engine tried every node it could: again

    def _on_reply(self, c: _Cursor, value):
        revisions, oldest, through, current = value
        if revisions is None:  # this node no longer keeps c.next_from
            c.oldest.append(oldest)
            if c.target is None:
                c.candidates = list(self._core.nodes)
            return self._ask_next_node(c)
        c.target, c.candidates, c.oldest = None, [], []
        events = events_of(c.shard, [r for r in revisions if r[0] >= c.next_from], self._prev)
        last = revisions[-1][0] if revisions else 0
        c.next_from = max(c.next_from, through + 1, last + 1)
        return "deliver", (events, current)

    def _ask_next_node(self, c: _Cursor):
        if c.candidates:
            c.target = c.candidates.pop(0)
            return "poll", self._next_poll(c)
        oldest = min(c.oldest)
        c.target, c.oldest = None, []
        return "fail", Compacted(
            f"shard {c.shard}: revision {c.next_from} is older than the history any node "
            f"keeps (the oldest still available is {oldest}): read the current state again "
            f"and watch from there", oldest={c.shard: oldest})

    def _end(self, error: BaseException) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        sink = self._sink()
        if sink is not None:
            sink.failed(error)

    def _deliver(self, *reply) -> bool:
        sink = self._sink()
        if sink is None:
            self.close()
            return False
        return sink.delivered(*reply)


class Watch:
    """``db.watch(...)`` on ``kvstore.connect``: an iterator of ``kvstore.Event``.

    Thread-safe; ``get(timeout)`` returns the next event or None (timed out, or
    closed); iteration ends when the watch is closed; an error that ends the watch
    (``kvstore.Compacted``, a refused connection) is raised once the events before
    it are taken. ``position``: ``{shard: next revision to deliver}``."""

    def __init__(self, core, nshards: int, key=None, prefix=None, start_revision=None,
                 prev_value: bool = False, *, wait_for_start: bool = True,
                 wait_ms: int = POLL_WAIT_MS, max_bytes: int = POLL_MAX_BYTES) -> None:
        lo, hi, single = watch_range(key, prefix)
        shards = [shard_for(nshards, single)] if single is not None else list(range(nshards))
        start = start_positions(start_revision, shards)
        self._cond = threading.Condition()
        self._order: deque = deque()  # shards, one per buffered event, in arrival order
        self._queues = {s: deque() for s in shards}  # the events of each shard's last reply
        self._after: dict = {}  # shard -> the position once its buffered events are taken
        self._position = {s: r for s, r in start.items() if r is not None}
        self._error = None
        self._closed = False
        self._listeners: list = []  # called (on any thread) when events or an end arrive
        renew_locks_after_fork(self)
        self._poller = WatchPoller(core, shards, lo, hi, prev_value, start, self,
                                   wait_ms, max_bytes)
        self._poller.start()
        if wait_for_start:
            self._wait_started(core.timeout + 5.0)

    def _renew_locks(self) -> None:
        self._cond = threading.Condition()

    def _wait_started(self, timeout: float) -> None:
        """Until every shard's "now" is known: an event written after ``watch()``
        returned is then delivered."""
        with self._cond:
            done = self._cond.wait_for(lambda: self._error is not None or len(
                self._position) == len(self._queues), timeout)
        if self._error is not None:
            self.close()
            raise self._error
        if not done:
            self.close()
            raise Timeout(f"the watch could not learn where its shards stand within "
                          f"{timeout:.1f} s")

    # -- the poller's sink (the engine's I/O thread) -------------------------------------
    def delivered(self, shard: int, events: list, next_from: int, current: bool,
                  sent_at: float) -> bool:
        with self._cond:
            if events:
                self._queues[shard].extend(events)
                self._order.extend([shard] * len(events))
                self._after[shard] = next_from
            else:
                self._position[shard] = next_from
            self._cond.notify_all()
        if events:
            self._notify()
        return not events

    def failed(self, error: BaseException) -> None:
        with self._cond:
            self._error = error
            self._cond.notify_all()
        self._notify()

    def _notify(self) -> None:
        for listener in list(self._listeners):
            listener()

    # -- the consumer -----------------------------------------------------------------------
    @property
    def position(self) -> dict:
        """``{shard: next revision to deliver}``: pass it as ``start_revision`` to resume."""
        with self._cond:
            return dict(self._position)

    @property
    def closed(self) -> bool:
        return self._closed

    def get(self, timeout: float | None = None):
        """The next ``Event``; None if none came within ``timeout`` seconds or the watch
        is closed."""
        self._poller.check_fork()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._closed or not self._order:
                if self._closed:
                    return None
                if self._error is not None:
                    raise self._error
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._cond.wait(remaining)
            shard = self._order.popleft()
            queue = self._queues[shard]
            event = queue.popleft()
            if queue:
                self._position[shard] = (event.revision if queue[0].revision == event.revision
                                         else event.revision + 1)
            else:
                self._position[shard] = self._after.pop(shard)
        if not queue:
            self._poller.resume(shard)
        return event

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._poller.close()
        self._notify()

    def __iter__(self) -> "Watch":
        return self

    def __next__(self):
        event = self.get()
        if event is None:
            raise StopIteration
        return event

    def __enter__(self) -> "Watch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<kvstore.Watch position={self.position}{' closed' if self._closed else ''}>"


class AsyncWatch:
    """``db.watch(...)`` on ``kvstore.aio``: ``async for event in watch``; ``await
    watch.get(timeout)``; ``close()``; ``async with``; ``position``. Where the
    shards stand "now" is asked when it is created, without blocking the loop;
    ``w = await db.watch(...)`` and ``async with db.watch(...) as w`` return once the
    answer is in, so every write made after that is delivered."""

    def __init__(self, watch: Watch) -> None:
        self._w = watch
        self._loop = None
        self._wake = None
        watch._listeners.append(self._notify)

    def _notify(self) -> None:
        loop = self._loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self._set)
            except RuntimeError:  # that loop is closed
                pass

    def _set(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _bind(self) -> asyncio.Event:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._wake is None:
            self._wake = asyncio.Event()
            self._loop = loop
        return self._wake

    async def started(self) -> None:
        """Until every shard's position is known (``Compacted`` or ``Unavailable`` if not)."""
        w = self._w
        await asyncio.get_running_loop().run_in_executor(
            None, w._wait_started, w._poller._core.timeout + 5.0)

    async def get(self, timeout: float | None = None):
        wake = self._bind()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wake.clear()
            event = self._w.get(0)
            if event is not None or self._w.closed:
                return event
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return None
            try:
                await asyncio.wait_for(wake.wait(), remaining)
            except asyncio.TimeoutError:
                return None

    @property
    def position(self) -> dict:
        return self._w.position

    def close(self) -> None:
        self._w.close()

    async def aclose(self) -> None:
        self._w.close()

    def __aiter__(self) -> "AsyncWatch":
        return self

    async def __anext__(self):
        event = await self.get()
        if event is None:
            raise StopAsyncIteration
        return event

    async def __aenter__(self) -> "AsyncWatch":
        await self.started()
        return self

    def __await__(self):
        """``w = await db.watch(...)``: once every shard's position is known."""
        yield from self.started().__await__()
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()
