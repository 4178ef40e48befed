"""Embedded store against raw LMDB doing the same work, in the same run.

16-byte keys, 128-byte values. Each kvstore figure sits beside raw ``lmdb``
doing the equivalent: a write transaction committed with fsync per put, a read
transaction per get, a cursor walk for a prefix scan. Prints a table of ops/s
and ratios and writes the figures as JSON (``bench/results/embedded.json``).

    python bench/embedded.py            # full run (under a minute)
    python bench/embedded.py --quick    # smoke run

Goals (issue 2): get >= 0.6x raw LMDB, 1-thread put >= 0.8x raw LMDB put,
8-thread put >= 5x raw LMDB 1-thread put (what group commit buys).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import random
import shutil
import sys
import tempfile
import threading
import time

import lmdb

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import kvstore  # noqa: E402
import figures  # noqa: E402  (bench/figures.py, beside this script)

KEY_SIZE = 16
VALUE_SIZE = 128


def key(i: int) -> bytes:
    return b"key-%012d" % i


def raw_env(path: str) -> lmdb.Environment:
    return lmdb.open(path, map_size=1 << 32, sync=True, metasync=True, readahead=False)


@contextlib.contextmanager
def side_by_side(parent: str | None, shards: int = 1):
    """A fresh kvstore and a fresh raw LMDB environment in one temporary directory.

    Yields ``(db, env, raw_put)``: ``raw_put(key, value)`` is raw LMDB's durable
    put, a write transaction and its fsync. Both are closed and the directory
    removed on the way out.
    """
    tmp = tempfile.mkdtemp(prefix="kvstore-bench-", dir=parent)
    try:
        with kvstore.open(os.path.join(tmp, "kv"), shards=shards) as db, \
                raw_env(os.path.join(tmp, "raw")) as env:
            def raw_put(k: bytes, v: bytes) -> None:
                with env.begin(write=True) as txn:
                    txn.put(k, v)

            yield db, env, raw_put
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def put_threads(put, threads: int, n_per_thread: int, base: int, value: bytes) -> float:
    """ops/s of ``put(key, value)`` from ``threads`` threads started together.

    The threads share one key sequence (an append workload, as with one
    thread), so concurrent puts land on neighbouring keys as they would in a
    log or a time series.
    """
    barrier = threading.Barrier(threads + 1)
    sequence = itertools.count(base)  # next() on a count is atomic under the GIL

    def work(t: int) -> None:
        barrier.wait()
        for _ in range(n_per_thread):
            put(key(next(sequence)), value)

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    barrier.wait()
    t0 = time.perf_counter()
    for w in workers:
        w.join()
    return rate(threads * n_per_thread, time.perf_counter() - t0)


def put_scaling(ours, raw, thread_counts, n: int, rounds: int, base: int,
                value: bytes) -> list[dict]:
    """Durable puts/s of each side at each thread count, best of ``rounds``.

    Group commit is the difference between the two curves: raw LMDB queues its
    writers on one lock, one fsync each, so its line stays flat.
    """
    points = []
    for threads in thread_counts:
        per_thread = max(1, 2 * n // threads)  # the same work at every count
        ours_ops = raw_ops = 0.0
        for _ in range(rounds):
            ours_ops = max(ours_ops, put_threads(ours, threads, per_thread, base, value))
            base += threads * per_thread
            raw_ops = max(raw_ops, put_threads(raw, threads, max(1, per_thread // 2), base,
                                               value))
            base += threads * per_thread
        points.append({"threads": threads, "kvstore_ops": ours_ops, "raw_lmdb_ops": raw_ops})
        print(f"  put scaling, {threads} thread(s): kvstore {ours_ops:,.0f}/s, "
              f"raw {raw_ops:,.0f}/s", file=sys.stderr)
    return points


def best_interleaved(ours, raw, rounds: int) -> tuple[float, float]:
    """Best time of each of two workloads, run alternately ``rounds`` times."""
    t_ours = t_raw = float("inf")
    for _ in range(rounds):
        t_ours = min(t_ours, timed(ours))
        t_raw = min(t_raw, timed(raw))
    return t_ours, t_raw


def checksum_cost_ns(keys: list, value: bytes, rounds: int) -> float:
    """What verifying a stored value's checksum adds to a get, in ns: the read path's
    ``value_of(key, raw)`` against the bare slice that dropped the header before it."""
    from kvstore.storage.state import VALUE_HEADER_SIZE, stored, value_of

    keys = keys[:100_000]
    raws = [(k, stored(k, 1, value)) for k in keys]

    def verified() -> None:
        for k, raw in raws:
            value_of(k, raw)

    def sliced() -> None:
        for _k, raw in raws:
            raw[VALUE_HEADER_SIZE:]

    t_verified, t_sliced = best_interleaved(verified, sliced, rounds)
    return (t_verified - t_sliced) / len(raws) * 1e9


def run(args) -> dict:
    value = random.Random(1).randbytes(VALUE_SIZE)
    results: dict = {"config": {"key_size": KEY_SIZE, "value_size": VALUE_SIZE,
                                "shards": args.shards, "puts": args.puts,
                                "keys": args.keys, "gets": args.gets,
                                "implementation": kvstore.status()["implementation"]},
                     "rows": []}
    with side_by_side(args.dir, args.shards) as (db, env, raw_put):
        def row(name: str, ours: float, raw: float, goal: float | None, note: str) -> None:
            results["rows"].append({"name": name, "kvstore_ops": ours, "raw_lmdb_ops": raw,
                                    "ratio": ours / raw, "goal": goal, "note": note})
            print(f"  {name}: kvstore {ours:,.0f}/s, raw {raw:,.0f}/s, ratio {ours / raw:.2f}",
                  file=sys.stderr)

        n = args.puts
        # Interleave rounds so both sides see the same disk weather, and keep each
        # side's best round (as timeit does): a noisy neighbour only ever slows a round.
        ours_1 = raw_1 = ours_8 = raw_8 = 0.0
        base = 0
        for _ in range(args.rounds):
            ours_1 = max(ours_1, put_threads(db.put, 1, n, base, value))
            raw_1 = max(raw_1, put_threads(raw_put, 1, n, base, value))
            base += n
            ours_8 = max(ours_8, put_threads(db.put, 8, n, base, value))
            raw_8 = max(raw_8, put_threads(raw_put, 8, n // 2, base, value))
            base += 8 * n
        row("put, 1 thread (durable)", ours_1, raw_1, 0.8,
            "raw: one write txn + fsync per put")
        row("put, 8 threads vs raw 1 thread", ours_8, raw_1, 5.0,
            f"group commit; raw LMDB with 8 threads does {raw_8:,.0f}/s")
        results["put_scaling"] = put_scaling(db.put, raw_put, args.threads, n, args.rounds,
                                             base, value)

        # Load the read set in big batches (both sides), then random gets.
        total = args.keys
        batch = 5000
        for first in range(0, total, batch):
            def load(txn, first=first):
                for i in range(first, min(first + batch, total)):
                    txn.put(key(i), value)
            db.run_transaction(load)
            with env.begin(write=True) as txn:
                for i in range(first, min(first + batch, total)):
                    txn.put(key(i), value)
        rng = random.Random(7)
        keys = [key(rng.randrange(total)) for _ in range(args.gets)]

        def ours_get() -> None:
            get = db.get
            for k in keys:
                get(k)

        def raw_get() -> None:
            begin = env.begin
            for k in keys:
                with begin() as txn:
                    txn.get(k)

        t_ours, t_raw = best_interleaved(ours_get, raw_get, args.rounds)
        row(f"get, random over {total:,} keys", rate(len(keys), t_ours),
            rate(len(keys), t_raw), 0.6, "raw: one read txn per get")
        results["checksum_ns_per_get"] = checksum_cost_ns(keys, value, args.rounds)
        print(f"  value checksum (CRC32C of key, revision, value) verified on each get: "
              f"{results['checksum_ns_per_get']:.0f} ns", file=sys.stderr)

        prefix = b"key-00000000"  # keys 0..9,999
        scans = max(10, args.gets // 20000)

        def ours_scan() -> None:
            for _ in range(scans):
                db.scan(prefix)

        def raw_scan() -> None:
            end = prefix[:-1] + bytes([prefix[-1] + 1])
            for _ in range(scans):
                with env.begin() as txn:
                    cur = txn.cursor()
                    out = []
                    if cur.set_range(prefix):
                        for k, v in cur:
                            if k >= end:
                                break
                            out.append((k, v))

        rows = len(db.scan(prefix))
        t_ours, t_raw = best_interleaved(ours_scan, raw_scan, args.rounds)
        row(f"prefix scan ({rows:,} rows), rows/s", rate(scans * rows, t_ours),
            rate(scans * rows, t_raw), None, "raw: cursor walk in one read txn")
    return results


def print_table(results: dict) -> None:
    cfg = results["config"]
    print(f"\nkvstore embedded vs raw LMDB  ({cfg['key_size']}-byte keys, "
          f"{cfg['value_size']}-byte values, {cfg['shards']} shard(s), "
          f"kernels: {cfg['implementation']})\n")
    head = f"{'operation':42} {'kvstore/s':>12} {'raw LMDB/s':>12} {'ratio':>7} {'goal':>6}  ok"
    print(head)
    print("-" * len(head))
    for r in results["rows"]:
        goal = "" if r["goal"] is None else f">={r['goal']:g}"
        ok = "" if r["goal"] is None else ("yes" if r["ratio"] >= r["goal"] else "NO")
        print(f"{r['name']:42} {r['kvstore_ops']:12,.0f} {r['raw_lmdb_ops']:12,.0f} "
              f"{r['ratio']:7.2f} {goal:>6}  {ok}")
    for r in results["rows"]:
        print(f"  {r['name']}: {r['note']}")
    scaling = results.get("put_scaling")
    if scaling:
        print("\ndurable puts/s by writer threads (bench/plot.py draws it)\n")
        print(f"{'threads':>7} {'kvstore/s':>12} {'raw LMDB/s':>12}")
        for p in scaling:
            print(f"{p['threads']:>7} {p['kvstore_ops']:12,.0f} {p['raw_lmdb_ops']:12,.0f}")


def thread_counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 1,2,4,8, got {text!r}")
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"thread counts must be >= 1, got {text!r}")
    return counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small smoke run")
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--puts", type=int, default=1000, help="puts per thread per round")
    p.add_argument("--keys", type=int, default=100_000, help="keys loaded for the get test")
    p.add_argument("--gets", type=int, default=300_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=thread_counts, default=(1, 2, 4, 8, 16),
                   help="writer thread counts of the put scaling sweep (default: 1,2,4,8,16)")
    p.add_argument("--dir", default=None, help="where to put the temporary stores")
    p.add_argument("--json", default=figures.default_path("embedded"),
                   help="where to write the figures (default: %(default)s)")
    args = p.parse_args(argv)
    if args.quick:
        args.puts, args.keys, args.gets, args.rounds = 200, 20_000, 50_000, 1
    results = run(args)
    print_table(results)
    figures.write(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
