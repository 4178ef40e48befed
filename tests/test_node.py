"""One node in this process (a thread): junk on its port, bad requests, sessions,
transactions, restart on its directory, and the storage interface behind it."""

from __future__ import annotations

import random
import threading
import time

import msgpack
import pytest
import zmq

import kvstore
from kvstore.commands import OP_CAS, OP_PUT
from kvstore.node.loop import Node, NodeConfig
from kvstore.paxos.replica import KIND_BATCH, Entry
from kvstore.commands import encode_client_command
from kvstore.machine.replica import ShardWrite
from kvstore.node.storage import WalReplicaStorage
from kvstore._native import encode_record
from kvstore.server.local import free_port
from kvstore.transport import wire


class RunningNode:
    def __init__(self, data_dir: str, shards: int = 1, address: str | None = None,
                 peer_address: str | None = None) -> None:
        self.address = address or f"tcp://127.0.0.1:{free_port()}"
        self.peer_address = peer_address or f"tcp://127.0.0.1:{free_port()}"
        cfg = NodeConfig(name="n1", names=["n1"], addresses={"n1": self.address},
                         peer_addresses={"n1": self.peer_address},
                         shards=shards, data_dir=data_dir)
        self.node = Node(cfg)
        self.thread = threading.Thread(target=self.node.run, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.node.stop()
        self.thread.join(10)
        assert not self.thread.is_alive()


@pytest.fixture
def start_node(tmp_path):
    nodes = []

    def start(shards=1, name="d", address=None, peer_address=None):
        n = RunningNode(str(tmp_path / name), shards, address, peer_address)
        nodes.append(n)
        return n

    yield start
    for n in nodes:
        if n.thread.is_alive():
            n.stop()


class Raw:
    """A bare DEALER speaking the wire format, for what the client never sends."""

    def __init__(self, address: str) -> None:
        self.ctx = zmq.Context()
        self.s = self.ctx.socket(zmq.DEALER)
        self.s.setsockopt(zmq.LINGER, 0)
        self.s.connect(address)
        self.ids = 0

    def request(self, op, args, timeout_ms=5000):
        self.ids += 1
        self.s.send(wire.encode_request(self.ids, op, args))
        assert self.s.poll(timeout_ms), "no reply"
        body = wire.decode(self.s.recv())
        assert body[0] == wire.REPLIES and len(body[1]) == 1
        request_id, status, value = body[1][0]
        assert request_id == self.ids
        return status, value

    def close(self):
        self.s.close(0)
        self.ctx.term()


def test_junk_frames_never_crash_a_node(start_node):
    n = start_node()
    rng = random.Random(7)
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(n.address)
    try:
        junk = [b"", b"\x01", b"\x02garbage", b"\x01" + msgpack.packb([99, 1]),
                b"\x01" + msgpack.packb([wire.PAXOS, 5, [[0, [1, 2]]]]),
                b"\x01" + msgpack.packb([wire.PAXOS, 0, [[0, [0] * 15]]]),  # from itself
                b"\x01" + msgpack.packb([wire.REPLY, 1, 0, None]),
                b"\x01" + b"\xdb\xff\xff\xff\xff",  # a str claiming 4 GiB
                b"\x01" + b"\xdd\xff\xff\xff\xff"]  # an array claiming 4 billion items
        junk += [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))) for _ in range(300)]
        for frame in junk:
            s.send(frame)
        s.send_multipart([b"a", b"b", b"c"])
        # on the same connection, so it arrives after every junk frame above
        s.send(wire.encode_request(1, wire.OP_STATUS, []))
        assert s.poll(10_000), "no answer after the junk"
        body = wire.decode(s.recv())
        (request_id, status, value), = body[1]
        assert status == wire.STATUS_OK
        counters = value["counters"]
        assert sum(v for k, v in counters.items() if k.startswith("dropped")) >= len(junk) - 1
        with kvstore.connect(n.address, timeout=5) as c:
            c.put(b"still", b"alive")
            assert c.get(b"still") == b"alive"
    finally:
        s.close(0)
        ctx.term()


def test_an_oversized_frame_is_refused_by_the_socket(start_node):
    n = start_node()
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(n.address)
    try:
        s.send(b"\x01" + b"\x00" * (wire.MAX_PEER_FRAME_BYTES + 10))
        with kvstore.connect(n.address, timeout=5) as c:
            c.put(b"k", b"v")
            assert c.get(b"k") == b"v"
    finally:
        s.close(0)
        ctx.term()


