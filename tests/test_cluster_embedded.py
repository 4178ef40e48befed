"""``kvstore.open(dir, node_id=..., cluster=...)``: one node of a cluster inside this process,
two more as ``kvstore-server`` processes."""

from __future__ import annotations

import os

import pytest

import kvstore
from kvstore.server.local import LocalCluster
from conftest import child_env

pytestmark = pytest.mark.timeout(120)


def test_an_embedded_replica_joins_a_cluster_of_servers_and_serves_the_kv_interface(tmp_path):
    lc = LocalCluster(str(tmp_path / "c"), 3, 2, env=child_env())
    try:
        lc.start("n2")
        lc.start("n3")
        data = str(tmp_path / "c" / "n1")
        with kvstore.open(data, node_id="n1", cluster=lc.config_path) as db:
            assert isinstance(db, kvstore.KV)
            db.put(b"from-embedded", b"1")
            assert db.get(b"from-embedded") == b"1"
            with db.transaction() as t:
                t.put(b"t", b"x")
            # a transaction across both shards: two-phase commit, as from any client
            from kvstore.sharding import shard_of
            a = next(b"a%d" % i for i in range(99) if shard_of(b"a%d" % i, 2) == 0)
            b = next(b"b%d" % i for i in range(99) if shard_of(b"b%d" % i, 2) == 1)
            db.put(a, b"10")
            db.run_transaction(lambda t: (t.put(a, b"%d" % (int(t.get(a)) - 4)), t.put(b, b"4")))
            assert (db.get(a), db.get(b)) == (b"6", b"4")
            st = db.status()
            assert st["local_node"] == "n1" and len(st["shards"]) == 2
        with lc.client(names=["n2", "n3"]) as c:  # the servers have it without n1
            assert c.get(b"from-embedded") == b"1"
            c.put(b"while-n1-was-away", b"2")
        with kvstore.open(data, node_id="n1", cluster=lc.config_path) as db:  # it rejoins
            assert db.get(b"while-n1-was-away") == b"2"
        assert os.path.exists(os.path.join(data, "data.mdb"))
    finally:
        lc.close()


def test_an_embedded_replica_needs_both_arguments_and_a_known_node(tmp_path):
    with pytest.raises(kvstore.InvalidArgument, match="both"):
        kvstore.open(str(tmp_path / "x"), node_id="n1")
    cfg = tmp_path / "c.toml"
    cfg.write_text('[nodes.n1]\naddress = "tcp://127.0.0.1:1"\n')
    with pytest.raises(kvstore.InvalidArgument, match="no node 'n7'"):
        kvstore.open(str(tmp_path / "x"), node_id="n7", cluster=str(cfg))
