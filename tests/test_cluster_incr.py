"""``incr`` on real ``kvstore-server`` processes: the sync and asyncio clients, a follower
forwarding it, ``kvstore incr`` from 8 processes at once, the leader killed under incrs
from several threads (exact: every increment counted once), and malformed incr frames.

Every wait is bounded; every process is killed at teardown (``LocalCluster.close``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

import kvstore
import kvstore.aio
from kvstore.commands import INCR_MAX, OP_INCR, OP_PUT
from kvstore.server.local import LocalCluster
from kvstore.sharding import shard_of
from kvstore.transport import wire
from conftest import child_env
from test_node import Raw

pytestmark = pytest.mark.timeout(120)

SHARDS = 2


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A 3-node, 2-shard cluster for the tests that kill nothing."""
    lc = LocalCluster(str(tmp_path_factory.mktemp("incr")), 3, SHARDS, env=child_env())
    try:
        lc.start_all()
        lc.wait_ready()
        yield lc
    finally:
        lc.close()


def key_of_shard(shard: int, tag: bytes) -> bytes:
    return next(k for k in (tag + b"%d" % i for i in range(1000)) if shard_of(k, SHARDS) == shard)


def test_incr_over_real_servers_sync_asyncio_and_through_a_follower(shared, tmp_path):
    with shared.client() as c:
        assert [c.incr(b"visits") for _ in range(5)] == [1, 2, 3, 4, 5]
        assert c.incr("visits", -10) == -5 and c.get(b"visits") == b"-5"
        # a refusal travels back as the embedded store's error, and changes nothing
        c.put(b"name", b"ada")
        with pytest.raises(kvstore.InvalidArgument) as cluster_error:
            c.incr(b"name")
        assert c.get(b"name") == b"ada"
        with kvstore.open(str(tmp_path / "kv")) as db:
            db.put(b"name", b"ada")
            with pytest.raises(kvstore.InvalidArgument) as embedded_error:
                db.incr(b"name")
        assert str(cluster_error.value) == str(embedded_error.value)
        c.put(b"max", b"%d" % INCR_MAX)
        with pytest.raises(kvstore.InvalidArgument, match="64-bit"):
            c.incr(b"max")
        with pytest.raises(kvstore.InvalidArgument, match="delta"):
            c.incr(b"visits", True)  # checked before anything is sent
        leader = c.status()["shards"][shard_of(b"visits", SHARDS)]["leader"]

    async def many():
        async with await kvstore.aio.connect(shared.address_list) as a:
            got = await asyncio.gather(*(a.incr(b"async-hits") for _ in range(60)))
            with pytest.raises(kvstore.InvalidArgument, match="not a decimal integer"):
                await a.incr(b"name")
            return sorted(got), await a.incr(b"async-hits", 0)

    assert asyncio.run(many()) == (list(range(1, 61)), 60)

    # a follower forwards an incr to the leader and relays its answer
    follower = next(n for n in shared.names if n != leader)
    raw = Raw(shared.addresses[follower])
    try:
        shard = shard_of(b"visits", SHARDS)
        status, value = raw.request(wire.OP_WRITE, [shard, b"raw", 1, 1, [OP_INCR, b"visits", 7]])
        assert (status, value) == (wire.STATUS_OK_FORWARDED, [2, shared.names.index(leader)])
    finally:
        raw.close()


def test_malformed_incr_frames_are_refused_and_the_node_serves_on(shared):
    key = key_of_shard(0, b"hostile")
    with shared.client() as c:
        leader = c.status()["shards"][0]["leader"]
        c.put(key, b"10")
    raw = Raw(shared.addresses[leader])
    try:
        for seq, command in enumerate([
                [OP_INCR, key], [OP_INCR, key, 1, 1], [OP_INCR, key, True], [OP_INCR, key, 0.5],
                [OP_INCR, key, 1 << 63], [OP_INCR, key, (1 << 64) - 1], [OP_INCR, key, b"1"],
                [OP_INCR, key, None], [OP_INCR, "str-key", 1], [OP_INCR, b"", 1],
                [OP_INCR, b"k" * 600, 1], [OP_INCR, key_of_shard(1, b"hostile"), 1]], 1):
            status, value = raw.request(wire.OP_WRITE, [0, b"raw", seq, seq, command])
            assert status == wire.STATUS_ERROR and value[0] == "InvalidArgument", command
        # a delta that overflows is a well-formed command: applied as a refusal, logged once
        status, value = raw.request(wire.OP_WRITE, [0, b"raw", 20, 20, [OP_INCR, key, INCR_MAX]])
        assert (status, value) == (wire.STATUS_OK, "overflow")
        assert raw.request(wire.OP_WRITE, [0, b"raw", 21, 21, [OP_PUT, key, b"v"]])[0] == wire.STATUS_OK
    finally:
        raw.close()
    assert sorted(shared.running()) == sorted(shared.names)
    with shared.client() as c:
        c.put(key, b"10")
        assert c.incr(key) == 11


