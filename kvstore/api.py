"""The interface every store object has (shared/API.md section 1).

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


def check_run_transaction(fn, retries) -> None:
    """The arguments of ``run_transaction`` (sync and asyncio alike)."""
    if not callable(fn):
        raise InvalidArgument(f"run_transaction needs a callable, not {type(fn).__name__}")
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise InvalidArgument(f"retries must be an int >= 0, got {retries!r}")


def retry_backoff_seconds(attempt: int) -> float:
    """Jittered backoff before retry ``attempt``, so racing retries spread out instead of
    colliding again."""
    return random.random() * min(0.0005 * (1 << attempt), 0.05)


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
    def put(self, key: bytes | str, value: bytes | str) -> None:
        """Store ``value``; durable when this returns."""

    @abc.abstractmethod
    def delete(self, key: bytes | str) -> bool:
        """Remove ``key``; True if it existed."""

    @abc.abstractmethod
    def cas(self, key: bytes | str, expected: bytes | str | None,
            new: bytes | str | None) -> bool:
        """Set ``key`` to ``new`` if it holds ``expected`` (None: absent / delete)."""

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

    def run_transaction(self, fn: Callable[[Txn], R], retries: int = 10) -> R:
        """``fn(txn)`` in a transaction, retried on ``TransactionConflict``.

        ``fn`` may run up to ``retries + 1`` times, so it must not have side
        effects outside the transaction. The last conflict is re-raised.
        """
        check_run_transaction(fn, retries)
        attempt = 0
        txn = None
        while True:
            txn = self._attempt_transaction(txn, attempt)
            try:
                with txn:
                    result = fn(txn)
                return result
            except TransactionConflict:
                if attempt >= retries:
                    raise
                attempt += 1
                time.sleep(retry_backoff_seconds(attempt))

    def _attempt_transaction(self, previous: Txn | None, attempt: int) -> Txn:
        """The transaction for ``run_transaction``'s attempt ``attempt`` (0 first), given
        the one that lost the previous attempt; a cluster takes the reads of a
        transaction that keeps losing by locking them (``kvstore.client.txn``)."""
        return self.transaction()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
