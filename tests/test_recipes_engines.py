"""kvstore.recipes on the real engines: the embedded store (threads) and a cluster of
kvstore-server processes (threads, and client processes, one SIGKILLed while it holds
a lock, leads, or holds a queue item). The recipes' logic alone: tests/test_recipes.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

import kvstore
from kvstore.recipes import Election, Lock, Queue
from kvstore.recipes import aio as recipes_aio
from kvstore.server.local import LocalCluster
from conftest import PYTHON, child_env

pytestmark = pytest.mark.timeout(180)

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes_child.py")
TTL = 2.0  # seconds a dead holder keeps its lock, leadership or claims
WAIT = 30.0  # a bound on any wait, never reached when all is well


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    lc = LocalCluster(str(tmp_path_factory.mktemp("recipes") / "c"), 3, 2, env=child_env())
    try:
        lc.start_all()
        lc.wait_ready(timeout=60)
        yield lc
    finally:
        lc.close()


@pytest.fixture
def cdb(cluster):
    with cluster.client(timeout=10) as db:
        yield db


@pytest.fixture
def edb(store):
    return store(shards=3)


@pytest.fixture(params=["embedded", "cluster"])
def db(request):
    return request.getfixturevalue("edb" if request.param == "embedded" else "cdb")


class Children:
    """Client processes running tests/recipes_child.py; all killed at the end."""

    def __init__(self, addresses: str) -> None:
        self.addresses = addresses
        self.procs: list = []

    def start(self, *args) -> subprocess.Popen:
        p = subprocess.Popen([PYTHON, CHILD, self.addresses, *map(str, args)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=child_env())
        self.procs.append(p)
        return p

    def line(self, p: subprocess.Popen) -> str:
        """The child's next line of output (bounded wait)."""
        result: list = []
        t = threading.Thread(target=lambda: result.append(p.stdout.readline()), daemon=True)
        t.start()
        t.join(WAIT)
        assert result and result[0], f"no line from the child; stderr: {_stderr(p)}"
        return result[0].strip()

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait(10)
            p.stdout.close()
            p.stderr.close()


def _stderr(p) -> str:
    if p.poll() is None:
        p.kill()
    p.wait(10)
    return p.stderr.read()[-2000:]


@pytest.fixture
def children(cluster):
    c = Children(_addresses(cluster))
    yield c
    c.close()


def _addresses(cluster) -> str:
    return ",".join(cluster.addresses[n] for n in cluster.names)


# ------------------------------------------------------------------ lock
def test_a_lock_contended_by_threads_excludes_and_its_tokens_increase(db):
    inside, tokens, overlaps = [0], [], []
    guard = threading.Lock()

    def worker():
        lock = Lock(db, "threads", ttl=10)
        for _ in range(8):
            with lock:
                with guard:
                    inside[0] += 1
                    if inside[0] != 1:
                        overlaps.append(lock.token)
                    tokens.append(lock.token)
                time.sleep(0.001)
                with guard:
                    inside[0] -= 1

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert not any(t.is_alive() for t in threads)
    assert overlaps == []
    assert len(tokens) == 32 and tokens == sorted(tokens) and len(set(tokens)) == 32


def test_a_lock_contended_by_processes_excludes_and_its_tokens_increase(children):
    procs = [children.start("loop", "procs", 10, 6) for _ in range(3)]
    holdings = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
        holdings += [json.loads(line) for line in out.splitlines()]
    holdings.sort(key=lambda h: h["start"])
    assert len(holdings) == 18
    for before, after in zip(holdings, holdings[1:]):
        assert before["end"] <= after["start"], "two holders at once"
        assert before["token"] < after["token"], "tokens follow the holdings"


def test_tokens_increase_and_holders_never_overlap_across_a_leader_failover(tmp_path):
    """Three processes take a lock in turns while the leader of its shard is SIGKILLed: a
    new leader never frees a lock early (it gives every lease its full ttl), and its
    revisions, the tokens, go on from the old leader's."""
    from kvstore.sharding import shard_of
    from kvstore.recipes.keys import lock_key
    lc = LocalCluster(str(tmp_path / "c"), 3, 2, env=child_env())
    children = Children(",".join(lc.addresses[n] for n in lc.names))
    try:
        lc.start_all()
        status = lc.wait_ready(timeout=60)
        shard = shard_of(lock_key("failover"), 2)
        leader = status["shards"][shard]["leader"]
        procs = [children.start("loop", "failover", 3, 15) for _ in range(3)]
        first = json.loads(children.line(procs[0]))  # the processes are taking turns
        lc.kill(leader)
        holdings = [first]
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err[-2000:]
            holdings += [json.loads(line) for line in out.splitlines()]
        holdings.sort(key=lambda h: h["start"])
        assert len(holdings) == 45
        for before, after in zip(holdings, holdings[1:]):
            assert before["end"] <= after["start"], "two holders at once"
            assert before["token"] < after["token"], "tokens follow the holdings"
    finally:
        children.close()
        lc.close()


