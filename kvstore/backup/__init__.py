"""Backup and restore (docs/backup.md).

- ``backup(source, path)``: ``source`` is an open embedded store
  (``kvstore.open``), a cluster client (``kvstore.connect``), or the directory of
  an embedded store (open in another process or not). The backup is one
  consistent cut: a transaction across shards is wholly in it or wholly absent
  (``kvstore.backup.embedded``, ``kvstore.backup.cluster``: the argument).
- ``backup_cluster(addresses, path)``: the same for a cluster named by addresses.
- ``restore(path, directory)``: a new embedded store in ``directory`` (new or
  empty) holding exactly the backup's data, or nothing at all.
- ``verify(path)``: read a whole backup and check it; its header and row counts.

The file format is ``kvstore.backup.format``: versioned, checksummed per frame and
as a whole, written to ``FILE.tmp``, fsynced and renamed.
"""

from __future__ import annotations

import os

from kvstore.backup.cluster import backup_client, backup_cluster
from kvstore.backup.embedded import backup_directory, backup_store
from kvstore.backup.format import BackupReader
from kvstore.backup.restore import restore
from kvstore.errors import InvalidArgument


def backup(source, path: str | os.PathLike, *, timeout: float = 10.0) -> dict:
    """Back up ``source`` (an open embedded store, a cluster client, or an embedded
    store's directory) to the file ``path``; a summary of what was written
    (``shards``, ``rows`` per shard ``[data, leases]``, ``bytes``, ``revisions``)."""
    from kvstore.client.kv import ClusterKV
    from kvstore.embedded.store import EmbeddedKV
    if isinstance(source, EmbeddedKV):
        return backup_store(source, path)
    if isinstance(source, ClusterKV):
        return backup_client(source, path, timeout=timeout)
    if isinstance(source, (str, bytes, os.PathLike)):
        return backup_directory(source, path)
    raise InvalidArgument(f"backup() takes an open store, a cluster client or a directory, "
                          f"not {type(source).__name__}")


def verify(path: str | os.PathLike) -> dict:
    """Read the whole backup at ``path`` and check every checksum, count and order;
    ``CorruptRecord`` at the first problem. Returns its header and row counts."""
    with BackupReader(path) as reader:
        rows = [[0, 0] for _ in range(reader.header.shards)]
        for shard, table, chunk in reader.chunks():
            rows[shard][table] += len(chunk)
        h = reader.header
        return {"shards": h.shards, "source": h.source, "revisions": h.revisions, "cut": h.cut,
                "created": h.created, "kvstore": h.kvstore, "rows": rows,
                "bytes": reader.offset}


__all__ = ["backup", "backup_cluster", "restore", "verify"]
