"""One client object shared the ways web servers share it, against real servers: by many
threads at once while the leader is killed, and across ``os.fork()``.

API.md section 1: "One client object may be shared by any number of threads, and a
client created before ``os.fork()`` keeps working in the child". Section 2: a write that
raised ``Unavailable`` has an unknown outcome, so the counters below are checked as
``acknowledged <= final <= acknowledged + unknown``.
"""

from __future__ import annotations

import asyncio
import os
import select
import signal
import sys
import threading
import time
import traceback

import pytest

import kvstore
import kvstore.aio

pytestmark = pytest.mark.timeout(120)


class Counter:
    """Threads incrementing one key by get + cas through one shared client, tallying what
    they saw: ``acked`` increments acknowledged, ``unknown`` cas calls that raised
    ``Unavailable`` (applied or not), ``errors`` every error with the phase it came in."""

    def __init__(self, client, key: bytes = b"counter") -> None:
        self.client = client
        self.key = key
        self.lock = threading.Lock()
        self.acked = 0
        self.unknown = 0
        self.errors: list = []
        self.phase = "healthy"
        self.stop = threading.Event()
        self.progress = threading.Condition(self.lock)

    def run(self) -> None:
        c = self.client
        while not self.stop.is_set():
            try:
                value = c.get(self.key)
            except kvstore.KVError as e:
                self._error("get", e)
                continue
            try:
                done = c.cas(self.key, value, b"%d" % (int(value or 0) + 1))
            except kvstore.KVError as e:
                with self.lock:
                    self.unknown += isinstance(e, kvstore.Unavailable)
                self._error("cas", e)
                continue
            if done:
                with self.lock:
                    self.acked += 1
                    self.progress.notify_all()

    def _error(self, call: str, e: Exception) -> None:
        with self.lock:
            self.errors.append((self.phase, call, type(e).__name__, str(e)))

    def wait_acked(self, n: int, timeout: float) -> None:
        """Until ``n`` more increments are acknowledged (bounded)."""
        with self.lock:
            target = self.acked + n
            assert self.progress.wait_for(lambda: self.acked >= target, timeout), (
                f"{self.acked} increments acknowledged, expected {target} within {timeout} s "
                f"(errors: {self.errors[:3]})")


@pytest.mark.parametrize("nthreads", [8, 32])
def test_one_client_shared_by_threads_through_a_leader_kill(three_nodes, nthreads):
    """Every thread of a web server shares one client. Before the fix, a write's seq was
    drawn by the caller thread and could reach the I/O thread after a higher one whose
    floor had already passed it: the node ignored it and the call ended, on a healthy
    cluster, in ``Unavailable: no server answered within 5.0 s``."""
    lc, leader = three_nodes
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # threads switch often: races show in fewer calls
    try:
        with lc.client() as c:
            counter = Counter(c)
            threads = [threading.Thread(target=counter.run) for _ in range(nthreads)]
            for t in threads:
                t.start()
            try:
                counter.wait_acked(400, 30)
                counter.phase = "leader killed"
                lc.kill(leader, signal.SIGKILL)
                counter.wait_acked(100, 30)
                counter.phase = "after failover"
                counter.wait_acked(300, 30)
            finally:
                counter.stop.set()
                for t in threads:
                    t.join(30)
            final = int(c.get(counter.key))
    finally:
        sys.setswitchinterval(old)
    # every error is the contract's Unavailable (outcome unknown), and only where a node
    # died: none on a healthy cluster
    assert all(kind in ("Unavailable", "Timeout") for _, _, kind, _ in counter.errors), \
        counter.errors
    spurious = [e for e in counter.errors if e[0] != "leader killed"]
    assert not spurious, f"{len(spurious)} errors on a healthy cluster, e.g. {spurious[:3]}"
    assert counter.acked <= final <= counter.acked + counter.unknown, \
        (counter.acked, counter.unknown, final)


