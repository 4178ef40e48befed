"""The lease checks in the simulation of real nodes (``kvstore/sim/realleases.py``,
``python -m kvstore.sim --leases``): clean seeds pass with the lease expiring in each, and
a node that expires leases early (or never) is caught."""

from __future__ import annotations

import pytest

from kvstore.node import leases as node_leases
from kvstore.sim import realleases
from kvstore.sim.realnode import RealNodeConfig, run

SEEDS = range(12)


def test_lease_seeds_pass_and_every_lease_expires(monkeypatch):
    ended = []
    check_end = realleases.LeaseCheck.check_end

    def counting(self, settled_tick, tick):
        check_end(self, settled_tick, tick)
        ended.append(len(self.ended_at) > 0)

    monkeypatch.setattr(realleases.LeaseCheck, "check_end", counting)
    for seed in SEEDS:
        result = run(RealNodeConfig(seed=seed, nodes=3, leases=True))
        assert result.ok, result.text
    assert sum(ended) >= len(SEEDS) // 2  # the checks saw leases expire, not nothing


@pytest.mark.parametrize("bug", ["early", "never"])
def test_a_node_that_expires_early_or_never_is_caught(monkeypatch, bug):
    set_deadline = node_leases.LeaseExpiry._set_deadline

    def planted(self, shard, lease_id, deadline, revision):
        now = self.clock.monotonic()
        deadline = now + (deadline - now) / 2 if bug == "early" else deadline + 3600
        set_deadline(self, shard, lease_id, deadline, revision)

    monkeypatch.setattr(node_leases.LeaseExpiry, "_set_deadline", planted)
    for seed in SEEDS:
        result = run(RealNodeConfig(seed=seed, nodes=3, leases=True))
        if not result.ok:
            assert ("expired early" if bug == "early" else "never expired") in result.text, \
                result.text
            assert "--leases" in result.text
            return
    pytest.fail(f"a node expiring leases {bug} was not caught in {len(SEEDS)} seeds")
