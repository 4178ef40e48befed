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
same transaction). Half the clients commit in one round (parallel commits), the
others in two, so both meet on the same keys and in the same resolvers.
"""

from __future__ import annotations

import itertools
import signal

import pytest

from kvstore.sharding import shard_of
from test_cluster import cluster, leader_of  # noqa: F401  (fixture)
from workloads import ACCOUNTS, BankWorkload, wait_for

pytestmark = pytest.mark.timeout(240)


def test_bank_transfers_across_shards_survive_kill_pause_and_full_restart(cluster, tmp_path):
    lc = cluster(shards=3, directory=tmp_path / "bank")
    lc.start_all()
    lc.wait_ready()
    assert len({shard_of(a, 3) for a in ACCOUNTS}) == 3
    made = itertools.count()

    def connect(timeout: float):
        c = lc.client(timeout=timeout)
        c.one_round_commit = next(made) % 2 == 0
        return c

    bank = BankWorkload(connect, transfer_threads=3, auditors=1)
    with lc.client(timeout=10) as c:
        bank.setup(c)
    acked, audits, progress = bank.acked, bank.audits, bank.progress
    bank.start()
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
        bank.stop()
    print(progress())
    assert not bank.problems(), bank.problems()

    for name in lc.names:
        lc.kill(name, signal.SIGKILL)
    lc.close()
    lc2 = cluster(shards=3, directory=tmp_path / "bank")
    lc2.start_all()
    lc2.wait_ready()
    with lc2.client(timeout=10) as c:
        problems = bank.final_problems(c)
    assert not problems, problems
