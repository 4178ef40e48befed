"""Real ``kvstore-server`` processes on 127.0.0.1: three nodes, killed and restarted.

Every wait is bounded; every process is killed at teardown (``LocalCluster.close``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import pytest

import kvstore
from kvstore.server.local import LocalCluster
from conftest import PYTHON, child_env

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def cluster(tmp_path):
    clusters = []

    def make(nodes=3, shards=1, directory=None):
        lc = LocalCluster(str(directory or tmp_path / f"c{len(clusters)}"), nodes, shards,
                          env=child_env())
        clusters.append(lc)
        return lc

    yield make
    for lc in clusters:
        lc.close()


def leader_of(status, shard=0):
    return status["shards"][shard]["leader"]


def test_put_and_get_through_every_node(cluster):
    lc = cluster(shards=2)
    lc.start_all()
    lc.wait_ready()
    with lc.client(names=["n1"]) as c:
        for i in range(20):
            c.put(b"key%d" % i, b"value%d" % i)
    for name in lc.names:  # each node alone as the seed: it routes the client to the leaders
        with lc.client(names=[name]) as c:
            assert [c.get(b"key%d" % i) for i in range(20)] == [b"value%d" % i for i in range(20)]
            assert len(c.scan(b"key")) == 20
    with lc.client() as c:
        st = c.status()
        assert [n["state"] for n in st["nodes"]] == ["up"] * 3
        assert all(s["leader"] in lc.names for s in st["shards"])
        # A follower forwards a request to the leader and names it in the answer.
        leader = leader_of(st)
        follower = next(n for n in lc.names if n != leader)
    from test_node import Raw
    from kvstore.commands import OP_PUT
    from kvstore.sharding import shard_of
    from kvstore.transport import wire
    raw = Raw(lc.addresses[follower])
    try:
        key = next(b"fwd%d" % i for i in range(100) if shard_of(b"fwd%d" % i, 2) == 0)
        status, value = raw.request(wire.OP_WRITE, [0, b"raw-client", 1, 1, [OP_PUT, key, b"v"]])
        assert (status, value) == (wire.STATUS_OK_FORWARDED, [None, lc.names.index(leader)])
        # A read is not forwarded: the follower serves it itself, through the read index.
        status, value = raw.request(wire.OP_GET, [0, key, False])
        assert (status, value) == (wire.STATUS_OK, b"v")
    finally:
        raw.close()
    assert lc.stop_all() == {n: 0 for n in lc.names}  # SIGTERM: clean exit 0


def test_each_follower_serves_a_get_that_sees_the_write_just_before_it(cluster):
    """Follower reads (ReadIndex): a write acknowledged by the leader, then a get sent to
    each follower itself (not forwarded): the follower answers, with that write's value."""
    from test_node import Raw
    from kvstore.transport import wire
    lc = cluster()
    lc.start_all()
    st = lc.wait_ready()
    leader = leader_of(st)
    followers = [n for n in lc.names if n != leader]
    raws = {n: Raw(lc.addresses[n]) for n in followers}
    try:
        with lc.client(names=[leader]) as c:
            for i in range(30):
                value = b"v%d" % i
                c.put(b"k", value)  # acknowledged by the leader ...
                for name in followers:  # ... then read at each follower, at once
                    assert raws[name].request(wire.OP_GET, [0, b"k", False]) == (wire.STATUS_OK, value)
    finally:
        for raw in raws.values():
            raw.close()
    with lc.client() as c:  # the client spreads gets over all three nodes
        c.put(b"k", b"last")
        assert [c.get(b"k") for _ in range(30)] == [b"last"] * 30


def test_sigkill_of_the_leader_under_writes_loses_no_acknowledged_write(cluster):
    lc = cluster()
    lc.start_all()
    st = lc.wait_ready()
    old_leader = leader_of(st)
    acked: list = []
    errors: list = []
    stop = threading.Event()
    killed = threading.Event()
    after_kill: list = []

    def writer(w: int) -> None:
        with lc.client(timeout=10) as c:
            i = 0
            while not stop.is_set():
                key = b"w%d-%d" % (w, i)
                try:
                    c.put(key, b"x" * 16)
                except kvstore.Unavailable as e:  # outcome unknown: neither acked nor lost
                    errors.append(e)
                    continue
                acked.append(key)
                if killed.is_set():
                    after_kill.append(key)
                i += 1

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 20
        while len(acked) < 200 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(acked) >= 200, "writes did not flow before the kill"
        lc.kill(old_leader, signal.SIGKILL)
        killed.set()
        kill_time = time.monotonic()
        while len(after_kill) < 200 and time.monotonic() < kill_time + 30:
            time.sleep(0.01)
        failover = time.monotonic() - kill_time
        assert len(after_kill) >= 200, f"writes did not resume after the kill ({failover:.1f} s)"
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    survivors = [n for n in lc.names if n != old_leader]
    st = lc.wait_ready(names=survivors)
    assert leader_of(st) in survivors
    with lc.client(names=survivors) as c:
        missing = [k for k in acked if c.get(k) != b"x" * 16]
        assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {missing[:3]}"
    # The killed node rejoins on its own and catches up.
    lc.start(old_leader)
    with lc.client(names=[old_leader]) as c:
        assert c.get(acked[-1]) == b"x" * 16


