"""Issue 18's Paxos attacks against real ``kvstore-server`` processes, sent as a peer would.

Each test writes acknowledged keys to a 3-node cluster, sends forged Paxos frames
to every node's peer socket, then makes the cluster elect again (the leader is
killed: the next campaign is where a promised ballot near 2**64 overflowed, and
where a new leader re-proposes what it was shown) and restarts every node (where a
poisoned log failed every start). Throughout: every node stays up, every
acknowledged value stays readable from every node, and the cluster keeps serving.

Every wait is bounded; every process is killed at teardown.
"""

from __future__ import annotations

import signal

import msgpack
import pytest
import zmq

from kvstore._native import encode_record
from kvstore.paxos import messages as M
from kvstore.paxos.ballot import make_ballot
from kvstore.paxos.messages import Message
from kvstore.server_config import read_toml
from kvstore.server_local import LocalCluster
from kvstore.transport import wire
from conftest import child_env

pytestmark = pytest.mark.timeout(180)

KEYS = [b"acked-%02d" % i for i in range(12)]


def peer_address(lc: LocalCluster, name: str) -> str:
    """The socket of node ``name`` that accepts PAXOS frames, read from the cluster's
    config: the one place to change when peers get a port of their own (issue 18,
    part A); a node's ``peer_address`` if the config has one, else its one address."""
    table = read_toml(lc.config_path)["nodes"][name]
    return table.get("peer_address") or table["address"]


class Peer:
    """A DEALER speaking the peer protocol to every node of ``lc``: frames as a node's."""

    def __init__(self, lc: LocalCluster) -> None:
        self.lc = lc
        self.ctx = zmq.Context()
        self.sockets = {}
        for name in lc.names:
            s = self.ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(peer_address(lc, name))
            self.sockets[name] = s
        self.statuses = {}

    def send(self, name: str, frm: int, m: Message, shard: int = 0) -> None:
        self.sockets[name].send(wire.encode_paxos(frm, [(shard, m)]))

    def status(self, name: str) -> dict:
        """The node's status, asked on its client address."""
        s = self.ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(self.lc.addresses[name])
        try:
            s.send(wire.encode_request(1, wire.OP_STATUS, []))
            assert s.poll(10_000), f"{name} did not answer a status request"
            (_rid, status, value), = wire.decode(s.recv())[1]
            assert status == wire.STATUS_OK
            return value
        finally:
            s.close(0)

    def close(self) -> None:
        for s in self.sockets.values():
            s.close(0)
        self.ctx.term()


@pytest.fixture
def attacked(tmp_path):
    """A running 3-node cluster holding ``KEYS`` (acknowledged), and a Peer on it."""
    lc = LocalCluster(str(tmp_path / "c"), 3, 1, env=child_env())
    peer = None
    try:
        lc.start_all()
        lc.wait_ready()
        with lc.client() as c:
            for k in KEYS:
                c.put(k, b"value of " + k)
        peer = Peer(lc)
        yield lc, peer
    finally:
        if peer is not None:
            peer.close()
        lc.close()


def index_of(lc: LocalCluster, name: str) -> int:
    return lc.names.index(name)


def leader_now(lc: LocalCluster) -> str:
    return lc.wait_ready()["shards"][0]["leader"]


def assert_every_node_up_and_every_value_readable(lc: LocalCluster, tag: bytes) -> None:
    """Every node runs; each serves every acknowledged key (a linearizable get asked of
    it, served from its own state) and a new write."""
    assert sorted(lc.running()) == lc.names, [lc.tail(n) for n in lc.names if n not in lc.running()]
    lc.wait_ready()
    for name in lc.names:
        with lc.client(names=[name], timeout=10.0) as c:
            c.put(b"after-" + tag + name.encode(), b"ok")
        # the node's own answer: a get sent to it alone, never redirected (raw request)
        with Raw(lc.addresses[name]) as raw:
            for k in KEYS:
                assert raw.get(k) == b"value of " + k, f"{name} lost {k!r}"


class Raw:
    """A bare client DEALER to one node: a get it answers itself (or with a retry)."""

    def __init__(self, address: str) -> None:
        self.ctx = zmq.Context()
        self.s = self.ctx.socket(zmq.DEALER)
        self.s.setsockopt(zmq.LINGER, 0)
        self.s.connect(address)
        self.ids = 0

    def get(self, key: bytes, attempts: int = 50):
        for _ in range(attempts):
            self.ids += 1
            self.s.send(wire.encode_request(self.ids, wire.OP_GET, [0, key, False]))
            assert self.s.poll(10_000), "no reply"
            (_rid, status, value), = wire.decode(self.s.recv())[1]
            if status in (wire.STATUS_OK, wire.STATUS_OK_FORWARDED):
                return value if status == wire.STATUS_OK else value[0]
            assert status in (wire.STATUS_RETRY, wire.STATUS_NOT_LEADER), value
            self.s.poll(100)  # a leader is being elected: ask again shortly
        raise AssertionError(f"no answer for {key!r} in {attempts} attempts")

    def __enter__(self) -> "Raw":
        return self

    def __exit__(self, *exc) -> None:
        self.s.close(0)
        self.ctx.term()


