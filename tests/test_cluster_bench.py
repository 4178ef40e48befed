"""bench/cluster.py runs end to end at smoke size and writes its figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


@pytest.mark.timeout(180)
def test_cluster_benchmark_smoke_run_writes_its_figures(tmp_path):
    out = tmp_path / "cluster.json"
    r = subprocess.run([sys.executable, os.path.join(BENCH, "cluster.py"), "--quick",
                        "--in-flight", "1,16", "--no-pysyncobj", "--json", str(out)],
                       capture_output=True, text=True, timeout=170)
    assert r.returncode == 0, r.stderr
    figures = json.loads(out.read_text())
    assert [(row["op"], row["in_flight"]) for row in figures["rows"]] == [
        ("put", 1), ("put", 16), ("get", 1), ("get", 16)]
    assert all(row["ops_per_s"] > 0 and row["p99_ms"] >= row["p50_ms"] for row in figures["rows"])
    assert figures["floor_ms"]["fdatasync"] > 0 and "the floor" in r.stdout
