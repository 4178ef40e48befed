"""The ``kvstore`` command for people (issue 21, item 4; docs/cli.md), as real processes:
JSON output faithful for any bytes, ``put KEY -`` from stdin, the notice when a write
creates a local store, ``status`` exiting 3 without a quorum, ``local-cluster
--port-base``, a taken port named at once, SIGHUP, shell completion.
"""

from __future__ import annotations

import base64
import json
import os
import random
import signal
import socket
import subprocess
import time

import pytest

import kvstore
from kvstore.server.local import LocalCluster, port_in_use
from conftest import PYTHON, child_env

pytestmark = pytest.mark.timeout(120)

CLI = [PYTHON, "-m", "kvstore.cli"]


def cli(*args, data=None, stdin: bytes | None = None, env_extra=None, timeout=60):
    env = child_env()
    env.pop("KVSTORE_CLUSTER", None)
    env.update(env_extra or {})
    extra = ["--data", data] if data is not None else []
    return subprocess.run(CLI + list(args) + extra, input=stdin, capture_output=True,
                          env=env, timeout=timeout)


def decoded(line: bytes) -> tuple:
    pair = json.loads(line)
    return base64.b64decode(pair["key"], validate=True), base64.b64decode(pair["value"],
                                                                           validate=True)


# --- JSON output and stdin ---------------------------------------------------------------

def test_scan_and_get_json_round_trip_any_bytes(tmp_path):
    data = str(tmp_path / "kv")
    pairs = {b"plain": b"hello", b"\xff\xfe not utf-8": b"\x00\x01\n\t\r\xff",
             b"tab\tkey": b"line\nbreaks\n", b"\xc3\xa9t\xc3\xa9": bytes(range(256))}
    with kvstore.open(data) as db:
        for k, v in pairs.items():
            db.put(k, v)
    result = cli("scan", "--json", data=data)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == len(pairs)
    assert [decoded(line) for line in lines] == sorted(pairs.items())
    for key, value in pairs.items():  # the key given on the command line, as bytes
        got = subprocess.run(CLI + [b"get", key, b"--json", b"--data", data.encode()],
                             capture_output=True, env=child_env(), timeout=60)
        assert got.returncode == 0, got.stderr
        assert decoded(got.stdout) == (key, value)
    assert b"base64" in cli("get", "--help").stdout  # the help says the encoding


def test_put_dash_reads_the_value_from_stdin_byte_for_byte(tmp_path):
    data = str(tmp_path / "kv")
    value = bytes(range(256)) * 40 + b"\n"  # every byte, and a trailing newline kept
    result = cli("put", "blob", "-", data=data, stdin=value)
    assert result.returncode == 0, result.stderr
    with kvstore.open(data) as db:
        assert db.get(b"blob") == value
    assert cli("put", "empty", "-", data=data, stdin=b"").returncode == 0
    assert decoded(cli("get", "empty", "--json", data=data).stdout) == (b"empty", b"")
    assert cli("put", "-", "dash-key", data=data).returncode == 0  # only VALUE reads stdin
    assert cli("get", "-", data=data).stdout == b"dash-key\n"


def test_a_value_on_stdin_over_the_limit_is_refused_before_anything_is_written(tmp_path):
    data = tmp_path / "kv"
    result = cli("put", "big", "-", data=str(data), stdin=b"x" * (kvstore.MAX_VALUE_SIZE + 1))
    assert result.returncode == 2
    assert b"longer than kvstore.MAX_VALUE_SIZE" in result.stderr
    assert not data.exists()  # not even an empty store


def test_a_write_that_creates_a_local_store_says_so_on_stderr(tmp_path):
    data = tmp_path / "kv"
    first = cli("put", "k", "v", data=str(data))
    assert first.returncode == 0
    assert b"no --cluster or KVSTORE_CLUSTER given: created a new embedded store in " + \
        str(data).encode() in first.stderr
    assert first.stdout == b"OK\n"  # stdout stays the answer alone
    second = cli("put", "k", "w", data=str(data))
    assert second.returncode == 0 and second.stderr == b""


# --- completion --------------------------------------------------------------------------

