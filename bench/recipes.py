"""What the recipes cost (kvstore.recipes): a lock's acquire + release, the handover of a
contended lock (release -> the waiter holds it), a queue's put -> get -> ack, on the
embedded store and on a local cluster of kvstore-server processes.

    python bench/recipes.py [--quick] [--cluster] [--json FILE]

Prints a table; ``--json`` writes the figures. Every figure is measured in this run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import kvstore  # noqa: E402
from kvstore.recipes import Lock, Queue  # noqa: E402
from figures import percentile  # noqa: E402


def lock_round_trips(db, n: int) -> dict:
    """Uncontended acquire + release, one after the other."""
    lock = Lock(db, "bench-uncontended")
    times = []
    for _ in range(n):
        start = time.perf_counter()
        lock.acquire()
        lock.release()
        times.append(time.perf_counter() - start)
    return {"name": "lock acquire+release", "per_s": n / sum(times),
            "p50_ms": 1000 * percentile(times, 0.5), "p99_ms": 1000 * percentile(times, 0.99)}


def lock_handover(db, n: int) -> dict:
    """A holder releases; a waiter (watching the key) acquires: the time in between."""
    gaps = []
    holder, waiter = Lock(db, "bench-handover"), Lock(db, "bench-handover")
    for _ in range(n):
        holder.acquire()
        acquired = []
        t = threading.Thread(target=lambda: (waiter.acquire(),
                                             acquired.append(time.perf_counter())))
        t.start()
        time.sleep(0.02)  # the waiter is watching by now (a pause, not a correctness wait)
        released = time.perf_counter()
        holder.release()
        t.join(30)
        gaps.append(acquired[0] - released)
        waiter.release()
    return {"name": "lock handover (release -> waiter holds)", "per_s": n / sum(gaps),
            "p50_ms": 1000 * percentile(gaps, 0.5), "p99_ms": 1000 * percentile(gaps, 0.99)}


def queue_round_trips(db, n: int) -> dict:
    """put, then get and ack by one consumer."""
    producer, consumer = Queue(db, "bench"), Queue(db, "bench")
    times = []
    for i in range(n):
        start = time.perf_counter()
        producer.put(b"%d" % i)
        consumer.get(timeout=30).ack()
        times.append(time.perf_counter() - start)
    consumer.close()
    return {"name": "queue put+get+ack", "per_s": n / sum(times),
            "p50_ms": 1000 * percentile(times, 0.5), "p99_ms": 1000 * percentile(times, 0.99)}


def run(db, n: int) -> list:
    return [lock_round_trips(db, n), lock_handover(db, max(5, n // 4)),
            queue_round_trips(db, n)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (few rounds)")
    parser.add_argument("--cluster", action="store_true",
                        help="also on a local 3-node cluster (real processes)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    n = 10 if args.quick else 200
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        with kvstore.open(os.path.join(tmp, "db"), shards=3) as db:
            results["embedded"] = run(db, n)
        if args.cluster:
            from kvstore.server.local import LocalCluster
            lc = LocalCluster(os.path.join(tmp, "c"), 3, 3)
            try:
                lc.start_all()
                lc.wait_ready(timeout=60)
                with lc.client(timeout=10) as db:
                    results["cluster (3 nodes)"] = run(db, n)
            finally:
                lc.close()
    print(f"{'store':<18} {'operation':<42} {'per s':>9} {'p50 ms':>8} {'p99 ms':>8}")
    for where, rows in results.items():
        for r in rows:
            print(f"{where:<18} {r['name']:<42} {r['per_s']:>9.0f} {r['p50_ms']:>8.2f} "
                  f"{r['p99_ms']:>8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rounds": n, "results": results, "cpus": os.cpu_count(),
                       "statistics": "p50/p99 of single round trips"}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