def test_full_cluster_sigkill_and_restart_keeps_every_write(cluster, tmp_path):
    lc = cluster(shards=2, directory=tmp_path / "full")
    lc.start_all()
    lc.wait_ready()
    with lc.client() as c:
        for i in range(100):
            c.put(b"k%03d" % i, b"v%d" % i)
        assert c.cas(b"k000", b"v0", b"changed")
    for n in lc.names:
        lc.kill(n, signal.SIGKILL)
    lc.close()
    lc2 = cluster(directory=tmp_path / "full")  # the same config, ports and data
    lc2.start_all()
    lc2.wait_ready()
    with lc2.client() as c:
        assert c.get(b"k000") == b"changed"
        assert c.scan(b"k", limit=3) == [(b"k000", b"changed"), (b"k001", b"v1"), (b"k002", b"v2")]
        assert len(c.scan(b"k")) == 100
        c.put(b"after", b"restart")
        assert c.get(b"after") == b"restart"


def run_server(*args, timeout=20):
    return subprocess.run([PYTHON, "-m", "kvstore.server", *args], capture_output=True,
                          env=child_env(), timeout=timeout)


def test_bad_config_or_data_dir_exits_2_with_one_line(tmp_path):
    good = tmp_path / "ok.toml"
    good.write_text('[nodes.n1]\naddress = "tcp://127.0.0.1:1"\n')
    cases = {
        "missing": (["--config", str(tmp_path / "nope.toml"), "--id", "n1", "--data", "d"],
                    "does not exist"),
        "toml": (["--config", str(tmp_path / "bad.toml"), "--id", "n1", "--data", "d"],
                 "not valid TOML"),
        "node": (["--config", str(good), "--id", "n9", "--data", "d"], "no node 'n9'"),
        "no data": (["--config", str(good), "--id", "n1"], "no data directory"),
        "shards": (["--config", str(tmp_path / "shards.toml"), "--id", "n1", "--data", "d"],
                   "shards must be"),
        "address": (["--config", str(tmp_path / "addr.toml"), "--id", "n1", "--data", "d"],
                    "address must look like"),
        "data is a file": (["--config", str(good), "--id", "n1", "--data", str(good)],
                           "not a directory"),
    }
    (tmp_path / "bad.toml").write_text("shards = = 3\n")
    (tmp_path / "shards.toml").write_text('shards = 0\n[nodes.n1]\naddress = "tcp://127.0.0.1:1"\n')
    (tmp_path / "addr.toml").write_text('[nodes.n1]\naddress = "localhost"\n')
    for what, (args, expected) in cases.items():
        r = run_server(*args)
        err = r.stderr.decode()
        assert r.returncode == 2, (what, err)
        assert expected in err, (what, err)
        assert len(err.strip().splitlines()) == 1, (what, err)
        assert "Traceback" not in err, (what, err)


def test_sigint_exits_0_and_json_logs_say_who_leads(cluster):
    lc = cluster(nodes=1)
    lc.log_format = "json"
    lc.start_all()
    lc.wait_ready()
    assert lc.kill("n1", signal.SIGINT) == 0
    import json
    events = [json.loads(line) for line in open(lc.log_path("n1")) if line.startswith("{")]
    assert any(e.get("event") == "elected" and e.get("shard") == 0 for e in events)
    assert events[-1]["event"] == "stop"


