"""Waiting for another thread, in a way an interrupt in the main thread cannot wedge.

Python runs signal handlers in the main thread between bytecodes, and one that
raises (Ctrl-C's ``KeyboardInterrupt``, a SIGALRM handler's) can land inside the
Python code of ``threading.Condition`` and ``threading.Event``: right after
``Condition.__enter__`` took the lock (left held for ever: every other thread
that takes it hangs), or in ``wait`` between releasing and taking it back (the
``with`` then releases it twice: ``RuntimeError``). A CI run of the embedded
store hung on this (``Thread.start``'s ``Event.wait``: kvstore.embedded.groupcommit),
and the store's own conditions, reachable from the main thread (a read during a
commit, a watch, a checkpoint), had the same windows.

``Wakeups`` waits holding no lock: a waiter looks at the state under a plain C
lock (``with lock:`` is safe: the lock is taken inside one C call and the block
protected from the next bytecode on), registers a one-shot lock there, and blocks on
that alone; an interrupt there leaves nothing held. It looks again at least every
``POLL_SECONDS``, so a wake-up lost to an interrupted notifier costs that much
latency, never a hang.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

_allocate_lock = threading.Lock
#: The longest a waiter sleeps before it looks at the state again (a lost wake-up's cost).
POLL_SECONDS = 0.25


class Wakeups:
    """The threads waiting for a change of state that ``lock`` (a plain lock) guards."""

    def __init__(self, lock: threading.Lock | None = None) -> None:
        self.lock = lock if lock is not None else threading.Lock()
        self._waiters: list = []  # one-shot locks, held until released by notify_all

    @property
    def waiting(self) -> bool:
        return bool(self._waiters)

    def notify_all(self) -> None:
        """Wake every waiter; call it holding ``lock``."""
        waiters, self._waiters = self._waiters, []  # no call: the list is taken whole
        for waiter in waiters:
            waiter.release()

    def wait_for(self, ready: Callable[[], bool], timeout: float | None = None) -> bool:
        """Return True once ``ready()`` (called holding ``lock``) is true, False once
        ``timeout`` seconds (None: no limit) passed first. Call it without ``lock``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self.lock:
                if ready():
                    return True
                sleep = POLL_SECONDS
                if deadline is not None:
                    sleep = min(sleep, deadline - time.monotonic())
                    if sleep <= 0:
                        return False
                waiter = _allocate_lock()
                waiter.acquire()
                self._waiters.append(waiter)
            try:
                waiter.acquire(True, sleep)
            finally:
                with self.lock:  # not woken: no longer waiting (a leftover is harmless)
                    if waiter in self._waiters:
                        self._waiters.remove(waiter)


__all__ = ["Wakeups", "POLL_SECONDS"]
