"""Durable group appends through the write-ahead log beside an LMDB synced commit.

A group is N records, each a 16-byte key and a 128-byte value, as
``kvstore.storage.wal`` ``KIND_ENTRY`` records (one ``pwrite`` + one
``fdatasync`` per group), or as N puts in one LMDB write transaction committed
with ``sync=True, metasync=True`` (the commit the embedded store pays now).
From 1 and 8 writer threads, each appending its own groups (no merging: each
group pays its own flush on either side); best of interleaved rounds. A third
column, ``merged``, sends the same groups through ``kvstore.embedded.groupcommit``, so
the groups of concurrent writers share one append (one write, one fdatasync).

fsync-family calls per group are counted two ways: in this process by
wrapping ``os.fdatasync`` / ``os.fsync`` (what the log calls; LMDB flushes
from C and is invisible there), and, with ``--strace``, by running each side
alone under ``strace -f -c`` and reading the kernel's count of
fsync/fdatasync/msync/sync_file_range calls and of write calls. (LMDB with
``metasync`` writes its meta page through a second descriptor opened
``O_DSYNC``: a second device flush that shows as a write, not as an fsync.)

    python bench/wal.py              # full run (about half a minute)
    python bench/wal.py --quick      # smoke run
    python bench/wal.py --strace     # also count system calls with strace
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading

import lmdb

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from kvstore import _native  # noqa: E402
from kvstore.embedded.demo import ops_per_second  # noqa: E402
from kvstore.embedded.groupcommit import GroupCommitter, Request  # noqa: E402
from kvstore.storage.wal import KIND_ENTRY, Record, WriteAheadLog  # noqa: E402
import figures  # noqa: E402

VALUE = random.Random(1).randbytes(128)
SYNC_CALLS = ("fsync", "fdatasync", "msync", "sync_file_range")
WRITE_CALLS = ("pwrite64", "pwritev", "pwritev2", "write", "writev")


def key(i: int) -> bytes:
    return b"key-%012d" % i


class SyncCounter:
    """Counts ``os.fdatasync`` and ``os.fsync`` calls made from Python while installed."""

    def __init__(self) -> None:
        self.calls = 0
        self._lock = threading.Lock()

    def __enter__(self) -> "SyncCounter":
        self._saved = os.fdatasync, os.fsync

        def wrap(fn):
            def counted(fd):
                with self._lock:
                    self.calls += 1
                return fn(fd)
            return counted
        os.fdatasync, os.fsync = wrap(os.fdatasync), wrap(os.fsync)
        return self

    def __exit__(self, *exc) -> None:
        os.fdatasync, os.fsync = self._saved


class Sides:
    """A fresh log and a fresh LMDB environment in one temporary directory."""

    def __init__(self, parent: str | None, sides=("wal", "lmdb")) -> None:
        self.tmp = tempfile.mkdtemp(prefix="kvstore-bench-wal-", dir=parent)
        self.log = self.env = None
        if "wal" in sides:
            self.log = WriteAheadLog.open(os.path.join(self.tmp, "wal"))
            self.log.append([Record(KIND_ENTRY, payload=b"warm")])  # the first segment exists
            self.committer = GroupCommitter(self._commit_merged)
        if "lmdb" in sides:
            self.env = lmdb.open(os.path.join(self.tmp, "lmdb"), map_size=1 << 32, sync=True,
                                 metasync=True, readahead=False)

    def wal_append(self, first: int, n: int) -> None:
        self.log.append([Record(KIND_ENTRY, shard=0, slot=first + j, ballot=1,
                                payload=key(first + j) + VALUE) for j in range(n)])

    def wal_merged(self, first: int, n: int) -> None:
        """Through ``kvstore.embedded.groupcommit``: concurrent groups merge into one append."""
        self.committer.submit(Request((first, n), size=n * (len(VALUE) + 16)))

    def _commit_merged(self, requests) -> None:
        records = [Record(KIND_ENTRY, shard=0, slot=first + j, ballot=1,
                          payload=key(first + j) + VALUE)
                   for r in requests for first, n in (r.payload,) for j in range(n)]
        try:
            end = self.log.append(records)
        except Exception as e:  # each writer gets the error of the append it was in
            for r in requests:
                r.error = e
            return
        for r in requests:
            r.result = end

    def lmdb_commit(self, first: int, n: int) -> None:
        with self.env.begin(write=True) as txn:
            for j in range(n):
                txn.put(key(first + j), VALUE)

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
        if self.env is not None:
            self.env.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def groups_per_second(append, threads: int, groups_per_thread: int, n: int,
                      base: int) -> float:
    """Groups of ``n`` records appended per second by ``threads`` threads, each its own
    keys from ``base`` on."""

    def work(t: int) -> None:
        first = base + t * groups_per_thread * n
        for g in range(groups_per_thread):
            append(first + g * n, n)

    return ops_per_second(work, threads, groups_per_thread)


def run(args) -> dict:
    rows = []
    sides = Sides(args.dir)
    appends = {"wal": sides.wal_append, "merged": sides.wal_merged, "lmdb": sides.lmdb_commit}
    base = 0
    try:
        for threads in args.threads:
            for n in args.records:
                best = dict.fromkeys(appends, 0.0)
                syncs = dict.fromkeys(appends, 0)
                per_thread = max(1, args.groups // threads)
                groups = threads * per_thread * args.rounds  # by each side, in all
                for _round in range(args.rounds):  # interleaved: the disk's mood hits all
                    for side, append in appends.items():
                        with SyncCounter() as counter:  # (LMDB syncs from C: it counts 0)
                            rate = groups_per_second(append, threads, per_thread, n, base)
                        syncs[side] += counter.calls
                        base += threads * per_thread * n
                        best[side] = max(best[side], rate)
                rows.append({
                    "threads": threads, "records_per_group": n,
                    "wal_groups_per_s": round(best["wal"], 1),
                    "lmdb_groups_per_s": round(best["lmdb"], 1),
                    "wal_records_per_s": round(best["wal"] * n, 1),
                    "ratio": round(best["wal"] / best["lmdb"], 2),
                    "wal_fsync_calls_per_group_python": round(syncs["wal"] / groups, 3),
                    "merged_groups_per_s": round(best["merged"], 1),
                    "merged_fsync_calls_per_group_python": round(syncs["merged"] / groups, 3),
                })
    finally:
        sides.close()
    results = {
        "implementation": _native.IMPLEMENTATION,
        "groups_per_thread_per_round": args.groups, "rounds": args.rounds,
        "value_bytes": len(VALUE), "key_bytes": len(key(0)),
        "rows": rows,
    }
    if args.strace:
        results["strace"] = [strace_count(side, args) for side in ("wal", "lmdb")]
    return results


def strace_count(side: str, args) -> dict:
    """fsync-family system calls per group of ``side``, counted by ``strace -f -c``."""
    groups = 200
    cmd = ["strace", "-f", "-c", "-e", "trace=" + ",".join(SYNC_CALLS + WRITE_CALLS),
           sys.executable,
           os.path.abspath(__file__), "--only", side, "--groups", str(groups),
           "--records", "8"] + (["--dir", args.dir] if args.dir else [])
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    calls = {}
    for line in done.stderr.splitlines():
        m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$", line)
        if m and m.group(2) in SYNC_CALLS + WRITE_CALLS:
            calls[m.group(2)] = int(m.group(1))
    # The child also writes and syncs while creating its first segment (or environment) and
    # Python writes a little to pipes: a fixed start, so the figures are per group + epsilon.
    syncs = sum(calls.get(c, 0) for c in SYNC_CALLS)
    writes = sum(calls.get(c, 0) for c in WRITE_CALLS)
    return {"side": side, "groups": groups, "records_per_group": 8, "calls": calls,
            "sync_calls_per_group": round(syncs / groups, 3),
            "write_calls_per_group": round(writes / groups, 3)}


def only(side: str, args) -> None:
    sides = Sides(args.dir, sides=(side,))
    try:
        append = sides.wal_append if side == "wal" else sides.lmdb_commit
        for g in range(args.groups):
            append(g * args.records[0], args.records[0])
    finally:
        sides.close()


def print_table(results: dict) -> None:
    print(f"durable group appends ({results['implementation']} codec; "
          f"{results['key_bytes']}-byte keys, {results['value_bytes']}-byte values; "
          f"best of {results['rounds']} interleaved rounds)")
    print(f"{'threads':>7} {'N':>4} {'wal groups/s':>13} {'lmdb commits/s':>15} "
          f"{'ratio':>6} {'wal records/s':>14} {'wal fsyncs/group':>17} "
          f"{'merged groups/s':>16} {'merged fsyncs/group':>20}")
    for r in results["rows"]:
        print(f"{r['threads']:>7} {r['records_per_group']:>4} {r['wal_groups_per_s']:>13,.0f} "
              f"{r['lmdb_groups_per_s']:>15,.0f} {r['ratio']:>6.2f} "
              f"{r['wal_records_per_s']:>14,.0f} "
              f"{r['wal_fsync_calls_per_group_python']:>17.3f} "
              f"{r['merged_groups_per_s']:>16,.0f} "
              f"{r['merged_fsync_calls_per_group_python']:>20.3f}")
    for s in results.get("strace", []):
        print(f"strace -f -c, {s['side']}: {s['groups']} groups of {s['records_per_group']}: "
              f"{s['calls']}: {s['sync_calls_per_group']} fsync-family and "
              f"{s['write_calls_per_group']} write calls per group")


def int_list(text: str) -> tuple[int, ...]:
    values = tuple(int(x) for x in text.split(",") if x)
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("a comma-separated list of positive integers")
    return values


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small smoke run")
    p.add_argument("--groups", type=int, default=600, help="groups per round (all threads)")
    p.add_argument("--records", type=int_list, default=(1, 16), help="records per group")
    p.add_argument("--threads", type=int_list, default=(1, 8))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--strace", action="store_true", help="also count syscalls with strace")
    p.add_argument("--only", choices=("wal", "lmdb"), help=argparse.SUPPRESS)
    p.add_argument("--dir", default=None, help="where to put the temporary stores")
    p.add_argument("--json", default=figures.default_path("wal"),
                   help="where to write the figures (default: %(default)s)")
    args = p.parse_args(argv)
    if args.only:
        only(args.only, args)
        return 0
    if args.quick:
        args.groups, args.rounds = 40, 1
    return figures.report(run(args), print_table, args.json)


if __name__ == "__main__":
    sys.exit(main())
