"""A node's Prometheus metrics and health endpoints (``kvstore-server --metrics``,
``kvstore.ops``), on real processes: what a scrape shows, how it follows a leader's
death, what ``/healthz`` and ``/readyz`` answer, and the rules behind them."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("prometheus_client")  # the test extra installs it; a skip is not a pass
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from conftest import PYTHON, ManualClock, child_env  # noqa: E402
from kvstore.ops.health import node_problems, quorum_problems  # noqa: E402
from kvstore.ops.histogram import Histogram  # noqa: E402
from kvstore.server.local import LocalCluster, free_port  # noqa: E402

#: Seconds within which the survivors of a SIGKILLed leader elect a new one and publish it
#: (an election timeout is 0.3-0.6 s; this leaves room for a loaded machine).
FAILOVER_BOUND = 15.0


def get(address: str, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://{address}{path}", timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def scrape(address: str) -> dict:
    """``{(name, frozenset(labels)): value}`` of every sample a node serves."""
    code, body = get(address, "/metrics")
    assert code == 200
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples}


def sample(samples: dict, name: str, **labels) -> float:
    return samples[(name, frozenset(labels.items()))]


def wait_for(what, timeout: float, step: float = 0.05):
    """``what()`` once truthy (its value), polled until ``timeout``; AssertionError after."""
    deadline = time.monotonic() + timeout
    while True:
        value = what()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what.__doc__ or what}")
        time.sleep(step)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with LocalCluster(str(tmp_path_factory.mktemp("ops")), 3, 2, metrics=True,
                      log_format="json") as lc:
        lc.start_all()
        lc.wait_ready(60)
        yield lc


def leader_of(lc: LocalCluster, shard: int, names) -> str | None:
    for n in names:
        if sample(scrape(lc.metrics_addresses[n]), "kvstore_shard_is_leader",
                  shard=str(shard)) == 1:
            return n
    return None


def test_requests_are_counted_by_op_and_outcome_with_their_latency(cluster):
    names = cluster.names
    before = {n: scrape(cluster.metrics_addresses[n]) for n in names}
    with cluster.client() as c:
        for i in range(40):
            c.put(b"m%d" % i, b"v")
        for i in range(10):
            assert c.get(b"m%d" % i) == b"v"

    def counted():
        """every write and read counted, on the nodes that answered them"""
        after = {n: scrape(cluster.metrics_addresses[n]) for n in names}

        def delta(name, **labels):
            return sum(sample(after[n], name, **labels) - sample(before[n], name, **labels)
                       for n in names)
        return (delta("kvstore_requests_total", op="write", outcome="ok") >= 40
                and delta("kvstore_request_duration_seconds_count", op="write") >= 40
                and delta("kvstore_requests_total", op="get", outcome="ok")
                + delta("kvstore_requests_total", op="get", outcome="forwarded") >= 10
                and delta("kvstore_wal_fsync_duration_seconds_count") > 0
                and delta("kvstore_wal_appended_bytes_total") > 40 * len(b"v")
                # one put after the other: the loops caught messages awake (busy polling)
                and delta("kvstore_busy_poll_hits_total") > 0)
    wait_for(counted, 5.0)
    samples = scrape(cluster.metrics_addresses[names[0]])
    # a histogram as Prometheus reads it: cumulative buckets, +Inf == count
    assert sample(samples, "kvstore_request_duration_seconds_bucket", op="write", le="+Inf") \
        == sample(samples, "kvstore_request_duration_seconds_count", op="write")
    assert sample(samples, "kvstore_node_info", node=names[0], nodes="3", shards="2") == 1
    for shard in ("0", "1"):
        roles = [sample(samples, "kvstore_shard_role", shard=shard, role=r)
                 for r in ("leader", "follower", "candidate", "pre-candidate")]
        assert sorted(roles) == [0, 0, 0, 1]
        assert sample(samples, "kvstore_shard_applied_index", shard=shard) <= \
            sample(samples, "kvstore_shard_commit_index", shard=shard)


def test_json_logs_carry_an_iso_timestamp(cluster):
    line = json.loads(cluster.tail("n1", 200).splitlines()[0])
    assert line["time"].endswith("Z") and line["time"][10] == "T"
    assert abs(time.mktime(time.strptime(line["time"][:19], "%Y-%m-%dT%H:%M:%S"))
               - time.timezone - line["ts"]) < 1.0


def test_health_and_readiness_and_the_leader_change_after_a_sigkill(cluster):
    """Every node alive and ready; SIGKILL the leader of shard 0: a survivor leads it
    within the bound and both survivors count the change; SIGSTOP one survivor: the
    other is cut from its quorum, so /readyz says 503 (with the reason) while /healthz
    stays 200; SIGCONT: ready again."""
    lc = cluster
    for n in lc.names:
        assert get(lc.metrics_addresses[n], "/healthz")[0] == 200
        code, body = get(lc.metrics_addresses[n], "/readyz")
        assert code == 200 and json.loads(body)["ready"] is True
    old = leader_of(lc, 0, lc.names)
    survivors = [n for n in lc.names if n != old]
    changes = {n: sample(scrape(lc.metrics_addresses[n]), "kvstore_shard_leader_changes_total",
                         shard="0") for n in survivors}
    lc.kill(old, signal.SIGKILL)

    def changed():
        """both survivors count a leader change, one leads shard 0, the other follows it"""
        scraped = {n: scrape(lc.metrics_addresses[n]) for n in survivors}
        roles = sorted(r for n in survivors for r in ("leader", "follower")
                       if sample(scraped[n], "kvstore_shard_role", shard="0", role=r) == 1)
        return roles == ["follower", "leader"] and all(
            sample(scraped[n], "kvstore_shard_leader_changes_total", shard="0") > changes[n]
            and sample(scraped[n], "kvstore_shard_has_leader", shard="0") == 1
            for n in survivors)
    wait_for(changed, FAILOVER_BOUND)
    cut, other = survivors
    lc.kill(other, signal.SIGSTOP)
    try:
        def not_ready():
            """the node cut from its quorum answers /readyz 503"""
            code, body = get(lc.metrics_addresses[cut], "/readyz")
            return code == 503 and json.loads(body)
        doc = wait_for(not_ready, FAILOVER_BOUND)
        assert doc["ready"] is False and any("no leader" in p for p in doc["problems"]), doc
        assert get(lc.metrics_addresses[cut], "/healthz")[0] == 200  # its loop still turns
    finally:
        lc.kill(other, signal.SIGCONT)
    wait_for(lambda: get(lc.metrics_addresses[cut], "/readyz")[0] == 200, FAILOVER_BOUND)


@pytest.mark.parametrize("flag, words", [
    ("nonsense", "a metrics address looks like 127.0.0.1:9100, got 'nonsense'"),
    ("127.0.0.1:99999", "a metrics address looks like"),
    ("taken", "cannot listen on 127.0.0.1:"),
])
def test_a_bad_metrics_address_is_one_line_and_exit_2(tmp_path, flag, words):
    import socket
    lc = LocalCluster(str(tmp_path), 1, 1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", free_port()))
        s.listen()
        if flag == "taken":
            flag = "127.0.0.1:%d" % s.getsockname()[1]
        r = subprocess.run([PYTHON, "-m", "kvstore.server", "--config", lc.config_path,
                            "--id", "n1", "--metrics", flag], capture_output=True, text=True,
                           env=child_env(), timeout=60)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "Traceback" not in r.stderr
    assert r.stderr.startswith("kvstore-server: --metrics: ") and words in r.stderr, r.stderr


def test_a_metrics_setting_in_the_config_is_checked_like_the_flag(tmp_path):
    lc = LocalCluster(str(tmp_path), 1, 1)
    with open(lc.config_path, "a") as f:
        f.write('metrics = "no-port"\n')  # under [nodes.n1], the last table
    r = subprocess.run([PYTHON, "-m", "kvstore.server", "--config", lc.config_path, "--id", "n1"],
                       capture_output=True, text=True, env=child_env(), timeout=60)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "[nodes.n1] metrics: a metrics address looks like" in r.stderr, r.stderr


def test_healthz_is_503_once_the_loop_stops_publishing():
    """A loop that stopped turning (a hung disk) shows as a stale view: /healthz 503, and
    /readyz with it; before the first view, both 503 too."""
    from kvstore.ops.http import LIVENESS_SECONDS, MetricsServer
    server = MetricsServer(f"127.0.0.1:{free_port()}")
    try:
        assert server.health()[0] == 503 and server.readiness()[0] == 503
        status = {"node": "n1", "shards": [_shard(0)]}
        server.publish({"at": time.monotonic(), "status": status})
        assert server.health() == (200, {"alive": True, "node": "n1"})
        assert server.readiness()[0] == 200
        server.publish({"at": time.monotonic() - LIVENESS_SECONDS - 1, "status": status})
        code, body = server.health()
        assert code == 503 and "has not turned for" in body["reason"]
        assert server.readiness() == (503, {"ready": False, "problems": [body["reason"]]})
    finally:
        server.stop()


# -- the rules, pure -----------------------------------------------------------------------

def _shard(s, **kw):
    return {"shard": s, "role": "follower", "leader": "n1", "state": "ok",
            "commit_index": 10, "applied_index": 10, "behind": 0} | kw


def test_node_problems_name_each_shard_that_cannot_serve():
    assert node_problems({"shards": [_shard(0), _shard(1, role="leader")]}) == []
    problems = node_problems({"shards": [
        _shard(0, leader=None, role="pre-candidate"), _shard(1, state="recovering"),
        _shard(2, state="catching up", applied_index=3, behind=700), _shard(3)]})
    assert problems == [
        "shard 0 has no leader (an election may be under way)",
        "shard 1: this node does not vote yet (recovering its state from the peers)",
        "shard 2: this node is catching up (applied slot 3, 700 behind the leader's commit "
        "point)"]


def test_a_node_and_the_cluster_say_no_leader_in_the_same_words():
    cluster = {"nodes": [{}, {}, {}], "shards": [
        {"shard": 0, "leader": None, "states": {"n1": "ok", "n2": "ok"}}]}
    assert quorum_problems(cluster) == node_problems({"shards": [_shard(0, leader=None)]})


def test_a_histogram_counts_each_value_in_the_first_bucket_whose_bound_holds_it():
    h = Histogram((0.001, 0.01))
    for v in (0.0005, 0.001, 0.002, 0.01, 5.0):
        h.observe(v)
    bounds, counts, total = h.snapshot()
    assert counts == [2, 2, 1] and total == pytest.approx(5.0135)


def test_the_window_of_active_clients_rolls_without_metrics_too(tmp_path):
    """A node without --metrics still forgets the clients of a past window: the set of
    active clients cannot grow with every client a long-lived node ever saw."""
    from kvstore.node.loop import Node, NodeConfig
    from kvstore.node.stats import CLIENT_WINDOW_SECONDS
    clock = ManualClock(1000.0)
    node = Node(NodeConfig(name="n1", names=["n1"], shards=1, data_dir=str(tmp_path),
                           addresses={"n1": f"tcp://127.0.0.1:{free_port()}"},
                           peer_addresses={"n1": f"tcp://127.0.0.1:{free_port()}"}),
                clock=clock)
    try:
        assert node.publish is None
        node.turn(False)
        node.stats.clients.update(b"client-%d" % i for i in range(100))
        clock.now += CLIENT_WINDOW_SECONDS + 1
        node.turn(False)
        assert node.stats.clients == set() and node.stats.clients_before == 100
    finally:
        node.close()