def _run_cli(lc: LocalCluster, *args: str) -> subprocess.Popen:
    env = child_env()
    env.pop("KVSTORE_CLUSTER", None)
    return subprocess.Popen([sys.executable, "-m", "kvstore.cli", *args,
                             "--cluster", ",".join(lc.address_list), "--timeout", "20"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            cwd=lc.directory)


def test_kvstore_incr_from_8_processes_at_once_gives_an_exact_count(shared):
    processes, rounds = 8, 3
    answers = []
    for _ in range(rounds):
        procs = [_run_cli(shared, "incr", "cli-counter") for _ in range(processes)]
        for p in procs:
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0, err.decode(errors="replace")
            answers.append(int(out))
    total = processes * rounds
    assert sorted(answers) == list(range(1, total + 1))  # every process its own answer
    get = _run_cli(shared, "get", "cli-counter")
    assert get.communicate(timeout=60)[0] == b"%d\n" % total


def test_incrs_from_threads_through_a_leader_kill_are_exact(tmp_path):
    """Each thread increments its own key and a shared one, one at a time, while the
    leader is SIGKILLed. A call that raised ``Unavailable`` may or may not have applied;
    everything else is exact: each thread's acknowledged answers are increasing, a gap
    between two of them is no larger than the unknown calls between them (a retried
    incr applied twice would make one), and every final count is the acknowledged
    increments plus at most the unknown ones."""
    lc = LocalCluster(str(tmp_path / "c"), 3, 1, env=child_env())
    try:
        lc.start_all()
        old_leader = lc.wait_ready()["shards"][0]["leader"]
        threads = 4
        history = {w: [] for w in range(threads)}  # per thread: ("own"|"shared", value|None)
        stop, killed = threading.Event(), threading.Event()
        acked_after_kill = [0]
        failures: list = []

        def worker(w: int) -> None:
            try:
                with lc.client(timeout=10) as c:
                    while not stop.is_set():
                        for which, key in (("own", b"own-%d" % w), ("shared", b"shared")):
                            try:
                                value = c.incr(key)
                            except kvstore.Unavailable:  # outcome unknown
                                value = None
                            history[w].append((which, value))
                            if value is not None and killed.is_set():
                                acked_after_kill[0] += 1
            except BaseException as e:  # any other error fails the test, named
                failures.append(e)

        pool = [threading.Thread(target=worker, args=(w,)) for w in range(threads)]
        for t in pool:
            t.start()
        try:
            deadline = time.monotonic() + 30
            while sum(len(h) for h in history.values()) < 200 and time.monotonic() < deadline:
                time.sleep(0.01)  # polling other threads' progress: no event to await
            assert sum(len(h) for h in history.values()) >= 200, "incrs did not flow"
            lc.kill(old_leader, signal.SIGKILL)
            killed.set()
            deadline = time.monotonic() + 40
            while acked_after_kill[0] < 200 and time.monotonic() < deadline and not failures:
                time.sleep(0.01)
            assert acked_after_kill[0] >= 200, "incrs did not resume after the kill"
        finally:
            stop.set()
            for t in pool:
                t.join(30)
        assert not failures, failures
        survivors = [n for n in lc.names if n != old_leader]
        lc.wait_ready(names=survivors)
        with lc.client(names=survivors) as c:
            shared_acked, shared_unknown, shared_values = 0, 0, []
            for w, calls in history.items():
                last, unknown_since = 0, 0
                for which, value in calls:
                    if which == "shared":
                        shared_acked += value is not None
                        shared_unknown += value is None
                        if value is not None:
                            shared_values.append(value)
                    elif value is None:
                        unknown_since += 1
                    else:
                        assert last < value <= last + 1 + unknown_since, (w, last, value)
                        last, unknown_since = value, 0
                final = int(c.get(b"own-%d" % w))
                assert last <= final <= last + unknown_since, (w, last, final)
            assert len(set(shared_values)) == len(shared_values)  # no answer given twice
            final = int(c.get(b"shared"))
            assert shared_acked <= final <= shared_acked + shared_unknown
            assert max(shared_values) <= final
    finally:
        lc.close()
