"""Back up an embedded store: from its object in this process, or from its directory.

An embedded store applies a multi-shard transaction as one group commit,
published into its overlay under the overlay's lock and checkpointed into LMDB
in one write transaction with the other shards' state. So any one snapshot of
the store (overlay generations and an LMDB read transaction taken together) is
one state of every shard, with each transaction wholly in it or wholly absent.
What differs between the three ways in is which snapshot:

- **the store object** (``kvstore.backup.backup(db, FILE)``, any thread, writers
  running): the store's own snapshot (``ReadPoint.capture``: as a scan or a
  transaction takes it): everything acknowledged before the call;
- **a directory another process has open** (``kvstore backup --data DIR``
  while it runs): that process holds the directory's lock and its overlay is
  in its memory, so the backup opens LMDB read-only beside it
  (``open_checkpoint``) at its last checkpoint: one LMDB commit of every
  shard's state at one log position. It holds every write acknowledged before
  that checkpoint: checkpoints run every ``CHECKPOINT_SECONDS`` (1 s) while
  there are writes, so at most about a second before the backup started, and
  all of it if the owner is idle or closed;
- **a directory nobody has open**: the store is opened here (its log
  replayed), backed up from the object, and closed.

The rows are paged out of the snapshot a megabyte at a time (``ReadPoint.page``)
while writers go on.
"""

from __future__ import annotations

import os

from kvstore.backup.format import DATA, LEASES, BackupWriter, Header, now_iso
from kvstore.errors import InvalidArgument, StorageError
from kvstore.machine.replica import META_PAXOS
from kvstore.machine.leases import LEASE_ROW_RANGES
from kvstore.storage import Storage
from kvstore.storage.environment import THIRD_PARTY_ERRORS, check_path, translate
from kvstore.storage.readpoint import ReadPoint, directory_in_use, open_checkpoint

PAGE_BYTES = 1024 * 1024


def backup_store(store, path: str | os.PathLike) -> dict:
    """Back up the open embedded store ``store`` (an ``EmbeddedKV``) to the file ``path``."""
    store._check_open()
    point = ReadPoint.capture(store._storage, store._overlay)
    n = store._nshards
    try:
        tables = [(s, n + s, store._tables[s]) for s in range(n)]
        revisions = point.applied[:n]
        return _write(point, tables, revisions, path,
                      {"kind": "embedded", "path": store.path, "how": "open store"},
                      {"position": point.position, "snapshot": "overlay and LMDB"})
    finally:
        point.close()


def backup_directory(directory: str | os.PathLike, path: str | os.PathLike) -> dict:
    """Back up the embedded store in ``directory`` to ``path``, whether or not another
    process has it open (the module docstring)."""
    directory = check_path(directory)
    from kvstore.storage.environment import DATA_FILE
    if not os.path.isfile(os.path.join(directory, DATA_FILE)):
        raise StorageError(f"no kvstore in {directory} (no {DATA_FILE}; is the path right?)",
                           directory)
    from kvstore.embedded.store import EmbeddedKV, _open_stores
    for store in list(_open_stores):  # this process has it open: its own snapshot
        if store.path == directory and not store._closed:
            return backup_store(store, path)
    if directory_in_use(directory):
        # its owner checked the files when it opened them (a truncated data.mdb would be a
        # SIGBUS here): LMDB read-only beside it
        point, shard_tables, applied = open_checkpoint(directory)
        try:
            _refuse_node_directory(directory, point.txn, shard_tables)
            return _write(point, [(None, None, t) for t in shard_tables], applied, path,
                          {"kind": "embedded", "path": directory, "how": "checkpoint of a "
                           "store another process has open"},
                          {"snapshot": "last checkpoint"})
        finally:
            point.close()
    # nobody has it open: open it here (checked, its log replayed), back it up, close it
    storage = Storage(directory, create=False)
    try:
        storage.read(lambda txn: _refuse_node_directory(directory, txn, storage.shards))
    finally:
        storage.close()
    with EmbeddedKV(directory, create=False) as store:
        return backup_store(store, path)


def _refuse_node_directory(directory: str, txn, shard_tables) -> None:
    if any(txn.get(META_PAXOS, db=t.meta) is not None for t in shard_tables):
        raise InvalidArgument(
            f"{directory} is a cluster node's data directory, not an embedded store's: back "
            f"up the cluster with --cluster ADDRS (a consistent cut across its shards)")


def _write(point: ReadPoint, tables: list, revisions: list, path, source: dict,
           cut: dict) -> dict:
    """Every shard's data and lease rows of ``point`` into the backup file ``path``;
    ``tables``: per shard ``(data overlay index, txns overlay index, ShardTables)``."""
    header = Header(shards=len(tables), source=source, revisions=list(revisions), cut=cut,
                    created=now_iso(), kvstore=_version())
    with BackupWriter(path, header) as writer:
        for shard, (data_index, txns_index, t) in enumerate(tables):
            for table, index, db, ranges in ((DATA, data_index, t.data, ((b"", None),)),
                                             (LEASES, txns_index, t.txns, LEASE_ROW_RANGES)):
                after = None
                while True:
                    try:
                        rows, done = point.page(index, db, after, PAGE_BYTES, ranges)
                    except THIRD_PARTY_ERRORS as e:  # the store closed under it, a bad page
                        raise translate(e, source.get("path", ""), "reading it for a backup")
                    writer.add(shard, table, rows, check=True)
                    if done or not rows:
                        break
                    after = rows[-1][0]
        trailer = writer.finish()
    return {"shards": len(tables), "rows": trailer["rows"], "bytes": trailer["bytes"],
            "revisions": list(revisions), "path": writer.path}


def _version() -> str:
    from kvstore import __version__
    return __version__
