"""The bank on real processes: cross-shard transfers and audits through kill, pause, restart.

Three ``kvstore-server`` processes, three shards. Clients move money between
accounts spread over the shards (most transfers cross shards: two-phase commit
coordinated by the client, decided in the lowest shard's log) while an auditor
reads every account in read-only transactions. Meanwhile the leader of shard 0
(the coordinator shard of most transactions) is SIGKILLed mid-commit and
restarted, and a participant shard's leader is paused (SIGSTOP) and resumed;
at the end the whole cluster is SIGKILLed and restarted.

Checks: every audit that committed saw the conserved total (isolation, read-only
transactions included); after the restart every acknowledged transfer is there,
none is half-applied, and the balances are exactly what the transfers present
say (atomicity and durability: each transfer writes a record of itself in the
same transaction).
"""

from __future__ import annotations

import random
import signal
import threading
import time

import msgpack
import pytest

import kvstore
from kvstore.sharding import shard_of
from test_cluster import cluster, leader_of  # noqa: F401  (fixture)

pytestmark = pytest.mark.timeout(240)

ACCOUNTS = [b"acct%02d" % i for i in range(9)]
INITIAL = 100


def wait_for(predicate, timeout: float, what: str, progress=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout} s ({progress()})")
        time.sleep(0.02)  # counting the workers' progress: polled, not awaited


def test_bank_transfers_across_shards_survive_kill_pause_and_full_restart(cluster, tmp_path):
    lc = cluster(shards=3, directory=tmp_path / "bank")
    lc.start_all()
    lc.wait_ready()
    assert len({shard_of(a, 3) for a in ACCOUNTS}) == 3
    with lc.client(timeout=10) as c:
        for a in ACCOUNTS:
            c.put(a, b"%d" % INITIAL)

    acked: list = []  # (record key, from, to, amount) of every transfer acknowledged
    unknown: list = []  # record keys of transfers whose outcome is unknown (Unavailable)
    audits: list = []  # totals seen by committed audits
    stop = threading.Event()
    failures: list = []

    def transfers(w: int) -> None:
        rnd = random.Random(w)
        with lc.client(timeout=10) as c:
            i = 0
            while not stop.is_set():
                a, b = rnd.sample(ACCOUNTS, 2)
                amount = rnd.randint(1, 5)
                record = b"xfer/%d/%d" % (w, i)
                i += 1

                def move(t):
                    t.put(a, b"%d" % (int(t.get(a)) - amount))
                    t.put(b, b"%d" % (int(t.get(b)) + amount))
                    t.put(record, msgpack.packb([a, b, amount]))

                try:
                    c.run_transaction(move, retries=50)
                except kvstore.TransactionConflict:
                    continue  # nothing applied
                except kvstore.Unavailable:
                    unknown.append(record)
                    continue
                except BaseException as e:  # pragma: no cover - reported below
                    failures.append(repr(e))
                    return
                acked.append((record, a, b, amount))

    def auditor() -> None:
        with lc.client(timeout=10) as c:
            while not stop.is_set():
                try:
                    audits.append(c.run_transaction(
                        lambda t: sum(int(t.get(a)) for a in ACCOUNTS), retries=50))
                except (kvstore.TransactionConflict, kvstore.Unavailable):
                    continue
                except BaseException as e:  # pragma: no cover - reported below
                    failures.append(repr(e))
                    return

    def progress() -> str:
        return (f"{len(acked)} transfers acknowledged, {len(unknown)} unknown, "
                f"{len(audits)} audits")

    threads = [threading.Thread(target=transfers, args=(w,)) for w in range(3)]
    threads.append(threading.Thread(target=auditor))
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(acked) >= 50, 30, "transfers did not flow", progress)
        # SIGKILL the coordinator shard's leader mid-commit, then bring it back
        st = lc.wait_ready()
        victim = leader_of(st, 0)
        lc.kill(victim, signal.SIGKILL)
        n = len(acked)
        wait_for(lambda: len(acked) >= n + 60, 60, "transfers did not resume after the kill", progress)
        lc.start(victim)
        # pause a participant shard's leader, let its lease of the keys run out, resume it
        st = lc.wait_ready()
        paused = leader_of(st, 2)
        lc.kill(paused, signal.SIGSTOP, wait=0)
        n = len(acked)
        try:
            wait_for(lambda: len(acked) >= n + 40, 60, "transfers did not go on around the pause",
                     progress)
        finally:
            lc.kill(paused, signal.SIGCONT, wait=0)
        n, m = len(acked), len(audits)
        wait_for(lambda: len(acked) >= n + 40 and len(audits) >= m + 5, 60,
                 "transfers and audits did not go on after the pause", progress)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    print(progress())
    assert not failures, failures
    assert audits and set(audits) == {INITIAL * len(ACCOUNTS)}, \
        f"an audit saw money created or lost: {sorted(set(audits))}"

    for name in lc.names:
        lc.kill(name, signal.SIGKILL)
    lc.close()
    lc2 = cluster(shards=3, directory=tmp_path / "bank")
    lc2.start_all()
    lc2.wait_ready()
    with lc2.client(timeout=10) as c:
        balances = {a: int(c.get(a)) for a in ACCOUNTS}
        present = {k: msgpack.unpackb(v) for k, v in c.scan(b"xfer/")}
    assert sum(balances.values()) == INITIAL * len(ACCOUNTS)
    lost = [r for r, *_ in acked if r not in present]
    assert not lost, f"{len(lost)} acknowledged transfers lost, e.g. {lost[:3]}"
    known = {r for r, *_ in acked} | set(unknown)
    assert set(present) <= known, "a transfer nobody attempted is recorded"
    expected = {a: INITIAL for a in ACCOUNTS}
    for a, b, amount in present.values():
        expected[a] -= amount
        expected[b] += amount
    assert balances == expected, "a transfer is half-applied"
