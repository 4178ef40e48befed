"""``db.lease(ttl)``: a lease, the same object on the embedded store and a cluster.

A lease is granted on every shard when it is made (``LeaseGrant``, a client-chosen
random 63-bit id), and kept alive on every shard by a background timer every
``ttl / 3`` seconds while the object lives: the timer holds it weakly, so a
dropped ``Lease`` (or a process that died) stops being kept alive, and its keys
vanish once the ttl has passed (docs/leases.md states the guarantee exactly).
``keepalive()`` refreshes it now; ``revoke()`` ends it, deleting its keys; as a
context manager it is revoked on exit. When a keep-alive finds the lease gone
(it expired: the timer was too late, the process stalled past its ttl) the lease
is ``expired`` for good and ``keepalive()`` raises ``kvstore.LeaseExpired``.

The store does the work (``_lease_keepalive(id) -> bool``, ``_lease_revoke(id) ->
int``); one daemon thread (``_KeepAliveTimer``) keeps every lease of the process
alive. ``kvstore.client.lease.AsyncLease`` is the asyncio twin.
"""

from __future__ import annotations

import heapq
import logging
import os
import secrets
import threading
import time
import weakref

from kvstore.commands import LEASE_ID_MAX, check_lease_id
from kvstore.errors import KVError, LeaseExpired

log = logging.getLogger("kvstore.lease")

#: A lease is kept alive this many times per ttl (etcd's client: ttl / 3).
KEEPALIVES_PER_TTL = 3


def new_lease_id() -> int:
    """A random lease id in 1..2**63-1 (clients choose them; a collision is 2**-63)."""
    return 1 + secrets.randbelow(LEASE_ID_MAX)


def lease_id_of(lease) -> int:
    """The id of ``lease`` (a ``Lease``, an ``AsyncLease`` or an id), checked."""
    lease_id = getattr(lease, "id", lease)
    return check_lease_id(lease_id)


class Lease:
    """A granted lease (the module docstring). ``id`` and ``ttl`` (seconds) name it; pass
    it (or its id) to ``put(key, value, lease=...)``."""

    def __init__(self, store, lease_id: int, ttl: float, keep_alive: bool = True) -> None:
        self._store = store
        self.id = lease_id
        self.ttl = ttl
        self._expired = False
        self._revoked = False
        self._lock = threading.Lock()
        if keep_alive:
            _timer().add(self)

    @property
    def expired(self) -> bool:
        """True once a keep-alive found the lease gone (on any shard): its keys are gone."""
        return self._expired

    @property
    def active(self) -> bool:
        """Still kept alive: neither revoked nor found expired."""
        return not (self._expired or self._revoked)

    def keepalive(self) -> None:
        """Refresh the lease on every shard now; ``LeaseExpired`` if it is gone."""
        if self._revoked:
            raise LeaseExpired(f"lease {self.id} was revoked")
        if self._expired or not self._store._lease_keepalive(self.id):
            self._expired = True
            raise LeaseExpired(f"lease {self.id} is gone (its ttl passed without a keep-alive, "
                               f"or it was revoked): its keys were deleted")

    def revoke(self) -> int:
        """End the lease now, deleting its keys: how many were deleted (0 if it had
        expired already). The timer stops keeping it alive."""
        with self._lock:
            self._revoked = True
        return self._store._lease_revoke(self.id)

    def _tick(self) -> bool:
        """The timer's keep-alive: False once there is nothing more to keep alive."""
        if not self.active:
            return False
        try:
            self.keepalive()
        except LeaseExpired:
            log.warning("lease %d expired before its keep-alive (ttl %g s)", self.id, self.ttl)
            return False
        except KVError as e:  # unavailable, closed...: tried again at the next period
            if _closed(self._store):
                return False
            log.info("lease %d: keep-alive failed, trying again: %s", self.id, e)
        return True

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        if self.active:
            self.revoke()

    def __repr__(self) -> str:
        state = "expired" if self._expired else "revoked" if self._revoked else "active"
        return f"<kvstore.Lease id={self.id} ttl={self.ttl:g} {state}>"


def _closed(store) -> bool:
    """The store (embedded) or the connection (cluster) was closed: nothing to keep."""
    return bool(getattr(store, "_closed", False)
                or getattr(getattr(store, "_core", None), "_closed", False))


class _KeepAliveTimer:
    """One daemon thread keeping every live ``Lease`` of the process alive every ttl / 3.
    It holds them weakly: a lease nobody holds any more is collected and forgotten."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list = []  # (due, sequence, weakref to a Lease)
        self._seq = 0
        self._thread: threading.Thread | None = None

    def add(self, lease: Lease) -> None:
        with self._cond:
            self._push(lease, time.monotonic())
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="kvstore-lease-keepalive",
                                                daemon=True)
                self._thread.start()
            self._cond.notify()

    def _push(self, lease: Lease, now: float) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (now + lease.ttl / KEEPALIVES_PER_TTL, self._seq,
                                    weakref.ref(lease)))

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    now = time.monotonic()
                    if self._heap and self._heap[0][0] <= now:
                        _due, _seq, ref = heapq.heappop(self._heap)
                        break
                    self._cond.wait(None if not self._heap else self._heap[0][0] - now)
            lease = ref()
            if lease is None:
                continue
            if lease._tick():
                with self._cond:
                    self._push(lease, time.monotonic())
            del lease


_timer_instance: _KeepAliveTimer | None = None
_timer_lock = threading.Lock()


def _timer() -> _KeepAliveTimer:
    global _timer_instance
    with _timer_lock:
        if _timer_instance is None:
            _timer_instance = _KeepAliveTimer()
        return _timer_instance


def _after_fork_in_child() -> None:
    """A child of fork() has no timer thread: it starts its own for its leases."""
    global _timer_instance, _timer_lock
    _timer_instance = None
    _timer_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)

__all__ = ["Lease", "LeaseExpired", "new_lease_id", "lease_id_of", "KEEPALIVES_PER_TTL"]
