"""An honest in-memory double of the store API the recipes build on (spec-22): keys with
per-shard revisions, leases on a fake clock, watches of events; thread-safe.

What it models, as the spec states it for the real engines:
- a shard's revision grows by one per write that changes something (one expiry,
  deleting several keys, is one revision); a key remembers the revision that wrote it;
- ``lease(ttl)`` gives a ``DoubleLease`` kept alive while its holder lives
  (``FakeClock.advance`` refreshes it) until ``die()`` (the holder's process is gone)
  or ``revoke()``; when its deadline passes, its keys are deleted, with events;
- ``put``/``cas`` with ``lease=`` attach the key to the lease (``LeaseExpired`` if the
  lease is gone, nothing changed); any other write of the key detaches it;
- ``watch(key=, prefix=, start_revision=)``: every change, in revision order per shard,
  from ``start_revision`` (None: from now; an int: every shard; a dict: per shard);
- ``read_revision`` and ``scan_revisions``, the seam ``kvstore.recipes.store`` uses;
- ``compact()``: the histories forget everything so far (``Compacted`` for a watch
  from before), as a store's bounded history does on a busy shard.

It counts the calls (``calls``), so a test can tell a waiter that watches from one
that spins.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time

from kvstore.errors import Compacted, KVError
from kvstore.recipes import plans
from kvstore.recipes.keys import shard_for

try:
    from kvstore import Event
except ImportError:  # until the watch lands on main
    Event = collections.namedtuple("Event", "type key value revision prev_value shard")


def _b(x):
    return x.encode() if isinstance(x, str) else x


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.stores: list = []

    def advance(self, seconds: float) -> None:
        self.now += seconds
        for store in self.stores:
            store.tick()


class DoubleLease:
    def __init__(self, store: "DoubleKV", lease_id: int, ttl: float) -> None:
        self.store, self.id, self.ttl = store, lease_id, ttl

    def keepalive(self) -> bool:
        return self.store._keepalive(self.id)

    def revoke(self):
        return self.store._revoke(self.id)

    def die(self) -> None:
        """The holder's process is gone: no more keep-alives."""
        self.store._die(self.id)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.revoke()


class DoubleWatch:
    def __init__(self, store: "DoubleKV", lo: bytes, hi: bytes | None, position: dict) -> None:
        self.store, self.lo, self.hi, self.position = store, lo, hi, position
        self.closed = False
        self.pending: dict = {}

    def _match(self, key: bytes) -> bool:
        return key >= self.lo and (self.hi is None or key < self.hi)

    def _ready(self):
        history = self.store.history
        for shard in self.position:
            pending = self.pending.setdefault(shard, collections.deque())
            oldest = self.store.oldest[shard]
            if not pending and self.position[shard] < oldest:
                raise Compacted(f"revision {self.position[shard]} of shard {shard} is older "
                                f"than the history kept", {shard: oldest})
            while not pending:
                start = self.position[shard]
                if start - 1 >= len(history[shard]):
                    break
                revision, changes = history[shard][start - 1]
                self.position[shard] = revision + 1
                pending.extend(e for e in changes if self._match(e.key))
            if pending:
                return pending.popleft()
        return None

    def get(self, timeout: float | None = None):
        if self.closed:
            raise KVError("this watch is closed")
        end = None if timeout is None else time.monotonic() + timeout
        with self.store.cond:
            self.store.calls["watch.get"] += 1
            while True:
                event = self._ready()
                if event is not None:
                    return event
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self.store.cond.wait(left)
                if self.closed:
                    raise KVError("this watch is closed")

    def close(self) -> None:
        with self.store.cond:
            self.closed = True
            self.store.cond.notify_all()

    def __iter__(self):
        while True:
            yield self.get()


