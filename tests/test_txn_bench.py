"""``bench/txn.py`` runs end to end (smoke size) and writes the figures the README quotes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")

pytestmark = pytest.mark.timeout(300)


def test_txn_bench_compares_one_shard_with_two_phase_commit(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(BENCH, "txn.py"), "--quick",
                          "--dir", str(tmp_path / "data"), "--json", str(tmp_path / "txn.json")],
                         capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stderr
    rows = json.loads((tmp_path / "txn.json").read_text())["rows"]
    kinds = [r["kind"] for r in rows]
    cases = ["one shard", "cross-shard, 2 rounds", "cross-shard, 1 round"]
    # each load (a lone transfer, then each in-flight count) runs the three cases in turn,
    # then the hot accounts in two rounds and in one
    assert len(kinds) % 3 == 2 and kinds[:-2] == cases * (len(kinds) // 3)
    assert kinds[-2:] == ["cross-shard, hot, 2 rounds", "cross-shard, hot, 1 round"]
    assert {r["in_flight"] for r in rows if r["kind"] == "one shard"} >= {"lone"}
    assert all(r["txns"] > 0 and 0 <= r["abort_rate"] < 1 for r in rows)
    assert "aborts" in out.stdout
