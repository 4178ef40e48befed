"""One PySyncObj node with a ``ReplDict``, for ``bench/cluster.py`` (the comparison it asks for).

    python bench/pysyncobj_node.py SELF PEER PEER [--load IN_FLIGHT,... SECONDS]

Without ``--load`` the node just serves. With it, the node waits until a
leader is known, then issues ``ReplDict.set`` calls with that many in flight
(callbacks start the next), for SECONDS per level, and prints one JSON line
per level. PySyncObj has no separate client: the load runs in a node's
process (a follower forwards to the leader). Its journal is in memory here
and it never fsyncs (its default). ``appendEntriesUseBatch=False`` sends
entries at once instead of every 0.1 s tick: with the default, one set at a
time took 200 ms here.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

from pysyncobj import SyncObj, SyncObjConf
from pysyncobj.batteries import ReplDict


def main() -> int:
    args = sys.argv[1:]
    load = None
    if "--load" in args:
        i = args.index("--load")
        load = ([int(x) for x in args[i + 1].split(",")], float(args[i + 2]))
        args = args[:i]
    me, peers = args[0], args[1:]
    d = ReplDict()
    obj = SyncObj(me, peers, SyncObjConf(dynamicMembershipChange=False, appendEntriesUseBatch=False), consumers=[d])
    deadline = time.monotonic() + 30
    while obj._getLeader() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    print(json.dumps({"ready": obj._getLeader() is not None}), flush=True)
    if load is None:
        while True:
            time.sleep(3600)
    value = os.urandom(128)
    for in_flight in load[0]:
        latencies: list = []
        lock = threading.Lock()
        stop_at = time.monotonic() + load[1]
        done = threading.Event()
        active = [in_flight]
        counter = [0]

        def issue() -> None:
            counter[0] += 1
            key = b"%016d" % (counter[0] % 10_000)
            start = time.perf_counter()

            def callback(result, error, start=start) -> None:
                with lock:
                    latencies.append(time.perf_counter() - start)
                    if time.monotonic() < stop_at:
                        issue()
                    else:
                        active[0] -= 1
                        if active[0] == 0:
                            done.set()

            d.set(key, value, callback=callback)

        t0 = time.perf_counter()
        with lock:
            for _ in range(in_flight):
                issue()
        done.wait(load[1] + 30)
        elapsed = time.perf_counter() - t0
        latencies.sort()
        n = len(latencies)
        print(json.dumps({"in_flight": in_flight, "ops": n, "ops_per_s": round(n / elapsed, 1),
                          "p50_ms": round(latencies[n // 2] * 1e3, 3) if n else None,
                          "p99_ms": round(latencies[min(n - 1, n * 99 // 100)] * 1e3, 3) if n else None}),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