def test_shell_completion_offers_subcommands_and_options(tmp_path):
    import argcomplete  # noqa: F401  (the test extra has it: a missing one fails, not skips)
    out = tmp_path / "completions"

    def complete(line: str) -> list:
        env = dict(child_env(), _ARGCOMPLETE="1", COMP_LINE=line, COMP_POINT=str(len(line)),
                   _ARGCOMPLETE_STDOUT_FILENAME=str(out), _ARGCOMPLETE_IFS="\n")
        r = subprocess.run(CLI, env=env, capture_output=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return [word.strip() for word in out.read_text().split("\n")]

    assert "local-cluster" in complete("kvstore loc")
    assert "--port-base" in complete("kvstore local-cluster --port")
    assert "--json" in complete("kvstore scan --j")


def test_help_works_without_argcomplete():
    code = ("import sys; sys.modules['argcomplete'] = None\n"  # import argcomplete fails
            "from kvstore.cli import main; sys.exit(main(['--help']))")
    for env_extra in ({}, {"_ARGCOMPLETE": "1"}):
        r = subprocess.run([PYTHON, "-c", code], capture_output=True, timeout=60,
                           env=dict(child_env(), **env_extra))
        assert r.returncode == 0, r.stderr
        assert b"local-cluster" in r.stdout


# --- status without a quorum --------------------------------------------------------------

def status_until(addrs: str, code: int, seconds: float = 20):
    """``kvstore status`` until it exits ``code`` (bounded): on a loaded machine a shard
    may be between leaders for a moment, which status rightly reports as exit 3."""
    deadline = time.monotonic() + seconds
    while True:
        result = cli("status", "--cluster", addrs)
        if result.returncode == code or time.monotonic() > deadline:
            return result
        assert b"has no leader" in result.stderr, result.stdout + result.stderr


def test_status_exits_3_naming_each_shard_without_a_quorum(tmp_path):
    with LocalCluster(str(tmp_path / "c"), 3, 2, env=child_env()) as lc:
        lc.start_all()
        st = lc.wait_ready()
        addrs = ",".join(lc.address_list)
        healthy = status_until(addrs, 0)
        assert healthy.returncode == 0, healthy.stdout + healthy.stderr
        # One follower down (it leads no shard): every shard keeps its quorum.
        leaders = {s["leader"] for s in st["shards"]}
        follower = next(n for n in lc.names if n not in leaders)
        lc.kill(follower, signal.SIGKILL)
        one_down = status_until(addrs, 0)
        assert one_down.returncode == 0, one_down.stdout + one_down.stderr
        # Two of three down: no shard has a quorum.
        survivor = next(n for n in lc.names if n != follower)
        lc.kill(next(n for n in lc.names if n not in (follower, survivor)), signal.SIGKILL)
        two_down = cli("status", "--cluster", addrs)
        assert two_down.returncode == 3, two_down.stdout + two_down.stderr
        for shard in (0, 1):
            assert (f"shard {shard} has no quorum: 1 of 3 nodes answer and vote ({survivor}), "
                    f"2 needed").encode() in two_down.stderr
        assert two_down.stdout.count(b"down") == 2  # the table still shows who is down


def test_status_of_an_embedded_store_needs_no_quorum(tmp_path):
    data = str(tmp_path / "kv")
    assert cli("put", "k", "v", data=data).returncode == 0
    assert cli("status", data=data).returncode == 0


# --- local-cluster: ports, a taken port, SIGHUP ----------------------------------------------

def free_port_base(nodes: int) -> int:
    """A base whose client ports N..N+nodes-1 and peer ports 10000 above are free now;
    both ranges below LocalCluster's free ports (20000-32000) and the kernel's ephemeral
    ones, so that no other cluster of a parallel test run is handed them meanwhile."""
    rng = random.SystemRandom()
    for _ in range(200):
        base = rng.randrange(6000, 9900 - nodes)
        ports = [base + i for i in range(nodes)] + [base + i + 10000 for i in range(nodes)]
        if all(port_in_use(f"tcp://127.0.0.1:{p}") is None for p in ports):
            return base
    raise RuntimeError("no free port range")


def read_until(proc, marker: str, seconds: float = 60) -> str:
    lines = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        line = proc.stdout.readline().decode()
        if not line:
            break
        lines.append(line)
        if marker in line:
            break
    return "".join(lines)


def node_pids(text: str) -> list:
    return [int(line.rsplit(" pid ", 1)[1]) for line in text.splitlines() if " pid " in line]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is not alive
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def kill_all(proc, pids) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def test_local_cluster_on_a_port_base_stops_cleanly_on_sighup(tmp_path):
    """--port-base puts node i on N+i (peers N+i+10000); SIGHUP to local-cluster alone (a
    closed terminal, `kill -HUP`) stops every node and exits 0: no orphaned servers."""
    base = free_port_base(3)
    proc = subprocess.Popen(CLI + ["local-cluster", "--port-base", str(base),
                                   "--dir", str(tmp_path / "lc")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=child_env())
    text = ""
    try:
        text = read_until(proc, "Ctrl-C")
        assert "Ctrl-C" in text, text
        for i in range(3):
            assert (f"n{i + 1}  tcp://127.0.0.1:{base + i}  (peers: "
                    f"tcp://127.0.0.1:{base + i + 10000})") in text
        pids = node_pids(text)
        assert len(pids) == 3
        proc.send_signal(signal.SIGHUP)
        assert proc.wait(30) == 0
        rest = proc.stdout.read().decode()
        assert "SIGHUP: stopping the cluster" in rest
        assert "stopped: n1 exit 0, n2 exit 0, n3 exit 0" in rest
        assert not [p for p in pids if alive(p)]
    finally:
        kill_all(proc, node_pids(text))


@pytest.mark.parametrize("demo", [False, True])
def test_local_cluster_with_a_taken_port_fails_at_once_naming_it(tmp_path, demo):
    base = free_port_base(3)
    taken = base + 1  # n2's client port
    with socket.socket() as s:
        s.bind(("127.0.0.1", taken))
        s.listen()
        t = time.monotonic()
        r = cli("local-cluster", "--port-base", str(base), "--dir", str(tmp_path / "lc"),
                *(["--demo"] if demo else []), timeout=30)
        elapsed = time.monotonic() - t
    assert r.returncode == 2, r.stdout + r.stderr
    assert (f"port {taken} is not free: n2 cannot listen for clients on "
            f"tcp://127.0.0.1:{taken}").encode() in r.stderr
    assert not list((tmp_path / "lc").glob("*.log"))  # no node was started
    assert elapsed < 10


@pytest.mark.parametrize("args, says", [
    (["--nodes", "0"], "--nodes must be in 1..64, got 0"),
    (["--shards", "0", "--demo"], "--shards must be in 1..256, got 0"),
    (["--port-base", "99999"], "--port-base must be in 1..55533 for 3 node(s)"),
])
def test_local_cluster_refuses_bad_numbers_in_one_line(tmp_path, args, says):
    r = cli("local-cluster", "--dir", str(tmp_path / "lc"), *args, timeout=30)
    assert r.returncode == 2, r.stdout + r.stderr
    assert says.encode() in r.stderr and b"Traceback" not in r.stderr
    assert b"unexpected error" not in r.stderr


def test_local_cluster_stops_when_a_node_cannot_start_again(tmp_path):
    """A node that dies is restarted, but one that exits 2 (here: its port was taken
    meanwhile) would fail the same way for ever: the cluster stops, naming it."""
    proc = subprocess.Popen(CLI + ["local-cluster", "--dir", str(tmp_path / "lc")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env())
    text = ""
    try:
        text = read_until(proc, "Ctrl-C")
        assert "Ctrl-C" in text, text
        n1_pid = node_pids(text)[0]
        n1_port = int(text.split("n1  tcp://127.0.0.1:", 1)[1].split()[0])
        os.kill(proc.pid, signal.SIGSTOP)  # the supervisor must not restart n1 before...
        try:
            os.kill(n1_pid, signal.SIGKILL)
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                deadline = time.monotonic() + 10
                while True:  # ...its port is taken (free once n1 is gone)
                    try:
                        s.bind(("127.0.0.1", n1_port))
                        break
                    except OSError:
                        assert time.monotonic() < deadline
                        time.sleep(0.01)
                s.listen()
                os.kill(proc.pid, signal.SIGCONT)
                assert proc.wait(30) == 2
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
        err = proc.stderr.read().decode()
        assert f"n1 cannot run (kvstore-server: cannot listen for clients on " \
               f"tcp://127.0.0.1:{n1_port} (port {n1_port})" in err, err
        assert "stopping the cluster" in err
        assert not [p for p in node_pids(text) if alive(p)]
    finally:
        kill_all(proc, node_pids(text))


# --- kvstore-server: SIGHUP and a port it cannot bind -----------------------------------------

def start_server(tmp_path, base: int) -> subprocess.Popen:
    config = tmp_path / "cluster.toml"
    config.write_text(f'[nodes.n1]\naddress = "tcp://127.0.0.1:{base}"\n'
                      f'peer_address = "tcp://127.0.0.1:{base + 10000}"\ndata = "n1"\n')
    return subprocess.Popen([PYTHON, "-m", "kvstore.server", "--config", str(config),
                             "--id", "n1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=child_env())


def test_kvstore_server_stops_cleanly_on_sighup(tmp_path):
    base = free_port_base(1)
    proc = start_server(tmp_path, base)
    try:
        with kvstore.connect(f"tcp://127.0.0.1:{base}", timeout=30) as c:
            c.put(b"k", b"v")  # it serves: its signal handlers are in place
        proc.send_signal(signal.SIGHUP)
        assert proc.wait(30) == 0
        err = proc.stderr.read().decode()
        assert "SIGHUP: stopping" in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_kvstore_server_names_the_port_it_cannot_listen_on(tmp_path):
    base = free_port_base(1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", base + 10000))  # its peer port
        s.listen()
        proc = start_server(tmp_path, base)
        try:
            assert proc.wait(30) == 2
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    err = proc.stderr.read().decode()
    assert (f"cannot listen for peers on tcp://127.0.0.1:{base + 10000} (port {base + 10000}): "
            f"Address already in use") in err, err
    assert err.count("\n") == 1  # one line