def test_bad_requests_get_an_error_not_a_crash(start_node):
    n = start_node(shards=2)
    raw = Raw(n.address)
    try:
        for op, args in [(wire.OP_GET, []), (wire.OP_GET, [9, b"k", False]),
                         (wire.OP_GET, [0, b"", False]), (wire.OP_SCAN, [0, 1, 2, 3, 4]),
                         (wire.OP_WRITE, [0, b"c", 1, 1, [OP_PUT, b"k"]]),
                         (wire.OP_WRITE, [0, b"c", 1, 2, [OP_PUT, b"k", b"v"]]),
                         (wire.OP_WRITE, [0, b"c", 1, 1, [99, b"k"]]),
                         (wire.OP_WRITE, [0, b"c", 1, 1, [OP_PUT, b"k" * 600, b"v"]])]:
            status, value = raw.request(op, args)
            assert status == wire.STATUS_ERROR, (op, args, value)
            assert value[0] == "InvalidArgument"
        # a key sent to the wrong shard is refused, not stored where no reader looks
        from kvstore.sharding import shard_of
        wrong = 1 - shard_of(b"key", 2)
        status, value = raw.request(wire.OP_WRITE, [wrong, b"c", 1, 1, [OP_PUT, b"key", b"v"]])
        assert status == wire.STATUS_ERROR and "belongs to shard" in value[1]
    finally:
        raw.close()


def wait_leader(raw, shards=1):
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        status, value = raw.request(wire.OP_STATUS, [])
        if all(s["role"] == "leader" for s in value["shards"][:shards]):
            return
        raw.s.poll(20)
    raise AssertionError("no leader")


def test_a_retried_write_applies_once_and_a_late_duplicate_is_ignored(start_node):
    n = start_node()
    raw = Raw(n.address)
    try:
        wait_leader(raw)
        cas = [OP_CAS, b"lock", None, b"me"]
        assert raw.request(wire.OP_WRITE, [0, b"client-a", 5, 5, cas]) == (wire.STATUS_OK, True)
        # the same (client, seq) again: the first result, no second effect
        assert raw.request(wire.OP_WRITE, [0, b"client-a", 5, 5, cas]) == (wire.STATUS_OK, True)
        # a new seq of the same command: applied, and fails (the lock is taken)
        assert raw.request(wire.OP_WRITE, [0, b"client-a", 6, 6, cas]) == (wire.STATUS_OK, False)
        # a put below the session's floor (a late duplicate of an answered write) is ignored:
        # the node gives no answer for it, and the value does not change
        raw.ids += 1
        raw.s.send(wire.encode_request(raw.ids, wire.OP_WRITE,
                                       [0, b"client-a", 4, 4, [OP_PUT, b"lock", b"old"]]))
        assert raw.request(wire.OP_GET, [0, b"lock", False]) == (wire.STATUS_OK, b"me")
    finally:
        raw.close()


def test_single_node_cluster_serves_the_kv_interface_and_survives_restart(start_node):
    n = start_node(shards=3, name="restart")
    with kvstore.connect(n.address, timeout=5) as c:
        c.put("a", "1")
        assert c.get(b"a") == b"1"
        assert c.cas(b"a", b"1", b"2") and not c.cas(b"a", b"1", b"3")
        assert c.delete(b"a") is True and c.delete(b"a") is False
        for i in range(30):
            c.put(b"k%02d" % i, b"v%d" % i)
        assert [k for k, _ in c.scan(b"k0")] == [b"k%02d" % i for i in range(10)]
        assert c.scan(start=b"k05", end=b"k08") == [(b"k05", b"v5"), (b"k06", b"v6"), (b"k07", b"v7")]
        assert len(c.scan(limit=4)) == 4
        st = c.status()
        assert len(st["shards"]) == 3 and all(s["leader"] == "n1" for s in st["shards"])
        with pytest.raises(kvstore.InvalidArgument):
            c.put(b"", b"x")
    address, peer_address = n.address, n.peer_address
    n.stop()
    n2 = start_node(shards=3, name="restart", address=address, peer_address=peer_address)
    with kvstore.connect(n2.address, timeout=5) as c:
        assert c.get(b"k29") == b"v29"
        assert len(c.scan(b"k")) == 30


def test_single_shard_transactions_and_one_across_shards(start_node):
    n = start_node(shards=2)
    from kvstore.sharding import shard_of
    keys = {0: [], 1: []}
    i = 0
    while len(keys[0]) < 2 or len(keys[1]) < 1:
        k = b"acct%d" % i
        keys[shard_of(k, 2)].append(k)
        i += 1
    a, b = keys[0][:2]
    with kvstore.connect(n.address, timeout=5) as c:
        c.put(a, b"10")
        with c.transaction() as t:
            t.put(a, str(int(t.get(a)) - 3))
            t.put(b, b"3")
        assert c.get(a) == b"7" and c.get(b) == b"3"
        # a conflicting concurrent write: nothing of the transaction is applied
        with pytest.raises(kvstore.TransactionConflict):
            with c.transaction() as t:
                t.get(a)
                c.put(a, b"100")
                t.put(b, b"999")
        assert c.get(b) == b"3"
        assert c.run_transaction(lambda t: t.get(a)) == b"100"
        # across shards: two-phase commit, all or nothing
        with c.transaction() as t:
            t.put(a, str(int(t.get(a)) - 30))
            t.put(keys[1][0], b"30")
        assert (c.get(a), c.get(keys[1][0])) == (b"70", b"30")


