"""The bank on real Paxos groups (kvstore/sim/bank_paxos.py): clean seeds pass, planted 2PC bugs are found.

``KVSTORE_SIM_BANK_SEEDS`` sets how many clean seeds on 3 shards (a third of that on 2); the
default keeps the file well under a minute with the pure-Python kernels on a small machine.
The long sweeps are ``python -m kvstore.sim --bank --paxos`` (README).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import fields

import pytest
from conftest import seed_chunks, seeds_id

from kvstore.paxos.replica import Bugs
from kvstore.sim.bank_paxos import BankPaxosConfig, run_bank_paxos_seed
from kvstore.txn import TxnBugs

SEEDS = int(os.environ.get("KVSTORE_SIM_BANK_SEEDS", "100"))
SEEDS_PER_TEST = 25  # ~0.3 s a seed: each part well inside its timeout
BUG_SEED_BUDGET = 40  # each planted bug is found well within this (within 5 seeds today)


@pytest.mark.parametrize("shards,seeds", [
    (shards, seeds) for shards in (2, 3)
    for seeds in seed_chunks(SEEDS if shards == 3 else SEEDS // 3, SEEDS_PER_TEST)], ids=seeds_id)
def test_clean_build_passes_many_seeds(shards, seeds):
    for seed in seeds:
        ok, text = run_bank_paxos_seed(BankPaxosConfig(seed=seed, shards=shards))
        assert ok, text


def test_five_replicas_per_shard():
    for seed in range(SEEDS // 6):
        ok, text = run_bank_paxos_seed(BankPaxosConfig(seed=seed, shards=2, nodes=5))
        assert ok, text


def _first_failing_seed(bugs: TxnBugs):
    for seed in range(BUG_SEED_BUDGET):
        ok, text = run_bank_paxos_seed(BankPaxosConfig(seed=seed, bugs=bugs))
        if not ok:
            return seed, text
    return None, ""


# What each planted bug is caught as: all by checks made while the groups apply their logs.
FINDINGS = {
    # a participant carries out a decision that its coordinator shard has not applied (yet)
    "decision_not_replicated": ("decision:", "atomicity:"),
    "apply_before_decision": ("before any decision",),
    "prepare_skips_read_validation": ("isolation", "atomicity: the accounts hold"),
    "locks_released_at_vote": ("isolation",),
}


def test_every_planted_bug_has_a_test():
    assert set(FINDINGS) == {f.name for f in fields(TxnBugs)}


@pytest.mark.parametrize("bug", sorted(FINDINGS))
def test_planted_bug_is_found(bug):
    seed, text = _first_failing_seed(TxnBugs(**{bug: True}))
    assert seed is not None, f"{bug} not found in {BUG_SEED_BUDGET} seeds"
    assert any(finding in text.splitlines()[0] for finding in FINDINGS[bug]), text.splitlines()[0]
    assert f"reproduce: python -m kvstore.sim --bank --paxos --seed {seed} --shards 3 --nodes 3 --txn-bug {bug}" in text
    assert "last " in text and " events:" in text


def test_failing_seed_replays_identically():
    bugs = TxnBugs(prepare_skips_read_validation=True)
    seed, text = _first_failing_seed(bugs)
    assert run_bank_paxos_seed(BankPaxosConfig(seed=seed, bugs=bugs)) == (False, text)


def test_cli_runs_the_bank_on_paxos_groups():
    ok = subprocess.run([sys.executable, "-m", "kvstore.sim", "--bank", "--paxos", "--shards", "2", "--seeds", "3"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "3 bank-paxos seeds, 0 failed" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "kvstore.sim", "--bank", "--paxos", "--seeds", "20",
                          "--txn-bug", "apply_before_decision"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    assert "FAILED bank-paxos seed" in bad.stdout


# Each group's Paxos oracle watches too: planted consensus bugs are caught under the bank's load
# (the read-path ones are not: the bank reads through the log, not by read index or lease).
PAXOS_FINDINGS = {
    "election_quorum_short": ("chosen value lost", "agreement", "leaders"),
    "apply_out_of_order": ("order",),
    "snapshot_backwards": ("monotonic", "state"),
}


@pytest.mark.parametrize("bug", sorted(PAXOS_FINDINGS))
def test_planted_paxos_bug_is_found_in_a_shard(bug):
    for seed in range(BUG_SEED_BUDGET):
        ok, text = run_bank_paxos_seed(BankPaxosConfig(seed=seed, paxos_bugs=Bugs(**{bug: True})))
        if not ok:
            first = text.splitlines()[0]
            assert any(f"seed {seed}: s{s}: {finding}" in first for s in range(3) for finding in PAXOS_FINDINGS[bug]), first
            assert f"--bug {bug} --verbose" in text
            return
    pytest.fail(f"{bug} not found in {BUG_SEED_BUDGET} seeds")


def test_a_seed_replays_byte_for_byte_whatever_the_hash_seed():
    outputs = []
    for hashseed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hashseed)
        outputs.append(subprocess.run([sys.executable, "-m", "kvstore.sim", "--bank", "--paxos", "--seed", "4",
                                       "--verbose"], capture_output=True, env=env, timeout=120, check=True).stdout)
    assert outputs[0] == outputs[1]
    assert len(outputs[0].splitlines()) > 100


# kvstore.client.txn's read-only locking transaction trusts its values once every shard voted yes;
# but a shard whose lock passed its deadline may have been released by its resolver (ABORT
# recorded in the coordinator shard) before the slowest shard's yes came, so the values are no
# single cut. The simulator's processes record COMMIT in the coordinator shard first (then no
# resolver's ABORT can have preceded it); with ``locking_audit_trusts_votes`` they do as the
# client once did, and a sweep catches it. It is rare: seeds 628 (2 shards) and 1208 (3 shards)
# caught it until decisions moved into the nodes (issue 18) changed the draws, and no seed in
# 0..3,799 (2 shards) nor 0..2,699 (3 shards) catches it since; so this is an opt-in sweep
# (``KVSTORE_SWEEP_SEEDS=20000``), deselected by default, until a seed is found again with
# ``python -m kvstore.sim --bank --paxos --locking-audit-trusts-votes --shards 3 --seeds 20000``.
SWEEP_SEEDS = int(os.environ.get("KVSTORE_SWEEP_SEEDS", "0"))


@pytest.mark.sweep
@pytest.mark.parametrize("shards", [2, 3])
def test_locking_audit_that_trusts_its_votes_is_not_serializable(shards):
    for seed in range(SWEEP_SEEDS):
        ok, text = run_bank_paxos_seed(BankPaxosConfig(seed=seed, shards=shards,
                                                       locking_audit_trusts_votes=True))
        if ok:
            continue
        assert "isolation: " in text.splitlines()[0], text.splitlines()[0]
        assert "--locking-audit-trusts-votes" in text
        ok, text = run_bank_paxos_seed(BankPaxosConfig(seed=seed, shards=shards))
        assert ok, text
        return
    pytest.fail(f"no seed of {SWEEP_SEEDS} caught the audit that trusts its votes")
