"""The embedded store's lease expiry: the rule of a cluster's leader
(``kvstore.node.leases``) with the store's own monotonic clock.

The committing thread tells the reaper, once a group is durable and published,
which leases it granted, refreshed or ended (``note``): a granted or refreshed
lease's deadline is this clock at that moment + its ttl. The reaper thread sleeps
until the earliest deadline, then writes ``LeaseExpire(id, refreshed_revision)``
through group commit like any write; the state machine applies it only if the
lease was not refreshed since (a keep-alive that won the race keeps it). So a
key of a lease nobody keeps alive vanishes after its ttl and within ttl + one
group commit (+ the thread's wake-up). At open every lease gets a full ttl from
the open (a restart knows no apply times).

The thread holds the store weakly (a store dropped without ``close()`` is still
collected) and is started only once the store has a lease.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
import weakref

from kvstore.commands import lease_expire
from kvstore.errors import KVError

log = logging.getLogger("kvstore.embedded")

#: An expiry that failed (a full disk...) is tried again this much later.
RETRY_SECONDS = 1.0


class LeaseReaper:
    """Deadlines of a store's leases, and the thread that expires them."""

    def __init__(self, store, clock=time.monotonic) -> None:
        self._store = weakref.ref(store)
        self._clock = clock
        # note() and stop() take the lock itself, not ``with self._cond``: the main thread
        # runs them (open, close) and a Condition's enter is unsafe against its interrupts
        # (kvstore.storage.wakeups); only the reaper's own thread waits on the condition.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._deadlines: dict = {}  # (shard, lease id) -> (deadline, refreshed revision)
        self._heap: list = []  # (deadline, shard, lease id, revision); lazily stale
        self._thread: threading.Thread | None = None
        self._stopped = False
        self.expired = 0  # leases this reaper expired (status, tests)

    def load(self, shard: int, records: list) -> None:
        """At open: every lease of ``shard`` gets a full ttl from now."""
        now = self._clock()
        self.note(shard, [(lid, ttl, rev) for lid, ttl, rev in records], now)

    def note(self, shard: int, events: list, now: float | None = None) -> None:
        """Leases granted or refreshed (``(id, ttl_ms, revision)``) or ended (``(id, None,
        None)``) by a group now durable (``kvstore.machine.leases.LeaseTable.events``)."""
        if not events:
            return
        now = self._clock() if now is None else now
        with self._lock:
            for lease_id, ttl_ms, revision in events:
                if ttl_ms is None:
                    self._deadlines.pop((shard, lease_id), None)
                    continue
                deadline = now + ttl_ms / 1000
                self._deadlines[(shard, lease_id)] = (deadline, revision)
                heapq.heappush(self._heap, (deadline, shard, lease_id, revision))
            if self._thread is None and not self._stopped:
                self._thread = threading.Thread(target=self._run, name="kvstore-lease-reaper",
                                                daemon=True)
                self._thread.start()
            self._cond.notify()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._cond.notify()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(10)

    def _due(self) -> list | None:
        """Wait for the earliest deadline; the leases due then (None: stop)."""
        with self._cond:
            while not self._stopped:
                now = self._clock()
                due = []
                while self._heap and self._heap[0][0] <= now:
                    deadline, shard, lease_id, revision = heapq.heappop(self._heap)
                    if self._deadlines.get((shard, lease_id)) == (deadline, revision):
                        due.append((shard, lease_id, revision))
                if due:
                    return due
                self._cond.wait(self._heap[0][0] - now if self._heap else None)
            return None

    def _run(self) -> None:
        while True:
            due = self._due()
            if due is None:
                return
            store = self._store()
            if store is None:
                return
            for shard, lease_id, revision in due:
                try:
                    result = store._expire_lease(shard, lease_expire(lease_id, revision))
                except KVError as e:
                    if store._closed:
                        return
                    log.warning("lease %d: expiring it failed, trying again in %g s: %s",
                                lease_id, RETRY_SECONDS, e)
                    self.note(shard, [(lease_id, int(RETRY_SECONDS * 1000), revision)])
                    continue
                if type(result) is int:
                    self.expired += 1
            del store
