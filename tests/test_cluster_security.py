"""CurveZMQ (``[security]`` in cluster.toml): keys from ``kvstore keygen``, a client without an
allowed key is refused with an error that says so, a peer with other keys cannot join."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time

import pytest

import kvstore
from kvstore.client import AuthenticationFailed
from kvstore.node.loop import Node, NodeConfig
from kvstore.server.local import free_port
from kvstore.transport.security import keygen
from conftest import PYTHON, child_env

pytestmark = pytest.mark.timeout(120)


class Nodes:
    def __init__(self, tmp_path, names, keys_of):
        self.addresses = {n: f"tcp://127.0.0.1:{free_port()}" for n in names}
        self.peer_addresses = {n: f"tcp://127.0.0.1:{free_port()}" for n in names}
        self.nodes, self.threads = {}, {}
        for n in names:
            cfg = NodeConfig(name=n, names=sorted(names), addresses=self.addresses, shards=1,
                             peer_addresses=self.peer_addresses,
                             data_dir=str(tmp_path / n), curve_keys=keys_of[n])
            self.nodes[n] = Node(cfg)
            self.threads[n] = threading.Thread(target=self.nodes[n].run, daemon=True)
            self.threads[n].start()

    def stop(self):
        for n, node in self.nodes.items():
            node.stop()
        for t in self.threads.values():
            t.join(10)


@pytest.fixture
def keys(tmp_path):
    d = str(tmp_path / "keys")
    written = keygen(d)
    assert {os.path.basename(p) for p in written} >= {"server.key", "server.key_secret",
                                                       "client.key_secret", "node.key_secret"}
    return d


def test_an_allowed_client_gets_in_and_others_are_told_authentication_failed(tmp_path, keys):
    cluster = Nodes(tmp_path, ["n1"], {"n1": keys})
    try:
        address = cluster.addresses["n1"]
        with kvstore.connect(address, timeout=5, keys=keys) as c:
            c.put(b"secret", b"s")
            assert c.get(b"secret") == b"s"
        t = time.monotonic()
        with pytest.raises(AuthenticationFailed, match="authentication failed.*requires CurveZMQ"):
            kvstore.connect(address, timeout=5)
        assert time.monotonic() - t < 4  # told, not timed out
        # The right server key, but a client key the node does not list in allowed/.
        stranger = str(tmp_path / "stranger")
        shutil.copytree(keys, stranger)
        for f in ("client.key", "client.key_secret"):
            os.remove(os.path.join(stranger, f))
        import zmq.auth
        zmq.auth.create_certificates(stranger, "client")
        with pytest.raises(kvstore.Unavailable, match="authentication failed.*refused"):
            kvstore.connect(address, timeout=5, keys=stranger)
    finally:
        cluster.stop()


def test_a_peer_with_other_keys_cannot_join(tmp_path, keys):
    other = str(tmp_path / "other")
    keygen(other)
    cluster = Nodes(tmp_path, ["n1", "n2", "n3"], {"n1": keys, "n2": keys, "n3": other})
    try:
        with kvstore.connect([cluster.addresses["n1"], cluster.addresses["n2"]], timeout=10,
                             keys=keys) as c:
            for i in range(20):
                c.put(b"k%d" % i, b"v")
            st = c.status()
            assert {s["leader"] for s in st["shards"]} <= {"n1", "n2"}
        time.sleep(0.5)  # heartbeats every 50 ms: ten rounds that must not reach n3
        r3 = cluster.nodes["n3"].replicas[0]
        assert r3.leader_hint in (None, 2) and r3.applied_index < 0
    finally:
        cluster.stop()


def test_security_config_and_keygen_command(tmp_path):
    keys = tmp_path / "k"
    r = subprocess.run([PYTHON, "-m", "kvstore.cli", "keygen", str(keys)], capture_output=True,
                       env=child_env(), timeout=30)
    assert r.returncode == 0, r.stderr
    assert (keys / "server.key").exists() and (keys / "clients" / "client.key").exists()
    assert os.listdir(keys / "nodes") == ["node.key"]  # separate key sets: clients are not nodes
    assert os.listdir(keys / "clients") == ["client.key"]
    again = subprocess.run([PYTHON, "-m", "kvstore.cli", "keygen", str(keys)], capture_output=True,
                           env=child_env(), timeout=30)
    assert again.returncode == 2 and b"already holds keys" in again.stderr
    cfg = tmp_path / "c.toml"
    cfg.write_text('[nodes.n1]\naddress = "tcp://127.0.0.1:1"\n[security]\ncurve = true\n'
                   'keys = "nowhere"\n')
    r = subprocess.run([PYTHON, "-m", "kvstore.server", "--config", str(cfg), "--id", "n1",
                        "--data", str(tmp_path / "d")], capture_output=True, env=child_env(),
                       timeout=30)
    assert r.returncode == 2 and b"does not exist" in r.stderr
    assert len(r.stderr.decode().strip().splitlines()) == 1


def test_a_server_process_with_security_serves_only_keyed_clients(tmp_path, keys):
    address = f"tcp://127.0.0.1:{free_port()}"
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[nodes.n1]\naddress = "{address}"\n'
                   f'peer_address = "tcp://127.0.0.1:{free_port()}"\ndata = "n1"\n'
                   f'[security]\ncurve = true\nkeys = "keys"\n')
    p = subprocess.Popen([PYTHON, "-m", "kvstore.server", "--config", str(cfg), "--id", "n1"],
                         stderr=subprocess.PIPE, env=child_env())
    try:
        with kvstore.connect(address, timeout=10, keys=keys) as c:
            c.put(b"k", b"v")
            assert c.get(b"k") == b"v"
        env_keys = dict(os.environ)
        with pytest.raises(kvstore.Unavailable, match="authentication failed"):
            kvstore.connect(address, timeout=5)
        os.environ["KVSTORE_KEYS"] = keys  # the CLI's and connect()'s default
        try:
            with kvstore.connect(address, timeout=10) as c:
                assert c.get(b"k") == b"v"
        finally:
            os.environ.clear()
            os.environ.update(env_keys)
        p.terminate()
        assert p.wait(20) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)


def _handshake(address: str, keys, timeout: float = 10.0) -> int:
    """The first handshake event of a DEALER with ``keys`` connecting to ``address``."""
    from zmq.utils.monitor import recv_monitor_message
    import zmq
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    keys.make_client(s)
    mon = s.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                               | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                               | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
    try:
        s.connect(address)
        assert mon.poll(int(timeout * 1000)), f"no handshake with {address}"
        return recv_monitor_message(mon)["event"]
    finally:
        s.disable_monitor()
        mon.close(0)
        s.close(0)
        ctx.term()


@pytest.fixture
def secure_cluster(tmp_path, keys):
    from kvstore.server.local import LocalCluster
    lc = LocalCluster(str(tmp_path / "c"), 3, 1, env=child_env(), keys=keys)
    try:
        lc.start_all()
        lc.wait_ready()
        yield lc
    finally:
        lc.close()


def test_a_client_key_never_speaks_the_peer_protocol(secure_cluster, keys):
    """With Curve the role comes from the key: the client key does not complete the
    handshake on a peer port (node keys do), and the peer frames it sends on the client
    port are dropped; the cluster keeps serving what it acknowledged."""
    import zmq
    from kvstore.transport.security import CurveKeys
    from test_hostile_clients import Raw, forged_peer_frames, node_status, wait_for
    lc = secure_cluster
    client_keys, node_keys = CurveKeys(keys, "client"), CurveKeys(keys, "node")
    with lc.client() as c:
        c.put(b"acked", b"1")
    assert _handshake(lc.peer_addresses["n1"], client_keys) == zmq.EVENT_HANDSHAKE_FAILED_AUTH
    assert _handshake(lc.peer_addresses["n1"], node_keys) == zmq.EVENT_HANDSHAKE_SUCCEEDED
    assert _handshake(lc.addresses["n1"], client_keys) == zmq.EVENT_HANDSHAKE_SUCCEEDED
    assert _handshake(lc.addresses["n1"], node_keys) == zmq.EVENT_HANDSHAKE_FAILED_AUTH
    raw = Raw(lc.addresses["n1"], client_keys)
    try:
        for frame in forged_peer_frames(1, 0):
            raw.s.send(frame)

        def dropped():
            counters = node_status(lc.addresses["n1"], client_keys)["counters"]
            return (counters.get("dropped_peer_frame_from_client", 0)
                    + counters.get("dropped_malformed", 0))
        wait_for(lambda: dropped() >= 4, what="n1 dropped the client's peer frames")
    finally:
        raw.close()
    assert lc.running() == lc.names
    with lc.client() as c:
        assert c.get(b"acked") == b"1"
        c.put(b"after", b"2")


def test_an_operator_adds_a_client_and_revokes_it_without_a_restart(secure_cluster, keys):
    from kvstore.client import AuthenticationFailed
    lc = secure_cluster
    r = subprocess.run([PYTHON, "-m", "kvstore.cli", "keygen", "--client", "alice", keys],
                       capture_output=True, env=child_env(), timeout=30)
    assert r.returncode == 0, r.stderr
    alice = os.path.join(keys, "alice.key_secret")
    assert os.path.exists(os.path.join(keys, "clients", "alice.key"))

    def connect_alice():
        return kvstore.connect(lc.address_list, timeout=3, keys=alice)

    deadline = time.monotonic() + 15  # the nodes reread clients/ every 2 s
    while True:
        try:
            with connect_alice() as c:
                c.put(b"from-alice", b"1")
            break
        except AuthenticationFailed:
            assert time.monotonic() < deadline, "alice was never let in"
    kept = connect_alice()  # an open connection, to be cut off by the revocation
    try:
        assert kept.get(b"from-alice") == b"1"
        os.remove(os.path.join(keys, "clients", "alice.key"))
        deadline = time.monotonic() + 15
        while True:
            try:
                with connect_alice() as c:
                    c.get(b"from-alice")
            except AuthenticationFailed as e:
                assert "authentication failed" in str(e)
                break
            except kvstore.Unavailable:
                pass  # no answer in time (a loaded machine): alice was not let in; ask again
            assert time.monotonic() < deadline, "alice was still let in after revocation"
        with pytest.raises(kvstore.Unavailable):  # its open connection is heard no more
            kept.get(b"from-alice")
    finally:
        kept.close()
    with lc.client() as c:  # the cluster's own client key still gets in
        assert c.get(b"from-alice") == b"1"


def test_a_key_directory_in_the_old_layout_is_refused_in_one_line(tmp_path, keys):
    old = tmp_path / "old"
    shutil.copytree(keys, old)
    shutil.rmtree(old / "nodes")
    os.rename(old / "clients", old / "allowed")
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[nodes.n1]\naddress = "tcp://127.0.0.1:{free_port()}"\n'
                   f'peer_address = "tcp://127.0.0.1:{free_port()}"\ndata = "n1"\n'
                   f'[security]\ncurve = true\nkeys = "old"\n')
    r = subprocess.run([PYTHON, "-m", "kvstore.server", "--config", str(cfg), "--id", "n1"],
                       capture_output=True, text=True, env=child_env(), timeout=30)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "old layout" in r.stderr
    assert "kvstore keygen" in r.stderr


def test_admins_are_the_keys_listed_in_admins_and_every_client_without_that_list(tmp_path):
    """``keygen`` lists the first client key in ``admins/``; ``--client NAME`` is a data
    client unless ``--admin``; a directory without ``admins/`` (written before it existed)
    keeps every allowed client an admin, and the node's keys follow the directory."""
    from kvstore.transport.security import CurveKeys
    d = str(tmp_path / "k")
    keygen(d)
    assert os.listdir(os.path.join(d, "admins")) == ["client.key"]
    keygen(d, client="bob")
    keygen(d, client="carol", admin=True)
    assert sorted(os.listdir(os.path.join(d, "admins"))) == ["carol.key", "client.key"]
    assert sorted(os.listdir(os.path.join(d, "clients"))) == ["bob.key", "carol.key", "client.key"]
    node = CurveKeys(d, "node")
    user = {n: CurveKeys(os.path.join(d, f"{n}.key_secret"), "client").public.decode()
            for n in ("client", "bob", "carol")}
    assert node.reload_admins(force=True)
    assert [node.is_admin(user[n]) for n in ("client", "bob", "carol")] == [True, False, True]
    assert not node.is_admin(None)  # a frame with no key (no Curve on its socket)
    os.remove(os.path.join(d, "admins", "carol.key"))  # revoked, without a restart
    assert node.reload_admins() and not node.is_admin(user["carol"])
    assert not node.reload_admins()  # nothing changed since
    with open(os.path.join(d, "admins", "stray.key"), "w") as f:  # not a key: skipped,
        f.write("not a certificate\n")  # and the revocations after it still count
    os.remove(os.path.join(d, "admins", "client.key"))
    assert node.reload_admins() and node.allowed_admins == frozenset()
    os.remove(os.path.join(d, "admins", "stray.key"))
    shutil.rmtree(os.path.join(d, "admins"))  # the old layout: everyone, as before
    assert node.reload_admins() and node.is_admin(user["bob"]) and node.allowed_admins is None
    with pytest.raises(kvstore.InvalidArgument, match="--client"):
        keygen(str(tmp_path / "k2"), admin=True)