class DoubleKV:
    def __init__(self, nshards: int = 3, clock: FakeClock | None = None) -> None:
        self.nshards = nshards
        self.clock = clock or FakeClock()
        self.clock.stores.append(self)
        self.cond = threading.Condition()
        self.revision = [0] * nshards
        self.data: dict = {}  # key -> (value, revision, lease id or None)
        self.leases: dict = {}  # id -> {"ttl", "deadline", "keys", "alive"}
        self.history: list = [[] for _ in range(nshards)]  # [(revision, [Event])]
        self.oldest = [1] * nshards  # the oldest revision a watch can start from
        self.calls = collections.Counter()
        self._ids = itertools.count(1)

    # -- writes (under the condition's lock) ----------------------------------------------
    def _commit(self, shard: int, changes: list) -> int:
        self.revision[shard] += 1
        revision = self.revision[shard]
        events = []
        for key, value in changes:
            old = self.data.get(key)
            if old is not None and old[2] is not None:
                self.leases.get(old[2], {"keys": set()})["keys"].discard(key)
            if value is None:
                self.data.pop(key, None)
                events.append(Event("delete", key, None, revision, None, shard))
            else:
                self.data[key] = (value, revision, None)
                events.append(Event("put", key, value, revision, None, shard))
        self.history[shard].append((revision, events))
        self.cond.notify_all()
        return revision

    def _attach(self, key: bytes, lease_id: int) -> None:
        value, revision, _ = self.data[key]
        self.data[key] = (value, revision, lease_id)
        self.leases[lease_id]["keys"].add(key)

    def _lease_id(self, lease):
        if lease is None:
            return None
        lease_id = lease.id if isinstance(lease, DoubleLease) else lease
        if lease_id not in self.leases:
            raise plans.LeaseExpired(f"lease {lease_id} has expired or was revoked")
        return lease_id

    def put(self, key, value, lease=None, ttl=None) -> None:
        key, value = _b(key), _b(value)
        with self.cond:
            self.calls["put"] += 1
            lease_id = self._lease_id(lease)
            self._commit(shard_for(key, self.nshards), [(key, value)])
            if lease_id is not None:
                self._attach(key, lease_id)

    def delete(self, key) -> bool:
        key = _b(key)
        with self.cond:
            self.calls["delete"] += 1
            if key not in self.data:
                return False
            self._commit(shard_for(key, self.nshards), [(key, None)])
            return True

    def cas(self, key, expected, new, *, lease=None) -> bool:
        key, expected, new = _b(key), _b(expected), _b(new)
        with self.cond:
            self.calls["cas"] += 1
            lease_id = self._lease_id(lease)
            current = self.data.get(key, (None,))[0]
            if current != expected:
                return False
            if new is None and current is None:
                return True
            self._commit(shard_for(key, self.nshards), [(key, new)])
            if new is not None and lease_id is not None:
                self._attach(key, lease_id)
            return True

    # -- reads ----------------------------------------------------------------------------
    def get(self, key):
        with self.cond:
            self.calls["get"] += 1
            return self.data.get(_b(key), (None,))[0]

    def read_revision(self, key):
        with self.cond:
            self.calls["read_revision"] += 1
            value, revision, _ = self.data.get(_b(key), (None, 0, None))
            return value, revision

    def scan_revisions(self, prefix, shard):
        prefix = _b(prefix)
        with self.cond:
            return [(k, v, r) for k, (v, r, _) in sorted(self.data.items())
                    if k.startswith(prefix) and shard_for(k, self.nshards) == shard]

    def scan(self, prefix=b""):
        prefix = _b(prefix)
        with self.cond:
            return [(k, v) for k, (v, _r, _l) in sorted(self.data.items()) if k.startswith(prefix)]

    # -- leases ---------------------------------------------------------------------------
    def lease(self, ttl: float) -> DoubleLease:
        with self.cond:
            self.calls["lease"] += 1
            lease_id = next(self._ids)
            self.leases[lease_id] = {"ttl": ttl, "deadline": self.clock.now + ttl,
                                     "keys": set(), "alive": True}
            return DoubleLease(self, lease_id, ttl)

    def _keepalive(self, lease_id) -> bool:
        with self.cond:
            record = self.leases.get(lease_id)
            if record is None:
                return False
            record["deadline"] = self.clock.now + record["ttl"]
            return True

    def _die(self, lease_id) -> None:
        with self.cond:
            record = self.leases.get(lease_id)
            if record is not None:
                record["alive"] = False

    def _revoke(self, lease_id):
        with self.cond:
            self.calls["revoke"] += 1
            return self._end(lease_id)

    def _end(self, lease_id):
        record = self.leases.pop(lease_id, None)
        if record is None:
            return False
        by_shard: dict = {}
        for key in sorted(record["keys"]):
            by_shard.setdefault(shard_for(key, self.nshards), []).append((key, None))
        for shard, changes in sorted(by_shard.items()):
            self._commit(shard, changes)
        return len(record["keys"])

    def tick(self) -> None:
        """The clock moved: live holders keep their leases alive, dead ones expire."""
        with self.cond:
            now = self.clock.now
            for lease_id, record in list(self.leases.items()):
                if record["alive"]:
                    record["deadline"] = now + record["ttl"]
                elif record["deadline"] <= now:
                    self._end(lease_id)

    # -- watch ----------------------------------------------------------------------------
    def watch(self, key=None, prefix=None, start_revision=None, *, prev_value=False):
        with self.cond:
            self.calls["watch"] += 1
            if key is not None:
                key = _b(key)
                lo, hi = key, key + b"\x00"
                shards = [shard_for(key, self.nshards)]
            else:
                lo, hi = _b(prefix or b""), None
                if lo:
                    hi = _after_prefix(lo)
                shards = list(range(self.nshards))
            position = {}
            for s in shards:
                if isinstance(start_revision, dict):
                    position[s] = start_revision.get(s, self.revision[s] + 1)
                elif start_revision is None:
                    position[s] = self.revision[s] + 1
                else:
                    position[s] = start_revision
            return DoubleWatch(self, lo, hi, position)

    def compact(self) -> None:
        """Forget every shard's history so far (a store whose window moved on)."""
        with self.cond:
            self.oldest = [r + 1 for r in self.revision]

    def close(self) -> None:
        pass


def _after_prefix(prefix: bytes) -> bytes | None:
    stripped = prefix.rstrip(b"\xff")
    return stripped[:-1] + bytes([stripped[-1] + 1]) if stripped else None
