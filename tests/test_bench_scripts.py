"""The benchmark scripts run end to end (smoke size) and write what the README says."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(BENCH, name), *args],
                          capture_output=True, text=True, timeout=240)


def test_benchmarks_write_their_figures_and_plot_draws_them(tmp_path):
    embedded = run_script("embedded.py", "--quick", "--threads", "1,2",
                          "--dir", str(tmp_path), "--json", str(tmp_path / "embedded.json"))
    assert embedded.returncode == 0, embedded.stderr
    figures = json.loads((tmp_path / "embedded.json").read_text())
    assert [r["name"] for r in figures["rows"]][:3] == [
        "put, 1 thread (durable)", "put, 1 thread, the main thread", "put, 2 threads (durable)"]
    assert [r["name"].split(",")[0] for r in figures["rows"]][3:] == ["get", "prefix scan (10"]
    assert set(figures["main_thread"]["peers"]) == set(figures["put_scaling"][0]["peers"])
    assert all(r["kvstore_ops"] > 0 and r["raw_lmdb_ops"] > 0 for r in figures["rows"])
    assert [p["threads"] for p in figures["put_scaling"]] == [1, 2]
    assert "ratio" in embedded.stdout and "durable puts/s by writer threads" in embedded.stdout
    assert "one writer that is the main thread" in embedded.stdout

    paxos = run_script("paxos_core.py", "--quick", "--json", str(tmp_path / "paxos_core.json"))
    assert paxos.returncode == 0, paxos.stderr
    table = json.loads((tmp_path / "paxos_core.json").read_text())["table"]
    assert {r["batch_commands"] for r in table} == {1, 8, 64}

    plot = run_script("plot.py", "--results", str(tmp_path))
    if importlib.util.find_spec("matplotlib") is None:
        # Without the optional extra: a clear way out, not a traceback.
        assert plot.returncode == 2
        assert "pip install -e '.[bench]'" in plot.stderr
    else:
        assert plot.returncode == 0, plot.stderr
        for png in ("embedded_put_scaling.png", "paxos_core.png"):
            assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_group_commit_bench_times_each_round_of_the_bare_committer(tmp_path):
    result = run_script("group_commit.py", "--quick", "--threads", "1,4",
                        "--dir", str(tmp_path), "--json", str(tmp_path / "group_commit.json"))
    assert result.returncode == 0, result.stderr
    figures = json.loads((tmp_path / "group_commit.json").read_text())
    rows = {(r["threads"], r["name"]): r for r in figures["rows"]}
    assert set(rows) == {(1, "raw LMDB"), (1, "kvstore"), (4, "raw LMDB"), (4, "kvstore")}
    assert rows[1, "raw LMDB"]["batch"] == 1.0  # a lone writer never waits for company
    for threads in (1, 4):
        bare = rows[threads, "raw LMDB"]
        assert 1.0 <= bare["batch"] <= threads
        assert bare["round_us"] == pytest.approx(bare["commit_us"] + bare["overhead_us"])
        assert 0 < bare["commit_us"] < bare["round_us"]
    assert figures["lock_ping_pong_us"] > 0 and figures["raw_lmdb_1_thread_ops"] > 0
    assert "wake-up us" in result.stdout


def test_bad_thread_counts_are_refused():
    result = run_script("embedded.py", "--quick", "--threads", "0,x")
    assert result.returncode == 2
    assert "--threads" in result.stderr


def test_watch_and_lease_benches_run_kvstore_and_etcd_side_by_side(tmp_path):
    """bench/watch.py and bench/leases.py (smoke size) print their tables and write
    figures for kvstore, and for etcd in the same run where etcd is installed."""
    import shutil
    has_etcd = shutil.which("etcd") is not None
    leases = run_script("leases.py", "--quick", "--json", str(tmp_path / "leases.json"))
    assert leases.returncode == 0, leases.stderr
    rows = json.loads((tmp_path / "leases.json").read_text())["rows"]
    assert {"kvstore embedded", "kvstore 3 nodes"} <= set(rows)
    assert any(name.startswith("etcd") for name in rows) == has_etcd
    for row in rows.values():
        assert row["samples"] == 4 and len(row["delays_ms"]) == 4
        assert row["min_ms"] <= row["p50_ms"] <= row["max_ms"]
    assert "lease expiry" in leases.stdout

    watch = run_script("watch.py", "--quick", "--json", str(tmp_path / "watch.json"))
    assert watch.returncode == 0, watch.stderr
    figures = json.loads((tmp_path / "watch.json").read_text())
    assert figures["live"]["events_per_s"] > 0 and figures["put_to_event"]["p99_ms"] > 0
    if has_etcd:
        assert figures["etcd"]["live"]["events"] == figures["live"]["events"] == 500
        assert figures["etcd"]["put_to_event"]["p50_ms"] > 0
        assert "kvstore/etcd" in watch.stdout
    else:
        assert "etcd: not installed" in watch.stderr


def test_etcd_is_looked_for_where_the_user_says_and_missing_when_not_executable(
        tmp_path, monkeypatch):
    """Without an etcd binary the benchmarks measure kvstore alone (a message on stderr):
    ``find_etcd`` is None for a ``$ETCD`` that is not executable, and that binary if it is."""
    sys.path.insert(0, BENCH)
    try:
        import etcd_local
    finally:
        sys.path.remove(BENCH)
    monkeypatch.setenv("ETCD", str(tmp_path / "no-etcd"))
    assert etcd_local.find_etcd() is None
    fake = tmp_path / "etcd"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("ETCD", str(fake))
    assert etcd_local.find_etcd() == str(fake)
    assert "not installed" in etcd_local.MISSING


def test_backup_bench_times_backup_and_restore_beside_the_alternatives(tmp_path):
    result = run_script("backup.py", "--quick", "--dir", str(tmp_path),
                        "--json", str(tmp_path / "backup.json"))
    assert result.returncode == 0, result.stderr
    rows = {r["name"].split(" (")[0]: r for r in
            json.loads((tmp_path / "backup.json").read_text())["rows_timed"]}
    assert {"kvstore backup", "kvstore verify", "kvstore restore", "lmdb Environment.copy",
            "sqlite3 backup API"} <= set(rows)
    assert all(r["mb_per_s"] > 0 for r in rows.values())


def test_cluster_bench_measures_kvstore_and_etcd_in_the_same_sitting(tmp_path):
    """``bench/cluster.py --etcd-only``: the same rows for kvstore and for etcd (where it
    is installed) and their ratios; without etcd, kvstore's figures are skipped with the
    message, not a traceback."""
    import shutil
    has_etcd = shutil.which("etcd") is not None
    out = tmp_path / "cluster_etcd.json"
    result = run_script("cluster.py", "--etcd-only", "--quick", "--seconds", "0.2",
                        "--dir", str(tmp_path), "--json", str(out))
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    # the bare pipeline: a put's hops and flushes with no protocol, beside both systems
    for way in ("with_fdatasync", "without_fdatasync"):
        bare = data["bare_pipeline"][way]
        assert bare["p50_ms"] > 0 and bare["puts"] == 300
        assert set(bare["cpu_us_per_put"]) == {"leader", "followers", "client"}
    assert "the bare pipeline" in result.stdout
    versus = data["versus_etcd"]
    if not has_etcd:
        assert versus is None and "etcd: not installed" in result.stderr
        return
    names = [r["row"] for r in versus["rows"]]
    grpc = importlib.util.find_spec("grpc") is not None
    assert names == ["put, 256 in flight, asyncio", "get, 256 in flight, asyncio",
                     "put, 1 in flight, asyncio", "get, 1 in flight, asyncio",
                     "put, sequential, sync client", "get, sequential, sync client",
                     "put, sequential, sync, a follower stopped",
                     "get, sequential, sync, a follower stopped",
                     "get, sequential, sync, kvstore's lease reads",
                     "put, sequential, sync, kvstore's busy polling off",
                     "get, sequential, sync, kvstore's busy polling off"]
    for row in versus["rows"]:
        assert row["kvstore"]["ops_per_s"] > 0 and row["kvstore"]["p50_ms"] > 0
        if "busy polling off" in row["row"]:  # kvstore's own setting: no etcd row
            assert "etcd" not in row
            continue
        if grpc or row["client"] == "sync" and "stopped" not in row["row"] \
                and "lease" not in row["row"]:
            assert row["etcd"]["ops_per_s"] > 0 and row["etcd"]["p50_ms"] > 0
        # the CPU per call of the client's process and of the three members, both sides
        assert row["kvstore"]["client_cpu_us_per_op"] > 0
        assert row["kvstore"]["servers_cpu_us_per_op"] > 0
        if grpc:
            assert row["etcd"]["client_cpu_us_per_op"] > 0
            assert row["etcd"]["servers_cpu_us_per_op"] > 0
    assert "kvstore/etcd" in result.stdout
    assert "CPU per call" in result.stdout


def test_etcd_messages_are_encoded_and_read_as_protobuf():
    """The two hand-encoded etcd messages and the get's answer (no generated code)."""
    sys.path.insert(0, BENCH)
    try:
        import etcd_local
    finally:
        sys.path.remove(BENCH)
    big = b"v" * 300  # a two-byte varint length
    assert etcd_local.put_request(b"k", big) == b"\x0a\x01k\x12\xac\x02" + big
    assert etcd_local.range_request(b"key") == b"\x0a\x03key"
    kv = etcd_local._field(1, b"k") + b"\x10\x05" + etcd_local._field(5, big)  # key, revision, value
    header = etcd_local._field(1, b"\x08\x01")
    assert etcd_local.range_value(header + etcd_local._field(2, kv) + b"\x20\x01") == big
    assert etcd_local.range_value(header + b"\x20\x00") is None
