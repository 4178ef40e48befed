"""kvstore: a strongly consistent key-value store, embedded (LMDB) or replicated (Multi-Paxos).

    import kvstore
    with kvstore.open("data/dir") as db:
        db.put(b"k", b"v")
        assert db.get(b"k") == b"v"

The public surface (docs/api.md): ``open``, ``connect``, ``KV``, ``Txn``,
the errors, ``MAX_KEY_SIZE`` and ``MAX_VALUE_SIZE``.
"""

from __future__ import annotations

import os

from kvstore.api import KV, Txn
from kvstore.errors import (Compacted, CorruptRecord, InvalidArgument, KVError, LeaseExpired,
                            PermissionDenied, StorageError, Timeout, TransactionConflict,
                            Unavailable)
from kvstore.events import Event
from kvstore.keys import MAX_CLUSTER_TXN_SIZE, MAX_KEY_SIZE, MAX_TXN_SIZE, MAX_VALUE_SIZE
from kvstore.lease import Lease

__version__ = "0.1.0"


def open(path: str | os.PathLike, *, node_id: str | None = None, cluster: str | None = None,
         shards: int | None = None, map_size: int | None = None,
         watch_history_bytes: int | None = None) -> KV:
    """Open (creating if needed) the store in directory ``path``.

    ``shards`` fixes the number of shards when the directory is created (default 1)
    and must match afterwards. ``map_size`` is the least LMDB map reserved, in bytes:
    at least 1 TiB of address space (not of disk) is reserved anyway, so the map never
    has to grow under open readers (it still grows past it, should a store fill it).
    ``watch_history_bytes``: the recent changes kept in memory for ``watch`` (all shards
    together; default 64 MiB): a watch further behind gets ``Compacted``.
    """
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise InvalidArgument(f"path must be a str or os.PathLike, not {type(path).__name__}")
    if node_id is not None or cluster is not None:
        if node_id is None or cluster is None:
            raise InvalidArgument("an embedded replica of a cluster needs both node_id= and "
                                  "cluster= (the cluster.toml file)")
        from kvstore.embedded.replica import open_replica
        return open_replica(path, node_id, cluster)
    from kvstore.embedded.store import EmbeddedKV
    if watch_history_bytes is None:
        return EmbeddedKV(path, shards=shards, map_size=map_size)
    return EmbeddedKV(path, shards=shards, map_size=map_size,
                      watch_history_bytes=watch_history_bytes)


def connect(addresses, timeout: float = 5.0, *, keys=None, cache=None,
            cache_staleness: float = 1.0, cache_bytes: int = 64 * 1024 * 1024,
            one_round_commit: bool = True) -> KV:
    """A client of running ``kvstore-server`` nodes: ``"tcp://h:p,tcp://h:p"`` or a list.

    Raises ``Unavailable`` if no node answers within ``timeout`` seconds, which is
    also every call's deadline. ``keys``: the ``kvstore keygen`` directory of a
    cluster with ``[security]`` (default ``$KVSTORE_KEYS``). ``cache``: a prefix, a
    list of them, or True: a coherent client cache of those keys (docs/cache.md).
    ``one_round_commit`` (default True): cross-shard transactions commit in one
    consensus round (parallel commits); False asks for two (the prepares, then the
    decision), which nodes of earlier versions take too: use it while an upgrade from
    a version without one-round commits is under way (docs/operations.md, "Upgrade").
    """
    from kvstore.client import connect as _connect
    return _connect(addresses, timeout, keys, cache=cache, cache_staleness=cache_staleness,
                    cache_bytes=cache_bytes, one_round_commit=one_round_commit)


def __getattr__(name: str):
    """``kvstore.aio`` (the asyncio client) without importing asyncio for everyone."""
    if name == "aio":
        import importlib
        return importlib.import_module("kvstore.aio")
    raise AttributeError(f"module 'kvstore' has no attribute {name!r}")


def status() -> dict:
    """What this installation runs: version and the kernel implementation in use."""
    from kvstore import _native
    return {"version": __version__, "implementation": _native.IMPLEMENTATION,
            "native_import_error": _native.NATIVE_IMPORT_ERROR}


__all__ = [
    "open", "connect", "status", "KV", "Txn", "MAX_KEY_SIZE", "MAX_VALUE_SIZE",
    "MAX_TXN_SIZE", "MAX_CLUSTER_TXN_SIZE",
    "KVError", "InvalidArgument", "TransactionConflict", "Unavailable", "Timeout",
    "StorageError", "CorruptRecord", "Compacted", "Event", "LeaseExpired", "Lease",
    "PermissionDenied",
    "__version__",
]
