"""The linearizability checker against real Jepsen histories of etcd with known verdicts.

The histories are porcupine's test data (MIT), read from ``../shared/porcupine_data``
beside the checkout (CI lays a copy of shared/ there); the expected verdicts are
porcupine's own tests (``TestEtcdJepsenNNN``). etcd_095.log is empty and has none.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kvstore.sim.jepsen import parse_etcd_log
from kvstore.sim.linearizability import check_history

DATA = Path(os.environ.get("KVSTORE_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "porcupine_data" / "jepsen"
LINEARIZABLE = {2, 5, 7, 18, 25, 31, 38, 45, 48, 49, 51, 53, 56, 67, 75, 76, 80, 87, 92, 98, 100, 101, 102}
NUMBERS = [n for n in range(103) if n != 95]


def test_the_histories_are_there():
    assert DATA.is_dir(), f"porcupine's histories not found at {DATA} (set KVSTORE_SHARED to shared/)"
    assert len(list(DATA.glob("etcd_*.log"))) == 103


@pytest.mark.parametrize("number", NUMBERS)
def test_verdict_matches_porcupine(number):
    ops = parse_etcd_log(DATA / f"etcd_{number:03d}.log")
    assert len(ops) > 50
    result = check_history(ops)
    assert result.ok == (number in LINEARIZABLE), result.explanation


def test_unknown_outcomes_stay_open():
    ops = parse_etcd_log(DATA / "etcd_000.log")
    assert any(op.ret is None and op.kind == "put" for op in ops)  # :info :write :timed-out
    assert any(op.kind == "cas" and op.result is False for op in ops)  # :fail :cas is definite
