"""The node's side of membership changes, piece by piece (issue 23, item 1): the members'
``info`` checked like peer input, the membership in a shard's replicated state (applied,
installed with a snapshot, read back at start), the identity a data directory keeps, and
a Paxos frame from a node no membership names yet (taken only if it can be answered).
The whole, with real processes: ``tests/test_cluster_membership.py``."""

from __future__ import annotations

import time
from pathlib import Path

import msgpack
import pytest
import zmq

from kvstore._native import encode_record
from kvstore.errors import CorruptRecord, InvalidArgument
from kvstore.machine.replica import META_MEMBERSHIP, ShardWrite
from kvstore.node.loop import Node, NodeConfig
from kvstore.node.membership import read_identity, write_identity
from kvstore.node.storage import WalReplicaStorage
from kvstore.paxos import messages as M
from kvstore.paxos.ballot import EPOCH_SHIFT, make_ballot
from kvstore.paxos.membership import encode_membership
from kvstore.paxos.replica import KIND_CONFIG, Entry, Membership, Snapshot
from kvstore.server.local import free_port
from kvstore.transport import wire
from kvstore.transport.members import MAX_INFO_BYTES, Member, decode_info, encode_info
from kvstore.transport.sockets import peer_identity, shape_fingerprint

A = "tcp://127.0.0.1:7001"
P = "tcp://127.0.0.1:17001"


def test_info_round_trips():
    members = {0: Member("n1", A, P), 5: Member("n-6.x", "tcp://[::1]:7", "tcp://h:8")}
    assert decode_info(encode_info(members)) == members
    assert decode_info(b"") == {}


@pytest.mark.parametrize("raw, why", [
    (b"\xc1", "does not decode"),
    (msgpack.packb([1, 2]), "not a map"),
    (msgpack.packb({64: ["n", A, P]}), "index 64"),
    (msgpack.packb({-1: ["n", A, P]}), "index -1"),
    (msgpack.packb({"0": ["n", A, P]}), "index '0'"),
    (msgpack.packb({0: ["n", A]}), "not [name"),
    (msgpack.packb({0: ["n/1", A, P]}), "name"),
    (msgpack.packb({0: ["", A, P]}), "name"),
    (msgpack.packb({0: ["n", "http://x:1", P]}), "address"),
    (msgpack.packb({0: ["n", A, "tcp://h:70000"]}), "peer address"),
    (msgpack.packb({0: ["n", A, P], 1: ["n", "tcp://h:1", "tcp://h:2"]}), "both named n"),
    (msgpack.packb({0: ["n", A, P], 1: ["m", "tcp://h:1", A]}), "share the address"),
    (b"\x80" + b"x" * MAX_INFO_BYTES, "over"),
])
def test_bad_info_is_refused_with_a_reason(raw, why):
    with pytest.raises(ValueError, match=why.replace("[", r"\[")):
        decode_info(raw)


EPOCH1 = Membership(1, 1, (0, 1, 2), (3,), encode_info(
    {i: Member(f"n{i}", f"tcp://127.0.0.1:{7000 + i}", f"tcp://127.0.0.1:{17000 + i}")
     for i in range(4)}))


def test_an_applied_membership_change_is_in_the_replicated_state_after_a_restart(tmp_path):
    """The ``KIND_CONFIG`` entry at slot 0 applied: ``load`` hands its membership back, and
    again after a restart (from the log replayed, then from a checkpoint)."""
    ballot = make_ballot(1, 0)
    record = encode_record(0, ballot, KIND_CONFIG, encode_membership(EPOCH1))
    entry = Entry(0, ballot, KIND_CONFIG, [], membership=EPOCH1)
    st = WalReplicaStorage(str(tmp_path), 2)
    try:
        assert st.load(0).membership is None  # nothing changed yet: the bootstrap
        st.save([ShardWrite(0, ballot, 0, [record], committed=[entry])])
        assert st.load(0).membership == EPOCH1
        assert st.load(1).membership is None  # shards change on their own
    finally:
        st.close()
    for _ in range(2):
        st = WalReplicaStorage(str(tmp_path), 2)
        try:
            assert st.load(0).membership == EPOCH1
        finally:
            st.close()


