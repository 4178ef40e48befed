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
from kvstore.node import Node, NodeConfig
from kvstore.server_local import free_port
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
    cfg.write_text(f'[nodes.n1]\naddress = "{address}"\ndata = "n1"\n'
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
