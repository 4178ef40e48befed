"""The recipes' logic, once for the sync and the asyncio API: plans that yield steps.

A plan is a generator. It yields a step (``Call``, ``ReadRevision``, ``OpenWatch``...:
what it needs done to the store), gets the step's result sent back (or its
error thrown in), and returns its outcome. ``kvstore.recipes.drive`` carries the
steps out on a ``KV`` (``run``) or awaits them on ``kvstore.aio`` (``run_async``),
so a lock, an election and a queue behave the same on every engine, and a test
can drive a plan against an in-memory double. Plans read no clock and touch no
socket: ``Now`` asks the driver for the time.

Waiting is never a spin: a contender reads the key with its revision and watches
the key from the revision after (``OpenWatch``): every change after what it read
is delivered, so it wakes exactly when the key is deleted, and no earlier.
"""

from __future__ import annotations

import heapq
from typing import NamedTuple

from kvstore.errors import Compacted, LeaseExpired
from kvstore.recipes.keys import HOLDER_CHARS, QueueKeys


# ------------------------------------------------------------------ steps
class Call(NamedTuple):
    """``db.<method>(*args, **kwargs)``: its result."""
    method: str
    args: tuple
    kwargs: dict = {}


class ReadRevision(NamedTuple):
    """A linearizable read of ``key``: ``(value or None, revision)``, revision 0 if absent."""
    key: bytes


class ScanRevisions(NamedTuple):
    """A linearizable scan of ``prefix`` on ``shard``: ``[(key, value, revision)]``."""
    prefix: bytes
    shard: int


class NewLease(NamedTuple):
    """``db.lease(ttl)``: a ``Lease`` (the driver revokes it if the plan fails)."""
    ttl: float


class Revoke(NamedTuple):
    """``lease.revoke()``, errors ignored: it expires on its own within its TTL."""
    lease: object


class OpenWatch(NamedTuple):
    """``db.watch(**kwargs)``: a watch (the driver closes it when the plan ends)."""
    kwargs: dict


class NextEvent(NamedTuple):
    """The watch's next event, waiting at most ``timeout`` seconds (None: no limit; 0:
    only one already there): an ``Event``, or None if none came."""
    watch: object
    timeout: float | None


class CloseWatch(NamedTuple):
    watch: object


class Now(NamedTuple):
    """The driver's monotonic clock, in seconds."""


class Emit(NamedTuple):
    """Not a step: a value for the iterator that runs the plan (``observe``)."""
    value: object


def _remaining(deadline: float | None, now: float) -> float | None:
    return None if deadline is None else max(0.0, deadline - now)


# ------------------------------------------------------------------ lock and election
def acquire(key: bytes, value: bytes, lease, timeout: float | None):
    """Create ``key`` = ``value`` held by ``lease``, waiting while another holds it.

    Returns ``(lease, token)`` (the lease may be a new one: see below), or None if
    ``timeout`` seconds passed first. The token is the revision of the write that
    created the key: ``value`` is unique to this acquisition, so the read after the
    swap that still finds it names exactly that write; every later acquisition of
    the key writes at a later revision of the same shard.
    """
    deadline = None if timeout is None else (yield Now()) + timeout
    while True:
        try:
            yield Call("cas", (key, None, value), {"lease": lease})
        except LeaseExpired:  # the lease lapsed while this waited (a pause, a partition)
            yield Revoke(lease)
            lease = yield NewLease(lease.ttl)
            continue
        current, revision = yield ReadRevision(key)
        if current == value:  # ours (the swap, or an earlier attempt whose answer was lost)
            return lease, revision
        if current is None:  # freed since the swap failed, or ours expired at once
            continue
        freed = yield from _wait_for_delete(key, current, revision, deadline)
        if not freed:
            return None


def acquire_with_new_lease(key: bytes, value: bytes, ttl: float, timeout: float | None):
    """``acquire`` with a lease of its own (revoked if it gives up, by the driver if it
    fails): ``(lease, token)`` or None."""
    lease = yield NewLease(ttl)
    got = yield from acquire(key, value, lease, timeout)
    if got is None:
        yield Revoke(lease)
    return got


def _wait_for_delete(key: bytes, held: bytes, revision: int, deadline: float | None):
    """Wait until ``key``, read at ``revision`` holding another's value ``held``, is
    deleted (True), or ``deadline`` passes (False). The watch starts at ``revision + 1``:
    no change after the read can be missed."""
    start = revision + 1
    while True:
        try:
            return (yield from _watch_for_delete(key, start, deadline))
        except Compacted as e:
            # the key was written before the history kept began (held for long on a
            # busy shard): read it again, and watch from the oldest revision kept, which
            # is no later than the revision after that read
            floor = oldest_of(e)
            current, revision = yield ReadRevision(key)
            if current != held:
                return True  # freed (or taken again) meanwhile: try again
            start = max(revision + 1, floor)


