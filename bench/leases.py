"""Lease expiry precision: how long after its ttl a key held by a dead lease vanishes.

For each sample: grant a lease of ``--ttl`` seconds, put a key with it, send one
keep-alive (time *t*), then stop keeping it alive (the ``Lease`` object is
dropped: its keep-alive timer holds it weakly). A prefix watch, started before,
notes when each key's delete event arrives; the figure is
``arrival - t - ttl``: how late after the ttl the key vanished (the watch's own
delivery, a few ms, is in it). Negative would be an early expiry, which the
design forbids (docs/leases.md: never before *t* + ttl; on a cluster by
*t* + ttl + one election timeout).

Samples are staggered (``--stagger``) so they expire one by one, not in a batch.
Measured for the embedded store (its reaper thread), a 3-node cluster
(``kvstore-server`` processes on 127.0.0.1; the shard leader's tick decides), and
etcd in the same run where ``etcd`` is installed (three members,
``bench/etcd_local.py``: ``/v3/lease/grant``, a put with the lease, one
``/v3/lease/keepalive``; etcd checks for expired leases every 500 ms, and its
minimum ttl with default timings is 2 s, hence ``--ttl 2``).

    python bench/leases.py             # full run, writes bench/results/leases.json
    python bench/leases.py --quick     # smoke run (seconds)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import kvstore  # noqa: E402
import etcd_local  # noqa: E402
from figures import percentile  # noqa: E402
from kvstore.server.local import LocalCluster  # noqa: E402


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.dirname(HERE) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def summary(delays_s: list) -> dict:
    """The distribution of lateness, in ms."""
    ms = [d * 1e3 for d in delays_s]
    return {"samples": len(ms), "min_ms": min(ms), "p50_ms": percentile(ms, 0.5),
            "p90_ms": percentile(ms, 0.9), "p99_ms": percentile(ms, 0.99), "max_ms": max(ms),
            "delays_ms": sorted(ms)}


def _one_kvstore_sample(db, key: bytes, ttl: float) -> float:
    """Grant, put, one keep-alive; return its send time. The lease goes out of scope
    when this returns: nothing keeps it alive after *t*."""
    lease = db.lease(ttl)
    db.put(key, b"held", lease=lease)
    t = time.perf_counter()
    lease.keepalive()
    return t


def kvstore_precision(db, samples: int, ttl: float, stagger: float) -> dict:
    """Lateness of expiry on ``db`` (an embedded store or a cluster connection)."""
    deleted: dict = {}
    sent: dict = {}
    with db.watch(prefix=b"lease-bench/") as w:
        def consume():
            while len(deleted) < samples:
                e = w.get(timeout=ttl + 30)
                if e is None:
                    return
                if e.type == "delete":
                    deleted[e.key] = time.perf_counter()

        t = threading.Thread(target=consume)
        t.start()
        for i in range(samples):
            key = b"lease-bench/%04d" % i
            sent[key] = _one_kvstore_sample(db, key, ttl)
            time.sleep(stagger)
        t.join(ttl + 60)
    missing = set(sent) - set(deleted)
    assert not missing, f"{len(missing)} keys never expired"
    return summary([deleted[k] - sent[k] - ttl for k in sent])


def etcd_precision(url: str, samples: int, ttl: int, stagger: float) -> dict:
    client = etcd_local.EtcdClient(url)
    sent: dict = {}
    deleted: dict = {}
    with client.watch(b"lease-bench/") as w:
        for i in range(samples):
            key = b"lease-bench/%04d" % i
            lease = client.lease_grant(ttl)
            client.put(key, b"held", lease=lease)
            sent[key] = time.perf_counter()
            client.lease_keepalive(lease)
            time.sleep(stagger)
        deadline = time.monotonic() + ttl + 60
        while len(deleted) < samples and time.monotonic() < deadline:
            e = w.get(timeout=max(0.1, deadline - time.monotonic()))
            if e is None:
                break
            if e[1] == "DELETE":
                deleted[e[2]] = e[0]
    client.close()
    missing = set(sent) - set(deleted)
    assert not missing, f"etcd: {len(missing)} keys never expired"
    return summary([deleted[k] - sent[k] - ttl for k in sent])


def plot(figures: dict, out: str) -> None:
    """The CDF of lateness, one line per system."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no matplotlib: no plot (pip install -e '.[bench]')", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for name, row in figures["rows"].items():
        xs = row["delays_ms"]
        ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=name)
    ax.set_xlabel(f"key gone this many ms after its ttl ({figures['ttl_s']:g} s)")
    ax.set_ylabel("fraction of leases")
    ax.set_xscale("symlog", linthresh=10)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"plot written to {os.path.relpath(out)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (seconds)")
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--ttl", type=float, default=2.0,
                        help="seconds (etcd gets at least its minimum, 2, in whole seconds)")
    parser.add_argument("--stagger", type=float, default=0.13, help="seconds between grants")
    parser.add_argument("--no-etcd", action="store_true", help="kvstore alone")
    parser.add_argument("--json", default=None, help="where the figures go (default "
                        "bench/results/leases.json; a --quick run writes only where told)")
    args = parser.parse_args()
    if args.quick:
        args.samples, args.stagger, args.ttl = 4, 0.05, 0.5
    if args.json is None and not args.quick:
        args.json = os.path.join(HERE, "results", "leases.json")
    directory = tempfile.mkdtemp(prefix="kvstore-bench-leases-")
    figures: dict = {"ttl_s": args.ttl, "samples": args.samples, "stagger_s": args.stagger,
                     "cpus": os.cpu_count(), "rows": {}}
    rows = figures["rows"]
    try:
        db = kvstore.open(os.path.join(directory, "embedded"))
        try:
            rows["kvstore embedded"] = kvstore_precision(db, args.samples, args.ttl, args.stagger)
        finally:
            db.close()
        with LocalCluster(os.path.join(directory, "c"), 3, 1, env=_env()) as lc:
            lc.start_all()
            lc.wait_ready()
            db = kvstore.connect(lc.address_list, timeout=30)
            try:
                rows["kvstore 3 nodes"] = kvstore_precision(db, args.samples, args.ttl,
                                                            args.stagger)
            finally:
                db.close()
        binary = None if args.no_etcd else etcd_local.find_etcd()
        if binary is None and not args.no_etcd:
            print(etcd_local.MISSING, file=sys.stderr)
        if binary:
            figures["etcd_version"] = etcd_local.etcd_version(binary)
            with etcd_local.EtcdCluster(os.path.join(directory, "etcd"), binary) as ec:
                etcd_ttl = max(2, math.ceil(args.ttl))
                figures["etcd_ttl_s"] = etcd_ttl
                rows[f"etcd {figures['etcd_version']} 3 members"] = etcd_precision(
                    ec.leader_url(), args.samples, etcd_ttl, args.stagger)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print(f"lease expiry: ms after the ttl ({args.ttl:g} s; etcd {figures.get('etcd_ttl_s', '-')} s) that a key of a lease whose "
          f"keep-alive stopped is gone ({args.samples} leases each; seen by a watch)")
    print(f"{'':26}{'min':>9}{'p50':>9}{'p90':>9}{'p99':>9}{'max':>9}")
    for name, row in rows.items():
        print(f"{name:26}" + "".join(f"{row[c]:>9.1f}" for c in
                                     ("min_ms", "p50_ms", "p90_ms", "p99_ms", "max_ms")))
    etcd = next((r for n, r in rows.items() if n.startswith("etcd")), None)
    if etcd:
        for name in ("kvstore embedded", "kvstore 3 nodes"):
            print(f"{name}/etcd p50 ratio: {rows[name]['p50_ms'] / etcd['p50_ms']:.2f}, "
                  f"p99: {rows[name]['p99_ms'] / etcd['p99_ms']:.2f}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
        plot(figures, os.path.splitext(args.json)[0] + ".png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