def test_a_follower_down_long_enough_needs_a_snapshot_and_catches_up(cluster):
    lc = cluster(shards=1)
    with open(lc.config_path, "a") as f:  # a small log: the follower must get a snapshot
        f.write("\n[tuning]\nsnapshot_every_slots = 40\nlog_retain_slots = 5\n")
    lc.start_all()
    st = lc.wait_ready()
    leader = leader_of(st)
    lagging = next(n for n in lc.names if n != leader)
    lc.kill(lagging, signal.SIGKILL)
    with lc.client() as c:
        for i in range(150):  # one slot each: several snapshots and compactions
            c.put(b"s%03d" % i, b"v%d" % i)
    lc.start(lagging)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with lc.client(names=[lagging]) as c:
            views = c.status()["shards"][0]["replicas"]
        if views.get(lagging, -1) >= views.get(leader, 0) > 0:
            break
        time.sleep(0.05)
    assert views.get(lagging, -1) >= views.get(leader, 0), views
    assert "snapshot" in open(lc.log_path(lagging)).read()
    # Without the old leader, the caught-up node is needed for every quorum: all data served.
    lc.kill(leader, signal.SIGKILL)
    survivors = [n for n in lc.names if n != leader]
    lc.wait_ready(names=survivors)
    with lc.client(names=survivors) as c:
        assert len(c.scan(b"s")) == 150
        assert c.get(b"s149") == b"v149"
        c.put(b"while-down", b"1")
    # The old leader restarts from a compacted log (its state is its snapshot) and rejoins.
    lc.start(leader)
    with lc.client(names=[leader]) as c:
        assert c.get(b"while-down") == b"1"
        assert len(c.scan(b"s")) == 150


def test_local_cluster_command_runs_in_the_foreground_and_stops_on_sigint(tmp_path):
    p = subprocess.Popen([PYTHON, "-m", "kvstore.cli", "local-cluster", "--nodes", "3",
                          "--shards", "3", "--dir", str(tmp_path / "lc")],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=child_env())
    try:
        lines = []
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            line = p.stdout.readline().decode()
            if not line:
                break
            lines.append(line)
            if "Ctrl-C" in line:
                break
        text = "".join(lines)
        assert "Ctrl-C" in text, text
        addrs = next(ln.split("=", 1)[1].strip() for ln in lines if "KVSTORE_CLUSTER=" in ln)
        env = dict(child_env(), KVSTORE_CLUSTER=addrs)
        cli = [PYTHON, "-m", "kvstore.cli"]
        assert subprocess.run(cli + ["put", "hello", "world"], env=env, timeout=30).returncode == 0
        got = subprocess.run(cli + ["get", "hello"], env=env, capture_output=True, timeout=30)
        assert got.stdout == b"world\n"
        status = subprocess.run(cli + ["status"], env=env, capture_output=True, timeout=30)
        assert status.returncode == 0 and b"leader" in status.stdout
        leaders = {ln.split()[1] for ln in status.stdout.decode().splitlines()[-3:]}
        assert leaders <= {"n1", "n2", "n3"}
        p.send_signal(signal.SIGINT)
        assert p.wait(30) == 0
        assert b"stopped: n1 exit 0, n2 exit 0, n3 exit 0" in p.stdout.read()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
            # its nodes are its children and outlive a SIGKILL of it: end them by pid, as printed
            for ln in lines:
                if " pid " in ln:
                    try:
                        os.kill(int(ln.rsplit(" pid ", 1)[1]), signal.SIGKILL)
                    except (OSError, ValueError):
                        pass


def test_five_nodes_lose_two_under_writes_and_keep_every_acknowledged_write(cluster):
    lc = cluster(nodes=5, shards=2)
    lc.start_all()
    st = lc.wait_ready()
    victims = [leader_of(st, 0)]
    victims.append(next(n for n in lc.names if n not in victims))
    acked: list = []
    with lc.client(timeout=10) as c:
        for i in range(100):
            c.put(b"five%d" % i, b"v")
            acked.append(b"five%d" % i)
        for v in victims:
            lc.kill(v, signal.SIGKILL)
        for i in range(100, 200):
            c.put(b"five%d" % i, b"v")
            acked.append(b"five%d" % i)
    survivors = [n for n in lc.names if n not in victims]
    lc.wait_ready(names=survivors)
    with lc.client(names=survivors) as c:
        assert [k for k in acked if c.get(k) != b"v"] == []


def test_the_cluster_demo_fails_over_and_says_every_write_survived(tmp_path):
    r = subprocess.run([PYTHON, "-m", "kvstore.cli", "local-cluster", "--demo",
                        "--dir", str(tmp_path / "demo")], capture_output=True, env=child_env(),
                       timeout=110)
    out = r.stdout.decode()
    assert r.returncode == 0, out + r.stderr.decode()
    assert "0 missing" in out and "caught up" in out
    assert "cross-shard transfers committed meanwhile; the accounts still hold 400" in out
    assert "every acknowledged write survived the leader's death" in out
