"""Restore a backup into a new embedded store directory, all or nothing.

The rows go into a staging directory beside the target (``DIR.restoring-...``):
a new store (``kvstore.storage.Storage``) of the backup's shard count, its
tables filled in large synced LMDB commits (rows come sorted: LMDB's append
mode), each row checked on the way (a data row's own checksum and key, its
revision at or below the cut's; a lease row's key is a lease's). Only once the
trailer was read and every count and the whole file's checksum matched
(``kvstore.backup.format.BackupReader``) is the staging directory renamed to
``DIR``; any failure (a truncated or corrupt backup, a full disk, Ctrl-C)
removes it, and ``DIR`` is as it was.

Each shard's applied point is set to the cut's revision: the restored store's
next write on a shard gets a revision above every revision in it, so
transactions that compare revisions and watchers that resume by revision keep
working. Its write-ahead log starts empty (a directory without ``wal/`` opens
as a checkpoint with an empty log). Leases come back as they were at the cut;
the store that opens them gives each a full time to live from then
(``EmbeddedKV._load_leases``), so keys whose owner is gone expire one TTL later.
"""

from __future__ import annotations

import os
import shutil

from kvstore.backup.format import DATA, BackupReader, Header, row_problem
from kvstore.errors import InvalidArgument
from kvstore.storage import Storage
from kvstore.storage.environment import (META_APPLIED, META_COMMIT, META_LOG_CLOSED,
                                         META_LOG_POSITION, check_path, pack_u64)

#: Bytes of rows per LMDB commit while restoring.
BATCH_BYTES = 64 * 1024 * 1024


def restore(backup_path: str | os.PathLike, directory: str | os.PathLike) -> dict:
    """Restore the backup file ``backup_path`` into ``directory``, which must not exist
    or be empty; returns ``{"shards", "rows", "revisions", "path"}``.

    ``CorruptRecord`` (a ``StorageError``) for a truncated or corrupt backup,
    ``InvalidArgument`` for a non-empty ``directory`` or a missing file; either
    way nothing is left behind."""
    directory = check_path(directory)
    _check_target(directory)
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, f".{os.path.basename(directory)}.restoring-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)  # a leftover of a killed restore of ours
    try:
        with BackupReader(backup_path) as reader:
            header = reader.header
            counts = _fill(reader, header, staging)
        _check_target(directory)
        if os.path.isdir(directory):
            os.rmdir(directory)  # empty (checked): the rename puts the store in its place
        os.rename(staging, directory)
        _fsync_directory(parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {"shards": header.shards, "rows": counts, "revisions": list(header.revisions),
            "path": directory}


def _check_target(directory: str) -> None:
    if os.path.lexists(directory):
        if not os.path.isdir(directory) or os.path.islink(directory):
            raise InvalidArgument(f"{directory} exists and is not a directory: restore into a "
                                  f"new or empty directory")
        if os.listdir(directory):
            raise InvalidArgument(f"{directory} is not empty: restore into a new or empty "
                                  f"directory (a restore never overwrites a store)")


def _fill(reader: BackupReader, header: Header, staging: str) -> list:
    """Every row of ``reader`` into a new store at ``staging``; per shard its row counts."""
    storage = Storage(staging, shards=header.shards)
    try:
        counts = [[0, 0] for _ in range(header.shards)]
        pending: list = []
        size = 0
        for shard, table, rows in reader.chunks():
            _check_rows(reader, header, shard, table, rows)
            t = storage.shards[shard]
            pending.append((t.data if table == DATA else t.txns, rows))
            counts[shard][table] += len(rows)
            size += sum(len(k) + len(v) for k, v in rows)
            if size >= BATCH_BYTES:
                _write_rows(storage, pending)
                pending, size = [], 0
        _write_rows(storage, pending)

        def meta(txn):
            for shard, t in enumerate(storage.shards):
                point = pack_u64(header.revisions[shard])
                txn.put(META_APPLIED, point, db=t.meta)
                txn.put(META_COMMIT, point, db=t.meta)
                txn.put(META_LOG_POSITION, pack_u64(0), db=t.meta)
                txn.put(META_LOG_CLOSED, pack_u64(0), db=t.meta)

        storage.write(meta)
        return counts
    finally:
        storage.close()


def _write_rows(storage: Storage, pending: list) -> None:
    if not pending:
        return

    def write(txn):
        for db, rows in pending:
            cursor = txn.cursor(db)
            try:
                cursor.putmulti(rows, append=True)
            finally:
                cursor.close()

    storage.write(write)


def _check_rows(reader: BackupReader, header: Header, shard: int, table: int,
                rows: list) -> None:
    """Each row is what its table holds (``row_problem``), checked before it is written."""
    cut = header.revisions[shard]
    for key, value in rows:
        problem = row_problem(shard, table, key, value, cut)
        if problem is not None:
            reader.refuse(reader.offset, problem)


def _fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
