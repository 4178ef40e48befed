"""A node that lost its disk rejoins (issue 19, defect 2): real ``kvstore-server`` processes.

The node restarts with an empty directory, recovers before it votes (``kvstore.paxos.replica``,
"Wiped nodes"), catches up by log or by snapshot, and then counts in a majority: with another
node stopped, writes and reads through the two that run succeed and every acknowledged value
is there. Every wait is bounded; every process is killed at teardown.
"""

from __future__ import annotations

import os
import shutil
import signal
import time

import pytest

from kvstore.cli import format_status
from kvstore.server.local import LocalCluster
from conftest import child_env

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def cluster(tmp_path):
    made = []

    def make(shards: int, tuning: dict | None = None) -> LocalCluster:
        lc = LocalCluster(str(tmp_path / f"c{len(made)}"), 3, shards, env=child_env(), tuning=tuning)
        made.append(lc)
        return lc

    yield make
    for lc in made:
        lc.close()


def wipe_and_restart(lc: LocalCluster, name: str) -> None:
    """Stop ``name``, replace its data directory with an empty one, start it again: once
    no node is recovering (README: one node without its state at a time)."""
    for other in lc.names:
        wait_caught_up(lc, other)
    assert lc.kill(name, signal.SIGTERM) == 0
    shutil.rmtree(os.path.join(lc.directory, name))
    lc.start(name)


def wait_caught_up(lc: LocalCluster, name: str, timeout: float = 60.0) -> list:
    """Until ``kvstore status`` shows ``name`` as "ok" and applied up to each shard's leader
    in every shard; the states it went through ("recovering", "catching up", "ok")."""
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        with lc.client(timeout=2.0) as c:
            shards = c.status()["shards"]
        states = [s.get("states", {}).get(name, "ok") for s in shards]
        seen.extend(st for st in states if st and (not seen or seen[-1] != st))
        leaders_applied = [s["replicas"].get(s["leader"]) for s in shards]
        if all(st == "ok" for st in states) and all(
                a is not None and s["replicas"].get(name, -1) >= a for s, a in zip(shards, leaders_applied)):
            return seen
        assert lc.procs[name].poll() is None, lc.tail(name)
        time.sleep(0.05)
    raise AssertionError(f"{name} did not catch up in {timeout} s: {shards}\n{lc.tail(name)}")


def test_a_wiped_node_rejoins_and_counts_in_a_majority(cluster):
    lc = cluster(shards=3)
    lc.start_all()
    lc.wait_ready()
    acked = {}
    with lc.client() as c:
        for i in range(60):
            key, value = b"k%02d" % i, b"before-%d" % i
            c.put(key, value)
            acked[key] = value
    wipe_and_restart(lc, "n3")
    wait_caught_up(lc, "n3")
    assert "recovered" in open(lc.log_path("n3")).read()
    lc.kill("n1", signal.SIGKILL)
    lc.wait_ready(names=["n2", "n3"])
    for name in ("n2", "n3"):
        with lc.client(names=[name]) as c:
            for i in range(20):
                key, value = b"w%s-%02d" % (name.encode(), i), b"after-%d" % i
                c.put(key, value)
                acked[key] = value
    for name in ("n2", "n3"):
        with lc.client(names=[name]) as c:
            for key, value in acked.items():
                assert c.get(key) == value, (name, key)


def test_a_wiped_node_catches_up_a_large_state_by_snapshot(cluster):
    # A compacted log and small chunks: the wiped node needs a snapshot of ~100 chunks.
    lc = cluster(shards=1, tuning={"snapshot_every_slots": 20, "log_retain_slots": 2,
                                   "snapshot_chunk_bytes": 64 * 1024})
    lc.start_all()
    leader = lc.wait_ready()["shards"][0]["leader"]
    wiped = next(n for n in lc.names if n != leader)
    value = os.urandom(100 * 1024)
    with lc.client() as c:
        for i in range(60):  # 6 MiB of state
            c.put(b"big%02d" % i, value[i:] + value[:i])
    wipe_and_restart(lc, wiped)
    wait_caught_up(lc, wiped)
    log = open(lc.log_path(wiped)).read()
    assert "installed a snapshot" in log, log[-2000:]
    # The wiped node now holds everything; with the leader stopped it is needed in every quorum.
    lc.kill(leader, signal.SIGKILL)
    survivors = [n for n in lc.names if n != leader]
    lc.wait_ready(names=survivors)
    with lc.client(names=[wiped]) as c:
        for i in range(60):
            assert c.get(b"big%02d" % i) == value[i:] + value[:i]
        c.put(b"after", b"1")
        assert c.get(b"after") == b"1"


def test_status_table_marks_recovering_catching_up_and_lagging_nodes():
    status = {"nodes": [{"id": n, "address": "a", "state": "up", "role": "follower"} for n in ("n1", "n2", "n3")],
              "shards": [{"shard": 0, "leader": "n1", "commit_index": 5000, "applied_index": 5000,
                          "replicas": {"n1": 5000, "n2": 5000, "n3": -1},
                          "states": {"n1": "ok", "n2": "ok", "n3": "recovering"}},
                         {"shard": 1, "leader": "n2", "commit_index": 5000, "applied_index": 5000,
                          "replicas": {"n1": 1200, "n2": 5000, "n3": 10},
                          "states": {"n1": "ok", "n2": "ok", "n3": "catching up"}}]}
    text = format_status(status)
    assert "n3 recovering (applied -1)" in text
    assert "n3 catching up (applied 10)" in text
    assert "n1 lagging (3800 behind)" in text