def test_only_an_admin_key_changes_the_membership(secure_cluster, keys):
    """A data client's key reads, writes and lists the members, but a change of them is
    refused (``PermissionDenied``, saying how to get an admin key) by whichever node it asks,
    the leader or a follower that would forward it, and nothing changes; the cluster's
    first client key, listed in ``admins/``, changes it."""
    from kvstore.client.members import Members
    from kvstore.transport import wire
    lc = secure_cluster
    r = subprocess.run([PYTHON, "-m", "kvstore.cli", "keygen", "--client", "bob", keys],
                       capture_output=True, env=child_env(), timeout=30)
    assert r.returncode == 0, r.stderr
    bob = os.path.join(keys, "bob.key_secret")
    deadline = time.monotonic() + 15  # each node rereads clients/ every 2 s, on its own
    for address in lc.address_list:
        while True:
            try:
                with kvstore.connect(address, timeout=5, keys=bob) as one:
                    one._core.call(wire.OP_STATUS, None, [], target=address)
                break
            except AuthenticationFailed:
                assert time.monotonic() < deadline, f"bob was never let in at {address}"
    c = kvstore.connect(lc.address_list, timeout=5, keys=bob)
    c.put(b"from-bob", b"1")
    try:
        members = Members(c)
        before = members.view()
        assert len(before.members()) == 3
        with pytest.raises(kvstore.PermissionDenied, match="admins/"):
            members.add("n4", f"tcp://127.0.0.1:{free_port()}")
        sh = before.shards[0]
        change = ["change", 0, sh.epoch, list(sh.voters), list(sh.learners) + [9], b"x"]
        for address in lc.address_list:  # the leader, and the followers that would forward
            with pytest.raises(kvstore.PermissionDenied):
                c._core.call(wire.OP_MEMBER, None, change, target=address)
        assert members.view().shards[0].epoch == sh.epoch
        assert c.get(b"from-bob") == b"1"
    finally:
        c.close()
    cli = subprocess.run([PYTHON, "-m", "kvstore.cli", "--cluster", ",".join(lc.address_list),
                          "member", "remove", "n3"],
                         capture_output=True, env={**child_env(), "KVSTORE_KEYS": bob},
                         timeout=60)
    assert cli.returncode != 0 and b"admin" in cli.stderr
    assert len(cli.stderr.decode().strip().splitlines()) == 1, cli.stderr
    with lc.client() as admin:  # the cluster's own client key is an admin
        members = Members(admin)
        members.add("n4", f"tcp://127.0.0.1:{free_port()}")
        assert "n4" in [m.name for m in members.view().members().values()]
        members.remove("n4")
        assert len(members.view().members()) == 3