def elect_again_and_restart_all(lc: LocalCluster, tag: bytes) -> None:
    """Kill the leader (the others campaign, a new leader re-proposes), check, start it
    again, check; then restart every node on its data and check once more."""
    old = leader_now(lc)
    lc.kill(old, signal.SIGKILL)
    lc.wait_ready(names=[n for n in lc.names if n != old])
    lc.start(old)
    assert_every_node_up_and_every_value_readable(lc, tag + b"-elected-")
    codes = lc.stop_all()
    assert set(codes.values()) == {0}, codes
    lc.start_all()
    assert_every_node_up_and_every_value_readable(lc, tag + b"-restarted-")


def dropped(status: dict) -> int:
    """Frames and messages a node refused, as its counters say."""
    counters = status["counters"]
    return counters.get("dropped_malformed", 0) + counters.get("dropped_invalid", 0)


def round_of(status: dict) -> int:
    return int(status["shards"][0]["ballot"].split(".")[0])


def test_a_heartbeat_with_a_ballot_near_2_64_crashes_no_node(attacked):
    """Attack 1: a follower promised the ballot, the next campaign's overflowed msgpack,
    and the node that promised crashed again at every restart."""
    lc, peer = attacked
    top = (1 << 64) - 1
    for name in lc.names:
        me = index_of(lc, name)
        other = (me + 1) % 3
        for ballot in (top, top - 0xFFFF + other, (1 << 62) | other, ((1 << 46) << 16) | other,
                       make_ballot(round_of(peer.status(name)) + (1 << 33), other)):
            peer.send(name, other, Message(M.HEARTBEAT, me, other, ballot=ballot, commit_index=-1))
            peer.send(name, other, Message(M.PREPARE, me, other, ballot=ballot, commit_index=-1))
        peer.send(name, other, Message(M.PROMISE, me, other, ballot=1 << 16, reject=True, hint=top))
    for name in lc.names:
        st = peer.status(name)
        assert round_of(st) < 1 << 20, f"{name} took the forged ballot"
        assert dropped(st) >= 1  # refused at decode, and counted
    elect_again_and_restart_all(lc, b"ballot")


def test_a_record_that_is_not_a_command_batch_is_never_accepted(attacked):
    """Attack 2: an Accept at a higher ballot with a valid CRC and payload 0xc1 was
    accepted, re-proposed by the next leader, and failed a majority at every restart."""
    lc, peer = attacked
    for name in lc.names:
        me = index_of(lc, name)
        st = peer.status(name)
        commit = st["shards"][0]["commit_index"]
        for other in {(me + 1) % 3, (me + 2) % 3}:
            b = make_ballot(round_of(st) + 1 + other, other)
            for payload in (b"\xc1", msgpack.packb([b"\xc1"]), msgpack.packb([msgpack.packb([b"c", 1, 0, [99]])])):
                records = tuple(encode_record(slot, b, 1, payload) for slot in range(commit + 1, commit + 4))
                peer.send(name, other, Message(M.ACCEPT, me, other, ballot=b, commit_index=commit,
                                               records=records))
                peer.send(name, other, Message(M.ACCEPT, me, other, ballot=b, commit_index=commit + 3,
                                               records=records))
    for name in lc.names:
        st = peer.status(name)
        assert round_of(st) < 1 << 20
        assert dropped(st) >= 6
    elect_again_and_restart_all(lc, b"payload")


def test_a_forged_snapshot_wipes_no_follower(attacked):
    """Attack 3: one chunk 'from the leader' holding an empty state was installed (any
    sender at any ballot), and the follower's acknowledged keys read back as missing.
    Refused now: from another node than the leader of the ballot the follower promised,
    at another ballot than that one, or with a state that does not decode. (A chunk that
    is the leader's in every field but its bytes is impersonation: the transport's
    authentication keeps non-peers off the peer socket, issue 18 part A.)"""
    lc, peer = attacked
    leader = leader_now(lc)
    lead = index_of(lc, leader)
    empty = msgpack.packb([[], []], use_bin_type=True)
    for name in lc.names:
        if name == leader:
            continue
        me = index_of(lc, name)
        st = peer.status(name)
        promised = make_ballot(*map(int, st["shards"][0]["ballot"].split(".")))
        index = st["shards"][0]["commit_index"] + 1000
        other = 3 - me - lead
        forged = [(lead, 0, empty), (lead, make_ballot(round_of(st) + 1, lead), empty),
                  (lead, make_ballot(max(round_of(st) - 1, 0), lead), empty), (other, promised, empty),
                  (other, make_ballot(round_of(st) + 1, other), empty),
                  (lead, promised, b"\xc1"), (lead, promised, msgpack.packb([[[1, 2]], []]))]
        for frm, ballot, data in forged:
            peer.send(name, frm, Message(M.SNAPSHOT, me, frm, ballot=ballot, snapshot_index=index,
                                         offset=0, size=len(data), data=data, done=True))
        assert peer.status(name)["shards"][0]["commit_index"] < index, f"{name} installed a forged snapshot"
    assert_every_node_up_and_every_value_readable(lc, b"snapshot-")
    elect_again_and_restart_all(lc, b"snapshot")
