"""Hostile two-phase-commit requests against real ``kvstore-server`` processes.

A raw DEALER speaking the wire format (what ``kvstore.connect`` never sends)
attacks a cluster of 3 nodes and 2 shards: prepares with a deadline far in the
future or naming shards that do not exist, decisions and resolves written as
client commands, malformed decide requests, and transactions past the
cluster's size limit. The nodes refuse (``InvalidArgument``, nothing changed)
or bound each one (a prepare's locks last at most the node's cap), and every
node stays up.
"""

from __future__ import annotations

import asyncio
import time

import pytest

import kvstore
import kvstore.aio
from conftest import child_env
from kvstore.commands import OP_2PC, OP_PUT, OP_TXN
from kvstore.keys import MAX_CLUSTER_TXN_SIZE, MAX_COMMAND_BYTES, MAX_VALUE_SIZE
from kvstore.commands import LOCKED
from kvstore.machine.twopc import TXN_DEADLINE_MAX_MS
from kvstore.server.local import LocalCluster
from kvstore.sharding import shard_of
from kvstore.transport import wire
from kvstore.txn import ABORT, COMMIT, LOCK_ONLY, TxnDecision, TxnFence, TxnPrepare, TxnResolve, encode
from test_node import Raw

pytestmark = pytest.mark.timeout(120)

SHARDS = 2
CAP_SECONDS = TXN_DEADLINE_MAX_MS / 1000


@pytest.fixture(scope="module")
def lc(tmp_path_factory):
    cluster = LocalCluster(str(tmp_path_factory.mktemp("trust2pc")), 3, SHARDS, env=child_env())
    try:
        cluster.start_all()
        cluster.wait_ready()
        yield cluster
        assert sorted(cluster.running()) == cluster.names, "a node went down"
    finally:
        cluster.close()


@pytest.fixture
def raws(lc):
    """A raw connection to each node (a follower forwards what it takes to the leader)."""
    made = [Raw(lc.addresses[n]) for n in lc.names]
    yield made
    for r in made:
        r.close()


_counter = iter(range(10**9))


def fresh_key(shard: int) -> bytes:
    """A key of ``shard`` no other test uses."""
    while True:
        k = b"t2pc-%d" % next(_counter)
        if shard_of(k, SHARDS) == shard:
            return k


def txn_id() -> bytes:
    return b"%016d" % next(_counter)


def request(raw: Raw, op: str, args: list):
    """``raw.request``, retried as a client does while the shard elects (leaders move
    to their preferred nodes in the first second): "not the leader" or "retry"."""
    for _ in range(100):
        status, value = raw.request(op, args)
        if status not in (wire.STATUS_NOT_LEADER, wire.STATUS_RETRY) or value == LOCKED:
            return status, value
        raw.s.poll(20)
    raise AssertionError(f"no leader answered {op} {args!r}"[:200])


def prepare(raw: Raw, shard: int, entry, seq: int = 1, client: bytes = b"hostile"):
    return request(raw, wire.OP_WRITE, [shard, client + entry.txn_id, seq, seq,
                                        [OP_2PC, encode(entry)]])


def ok(answer):
    """The result of a request that succeeded, directly or forwarded by a follower."""
    status, value = answer
    if status == wire.STATUS_OK_FORWARDED:
        return value[0]
    assert status == wire.STATUS_OK, answer
    return value


def refused(answer) -> bool:
    status, value = answer
    return status == wire.STATUS_ERROR and value[0] == "InvalidArgument"


def get(raw: Raw, key: bytes):
    return request(raw, wire.OP_GET, [shard_of(key, SHARDS), key, False])


def test_a_prepare_with_a_deadline_far_away_is_capped_and_its_keys_free_within_the_cap(lc, raws):
    a, b = fresh_key(0), fresh_key(1)
    with lc.client(timeout=CAP_SECONDS + 5) as c:
        c.put(a, b"old-a")
        c.put(b, b"old-b")
        t0 = time.monotonic()
        # locks of a client that then vanishes, with deadlines no client should hold
        for raw, key, deadline in ((raws[0], a, 2 ** 62), (raws[1], b, 2 ** 64 - 1)):
            shard = shard_of(key, SHARDS)
            p = TxnPrepare(txn_id(), shard, (shard,), ((key, LOCK_ONLY),), ((key, b"never"),),
                           deadline)  # a locking read and a write
            vote, _values = ok(prepare(raw, shard, p))
            assert vote is True
            assert get(raws[2], key) == (wire.STATUS_RETRY, LOCKED)
        # a writer waits for the resolver, which aborts them once the capped deadline passes
        c.put(a, b"new-a")
        c.put(b, b"new-b")
        assert time.monotonic() - t0 < CAP_SECONDS + 3.0
        assert c.scan(b"t2pc-") and (c.get(a), c.get(b)) == (b"new-a", b"new-b")


