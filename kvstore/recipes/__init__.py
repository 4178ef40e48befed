"""Recipes on leases and watch: a lock with a fencing token, leader election, a work queue.

    from kvstore.recipes import Lock, Election, Queue

    with Lock(db, "reports", ttl=10) as lock:
        storage.write(report, fencing_token=lock.token)

They work on every store (``kvstore.open``, ``kvstore.connect``); the asyncio
twins, for ``kvstore.aio``, are in ``kvstore.recipes.aio``. What each one
guarantees, and under which assumption, is in docs/recipes.md.
"""

from kvstore.recipes.sync import Election, Item, Lock, Queue

__all__ = ["Lock", "Election", "Queue", "Item"]
