"""Hostile clients against real ``kvstore-server`` processes: clients are not nodes.

A plain ZeroMQ DEALER on a node's client port speaks the peer protocol (a
Heartbeat at a ballot near 2**64, an Accept of a poisoned record, an empty
Snapshot), sends a message of a million parts, or asks for answers it never
reads; a node whose cluster.toml names another shard count joins. Every node
stays up, every acknowledged value stays readable, the cluster keeps serving,
and the node's memory stays within the bound argued in
``kvstore.transport.sockets``.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time

import msgpack
import pytest
import zmq

import kvstore
from kvstore._native import encode_record
from kvstore.commands import OP_PUT
from kvstore.paxos import messages as M
from kvstore.paxos.messages import Message
from kvstore.server.local import LocalCluster
from kvstore.transport import wire
from kvstore.transport.sockets import CLIENT_QUEUED_BYTES_MAX
from conftest import PYTHON, child_env

pytestmark = pytest.mark.timeout(120)

HUGE_BALLOT = ((1 << 48) - 2) << 16  # round 2**48 - 2: one increment from overflowing u64


@pytest.fixture
def cluster(tmp_path):
    clusters = []

    def make(nodes=3, shards=1, **kwargs):
        lc = LocalCluster(str(tmp_path / f"c{len(clusters)}"), nodes, shards, env=child_env(),
                          **kwargs)
        clusters.append(lc)
        return lc

    yield make
    for lc in clusters:
        lc.close()


class Raw:
    """A bare DEALER (optionally with Curve keys) that sends whatever it is given."""

    def __init__(self, address: str, keys=None, rcvhwm: int = 1000) -> None:
        self.ctx = zmq.Context()
        self.s = self.ctx.socket(zmq.DEALER)
        if keys is not None:
            keys.make_client(self.s)
        self.s.setsockopt(zmq.LINGER, 0)
        self.s.setsockopt(zmq.RCVHWM, rcvhwm)
        self.s.setsockopt(zmq.SNDHWM, 100_000)
        self.s.connect(address)

    def close(self) -> None:
        self.s.close(0)
        self.ctx.term()


def forged_peer_frames(frm: int, to: int) -> list:
    """What a hostile client sends as if it were node ``frm``: each of these, taken by a
    node, once crashed it, poisoned its log or wiped its state."""
    poison = encode_record(0, HUGE_BALLOT | frm, 0, b"\xc1")
    return [
        wire.encode_paxos(frm, [(0, Message(M.HEARTBEAT, to, frm, ballot=HUGE_BALLOT | frm,
                                            commit_index=0))]),
        wire.encode_paxos(frm, [(0, Message(M.ACCEPT, to, frm, ballot=HUGE_BALLOT | frm,
                                            records=(poison,)))]),
        wire.encode_paxos(frm, [(0, Message(M.SNAPSHOT, to, frm, ballot=HUGE_BALLOT | frm,
                                            snapshot_index=10**6, offset=0, size=1,
                                            data=b"\x90", done=True))]),
        wire.encode_forward(frm, [(1, wire.OP_WRITE, [0, b"evil", 1, 1, [0, b"k0", b"forged"]])]),
    ]


def zmtp_many_parts(address: str, parts: int):
    """A TCP connection that speaks ZMTP 3.0 as a DEALER (NULL security) and sends one
    message of ``parts`` empty parts: built as bytes, so that the attacker costs this
    machine nothing (pyzmq takes seconds to build a million frames)."""
    import socket
    host, port = address[len("tcp://"):].rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=10)
    greeting = b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\x00") \
        + b"\x00" + b"\x00" * 31
    ready = b"\x05READY" + b"\x0bSocket-Type" + (6).to_bytes(4, "big") + b"DEALER"
    s.sendall(greeting + b"\x04" + bytes([len(ready)]) + ready)
    try:
        s.sendall(b"\x01\x00" * (parts - 1) + b"\x00\x00")
    except (ConnectionResetError, BrokenPipeError):
        s.close()
        return None  # the node cut the attacker off before the message was whole
    return s


def node_status(address: str, keys=None, timeout: float = 5.0) -> dict:
    """A node's own status, asked on its client port."""
    raw = Raw(address, keys)
    try:
        raw.s.send(wire.encode_request(1, wire.OP_STATUS, []))
        assert raw.s.poll(int(timeout * 1000)), f"{address} did not answer its status"
        body = wire.decode(raw.s.recv())
        return body[1][0][2]
    finally:
        raw.close()


