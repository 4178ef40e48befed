"""The recipes on a synchronous store (``kvstore.open``, ``kvstore.connect``).

Each class keeps its state and checks its arguments; the logic is the plans'
(``kvstore.recipes.plans``), run by ``kvstore.recipes.drive.run``. The asyncio
twins (``kvstore.recipes.aio``) share ``_LockState`` and ``_QueueState`` below.
"""

from __future__ import annotations

import threading

from kvstore.errors import InvalidArgument, KVError
from kvstore.keys import check_value
from kvstore.recipes import drive, plans, store
from kvstore.recipes.keys import QueueKeys, election_key, lock_key, new_holder


def check_ttl(ttl, what: str = "ttl") -> float:
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 0 < ttl < 1e9:
        raise InvalidArgument(f"{what} must be a number of seconds > 0, got {ttl!r}")
    return float(ttl)


def check_timeout(timeout) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0:
        raise InvalidArgument(f"timeout must be a number of seconds >= 0 or None, "
                              f"got {timeout!r}")
    return float(timeout)


class _LockState:
    """What a lock or a candidacy holds: the key, its lease, its holder id, its token."""

    def __init__(self, key: bytes, ttl) -> None:
        self.key = key
        self.ttl = check_ttl(ttl)
        self.lease = None
        self.value: bytes | None = None  # what the key holds while this holds it
        self.token: int | None = None

    def start(self, value: bytes) -> None:
        if self.value is not None:
            raise InvalidArgument(f"{self.key!r} is already held through this object; "
                                  f"release it first (recipes are not reentrant)")
        self.value = value

    def held(self, got) -> bool:
        if got is None:
            self.value = None
            return False
        self.lease, self.token = got
        return True

    def stop(self):
        """What release needs, and this object forgets it holds anything."""
        if self.lease is None:
            raise InvalidArgument(f"{self.key!r} is not held through this object")
        taken = (self.key, self.value, self.lease)
        self.lease = self.value = self.token = None
        return taken


class Lock:
    """A lock named ``name``, shared by every process of the store; see docs/recipes.md.

    ``acquire()`` blocks until this holds the lock (``timeout``: False if it could
    not within that many seconds); ``token`` is then the fencing token: the revision
    of the write that took the lock, larger than every earlier holder's. The lock's
    key is held by a lease of ``ttl`` seconds, kept alive while this holds it: if
    the process dies, the lock is free again after ``ttl`` (and at most one election
    timeout more). One ``Lock`` object is one holder: threads each use their own.
    """

    def __init__(self, db, name, ttl: float = 10) -> None:
        self.db = db
        self.name = name
        self._state = _LockState(lock_key(name), ttl)

    @property
    def key(self) -> bytes:
        return self._state.key

    @property
    def ttl(self) -> float:
        return self._state.ttl

    @property
    def token(self) -> int | None:
        """The fencing token of the current holding (None when not held)."""
        return self._state.token

    def locked(self) -> bool:
        """Whether this object holds the lock (as far as it knows: see docs/recipes.md
        on what a lease that could not be kept alive means)."""
        return self._state.lease is not None

    def acquire(self, timeout: float | None = None) -> bool:
        timeout = check_timeout(timeout)
        state = self._state
        state.start(new_holder())
        try:
            got = drive.run(plans.acquire_with_new_lease(state.key, state.value, state.ttl,
                                                         timeout), self.db)
        except BaseException:
            state.value = None
            raise
        return state.held(got)

    def release(self) -> bool:
        """Free the lock. True if it was still held; False if the lease had lapsed (a
        pause or a partition longer than ``ttl``) and the lock was freed without us."""
        return drive.run(plans.release(*self._state.stop()), self.db)

    def __enter__(self) -> "Lock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        if self.locked():
            self.release()

    def __repr__(self) -> str:
        return f"<kvstore.recipes.Lock {self.name!r} token={self.token}>"


class Election:
    """Leader election among processes for the office ``name``; see docs/recipes.md.

    ``campaign(value)`` blocks until this candidate leads (its value is then what
    ``leader()`` answers everywhere); ``resign()`` steps down; if the process dies,
    another candidate leads after ``ttl`` (and at most one election timeout more).
    ``token`` is the revision at which this candidate became leader: a fencing token
    for the term. ``observe()`` iterates over the leader's value at every change.
    """

    def __init__(self, db, name, ttl: float = 10) -> None:
        self.db = db
        self.name = name
        self._state = _LockState(election_key(name), ttl)

    @property
    def key(self) -> bytes:
        return self._state.key

    @property
    def token(self) -> int | None:
        return self._state.token

    def is_leader(self) -> bool:
        return self._state.lease is not None

    def campaign(self, value, timeout: float | None = None) -> bool:
        value = check_value(value)
        timeout = check_timeout(timeout)
        state = self._state
        state.start(new_holder() + value)
        try:
            got = drive.run(plans.acquire_with_new_lease(state.key, state.value, state.ttl,
                                                         timeout), self.db)
        except BaseException:
            state.value = None
            raise
        return state.held(got)

    def resign(self) -> bool:
        """Step down. True if this was still the leader (False: its lease had lapsed)."""
        return drive.run(plans.release(*self._state.stop()), self.db)

    def leader(self) -> bytes | None:
        """The leader's value now (linearizable), or None if there is none."""
        value, _revision = drive.run(plans.read_holder(self._state.key), self.db)
        return plans.strip_holder(value)

    def observe(self):
        """An iterator: the leader's value now (None: none), then at each change of
        leader the new one's (None when the office falls vacant). Close it (or break
        out of the loop) to stop watching."""
        return drive.iterate(plans.observe(self._state.key), self.db)

    def __repr__(self) -> str:
        return f"<kvstore.recipes.Election {self.name!r} leader={self.is_leader()}>"


