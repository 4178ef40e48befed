"""Cluster backups in the real-node simulator (``kvstore.sim.realbackup``): the fence,
the read point and the stream under crashes, restarts, wiped disks, partitions and
pauses, while the bank's transfers cross shards. Every backup kept must hold the
bank's total; a backup that skips the drain of prepared transactions is caught."""

from __future__ import annotations

import re

from kvstore.sim.realnode import RealNodeConfig, run


def test_backups_taken_under_faults_hold_the_bank_total():
    kept = 0
    for seed in range(4):
        result = run(RealNodeConfig(seed=seed, nodes=3, bank=True, backups=1))
        assert result.ok, result.text
        kept += int(re.search(r"(\d+) backups kept", result.text).group(1))
    assert kept > 0


def test_a_backup_that_skips_the_drain_is_caught(monkeypatch):
    from kvstore.node import backups
    monkeypatch.setattr(backups, "prepared_any", lambda view, tables: False)
    for seed in range(30):
        result = run(RealNodeConfig(seed=seed, nodes=3, bank=True, backups=1))
        if not result.ok:
            assert "backup: the cut holds" in result.text.splitlines()[0], result.text[:500]
            assert f"python -m kvstore.sim --bank --backups 1 --seed {seed}" in result.text
            return
    raise AssertionError("a cut through prepared transactions was not caught in 30 seeds")