def wait_for(predicate, timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout} s: {what}")


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_peer_frames_on_the_client_port_are_dropped_and_the_cluster_serves(cluster):
    lc = cluster()
    lc.start_all()
    lc.wait_ready()
    with lc.client() as c:
        for i in range(20):
            c.put(b"k%d" % i, b"v%d" % i)
        ballots = {s["ballot"] for n in lc.names
                   for s in node_status(lc.addresses[n])["shards"]}
    def acted_on(name) -> bool:  # dropped (a frame the decoder refuses counts as malformed)
        if name not in lc.running():  # or taken: the node died of it
            return True
        st = node_status(lc.addresses[name])
        counters = st["counters"]
        return (counters.get("dropped_peer_frame_from_client", 0)
                + counters.get("dropped_malformed", 0) >= 4
                or {s["ballot"] for s in st["shards"]} != ballots)

    for to, name in enumerate(lc.names):
        raw = Raw(lc.addresses[name])
        try:
            for frame in forged_peer_frames((to + 1) % 3, to):
                raw.s.send(frame)
            wait_for(lambda: acted_on(name), what=f"{name} took the frames")
        finally:
            raw.close()
    # Nothing moved: every node up, at the ballots it had, and serving every acknowledged value.
    assert lc.running() == lc.names
    assert {s["ballot"] for n in lc.names
            for s in node_status(lc.addresses[n])["shards"]} == ballots
    with lc.client() as c:
        assert [c.get(b"k%d" % i) for i in range(20)] == [b"v%d" % i for i in range(20)]
        c.put(b"after", b"ok")
        assert c.get(b"after") == b"ok"


def test_a_connection_that_is_no_peer_is_not_heard_on_the_peer_port(cluster):
    """Without Curve the peer port trusts its network (the README says so), but a plain
    connection that does not present a peer's routing id of this cluster's shape is
    still dropped before its frames are decoded."""
    lc = cluster()
    lc.start_all()
    lc.wait_ready()
    with lc.client() as c:
        c.put(b"k", b"v")
    raw = Raw(lc.peer_addresses["n1"])
    try:
        for frame in forged_peer_frames(1, 0):
            raw.s.send(frame)
        wait_for(lambda: node_status(lc.addresses["n1"])["counters"].get(
            "dropped_not_a_peer", 0) >= 4, what="n1 dropped the frames")
    finally:
        raw.close()
    assert lc.running() == lc.names
    with lc.client() as c:
        assert c.get(b"k") == b"v"


def test_a_client_that_never_reads_its_replies_is_cut_off_in_bytes(cluster):
    """300 scans of a 4 MiB answer, never read: the node keeps about its per-client
    budget (32 MiB) for that client and drops the rest (once: +1.9 GB of RSS)."""
    lc = cluster(nodes=1)
    lc.start_all()
    lc.wait_ready()
    with lc.client() as c:
        for i in range(4):
            c.put(b"big/%d" % i, bytes([i]) * (1024 * 1024 - 64))
    pid = lc.procs["n1"].pid
    before = rss_bytes(pid)
    raw = Raw(lc.addresses["n1"], rcvhwm=1)  # reads nothing: libzmq holds one message
    try:
        for i in range(300):
            raw.s.send(wire.encode_request(i, wire.OP_SCAN, [0, b"big/", b"big0", None, False]))
        # (with KVSTORE_PURE=1 the node verifies the 32 MiB of answers it computes in
        # pure Python first: ~20 s on a busy machine, before it answers anything else)
        wait_for(lambda: node_status(lc.addresses["n1"], timeout=60)["counters"].get(
            "dropped_reply_slow_client", 0) >= 250, timeout=60,
            what="the unread replies were dropped")
        grown = rss_bytes(pid) - before
        assert grown < CLIENT_QUEUED_BYTES_MAX + 64 * 1024 * 1024, f"RSS grew {grown} bytes"
        with lc.client() as c:  # and it serves everyone else meanwhile
            assert len(c.scan(b"big/")) == 4
    finally:
        raw.close()


def test_big_inbound_frames_on_the_client_port_cost_the_node_little(cluster):
    """30 frames of 60 MB from two connections (once: +1.2-1.8 GB and elections): the
    client port refuses a frame over 16 MiB before buffering it, so the node's RSS
    barely moves and it keeps answering."""
    lc = cluster(nodes=1)
    lc.start_all()
    lc.wait_ready()
    pid = lc.procs["n1"].pid
    before = rss_bytes(pid)
    junk = b"\x01" + b"\x00" * (60 * 1000 * 1000)
    raws = [Raw(lc.addresses["n1"]), Raw(lc.addresses["n1"])]
    try:
        for i in range(30):
            raws[i % 2].s.send(junk, copy=False)
        t = time.monotonic()
        with lc.client() as c:
            c.put(b"k", b"v")
            assert c.get(b"k") == b"v"
        assert time.monotonic() - t < 5
    finally:
        for raw in raws:
            raw.close()
    grown = rss_bytes(pid) - before
    assert grown < 64 * 1024 * 1024, f"RSS grew {grown} bytes"


