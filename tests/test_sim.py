"""The deterministic simulator: the clean build passes many seeds; planted bugs are found.

``KVSTORE_SIM_SEEDS`` sets how many seeds per cluster size (default sized for well
under two minutes with the pure-Python kernels on a small machine).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kvstore.paxos.replica import Bugs
from kvstore.sim.cluster import SimConfig, run_seed

SEEDS = int(os.environ.get("KVSTORE_SIM_SEEDS", "800"))
BUG_SEED_BUDGET = 200


@pytest.mark.parametrize("nodes", [3, 5])
def test_clean_build_passes_many_seeds(nodes):
    for seed in range(SEEDS):
        ok, text = run_seed(SimConfig(seed=seed, nodes=nodes))
        assert ok, text


def test_single_node_cluster_passes():
    for seed in range(20):
        ok, text = run_seed(SimConfig(seed=seed, nodes=1))
        assert ok, text


def _first_failing_seed(bugs: Bugs, nodes: int):
    for seed in range(BUG_SEED_BUDGET):
        ok, text = run_seed(SimConfig(seed=seed, nodes=nodes, bugs=bugs))
        if not ok:
            return seed, text
    return None, ""


@pytest.mark.parametrize("bug,nodes,finding", [
    ("announce_before_persist", 3, "committed slot"),  # lost acceptance: the durable state is broken
    ("repropose_lowest", 3, "agreement"),
    ("apply_out_of_order", 3, "order"),
    ("read_without_quorum", 3, "linearizability"),
])
def test_planted_bug_is_found(bug, nodes, finding):
    seed, text = _first_failing_seed(Bugs(**{bug: True}), nodes)
    assert seed is not None, f"{bug} not found in {BUG_SEED_BUDGET} seeds"
    assert finding in text
    assert f"reproduce: python -m kvstore.sim --seed {seed}" in text
    assert "last " in text and " events:" in text


def test_a_seed_replays_byte_for_byte_whatever_the_hash_seed():
    outputs = []
    for hashseed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hashseed)
        out = subprocess.run([sys.executable, "-m", "kvstore.sim", "--seed", "7", "--nodes", "5", "--verbose"],
                             capture_output=True, env=env, timeout=120, check=True).stdout
        outputs.append(out)
    assert outputs[0] == outputs[1]
    assert len(outputs[0].splitlines()) > 100


def test_failing_seed_replays_identically():
    bugs = Bugs(read_without_quorum=True)
    seed, text = _first_failing_seed(bugs, 3)
    again = run_seed(SimConfig(seed=seed, nodes=3, bugs=bugs))
    assert again == (False, text)


def test_cli_reports_failure_exit_code():
    p = subprocess.run([sys.executable, "-m", "kvstore.sim", "--seeds", "50", "--bug", "apply_out_of_order"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1
    assert "FAILED seed" in p.stdout
