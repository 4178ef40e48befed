"""Backup and restore throughput, in MB/s of user data, beside what a user would do instead.

A store of ``--mb`` MB of user data (``--value-bytes`` values under 16-byte keys,
``--shards`` shards) is built, checkpointed, then timed:

- ``kvstore backup (open store)``: ``kvstore.backup.backup(db, FILE)``, the store
  open in this process (its read point: overlay and an LMDB read transaction);
- ``kvstore backup (directory)``: ``kvstore.backup.backup(DIR, FILE)`` of the
  closed store's directory (opened, backed up, closed);
- ``kvstore verify``: every checksum and count of the file read back;
- ``kvstore restore``: ``kvstore.backup.restore(FILE, NEWDIR)``, every row's
  checksum checked, into a new store;
- ``kvstore backup (3-node cluster)``: ``kvstore backup --cluster`` of a local
  3-node cluster holding ``--cluster-mb`` MB (the fence, the read point, the rows
  paged over ZeroMQ a megabyte at a time); 0 skips it;
- ``lmdb Environment.copy``: ``mdb_copy``'s API on the store's raw LMDB
  (``compact=True``): a byte-level copy of the B-trees, no checksum of its own,
  no consistency across a write-ahead log (the baseline of "just copy the files");
- ``sqlite3 backup API``: the same rows in a SQLite table (``key BLOB PRIMARY
  KEY, value BLOB``, WAL mode), ``Connection.backup`` to a new file: what an
  rqlite- or SQLite-based store offers.

MB/s is user bytes (keys + values) per second in every row, so the rows compare
the same data; the file and database sizes are reported beside.

    python bench/backup.py                 # ~300 MB, writes bench/results/backup.json
    python bench/backup.py --quick         # smoke run (seconds)
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import lmdb  # noqa: E402

import kvstore  # noqa: E402
import kvstore.backup as backups  # noqa: E402
from figures import default_path, report  # noqa: E402

KEY_BYTES = 16


def build(directory: str, mb: int, value_bytes: int, shards: int) -> tuple[int, int]:
    """An embedded store of about ``mb`` MB of user data; ``(rows, user bytes)``."""
    rows = mb * 1_000_000 // (KEY_BYTES + value_bytes)
    per_txn = max(1, 2_000_000 // value_bytes)
    value = os.urandom(value_bytes)
    with kvstore.open(directory, shards=shards) as db:
        for first in range(0, rows, per_txn):
            with db.transaction() as t:
                for i in range(first, min(rows, first + per_txn)):
                    t.put(b"key%013d" % i, value)
        db.checkpoint()
    return rows, rows * (KEY_BYTES + value_bytes)


def cluster_backup(directory: str, mb: int, value_bytes: int, shards: int) -> tuple:
    """``(seconds, file bytes, user bytes)`` of a backup of a local 3-node cluster
    holding about ``mb`` MB, loaded in single-shard transactions of ~1 MB."""
    from kvstore.server.local import LocalCluster
    from kvstore.sharding import shard_of
    rows = mb * 1_000_000 // (KEY_BYTES + value_bytes)
    value = os.urandom(value_bytes)
    keys_by_shard: dict = {}
    for i in range(rows):
        key = b"key%013d" % i
        keys_by_shard.setdefault(shard_of(key, shards), []).append(key)
    per_txn = max(1, 1_000_000 // value_bytes)
    with LocalCluster(os.path.join(directory, "cluster"), 3, shards) as lc:
        lc.start_all()
        lc.wait_ready(timeout=60)
        with lc.client(timeout=30) as c:
            for keys in keys_by_shard.values():
                for first in range(0, len(keys), per_txn):
                    with c.transaction() as t:
                        for key in keys[first:first + per_txn]:
                            t.put(key, value)
            path = os.path.join(directory, "cluster.kvb")
            seconds = timed(lambda: backups.backup(c, path))
        lc.stop_all()
    return seconds, os.path.getsize(path), rows * (KEY_BYTES + value_bytes)


def sqlite_copy(directory: str, rows: int, value_bytes: int) -> tuple[float, int]:
    """The same rows in SQLite, then its online backup API to a new file: seconds, bytes."""
    src_path = os.path.join(directory, "src.sqlite")
    value = os.urandom(value_bytes)
    src = sqlite3.connect(src_path)
    src.execute("PRAGMA journal_mode=WAL")
    src.execute("CREATE TABLE kv (key BLOB PRIMARY KEY, value BLOB) WITHOUT ROWID")
    for first in range(0, rows, 10_000):
        src.executemany("INSERT INTO kv VALUES (?, ?)",
                        ((b"key%013d" % i, value) for i in range(first, min(rows, first + 10_000))))
        src.commit()
    dst_path = os.path.join(directory, "dst.sqlite")
    dst = sqlite3.connect(dst_path)
    t0 = time.perf_counter()
    src.backup(dst)
    dst.execute("PRAGMA wal_checkpoint")
    dst.close()
    fd = os.open(dst_path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    seconds = time.perf_counter() - t0
    src.close()
    return seconds, disk_bytes(dst_path)


def lmdb_copy(store_dir: str, out_dir: str) -> tuple[float, int]:
    """``lmdb.Environment.copy(compact=True)`` of the store's LMDB: seconds, bytes."""
    os.makedirs(out_dir)
    env = lmdb.open(store_dir, readonly=True, lock=False, max_dbs=4 * 256 + 1)
    t0 = time.perf_counter()
    env.copy(out_dir, compact=True)
    seconds = time.perf_counter() - t0
    env.close()
    return seconds, disk_bytes(os.path.join(out_dir, "data.mdb"))


