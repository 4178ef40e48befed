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
  fallbacks;
- **etcd in the same sitting** (where ``etcd`` is installed: three members on
  loopback, ``bench/etcd_local.py``): the same live events/s (64 puts in flight,
  64 threads each on its own connection to its v3 JSON gateway, a prefix watch on
  the leader) and put-to-event
  latency, with kvstore/etcd ratios. Without the binary etcd is skipped, said so.

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
import etcd_local  # noqa: E402
from figures import percentile  # noqa: E402
import kvstore.aio  # noqa: E402
from kvstore.server.local import LocalCluster  # noqa: E402


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.dirname(HERE) + os.pathsep + env.get("PYTHONPATH", "")
    return env


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
    return {"puts": n, "p50_ms": percentile(latencies, 0.5) * 1e3,
            "p99_ms": percentile(latencies, 0.99) * 1e3,
            "mean_ms": statistics.mean(latencies) * 1e3}


def _etcd_put_many(url: str, keys: list, value: bytes, inflight: int) -> None:
    """``keys`` put through etcd's gateway by ``inflight`` threads, each on its own
    keep-alive ``http.client`` connection (httpx's asyncio client topped out near 150
    puts/s here whatever the concurrency: it measured itself, not etcd)."""
    lock = threading.Lock()
    queue = list(keys)
    errors: list = []

    def worker():
        client = etcd_local.EtcdConnection(url)
        try:
            while True:
                with lock:
                    if not queue:
                        return
                    key = queue.pop()
                client.put(key, value)
        except Exception as e:  # noqa: BLE001 (reported below, after the join)
            errors.append(e)
        finally:
            client.close()

    pool = [threading.Thread(target=worker) for _ in range(inflight)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(120)
    if errors:
        raise errors[0]


def etcd_live_events(url: str, n: int, inflight: int) -> dict:
    """``live_events``' load on etcd: n puts of 128 bytes, ``inflight`` at a time, a
    prefix watch taking every event."""
    keys = [b"live/%08d" % i for i in range(n)]
    with etcd_local.EtcdWatch(url, b"live/") as w:
        start = time.perf_counter()
        _etcd_put_many(url, keys, b"v" * 128, inflight)
        written = time.perf_counter()
        last, count = None, 0
        while count < n:
            e = w.get(timeout=60)
            if e is None:
                break
            last, count = e[0], count + 1
    assert count == n, f"etcd: {count} of {n} events"
    return {"events": n, "writes_per_s": n / (written - start), "events_per_s": n / (last - start)}


def etcd_put_to_event(url: str, n: int) -> dict:
    """``put_to_event`` on etcd: one put at a time, then its event from the watch."""
    client = etcd_local.EtcdClient(url)
    latencies = []
    with client.watch(b"lat/") as w:
        for i in range(n):
            start = time.perf_counter()
            client.put(b"lat/%d" % i, b"x")
            e = w.get(timeout=30)
            latencies.append(time.perf_counter() - start)
            assert e is not None and e[2] == b"lat/%d" % i
    client.close()
    return {"puts": n, "p50_ms": percentile(latencies, 0.5) * 1e3,
            "p99_ms": percentile(latencies, 0.99) * 1e3,
            "mean_ms": statistics.mean(latencies) * 1e3}


def etcd_figures(directory: str, events: int, latency_puts: int) -> dict | None:
    """etcd's watch under the same load, or None (said why) where it is not installed."""
    binary = etcd_local.find_etcd()
    if binary is None:
        print(etcd_local.MISSING, file=sys.stderr)
        return None
    with etcd_local.EtcdCluster(os.path.join(directory, "etcd"), binary) as ec:
        url = ec.leader_url()
        return {"version": etcd_local.etcd_version(binary), "members": 3,
                "client": "v3 JSON gateway, HTTP/1.1 keep-alive (http.client)",
                "live": etcd_live_events(url, events, 64),
                "put_to_event": etcd_put_to_event(url, latency_puts)}


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
    parser.add_argument("--etcd-events", type=int, default=3_000,
                        help="etcd's live runs put at most this many (it is slower: a rate "
                             "needs no more)")
    parser.add_argument("--no-etcd", action="store_true", help="kvstore alone")
    parser.add_argument("--json", default=None,
                        help="where the figures go (default bench/results/watch.json; "
                             "a --quick run writes only where told)")
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
        # etcd after kvstore's nodes stopped: the same machine, never both at once.
        if not args.no_etcd:
            figures["etcd"] = etcd_figures(directory, min(args.events, args.etcd_events),
                                           args.latency_puts)
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
    etcd = figures.get("etcd")
    if etcd:
        el, elat = etcd["live"], etcd["put_to_event"]
        print(f"\netcd {etcd['version']}, 3 members, same load ({etcd['client']}; "
              f"{el['events']} events):")
        print(f"{'':32}{'kvstore':>12}{'etcd':>12}{'kvstore/etcd':>14}")
        for label, k, e in (("live events/s", live["events_per_s"], el["events_per_s"]),
                            ("writes/s (64 in flight)", live["writes_per_s"], el["writes_per_s"]),
                            ("put-to-event p50 ms", lat["p50_ms"], elat["p50_ms"]),
                            ("put-to-event p99 ms", lat["p99_ms"], elat["p99_ms"])):
            print(f"{label:32}{k:>12,.2f}{e:>12,.2f}{k / e:>14.2f}")
    live.pop("position", None)
    if args.json is None and not args.quick:
        args.json = os.path.join(HERE, "results", "watch.json")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
