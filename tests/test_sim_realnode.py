"""The simulator of real nodes (kvstore/sim/realnode.py, ``python -m kvstore.sim --real-node``):
clean seeds pass, each bug planted in the node or its storage is caught by the default seeds,
and a failing seed replays exactly from the command it prints."""

from __future__ import annotations

import re

import pytest

from kvstore.node.ports import NodeBugs
from kvstore.sim import realnode
from kvstore.sim.realnode import RealNodeConfig, run

#: Seeds a planted bug must be caught within (the sweep stops at the first failure).
BUG_SEEDS = 12


@pytest.mark.parametrize("nodes, seeds", [(1, range(3)), (3, range(4)), (5, range(2))])
def test_clean_seeds_pass(nodes, seeds):
    for seed in seeds:
        result = run(RealNodeConfig(seed=seed, nodes=nodes))
        assert result.ok, result.text


@pytest.mark.parametrize("bug, nodes", [
    ("answer_before_fsync", 1),  # with one node its own fsync is the only copy
    ("commit_point_before_records", 3),
    ("skip_promise_fsync", 3),
    ("replay_past_checkpoint", 3),
])
def test_each_planted_bug_is_caught_by_the_default_seeds(bug, nodes):
    bugs = NodeBugs(**{bug: True})
    for seed in range(BUG_SEEDS):
        result = run(RealNodeConfig(seed=seed, nodes=nodes, bugs=bugs))
        if not result.ok:
            assert f"--node-bug {bug}" in result.text
            return
    pytest.fail(f"{bug} was not caught in {BUG_SEEDS} seeds on {nodes} node(s)")


def test_a_failing_seed_replays_exactly_from_the_command_it_prints():
    bugs = NodeBugs(skip_promise_fsync=True)
    seed = next(s for s in range(BUG_SEEDS) if not run(RealNodeConfig(seed=s, bugs=bugs)).ok)
    first = run(RealNodeConfig(seed=seed, bugs=bugs))
    assert not first.ok
    command = re.search(r"reproduce: (.*)", first.text).group(1)
    assert command == (f"python -m kvstore.sim --real-node --seed {seed} --nodes 3 --ticks 500 "
                       f"--node-bug skip_promise_fsync --verbose")
    again = run(RealNodeConfig(seed=seed, bugs=bugs))
    strip = lambda text: re.sub(r"/\S*/kvstore-sim-\w+", "DIR", text)  # noqa: E731
    assert strip(again.text) == strip(first.text)


def test_the_node_runs_on_the_simulated_ports_only():
    """No thread and no socket: the simulator's nodes use its transport and clock."""
    import threading
    before = threading.active_count()
    config = RealNodeConfig(seed=1, nodes=3, ticks=60)
    assert run(config).ok
    assert threading.active_count() == before
    assert realnode.TICK == 1 / 64  # exact sums: no drift between nodes' tick schedules