def _watch_for_delete(key: bytes, start: int, deadline: float | None):
    """``_wait_for_delete`` from ``start``; ``Compacted`` if the history no longer has it."""
    watch = yield OpenWatch({"key": key, "start_revision": start})
    try:
        while True:  # on another error, the driver closes the watch
            now = yield Now()
            if deadline is not None and now >= deadline:
                freed = False
                break
            event = yield NextEvent(watch, _remaining(deadline, now))
            if event is not None and event.type == "delete":
                freed = True
                break
    except Compacted:
        yield CloseWatch(watch)
        raise
    yield CloseWatch(watch)
    return freed


def oldest_of(error: Compacted) -> int:
    """The oldest revision a ``Compacted`` names (per shard: the largest; a key's watch
    has one shard), 1 if it names none."""
    oldest = getattr(error, "oldest", None)
    if isinstance(oldest, dict):
        oldest = max((r for r in oldest.values() if isinstance(r, int)), default=None)
    return oldest if isinstance(oldest, int) and oldest >= 1 else 1


def release(key: bytes, value: bytes, lease):
    """Delete ``key`` if it still holds ``value``, then revoke ``lease``. Returns whether
    it was still held (False: the lease had expired, the key was freed without us)."""
    try:
        held = yield Call("cas", (key, value, None))
    except Exception:
        yield Revoke(lease)  # deletes the key too
        raise
    yield Revoke(lease)
    return bool(held)


def read_holder(key: bytes):
    """``(value, revision)`` of the key (None, 0 if nobody holds it)."""
    return (yield ReadRevision(key))


def strip_holder(value: bytes | None) -> bytes | None:
    """An election key's value without its holder id: the leader's value."""
    return None if value is None else value[HOLDER_CHARS:]


def observe(key: bytes):
    """Emit the leader's value now (None: no leader), then at every change of leader:
    a new holder's value, or None when the office falls vacant."""
    current, revision = yield ReadRevision(key)
    yield Emit(strip_holder(current))
    start = revision + 1
    while True:
        watch = None
        try:
            watch = yield OpenWatch({"key": key, "start_revision": start})
            while True:  # the driver closes the watch when the iterator is closed
                event = yield NextEvent(watch, None)
                if event is None:
                    continue
                new = event.value if event.type == "put" else None
                if new != current:
                    current = new
                    yield Emit(strip_holder(new))
        except Compacted as e:
            # behind the history kept (an office unchanged for long): read it again,
            # report a change missed meanwhile, watch from the oldest revision kept
            if watch is not None:
                yield CloseWatch(watch)
            floor = oldest_of(e)
            new, revision = yield ReadRevision(key)
            if new != current:
                current = new
                yield Emit(strip_holder(new))
            start = max(revision + 1, floor)


# ------------------------------------------------------------------ queue
#: Events a ``take`` applies before it claims (the rest wait for its next turn): a busy
#: queue's stream never keeps a consumer from handing out an item.
DRAIN_EVENTS_MAX = 1000


class Message(NamedTuple):
    """What ``Queue.get`` hands out."""
    id: bytes
    value: bytes
    revision: int


class QueueView:
    """What one consumer knows of its queue, from a scan and the watch after it: the
    items (by id, with the revision of their put), which are claimed by another
    consumer, and which this consumer holds. Pure bookkeeping; ``next_candidate``
    answers the oldest item this consumer may try to claim."""

    def __init__(self, keys: QueueKeys, me: bytes) -> None:
        self.keys = keys
        self.me = me
        self.items: dict = {}      # id -> revision of its put
        self.claimed: set = set()  # ids claimed by another consumer
        self.mine: set = set()     # ids this consumer was handed and holds unacked
        self.seen: dict = {}       # key -> revision of the last change applied
        self._heap: list = []      # (revision, id): candidates, stale entries skipped
        self._queued: set = set()  # ids in the heap

    def load(self, rows) -> None:
        """The rows of a scan of the queue's prefix: ``(key, value, revision)``; items
        first, so that their claims find them."""
        rows = list(rows)
        items = self.keys.base + b"i/"
        for key, value, revision in sorted(rows, key=lambda r: not r[0].startswith(items)):
            self.apply("put", key, value, revision)

    def apply(self, kind: str, key: bytes, value: bytes | None, revision: int) -> None:
        """One change of one of the queue's keys (a scan's row counts as a put). A change
        no newer than the last one applied to its key is skipped: a watch replays from
        a revision the scan may already include. What the view keeps is bounded by the
        items present: an item's entries go with it, a claim of an unknown item (acked
        already) is ignored."""
        parsed = self.keys.parse(key)
        if parsed is None:
            return
        what, item_id = parsed
        if what == b"i":
            if self.seen.get(key, 0) >= revision:
                return
            if kind == "put":
                self.seen[key] = revision
                self.items[item_id] = revision
                self._offer(item_id)
            else:  # acked: an item id is never put again
                self.forget(item_id)
        elif what == b"c" and item_id in self.items:
            if self.seen.get(key, 0) >= revision:
                return
            self.seen[key] = revision
            if kind == "put":
                if value != self.me:
                    self.claimed.add(item_id)
            else:  # a claim ended (released, its consumer's lease ended)
                self.claimed.discard(item_id)
                self.mine.discard(item_id)
                self._offer(item_id)

    def apply_event(self, event) -> None:
        self.apply(event.type, event.key, event.value, event.revision)

    def _offer(self, item_id: bytes) -> None:
        revision = self.items.get(item_id)
        if revision is not None and item_id not in self._queued:
            self._queued.add(item_id)
            heapq.heappush(self._heap, (revision, item_id))

    def next_candidate(self) -> tuple[bytes, int] | None:
        """``(id, revision)`` of the oldest item not claimed by anyone as far as this view
        knows, or None."""
        heap = self._heap
        while heap:
            revision, item_id = heapq.heappop(heap)
            self._queued.discard(item_id)
            if (self.items.get(item_id) == revision and item_id not in self.claimed
                    and item_id not in self.mine):
                return item_id, revision
        return None

    def lost(self, item_id: bytes) -> None:
        """Another consumer holds ``item_id``'s claim: not a candidate until it ends
        (its delete event offers the item again)."""
        self.claimed.add(item_id)

    def forget(self, item_id: bytes) -> None:
        """The item is gone (acked): nothing of it is kept."""
        self.items.pop(item_id, None)
        self.claimed.discard(item_id)
        self.mine.discard(item_id)
        self.seen.pop(self.keys.item(item_id), None)
        self.seen.pop(self.keys.claim(item_id), None)


