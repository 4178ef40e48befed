"""Pure-Python reference of the wake-up kernel (twin of ``_ext/wakeup.pyx``).

A ``Waiter`` is a one-shot wake-up for a group commit's writer
(``kvstore.embedded.groupcommit``): ``wait()`` blocks until it is released once.
``release_all`` releases a batch's waiters; the compiled twin does it with the
GIL released (waking a thread is a system call of several microseconds on a
virtual machine, which would otherwise stop every Python thread), this one
holding it. Either way a waiter released twice is a ``RuntimeError``.
"""

from __future__ import annotations

import threading

_allocate_lock = threading.Lock


class Waiter:
    """A one-shot wake-up: ``wait()`` returns once ``release()`` (or ``release_all``)
    released it. Never wait on one in the main thread (the compiled twin's wait
    cannot be interrupted)."""

    __slots__ = ("_lock", "released")

    def __init__(self) -> None:
        self._lock = _allocate_lock()
        self._lock.acquire()
        self.released = False

    def wait(self) -> None:
        """Block until released."""
        self._lock.acquire()
        self._lock.release()  # it stays open: a second wait returns at once

    def release(self) -> None:
        """Wake the waiter; ``RuntimeError`` if released before."""
        if self.released:
            raise RuntimeError("this Waiter was released already")
        self.released = True
        self._lock.release()


def release_all(waiters: list) -> None:
    """Release every ``Waiter`` of ``waiters``. ``TypeError`` or ``RuntimeError`` (one
    released before) release none."""
    for w in waiters:
        if type(w) is not Waiter:
            raise TypeError(f"expected a Waiter, not {type(w).__name__}")
        if w.released:
            raise RuntimeError("a Waiter was released already")
    for w in waiters:
        w.released = True
        w._lock.release()


__all__ = ["Waiter", "release_all"]
