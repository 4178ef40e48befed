"""Wake-ups (``Waiter``, ``release_all``): the compiled twin and the pure one behave alike.

The group commit's writers wait on them (``kvstore.embedded.groupcommit``); a lost or
doubled wake-up would hang a writer or answer it before its write is durable.
"""

from __future__ import annotations

import threading

import pytest

from kernel_impls import WAKEUP

IMPLS = pytest.mark.parametrize("impl", sorted(WAKEUP))


def waiting_threads(waiters):
    """A started thread per waiter, each blocked in ``wait()``, and what each has seen."""
    woken = [threading.Event() for _ in waiters]

    def wait(i):
        waiters[i].wait()
        woken[i].set()

    threads = [threading.Thread(target=wait, args=(i,), daemon=True)
               for i in range(len(waiters))]
    for t in threads:
        t.start()
    return threads, woken


@IMPLS
def test_wait_blocks_until_released_and_then_stays_open(impl):
    waiter = WAKEUP[impl].Waiter()
    assert waiter.released is False
    (thread,), (woken,) = waiting_threads([waiter])
    assert not woken.wait(0.05)  # still blocked: nobody released it
    waiter.release()
    assert woken.wait(10)
    thread.join(10)
    assert waiter.released is True
    waiter.wait()  # a second wait returns at once


@IMPLS
def test_a_waiter_released_twice_is_an_error(impl):
    waiter = WAKEUP[impl].Waiter()
    waiter.release()
    with pytest.raises(RuntimeError):
        waiter.release()


@IMPLS
@pytest.mark.parametrize("n", [0, 1, 3, 64, 65, 200])  # 64: the compiled twin's chunk
def test_release_all_wakes_every_waiter(impl, n):
    kernel = WAKEUP[impl]
    waiters = [kernel.Waiter() for _ in range(n)]
    threads, woken = waiting_threads(waiters)
    kernel.release_all(waiters)
    for t, event in zip(threads, woken):
        assert event.wait(10)
        t.join(10)
    assert all(w.released for w in waiters)


@IMPLS
def test_release_all_refuses_a_list_it_cannot_release_whole(impl):
    """A non-Waiter or one released before: an error, and none released."""
    kernel = WAKEUP[impl]
    for bad in ("not a waiter", "None", "released"):
        waiters = [kernel.Waiter() for _ in range(3)]
        if bad == "released":
            waiters[2].release()
        else:
            waiters.append(object() if bad == "not a waiter" else None)
        with pytest.raises(RuntimeError if bad == "released" else TypeError):
            kernel.release_all(waiters)
        assert [w.released for w in waiters[:2]] == [False, False]
