"""The recipes for asyncio: the same ``Lock``, ``Election`` and ``Queue``, awaited.

    from kvstore.recipes.aio import Lock

    async with Lock(db, "reports") as lock:      # db from kvstore.aio.connect(...)
        await storage.write(report, fencing_token=lock.token)

Same plans as the sync classes (``kvstore.recipes.plans``), run by
``kvstore.recipes.drive.run_async``: on ``kvstore.aio`` every step is awaited on
the event loop; on a sync store (``kvstore.open``) each runs in a worker thread, so
the loop never blocks. Cancelling a task that waits in ``acquire``, ``campaign`` or
``get`` leaves nothing held: the driver revokes the lease it made.
"""

from __future__ import annotations

import asyncio

from kvstore.errors import KVError
from kvstore.keys import check_value
from kvstore.recipes import drive, plans
from kvstore.recipes.keys import election_key, lock_key, new_holder
from kvstore.recipes.sync import (Item as _SyncItem, _LockState, _QueueState, check_timeout)


class Lock:
    """``kvstore.recipes.Lock`` for asyncio: ``await acquire()``, ``await release()``,
    ``async with``."""

    def __init__(self, db, name, ttl: float = 10) -> None:
        self.db = db
        self.name = name
        self._state = _LockState(lock_key(name), ttl)

    @property
    def key(self) -> bytes:
        return self._state.key

    @property
    def token(self) -> int | None:
        return self._state.token

    def locked(self) -> bool:
        return self._state.lease is not None

    async def acquire(self, timeout: float | None = None) -> bool:
        timeout = check_timeout(timeout)
        state = self._state
        state.start(new_holder())
        try:
            got = await drive.run_async(plans.acquire_with_new_lease(
                state.key, state.value, state.ttl, timeout), self.db)
        except BaseException:
            state.value = None
            raise
        return state.held(got)

    async def release(self) -> bool:
        return await drive.run_async(plans.release(*self._state.stop()), self.db)

    async def __aenter__(self) -> "Lock":
        await self.acquire()
        return self

    async def __aexit__(self, *exc) -> None:
        if self.locked():
            await self.release()


class Election:
    """``kvstore.recipes.Election`` for asyncio; ``observe()`` is an async iterator."""

    def __init__(self, db, name, ttl: float = 10) -> None:
        self.db = db
        self.name = name
        self._state = _LockState(election_key(name), ttl)

    @property
    def token(self) -> int | None:
        return self._state.token

    def is_leader(self) -> bool:
        return self._state.lease is not None

    async def campaign(self, value, timeout: float | None = None) -> bool:
        value = check_value(value)
        timeout = check_timeout(timeout)
        state = self._state
        state.start(new_holder() + value)
        try:
            got = await drive.run_async(plans.acquire_with_new_lease(
                state.key, state.value, state.ttl, timeout), self.db)
        except BaseException:
            state.value = None
            raise
        return state.held(got)

    async def resign(self) -> bool:
        return await drive.run_async(plans.release(*self._state.stop()), self.db)

    async def leader(self) -> bytes | None:
        value, _revision = await drive.run_async(plans.read_holder(self._state.key), self.db)
        return plans.strip_holder(value)

    def observe(self):
        """An async iterator of the leader's value, now and at every change."""
        return drive.iterate_async(plans.observe(self._state.key), self.db)


class Item(_SyncItem):
    """An item of an asyncio ``Queue``: ``await item.ack()``, ``await item.release()``."""

    __slots__ = ()


class Queue:
    """``kvstore.recipes.Queue`` for asyncio: ``await put()``, ``await get()``."""

    def __init__(self, db, name, visibility_timeout: float = 30) -> None:
        self.db = db
        self._state = _QueueState(db, name, visibility_timeout)
        self._mutex = asyncio.Lock()

    @property
    def name(self):
        return self._state.name

    async def put(self, item) -> bytes:
        value = check_value(item, "a queue item")
        item_id = self._state.keys.new_item_id()
        await drive.run_async(_put(self._state.keys.item(item_id), value), self.db)
        return item_id

    async def get(self, timeout: float | None = None) -> Item | None:
        timeout = check_timeout(timeout)
        async with self._mutex:
            state = self._state
            state.check_open()
            for _attempt in range(3):
                if state.view is None:
                    state.me = state.keys.new_consumer_id()
                    state.opened(await drive.run_async(plans.open_consumer(
                        state.keys, state.me, state.visibility_timeout), self.db))
                try:
                    message = await drive.run_async(plans.take(
                        state.view, state.watch, state.lease, timeout), self.db)
                except (plans.LeaseExpired, plans.Compacted):
                    await self._end_consumer()
                    continue
                return None if message is None else Item(self, message, state.me)
            raise KVError(f"the queue {state.name!r}: this consumer's lease keeps lapsing")

    async def _ack(self, item_id: bytes, consumer: bytes):
        # not under the mutex: a get may be waiting in another task
        return await drive.run_async(plans.ack(self._state.keys, consumer, item_id), self.db)

    async def _release(self, item_id: bytes, consumer: bytes):
        return await drive.run_async(plans.release_item(self._state.keys, consumer, item_id),
                                     self.db)

    async def _end_consumer(self) -> None:
        watch, lease = self._state.drop_consumer()
        await drive.run_async(_end(watch, lease), self.db)

    async def close(self) -> None:
        async with self._mutex:
            if not self._state.closed:
                self._state.closed = True
                await self._end_consumer()

    async def __aenter__(self) -> "Queue":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


def _put(key: bytes, value: bytes):
    yield plans.Call("put", (key, value))


def _end(watch, lease):
    """Close a consumer's watch and revoke its lease (errors ignored)."""
    if watch is not None:
        try:
            yield plans.CloseWatch(watch)
        except KVError:
            pass
    if lease is not None:
        yield plans.Revoke(lease)


__all__ = ["Lock", "Election", "Queue", "Item"]
