"""A process using kvstore.recipes on a cluster, for tests/test_recipes_engines.py.

    python recipes_child.py ADDRESSES hold NAME TTL          take the lock, print its token, wait
    python recipes_child.py ADDRESSES loop NAME TTL N        take the lock N times; print a JSON
                                                             line per holding (token, start, end)
    python recipes_child.py ADDRESSES campaign NAME TTL VALUE  lead, print "leader", wait
    python recipes_child.py ADDRESSES take NAME TTL          take one queue item, print it, wait

Every wait is bounded (60 s): a test that forgets a child does not leave it for ever.
"""

from __future__ import annotations

import json
import sys
import time

import kvstore
from kvstore.recipes import Election, Lock, Queue

BOUND_SECONDS = 60


def main(addresses: str, mode: str, name: str, ttl: str, *rest: str) -> int:
    db = kvstore.connect(addresses, timeout=10)
    ttl_seconds = float(ttl)
    if mode == "hold":
        lock = Lock(db, name, ttl=ttl_seconds)
        lock.acquire(timeout=BOUND_SECONDS)
        print(lock.token, flush=True)
        time.sleep(BOUND_SECONDS)
    elif mode == "loop":
        lock = Lock(db, name, ttl=ttl_seconds)
        for _ in range(int(rest[0])):
            assert lock.acquire(timeout=BOUND_SECONDS)
            start = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process
            time.sleep(0.005)
            end = time.monotonic()
            token = lock.token
            lock.release()
            print(json.dumps({"token": token, "start": start, "end": end}), flush=True)
    elif mode == "campaign":
        office = Election(db, name, ttl=ttl_seconds)
        office.campaign(rest[0], timeout=BOUND_SECONDS)
        print("leader", office.token, flush=True)
        time.sleep(BOUND_SECONDS)
    elif mode == "take":
        queue = Queue(db, name, visibility_timeout=ttl_seconds)
        item = queue.get(timeout=BOUND_SECONDS)
        print(item.value.decode(), flush=True)
        time.sleep(BOUND_SECONDS)
    else:
        print(f"unknown mode {mode}", file=sys.stderr)
        return 2
    db.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
