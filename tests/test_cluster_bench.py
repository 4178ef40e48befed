"""bench/cluster.py runs end to end at smoke size and writes its figures: the servers' rows
and the embedded replica's (the load in the leading node's process)."""

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
    # the same load inside the process of an embedded replica that leads the shard under test
    embedded = figures["embedded"]
    assert embedded["node"] == "n1" and embedded["leads_shards"] == [0]
    assert [(row["op"], row["in_flight"]) for row in embedded["rows"]] == [
        ("put", 1), ("put", 16), ("get", 1), ("get", 16)]
    assert all(row["ops_per_s"] > 0 and row["p99_ms"] >= row["p50_ms"]
               and set(row["cpu_share"]) == {"n1+load", "n2", "n3"} for row in embedded["rows"])
    assert "one put at a time (embedded replica)" in r.stdout
    # the profile of one put at a time: the leader's two saves and the segments between
    profile = figures["lone_put_profile"]
    assert profile["puts_profiled"] >= profile["puts"] // 2 and profile["saves_per_put"] >= 1
    assert 0 < profile["save_1"] < profile["total"]
    assert all(profile[k] >= 0 for k in ("to_leader", "propose_to_save", "wait_accepted",
                                          "save_2_to_answer", "answer_to_client")), profile
    assert "where one put at a time spends its time" in r.stdout
    assert figures["floor_ms"]["fdatasync"] > 0 and "the floor" in r.stdout
