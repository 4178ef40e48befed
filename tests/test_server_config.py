"""The [tuning] table of cluster.toml: lease reads are set there, and checked against the
election timeout before any node starts."""

from __future__ import annotations

import pytest

from kvstore.errors import InvalidArgument
from kvstore.server_config import load_node_config


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
