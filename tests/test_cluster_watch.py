"""Watch against real ``kvstore-server`` processes, driven by a raw OP_WATCH client.

Every node answers OP_WATCH from its own history (``kvstore.node.watching``): a
watcher on the leader and one on a follower see every write exactly once, in
revision order; a watcher that resumes on another node by its position after the
leader is SIGKILLed misses nothing and sees nothing twice; a poll below the history
is answered "compacted" with the oldest revision; a write asking ``want_revision``
gets the revision its answer came from; hostile polls (bad arguments, thousands
parked from one connection) cost bounded memory and the node keeps serving.
"""

from __future__ import annotations

import itertools
import os
import time

import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.commands import OP_DELETE, OP_PUT
from kvstore.node.watching import (MAX_PARKED_PER_CONNECTION, MAX_WATCH_REPLY_BYTES,
                                   MAX_WATCH_WAIT_MS, check_watch_args)
from kvstore.server.local import LocalCluster
from kvstore.transport import wire
from conftest import child_env

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def cluster(tmp_path):
    clusters = []

    def make(nodes=3, shards=1, history_bytes=None, tuning=None):
        lc = LocalCluster(str(tmp_path / f"c{len(clusters)}"), nodes, shards, env=child_env(),
                          tuning=tuning)
        if history_bytes is not None:
            with open(lc.config_path, "a") as f:
                f.write(f"\n[watch]\nhistory_bytes = {history_bytes}\n")
        clusters.append(lc)
        lc.start_all()
        lc.wait_ready()
        return lc

    yield make
    for lc in clusters:
        lc.close()


class RawClient:
    """A bare DEALER speaking requests to one node: ``call`` one, or ``send`` many."""

    def __init__(self, address: str) -> None:
        self.ctx = zmq.Context()
        self.s = self.ctx.socket(zmq.DEALER)
        self.s.setsockopt(zmq.LINGER, 0)
        self.s.connect(address)
        self.ids = itertools.count(1)

    def send(self, requests: list) -> list:
        ids = [next(self.ids) for _ in requests]
        self.s.send(wire.encode_requests([(i, op, args) for i, (op, args) in zip(ids, requests)]))
        return ids

    def replies(self, want: set, timeout: float) -> dict:
        """request id -> (status, value) for every id in ``want`` (or what came in time)."""
        got: dict = {}
        deadline = time.monotonic() + timeout
        while want - set(got) and time.monotonic() < deadline:
            if self.s.poll(max(1, int((deadline - time.monotonic()) * 1000))):
                body = wire.decode(self.s.recv(), wire.MAX_PEER_FRAME_BYTES)
                items = [body[1:]] if body[0] == wire.REPLY else body[1]
                for request_id, status, value in items:
                    got[request_id] = (status, value)
        return got

    def call(self, op: str, args: list, timeout: float = 15.0):
        [i] = self.send([(op, args)])
        got = self.replies({i}, timeout)
        assert i in got, f"no answer to {op} within {timeout} s"
        return got[i]

    def watch(self, from_revision: int, lo=b"", hi=None, wait_ms=2000, max_bytes=1 << 20,
              prev=False, shard=0):
        return self.call(wire.OP_WATCH, [shard, lo, hi, from_revision, max_bytes, wait_ms, prev])

    def close(self) -> None:
        self.s.close(0)
        self.ctx.term()


def drain(address: str, position: int, count: int, prefix: bytes, timeout: float = 30.0):
    """Poll ``address`` from ``position`` until ``count`` changes under ``prefix`` arrived:
    ``(changes as (revision, type, key, value), next position)``."""
    raw = RawClient(address)
    seen: list = []
    deadline = time.monotonic() + timeout
    try:
        while len(seen) < count and time.monotonic() < deadline:
            status, value = raw.watch(position, prefix, prefix + b"\xff")
            assert status == wire.STATUS_OK, value
            events, oldest, through, _current = value
            assert events is not None, f"compacted at {position} (oldest {oldest})"
            for revision, changes in events:
                assert revision >= position
                seen.extend((revision, t, k, v) for t, k, v, _p in changes)
            assert through >= position - 1
            position = through + 1
    finally:
        raw.close()
    return seen, position


