"""``await db.lease(ttl)`` on ``kvstore.aio``: the asyncio twin of ``kvstore.Lease``.

Granted on every shard when made; kept alive on every shard every ``ttl / 3`` by a
task of the event loop that made it, which holds the lease weakly (a dropped
``AsyncLease`` stops being kept alive: its keys then vanish after the ttl).
``await keepalive()``, ``await revoke()``, ``id``, ``ttl``, ``expired``, and
``async with`` (revoked on exit). A keep-alive that finds the lease gone marks it
``expired`` and raises ``kvstore.LeaseExpired``.
"""

from __future__ import annotations

import asyncio
import logging
import weakref

from kvstore.client import requests
from kvstore.errors import KVError, LeaseExpired
from kvstore.lease import KEEPALIVES_PER_TTL

log = logging.getLogger("kvstore.lease")


class AsyncLease:
    """A granted lease on a cluster, kept alive by an asyncio task (the module docstring)."""

    def __init__(self, db, lease_id: int, ttl: float, keep_alive: bool = True) -> None:
        self._db = db
        self.id = lease_id
        self.ttl = ttl
        self._expired = False
        self._revoked = False
        self._task = None  # keep_alive=False: a handle on a lease someone else keeps alive
        if keep_alive:
            self._task = asyncio.get_running_loop().create_task(
                _keep_alive(weakref.ref(self), ttl / KEEPALIVES_PER_TTL))

    @property
    def expired(self) -> bool:
        """True once a keep-alive found the lease gone: its keys are gone."""
        return self._expired

    @property
    def active(self) -> bool:
        return not (self._expired or self._revoked)

    async def keepalive(self) -> None:
        """Refresh the lease on every shard now; ``LeaseExpired`` if it is gone."""
        if self._revoked:
            raise LeaseExpired(f"lease {self.id} was revoked")
        if not self._expired:
            nshards = self._db._kv.nshards
            answers = await asyncio.gather(*(self._db._call(*r) for r in
                                             requests.lease_keepalive(nshards, self.id)))
            if all(answers):
                return
        self._expired = True
        raise LeaseExpired(f"lease {self.id} expired (its ttl of {self.ttl:g} s passed without "
                           f"a keep-alive); its keys were deleted")

    async def revoke(self) -> int:
        """End the lease now, deleting its keys: how many were deleted."""
        self._revoked = True
        if self._task is not None:
            self._task.cancel()
        nshards = self._db._kv.nshards
        answers = await asyncio.gather(*(self._db._call(*r) for r in
                                         requests.lease_revoke(nshards, self.id)))
        return requests.revoked_count(answers)

    async def __aenter__(self) -> "AsyncLease":
        return self

    async def __aexit__(self, *exc) -> None:
        if self.active:
            await self.revoke()

    def __del__(self) -> None:
        task = getattr(self, "_task", None)
        if task is not None and not task.done():
            try:
                task.cancel()
            except RuntimeError:  # its loop is closed
                pass

    def __repr__(self) -> str:
        state = "expired" if self._expired else "revoked" if self._revoked else "active"
        return f"<kvstore.aio.AsyncLease id={self.id} ttl={self.ttl:g} {state}>"


async def _keep_alive(ref, period: float) -> None:
    """Keep the lease ``ref`` names alive every ``period`` while it lives and is active."""
    while True:
        await asyncio.sleep(period)
        lease = ref()
        if lease is None or not lease.active:
            return
        try:
            await lease.keepalive()
        except LeaseExpired:
            log.warning("lease %d expired before its keep-alive (ttl %g s)", lease.id, lease.ttl)
            return
        except KVError as e:  # unavailable, closed...: tried again at the next period
            if lease._db._kv._core._closed:
                return
            log.info("lease %d: keep-alive failed, trying again: %s", lease.id, e)
        del lease
