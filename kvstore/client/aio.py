"""``await kvstore.aio.connect(addresses, timeout=...)``: the asyncio client.

The same calls as ``kvstore.connect`` (``shared/API.md`` section 1), as
coroutines, with the same errors. It shares the synchronous client's engine
(``kvstore.client.core.ClientCore``: one I/O thread, a DEALER per node, routing,
leader hints, retries with a request id, deadlines): each call hands it a
request and awaits its ``concurrent.futures.Future`` through
``asyncio.wrap_future``, so any number of requests are in flight on one
connection and the event loop never blocks on a socket. One call at a time, a put or
a get skips the I/O thread: the event loop sends it on the engine's direct socket and
awaits its answer on that socket's descriptor (``AsyncKV._call_direct``; the rules of
``ClientCore._call_direct``).

    import asyncio, kvstore.aio

    async def main():
        async with await kvstore.aio.connect("tcp://127.0.0.1:7001") as db:
            await db.put(b"k", b"v")
            print(await db.get(b"k"))
            await asyncio.gather(*(db.put(b"k%d" % i, b"v") for i in range(100)))

    asyncio.run(main())
"""

from __future__ import annotations

import asyncio
import threading
import time

import zmq

from kvstore.api import DEFAULT_RETRIES, TransactionRetry
from kvstore.client import requests
from kvstore.client.cache import DEFAULT_BYTES, DEFAULT_STALENESS, MISS, UNCACHED
from kvstore.client.watch import POLL_MAX_BYTES, AsyncWatch, Watch
from kvstore.client.core import renew_locks_after_fork
from kvstore.client.direct import (DIRECT_ATTEMPT_SECONDS, DIRECT_HAND_OVER, DIRECT_NEW_WRITE,
                                   DIRECT_OPS)
from kvstore.client.kv import ClusterKV
from kvstore.client.txn import ClusterTxn, Detached, lock_keys_for
from kvstore.client.lease import AsyncLease
from kvstore.commands import check_ttl, incr_result
from kvstore.lease import new_lease_id
from kvstore.errors import InvalidArgument, KVError, TransactionConflict
from kvstore.transport.sockets import EVENTS, POLLIN


async def connect(addresses, timeout: float = 5.0, *, keys=None, cache=None,
                  cache_staleness: float = DEFAULT_STALENESS,
                  cache_bytes: int = DEFAULT_BYTES, one_round_commit: bool = True) -> "AsyncKV":
    """Connect to the cluster at ``addresses`` (``Unavailable`` if no node answers);
    ``cache`` and ``one_round_commit``: as ``kvstore.connect``'s (docs/cache.md)."""
    loop = asyncio.get_running_loop()
    kv = await loop.run_in_executor(None, ClusterKV, addresses, timeout, keys, cache,
                                    cache_staleness, cache_bytes, one_round_commit)
    return AsyncKV(kv)


