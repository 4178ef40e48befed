"""bench/recipes.py runs end to end (smoke size) and writes its figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


def test_the_recipes_bench_writes_its_figures(tmp_path):
    out = tmp_path / "recipes.json"
    r = subprocess.run([sys.executable, os.path.join(BENCH, "recipes.py"), "--quick",
                        "--json", str(out)], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())["results"]["embedded"]
    assert [row["name"].split()[0] for row in rows] == ["lock", "lock", "queue"]
    assert all(row["per_s"] > 0 and row["p99_ms"] >= row["p50_ms"] for row in rows)
    assert "lock handover" in r.stdout
