"""Put-to-event latency and events/s of OP_WATCH on a local 3-node cluster (raw polls).

A writer thread puts ``--puts`` keys one after the other through ``kvstore.connect``;
a watcher long-polls one node (the leader or a follower, ``--on``) from the revision
before the first put and timestamps each event as it arrives. Latency is from the
put's call to the event's arrival (the put's own fsync and commit included); events/s
is the watcher's rate while a batch writer (``--batch`` puts per transaction) keeps
the shard busy.

    python bench/watch_node.py [--puts 2000] [--on follower|leader]
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import threading
import time

import zmq

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from kvstore.server.local import LocalCluster  # noqa: E402
from kvstore.transport import wire  # noqa: E402


def watch(address: str, start: int, prefix: bytes, want: int, arrivals: dict,
          stop: threading.Event) -> None:
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(address)
    ids = itertools.count(1)
    position = start
    try:
        while len(arrivals) < want and not stop.is_set():
            s.send(wire.encode_request(next(ids), wire.OP_WATCH,
                                       [0, prefix, prefix + b"\xff", position, 1 << 20, 1000,
                                        False]))
            if not s.poll(5000):
                continue
            body = wire.decode(s.recv(), wire.MAX_PEER_FRAME_BYTES)
            _rid, status, value = body[1:] if body[0] == wire.REPLY else body[1][0]
            now = time.perf_counter()
            if status != wire.STATUS_OK:
                continue
            events, _oldest, through, _current = value
            for _revision, changes in events or ():
                for _t, key, _v, _p in changes:
                    arrivals.setdefault(key, now)
            position = through + 1
    finally:
        s.close(0)
        ctx.term()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--puts", type=int, default=2000)
    ap.add_argument("--on", choices=("follower", "leader"), default="follower")
    ap.add_argument("--batch", type=int, default=100)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        lc = LocalCluster(d, 3, 1)
        try:
            lc.start_all()
            leader = lc.wait_ready()["shards"][0]["leader"]
            node = leader if args.on == "leader" else next(n for n in lc.names if n != leader)
            with lc.client(timeout=10) as c:
                start = 0  # a new cluster: its history holds everything from revision 1
                arrivals: dict = {}
                stop = threading.Event()
                t = threading.Thread(target=watch, args=(lc.addresses[node], start + 1, b"p/",
                                                         args.puts, arrivals, stop))
                t.start()
                sent = {}
                for i in range(args.puts):
                    key = b"p/%08d" % i
                    sent[key] = time.perf_counter()
                    c.put(key, b"v")
                t.join(60)
                lat = sorted((arrivals[k] - sent[k]) * 1000 for k in sent if k in arrivals)
                print(f"put-to-event on the {args.on}: {len(lat)} events, p50 "
                      f"{lat[len(lat) // 2]:.2f} ms, p99 {lat[int(len(lat) * 0.99)]:.2f} ms")
                # throughput: transactions of --batch puts each, watcher counting
                n = args.puts * 5
                arrivals2: dict = {}
                t = threading.Thread(target=watch, args=(lc.addresses[node], 1, b"q/", n,
                                                         arrivals2, stop))
                t.start()
                began = time.perf_counter()
                for i in range(0, n, args.batch):
                    with c.transaction() as txn:
                        for j in range(i, min(n, i + args.batch)):
                            txn.put(b"q/%08d" % j, b"v" * 100)
                t.join(120)
                elapsed = max(arrivals2.values()) - began
                print(f"events/s on the {args.on}: {len(arrivals2) / elapsed:.0f} "
                      f"({len(arrivals2)} events of 100-byte values in {elapsed:.2f} s, "
                      f"{args.batch} puts per transaction)")
                stop.set()
        finally:
            lc.close()


if __name__ == "__main__":
    main()