@pytest.mark.parametrize("why,entry", [
    ("coordinator 99", lambda k: TxnPrepare(txn_id(), 99, (0, 1), (), ((k, b"v"),), 0)),
    ("participant 99", lambda k: TxnPrepare(txn_id(), 0, (0, 99), (), ((k, b"v"),), 0)),
    ("not its shard", lambda k: TxnPrepare(txn_id(), 1, (1,), (), ((k, b"v"),), 0)),
    ("unsorted", lambda k: TxnPrepare(txn_id(), 0, (1, 0), (), ((k, b"v"),), 0)),
    ("short id", lambda k: TxnPrepare(b"T", 0, (0,), (), ((k, b"v"),), 0)),
    ("negative deadline", lambda k: TxnPrepare(txn_id(), 0, (0,), (), ((k, b"v"),), -1)),
    ("bad revision", lambda k: TxnPrepare(txn_id(), 0, (0,), ((k, -7),), (), 0)),
    ("a decision", lambda k: TxnDecision(txn_id(), COMMIT)),
    ("a resolve", lambda k: TxnResolve(txn_id(), ABORT)),
    ("a fence", lambda k: TxnFence(txn_id())),
    ("one-round, locking", lambda k: TxnPrepare(txn_id(), 0, (0,), ((k, LOCK_ONLY),), ((k, b"v"),), 0,
                                                one_round=True)),
    ("one-round, read-only", lambda k: TxnPrepare(txn_id(), 0, (0,), ((k, 0),), (), 0, True,
                                                  one_round=True)),
])
def test_a_hostile_2pc_command_is_refused_and_locks_nothing(lc, raws, why, entry):
    key = fresh_key(0)
    e = entry(key)
    for raw in raws:  # the leader of shard 0, and followers that would forward it
        assert refused(request(raw, wire.OP_WRITE, [0, b"hostile", 1, 1, [OP_2PC, encode(e)]])), why
    assert get(raws[0], key) == (wire.STATUS_OK, None)


def test_a_client_cannot_resolve_a_prepared_transaction_only_ask_for_its_decision(lc, raws):
    a, b = fresh_key(0), fresh_key(1)
    with lc.client() as c:
        c.put(a, b"100")
        c.put(b, b"100")
    t = txn_id()
    for shard, key in ((0, a), (1, b)):
        p = TxnPrepare(t, 0, (0, 1), (), ((key, b"stolen"),), int(time.time() * 1000) + 60_000)
        assert ok(prepare(raws[shard], shard, p)) is True
    # resolving it COMMIT, or recording a decision, as a client: refused on every node
    for raw in raws:
        for shard in (0, 1):
            assert refused(request(raw, wire.OP_WRITE, [shard, b"hostile", 9, 9, [
                OP_2PC, encode(TxnResolve(t, COMMIT))]]))
        assert refused(request(raw, wire.OP_WRITE, [0, b"hostile", 9, 9, [
            OP_2PC, encode(TxnDecision(t, COMMIT))]]))
    assert get(raws[2], a) == (wire.STATUS_RETRY, LOCKED)  # still prepared, nothing applied
    # the decide request: the coordinator shard's leader records it and resolves both shards
    for raw in raws:
        assert ok(request(raw, wire.OP_DECIDE, [0, t, ABORT, [0, 1]])) == ABORT
    assert ok(request(raws[1], wire.OP_DECIDE, [0, t, COMMIT, [0, 1]])) == ABORT  # first wins
    with lc.client() as c:
        assert (c.get(a), c.get(b)) == (b"100", b"100")


@pytest.mark.parametrize("args", [
    [0, b"T" * 16, 7, [0, 1]],  # no such outcome
    [0, b"T" * 16, ABORT, [0, 5]],  # no shard 5
    [1, b"T" * 16, ABORT, [0]],  # the coordinator shard is not a participant
    [99, b"T" * 16, ABORT, [99]],
    [0, b"T", ABORT, [0]],  # a guessable id
    [0, b"T" * 16, ABORT],
    [0, b"T" * 16, ABORT, "all"],
    [0, b"T" * 16, ABORT, [0], False],  # "implied by the votes" is true or absent
    [0, b"T" * 16, ABORT, [0], 1],
    [0, b"T" * 16, ABORT, [0], True, True],
])
def test_a_malformed_decide_request_is_refused(lc, raws, args):
    assert refused(request(raws[0], wire.OP_DECIDE, args))


def test_a_20_mib_transaction_raises_invalid_argument_at_the_put_that_crosses_the_limit(lc):
    big = b"x" * MAX_VALUE_SIZE
    keys = [fresh_key(0) for _ in range(5)]  # one shard: one log entry
    fits = MAX_CLUSTER_TXN_SIZE // (MAX_VALUE_SIZE + 16)
    with lc.client(timeout=10) as c:
        with c.transaction() as t:
            with pytest.raises(kvstore.InvalidArgument, match="MAX_CLUSTER_TXN_SIZE") as info:
                for i, k in enumerate(keys):
                    t.put(k, big)
            assert i == fits and "unchanged" in str(info.value)
        # what fitted committed, the refused put left nothing behind
        assert [c.get(k) == big for k in keys] == [i < fits for i in range(5)]

        async def async_txn():
            async with await kvstore.aio.connect(lc.address_list, timeout=10) as a:
                async with a.transaction() as t:
                    for i, k in enumerate(keys):
                        try:
                            await t.put(k, b"y" * MAX_VALUE_SIZE)
                        except kvstore.InvalidArgument:
                            return i
        assert asyncio.run(async_txn()) == fits
        assert [c.get(k)[:1] for k in keys[:fits]] == [b"y"] * fits


def test_a_write_command_over_the_node_limit_is_refused_not_dropped(lc, raws):
    writes = [[fresh_key(0), b"z" * (MAX_VALUE_SIZE - 1024)] for _ in range(4)]
    assert MAX_COMMAND_BYTES < sum(len(v) for _k, v in writes) < wire.MAX_REQUEST_FRAME_BYTES
    status, value = raws[0].request(wire.OP_WRITE, [0, b"big", 1, 1, [OP_TXN, [], [], writes]],
                                    timeout_ms=20_000)  # refused by whichever node takes it
    assert (status, value[0]) == (wire.STATUS_ERROR, "InvalidArgument") and "limit" in value[1]
    assert get(raws[0], writes[0][0]) == (wire.STATUS_OK, None)
    assert ok(request(raws[1], wire.OP_WRITE, [0, b"small", 1, 1, [OP_PUT, writes[0][0], b"ok"]])) \
        is None
