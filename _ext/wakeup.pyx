# cython: language_level=3, boundscheck=False, wraparound=False
"""Compiled twin of kvstore/_native/wakeup_py.py: one-shot wake-ups, released without the GIL.

A group commit's leader wakes every writer of its batch once the batch is durable
(``kvstore.embedded.groupcommit``). Waking a sleeping thread is a system call that,
on a virtual machine, sends an inter-processor interrupt: several microseconds
each. Holding the GIL meanwhile stops every Python thread for them (measured: a
third of the GIL's time at 16 writers). ``release_all`` makes those calls with
the GIL released, so the writers already woken run Python meanwhile.

A ``Waiter`` is a ``PyThread`` lock (the C lock under ``threading.Lock``) taken
at creation: ``wait()`` blocks, the GIL released, until it is released once.
"""

from cpython.pythread cimport (NOWAIT_LOCK, WAIT_LOCK, PyThread_acquire_lock,
                               PyThread_allocate_lock, PyThread_free_lock,
                               PyThread_release_lock, PyThread_type_lock)

DEF CHUNK = 64


cdef class Waiter:
    """A one-shot wake-up: ``wait()`` returns once ``release()`` (or ``release_all``)
    released it. Not interruptible: never wait on one in the main thread."""

    cdef PyThread_type_lock _lock
    cdef bint _released

    def __cinit__(self):
        self._lock = PyThread_allocate_lock()
        if self._lock == NULL:
            raise MemoryError("cannot allocate a lock")
        PyThread_acquire_lock(self._lock, NOWAIT_LOCK)
        self._released = False

    def __dealloc__(self):
        if self._lock != NULL:
            if not self._released:
                PyThread_release_lock(self._lock)
            PyThread_free_lock(self._lock)

    def wait(self) -> None:
        """Block (the GIL released) until released."""
        with nogil:
            PyThread_acquire_lock(self._lock, WAIT_LOCK)
        PyThread_release_lock(self._lock)  # it stays open: a second wait returns at once

    def release(self) -> None:
        """Wake the waiter; ``RuntimeError`` if released before."""
        if self._released:
            raise RuntimeError("this Waiter was released already")
        self._released = True
        with nogil:
            PyThread_release_lock(self._lock)

    @property
    def released(self) -> bool:
        return self._released


def release_all(list waiters) -> None:
    """Release every ``Waiter`` of ``waiters``, the GIL released while the threads are
    woken. ``TypeError`` or ``RuntimeError`` (one released before) release none."""
    cdef Py_ssize_t n = len(waiters), i, start, end
    cdef PyThread_type_lock chunk[CHUNK]
    cdef Waiter w
    for i in range(n):
        item = waiters[i]
        if type(item) is not Waiter:  # None too: a typed variable would take it
            raise TypeError(f"expected a Waiter, not {type(item).__name__}")
        if (<Waiter>item)._released:
            raise RuntimeError("a Waiter was released already")
    start = 0
    while start < n:
        end = min(start + CHUNK, n)
        for i in range(start, end):
            w = <Waiter>waiters[i]
            w._released = True
            chunk[i - start] = w._lock
        with nogil:
            for i in range(end - start):
                PyThread_release_lock(chunk[i])
        start = end
