"""The interface every store object has (docs/api.md).

``kvstore.open()`` and ``kvstore.connect()`` both return a ``KV``. The
derived conveniences (context manager, ``run_transaction``) live here once so
that every implementation behaves the same.
"""

from __future__ import annotations

import abc
import random
import time
from typing import Callable, TypeVar

from kvstore.errors import InvalidArgument, TransactionConflict

R = TypeVar("R")


#: How long ``run_transaction`` keeps retrying by default, when no ``retries`` count is
#: given either: a cluster client's own ``timeout`` (``kvstore.connect``), else this.
RUN_TRANSACTION_SECONDS = 5.0
#: Its backoff before retry n: a random pause in [0, min(BASE * 2**n, MAX)) ("full
#: jitter"): racing retries spread out instead of colliding again, and the pause grows
#: with the contention a transaction keeps meeting.
BACKOFF_BASE_SECONDS = 0.0005
BACKOFF_MAX_SECONDS = 0.05


class _DefaultRetries(int):
    """The ``retries`` default: the contract's figure, 10, which as a default is a floor,
    not a limit (``TransactionRetry``). An int, so signatures show ``retries=10``; its
    own type, so a caller's explicit 10 still means "at most 10"."""

    def __repr__(self) -> str:
        return "10"


#: ``run_transaction``'s default ``retries``: at least 10 retries, and more until the deadline.
DEFAULT_RETRIES = _DefaultRetries(10)


class TransactionRetry:
    """``run_transaction``'s retry policy, one for every engine (the sync ``KV`` below,
    ``kvstore.aio``'s ``run_transaction``): which attempt this is, whether a conflict
    is retried, and after what pause.

    A transaction that lost to a concurrent one is retried, with jittered
    exponential backoff, until the deadline (``timeout`` seconds from the call) or
    ``retries`` retries, whichever comes first: ``retries=None`` counts none, and a
    ``timeout`` of None means the store's default (``default_timeout``) unless a
    ``retries`` count is given, which then stands alone, as it did before deadlines
    (``retries=0``: one attempt). The default ``retries`` (``DEFAULT_RETRIES``, 10)
    with no ``timeout`` is a floor instead: at least 10 retries, and more until the
    default deadline, so that the default never gives up on a transaction that merely
    met contention (ten retries lost 27 of 2,000 increments from 8 threads). An attempt
    is never cut short: the deadline only stops new ones. When it gives up,
    ``TransactionConflict`` says what was tried."""

    def __init__(self, fn, retries: int | None, timeout: float | None,
                 default_timeout: float) -> None:
        self.floor = 0
        if retries is DEFAULT_RETRIES:  # not given: a floor with the default deadline
            retries, self.floor = None, (int(DEFAULT_RETRIES) if timeout is None else 0)
        if not callable(fn):
            raise InvalidArgument(f"run_transaction needs a callable, not {type(fn).__name__}")
        if retries is not None and (isinstance(retries, bool) or not isinstance(retries, int)
                                    or retries < 0):
            raise InvalidArgument(f"retries must be an int >= 0 or None, got {retries!r}")
        if timeout is not None and (isinstance(timeout, bool)
                                    or not isinstance(timeout, (int, float))
                                    or not 0 <= timeout < float("inf")):
            raise InvalidArgument(f"timeout must be a number of seconds >= 0 or None, "
                                  f"got {timeout!r}")
        if timeout is None and retries is None:
            timeout = default_timeout
        self.retries = retries
        self.timeout = timeout
        self.started = time.monotonic()
        self.deadline = None if timeout is None else self.started + timeout
        self.attempt = 0  # of the attempt under way: 0 first

    def after_conflict(self, conflict: TransactionConflict) -> float:
        """The attempt under way lost: the seconds to pause before the next one, or
        ``TransactionConflict`` (from ``conflict``) saying what was tried."""
        now = time.monotonic()
        spent = self.retries is not None and self.attempt >= self.retries
        late = self.deadline is not None and now >= self.deadline and self.attempt >= self.floor
        if spent or late:
            attempts = self.attempt + 1
            limits = " and ".join(
                ([f"retries={self.retries}"] if self.retries is not None else [])
                + ([f"timeout={self.timeout:g} s"] if self.timeout is not None else []))
            raise TransactionConflict(
                f"run_transaction gave up after {attempts} attempt{'s' * (attempts > 1)} in "
                f"{now - self.started:.2f} s ({limits}, with backoff), each lost to a "
                f"concurrent transaction; nothing of the last was applied. Raise timeout= "
                f"to keep trying longer, or make fewer transactions write the same keys"
            ) from conflict
        self.attempt += 1
        pause = random.random() * min(BACKOFF_BASE_SECONDS * (1 << min(self.attempt, 20)),
                                      BACKOFF_MAX_SECONDS)
        if self.deadline is not None and now < self.deadline:
            pause = min(pause, self.deadline - now)
        return max(0.0, pause)


class Txn(abc.ABC):
    """A serializable transaction: reads see a snapshot plus the transaction's own writes."""

    @abc.abstractmethod
    def get(self, key: bytes | str) -> bytes | None: ...

    @abc.abstractmethod
    def put(self, key: bytes | str, value: bytes | str) -> None: ...

    @abc.abstractmethod
    def delete(self, key: bytes | str) -> bool: ...

    @abc.abstractmethod
    def scan(self, prefix: bytes | str = b"", start: bytes | str | None = None,
             end: bytes | str | None = None, limit: int | None = None
             ) -> list[tuple[bytes, bytes]]: ...