def test_a_sigkilled_holder_frees_the_lock_after_the_ttl_and_the_next_token_is_larger(
        cdb, children):
    holder = children.start("hold", "killed", TTL)
    dead_token = int(children.line(holder))
    waiter = Lock(cdb, "killed", ttl=TTL)
    assert waiter.acquire(timeout=0.2) is False, "held by the living holder"
    killed = time.monotonic()  # before the signal: the lower bound below stays a bound
    holder.send_signal(signal.SIGKILL)
    holder.wait(10)
    assert waiter.acquire(timeout=WAIT) is True
    waited = time.monotonic() - killed
    assert waiter.token > dead_token
    # its last keep-alive was at most TTL/3 before the kill: the lease outlives it by at
    # least 2/3 TTL, and the leader expires it within a tick and a commit after the TTL
    assert 2 * TTL / 3 - 0.1 <= waited <= TTL + 3.0, waited
    waiter.release()


def test_an_embedded_lock_whose_holder_vanished_is_free_after_the_ttl(edb):
    import gc
    holder, waiter = Lock(edb, "vanished", ttl=1), Lock(edb, "vanished", ttl=1)
    holder.acquire()
    dead_token = holder.token
    holder._state.lease = None  # the holder is gone: nothing keeps its lease alive
    gc.collect()
    gone = time.monotonic()
    assert waiter.acquire(timeout=WAIT) is True
    waited = time.monotonic() - gone
    assert waiter.token > dead_token
    assert 2 / 3 - 0.1 <= waited <= 1 + 2.0, waited
    waiter.release()