def test_an_installed_snapshot_brings_its_membership(tmp_path):
    st = WalReplicaStorage(str(tmp_path), 1)
    try:
        data = msgpack.packb([[], []])
        st.save([ShardWrite(0, snapshot=Snapshot(9, data, EPOCH1))])
        assert st.load(0).membership == EPOCH1
        st.save([ShardWrite(0, snapshot=Snapshot(19, data, None))])  # an epoch-0 snapshot
        assert st.load(0).membership is None
    finally:
        st.close()


def test_a_membership_on_disk_that_is_not_one_is_refused(tmp_path):
    st = WalReplicaStorage(str(tmp_path), 1)
    try:
        st.storage.write(lambda txn: txn.put(META_MEMBERSHIP, msgpack.packb([1, 1, [], [], b""]),
                                             db=st.tables[0].meta))
        with pytest.raises(CorruptRecord, match="shard 0 .*membership"):
            st.load(0)
    finally:
        st.close()


def test_the_data_directory_keeps_the_cluster_identity_and_the_node_index(tmp_path):
    assert read_identity(str(tmp_path)) is None
    write_identity(str(tmp_path), b"\x01" * 8, 5, "n6")
    assert read_identity(str(tmp_path)) == (b"\x01" * 8, 5, "n6")
    (tmp_path / "cluster-id").write_text("zz 1 n1\n")
    with pytest.raises(InvalidArgument, match="does not hold a cluster identity"):
        read_identity(str(tmp_path))


@pytest.fixture
def node(tmp_path):
    names = ["n1", "n2"]
    cfg = NodeConfig(name="n1", names=names, shards=1, data_dir=str(tmp_path / "n1"),
                     addresses={n: f"tcp://127.0.0.1:{free_port()}" for n in names},
                     peer_addresses={n: f"tcp://127.0.0.1:{free_port()}" for n in names})
    n = Node(cfg)
    ctx = zmq.Context()
    links = []
    yield n, cfg, (ctx, links)
    for d in links:
        d.close(0)
    ctx.term()
    n.close()


def _send_from(node_cfg, ctx_links, n: Node, index: int, address: str = ""):
    """A heartbeat of epoch 1 from node ``index``, on a link presenting this cluster's
    shape (as any authenticated peer's: ``peer_identity``) with or without an address."""
    ctx, links = ctx_links
    d = ctx.socket(zmq.DEALER)
    links.append(d)  # open until the test ends: the frame is sent once it connects
    d.setsockopt(zmq.LINGER, 0)
    d.setsockopt(zmq.ROUTING_ID, peer_identity(index, 1, shape_fingerprint(1, n.cluster), address))
    d.connect(node_cfg.peer_address("n1"))
    m = M.Message(M.HEARTBEAT, 0, index, ballot=make_ballot((1 << EPOCH_SHIFT) + 1, index),
                  commit_index=-1)
    d.send(wire.encode_paxos(index, [(0, m)]))