def test_watchers_on_leader_and_follower_see_every_write_once_in_order_across_a_leader_kill(cluster):
    lc = cluster(3, 1)
    leader = lc.wait_ready()["shards"][0]["leader"]
    followers = [n for n in lc.names if n != leader]
    expected = []
    with lc.client(timeout=10) as c:
        for i in range(20):
            c.put(b"w/%03d" % i, b"v%d" % i)
            expected.append((0, b"w/%03d" % i, b"v%d" % i))
        c.delete(b"w/005")
        expected.append((1, b"w/005", None))
        c.delete(b"w/absent")  # no change: no event
        c.put(b"other", b"x")  # outside the prefix
        on_leader, _ = drain(lc.addresses[leader], 1, len(expected), b"w/")
        on_follower, _ = drain(lc.addresses[followers[0]], 1, len(expected), b"w/")
        assert [e[1:] for e in on_leader] == expected
        assert on_follower == on_leader  # the same revisions on every node
        revisions = [e[0] for e in on_leader]
        assert revisions == sorted(revisions)

        # a watcher reads part of the stream from a follower, then the leader dies
        part, position = drain(lc.addresses[followers[0]], 1, 10, b"w/")
        lc.kill(leader)
        for i in range(20, 35):
            c.put(b"w/%03d" % i, b"v%d" % i)
            expected.append((0, b"w/%03d" % i, b"v%d" % i))
    # it resumes on the other survivor from its position: nothing lost, nothing twice
    rest, _ = drain(lc.addresses[followers[1]], position, len(expected) - len(part), b"w/")
    stream = part + rest
    assert [e[1:] for e in stream] == expected
    assert [e[0] for e in stream] == sorted(e[0] for e in stream)
    assert len({(e[0], e[2]) for e in stream}) == len(stream)


def test_parked_poll_is_answered_when_a_matching_write_applies_and_reports_progress(cluster):
    lc = cluster(1, 1)
    raw = RawClient(lc.addresses["n1"])
    try:
        status, (events, oldest, through, current) = raw.watch(1, b"k", b"k\x00", wait_ms=0)
        assert status == wire.STATUS_OK and events == [] and oldest == 1 and current is True
        [poll] = raw.send([(wire.OP_WATCH, [0, b"k", b"k\x00", through + 1, 1 << 20, 10_000,
                                            True])])
        with lc.client() as c:
            c.put(b"other", b"1")  # does not match: the poll stays parked
            assert raw.replies({poll}, 0.3) == {}
            started = time.monotonic()
            c.put(b"k", b"1")
            c.put(b"k", b"2")
        got = raw.replies({poll}, 9.0)
        assert time.monotonic() - started < 5.0
        status, (events, _oldest, through2, _current) = got[poll]
        assert status == wire.STATUS_OK
        assert [change for _rev, changes in events for change in changes][0] == [0, b"k", b"1", None]
        if len(events) == 2:
            assert events[1][1] == [[0, b"k", b"2", b"1"]]  # prev asked for
        # a poll that times out reports progress: through = the applied revision
        status, (events, _o, through3, _c) = raw.watch(through2 + 1, b"zz", b"zz\x00", wait_ms=50)
        assert events == [] and through3 >= through2
    finally:
        raw.close()


def test_a_poll_below_the_history_is_compacted_naming_the_oldest(cluster):
    lc = cluster(1, 1, history_bytes=20000)
    with lc.client() as c:
        for i in range(60):
            c.put(b"c/%d" % i, b"x" * 100)
    raw = RawClient(lc.addresses["n1"])
    try:
        status, (events, oldest, _through, _current) = raw.watch(1)
        assert status == wire.STATUS_OK and events is None and oldest > 1
        status, (events, oldest2, through, _c) = raw.watch(oldest, wait_ms=0)
        assert events and events[0][0] >= oldest and through >= events[-1][0]
        assert events[-1][1][0][1] == b"c/59"
    finally:
        raw.close()


def test_a_follower_that_installs_a_snapshot_starts_its_history_after_it(cluster):
    lc = cluster(3, 1, tuning={"snapshot_every_slots": 20, "log_retain_slots": 2})
    leader = lc.wait_ready()["shards"][0]["leader"]
    behind = next(n for n in lc.names if n != leader)
    with lc.client(timeout=10) as c:
        c.put(b"s/before", b"1")
        before, _ = drain(lc.addresses[leader], 1, 1, b"s/")
        lc.kill(behind)
        for i in range(80):  # many snapshots past what the stopped node holds
            c.put(b"s/%02d" % i, b"%d" % i)
        lc.start(behind)
        deadline = time.monotonic() + 60
        raw = RawClient(lc.addresses[behind])
        try:
            while True:  # until it holds the last write
                status, value = raw.call(wire.OP_GET, [0, b"s/79", False])
                if status == wire.STATUS_OK and value == b"79":
                    break
                assert time.monotonic() < deadline, lc.tail(behind)
                time.sleep(0.05)
            assert "installed a snapshot" in open(lc.log_path(behind)).read()
            # the gap the snapshot covered is not in its history: a poll from just after
            # the write it had is compacted, never answered with the changes missing
            status, (events, oldest, _through, current) = raw.watch(before[0][0] + 1)
            assert events is None and oldest > before[0][0] + 2 and current is False
            c.put(b"s/after", b"2")
            on_behind, _ = drain(lc.addresses[behind], oldest, 1, b"s/after")
            on_leader, _ = drain(lc.addresses[leader], oldest, 1, b"s/after")
            assert on_behind == on_leader
        finally:
            raw.close()