class AsyncKV:
    """The ``KV`` interface as coroutines; many calls may be in flight at once."""

    def __init__(self, kv: ClusterKV) -> None:
        self._kv = kv
        self._core = kv._core
        self._done: dict = {}  # event loop -> [(engine future, asyncio future)], completed
        self._done_lock = threading.Lock()
        self._direct_unsupported = False  # this event loop cannot watch a descriptor
        renew_locks_after_fork(self)

    def _renew_locks(self) -> None:
        """In a child, right after ``os.fork()``: the parent's I/O thread may have held
        the lock, and what it queued was for the parent's loops."""
        self._done_lock = threading.Lock()
        self._done = {}

    async def _call(self, op: str, shard, payload):
        if op in DIRECT_OPS and not self._direct_unsupported:
            call = self._core._claim_direct(op, shard, payload, None)
            if call is not None:
                return await self._call_direct(call)
        return await self._await(self._core.submit(op, shard, payload))

    async def _call_batch(self, batch) -> list:
        """Every call of ``batch`` (``[(op, shard, payload)]``) at once; their results, or
        the ``KVError`` each raised. On the direct path when it is free (a transaction's
        prepares: no hand-over to the I/O thread and back for any of them), else each
        as ``_call``."""
        core = self._core
        calls = None if self._direct_unsupported else core._claim_direct_batch(batch, None)
        if calls is None:
            return await asyncio.gather(*(self._call(op, shard, payload)
                                          for op, shard, payload in batch),
                                        return_exceptions=True)
        handed: set = set()
        try:
            socks = core._direct_send_batch(calls)
            replies = await self._direct_replies(calls, socks)

            async def settle(call, sock):
                reply = replies.get(call.request_id) if sock is not None else None
                try:
                    return await self._direct_result(call, core._direct_outcome(call, reply),
                                                     handed)
                except KVError as e:
                    return e

            return await asyncio.gather(*(settle(c, s) for c, s in zip(calls, socks)))
        finally:
            core._direct_release_batch(calls, handed)

    async def _direct_replies(self, calls, socks) -> dict:
        """Request id -> ``(status, value)`` of the replies to ``calls`` on their direct
        sockets (None: not sent), as they come, until all are in or
        ``DIRECT_ATTEMPT_SECONDS`` (or the deadline) pass; as ``_direct_reply``."""
        loop = asyncio.get_running_loop()
        by_id = {c.request_id: c for c, s in zip(calls, socks) if s is not None}
        watched = {c.sent_to: s for c, s in zip(calls, socks) if s is not None}
        replies: dict = {}
        end = min(time.monotonic() + DIRECT_ATTEMPT_SECONDS, min(c.deadline for c in calls))
        while len(replies) < len(by_id):
            ready_now = False
            for address, sock in watched.items():
                if sock.getsockopt(EVENTS) & POLLIN:
                    self._core._direct_take_batch(sock, address, by_id, replies)
                    ready_now = True
            if ready_now:
                continue
            left = end - time.monotonic()
            if left <= 0:
                break
            ready = loop.create_future()
            wake = lambda: ready.done() or ready.set_result(None)  # noqa: E731
            fds = [sock.getsockopt(zmq.FD) for sock in watched.values()]
            try:
                for fd in fds:
                    loop.add_reader(fd, wake)
            except NotImplementedError:  # a loop without readers: the I/O thread's way
                self._direct_unsupported = True
                break
            timer = loop.call_later(left, wake)
            try:
                await ready
            finally:
                timer.cancel()
                for fd in fds:
                    loop.remove_reader(fd)
        return replies

    async def _await(self, future):
        """The outcome of an engine ``future``, awaited in the running loop."""
        # the loop that awaits now, not the one that connected: a client made under one
        # asyncio.run() (or before a fork) serves the next loop too
        waiter = asyncio.get_running_loop().create_future()
        future.add_done_callback(lambda f: self._completed(f, waiter))
        return await waiter

    async def _call_direct(self, call):
        """One call at a time, from the event loop itself (``ClientCore._call_direct``):
        sent on the engine's direct socket, its answer awaited on that socket's file
        descriptor in this loop; no hand-over to the I/O thread and back (two thread
        wake-ups) unless the plain answer does not come."""
        core = self._core
        handed: set = set()
        try:
            sock = core._direct_send(call)
            reply = None if sock is None else await self._direct_reply(sock, call)
            return await self._direct_result(call, core._direct_outcome(call, reply), handed)
        finally:
            core._direct_release(call, bool(handed))

    async def _direct_result(self, call, outcome, handed: set):
        """The answer to a direct ``call`` whose ``_direct_outcome`` is ``outcome``: a write
        the engine must send anew goes through it; a call handed over to the I/O thread
        (its request id then joins ``handed``) is awaited from there; else ``outcome``."""
        core = self._core
        if outcome is DIRECT_NEW_WRITE:
            return await self._await(core.submit(call.op, call.shard, call.payload,
                                                 max(0.001, call.deadline - time.monotonic())))
        if outcome is DIRECT_HAND_OVER:
            if core._hand_over(call):
                handed.add(call.request_id)
            return await self._await(call.future)
        return outcome

    async def _direct_reply(self, sock, call):
        """``(status, value)`` of ``call``'s reply on ``sock``, or None after
        ``DIRECT_ATTEMPT_SECONDS`` (or the deadline). ZeroMQ's descriptor only says
        that its events may have changed: ``EVENTS`` is read before each wait (which
        also rearms it), so no arrival is missed."""
        loop = asyncio.get_running_loop()
        end = min(time.monotonic() + DIRECT_ATTEMPT_SECONDS, call.deadline)
        fd = sock.getsockopt(zmq.FD)
        while True:
            if sock.getsockopt(EVENTS) & POLLIN:
                reply = self._core._direct_take(sock, call)
                if reply is not None:
                    return reply
                continue
            left = end - time.monotonic()
            if left <= 0:
                return None
            ready = loop.create_future()
            wake = lambda: ready.done() or ready.set_result(None)  # noqa: E731
            try:
                loop.add_reader(fd, wake)
            except NotImplementedError:  # a loop without readers (Windows' proactor):
                self._direct_unsupported = True  # the I/O thread's way from now on
                return None
            timer = loop.call_later(left, wake)
            try:
                await ready
            finally:
                timer.cancel()
                loop.remove_reader(fd)

    def _completed(self, future, waiter) -> None:
        """On the engine's I/O thread: queue the outcome; wake the waiter's event loop
        once per batch of completions (``call_soon_threadsafe`` writes to its self-pipe)."""
        loop = waiter.get_loop()
        with self._done_lock:
            done = self._done.get(loop)
            first = done is None
            if first:
                done = self._done[loop] = []
            done.append((future, waiter))
        if first:
            try:
                loop.call_soon_threadsafe(self._deliver, loop)
            except RuntimeError:  # the loop is closed: nobody awaits any more
                with self._done_lock:
                    self._done.pop(loop, None)

    def _deliver(self, loop) -> None:
        with self._done_lock:
            done = self._done.pop(loop, ())
        for future, waiter in done:
            if waiter.cancelled():
                continue
            e = future.exception()
            if e is not None:
                waiter.set_exception(e)
            else:
                waiter.set_result(future.result())

    async def get(self, key):
        request = requests.get(self._kv.nshards, key)
        cache = self._kv._cache
        cached = UNCACHED if cache is None else cache.lookup(request[2][1])
        if cached is UNCACHED:
            return await self._call(*request)
        if type(cached) is not tuple or cached[0] is not MISS:
            return cached
        ticket = cached[1]
        try:
            value, revision = await self._call(*requests.get_with_revision(request))
        except BaseException:
            cache.abandon(ticket)
            raise
        cache.fill(ticket, value, revision)
        return value

    def watch(self, key=None, prefix=None, start_revision=None, *,
              prev_value: bool = False, max_bytes: int = POLL_MAX_BYTES) -> AsyncWatch:
        """``async for event in db.watch(prefix=...)``: as ``kvstore.connect``'s watch.
        Where the shards stand now is asked at once, without blocking the loop;
        ``await w.started()`` waits for the answers. ``max_bytes``: the events one poll
        asks for, so what the watch buffers per shard (at least one revision); a process
        holding many watches for slow consumers (the HTTP gateway) asks for less."""
        self._kv._core_check()
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
            raise InvalidArgument(f"max_bytes must be a positive int, got {max_bytes!r}")
        return AsyncWatch(Watch(self._core, self._kv.nshards, key, prefix, start_revision,
                                prev_value, wait_for_start=False, max_bytes=max_bytes))

    def cache_stats(self) -> dict:
        return self._kv.cache_stats()

    async def put(self, key, value, lease=None, ttl=None) -> None:
        request = requests.put(self._kv.nshards, key, value, lease, ttl)
        requests.put_result(request, await self._call(*request))

    async def lease(self, ttl: float) -> "AsyncLease":
        """A lease of ``ttl`` seconds granted on every shard, kept alive by a task of this
        event loop while the object lives (``kvstore.client.lease``)."""
        ttl_ms = check_ttl(ttl)
        lease_id = new_lease_id()
        await asyncio.gather(*(self._call(*r) for r in
                               requests.lease_grant(self._kv.nshards, lease_id, ttl_ms)))
        return AsyncLease(self, lease_id, ttl_ms / 1000)

    async def delete(self, key) -> bool:
        return bool(await self._call(*requests.delete(self._kv.nshards, key)))

    async def cas(self, key, expected, new, *, lease=None) -> bool:
        request = requests.cas(self._kv.nshards, key, expected, new, lease)
        return requests.cas_result(request, await self._call(*request))

    async def incr(self, key, delta=1) -> int:
        request = requests.incr(self._kv.nshards, key, delta)
        return incr_result(request[2], await self._call(*request))

    async def scan(self, prefix=b"", start=None, end=None, limit=None):
        batch, limit = requests.scan(self._kv.nshards, prefix, start, end, limit)
        parts = await asyncio.gather(*(self._call(*r) for r in batch))
        return requests.merge_scan(parts, limit)

    def transaction(self) -> "AsyncTxn":
        self._kv._core_check()
        return AsyncTxn(self)

    async def run_transaction(self, fn, retries: int | None = DEFAULT_RETRIES, *,
                              timeout: float | None = None):
        """``await fn(txn)`` in a transaction, retried on ``TransactionConflict`` as
        ``kvstore.KV.run_transaction`` retries (``kvstore.api.TransactionRetry``)."""
        retry = TransactionRetry(fn, retries, timeout, self._kv._run_transaction_timeout())
        txn = None
        while True:
            self._kv._core_check()
            txn = AsyncTxn(self, lock_keys_for(txn and txn._t, retry.attempt))
            try:
                async with txn:
                    result = await fn(txn)
                return result
            except TransactionConflict as conflict:
                pause = retry.after_conflict(conflict)
            await asyncio.sleep(pause)

    async def status(self) -> dict:
        return await asyncio.get_running_loop().run_in_executor(None, self._kv.status)

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._kv.close)

    async def __aenter__(self) -> "AsyncKV":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


