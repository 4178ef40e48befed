"""Carry out a plan's steps (``kvstore.recipes.plans``) on a store: ``run`` on a sync
``KV``, ``run_async`` on ``kvstore.aio`` (or on a sync ``KV`` from asyncio, each
blocking step in a worker thread).

The driver owns what a plan opens: a watch still open when the plan ends is
closed, and a lease made by a plan that fails (an error, a cancellation, an
interrupt) is revoked, so a contender that gives up leaves nothing held behind.
An error of a step is thrown into the plan, which may clean up (more steps) and
re-raise.
"""

from __future__ import annotations

import asyncio
import inspect
import time

from kvstore.errors import KVError
from kvstore.recipes import plans, store


class _Owned:
    """The leases and watches a plan opened, for the cleanup at its end."""

    def __init__(self) -> None:
        self.leases: list = []
        self.watches: list = []


def _perform(db, step, owned: _Owned):
    kind = type(step)
    if kind is plans.Call:
        return getattr(db, step.method)(*step.args, **step.kwargs)
    if kind is plans.NextEvent:
        return step.watch.get(timeout=step.timeout)
    if kind is plans.Now:
        return time.monotonic()
    if kind is plans.ReadRevision:
        return store.read_revision(db, step.key)
    if kind is plans.ScanRevisions:
        return store.scan_revisions(db, step.prefix, step.shard)
    if kind is plans.NewLease:
        lease = db.lease(step.ttl)
        owned.leases.append(lease)
        return lease
    if kind is plans.Revoke:
        _forget(owned.leases, step.lease)
        try:
            step.lease.revoke()
        except KVError:
            pass  # it expires on its own within its TTL
        return None
    if kind is plans.OpenWatch:
        watch = db.watch(**step.kwargs)
        owned.watches.append(watch)
        return watch
    if kind is plans.CloseWatch:
        _forget(owned.watches, step.watch)
        step.watch.close()
        return None
    raise TypeError(f"not a recipe step: {step!r}")


def _forget(items: list, item) -> None:
    for i, x in enumerate(items):
        if x is item:
            del items[i]
            return


def _hand_over(owned: _Owned, value) -> None:
    """What a plan returns is its caller's (a consumer's watch): not closed at its end."""
    for item in value if isinstance(value, tuple) else (value,):
        _forget(owned.watches, item)


def _cleanup(owned: _Owned, failed: bool) -> None:
    for watch in owned.watches:
        try:
            watch.close()
        except Exception:  # closing is best effort: the plan's own error matters
            pass
    if failed:
        for lease in owned.leases:
            try:
                lease.revoke()
            except Exception:
                pass


def _steps(plan, db, owned: _Owned):
    """Run ``plan`` on ``db``, yielding each ``Emit``'s value; return the plan's value."""
    result, error = None, None
    while True:
        try:
            step = plan.send(result) if error is None else plan.throw(error)
        except StopIteration as done:
            return done.value
        result, error = None, None
        if type(step) is plans.Emit:
            yield step.value
            continue
        try:
            result = _perform(db, step, owned)
        except BaseException as e:  # thrown into the plan: it may clean up, then re-raise
            error = e


def run(plan, db):
    """Run ``plan`` (which emits nothing) on the sync ``db``: its returned value."""
    owned = _Owned()
    failed = True
    steps = _steps(plan, db, owned)
    try:
        while True:
            try:
                value = next(steps)
            except StopIteration as done:
                failed = False
                _hand_over(owned, done.value)
                return done.value
            raise TypeError(f"a recipe plan emitted {value!r} where none was expected")
    finally:
        _cleanup(owned, failed)


def iterate(plan, db):
    """Run ``plan`` on the sync ``db`` as an iterator of what it emits."""
    owned = _Owned()
    try:
        yield from _steps(plan, db, owned)
    finally:
        _cleanup(owned, False)


# ------------------------------------------------------------------ asyncio
def _is_sync_kv(db) -> bool:
    """A store whose calls block (not ``kvstore.aio``): each step runs in a thread."""
    return store._engine(db) != "aio" and not getattr(db, "is_async", False)


async def _maybe_await(value):
    return (await value) if inspect.isawaitable(value) else value


async def _next_event_async(watch, timeout):
    get = getattr(watch, "get", None)
    if get is not None and inspect.iscoroutinefunction(get):
        return await get(timeout=timeout)
    try:
        return await asyncio.wait_for(watch.__anext__(), timeout)
    except (asyncio.TimeoutError, StopAsyncIteration):
        return None


