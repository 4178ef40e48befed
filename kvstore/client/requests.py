"""The requests of the ``KV`` calls, built once for the sync and the asyncio client.

Each function checks a call's arguments (``InvalidArgument`` before anything is
sent) and returns the ``(op, shard, payload)`` the engine
(``kvstore.client.core.ClientCore.submit``) carries out; ``ClusterKV`` waits on
the answer, ``AsyncKV`` awaits it. ``nshards`` is the cluster's shard count.
"""

from __future__ import annotations

from kvstore import commands
from kvstore.keys import check_key, check_optional_value, check_scan, check_value
from kvstore.sharding import shard_of
from kvstore.transport import wire

#: ``(op, shard, payload)``: one request for ``ClientCore.submit``.
Request = tuple


def shard_for(nshards: int, key: bytes) -> int:
    """The shard that holds ``key``."""
    return 0 if nshards == 1 else shard_of(key, nshards)


def get(nshards: int, key) -> Request:
    """A linearizable read of ``key``: answered by its value, or None."""
    key = check_key(key)
    shard = shard_for(nshards, key)
    return wire.OP_GET, shard, [shard, key, False]


def get_with_revision(request: Request) -> Request:
    """``get``'s request answered by ``[value, revision]`` (the revision that wrote it;
    0 for an absent key)."""
    op, shard, (s, key, _) = request
    return op, shard, [s, key, True]


def put(nshards: int, key, value) -> Request:
    """A write of ``value`` at ``key``: answered by None once it is applied."""
    key = check_key(key)
    return wire.OP_WRITE, shard_for(nshards, key), commands.put(key, check_value(value))


def delete(nshards: int, key) -> Request:
    """A delete of ``key``: answered True if it existed."""
    key = check_key(key)
    return wire.OP_WRITE, shard_for(nshards, key), commands.delete(key)


def cas(nshards: int, key, expected, new) -> Request:
    """Set ``key`` to ``new`` if it holds ``expected`` (None: absent / delete): answered
    True if it did."""
    key = check_key(key)
    return wire.OP_WRITE, shard_for(nshards, key), commands.cas(
        key, check_optional_value(expected, "expected"), check_optional_value(new, "new"))


def incr(nshards: int, key, delta) -> Request:
    """An atomic add of ``delta`` to the integer at ``key``: answered by the new value, or
    a refusal that ``commands.incr_result`` turns into ``InvalidArgument``."""
    key = check_key(key)
    return wire.OP_WRITE, shard_for(nshards, key), commands.incr(key, commands.check_delta(delta))


def scan(nshards: int, prefix, start, end, limit) -> tuple[list[Request], int | None]:
    """The requests of a scan, one per shard (none if it can answer nothing), and its
    checked limit, for ``merge_scan``."""
    args = check_scan(prefix, start, end, limit)
    if args is None:
        return [], 0
    lo, hi, limit = args
    return [(wire.OP_SCAN, s, [s, lo, hi, limit, False]) for s in range(nshards)], limit


def merge_scan(parts, limit: int | None) -> list[tuple[bytes, bytes]]:
    """The shards' answers to ``scan``'s requests as one scan's rows: in key order, at most
    ``limit``. Each shard's part is linearizable; the whole is not one snapshot."""
    rows = sorted((k, v) for part in parts for k, v in part)
    return rows if limit is None else rows[:limit]