class KV(abc.ABC):
    """A key-value store: embedded (``kvstore.open``) or remote (``kvstore.connect``)."""

    @abc.abstractmethod
    def get(self, key: bytes | str) -> bytes | None:
        """The value of ``key`` (linearizable), or None."""

    @abc.abstractmethod
    def put(self, key: bytes | str, value: bytes | str, lease=None, ttl: float | None = None) -> None:
        """Store ``value``; durable when this returns. ``lease`` (a ``Lease`` or its id):
        the key lives as long as that lease (``LeaseExpired`` if it is gone: nothing
        written); ``ttl``: the key lives ``ttl`` seconds (a lease of its own, never kept
        alive). A later plain write of the key makes it permanent again (docs/leases.md)."""

    @abc.abstractmethod
    def delete(self, key: bytes | str) -> bool:
        """Remove ``key``; True if it existed."""

    @abc.abstractmethod
    def cas(self, key: bytes | str, expected: bytes | str | None,
            new: bytes | str | None, *, lease=None) -> bool:
        """Set ``key`` to ``new`` if it holds ``expected`` (None: absent / delete).
        ``lease`` (a ``Lease`` or its id): the new value lives as long as that lease, as
        with ``put(..., lease=)`` (``LeaseExpired`` if it is gone: nothing compared or
        written); ``cas(key, None, value, lease=lease)`` creates a key only if absent,
        held by the lease, in one command (``kvstore.recipes.Lock``)."""

    @abc.abstractmethod
    def incr(self, key: bytes | str, delta: int = 1) -> int:
        """Add ``delta`` to the decimal integer at ``key`` (absent: 0) and return the sum:
        one command in the state machine, exact under any concurrency, never a conflict.

        The value is ASCII decimal with an optional sign, in signed 64 bits (written
        back as ``b"%d"``); ``delta`` an int in signed 64 bits. A value that is not such
        an integer, or a sum past 64 bits, raises ``InvalidArgument`` and changes
        nothing (``kvstore.commands.incremented``)."""

    @abc.abstractmethod
    def scan(self, prefix: bytes | str = b"", start: bytes | str | None = None,
             end: bytes | str | None = None, limit: int | None = None
             ) -> list[tuple[bytes, bytes]]:
        """``(key, value)`` pairs in key order; ``start`` inclusive, ``end`` exclusive."""

    @abc.abstractmethod
    def transaction(self):
        """A context manager yielding a ``Txn``; commits on clean exit, discards on error."""

    @abc.abstractmethod
    def status(self) -> dict:
        """At least ``{"nodes": [...], "shards": [...]}``."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release everything; further calls raise ``KVError``."""

    @abc.abstractmethod
    def watch(self, key: bytes | str | None = None, prefix: bytes | str | None = None,
              start_revision=None, *, prev_value: bool = False):
        """Every committed change of ``key``, of keys under ``prefix`` (or of every key)
        as ``kvstore.Event``s: exactly once, in revision order per shard, resumable from
        ``Watch.position``; ``Compacted`` when ``start_revision`` is older than the
        history kept (docs/watch.md)."""

    def lease(self, ttl: float):
        """A ``kvstore.Lease`` of ``ttl`` seconds, granted on every shard and kept alive by
        a background timer (every ``ttl / 3``) while the object lives (docs/leases.md)."""
        from kvstore.commands import check_ttl
        from kvstore.lease import Lease, new_lease_id
        ttl_ms = check_ttl(ttl)
        lease_id = new_lease_id()
        self._lease_grant(lease_id, ttl_ms)
        return Lease(self, lease_id, ttl_ms / 1000)

    def _lease_grant(self, lease_id: int, ttl_ms: int) -> None:
        """Grant lease ``lease_id`` on every shard (each engine's own)."""
        raise InvalidArgument(f"{type(self).__name__} has no leases")

    def _lease_keepalive(self, lease_id: int) -> bool:
        """Refresh it on every shard: False if any shard no longer has it."""
        raise InvalidArgument(f"{type(self).__name__} has no leases")

    def _lease_revoke(self, lease_id: int) -> int:
        """End it on every shard: the keys deleted."""
        raise InvalidArgument(f"{type(self).__name__} has no leases")

    def run_transaction(self, fn: Callable[[Txn], R], retries: int | None = DEFAULT_RETRIES, *,
                        timeout: float | None = None) -> R:
        """``fn(txn)`` in a transaction, retried on ``TransactionConflict``; its result.

        A conflict is retried with jittered exponential backoff until ``timeout``
        seconds have passed since the call or ``retries`` retries were made,
        whichever comes first (``TransactionRetry``). By default (neither given) it
        retries at least 10 times and until the store's default deadline: a cluster
        client's ``timeout``, 5 s for the embedded store. ``retries`` given alone bounds
        only the count (``retries=0``: one attempt); ``timeout`` alone only the time. Then ``TransactionConflict`` says
        how many attempts were made in how long. ``fn`` may run several times, so it
        must not have side effects outside the transaction; any other error is
        raised at once, without retry.
        """
        retry = TransactionRetry(fn, retries, timeout, self._run_transaction_timeout())
        txn = None
        while True:
            txn = self._attempt_transaction(txn, retry.attempt)
            try:
                with txn:
                    result = fn(txn)
                return result
            except TransactionConflict as conflict:
                pause = retry.after_conflict(conflict)
            time.sleep(pause)

    def _run_transaction_timeout(self) -> float:
        """``run_transaction``'s default deadline, in seconds."""
        return RUN_TRANSACTION_SECONDS

    def _attempt_transaction(self, previous: Txn | None, attempt: int) -> Txn:
        """The transaction for ``run_transaction``'s attempt ``attempt`` (0 first), given
        the one that lost the previous attempt; a cluster takes the reads of a
        transaction that keeps losing by locking them (``kvstore.client.txn``)."""
        return self.transaction()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
