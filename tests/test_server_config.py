"""The [tuning] table of cluster.toml: lease reads are set there, and checked against the
election timeout before any node starts."""

from __future__ import annotations

import pytest

from kvstore.errors import InvalidArgument
from kvstore.node.config import load_node_config


def write_config(tmp_path, tuning: str) -> str:
    path = tmp_path / "cluster.toml"
    path.write_text('[nodes.n1]\naddress = "tcp://127.0.0.1:7001"\n[tuning]\n' + tuning)
    return str(path)


def test_lease_reads_are_off_unless_set(tmp_path):
    assert load_node_config(write_config(tmp_path, "tick_ms = 10\n"), "n1", data=str(tmp_path)).lease_read_ticks == 0
    assert load_node_config(write_config(tmp_path, "lease_read_ticks = 0\n"), "n1",
                            data=str(tmp_path)).lease_read_ticks == 0
    config = load_node_config(write_config(tmp_path, "lease_read_ticks = 20\n"), "n1", data=str(tmp_path))
    assert config.lease_read_ticks == 20


@pytest.mark.parametrize("tuning", ["lease_read_ticks = 29\n",
                                    "election_timeout_ticks = 10\nlease_read_ticks = 9\n",
                                    "lease_read_ticks = -1\n"])
def test_a_lease_not_shorter_than_the_election_timeout_is_refused(tmp_path, tuning):
    with pytest.raises(InvalidArgument, match="lease_read_ticks"):
        load_node_config(write_config(tmp_path, tuning), "n1", data=str(tmp_path))


def test_the_peer_address_is_the_client_port_plus_10000_unless_given(tmp_path):
    path = tmp_path / "cluster.toml"
    path.write_text('[nodes.n1]\naddress = "tcp://127.0.0.1:7001"\n'
                    '[nodes.n2]\naddress = "tcp://127.0.0.1:7002"\n'
                    'peer_address = "tcp://127.0.0.1:9002"\n')
    config = load_node_config(str(path), "n1", data=str(tmp_path))
    assert config.peer_addresses == {"n1": "tcp://127.0.0.1:17001", "n2": "tcp://127.0.0.1:9002"}
    assert config.peer_address("n2") == "tcp://127.0.0.1:9002"
    # a client port the kernel might hand out for port 0 (up to 60999): minus, not plus
    path.write_text('[nodes.n1]\naddress = "tcp://127.0.0.1:58000"\n')
    assert load_node_config(str(path), "n1", data=str(tmp_path)).peer_address("n1") == \
        "tcp://127.0.0.1:48000"


@pytest.mark.parametrize("nodes, error", [
    ('[nodes.n1]\naddress = "tcp://127.0.0.1:60000"\n'
     '[nodes.n2]\naddress = "tcp://127.0.0.1:50000"\n',
     "share the address tcp://127.0.0.1:50000"),
    ('[nodes.n1]\naddress = "tcp://127.0.0.1:7001"\n'
     '[nodes.n2]\naddress = "tcp://127.0.0.1:17001"\n',
     "share the address tcp://127.0.0.1:17001"),
    ('[nodes.n1]\naddress = "tcp://127.0.0.1:7001"\npeer_address = "localhost"\n',
     "peer_address must look like"),
])
def test_a_peer_address_that_cannot_be_is_a_config_error_in_one_line(tmp_path, nodes, error):
    import subprocess
    from conftest import PYTHON, child_env
    path = tmp_path / "cluster.toml"
    path.write_text(nodes)
    with pytest.raises(InvalidArgument, match=error):
        load_node_config(str(path), "n1", data=str(tmp_path))
    r = subprocess.run([PYTHON, "-m", "kvstore.server", "--config", str(path), "--id", "n1",
                        "--data", str(tmp_path / "d")], capture_output=True, text=True,
                       env=child_env(), timeout=30)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and error in r.stderr