def test_write_with_want_revision_answers_its_revision(cluster):
    lc = cluster(1, 1)
    raw = RawClient(lc.addresses["n1"])
    client_id = os.urandom(16)
    try:
        status, value = raw.call(wire.OP_WRITE, [0, client_id, 1, 0, [OP_PUT, b"r", b"1"], True])
        assert status == wire.STATUS_OK
        result, revision = value
        assert result is None and revision >= 1
        status, value = raw.call(wire.OP_WRITE, [0, client_id, 2, 0, [OP_DELETE, b"r"], True])
        assert value[0] is True and value[1] > revision
        deleted_at = value[1]
        status, value = raw.call(wire.OP_WRITE, [0, client_id, 3, 0, [OP_PUT, b"r", b"2"]])
        assert status == wire.STATUS_OK and value is None  # five arguments: the bare result
        status, value = raw.call(wire.OP_GET, [0, b"r", True])
        assert value[0] == b"2"
        status, (events, _o, _t, _c) = raw.watch(revision, b"r", b"r\x00", wait_ms=0)
        assert [(rev, changes[0][0]) for rev, changes in events[:2]] == [(revision, 0),
                                                                          (deleted_at, 1)]
        status, value = raw.call(wire.OP_WRITE, [0, client_id, 4, 0, [OP_PUT, b"r", b"3"], 1])
        assert status == wire.STATUS_ERROR and value[0] == "InvalidArgument"
        # a retried duplicate: its first result, at the revision of the entry answering it
        # (a later one, whose state contains the write)
        status, value = raw.call(wire.OP_WRITE, [0, client_id, 1, 0, [OP_PUT, b"r", b"1"], True])
        assert status == wire.STATUS_OK and value[0] is None and value[1] > deleted_at
    finally:
        raw.close()
    # through a follower: forwarded to the leader with want_revision, relayed
    lc3 = cluster(3, 1)
    leader = lc3.wait_ready()["shards"][0]["leader"]
    follower = next(n for n in lc3.names if n != leader)
    raw = RawClient(lc3.addresses[follower])
    try:
        status, value = raw.call(wire.OP_WRITE, [0, client_id, 1, 0, [OP_PUT, b"f", b"1"], True])
        assert status == wire.STATUS_OK_FORWARDED, value
        (result, revision), _leader_index = value
        assert result is None and revision >= 1
    finally:
        raw.close()


MALFORMED_WATCHES = [
    [], [0, b"", None, 1, 100, 0], [5, b"", None, 1, 100, 0, False],
    [0, "s", None, 1, 100, 0, False], [0, b"", b"x" * 600, 1, 100, 0, False],
    [0, b"", None, 0, 100, 0, False], [0, b"", None, (1 << 64) - 1, 100, 0, False],
    [0, b"", None, 1, 0, 0, False], [0, b"", None, 1, 100, -1, False],
    [0, b"", None, 1, 100, 0, 1], [0, b"", None, True, 100, 0, False],
    [0, b"", None, 1, 100, 0.5, False], [-1, b"", None, 1, 100, 0, False],
]


def test_malformed_watches_are_invalid_arguments_and_change_nothing(cluster):
    lc = cluster(1, 1)
    raw = RawClient(lc.addresses["n1"])
    try:
        for args in MALFORMED_WATCHES:
            status, value = raw.call(wire.OP_WATCH, args)
            assert status == wire.STATUS_ERROR and value[0] == "InvalidArgument", (args, value)
        status, value = raw.watch(1, wait_ms=0)
        assert status == wire.STATUS_OK and value[1] == 1
    finally:
        raw.close()


def test_a_forged_wait_and_answer_size_are_capped_by_the_node():
    args = check_watch_args([0, b"k", b"k\x00", 1, 1 << 62, 10**12, False], 1)
    assert args[4] == MAX_WATCH_REPLY_BYTES and args[5] == MAX_WATCH_WAIT_MS


