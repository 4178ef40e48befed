"""bench/wal.py runs end to end (smoke size) and writes its figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


def test_wal_bench_writes_a_row_per_thread_count_and_group_size(tmp_path):
    out = tmp_path / "wal.json"
    done = subprocess.run([sys.executable, os.path.join(BENCH, "wal.py"), "--quick",
                           "--threads", "1,2", "--records", "1,4", "--dir", str(tmp_path),
                           "--json", str(out)], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(r["threads"], r["records_per_group"]) for r in rows] == [(1, 1), (1, 4), (2, 1),
                                                                      (2, 4)]
    for r in rows:
        assert r["wal_groups_per_s"] > 0 and r["lmdb_groups_per_s"] > 0
        assert r["wal_fsync_calls_per_group_python"] == 1.0  # one fdatasync per append
        assert r["merged_groups_per_s"] > 0
        assert 0 < r["merged_fsync_calls_per_group_python"] <= 1.0  # merged: at most one
    assert "wal groups/s" in done.stdout
