"""``kvstore demo``: the embedded store at work in a few seconds.

Writes, reads, compare-and-set, a prefix scan, transactions moving money
between accounts from eight threads while the total stays put, group commit
(eight writers against one), and a close and reopen that finds everything.
"""

from __future__ import annotations

import random
import shutil
import tempfile
import threading
import time
from typing import Callable

import kvstore
from kvstore.cli import format_status


def _step(title: str) -> None:
    print(f"\n== {title}")


def ops_per_second(work: Callable[[int], None], threads: int, ops_per_thread: int) -> float:
    """Operations per second of ``work(t)`` (``ops_per_thread`` operations each) run by
    ``threads`` threads released together, timed from the release to the last one's end.

    The barrier keeps thread start-up out of the time. ``bench/`` times its writer
    threads with this too, so the figure the demo prints is measured as theirs are.
    """
    start = threading.Barrier(threads + 1)

    def released(t: int) -> None:
        start.wait()
        work(t)

    workers = [threading.Thread(target=released, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    start.wait()
    t0 = time.perf_counter()
    for w in workers:
        w.join()
    return threads * ops_per_thread / (time.perf_counter() - t0)


def _timed_puts(db: kvstore.KV, threads: int, per_thread: int, tag: str) -> float:
    """Durable puts per second from ``threads`` writers."""

    def writer(t: int) -> None:
        for i in range(per_thread):
            db.put(f"bench/{tag}/{t}/{i:06d}", b"x" * 128)

    return ops_per_second(writer, threads, per_thread)


def run_demo(path: str | None = None) -> int:
    owned = path is None
    path = path or tempfile.mkdtemp(prefix="kvstore-demo-")
    print(f"kvstore {kvstore.__version__} demo, data in {path} "
          f"(kernels: {kvstore.status()['implementation']})")
    try:
        with kvstore.open(path, shards=4 if owned else None) as db:
            _step("put, get, delete, compare-and-set")
            db.put("greeting", "hello")
            print("get greeting ->", db.get("greeting"))
            print("cas greeting hello->bonjour ->", db.cas("greeting", "hello", "bonjour"))
            print("cas greeting hello->hi ->", db.cas("greeting", "hello", "hi"), "(it is bonjour)")
            print("delete greeting ->", db.delete("greeting"), " get ->", db.get("greeting"))

            _step("prefix scan across 4 shards, in key order")
            for name in ["carol", "alice", "dave", "bob"]:
                db.put(f"user/{name}", f"{name}@example.com")
            for key, value in db.scan("user/", limit=3):
                print(f"  {key.decode()} = {value.decode()}")

            _step("transactions: 8 threads move money between 10 accounts")
            accounts = [f"acct/{i}" for i in range(10)]
            with db.transaction() as txn:
                for a in accounts:
                    txn.put(a, b"100")

            def transfer(txn, rng: random.Random) -> None:
                src, dst = rng.sample(accounts, 2)
                amount = rng.randint(1, 10)
                a, b = int(txn.get(src)), int(txn.get(dst))
                txn.put(src, str(a - amount))
                txn.put(dst, str(b + amount))

            def mover(seed: int) -> None:
                rng = random.Random(seed)
                for _ in range(50):
                    db.run_transaction(lambda txn: transfer(txn, rng), retries=50)

            movers = [threading.Thread(target=mover, args=(s,)) for s in range(8)]
            for m in movers:
                m.start()
            for m in movers:
                m.join()
            total = sum(int(v) for _, v in db.scan("acct/"))
            print(f"400 transfers done; total = {total} (started at 1000)")

            _step("group commit: every put is fsync'd before it returns")
            one = _timed_puts(db, 1, 300, "one")
            eight = _timed_puts(db, 8, 300, "eight")
            print(f"1 thread : {one:8.0f} durable puts/s")
            print(f"8 threads: {eight:8.0f} durable puts/s ({eight / one:.1f}x: "
                  f"concurrent writers share one fsync)")

            _step("status")
            print(format_status(db.status()))

        _step("close and reopen: everything is still there")
        with kvstore.open(path) as db:
            print("user/alice ->", db.get("user/alice"))
            print("total ->", sum(int(v) for _, v in db.scan("acct/")))
            print("keys ->", len(db.scan()))
    finally:
        if owned:
            shutil.rmtree(path, ignore_errors=True)
    return 0