plain = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 63), (1 << 64) - 1),
                  st.binary(max_size=600), st.text(max_size=5), st.floats(allow_nan=False))


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.lists(plain, max_size=9), st.lists(plain, min_size=7, max_size=7), plain))
def test_any_watch_arguments_are_checked_or_refused_with_a_value_error(args):
    try:
        shard, lo, hi, from_revision, max_bytes, wait_ms, prev = check_watch_args(args, 4)
    except ValueError:
        return
    assert 0 <= shard < 4 and type(lo) is bytes and (hi is None or type(hi) is bytes)
    assert 1 <= from_revision < 1 << 63 and 1 <= max_bytes <= MAX_WATCH_REPLY_BYTES
    assert 0 <= wait_ms <= MAX_WATCH_WAIT_MS and type(prev) is bool


def test_thousands_of_parked_polls_from_one_connection_are_bounded(cluster):
    lc = cluster(1, 1)
    raw = RawClient(lc.addresses["n1"])
    other = RawClient(lc.addresses["n1"])
    try:
        n = MAX_PARKED_PER_CONNECTION + 200
        ids = raw.send([(wire.OP_WATCH, [0, b"p/%d" % i, None, 1 << 40, 1 << 20, 10**9, False])
                        for i in range(n)])
        got = raw.replies(set(ids[-200:]), 10.0)
        assert len(got) == 200
        assert all(s == wire.STATUS_RETRY and "parked" in v for s, v in got.values())
        # another connection still parks and is answered; the node serves writes
        [poll] = other.send([(wire.OP_WATCH, [0, b"q", b"q\x00", 1, 1 << 20, 10_000, False])])
        with lc.client() as c:
            c.put(b"q", b"1")
        status, value = other.replies({poll}, 9.0)[poll]
        assert status == wire.STATUS_OK and value[0][0][1][0][1] == b"q"
    finally:
        raw.close()  # never reads its parked polls' answers: the node drops them on expiry
        other.close()


def test_a_lease_expiring_on_the_cluster_is_a_delete_event(cluster):
    lc = cluster(1, 1)
    with lc.client() as c:
        c.put(b"e/key", b"v", ttl=0.3)
    stream, _ = drain(lc.addresses["n1"], 1, 2, b"e/")
    assert [(t, k, v) for _rev, t, k, v in stream] == [(0, b"e/key", b"v"), (1, b"e/key", None)]
    assert stream[1][0] > stream[0][0]


def test_a_watch_hopping_between_nodes_while_the_leader_is_killed_mid_writes_sees_each_once(
        cluster):
    """Writes go on while the leader is SIGKILLed; the watcher asks a different node at
    every poll (the dead one too: a failed poll is retried elsewhere from the same
    position). Every acknowledged write is delivered once, in order; one whose outcome
    is unknown (its call failed) at most once; revisions only grow."""
    import threading

    from kvstore.errors import KVError
    lc = cluster(3, 1)
    leader = lc.wait_ready()["shards"][0]["leader"]
    acked, unknown = [], []
    done = threading.Event()

    def write() -> None:
        with lc.client(timeout=10) as c:
            for i in range(150):
                value = b"%d" % i
                try:
                    c.put(b"h/key", value)
                    acked.append(value)
                except KVError:
                    unknown.append(value)
                if i == 50:
                    lc.kill(leader)
        done.set()

    writer = threading.Thread(target=write)
    writer.start()
    stream, position = [], 1
    clients = {n: RawClient(lc.addresses[n]) for n in lc.names}
    try:
        deadline = time.monotonic() + 60
        for node in itertools.cycle(lc.names):
            assert time.monotonic() < deadline, "the watch did not catch up"
            caught_up = done.is_set() and (not acked or any(v == acked[-1] for *_x, v in stream))
            raw = clients[node]
            [i] = raw.send([(wire.OP_WATCH, [0, b"h/", b"h0", position, 1 << 20, 100, False])])
            got = raw.replies({i}, 0.4).get(i)
            if got is None or got[0] != wire.STATUS_OK:
                continue  # the dead node, or no answer in time: ask the next one
            events, _oldest, through, _current = got[1]
            if caught_up and not events:
                break  # everything acknowledged arrived, and nothing more is coming
            assert events is not None
            for revision, changes in events:
                assert revision >= position
                stream.extend((revision, t, k, v) for t, k, v, _p in changes)
            position = through + 1
    finally:
        writer.join(60)
        for raw in clients.values():
            raw.close()
    values = [v for _r, _t, _k, v in stream]
    assert [r for r, *_ in stream] == sorted({r for r, *_ in stream})  # once each, in order
    assert len(values) == len(set(values))
    assert [v for v in values if v in set(acked)] == acked  # every acknowledged, in order
    assert set(values) <= set(acked) | set(unknown)