def disk_bytes(path: str) -> int:
    """Bytes ``path`` takes on disk (LMDB keeps a sparse hole after its last page)."""
    st = os.stat(path)
    return min(st.st_size, st.st_blocks * 512)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run(args) -> dict:
    root = tempfile.mkdtemp(prefix="kvstore-bench-backup-", dir=args.dir)
    try:
        store = os.path.join(root, "store")
        t0 = time.perf_counter()
        rows, user = build(store, args.mb, args.value_bytes, args.shards)
        build_seconds = time.perf_counter() - t0
        results = {"mb": args.mb, "rows": rows, "user_bytes": user, "shards": args.shards,
                   "value_bytes": args.value_bytes, "build_seconds": build_seconds,
                   "data_mdb_bytes": disk_bytes(os.path.join(store, "data.mdb")),
                   "rows_timed": []}

        def row(name: str, seconds: float, size: int) -> None:
            results["rows_timed"].append({"name": name, "seconds": seconds,
                                          "mb_per_s": user / 1e6 / seconds, "bytes": size})

        file1 = os.path.join(root, "open.kvb")
        with kvstore.open(store) as db:
            row("kvstore backup (open store)", timed(lambda: backups.backup(db, file1)),
                os.path.getsize(file1))
        file2 = os.path.join(root, "dir.kvb")
        row("kvstore backup (directory)", timed(lambda: backups.backup(store, file2)),
            os.path.getsize(file2))
        row("kvstore verify", timed(lambda: backups.verify(file2)), os.path.getsize(file2))
        restored = os.path.join(root, "restored")
        row("kvstore restore", timed(lambda: backups.restore(file2, restored)),
            disk_bytes(os.path.join(restored, "data.mdb")))
        if args.cluster_mb:
            seconds, size, cluster_user = cluster_backup(root, args.cluster_mb,
                                                         args.value_bytes, args.shards)
            results["rows_timed"].append({
                "name": f"kvstore backup (3-node cluster, {args.cluster_mb} MB)",
                "seconds": seconds, "mb_per_s": cluster_user / 1e6 / seconds, "bytes": size})
        seconds, size = lmdb_copy(store, os.path.join(root, "lmdb-copy"))
        row("lmdb Environment.copy (compact)", seconds, size)
        seconds, size = sqlite_copy(root, rows, args.value_bytes)
        row("sqlite3 backup API", seconds, size)
        return results
    finally:
        shutil.rmtree(root, ignore_errors=True)


def print_table(results: dict) -> None:
    print(f"{results['rows']} rows, {results['user_bytes'] / 1e6:.0f} MB of keys and values "
          f"({results['value_bytes']}-byte values), {results['shards']} shard(s); "
          f"data.mdb {results['data_mdb_bytes'] / 1e6:.0f} MB; built in "
          f"{results['build_seconds']:.1f} s\n")
    print(f"{'':42} {'seconds':>8} {'MB/s':>8} {'output MB':>10}")
    for r in results["rows_timed"]:
        print(f"{r['name']:42} {r['seconds']:8.2f} {r['mb_per_s']:8.1f} {r['bytes'] / 1e6:10.1f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small smoke run")
    p.add_argument("--mb", type=int, default=300, help="MB of user data")
    p.add_argument("--value-bytes", type=int, default=1000)
    p.add_argument("--shards", type=int, default=3)
    p.add_argument("--cluster-mb", type=int, default=100,
                   help="MB of user data in the cluster backed up (0: no cluster row)")
    p.add_argument("--dir", default=None, help="where to build the stores (default: $TMPDIR)")
    p.add_argument("--json", default=default_path("backup"))
    args = p.parse_args(argv)
    if args.quick:
        args.mb = 5
        args.cluster_mb = min(args.cluster_mb, 2)
    return report(run(args), print_table, args.json)


if __name__ == "__main__":
    sys.exit(main())