def open_consumer(keys: QueueKeys, me: bytes, ttl: float):
    """Start consumer ``me``: its lease (``ttl`` seconds: it holds the consumer's claims),
    its registration, a watch of the queue and a scan of it: returns
    ``(view, watch, lease)``.

    The registration is one key per shard (held by the lease), each written at some
    revision R of its shard; the watch starts at R + 1 on each, the scan of the queue's
    shard after its write sees at least R: every change after the scan is in the
    watch, and what the watch replays of the scan's past, ``QueueView.apply`` skips by
    revision. Anchored on revisions it wrote, the consumer depends on no engine's idea
    of "now", and every start is recent, so never older than the history kept."""
    lease = yield NewLease(ttl)
    start = {}
    for shard in range(keys.nshards):
        anchor = keys.anchor(me, shard)
        yield Call("put", (anchor, me), {"lease": lease})
        _value, revision = yield ReadRevision(anchor)
        start[shard] = revision + 1
    watch = yield OpenWatch({"prefix": keys.base, "start_revision": start})
    rows = yield ScanRevisions(keys.base, keys.home)
    view = QueueView(keys, me)
    view.load(rows)
    return view, watch, lease


def take(view: QueueView, watch, lease, timeout: float | None):
    """Claim and return the oldest available item (a ``Message``), or None once
    ``timeout`` seconds passed with none. Blocks on the watch, never polls.

    A claim is the key ``c/ID`` created only if absent, held by the consumer's lease:
    if the consumer dies, the lease expires, the claim is deleted, and every
    consumer's watch offers the item again (at-least-once). The item is read AFTER the
    claim: an item acked (deleted) before the claim is never handed out again."""
    keys, me = view.keys, view.me
    deadline = None if timeout is None else (yield Now()) + timeout
    while True:
        for _ in range(DRAIN_EVENTS_MAX):  # what the watch already has: acks, claims, items
            event = yield NextEvent(watch, 0)
            if event is None:
                break
            view.apply_event(event)
        candidate = view.next_candidate()
        if candidate is None:
            now = yield Now()
            if deadline is not None and now >= deadline:
                return None
            event = yield NextEvent(watch, _remaining(deadline, now))
            if event is not None:
                view.apply_event(event)
            continue
        item_id, revision = candidate
        claim = keys.claim(item_id)
        swapped = yield Call("cas", (claim, None, me), {"lease": lease})
        if not swapped and (yield Call("get", (claim,))) != me:
            view.lost(item_id)
            continue
        value = yield Call("get", (keys.item(item_id),))
        if value is None:  # acked by another before our claim
            yield Call("cas", (claim, me, None))
            view.forget(item_id)
            continue
        view.mine.add(item_id)
        return Message(item_id, value, revision)


def ack(keys: QueueKeys, me: bytes, item_id: bytes):
    """Delete the item (it is done: never handed out again), then its claim if it is
    still ours. Returns whether the claim was still ours (False: it had expired and the
    item may have been handed to another consumer too: at-least-once). The consumer's
    view learns it from the watch (it touches no view: a get may be waiting on it)."""
    yield Call("delete", (keys.item(item_id),))
    still = yield Call("cas", (keys.claim(item_id), me, None))
    return bool(still)


def release_item(keys: QueueKeys, me: bytes, item_id: bytes):
    """Give the item back unprocessed: its claim is deleted, so the watch of every
    consumer, this one's too, offers it again."""
    still = yield Call("cas", (keys.claim(item_id), me, None))
    return bool(still)