class Item:
    """One item handed out by ``Queue.get``: ``value``, ``id``, ``revision`` (of its put:
    the queue's order), ``ack()`` when done, ``release()`` to hand it back."""

    __slots__ = ("_queue", "_consumer", "id", "value", "revision")

    def __init__(self, queue, message: plans.Message, consumer: bytes) -> None:
        self._queue = queue
        self._consumer = consumer
        self.id, self.value, self.revision = message

    def ack(self):
        """Done: the item is deleted and never handed out again. True if this consumer
        still held it (False: its claim had lapsed, so another may have it too)."""
        return self._queue._ack(self.id, self._consumer)

    def release(self):
        """Not done: hand the item back at once (it is offered again, oldest first)."""
        return self._queue._release(self.id, self._consumer)

    def __repr__(self) -> str:
        return f"<kvstore.recipes.Item id={self.id!r} revision={self.revision}>"


class _QueueState:
    """A queue's keys and one consumer's state (made at its first get)."""

    def __init__(self, db, name, visibility_timeout) -> None:
        self.name = name
        self.keys = QueueKeys(name, store.nshards(db))
        self.visibility_timeout = check_ttl(visibility_timeout, "visibility_timeout")
        self.me: bytes | None = None
        self.view: plans.QueueView | None = None
        self.watch = None
        self.lease = None
        self.closed = False

    def check_open(self) -> None:
        if self.closed:
            raise KVError(f"the queue {self.name!r} was closed")

    def opened(self, got) -> None:
        self.view, self.watch, self.lease = got

    def drop_consumer(self):
        """Forget the consumer (its lease lapsed, or close): ``(watch, lease)`` to end."""
        taken = (self.watch, self.lease)
        self.view = self.watch = self.lease = self.me = None
        return taken


class Queue:
    """A work queue named ``name``; see docs/recipes.md for its order and delivery.

    ``put(item)`` appends; ``get(timeout=None)`` waits (on a watch, not polling) for
    the oldest item no other consumer holds and returns it as an ``Item``; the item
    is this consumer's until ``item.ack()`` (done: deleted), ``item.release()``, or
    the end of this consumer's lease: ``visibility_timeout`` seconds after the
    process dies or ``close()``. An item not acked is handed out again: at least
    once, never after its ack. One ``Queue`` object is one consumer; its methods may
    be called from several threads (gets are served one at a time).
    """

    def __init__(self, db, name, visibility_timeout: float = 30) -> None:
        self.db = db
        self._state = _QueueState(db, name, visibility_timeout)
        self._mutex = threading.RLock()

    @property
    def name(self):
        return self._state.name

    def put(self, item) -> bytes:
        """Append ``item`` (bytes or str); returns its id. Durable when this returns."""
        value = check_value(item, "a queue item")
        item_id = self._state.keys.new_item_id()
        self.db.put(self._state.keys.item(item_id), value)
        return item_id

    def get(self, timeout: float | None = None) -> Item | None:
        """The oldest available item, claimed for this consumer; None after ``timeout``
        seconds without one."""
        timeout = check_timeout(timeout)
        with self._mutex:
            state = self._state
            state.check_open()
            for _attempt in range(3):
                if state.view is None:
                    state.me = state.keys.new_consumer_id()
                    state.opened(drive.run(plans.open_consumer(
                        state.keys, state.me, state.visibility_timeout), self.db))
                try:
                    message = drive.run(plans.take(state.view, state.watch, state.lease,
                                                   timeout), self.db)
                except (plans.LeaseExpired, plans.Compacted):
                    self._end_consumer()  # its claims are gone: start afresh
                    continue
                return None if message is None else Item(self, message, state.me)
            raise KVError(f"the queue {state.name!r}: this consumer's lease keeps lapsing "
                          f"(visibility_timeout={state.visibility_timeout:g} s); is the "
                          f"process paused for longer than that?")

    def _ack(self, item_id: bytes, consumer: bytes):
        # not under the mutex: a get may be waiting in another thread
        return drive.run(plans.ack(self._state.keys, consumer, item_id), self.db)

    def _release(self, item_id: bytes, consumer: bytes):
        return drive.run(plans.release_item(self._state.keys, consumer, item_id), self.db)

    def _end_consumer(self) -> None:
        watch, lease = self._state.drop_consumer()
        for end in (watch and watch.close, lease and lease.revoke):
            if end is not None:
                try:
                    end()
                except KVError:
                    pass

    def close(self) -> None:
        """End this consumer: the items it holds unacked are handed out again at once."""
        with self._mutex:
            if not self._state.closed:
                self._state.closed = True
                self._end_consumer()

    def __enter__(self) -> "Queue":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<kvstore.recipes.Queue {self.name!r}>"