def _turn_until(n: Node, check, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        n.turn()
        if check():
            return True
        time.sleep(0.01)
    return False


def test_a_frame_from_a_node_no_membership_names_is_taken_only_if_it_can_be_answered(node):
    n, cfg, ctx = node
    _send_from(cfg, ctx, n, 7)  # no address: it cannot be answered
    assert _turn_until(n, lambda: n.counters["dropped_unknown_peer"] >= 1)
    assert 7 not in n.sockets.peers
    back = f"tcp://127.0.0.1:{free_port()}"
    _send_from(cfg, ctx, n, 8, back)  # a member of a later epoch: linked, answered there
    assert _turn_until(n, lambda: 8 in n.sockets.peers)
    assert n.sockets._addresses[8] == back
    assert n.counters["dropped_unknown_peer"] == 1
    n._removed.add(9)  # an index this node saw removed stays refused
    _send_from(cfg, ctx, n, 9, f"tcp://127.0.0.1:{free_port()}")
    assert _turn_until(n, lambda: n.counters["dropped_unknown_peer"] >= 2)
    assert 9 not in n.sockets.peers


def test_a_directory_of_another_node_is_refused(node, tmp_path):
    n, cfg, _ctx = node
    n.close()
    other = NodeConfig(name="n2", names=cfg.names, shards=1, data_dir=cfg.data_dir,
                       addresses=cfg.addresses, peer_addresses=cfg.peer_addresses)
    with pytest.raises(InvalidArgument, match="is node n1's, not n2's"):
        Node(other)


def test_cluster_toml_counts_at_the_first_start_only(node):
    """Before any membership change too: a file naming other members (another address) is
    refused; the same members in another order change nothing (the directory keeps the
    node's index and each shard's first membership)."""
    n, cfg, _ctx = node
    n.close()
    moved = NodeConfig(name="n1", names=cfg.names, shards=1, data_dir=cfg.data_dir,
                       addresses={**cfg.addresses, "n2": f"tcp://127.0.0.1:{free_port()}"},
                       peer_addresses=cfg.peer_addresses)
    with pytest.raises(InvalidArgument, match="only bootstraps a new cluster; the members are now"):
        Node(moved)
    reordered = NodeConfig(name="n1", names=["n2", "n1"], shards=1, data_dir=cfg.data_dir,
                           addresses=cfg.addresses, peer_addresses=cfg.peer_addresses)
    again = Node(reordered)
    try:
        assert again.index == 0
        assert again.replicas[0].membership.voters == (0, 1)
        assert again.members[0].name == "n1" and again.members[1].name == "n2"
    finally:
        again.close()


def test_a_damaged_record_of_the_first_memberships_is_refused(node):
    n, cfg, _ctx = node
    n.close()
    (Path(cfg.data_dir) / "start-memberships").write_bytes(msgpack.packb([[0, 0, [], [], b""]]))
    with pytest.raises(InvalidArgument, match="does not hold the shards' first memberships"):
        Node(cfg)


def test_a_join_file_names_how_to_reach_the_cluster_and_nothing_of_its_members(tmp_path):
    from kvstore.node.config import join_settings
    path = tmp_path / "join.toml"
    path.write_text('join = ["tcp://10.0.0.1:7001", "tcp://10.0.0.2:7001"]\n[tuning]\ntick_ms = 20\n')
    assert join_settings(str(path)) == ("tcp://10.0.0.1:7001,tcp://10.0.0.2:7001",
                                        {"tick_seconds": 0.02, "curve_keys": None})
    path.write_text('join = "tcp://10.0.0.1:7001"\n[nodes.n1]\naddress = "tcp://10.0.0.1:7001"\n')
    with pytest.raises(InvalidArgument, match="not nodes"):
        join_settings(str(path))
    path.write_text('join = "10.0.0.1:7001"\n')
    with pytest.raises(InvalidArgument, match="join must list client addresses"):
        join_settings(str(path))
    path.write_text('shards = 1\n[nodes.n1]\naddress = "tcp://10.0.0.1:7001"\n')
    assert join_settings(str(path)) is None  # a cluster.toml


def test_bootstrap_indexes_are_the_names_sorted_as_before_membership_changes(tmp_path):
    """A directory written before memberships could change knows its node by the index of
    its name among the names sorted; a cluster.toml listing them in another order must give
    the same indexes, or an upgraded node would answer to another node's votes."""
    from kvstore.node.config import load_node_config
    from kvstore.node.membership import bootstrap_info
    from kvstore.transport.members import decode_info
    path = tmp_path / "cluster.toml"
    path.write_text('[nodes.zeta]\naddress = "tcp://127.0.0.1:7003"\n'
                    '[nodes.alpha]\naddress = "tcp://127.0.0.1:7001"\n'
                    '[nodes.mid]\naddress = "tcp://127.0.0.1:7002"\n')
    cfg = load_node_config(str(path), "zeta", data=str(tmp_path / "d"))
    assert cfg.index == 2 and cfg.names == ["alpha", "mid", "zeta"]
    info = decode_info(bootstrap_info(cfg))
    assert [info[i].name for i in sorted(info)] == ["alpha", "mid", "zeta"]
