"""The client's error contract against endpoints that are not kvstore nodes.

A fake endpoint here is a ZeroMQ ROUTER in a thread of the test that answers
every request frame in one way: with bytes that are not kvstore's wire format,
with well-formed frames of the wrong shape, by echoing the request, or not at
all. Whatever it does, ``connect()`` and every later call raise a ``KVError``
(``Unavailable``) within their timeout, naming the problem; never a
``ValueError``, ``AttributeError``, ``IndexError``, ``KeyError`` or a hang.
"""

from __future__ import annotations

import asyncio
import threading
import time

import msgpack
import pytest
import zmq

import kvstore
import kvstore.aio
from kvstore.server.local import free_port
from kvstore.transport import wire

pytestmark = pytest.mark.timeout(60)

TIMEOUT = 1.0


def _status(nshards=1, address="tcp://127.0.0.1:1") -> dict:
    return {"node": "n1", "index": 0, "nshards": nshards,
            "nodes": [{"id": "n1", "address": address}],
            "shards": [{"shard": s, "role": "leader", "leader": "n1", "leader_index": 0,
                        "commit_index": 0, "applied_index": 0, "ballot": "1.0"}
                       for s in range(nshards)]}


def _requests(frame: bytes) -> list:
    body = wire.decode(frame)
    return [body[1:]] if body[0] == wire.REQUEST else body[1]


def _garbage(frame, address):
    return [b"\x00\xffthis is not kvstore"]


def _not_a_list(frame, address):
    return [b"\x01" + msgpack.packb({"hello": "world"})]


def _echo(frame, address):
    return [frame]


def _silent(frame, address):
    return []


def _ok_of_wrong_shape(value):
    def answer(frame, address):
        return [wire.encode_replies([(rid, wire.STATUS_OK, value) for rid, _op, _a in _requests(frame)])]
    return answer


def _mimic(frame, address):
    """Answers hello as a node would, and everything else with results of the wrong shape."""
    out = []
    for rid, op, _args in _requests(frame):
        if op in (wire.OP_HELLO, wire.OP_STATUS):
            out.append((rid, wire.STATUS_OK, _status(address=address)))
        elif op == wire.OP_WRITE:
            out.append((rid, wire.STATUS_OK_FORWARDED, "not a pair"))
        else:
            out.append((rid, wire.STATUS_OK, {"rows": 42}))
    return [wire.encode_replies(out)]


class FakeEndpoint:
    """A ROUTER on 127.0.0.1 answering each frame with ``answer(frame, address) -> [frames]``."""

    def __init__(self, answer) -> None:
        self.address = f"tcp://127.0.0.1:{free_port()}"
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.bind(self.address)
        self.answer = answer
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.is_set():
            if not self.router.poll(20):
                continue
            identity, frame = self.router.recv_multipart()
            for reply in self.answer(frame, self.address):
                self.router.send_multipart([identity, reply])

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        self.router.close(0)
        self.ctx.term()


@pytest.fixture
def endpoint():
    made = []

    def make(answer):
        made.append(FakeEndpoint(answer))
        return made[-1]

    yield make
    for e in made:
        e.close()


@pytest.mark.parametrize("answer,says", [
    (_garbage, "not a kvstore node"),
    (_not_a_list, "not a kvstore node"),
    (_echo, "not a kvstore node"),
    (_ok_of_wrong_shape("hello"), "not a kvstore node"),
    (_ok_of_wrong_shape({}), "not a kvstore node"),
    (_ok_of_wrong_shape({**_status(), "nshards": 0}), "not a kvstore node"),
    (_ok_of_wrong_shape({**_status(2), "shards": []}), "not a kvstore node"),
    (_ok_of_wrong_shape({**_status(), "nodes": [{"id": 1, "address": None}]}), "not a kvstore node"),
    (_silent, "no server answered"),
], ids=["garbage", "not-a-list", "echo", "str", "empty-map", "no-shards", "shards-missing",
        "bad-nodes", "silent"])
def test_connect_to_something_that_is_not_a_node_is_unavailable_naming_it(endpoint, answer, says):
    e = endpoint(answer)
    t0 = time.monotonic()
    with pytest.raises(kvstore.Unavailable, match=says) as info:
        kvstore.connect(e.address, timeout=TIMEOUT)
    assert time.monotonic() - t0 < TIMEOUT + 2.0
    if says != "no server answered":
        assert e.address in str(info.value)


def test_async_connect_to_something_that_is_not_a_node_is_unavailable(endpoint):
    e = endpoint(_garbage)

    async def main():
        with pytest.raises(kvstore.Unavailable, match="not a kvstore node"):
            await kvstore.aio.connect(e.address, timeout=TIMEOUT)

    asyncio.run(main())


def test_every_call_answered_with_the_wrong_shape_raises_a_kverror(endpoint):
    """It answers hello as a node does, then nothing else right: each call is a KVError."""
    e = endpoint(_mimic)
    with kvstore.connect(e.address, timeout=TIMEOUT) as c:
        calls = [lambda: c.get(b"k"), lambda: c.put(b"k", b"v"), lambda: c.delete(b"k"),
                 lambda: c.cas(b"k", None, b"v"), lambda: c.scan(b""),
                 lambda: c.run_transaction(lambda t: t.get(b"k"), retries=0)]
        for call in calls:
            with pytest.raises(kvstore.KVError, match="not a kvstore node"):
                call()
        assert c._core.dropped_replies >= len(calls)
        status = c.status()  # a status answer of the right shape is still read
        assert status["nodes"][0]["state"] == "up"


def test_a_client_learns_a_member_added_since_it_connected(endpoint):
    """A node answers naming a leader by an index the client does not know (a member
    added at run time): the client asks for the topology again and learns it."""
    hellos = []
    other = f"tcp://127.0.0.1:{free_port()}"

    def answer(frame, address):
        out = []
        for request_id, op, _args in _requests(frame):
            if op == wire.OP_HELLO:
                st = _status(address=address)
                if hellos:  # from the second hello on, node #1 is a member
                    st["nodes"].append({"id": "n2", "address": other})
                hellos.append(op)
                out.append(wire.encode_reply(request_id, wire.STATUS_OK, st))
            else:  # done by the leader, node #1, this node forwarded the write to
                out.append(wire.encode_reply(request_id, wire.STATUS_OK_FORWARDED, [None, 1]))
        return out

    e = endpoint(answer)
    with kvstore.connect(e.address, timeout=5) as c:
        assert c._core.nodes == [e.address]
        c.put(b"k", b"v")
        deadline = time.monotonic() + 5
        while c._core.nodes != [e.address, other]:
            assert time.monotonic() < deadline, f"never learned n2: {c._core.nodes}"
            time.sleep(0.01)
    assert len(hellos) == 2