def run_in_child(fn, timeout: float = 20.0) -> None:
    """Fork; run ``fn()`` in the child, which then exits at once (``os._exit``: none of
    the parent's cleanup runs twice). The child reports through a pipe, whose end of file
    is awaited, bounded: a child still running at ``timeout`` is killed and fails the test."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        code = 1
        try:
            os.close(r)
            fn()
            os.write(w, b"ok")
            code = 0
        except BaseException:
            os.write(w, traceback.format_exc()[-4000:].encode())
        finally:
            os._exit(code)
    os.close(w)
    report, hung = b"", False
    deadline = time.monotonic() + timeout
    try:
        while True:
            ready, _, _ = select.select([r], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                hung = True
                os.kill(pid, signal.SIGKILL)
                break
            data = os.read(r, 65536)
            if not data:
                break
            report += data
    finally:
        os.close(r)
        _, status = os.waitpid(pid, 0)
    assert not hung, f"the child hung: killed after {timeout} s ({report.decode()!r})"
    assert report == b"ok" and os.waitstatus_to_exitcode(status) == 0, report.decode()


def test_a_client_made_before_fork_works_in_the_child_and_still_in_the_parent(three_nodes):
    """``gunicorn --preload``: the app connects, then the server forks its workers. The
    child's first call starts its own sockets and I/O thread (before the fix it waited
    on the parent's, which the fork left behind, and failed with ``Timeout`` after
    10 s); the parent's client goes on working, even with calls in flight at the fork."""
    lc, _leader = three_nodes
    with lc.client() as c:
        c.put(b"k", b"parent")
        stop = threading.Event()
        busy_errors: list = []

        def busy() -> None:  # the parent's other threads keep calling across the fork
            i = 0
            while not stop.is_set():
                try:
                    c.put(b"busy", b"%d" % i)
                    c.get(b"busy")
                except kvstore.KVError as e:
                    busy_errors.append(e)
                i += 1

        threads = [threading.Thread(target=busy) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            def child() -> None:
                assert c.get(b"k") == b"parent"
                c.put(b"child", b"1")
                assert c.cas(b"k", b"parent", b"child")
                results: list = []
                workers = [threading.Thread(target=lambda: results.append(
                    c.run_transaction(lambda t: t.get(b"child")))) for _ in range(4)]
                for t in workers:
                    t.start()
                for t in workers:
                    t.join(15)
                assert results == [b"1"] * 4, results
                c.close()

            for _ in range(2):  # a second child of the same parent's client too
                run_in_child(child)
                c.put(b"k", b"parent")
        finally:
            stop.set()
            for t in threads:
                t.join(15)
        assert not busy_errors, busy_errors[:3]
        assert c.get(b"child") == b"1"  # the child's writes reached the cluster
        c.put(b"after", b"fork")
        assert c.get(b"after") == b"fork"


def test_an_asyncio_client_serves_a_new_event_loop_and_a_forked_child(three_nodes):
    """An ``AsyncKV`` made under one ``asyncio.run()`` (the loop then closes) serves the
    next loop, in the parent and in a forked child; before the fix its answers went to
    the closed loop and every later call hung."""
    lc, _leader = three_nodes

    async def make():
        a = await kvstore.aio.connect(lc.address_list)
        await a.put(b"ak", b"parent")
        return a

    a = asyncio.run(make())

    async def use(tag: bytes) -> None:
        async def bump(txn):
            await txn.put(b"a-" + tag, b"%d" % (int(await txn.get(b"a-" + tag) or 0) + 1))

        await asyncio.wait_for(asyncio.gather(*(a.run_transaction(bump) for _ in range(5))), 15)
        assert await asyncio.wait_for(a.get(b"a-" + tag), 15) == b"5"
        assert await asyncio.wait_for(a.get(b"ak"), 15) == b"parent"

    run_in_child(lambda: asyncio.run(use(b"child")))
    asyncio.run(use(b"parent"))
    asyncio.run(a.close())
    with lc.client() as c:
        assert c.get(b"a-child") == b"5"
