"""The requests of the ``KV`` calls, built once for the sync and the asyncio client.

Each function checks a call's arguments (``InvalidArgument`` before anything is
sent) and returns the ``(op, shard, payload)`` the engine
(``kvstore.client.core.ClientCore.submit``) carries out; ``ClusterKV`` waits on
the answer, ``AsyncKV`` awaits it. ``nshards`` is the cluster's shard count.
"""

from __future__ import annotations

from kvstore import commands
from kvstore.errors import InvalidArgument, LeaseExpired
from kvstore.keys import check_key, check_optional_value, check_scan, check_value
from kvstore.lease import lease_id_of
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


def put(nshards: int, key, value, lease=None, ttl=None) -> Request:
    """A write of ``value`` at ``key``: answered by None once it is applied. With
    ``lease`` (a lease or its id) the key lives as long as it (answered ``NO_LEASE``,
    nothing written, if it is gone: ``put_result``); with ``ttl`` seconds, that long."""
    key = check_key(key)
    value = check_value(value)
    shard = shard_for(nshards, key)
    if lease is None and ttl is None:
        return wire.OP_WRITE, shard, commands.put(key, value)
    if lease is not None and ttl is not None:
        raise InvalidArgument("put takes lease= or ttl=, not both")
    if lease is not None:
        return wire.OP_WRITE, shard, commands.put_lease(key, value, lease_id_of(lease))
    return wire.OP_WRITE, shard, commands.put_ttl(key, value, commands.check_ttl(ttl))


def put_result(request: Request, result) -> None:
    """A put's answer: None, or ``LeaseExpired`` if its lease was gone."""
    if result == commands.NO_LEASE:
        command = request[2]
        raise LeaseExpired(f"lease {command.lease_id} is gone (expired or revoked): "
                           f"{command.key[:40]!r} was not written")


def lease_grant(nshards: int, lease_id: int, ttl_ms: int) -> list[Request]:
    """Grant a lease on every shard (answered True each)."""
    return [(wire.OP_WRITE, s, commands.lease_grant(lease_id, ttl_ms)) for s in range(nshards)]


def lease_keepalive(nshards: int, lease_id: int) -> list[Request]:
    """Refresh a lease on every shard (answered False by a shard that lost it)."""
    return [(wire.OP_WRITE, s, commands.lease_keepalive(lease_id)) for s in range(nshards)]


def lease_revoke(nshards: int, lease_id: int) -> list[Request]:
    """End a lease on every shard (answered by the keys deleted, False if unknown)."""
    return [(wire.OP_WRITE, s, commands.lease_revoke(lease_id)) for s in range(nshards)]


def revoked_count(answers) -> int:
    """The keys a revoke deleted across shards."""
    return sum(a for a in answers if type(a) is int and type(a) is not bool)


def delete(nshards: int, key) -> Request:
    """A delete of ``key``: answered True if it existed."""
    key = check_key(key)
    return wire.OP_WRITE, shard_for(nshards, key), commands.delete(key)


def cas(nshards: int, key, expected, new, lease=None) -> Request:
    """Set ``key`` to ``new`` if it holds ``expected`` (None: absent / delete): answered
    True if it did. With ``lease`` the new value lives as long as it (answered
    ``NO_LEASE``, nothing compared or written, if it is gone: ``cas_result``)."""
    key = check_key(key)
    expected = check_optional_value(expected, "expected")
    new = check_optional_value(new, "new")
    shard = shard_for(nshards, key)
    if lease is None:
        return wire.OP_WRITE, shard, commands.cas(key, expected, new)
    return wire.OP_WRITE, shard, commands.cas_lease(key, expected, new, lease_id_of(lease))


def cas_result(request: Request, result) -> bool:
    """A cas's answer: whether it swapped; ``LeaseExpired`` if its lease was gone."""
    if result == commands.NO_LEASE:
        command = request[2]
        raise LeaseExpired(f"lease {command.lease_id} is gone (expired or revoked): "
                           f"{command.key[:40]!r} was not compared nor written")
    return bool(result)


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
