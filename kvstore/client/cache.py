"""The coherent client cache: ``kvstore.connect(..., cache=PREFIXES)`` (docs/cache.md).

Gets of keys under a cached prefix are answered from memory when all of these hold
(``lookup``), and are linearizable gets otherwise:

- the key's entry is present (filled by an earlier linearizable get, kept up to
  date by the prefix's watch, ``kvstore.client.watch.WatchPoller``);
- fresh: a poll of the key's shard was answered ``current`` (the node knew it was
  up to date) and that poll was sent at most ``staleness`` seconds ago;
- read-your-writes: the watch has applied every revision up to this client's
  last write to that shard (writes ask for their revision: ``ClientCore.
  revision_hook``); after a write whose revision is unknown (a 2PC decision: its
  participants apply it just after; a timed-out write) the shard's entries are
  forgotten, and only a ``current`` answer to a poll sent after it will do.

Entries carry the revision that wrote them; an event applies when it is not
older (a fill can be ahead of the watch; one revision may change a key twice).
A fill is dropped when an event for its key newer than the revision it read
arrived while the get was in flight (a present key's revision is the one that
wrote it: any later change is newer), or the watch restarted meanwhile, or a
write of unknown revision hit its shard. Events update entries present, never add
keys; LRU by bytes. One lock guards it all: events arrive on the engine's I/O
thread, gets on any thread.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

from kvstore.client.core import renew_locks_after_fork
from kvstore.client.requests import shard_for
from kvstore.client.watch import Compacted, WatchPoller
from kvstore.errors import InvalidArgument
from kvstore.keys import check_bound, prefix_end

DEFAULT_STALENESS = 1.0
DEFAULT_BYTES = 64 * 1024 * 1024
#: Bytes an entry costs beyond its key and value (the dict slot, the tuple, the ints).
ENTRY_OVERHEAD = 100
#: What ``lookup`` answers besides a hit.
MISS, UNCACHED = object(), object()


def check_prefixes(cache) -> list:
    """``cache=``: a prefix, a list of prefixes, or True (every key)."""
    if cache is True:
        return [b""]
    items = cache if isinstance(cache, (list, tuple)) else [cache]
    if not items:
        raise InvalidArgument("cache= names no prefix: give a prefix, a list of them, or True")
    out = []
    for p in items:
        if p is True or p is False or p is None:
            raise InvalidArgument(f"cache= takes prefixes (bytes or str) or True, got {p!r}")
        p = check_bound(p, "cache prefix")
        if p not in out:
            out.append(p)
    return out


def check_staleness(staleness) -> float:
    if isinstance(staleness, bool) or not isinstance(staleness, (int, float)) \
            or not 0 < staleness <= 60:
        raise InvalidArgument(f"cache_staleness must be seconds in (0, 60], got {staleness!r}")
    return float(staleness)


def check_bytes(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise InvalidArgument(f"cache_bytes must be an int >= 0, got {n!r}")
    return n


class _Stream:
    """One cached prefix: its watch over every shard, and what it has applied."""

    def __init__(self, cache: "CoherentCache", index: int, prefix: bytes) -> None:
        self.cache, self.index, self.prefix = cache, index, prefix
        self.lo, self.hi = prefix, (prefix_end(prefix) if prefix else None)
        self.generation = 0  # bumped when the watch restarts: fills of before are dropped
        self.applied: dict = {}  # shard -> every revision up to this is applied
        self.fresh_sent: dict = {}  # shard -> when the last poll answered "current" was sent
        self.poller = None

    def covers(self, key: bytes) -> bool:
        return key >= self.lo and (self.hi is None or key < self.hi)

    def start(self) -> None:
        c = self.cache
        self.poller = WatchPoller(c.core, list(range(c.nshards)), self.lo, self.hi, False,
                                  {}, self, c.wait_ms, c.poll_bytes)
        self.poller.start()

    # the poller's sink (on the engine's I/O thread): apply at once, poll again at once
    def delivered(self, shard, events, next_from, current, sent_at) -> bool:
        self.cache._apply(self, shard, events, next_from, current, sent_at)
        return True

    def failed(self, error) -> None:
        self.cache._restart(self, error)


class CoherentCache:
    """Hot keys of some prefixes in the client, kept coherent by watches (module doc)."""

    def __init__(self, core, nshards: int, prefixes, staleness: float = DEFAULT_STALENESS,
                 max_bytes: int = DEFAULT_BYTES) -> None:
        self.core, self.nshards = core, nshards
        self.staleness = check_staleness(staleness)
        self.max_bytes = check_bytes(max_bytes)
        # a poll with nothing to report is answered within a third of the bound, so
        # that a healthy watch keeps the cache fresh with room for a round trip
        self.wait_ms = max(10, int(self.staleness * 1000 / 3))
        self.poll_bytes = 1 << 20
        self._lock = threading.Lock()
        self._entries: OrderedDict = OrderedDict()  # key -> (value or None, revision)
        self._bytes = 0
        self._written: dict = {}  # shard -> the revision of this client's last write
        self._barrier: dict = {}  # shard -> when a write of unknown revision ended
        self._epochs: dict = {}  # shard -> writes of unknown revision so far
        self._filling: dict = {}  # key -> fills in flight
        self._spoiled: dict = {}  # key -> the newest event for it while fills were in flight
        self.hits = self.misses = self.stale = 0
        self.restarts = 0
        self.last_error = None
        self._closed = False
        self._started = threading.Event()  # every stream knows where its shards stand
        self._streams = [_Stream(self, i, p) for i, p in enumerate(check_prefixes(prefixes))]
        core.revision_hook = self._wrote
        renew_locks_after_fork(self)
        for s in self._streams:
            s.start()

    # -- the engine's hooks ----------------------------------------------------------------
    def _renew_locks(self) -> None:
        """In a child after ``os.fork()``: the parent's I/O thread may have held them."""
        self._lock = threading.Lock()
        started, self._started = self._started.is_set(), threading.Event()
        if started:
            self._started.set()

    def wait_started(self, timeout: float) -> bool:
        """Until every cached prefix's watch knows where its shards stand (fills before
        that are not kept); False if that took longer than ``timeout``."""
        return self._started.wait(timeout)

    def _wrote(self, shard: int, revision) -> None:
        with self._lock:
            if revision is None:
                # A write whose revision is unknown (a 2PC decision: the participants
                # apply it a moment later; a write that timed out): forget the shard's
                # entries, and fills begun before; gets refill them linearizably.
                self._barrier[shard] = time.monotonic()
                self._epochs[shard] = self._epochs.get(shard, 0) + 1
                for key in [k for k in self._entries if shard_for(self.nshards, k) == shard]:
                    self._drop(key)
            elif revision > self._written.get(shard, 0):
                self._written[shard] = revision

    def _apply(self, stream: _Stream, shard: int, events: list, next_from: int,
               current: bool, sent_at: float) -> None:
        entries = self._entries
        with self._lock:
            for e in events:
                if e.key in self._filling and e.revision > self._spoiled.get(e.key, 0):
                    self._spoiled[e.key] = e.revision
                entry = entries.get(e.key)
                # >=: one revision (one log entry) may change a key several times, in order
                if entry is not None and e.revision >= entry[1]:
                    self._bytes += len(e.value or b"") - len(entry[0] or b"")
                    entries[e.key] = (e.value, e.revision)
            stream.applied[shard] = next_from - 1
            if not self._started.is_set() and all(
                    len(st.applied) == self.nshards for st in self._streams):
                self._started.set()
            if current and sent_at > stream.fresh_sent.get(shard, 0.0):
                stream.fresh_sent[shard] = sent_at
            self._evict()

    def _restart(self, stream: _Stream, error) -> None:
        """The watch ended: forget what it covered (its gets go to the cluster). If its
        position was compacted away on every node, watch again from now (fills of
        before are dropped); any other end (a refused connection, a closed client, a
        server without watch) leaves the prefix uncached, ``last_error`` says why."""
        with self._lock:
            self.last_error = error
            stream.generation += 1
            stream.applied.clear()
            stream.fresh_sent.clear()
            for key in [k for k in self._entries if stream.covers(k)]:
                self._drop(key)
            again = isinstance(error, Compacted) and not self._closed
            if again:
                self.restarts += 1
        if again:
            stream.start()

    # -- the client's side -----------------------------------------------------------------
    def _stream(self, key: bytes):
        for s in self._streams:
            if s.covers(key):
                return s
        return None

    def _servable(self, stream: _Stream, shard: int, now: float) -> bool:
        sent = stream.fresh_sent.get(shard)
        return (sent is not None and now - sent <= self.staleness
                and sent > self._barrier.get(shard, -1.0)
                and stream.applied.get(shard, -1) >= self._written.get(shard, 0))

    def lookup(self, key: bytes):
        """The cached value of ``key`` (bytes or None); ``UNCACHED`` if no cached prefix
        holds it; else ``(MISS, ticket)``: do a linearizable get and ``fill(ticket, ...)``."""
        stream = self._stream(key)
        if stream is None:
            return UNCACHED
        for s in self._streams:
            s.poller.check_fork()
        shard = shard_for(self.nshards, key)
        with self._lock:
            entry = self._entries.get(key)
            servable = self._servable(stream, shard, time.monotonic())
            if entry is not None and servable:
                self.hits += 1
                self._entries.move_to_end(key)
                return entry[0]
            if entry is None:
                self.misses += 1
            else:
                self.stale += 1
            started = shard in stream.applied
            self._filling[key] = self._filling.get(key, 0) + 1
        return MISS, (key, stream, stream.generation if started else None,
                      self._epochs.get(shard, 0))

    def fill(self, ticket, value, revision: int) -> None:
        """A linearizable get of ``ticket``'s key answered ``(value, revision)``."""
        key, stream, generation, epoch = ticket
        with self._lock:
            n = self._filling.pop(key) - 1
            newer = self._spoiled.get(key, 0)
            if n:
                self._filling[key] = n
            else:
                self._spoiled.pop(key, None)
            # an event after the revision read came meanwhile: the read may be older
            # than it (an absent key reads revision 0: any event), and that event passed
            # while the entry did not exist yet
            if newer > revision or generation is None or generation != stream.generation \
                    or epoch != self._epochs.get(shard_for(self.nshards, key), 0) \
                    or self.max_bytes == 0:
                return
            entry = self._entries.get(key)
            if entry is not None:
                if entry[1] >= revision:
                    return  # the entry is as new (an absent key's fill says revision 0)
                self._drop(key)
            self._entries[key] = (value, revision)
            self._bytes += len(key) + len(value or b"") + ENTRY_OVERHEAD
            self._evict()

    def abandon(self, ticket) -> None:
        """The linearizable get of ``ticket`` failed: nothing to fill."""
        key = ticket[0]
        with self._lock:
            n = self._filling.pop(key) - 1
            if n:
                self._filling[key] = n
            else:
                self._spoiled.pop(key, None)

    def _drop(self, key: bytes) -> None:
        value, _ = self._entries.pop(key)
        self._bytes -= len(key) + len(value or b"") + ENTRY_OVERHEAD

    def _evict(self) -> None:
        while self._bytes > self.max_bytes and self._entries:
            key = next(iter(self._entries))
            self._drop(key)

    def stats(self) -> dict:
        """``{"hits", "misses", "stale", "entries", "bytes", "restarts"}``: ``stale``
        counts gets of a cached key answered by the cluster because the watch was not
        fresh or had not yet delivered this client's last write."""
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "stale": self.stale,
                    "entries": len(self._entries), "bytes": self._bytes,
                    "restarts": self.restarts}

    def close(self) -> None:
        with self._lock:
            self._closed = True
        for s in self._streams:
            if s.poller is not None:
                s.poller.close()