def test_a_message_of_many_parts_does_not_stall_the_node(cluster):
    """One message of 300,000 empty parts to the leader's client port (once: a node
    stalled 6-10 s): dropped a bounded number of parts per loop turn, so the leader keeps
    its shard (no election) and serves its peers meanwhile: writes sent to a follower,
    which forwards them to the leader on the peer socket, are answered promptly."""
    lc = cluster()
    lc.start_all()
    st = lc.wait_ready()
    leader = st["shards"][0]["leader"]
    follower = next(n for n in lc.names if n != leader)
    ballot = next(s["ballot"] for s in node_status(lc.addresses[leader])["shards"])
    latencies: list = []
    stop = threading.Event()

    def writer() -> None:  # a bare client: always through the follower, never the leader
        raw = Raw(lc.addresses[follower])
        try:
            seq = 0
            while not stop.is_set():
                seq += 1
                t = time.monotonic()
                raw.s.send(wire.encode_request(seq, wire.OP_WRITE,
                                               [0, b"writer", seq, seq, [OP_PUT, b"w", b"x"]]))
                assert raw.s.poll(10_000), "a forwarded write was not answered within 10 s"
                body = wire.decode(raw.s.recv())
                if body[1][0][1] == wire.STATUS_OK_FORWARDED:  # else: not settled yet, again
                    latencies.append(time.monotonic() - t)
        finally:
            raw.close()

    w = threading.Thread(target=writer)
    w.start()
    attacker = None
    try:
        wait_for(lambda: len(latencies) > 20, what="the writer started")
        attacker = zmtp_many_parts(lc.addresses[leader], 300_000)
        n = len(latencies)
        # the node drains the parts a bounded number per turn, or libzmq resets the
        # connection first (it did, in some runs): either way what must hold is that the
        # writes forwarded to the leader go on promptly and no election happens
        wait_for(lambda: len(latencies) > n + 20, what="writes went on after the attack")
        node_status(lc.addresses[leader], timeout=60)  # its own client port answers again
    finally:
        stop.set()
        w.join(30)
        if attacker is not None:
            attacker.close()
    assert not w.is_alive() and len(latencies) > n
    assert next(s["ballot"] for s in node_status(lc.addresses[leader])["shards"]) == ballot
    assert max(latencies) < 0.5, f"a write waited {max(latencies):.2f} s"


def test_a_node_with_another_shard_count_is_refused_and_status_says_so(cluster, tmp_path):
    lc = cluster(shards=3)
    with open(lc.config_path) as f:
        text = f.read()
    other = os.path.join(lc.directory, "n3-two-shards.toml")
    with open(other, "w") as f:
        f.write(text.replace("shards = 3", "shards = 2", 1))
    lc.start("n1")
    lc.start("n2")
    log = open(lc.log_path("n3"), "ab")
    n3 = subprocess.Popen([PYTHON, "-m", "kvstore.server", "--config", other, "--id", "n3"],
                          stdout=log, stderr=log, env=child_env(), cwd=lc.directory)
    try:
        lc.wait_ready(names=["n1", "n2"])
        wait_for(lambda: "has 2 shard(s) and this node 3" in lc.tail("n1", 200),
                 what="n1 refused n3: " + lc.tail("n1"))
        wait_for(lambda: "has 3 shard(s) and this node 2" in lc.tail("n3", 200),
                 what="n3 refused its peers: " + lc.tail("n3"))
        with lc.client(names=["n1", "n2"]) as c:
            c.put(b"k", b"v")
        addrs = ",".join(lc.address_list)
        r = subprocess.run([PYTHON, "-m", "kvstore.cli", "status", "--cluster", addrs],
                           capture_output=True, text=True, env=child_env(), timeout=60)
        assert r.returncode == 2, (r.stdout, r.stderr)
        assert "unexpected error" not in r.stderr
        assert "n3 at" in r.stderr and "reports 2 shard(s) where the cluster has 3" in r.stderr
        assert "mismatch" in r.stdout
    finally:
        n3.kill()
        n3.wait(10)
        log.close()
