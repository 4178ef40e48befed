"""Concurrent clients against three real servers while the leader is SIGKILLed, restarted,
and then SIGSTOPped and resumed: the history they saw must be linearizable (the
project's Wing-Gong/Lowe checker), and no acknowledged write may be lost."""

from __future__ import annotations

import random
import signal
import threading
import time

import pytest

import kvstore
from kvstore.server.local import LocalCluster
from kvstore.sim.linearizability import Operation, check_history
from conftest import child_env

pytestmark = pytest.mark.timeout(180)

KEYS = (b"a", b"b", b"c")


def test_history_under_kill_restart_and_pause_of_leaders_is_linearizable(tmp_path):
    lc = LocalCluster(str(tmp_path / "c"), 3, 1, env=child_env())
    history: list = []
    lock = threading.Lock()
    stop = threading.Event()
    ids = iter(range(1_000_000))

    def client_thread(seed: int) -> None:
        rng = random.Random(seed)
        with lc.client(timeout=3) as c:
            cid = next(ids)
            n = 0
            while not stop.is_set():
                key = KEYS[rng.randrange(3)]
                kind = ("get", "get", "put", "cas", "delete")[rng.randrange(5)]
                n += 1
                value = b"%d-%d" % (seed, n)
                args = {"get": (), "put": (value,), "delete": (),
                        "cas": (rng.choice([None, b"%d-%d" % (seed, n - 1)]), value)}[kind]
                call = time.monotonic_ns()
                try:
                    if kind == "get":
                        result = c.get(key)
                    elif kind == "put":
                        result = c.put(key, value)
                    elif kind == "delete":
                        result = c.delete(key)
                    else:
                        result = c.cas(key, *args)
                    ret = time.monotonic_ns()
                except kvstore.Unavailable:
                    result, ret = None, None  # unknown outcome: open forever
                with lock:
                    history.append(Operation(cid, key, kind, args, call, ret, result))
                if ret is None:
                    cid = next(ids)  # a client has one op in flight: continue as another

    try:
        lc.start_all()
        st = lc.wait_ready()
        threads = [threading.Thread(target=client_thread, args=(s,)) for s in range(6)]
        for t in threads:
            t.start()
        time.sleep(1.0)  # load before the first fault (the load itself is what is timed)
        first = st["shards"][0]["leader"]
        lc.kill(first, signal.SIGKILL)
        time.sleep(1.5)
        lc.start(first)
        second = lc.wait_ready(names=lc.names)["shards"][0]["leader"]
        lc.kill(second, signal.SIGSTOP)
        time.sleep(2.0)  # longer than an election: the paused leader is deposed meanwhile
        lc.kill(second, signal.SIGCONT)
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        try:
            # Durability: final reads, after everything, join the history: each must be
            # explained by the acknowledged (and maybe the unknown-outcome) writes before it.
            with lc.client(timeout=10) as c:
                for key in KEYS:
                    call = time.monotonic_ns()
                    value = c.get(key)
                    history.append(Operation(next(ids), key, "get", (), call,
                                             time.monotonic_ns(), value))
            done = [op for op in history if op.ret is not None]
            assert len(done) > 100, f"only {len(done)} operations completed"
            res = check_history(history)
            assert res.ok, f"not linearizable on key {res.key!r}:\n{res.explanation}"
        finally:
            lc.close()