def test_the_cli_runs_a_command_holding_the_lock(cluster, cdb):
    env = dict(child_env(), KVSTORE_CLUSTER=_addresses(cluster))
    script = 'echo "token=$KVSTORE_LOCK_TOKEN name=$KVSTORE_LOCK_NAME"; exit 7'
    r = subprocess.run([PYTHON, "-m", "kvstore.cli", "lock", "cli", "--ttl", "5", "--",
                        "sh", "-c", script], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 7, r.stderr
    token = int(r.stdout.split("token=")[1].split()[0])
    assert f"token {token}" in r.stderr and "name=cli" in r.stdout
    assert cdb.get("_kvstore/lock/cli") is None, "released when the command ended"
    held = Lock(cdb, "cli")
    held.acquire()
    assert held.token > token
    try:
        r = subprocess.run([PYTHON, "-m", "kvstore.cli", "lock", "cli", "--wait", "0.2", "--",
                            "true"], capture_output=True, text=True, env=env, timeout=60)
        assert r.returncode == 1 and "still held" in r.stderr
    finally:
        held.release()


def test_the_cli_lock_on_an_embedded_store_passes_the_exit_code_and_the_token(tmp_path):
    data = str(tmp_path / "db")
    runs = []
    for code in (0, 3):
        r = subprocess.run([PYTHON, "-m", "kvstore.cli", "--data", data, "lock", "job", "--",
                            sh_path(), "-c", f'echo "$KVSTORE_LOCK_TOKEN"; exit {code}'],
                           capture_output=True, text=True, env=child_env(), timeout=60)
        assert r.returncode == code, r.stderr
        runs.append(int(r.stdout))
    assert runs[0] < runs[1], "a later holding has a larger token"
    r = subprocess.run([PYTHON, "-m", "kvstore.cli", "--data", data, "lock", "job", "--",
                        str(tmp_path / "no-such-command")], capture_output=True, text=True,
                       env=child_env(), timeout=60)
    assert r.returncode == 127 and "cannot run" in r.stderr
    r = subprocess.run([PYTHON, "-m", "kvstore.cli", "--data", data, "lock", "job"],
                       capture_output=True, text=True, env=child_env(), timeout=60)
    assert r.returncode == 2 and "needs a command" in r.stderr


def sh_path() -> str:
    return "/bin/sh"


# ------------------------------------------------------------------ election
def test_an_election_hands_over_on_resign(db):
    a, b = Election(db, "office", ttl=10), Election(db, "office", ttl=10)
    seen = a.observe()
    assert next(seen) is None
    assert a.campaign("a")
    assert next(seen) == b"a"
    result: list = []
    t = threading.Thread(target=lambda: result.append(b.campaign("b", timeout=WAIT)))
    t.start()
    assert b.leader() == b"a"
    a.resign()
    t.join(WAIT)
    assert result == [True] and b.leader() == b"b"
    assert next(seen) is None and next(seen) == b"b"
    seen.close()
    b.resign()


def test_an_election_hands_over_when_the_leader_is_sigkilled(cdb, children):
    first = children.start("campaign", "killed-office", TTL, "first")
    assert children.line(first).startswith("leader")
    second = children.start("campaign", "killed-office", TTL, "second")
    watcher = Election(cdb, "killed-office")
    seen = watcher.observe()
    assert next(seen) == b"first"
    first.send_signal(signal.SIGKILL)
    assert next(seen) is None, "the office falls vacant when its lease expires"
    assert next(seen) == b"second"
    assert children.line(second).startswith("leader")
    seen.close()


# ------------------------------------------------------------------ queue
def test_a_queue_delivers_every_item_and_an_acked_one_never_again(db):
    n_items = 40
    acked, delivered, errors = set(), [], []
    guard = threading.Lock()
    done = threading.Event()

    def consume():
        with Queue(db, "work", visibility_timeout=10) as q:
            while not done.is_set():
                item = q.get(timeout=0.2)
                if item is None:
                    continue
                with guard:
                    if item.value in acked:
                        errors.append(item.value)
                    delivered.append(item.value)
                    acked.add(item.value)
                    if len(acked) == n_items:
                        done.set()
                item.ack()

    threads = [threading.Thread(target=consume) for _ in range(3)]
    for t in threads:
        t.start()
    producer = Queue(db, "work")
    for i in range(n_items):
        producer.put(b"%d" % i)
    assert done.wait(WAIT)
    for t in threads:
        t.join(WAIT)
    assert errors == []
    assert acked == {b"%d" % i for i in range(n_items)}
    assert db.scan("_kvstore/queue/work/i/") == []


def test_one_consumer_gets_the_items_in_put_order(db):
    q = Queue(db, "fifo")
    for i in range(10):
        q.put(b"%d" % i)
    got = []
    for _ in range(10):
        item = q.get(timeout=WAIT)
        got.append(item.value)
        item.ack()
    assert got == [b"%d" % i for i in range(10)]
    q.close()


def test_an_item_of_a_sigkilled_consumer_is_delivered_again_after_its_lease(cdb, children):
    Queue(cdb, "crash").put("only")
    taker = children.start("take", "crash", TTL)
    assert children.line(taker) == "only"
    survivor = Queue(cdb, "crash")
    assert survivor.get(timeout=0.2) is None, "held by the living consumer"
    taker.send_signal(signal.SIGKILL)
    item = survivor.get(timeout=WAIT)
    assert item is not None and item.value == b"only"
    assert item.ack() is True
    assert survivor.get(timeout=0.2) is None
    survivor.close()


# ------------------------------------------------------------------ asyncio
def test_the_asyncio_recipes_on_a_cluster(cluster):
    async def main():
        db = await kvstore.aio.connect(_addresses(cluster), timeout=10)
        try:
            a, b = recipes_aio.Lock(db, "aio"), recipes_aio.Lock(db, "aio")
            async with a:
                assert await b.acquire(timeout=0.2) is False
                first = a.token
            assert await b.acquire(timeout=WAIT) and b.token > first
            await b.release()

            q = recipes_aio.Queue(db, "aio")
            for i in range(3):
                await q.put(b"%d" % i)
            for i in range(3):
                item = await q.get(timeout=WAIT)
                assert item.value == b"%d" % i
                await item.ack()
            await q.close()

            e = recipes_aio.Election(db, "aio")
            seen = e.observe()
            assert await seen.__anext__() is None
            assert await e.campaign("me")
            assert await seen.__anext__() == b"me"
            assert await e.leader() == b"me"
            await e.resign()
            assert await seen.__anext__() is None
            await seen.aclose()
        finally:
            await db.close()

    asyncio.run(main())


def test_the_asyncio_recipes_on_an_embedded_store(edb):
    async def main():
        a, b = recipes_aio.Lock(edb, "aio"), recipes_aio.Lock(edb, "aio")
        async with a:
            waiting = asyncio.ensure_future(b.acquire())
            assert not await asyncio.wait_for(asyncio.shield(_done_soon(waiting)), WAIT)
            first = a.token
        assert await asyncio.wait_for(waiting, WAIT) is True and b.token > first
        await b.release()
        q = recipes_aio.Queue(edb, "aio")
        await q.put("x")
        item = await q.get(timeout=WAIT)
        assert item.value == b"x" and await item.ack() is True
        await q.close()

    asyncio.run(main())


async def _done_soon(task) -> bool:
    """Whether ``task`` finishes within a moment (it should not: it waits for a lock)."""
    done, _ = await asyncio.wait([task], timeout=0.1)
    return bool(done)
