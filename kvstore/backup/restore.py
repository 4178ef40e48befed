"""Restore a backup into a new embedded store directory, all or nothing.

The rows go into a store staged inside the target (``DIR/.restoring``, installed
by moving its ``data.mdb`` into ``DIR`` last: ``kvstore.storage.staging``, which
also locks ``DIR`` meanwhile): a new store (``kvstore.storage.Storage``) of the
backup's shard count, its tables filled in large synced LMDB commits (rows come
sorted: LMDB's append mode), each row checked on the way (a data row's own
checksum and key, its revision at or below the cut's; a lease row's key is a
lease's). Only once the trailer was read and every count and the whole file's
checksum matched (``kvstore.backup.format.BackupReader``) is it installed; any
failure (a truncated or corrupt backup, a full disk, Ctrl-C) removes what was
made, and ``DIR`` is as it was (absent, or empty). A restore killed outright
(SIGKILL, power) leaves ``DIR/.restoring``: no store, and a second restore
refuses the non-empty ``DIR`` until it is removed.

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

from kvstore.backup.format import DATA, BackupReader, Header, row_problem
from kvstore.errors import InvalidArgument
from kvstore.storage import Storage
from kvstore.storage.environment import (META_APPLIED, META_COMMIT, META_LOG_CLOSED,
                                         META_LOG_POSITION, check_path, pack_u64)
from kvstore.storage.staging import DirectoryBusy, stage_and_install

#: Where the store is built inside the target directory (on its file system even when the
#: target is a mounted volume, whose root cannot be renamed over).
STAGING_DIR = ".restoring"
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

    def build(staging: str) -> tuple[Header, list]:
        _check_target(directory)  # again, now that it is locked
        with BackupReader(backup_path) as reader:
            return reader.header, _fill(reader, reader.header, staging)

    try:
        header, counts = stage_and_install(directory, STAGING_DIR, build,
                                           "the directory to restore into")
    except DirectoryBusy as e:
        raise InvalidArgument(f"{directory} is in use by {e.holder}: restore into a new or "
                              f"empty directory") from None
    return {"shards": header.shards, "rows": counts, "revisions": list(header.revisions),
            "path": directory}


def _check_target(directory: str) -> None:
    if os.path.lexists(directory):
        if not os.path.isdir(directory) or os.path.islink(directory):
            raise InvalidArgument(f"{directory} exists and is not a directory: restore into a "
                                  f"new or empty directory")
        names = os.listdir(directory)
        if names == [STAGING_DIR]:
            raise InvalidArgument(f"{directory} holds {STAGING_DIR}, left by a restore that "
                                  f"was killed: remove it, then restore again")
        if names:
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

