"""``EmbeddedKV.watch``: the embedded store's watch, fed after each group commit's publish.

The store keeps one ``kvstore.watch.ShardHistory`` per shard in a ``WatchHub``
(``watch_history_bytes`` for all shards together, 64 MiB by default). The group
commit collects what each request changed (``kvstore.machine.data``'s ``changes``)
and, once its append returned and its writes were published, hands the group's
changes to the hub (``WatchHub.publish``): a watcher sees only durable writes, in
each shard's revision order (the group's entry of a shard is one revision, its
commands in their order). The history starts at the first revision after the
state recovered at open.

A ``Watch`` pulls: it reads at most ``max_bytes`` of events from the histories when
its consumer has taken the previous ones (``get``/iteration), so a slow consumer
holds nothing in the store and costs only its place in the history; if it falls
behind the history, ``Compacted`` names the oldest revision each shard still has.
Closing the store wakes every waiting watcher with a ``KVError`` saying so.
"""

from __future__ import annotations

from collections import deque

from kvstore.errors import Compacted, InvalidArgument, KVError
from kvstore.events import Event, check_start_revision, events_of, watch_range
from kvstore.storage.wakeups import Wakeups
from kvstore.watch import COMPACTED, ShardHistory

#: ``kvstore.open(..., watch_history_bytes=)``: all shards' histories together.
DEFAULT_HISTORY_BYTES = 64 * 1024 * 1024
#: Event bytes a watch reads from the history at once (one revision larger goes whole).
WATCH_READ_BYTES = 1024 * 1024


class WatchHub:
    """The histories of an embedded store's shards and the watchers waiting on them."""

    def __init__(self, nshards: int, history_bytes, applied, path: str) -> None:
        if isinstance(history_bytes, bool) or not isinstance(history_bytes, int) \
                or history_bytes < 0:
            raise InvalidArgument(f"watch_history_bytes must be an int >= 0 (bytes kept for "
                                  f"watchers, all shards together), not {history_bytes!r}")
        self.path = path
        self.histories = [ShardHistory(history_bytes // nshards, applied[s] + 1)
                          for s in range(nshards)]
        # Guards the histories; the watchers wait on it (a watch is often read in the main
        # thread, where a Condition is unsafe against Ctrl-C: kvstore.storage.wakeups).
        self.wakeups = Wakeups()
        self.lock = self.wakeups.lock
        self.closed = False

    def publish(self, entries: list) -> None:
        """A group's ``[(shard, revision, changes)]``, durable and published."""
        with self.lock:
            for shard, revision, changes in entries:
                history = self.histories[shard]
                if revision > history.head:
                    if changes:
                        history.add(revision, changes)
                    else:
                        history.advance(revision)
            if self.wakeups.waiting:
                self.wakeups.notify_all()

    def close(self) -> None:
        self.closed = True
        with self.lock:
            self.wakeups.notify_all()


class Watch:
    """An embedded store's watch: an iterator of ``Event`` (docs/watch.md).

    ``get(timeout=None)`` returns the next event, or None once ``timeout`` seconds
    passed without one; iteration blocks until the next. ``position`` is the next
    revision to deliver per shard, at a revision boundary (pass it as
    ``start_revision`` to resume elsewhere). ``close()`` ends it (iteration stops);
    closing the store makes a waiting ``get`` raise ``KVError``.
    """

    def __init__(self, hub: WatchHub, shards: list, key=None, prefix=None,
                 start_revision=None, prev_value: bool = False) -> None:
        if type(prev_value) is not bool:
            raise InvalidArgument("prev_value must be True or False")
        self._lo, self._hi, _key = watch_range(key, prefix)
        self._hub = hub
        self._prev = prev_value
        start = check_start_revision(start_revision, shards)
        with hub.lock:
            self._check_store()
            #: shard -> the next revision to deliver (a revision boundary)
            self.position = (start if start is not None else
                             {s: hub.histories[s].head + 1 for s in shards})
        self._shards = list(shards)
        self._next_shard = 0  # shards are read round-robin
        self._buffer: deque = deque()  # events read, not yet taken (one read at most)
        self._read_through = 0  # the read's through (its shard's events all in the buffer)
        self._closed = False

    def _check_store(self) -> None:
        if self._hub.closed:
            raise KVError(f"the store at {self._hub.path} is closed: its watches ended")

    def get(self, timeout: float | None = None) -> Event | None:
        """The next event, waiting up to ``timeout`` seconds (None: as long as it takes);
        None if none came. ``Compacted`` if a shard's history no longer holds the
        watch's position; ``KVError`` if the store closed."""
        if self._closed:
            return None
        if not self._buffer and not self._fill(timeout):
            return None
        event = self._buffer.popleft()
        buffer = self._buffer
        if not buffer:  # the read is delivered: nothing else matched up to its through
            self.position[event.shard] = self._read_through + 1
        elif buffer[0].revision != event.revision:
            self.position[event.shard] = event.revision + 1
        return event

    def _fill(self, timeout: float | None) -> bool:
        """Read the next events into the buffer, waiting for them; False on timeout."""
        def done() -> bool:
            self._check_store()
            return self._closed or self._read()

        return self._hub.wakeups.wait_for(done, timeout) and bool(self._buffer)

    def _read(self) -> bool:
        """One pass over the shards (round-robin, under the hub's lock): the first with
        events fills the buffer; the others' positions move past what they had not."""
        n = len(self._shards)
        for i in range(n):
            shard = self._shards[(self._next_shard + i) % n]
            history = self._hub.histories[shard]
            answer = history.since(self.position[shard], self._lo, self._hi,
                                   WATCH_READ_BYTES, self._prev)
            if answer is COMPACTED:
                oldest = {s: self._hub.histories[s].oldest for s in self._shards}
                raise Compacted(f"the watch's revision {self.position[shard]} of shard {shard} "
                                f"is older than the history kept (oldest {history.oldest}): "
                                f"read the data again, then watch from the revisions in "
                                f".oldest (or raise watch_history_bytes)", oldest)
            events, through = answer
            if events:
                self._buffer.extend(events_of(shard, events, self._prev))
                self._read_through = through
                self._next_shard = (self._next_shard + i + 1) % n
                return True
            self.position[shard] = through + 1
        return False

    def __iter__(self):
        return self

    def __next__(self) -> Event:
        event = self.get()
        if event is None:
            raise StopIteration
        return event

    def close(self) -> None:
        """End the watch: iteration stops; a ``get`` waiting in another thread returns None."""
        self._closed = True
        with self._hub.lock:
            self._hub.wakeups.notify_all()

    def __enter__(self) -> "Watch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<kvstore.Watch [{self._lo!r}, {self._hi!r}) at {self.position}>"
