"""SIGKILL at a random moment loses no acknowledged write.

A child process writes sequential keys and prints each key's index once its
``put`` has returned (the acknowledgement); the parent kills it with SIGKILL
after a random (seeded) number of acknowledgements plus a random delay, then
reopens the directory and checks every acknowledged write. Set
``KVSTORE_KILL_ROUNDS`` for more rounds (and ``KVSTORE_KILL_SEED`` to vary
the seed).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import textwrap
import threading

import pytest

import kvstore
from conftest import PYTHON, child_env

ROUNDS = int(os.environ.get("KVSTORE_KILL_ROUNDS", "5"))
SEED = int(os.environ.get("KVSTORE_KILL_SEED", "20261123"))

WRITER = textwrap.dedent("""
    import sys, threading
    import kvstore

    path, shards, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    db = kvstore.open(path, shards=shards)
    out_lock = threading.Lock()

    def value(t, i):
        return b"value-%d-%d-" % (t, i) + bytes([i % 251]) * (i % 300)

    def writer(t):
        i = 0
        while True:
            key = b"t%d/%08d" % (t, i)
            if i % 7 == 3:
                with db.transaction() as txn:  # some acknowledgements come from transactions
                    txn.put(key, value(t, i))
            else:
                db.put(key, value(t, i))
            with out_lock:
                sys.stdout.write("%d %d\\n" % (t, i))
                sys.stdout.flush()
            i += 1

    print("ready", flush=True)
    for t in range(1, threads):
        threading.Thread(target=writer, args=(t,), daemon=True).start()
    writer(0)
""")


def value(t: int, i: int) -> bytes:
    return b"value-%d-%d-" % (t, i) + bytes([i % 251]) * (i % 300)


def kill_round(path: str, rng: random.Random, shards: int, threads: int) -> int:
    """One child run killed at a random moment; returns how many writes were acknowledged."""
    child = subprocess.Popen([PYTHON, "-c", WRITER, path, str(shards), str(threads)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env())
    acked: dict[int, int] = {}  # thread -> highest index acknowledged
    try:
        assert child.stdout.readline() == b"ready\n", child.stderr.read().decode()
        # Kill after a random number of acknowledgements, then a random extra delay
        # measured by a timer thread, so the kill lands anywhere in a write.
        target = rng.randint(1, 400)
        delay = rng.random() * 0.02
        seen = 0
        while seen < target:
            line = child.stdout.readline()
            assert line, f"the writer died: {child.stderr.read().decode()}"
            t, i = map(int, line.split())
            acked[t] = max(acked.get(t, -1), i)
            seen += 1
        timer = threading.Timer(delay, child.send_signal, args=(signal.SIGKILL,))
        timer.start()
        for line in child.stdout:  # everything acknowledged until the kill
            t, i = map(int, line.split())
            acked[t] = max(acked.get(t, -1), i)
        timer.join()
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
        child.stdout.close()
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL

    # The lock died with the process: the directory opens straight away.
    with kvstore.open(path) as db:
        for t, highest in acked.items():
            for i in range(highest + 1):
                assert db.get(b"t%d/%08d" % (t, i)) == value(t, i), (t, i, highest)
        # Nothing is there that a writer never wrote, and writes beyond the
        # acknowledged ones (in flight at the kill) are whole if present.
        for key, got in db.scan(b"t"):
            t, i = (int(x) for x in key[1:].split(b"/"))
            assert got == value(t, i)
        # Writers' keys were written in order: no gaps below what is present.
        for t in range(threads):
            present = [int(k.split(b"/")[1]) for k, _ in db.scan(b"t%d/" % t)]
            assert present == list(range(len(present)))
        assert db.verify()["records"] > 0
        db.put(b"after-kill", b"ok")
    return sum(h + 1 for h in acked.values())


@pytest.mark.parametrize("shards,threads", [(1, 1), (3, 4)], ids=["1shard-1thread",
                                                                  "3shards-4threads"])
def test_sigkill_loses_no_acknowledged_write(tmp_path, shards, threads):
    rng = random.Random(f"{SEED}-{shards}-{threads}")
    path = str(tmp_path / "kv")
    for round_ in range(ROUNDS):
        # The same directory each round: recovery after recovery.
        acked = kill_round(path, rng, shards, threads)
        assert acked > 0
    with kvstore.open(path) as db:
        assert db.get(b"after-kill") == b"ok"


def test_lock_released_after_sigkill(tmp_path):
    path = str(tmp_path / "kv")
    child = subprocess.Popen(
        [PYTHON, "-c", "import sys, kvstore; db = kvstore.open(sys.argv[1]); db.put(b'k', b'v');"
         "print('open', flush=True); sys.stdin.read()", path],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env())
    try:
        assert child.stdout.readline() == b"open\n", child.stderr.read().decode()
        with pytest.raises(kvstore.StorageError, match=str(child.pid)):
            kvstore.open(path)
        child.send_signal(signal.SIGKILL)
        child.wait()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        for pipe in (child.stdin, child.stdout, child.stderr):
            pipe.close()
    with kvstore.open(path) as db:
        assert db.get(b"k") == b"v"