class AsyncTxn:
    """``ClusterTxn`` on the event loop: the same plans (``get_plan``, ``commit_plan``...:
    one entry, or two-phase commit across shards, or locking reads), their batches
    awaited together."""

    def __init__(self, db: AsyncKV, lock_keys=None) -> None:
        self._db = db
        self._t = ClusterTxn(db._kv, lock_keys)  # its bookkeeping and plans; the I/O is here

    async def _run(self, plan):
        try:
            batch = next(plan)
            while True:
                if isinstance(batch, Detached):
                    for op, shard, payload in batch:
                        self._db._core.submit(op, shard, payload)
                    batch = plan.send([None] * len(batch))
                    continue
                answers = await (self._db._call_batch(batch) if len(batch) > 1 else
                                 asyncio.gather(*(self._db._call(op, shard, payload)
                                                  for op, shard, payload in batch),
                                                return_exceptions=True))
                for a in answers:
                    if isinstance(a, BaseException) and not isinstance(a, KVError):
                        raise a
                batch = plan.send(answers)
        except StopIteration as done:
            return done.value

    async def __aenter__(self) -> "AsyncTxn":
        self._t.__enter__()
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        t = self._t
        if t._state != "open":
            return
        if exc_type is not None:
            await self.discard()
            return
        await self.commit()

    async def get(self, key):
        return await self._run(self._t.get_plan(key))

    async def put(self, key, value) -> None:
        self._t.put(key, value)

    async def delete(self, key) -> bool:
        return await self._run(self._t.delete_plan(key))

    async def scan(self, prefix=b"", start=None, end=None, limit=None):
        return await self._run(self._t.scan_plan(prefix, start, end, limit))

    async def commit(self) -> None:
        await self._run(self._t.commit_plan())

    async def discard(self) -> None:
        try:
            await self._run(self._t.discard_plan())
        except KVError:
            pass  # its resolvers free the locks after the deadline


__all__ = ["connect", "AsyncKV", "AsyncTxn", "AsyncLease", "KVError"]