def test_storage_saves_and_loads_hard_state_records_and_applied_state(tmp_path):
    st = WalReplicaStorage(str(tmp_path / "s"), shards=2)
    cmd = encode_client_command(b"c", 1, 1, [OP_PUT, b"k", b"v"])
    rec = encode_record(0, 65536, KIND_BATCH, msgpack.packb([cmd]))
    results = st.save([ShardWrite(1, promised=65536, commit_index=0, records=[rec],
                                  committed=[Entry(0, 65536, KIND_BATCH, [cmd])])])
    assert results == [(1, 0, (b"c", 1), None)]
    assert st.get(1, b"k") == (b"v", 1)
    st.close()
    st = WalReplicaStorage(str(tmp_path / "s"), shards=2)
    p = st.load(1)
    assert (p.promised, p.commit_index, p.applied_index, p.records) == (65536, 0, 0, [rec])
    assert st.load(0).records == [] and st.load(0).applied_index == -1
    st.close()


def test_a_client_that_disconnects_mid_request_costs_the_node_nothing(start_node):
    n = start_node()
    raw = Raw(n.address)
    wait_leader(raw)
    raw.close()
    for i in range(20):  # each sends a write and a read, then vanishes before the answer
        ctx = zmq.Context()
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 1000)
        s.connect(n.address)
        s.send(wire.encode_request(1, wire.OP_WRITE, [0, b"gone%d" % i, 1, 1,
                                                      [OP_PUT, b"k%d" % i, b"v"]]))
        s.send(wire.encode_request(2, wire.OP_GET, [0, b"k%d" % i, False]))
        s.close()
        ctx.term()
    with kvstore.connect(n.address, timeout=5) as c:
        c.put(b"after", b"ok")
        assert c.get(b"after") == b"ok"
        assert c.get(b"k19") == b"v"  # the writes of the vanished clients were applied
        counters = None
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            raw = Raw(n.address)
            try:
                counters = raw.request(wire.OP_STATUS, [])[1]["counters"]
            finally:
                raw.close()
            if counters.get("dropped_reply_gone", 0) >= 1:
                break
        assert counters.get("dropped_reply_gone", 0) >= 1, counters


def test_big_concurrent_writes_are_cut_into_entries_that_fit_a_frame(start_node, tmp_path):
    import asyncio
    import kvstore.client.aio
    from kvstore.node.intake import PROPOSE_BYTES_PER_TURN
    n = start_node(name="big")
    value = bytes(kvstore.MAX_VALUE_SIZE)

    async def main():
        async with await kvstore.aio.connect(n.address, timeout=30) as a:
            await asyncio.gather(*(a.put(b"big%d" % i, value) for i in range(6)))
            assert await a.get(b"big5") == value

    asyncio.run(main())
    n.stop()
    st = WalReplicaStorage(str(tmp_path / "big"), shards=1)
    try:
        sizes = [len(r) for r in st.load(0).records]
    finally:
        st.close()
    assert sum(sizes) > 6 * kvstore.MAX_VALUE_SIZE
    assert max(sizes) <= PROPOSE_BYTES_PER_TURN + kvstore.MAX_VALUE_SIZE + 4096, sizes


def test_three_nodes_with_lease_reads_serve_the_write_just_before_from_every_node(tmp_path):
    """Lease reads on (off by default): every node's get sees the write acknowledged just
    before it, and the leader holds a lease once its rounds have been confirmed."""
    names = ["n1", "n2", "n3"]
    addresses = {n: f"tcp://127.0.0.1:{free_port()}" for n in names}
    peer_addresses = {n: f"tcp://127.0.0.1:{free_port()}" for n in names}
    nodes, threads = [], []
    for n in names:
        cfg = NodeConfig(name=n, names=names, addresses=addresses, shards=1,
                         peer_addresses=peer_addresses,
                         data_dir=str(tmp_path / n), lease_read_ticks=20)
        assert NodeConfig(name=n, names=names, addresses=addresses, shards=1,
                          data_dir=str(tmp_path / n)).lease_read_ticks == 0
        node = Node(cfg)
        nodes.append(node)
        threads.append(threading.Thread(target=node.run, daemon=True))
    for t in threads:
        t.start()
    raws = {n: Raw(addresses[n]) for n in names}
    try:
        with kvstore.connect(",".join(addresses.values()), timeout=20) as c:
            c.put(b"k", b"first")
            deadline = time.monotonic() + 20  # every node follows the leader (bounded wait)
            while len({node.replicas[0].leader_hint for node in nodes}) != 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            for i in range(20):
                c.put(b"k", b"v%d" % i)
                for n in names:
                    status, value = raws[n].request(wire.OP_GET, [0, b"k", False], timeout_ms=20000)
                    assert (status, value) == (wire.STATUS_OK, b"v%d" % i), n
        [leader] = [node for node in nodes if node.replicas[0].is_leader]
        assert leader.replicas[0].lease_until > 0
    finally:
        for raw in raws.values():
            raw.close()
        for node in nodes:
            node.stop()
        for t in threads:
            t.join(10)
