"""Watch and the coherent cache on a 3-node cluster on 127.0.0.1.

The servers are ``kvstore-server`` processes (``LocalCluster``), the clients run
in this process (``kvstore.connect``: one engine I/O thread each).

- **live events/s**: writers (the asyncio client, 64 puts in flight) put N keys
  under a prefix while a watcher (``db.watch(prefix=...)``, its consumer in a
  thread) takes every event: events delivered per second, from the first put to
  the last event (bounded by the write rate: both are shown);
- **catch-up events/s**: a watch from revision 1 after the writes: events per
  second read from the nodes' history (the delivery path alone);
- **put-to-event latency**: one put at a time; the time from calling ``put`` to the
  watcher taking its event, p50/p99 (a put returns once the leader applied it; the
  event follows when the leader answers the parked poll);
- **cached gets**: K hot keys read at random by one thread, from a client with
  ``cache=PREFIX`` and from a plain client (linearizable gets: a read-index round
  each), gets/s and the cache's hit ratio; then the same while another client
  rewrites the hot keys (``--update-rate`` puts/s), which costs misses and stale
  fallbacks.

    python bench/watch.py              # full run, writes bench/results/watch.json
    python bench/watch.py --quick      # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import kvstore  # noqa: E402
import kvstore.aio  # noqa: E402
from kvstore.server.local import LocalCluster  # noqa: E402


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.dirname(HERE) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _pct(values: list, q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def _put_many(addresses, keys: list, value: bytes, inflight: int) -> None:
    db = await kvstore.aio.connect(addresses, timeout=30)
    queue = list(keys)

    async def worker():
        while queue:
            await db.put(queue.pop(), value)

    await asyncio.gather(*(worker() for _ in range(inflight)))
    await db.close()


def live_events(lc, n: int, inflight: int) -> dict:
    watcher = kvstore.connect(lc.address_list, timeout=30)
    keys = [b"live/%08d" % i for i in range(n)]
    got = []
    with watcher.watch(prefix=b"live/") as w:
        def consume():
            while len(got) < n:
                e = w.get(timeout=60)
                if e is None:
                    return
                got.append(time.perf_counter())

        t = threading.Thread(target=consume)
        t.start()
        start = time.perf_counter()
        asyncio.run(_put_many(lc.address_list, keys, b"v" * 128, inflight))
        written = time.perf_counter()
        t.join(120)
        position = w.position
    watcher.close()
    assert len(got) == n, f"{len(got)} of {n} events"
    return {"events": n, "writes_per_s": n / (written - start),
            "events_per_s": n / (got[-1] - start), "position": position}


def catch_up_events(lc, n: int) -> dict:
    watcher = kvstore.connect(lc.address_list, timeout=30)
    start = time.perf_counter()
    count = 0
    with watcher.watch(prefix=b"live/", start_revision=1) as w:
        while count < n:
            if w.get(timeout=30) is None:
                break
            count += 1
    elapsed = time.perf_counter() - start
    watcher.close()
    assert count == n, f"{count} of {n} events"
    return {"events": n, "events_per_s": n / elapsed}


def put_to_event(lc, n: int) -> dict:
    writer = kvstore.connect(lc.address_list, timeout=30)
    watcher = kvstore.connect(lc.address_list, timeout=30)
    latencies = []
    with watcher.watch(prefix=b"lat/") as w:
        for i in range(n):
            start = time.perf_counter()
            writer.put(b"lat/%d" % i, b"x")
            e = w.get(timeout=30)
            latencies.append(time.perf_counter() - start)
            assert e is not None and e.key == b"lat/%d" % i
    writer.close()
    watcher.close()
    return {"puts": n, "p50_ms": _pct(latencies, 0.5) * 1e3, "p99_ms": _pct(latencies, 0.99) * 1e3,
            "mean_ms": statistics.mean(latencies) * 1e3}


def cached_gets(lc, hot: int, seconds: float, update_rate: float) -> dict:
    writer = kvstore.connect(lc.address_list, timeout=30)
    keys = [b"hot/%05d" % i for i in range(hot)]
    for k in keys:
        writer.put(k, b"v" * 128)
    out = {}
    for name, kwargs in (("linearizable", {}), ("cached", {"cache": b"hot/"})):
        db = kvstore.connect(lc.address_list, timeout=30, **kwargs)
        stop = threading.Event()

        def update():
            rng = random.Random(2)
            while not stop.is_set():
                writer.put(rng.choice(keys), b"w" * 128)
                stop.wait(1.0 / update_rate)

        for label, rate in (("no writes", 0), (f"{update_rate:g} puts/s", update_rate)):
            stop.clear()
            t = threading.Thread(target=update) if rate else None
            if t:
                t.start()
            rng = random.Random(1)
            before = db.cache_stats()
            count, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                db.get(rng.choice(keys))
                count += 1
            elapsed = time.perf_counter() - start
            stop.set()
            if t:
                t.join(30)
            after = db.cache_stats()
            row = {"gets_per_s": count / elapsed}
            if after:
                hits = after["hits"] - before["hits"]
                row["hit_ratio"] = hits / count
                row["stale"] = after["stale"] - before["stale"]
                row["misses"] = after["misses"] - before["misses"]
            out[f"{name}, {label}"] = row
        db.close()
    writer.close()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run")
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--latency-puts", type=int, default=1_000)
    parser.add_argument("--hot", type=int, default=1_000, help="hot keys the cache holds")
    parser.add_argument("--seconds", type=float, default=5.0, help="per cached-gets row")
    parser.add_argument("--update-rate", type=float, default=50.0)
    parser.add_argument("--json", default=os.path.join(HERE, "results", "watch.json"))
    args = parser.parse_args()
    if args.quick:
        args.events, args.latency_puts, args.hot, args.seconds = 500, 50, 100, 0.5
    directory = tempfile.mkdtemp(prefix="kvstore-bench-watch-")
    figures = {"nodes": 3, "shards": 1, "cpus": os.cpu_count()}
    try:
        with LocalCluster(os.path.join(directory, "c"), 3, 1, env=_env()) as lc:
            lc.start_all()
            lc.wait_ready()
            figures["live"] = live_events(lc, args.events, 64)
            figures["catch_up"] = catch_up_events(lc, args.events)
            figures["put_to_event"] = put_to_event(lc, args.latency_puts)
            figures["cache"] = cached_gets(lc, args.hot, args.seconds, args.update_rate)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    live, cu, lat = figures["live"], figures["catch_up"], figures["put_to_event"]
    print(f"live watch: {live['events_per_s']:,.0f} events/s delivered "
          f"(writes {live['writes_per_s']:,.0f}/s, 64 in flight, {live['events']} events)")
    print(f"catch-up from history: {cu['events_per_s']:,.0f} events/s")
    print(f"put-to-event latency, one put at a time: p50 {lat['p50_ms']:.2f} ms, "
          f"p99 {lat['p99_ms']:.2f} ms")
    for name, row in figures["cache"].items():
        extra = (f", hit ratio {row['hit_ratio']:.3f} (stale fallbacks {row['stale']})"
                 if "hit_ratio" in row else "")
        print(f"gets, {name}: {row['gets_per_s']:,.0f}/s{extra}")
    live.pop("position", None)
    if args.json and not args.quick:
        os.makedirs(os.path.dirname(args.json), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
