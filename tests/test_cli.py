"""The ``kvstore`` command on an embedded store, run as a real process (docs/cli.md)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args: str, data: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("KVSTORE_CLUSTER", None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "kvstore.cli", *args, "--data", data],
                          capture_output=True, env=env, timeout=60)


@pytest.fixture
def data(tmp_path) -> str:
    return str(tmp_path / "kv")


def test_put_get_delete_round_trip(data):
    assert run("put", "greeting", "hello world", data=data).returncode == 0
    got = run("get", "greeting", data=data)
    assert got.returncode == 0
    assert got.stdout == b"hello world\n"
    deleted = run("delete", "greeting", data=data)
    assert deleted.returncode == 0
    assert run("get", "greeting", data=data).returncode == 1


def test_get_missing_key_exits_1_with_message_on_stderr(data):
    assert run("put", "other", "v", data=data).returncode == 0
    result = run("get", "nope", data=data)
    assert result.returncode == 1
    assert result.stdout == b""
    assert b"not found" in result.stderr and b"nope" in result.stderr


def test_delete_missing_key_exits_1(data):
    result = run("delete", "nope", data=data)
    assert result.returncode == 1
    assert b"not found" in result.stderr


def test_scan_prints_pairs_in_key_order_with_prefix_and_limit(data):
    for key in ["b/2", "a/1", "b/1", "b/3", "c/1"]:
        assert run("put", key, "v-" + key, data=data).returncode == 0
    result = run("scan", "b/", data=data)
    assert result.returncode == 0
    assert result.stdout.splitlines() == [b"b/1\tv-b/1", b"b/2\tv-b/2", b"b/3\tv-b/3"]
    limited = run("scan", "--limit", "2", data=data)
    assert limited.stdout.splitlines() == [b"a/1\tv-a/1", b"b/1\tv-b/1"]
    ranged = run("scan", "--start", "b/2", "--end", "c/1", data=data)
    assert ranged.stdout.splitlines() == [b"b/2\tv-b/2", b"b/3\tv-b/3"]


def test_status_prints_a_table_of_nodes_and_shards(data):
    run("put", "k", "v", data=data)
    result = run("status", data=data)
    assert result.returncode == 0
    text = result.stdout.decode()
    assert "node" in text and "shard" in text and "leader" in text and "commit" in text
    assert "lag" in text
    shard_rows = [line.split() for line in text.splitlines() if line.startswith("0 ")]
    assert shard_rows and shard_rows[0][1] == "local" and int(shard_rows[0][2]) >= 1


def test_status_json_has_the_contract_keys(data):
    import json
    run("put", "k", "v", data=data)
    status = json.loads(run("status", "--json", data=data).stdout)
    assert {"nodes", "shards"} <= set(status)
    assert status["shards"][0]["leader"] == "local"


def test_too_long_key_is_a_clear_error_and_writes_nothing(data):
    result = run("put", "k" * 600, "v", data=data)
    assert result.returncode == 2
    assert b"MAX_KEY_SIZE" in result.stderr
    assert run("scan", data=data).stdout == b""


def test_directory_in_use_is_reported_with_the_holder(data, tmp_path):
    import kvstore
    with kvstore.open(data):
        result = run("get", "k", data=data)
    assert result.returncode == 4
    assert b"in use" in result.stderr and str(os.getpid()).encode() in result.stderr


def test_cluster_flag_without_servers_is_unavailable(data):
    result = run("get", "k", data=data, env_extra={"KVSTORE_CLUSTER": "tcp://127.0.0.1:1"})
    assert result.returncode == 3
    assert b"unavailable" in result.stderr


def test_demo_runs_and_shows_the_store_working(tmp_path):
    result = run("demo", data=str(tmp_path / "demo"))
    assert result.returncode == 0, result.stderr
    out = result.stdout.decode()
    assert "total = 1000" in out
    assert "total -> 1000" in out


def test_check_verifies_the_log_and_reports_a_flipped_bit(data):
    from kvstore.storage.wal import SEGMENT_HEADER_SIZE
    assert run("put", "k", "v", data=data).returncode == 0
    ok = run("check", data=data)
    assert ok.returncode == 0 and b"1 log records" in ok.stdout
    assert run("put", "k2", "v2", data=data).returncode == 0  # a later append follows
    wal = os.path.join(data, "wal")
    segment = os.path.join(wal, sorted(os.listdir(wal))[0])
    with open(segment, "r+b") as f:  # the first entry's last byte (its value)
        f.seek(SEGMENT_HEADER_SIZE)
        head = f.read(8)
        length = int.from_bytes(head[4:8], "little")
        f.seek(SEGMENT_HEADER_SIZE + 28 + length - 1)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x01]))
    bad = run("check", data=data)
    assert bad.returncode == 4
    assert b"corrupt log record" in bad.stderr and segment.encode() in bad.stderr
    assert b"offset %d" % SEGMENT_HEADER_SIZE in bad.stderr


def test_options_may_come_before_the_command(data, tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("KVSTORE_CLUSTER", None)

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "kvstore.cli", *args],
                              capture_output=True, env=env, timeout=60, cwd=tmp_path)

    assert cli("--data", data, "put", "k", "v").returncode == 0
    assert cli("--data", data, "get", "k").stdout == b"v\n"
    # After the command wins, as with any subcommand option.
    assert cli("--data", str(tmp_path / "other"), "get", "k", "--data", data).stdout == b"v\n"
    assert not (tmp_path / "kvstore-data").exists()


def test_scan_into_a_pipe_closed_early_exits_quietly(data):
    """Issue 11 #13: `kvstore scan | head -c1` printed a BrokenPipeError traceback, exit 1."""
    import kvstore

    with kvstore.open(data) as db, db.transaction() as txn:
        for i in range(3000):  # ~200 KB of output: more than a pipe holds
            txn.put(b"key/%05d" % i, b"v" * 50)
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen([sys.executable, "-m", "kvstore.cli", "scan", "--data", data],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout.read(1) == b"k"
    proc.stdout.close()  # the reader goes away, as head does
    stderr = proc.stderr.read()
    proc.stderr.close()
    assert proc.wait(60) == 0
    assert b"Traceback" not in stderr and b"BrokenPipe" not in stderr, stderr.decode()


@pytest.mark.parametrize("command", [["get", "k"], ["scan"], ["status"], ["check"]])
def test_read_only_commands_on_a_directory_without_a_store_create_nothing(tmp_path, command):
    """Issue 11 #14: a mistyped --data made get and check create an empty store, report OK."""
    missing = tmp_path / "mistyped"
    result = run(*command, data=str(missing))
    assert result.returncode == 4, result.stderr.decode()
    assert b"no kvstore" in result.stderr and str(missing).encode() in result.stderr
    assert b"Traceback" not in result.stderr
    assert not missing.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run(*command, data=str(empty))
    assert result.returncode == 4 and b"no kvstore" in result.stderr
    assert list(empty.iterdir()) == []


def test_check_reports_values_and_the_comparison_with_the_log(data):
    assert run("put", "k", "v", data=data).returncode == 0
    result = run("check", data=data)
    assert result.returncode == 0
    assert b"1 values verified" in result.stdout and b"agrees with the log" in result.stdout
