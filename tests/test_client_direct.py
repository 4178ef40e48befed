"""The blocking client's direct path (``ClientCore._call_direct``): one call at a time, the
caller's thread sends and polls itself; what it cannot finish goes to the I/O thread as
the same call, so a write stays exactly-once and other threads' writes never pass it."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

import kvstore
from kvstore.client.core import DIRECT_ATTEMPT_SECONDS

pytestmark = pytest.mark.timeout(120)


def _until(predicate, seconds: float = 10.0) -> None:
    """Wait (bounded) for a state of the client that no event announces."""
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "the client never got there"
        time.sleep(0.001)


def test_lone_calls_go_direct_and_answer_as_through_the_io_thread(three_nodes):
    lc, _leader = three_nodes
    with kvstore.connect(lc.address_list, timeout=10) as c:
        c.put(b"k", b"v")  # learns the leader
        before = c._core.direct_calls
        for i in range(20):
            c.put(b"k%d" % i, b"v%d" % i)
        assert [c.get(b"k%d" % i) for i in range(20)] == [b"v%d" % i for i in range(20)]
        assert c.get(b"absent") is None
        assert c.incr(b"n") == 1 and c.incr(b"n", 2) == 3
        assert c._core.direct_calls - before == 43
        with pytest.raises(kvstore.InvalidArgument):
            c.incr(b"k", 1)  # not a number: the node refuses; the error is the same class
        assert c._core.direct_handed_over == 0


def test_a_direct_write_unanswered_is_handed_over_as_the_same_write_below_every_floor(three_nodes):
    """The leader stopped: a direct incr gets no answer in time and goes to the I/O thread
    with its seq; meanwhile another thread's puts take the I/O thread, their floor at
    most that seq. Once the leader runs again, every call is answered and the incr was
    applied once (a new seq would apply it twice; a floor above it would leave it
    unanswered until its deadline)."""
    lc, leader = three_nodes
    with kvstore.connect(lc.address_list, timeout=15) as c:
        c.put(b"warm", b"up")
        core = c._core
        outcome: dict = {}

        def run(name, fn):
            try:
                outcome[name] = fn()
            except Exception as e:  # noqa: BLE001 (reported by the assertion below)
                outcome[name] = e

        pid = lc.procs[leader].pid
        os.kill(pid, signal.SIGSTOP)
        try:
            a = threading.Thread(target=run, args=("incr", lambda: c.incr(b"n")))
            a.start()
            _until(lambda: core._direct_active)
            b = threading.Thread(target=run, args=(
                "puts", lambda: [c.put(b"p%d" % i, b"x") for i in range(3)]))
            b.start()
            _until(lambda: core.direct_handed_over == 1, DIRECT_ATTEMPT_SECONDS + 10)
        finally:
            os.kill(pid, signal.SIGCONT)
        a.join(30)
        b.join(30)
        assert outcome == {"incr": 1, "puts": [None, None, None]}, outcome
        assert c.incr(b"n") == 2  # the first incr was applied once
        assert [c.get(b"p%d" % i) for i in range(3)] == [b"x"] * 3


def test_the_asyncio_client_goes_direct_one_call_at_a_time_and_hands_over_when_unanswered(
        three_nodes):
    """The event loop sends a lone put or get itself and awaits the answer on the direct
    socket's descriptor; with the leader stopped, the incr goes to the I/O thread as the
    same write (applied once) while the loop stays free for other coroutines."""
    import asyncio

    import kvstore.aio
    lc, leader = three_nodes

    async def main():
        async with await kvstore.aio.connect(lc.address_list, timeout=15) as db:
            await db.put(b"warm", b"up")
            core = db._core
            before = core.direct_calls
            for i in range(10):
                await db.put(b"a%d" % i, b"%d" % i)
            assert [await db.get(b"a%d" % i) for i in range(10)] == [b"%d" % i
                                                                    for i in range(10)]
            assert core.direct_calls - before == 20
            many = await asyncio.gather(*(db.get(b"a%d" % (i % 10)) for i in range(200)))
            assert many == [b"%d" % (i % 10) for i in range(200)]
            pid = lc.procs[leader].pid
            os.kill(pid, signal.SIGSTOP)
            try:
                incr = asyncio.ensure_future(db.incr(b"n"))
                ticks = 0
                while core.direct_handed_over == 0:  # the loop is not blocked meanwhile
                    await asyncio.sleep(0.01)
                    ticks += 1
                    assert ticks < 1000
                assert ticks >= 5
            finally:
                os.kill(pid, signal.SIGCONT)
            assert await incr == 1
            assert await db.incr(b"n") == 2

    asyncio.run(main())


def test_an_event_loop_that_cannot_watch_a_descriptor_takes_the_io_threads_way(three_nodes):
    """A loop without ``add_reader`` (Windows' proactor): the first direct call is handed
    over (answered all the same), and the client goes through the I/O thread after."""
    import asyncio

    import kvstore.aio
    lc, _leader = three_nodes

    class NoReaders(asyncio.SelectorEventLoop):
        def add_reader(self, *args):
            raise NotImplementedError

    async def main():
        async with await kvstore.aio.connect(lc.address_list, timeout=10) as db:
            for i in range(5):
                await db.put(b"k%d" % i, b"v")
            assert await db.get(b"k4") == b"v" and await db.incr(b"n") == 1
            return db._core.direct_calls, db._core.direct_handed_over

    loop = NoReaders()
    try:
        direct, handed = loop.run_until_complete(main())
    finally:
        loop.close()
    assert direct == handed == 1  # the first went direct, was handed over; none after
