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
    assert [r["kind"] for r in rows] == ["one shard"] * 2 + ["cross-shard"] * 2 + ["cross-shard, hot"]
    assert all(r["txns"] > 0 and 0 <= r["abort_rate"] < 1 for r in rows)
    assert "aborts" in out.stdout