#: A sync watch waited on from asyncio waits in a thread this long at most per turn, so a
#: cancelled task leaves no thread blocked for longer.
THREAD_WAIT_SECONDS = 0.5


async def _next_event_in_threads(watch, timeout):
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        turn = THREAD_WAIT_SECONDS if deadline is None else max(
            0.0, min(THREAD_WAIT_SECONDS, deadline - time.monotonic()))
        event = await asyncio.to_thread(watch.get, turn)
        if event is not None or (deadline is not None and time.monotonic() >= deadline):
            return event


async def _perform_async(db, step, owned: _Owned):
    if _is_sync_kv(db):
        if type(step) is plans.Now:
            return time.monotonic()
        if type(step) is plans.NextEvent:
            return await _next_event_in_threads(step.watch, step.timeout)
        return await asyncio.to_thread(_perform, db, step, owned)
    kind = type(step)
    if kind is plans.Call:
        return await _maybe_await(getattr(db, step.method)(*step.args, **step.kwargs))
    if kind is plans.NextEvent:
        return await _next_event_async(step.watch, step.timeout)
    if kind is plans.Now:
        return time.monotonic()
    if kind is plans.ReadRevision:
        return await _maybe_await(store.read_revision(db, step.key))
    if kind is plans.ScanRevisions:
        return await _maybe_await(store.scan_revisions(db, step.prefix, step.shard))
    if kind is plans.NewLease:
        lease = await _maybe_await(db.lease(step.ttl))
        owned.leases.append(lease)
        return lease
    if kind is plans.Revoke:
        _forget(owned.leases, step.lease)
        try:
            await _maybe_await(step.lease.revoke())
        except KVError:
            pass
        return None
    if kind is plans.OpenWatch:
        watch = await _maybe_await(db.watch(**step.kwargs))
        owned.watches.append(watch)
        started = getattr(watch, "started", None)  # kvstore.aio: where the shards stand
        if started is not None:
            await started()
        return watch
    if kind is plans.CloseWatch:
        _forget(owned.watches, step.watch)
        await _maybe_await(step.watch.close())
        return None
    raise TypeError(f"not a recipe step: {step!r}")


async def _cleanup_async(db, owned: _Owned, failed: bool) -> None:
    for watch in owned.watches:
        try:
            if _is_sync_kv(db):
                await asyncio.to_thread(watch.close)
            else:
                await _maybe_await(watch.close())
        except Exception:
            pass
    if failed:
        for lease in owned.leases:
            try:
                if _is_sync_kv(db):
                    await asyncio.to_thread(lease.revoke)
                else:
                    await _maybe_await(lease.revoke())
            except Exception:
                pass


class _AsyncSteps:
    """``_steps`` for asyncio: ``await next_emit()`` gives the next emitted value, or
    raises ``StopAsyncIteration`` carrying the plan's return value in ``.value``."""

    def __init__(self, plan, db) -> None:
        self.plan, self.db, self.owned = plan, db, _Owned()
        self.value = None

    async def next_emit(self):
        result, error = None, None
        plan = self.plan
        while True:
            try:
                step = plan.send(result) if error is None else plan.throw(error)
            except StopIteration as done:
                self.value = done.value
                raise StopAsyncIteration from None
            result, error = None, None
            if type(step) is plans.Emit:
                return step.value
            try:
                result = await _perform_async(self.db, step, self.owned)
            except BaseException as e:
                error = e


async def run_async(plan, db):
    """Run ``plan`` (which emits nothing) on ``db`` from asyncio: its returned value."""
    steps = _AsyncSteps(plan, db)
    failed = True
    try:
        try:
            value = await steps.next_emit()
        except StopAsyncIteration:
            failed = False
            _hand_over(steps.owned, steps.value)
            return steps.value
        raise TypeError(f"a recipe plan emitted {value!r} where none was expected")
    finally:
        await _cleanup_async(db, steps.owned, failed)


async def iterate_async(plan, db):
    """Run ``plan`` on ``db`` from asyncio as an async iterator of what it emits."""
    steps = _AsyncSteps(plan, db)
    try:
        while True:
            try:
                value = await steps.next_emit()
            except StopAsyncIteration:
                return
            yield value
    finally:
        await _cleanup_async(db, steps.owned, False)
