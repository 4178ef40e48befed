"""The two reads the recipes need that ``KV`` does not offer: a value with its revision.

A fencing token is the revision of a write, and a waiter must watch from the
revision after what it read; ``KV.get`` and ``KV.scan`` return values only. Every
engine already has the revision at hand (the wire's ``OP_GET``/``OP_SCAN`` take
``with_revision``; the embedded store keeps it in each stored value), so this
module reads it there, per engine, in one place:

- ``kvstore.connect`` (``ClusterKV``) and ``kvstore.aio`` (``AsyncKV``): a
  linearizable ``OP_GET`` / ``OP_SCAN`` with ``with_revision`` set;
- ``kvstore.open`` (``EmbeddedKV``): one consistent snapshot (overlay + LMDB);
- anything else (a test's double): its own ``read_revision`` / ``scan_revisions``.

The engines are recognised without importing them (an embedded user never loads
ZeroMQ for a lock).
"""

from __future__ import annotations

import sys

from kvstore.errors import InvalidArgument
from kvstore.keys import check_key

_GET, _SCAN = "get", "scan"  # kvstore.transport.wire.OP_GET / OP_SCAN


def _engine(db) -> str:
    """``"cluster"``, ``"aio"``, ``"embedded"`` or ``"other"``."""
    kv = sys.modules.get("kvstore.client.kv")
    if kv is not None and isinstance(db, kv.ClusterKV):
        return "cluster"
    aio = sys.modules.get("kvstore.client.aio")
    if aio is not None and isinstance(db, aio.AsyncKV):
        return "aio"
    store = sys.modules.get("kvstore.embedded.store")
    if store is not None and isinstance(db, store.EmbeddedKV):
        return "embedded"
    return "other"


def nshards(db) -> int:
    """The store's number of shards."""
    engine = _engine(db)
    if engine == "cluster":
        return db.nshards
    if engine == "aio":
        return db._kv.nshards
    if engine == "embedded":
        return db._nshards
    count = getattr(db, "nshards", None)
    if not isinstance(count, int):
        raise InvalidArgument(f"kvstore.recipes works on a kvstore store (kvstore.open, "
                              f"kvstore.connect, kvstore.aio), not {type(db).__name__}")
    return count


def _shard(db, key: bytes) -> int:
    from kvstore.recipes.keys import shard_for
    return shard_for(key, nshards(db))


def _prefix_range(prefix: bytes) -> tuple[bytes, bytes | None]:
    from kvstore.keys import scan_range
    return scan_range(prefix, None, None)


def read_revision(db, key: bytes):
    """``(value or None, revision)``: a linearizable read (revision 0: absent). On
    ``kvstore.aio`` it is a coroutine."""
    key = check_key(key)
    engine = _engine(db)
    if engine in ("cluster", "aio"):
        shard = _shard(db, key)
        args = [shard, key, True]
        if engine == "cluster":
            value, revision = db._core.call(_GET, shard, args)
            return value, revision
        return _await_pair(db._call(_GET, shard, args))
    if engine == "embedded":
        return _embedded_read(db, key)
    return db.read_revision(key)


async def _await_pair(call):
    value, revision = await call
    return value, revision


def scan_revisions(db, prefix: bytes, shard: int):
    """``[(key, value, revision)]`` under ``prefix`` on ``shard``, in key order: a
    linearizable scan of that shard. On ``kvstore.aio`` it is a coroutine."""
    engine = _engine(db)
    lo, hi = _prefix_range(prefix)
    if engine in ("cluster", "aio"):
        args = [shard, lo, hi, None, True]
        if engine == "cluster":
            return [tuple(row) for row in db._core.call(_SCAN, shard, args)]
        return _await_rows(db._call(_SCAN, shard, args))
    if engine == "embedded":
        return _embedded_scan(db, shard, lo, hi)
    return db.scan_revisions(prefix, shard)


async def _await_rows(call):
    return [tuple(row) for row in await call]


def _embedded_read(db, key: bytes):
    from kvstore.machine.data import read_value
    from kvstore.storage.overlay import MISSING, lookup
    db._check_open()
    shard = _shard(db, key)

    def read(txn, levels, _position):
        raw = lookup(levels[shard], key)
        if raw is MISSING:
            raw = txn.get(key, db=db._data[shard])
        return read_value(key, raw)

    return db._snapshot(read, "reading with its revision")


def _embedded_scan(db, shard: int, lo: bytes, hi: bytes | None):
    from kvstore.embedded.store import merged_rows
    from kvstore.machine.data import read_value
    from kvstore.storage.overlay import items_in_range
    db._check_open()

    def read(txn, levels, _position):
        over = items_in_range(levels[shard], lo, hi)
        rows = merged_rows(txn, db._data[shard], over, lo, hi, None)
        return [(key, *read_value(key, raw)) for key, raw in rows]

    return db._snapshot(read, "scanning with revisions")
