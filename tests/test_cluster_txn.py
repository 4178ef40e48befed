"""Cross-shard transactions on a running node: two-phase commit, its locks and its resolver.

A node here is a real ``kvstore.node.loop.Node`` on 127.0.0.1 (one node, several
shards: every shard's log is a Paxos group of one). What a client never does on
its own (prepare and vanish, decide and vanish) is sent as raw 2PC entries and
raw decide requests; decisions and resolves are written by the nodes only.
"""

from __future__ import annotations

import time

import msgpack
import pytest

import kvstore
from kvstore.commands import OP_2PC, OP_PUT
from kvstore.paxos.replica import KIND_BATCH, Entry
from kvstore.commands import LOCKED, encode_client_command
from kvstore.machine.replica import ShardWrite
from kvstore.node import resolver
from kvstore.node.storage import WalReplicaStorage
from kvstore.sharding import shard_of
from kvstore.transport import wire
from kvstore.txn import ABORT, COMMIT, TxnPrepare, encode
from kvstore._native import encode_record
from test_node import Raw, start_node, wait_leader  # noqa: F401  (fixture)

pytestmark = pytest.mark.timeout(120)


def keys_by_shard(nshards: int, per_shard: int = 2) -> dict:
    keys = {s: [] for s in range(nshards)}
    i = 0
    while any(len(v) < per_shard for v in keys.values()):
        k = b"acct%d" % i
        if len(keys[shard_of(k, nshards)]) < per_shard:
            keys[shard_of(k, nshards)].append(k)
        i += 1
    return keys


def raw_2pc(raw: Raw, shard: int, seq: int, entry, client=b"raw-coordinator"):
    return raw.request(wire.OP_WRITE, [shard, client, seq, 1, [OP_2PC, encode(entry)]])


def raw_decide(raw: Raw, shard: int, txn: bytes, outcome: int, participants):
    """Ask the coordinator shard's leader for a decision, as the client does."""
    return raw.request(wire.OP_DECIDE, [shard, txn, outcome, list(participants)])


def wait_until(predicate, timeout=20.0, what="the condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)  # polling a remote state: there is no event to await
    raise AssertionError(f"{what} did not happen within {timeout} s")


def commit_then_conflict(c, a: bytes, b: bytes, c_: bytes) -> None:
    """A transfer across the shards of ``a``, ``b`` and ``c_`` commits everywhere; then one
    whose read key is written behind its back applies nothing anywhere."""
    for k in (a, b, c_):
        c.put(k, b"100")
    with c.transaction() as t:
        t.put(a, str(int(t.get(a)) - 10))
        t.put(b, str(int(t.get(b)) + 4))
        t.put(c_, str(int(t.get(c_)) + 6))
    assert [c.get(k) for k in (a, b, c_)] == [b"90", b"104", b"106"]
    # a write behind the transaction's back to one key it read: nothing applied anywhere
    with pytest.raises(kvstore.TransactionConflict):
        with c.transaction() as t:
            t.get(a)
            t.get(b)
            c.put(b, b"500")
            t.put(a, b"0")
            t.put(c_, b"0")
    assert [c.get(k) for k in (a, b, c_)] == [b"90", b"500", b"106"]


def test_a_cross_shard_transaction_commits_everywhere_or_nowhere(start_node):
    n = start_node(shards=3)
    keys = keys_by_shard(3)
    a, b, c_ = keys[0][0], keys[1][0], keys[2][0]
    with kvstore.connect(n.address, timeout=5) as c:
        commit_then_conflict(c, a, b, c_)
        # read-only across shards: validated, nothing written
        assert c.run_transaction(lambda t: [t.get(k) for k in (a, b, c_)]) == [b"90", b"500", b"106"]
        # deletes across shards
        with c.transaction() as t:
            assert t.delete(a) and t.delete(b)
        assert (c.get(a), c.get(b)) == (None, None)
        with pytest.raises(kvstore.KVError, match="scan inside a transaction"):
            with c.transaction() as t:
                t.scan(b"acct")


def test_an_abandoned_prepare_locks_its_keys_until_a_resolver_aborts_it(start_node):
    n = start_node(shards=2)
    keys = keys_by_shard(2)
    a, b = keys[0][0], keys[1][0]
    raw = Raw(n.address)
    try:
        wait_leader(raw, shards=2)
        assert raw.request(wire.OP_WRITE, [0, b"w", 1, 1, [OP_PUT, a, b"old"]])[0] == wire.STATUS_OK
        status, (_value, revision) = raw.request(wire.OP_GET, [0, a, True])
        deadline = int((time.time() + 1.5) * 1000)
        txn = b"T" * 16
        prepare = TxnPrepare(txn, 1, (0, 1), ((a, revision),), ((a, b"new"),), deadline)
        # the coordinator prepared shard 0 only, then vanished
        assert raw_2pc(raw, 0, 1, prepare) == (wire.STATUS_OK, True)
        # a read of the key it writes waits: the value may be about to change
        assert raw.request(wire.OP_GET, [0, a, False]) == (wire.STATUS_RETRY, LOCKED)
        # a plain write to it applies nothing and says so
        assert raw.request(wire.OP_WRITE, [0, b"w", 2, 2, [OP_PUT, a, b"x"]]) == (wire.STATUS_OK, LOCKED)
        # the client retries a write that met a lock until the resolver frees the key
        with kvstore.connect(n.address, timeout=10) as c:
            t0 = time.monotonic()
            c.put(a, b"after")
            assert time.monotonic() - t0 > 0.5  # it waited for the deadline
            assert c.get(a) == b"after"
        # the resolver recorded ABORT in the coordinator shard: it never changes
        assert raw_decide(raw, 1, txn, COMMIT, (0, 1)) == (wire.STATUS_OK, ABORT)
        # and a late copy of the prepare cannot prepare the finished transaction again
        assert raw_2pc(raw, 0, 3, prepare) == (wire.STATUS_OK, False)
        assert raw.request(wire.OP_GET, [0, a, False]) == (wire.STATUS_OK, b"after")
    finally:
        raw.close()


def test_a_recorded_commit_whose_coordinator_vanished_is_carried_out_by_the_resolver(start_node):
    n = start_node(shards=2)
    keys = keys_by_shard(2)
    a, b = keys[0][0], keys[1][0]
    raw = Raw(n.address)
    try:
        wait_leader(raw, shards=2)
        deadline = int((time.time() + 1.0) * 1000)
        txn = b"U" * 16
        for seq, (shard, key) in enumerate(((0, a), (1, b)), 1):
            p = TxnPrepare(txn, 0, (0, 1), ((key, 0),), ((key, b"committed"),), deadline)
            assert raw_2pc(raw, shard, seq, p) == (wire.STATUS_OK, True)
        # the decide request names shard 0 only: the node that records COMMIT carries it
        # out there, and shard 1's resolver finds it past its deadline and asks shard 0
        assert raw_decide(raw, 0, txn, COMMIT, (0,)) == (wire.STATUS_OK, COMMIT)
        for shard, key in ((0, a), (1, b)):
            wait_until(lambda: raw.request(wire.OP_GET, [shard, key, False])
                       == (wire.STATUS_OK, b"committed"), what=f"the commit at shard {shard}")
        # the outcome stays COMMIT
        assert raw_decide(raw, 0, txn, ABORT, (0, 1)) == (wire.STATUS_OK, COMMIT)
    finally:
        raw.close()


def test_a_one_round_transaction_whose_client_vanished_after_every_yes_is_committed(start_node, monkeypatch):
    """Its client may have been told COMMIT once every yes vote was chosen: the resolver
    must not record ABORT (as it does for a two-round one) but recover the outcome from
    the fenced prepares."""
    monkeypatch.setattr(resolver, "FORGET_AFTER_SECONDS", 3600.0)  # asked about below
    n = start_node(shards=2)
    keys = keys_by_shard(2)
    a, b = keys[0][0], keys[1][0]
    raw = Raw(n.address)
    try:
        wait_leader(raw, shards=2)
        deadline = int((time.time() + 1.0) * 1000)
        txn = b"O" * 16
        for seq, (shard, key) in enumerate(((0, a), (1, b)), 1):
            p = TxnPrepare(txn, 1, (0, 1), ((key, 0),), ((key, b"one-round"),), deadline,
                           one_round=True)
            assert raw_2pc(raw, shard, seq, p) == (wire.STATUS_OK, True)
        # no decide request: the resolvers fence both shards, find both yes votes, commit
        for shard, key in ((0, a), (1, b)):
            wait_until(lambda: raw.request(wire.OP_GET, [shard, key, False])
                       == (wire.STATUS_OK, b"one-round"), what=f"the commit at shard {shard}")
        assert raw_decide(raw, 1, txn, ABORT, (0, 1)) == (wire.STATUS_OK, COMMIT)
    finally:
        raw.close()


def test_a_one_round_prepare_still_in_flight_is_fenced_and_the_transaction_aborted(start_node, monkeypatch):
    monkeypatch.setattr(resolver, "FORGET_AFTER_SECONDS", 3600.0)  # asked about below
    n = start_node(shards=2)
    keys = keys_by_shard(2)
    a, b = keys[0][1], keys[1][1]
    raw = Raw(n.address)
    try:
        wait_leader(raw, shards=2)
        deadline = int((time.time() + 1.0) * 1000)
        txn = b"F" * 16
        late = TxnPrepare(txn, 0, (0, 1), ((b, 0),), ((b, b"late"),), deadline, one_round=True)
        p = TxnPrepare(txn, 0, (0, 1), ((a, 0),), ((a, b"early"),), deadline, one_round=True)
        assert raw_2pc(raw, 0, 1, p) == (wire.STATUS_OK, True)
        # shard 1's prepare has not arrived when shard 0's resolver recovers the transaction
        wait_until(lambda: raw.request(wire.OP_GET, [0, a, False]) == (wire.STATUS_OK, None),
                   what="the recovery's abort at shard 0")
        assert raw_decide(raw, 0, txn, COMMIT, (0, 1)) == (wire.STATUS_OK, ABORT)
        # the fence makes the late prepare vote no: it can never commit the transaction
        assert raw_2pc(raw, 1, 2, late) == (wire.STATUS_OK, False)
        assert raw.request(wire.OP_GET, [1, b, False]) == (wire.STATUS_OK, None)
    finally:
        raw.close()


def test_a_client_commits_across_shards_in_one_round_by_default_and_in_two_when_asked(start_node,
                                                                                     monkeypatch):
    from kvstore.client import txn as client_txn
    made = []

    class Spy(client_txn.Coordinator):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(client_txn, "Coordinator", Spy)
    n = start_node(shards=3)
    keys = keys_by_shard(3)
    a, b, c_ = keys[0][0], keys[1][0], keys[2][0]
    with kvstore.connect(n.address, timeout=5) as c:
        commit_then_conflict(c, a, b, c_)  # one round: answered after the votes, and
        # the reads wait for the decision to be carried out
        c.put(a, b"1")  # every lock was freed
        c.put(c_, b"1")
        assert c.run_transaction(lambda t: [t.get(k) for k in (a, b, c_)]) == [b"1", b"500", b"1"]
    assert [co.one_round for co in made] == [True, True, False]  # the last one is read-only
    with kvstore.connect(n.address, timeout=5, one_round_commit=False) as c:
        with c.transaction() as t:  # two rounds, as nodes of earlier versions take
            t.put(a, b"2")
            t.put(b, b"2")
        assert [c.get(a), c.get(b)] == [b"2", b"2"]
    assert not made[-1].one_round


def test_the_asyncio_client_commits_in_one_round_too(start_node):
    import asyncio

    import kvstore.aio
    n = start_node(shards=2)
    keys = keys_by_shard(2)
    a, b = keys[0][0], keys[1][0]

    async def main():
        async with await kvstore.aio.connect(n.address, timeout=5) as db:
            assert db._kv.one_round_commit  # the default
            async with db.transaction() as t:
                await t.put(a, b"1")
                await t.put(b, b"2")
            return [await db.get(a), await db.get(b)]

    assert asyncio.run(main()) == [b"1", b"2"]


def test_a_malformed_2pc_entry_is_refused_and_changes_nothing(start_node):
    n = start_node(shards=2)
    raw = Raw(n.address)
    try:
        wait_leader(raw, shards=2)
        status, value = raw.request(wire.OP_WRITE, [0, b"c", 1, 1, [OP_2PC, b"\x93junk"]])
        assert status == wire.STATUS_ERROR and "InvalidArgument" in value[0]
        keys = keys_by_shard(2)
        wrong = TxnPrepare(b"V" * 16, 0, (0, 1), (), ((keys[1][0], b"v"),), 0)
        status, value = raw_2pc(raw, 0, 2, wrong)  # a key of shard 1 sent to shard 0
        assert status == wire.STATUS_ERROR and "belongs to shard 1" in value[1]
    finally:
        raw.close()


def test_a_snapshot_carries_prepared_transactions_and_their_locks(tmp_path):
    src = WalReplicaStorage(str(tmp_path / "src"), shards=1)
    dst = WalReplicaStorage(str(tmp_path / "dst"), shards=1)
    try:
        p = TxnPrepare(b"W" * 16, 0, (0,), (), ((b"k", b"v"),), 0)
        cmd = encode_client_command(b"c", 1, 1, [OP_2PC, encode(p)])
        rec = encode_record(0, 65536, KIND_BATCH, msgpack.packb([cmd]))
        assert src.save([ShardWrite(0, 65536, 0, [rec], committed=[
            Entry(0, 65536, KIND_BATCH, [cmd])])]) == [(0, 0, (b"c", 1), True)]
        assert src.get(0, b"k") == LOCKED
        assert [x.txn_id for x in src.expired_prepares(0, 1)] == [b"W" * 16]
        from kvstore.paxos.replica import Snapshot
        dst.save([ShardWrite(0, 65536, 0, [], snapshot=Snapshot(0, src.snapshot_data(0)))])
        assert dst.get(0, b"k") == LOCKED
        assert [x.txn_id for x in dst.expired_prepares(0, 1)] == [b"W" * 16]
    finally:
        src.close()
        dst.close()


def test_run_transaction_locks_the_reads_of_a_cross_shard_transaction_that_keeps_losing(start_node):
    from kvstore.client import LOCKING_AFTER_CONFLICTS, ClusterTxn
    n = start_node(shards=2)
    keys = keys_by_shard(2)
    a, b, other = keys[0][0], keys[1][0], keys[1][1]
    with kvstore.connect(n.address, timeout=5) as c, kvstore.connect(n.address, timeout=5) as c2:
        c.put(a, b"1")
        c.put(b, b"2")
        seen = []

        def audit(t):
            seen.append(t._lock_keys)
            total = int(t.get(a)) + int(t.get(b))
            if len(seen) <= LOCKING_AFTER_CONFLICTS:
                c2.put(a, b"%d" % (int(c2.get(a)) + 1))  # a writer behind its back, each time
            return total

        assert c.run_transaction(audit) == int(c.get(a)) + 2
        assert seen[:LOCKING_AFTER_CONFLICTS] == [None] * LOCKING_AFTER_CONFLICTS
        assert seen[LOCKING_AFTER_CONFLICTS] == {a, b}  # then its reads were locked
        # a locking read: the keys stay put until the transaction ends
        t = ClusterTxn(c, lock_keys={a, b})
        with pytest.raises(kvstore.TransactionConflict):
            with t:
                assert t.get(a) == c.get(a)  # a read lock does not stop a plain read
                raw = Raw(n.address)
                try:
                    assert raw.request(wire.OP_WRITE, [1, b"w", 1, 1, [OP_PUT, b, b"x"]]) \
                        == (wire.STATUS_OK, LOCKED)
                    assert raw.request(wire.OP_GET, [1, b, False]) == (wire.STATUS_OK, b"2")
                finally:
                    raw.close()
                assert t.get(b) == b"2"
                t.get(other)  # outside what it locked: a conflict, and the locks are freed
        c2.put(b, b"3")  # free again
        assert c.get(b) == b"3"


def test_a_locked_transfer_prepares_its_writes_under_its_own_locks(start_node):
    from kvstore.client import LOCKING_AFTER_CONFLICTS
    n = start_node(shards=2)
    keys = keys_by_shard(2)
    a, b = keys[0][0], keys[1][0]
    with kvstore.connect(n.address, timeout=5) as c, kvstore.connect(n.address, timeout=5) as c2:
        c.put(a, b"100")
        c.put(b, b"100")
        attempts = []

        def transfer(t):
            attempts.append(t._lock_keys)
            x, y = int(t.get(a)), int(t.get(b))
            if len(attempts) <= LOCKING_AFTER_CONFLICTS:
                c2.put(a, b"%d" % (int(c2.get(a)) + 10))  # a deposit behind its back
            t.put(a, b"%d" % (x - 1))
            t.put(b, b"%d" % (y + 1))

        c.run_transaction(transfer)
        assert attempts[-1] == {a, b} and len(attempts) == LOCKING_AFTER_CONFLICTS + 1
        assert (c.get(a), c.get(b)) == (b"%d" % (100 + 10 * LOCKING_AFTER_CONFLICTS - 1), b"101")
        c2.put(a, b"0")  # every lock was freed
        c2.put(b, b"0")
        assert (c.get(a), c.get(b)) == (b"0", b"0")


def test_a_locked_read_whose_locks_a_resolver_freed_is_a_conflict(start_node):
    from kvstore.client import ClusterTxn
    n = start_node(shards=2)
    keys = keys_by_shard(2)
    a, b = keys[0][0], keys[1][0]
    with kvstore.connect(n.address, timeout=5) as c:
        c.put(a, b"1")
        c.put(b, b"2")
        t = ClusterTxn(c, lock_keys={a, b})
        with pytest.raises(kvstore.TransactionConflict):
            with t:
                assert (t.get(a), t.get(b)) == (b"1", b"2")
                # as a resolver does for a lock past its deadline: ABORT recorded first
                raw = Raw(n.address)
                try:
                    assert raw_decide(raw, 0, t._locked[0], ABORT, (0, 1)) == \
                        (wire.STATUS_OK, ABORT)
                finally:
                    raw.close()
        # the values are not trusted, and the locks are freed
        c.put(a, b"3")
        assert c.run_transaction(lambda t: [t.get(a), t.get(b)]) == [b"3", b"2"]


def test_a_one_round_commit_then_close_at_once_leaves_no_lock_behind(start_node):
    """A one-round transaction is answered before its decide is sent; a client closed at
    once used to drop the decide with its sockets, and the keys stayed locked until a
    resolver recovered the transaction (its deadline, 2 s): a reader within 1 s failed.
    ``close`` now waits (up to 2 s) for the calls still under way."""
    n = start_node(shards=2)
    keys = keys_by_shard(2)
    a, b = keys[0][0], keys[1][0]
    for attempt in range(5):
        c = kvstore.connect(n.address, timeout=5, one_round_commit=True)
        with c.transaction() as t:
            t.put(a, b"%d" % attempt)
            t.put(b, b"%d" % attempt)
        c.close()
        with kvstore.connect(n.address, timeout=1) as r:
            assert [r.get(a), r.get(b)] == [b"%d" % attempt] * 2


# ---------------------------------------------------------------- forgetting what was carried out


def kept(n, shards: int, table: str, outcome: int) -> int:
    """How many ``table`` ("finished", "decided") records of ``outcome`` the shards keep."""
    return sum(n.node.storage.txn_records(s)[table][outcome] for s in range(shards))


def transfers(c, keys, count: int) -> None:
    """``count`` transfers across the shards of ``keys``, and one that conflicts."""
    a, b = keys[0][0], keys[1][0]
    for _ in range(count):
        with c.transaction() as t:
            t.put(a, b"%d" % (int(t.get(a) or 0) - 1))
            t.put(b, b"%d" % (int(t.get(b) or 0) + 1))
    with pytest.raises(kvstore.TransactionConflict):
        with c.transaction() as t:
            t.get(a)
            c.put(a, b"0")
            t.put(b, b"lost")


def test_the_commits_carried_out_everywhere_are_forgotten(start_node, monkeypatch):
    """Each cross-shard transaction used to leave its outcome on every participant and its
    decision on the coordinator shard for ever (~40 bytes each, without bound). Once a
    COMMIT is carried out everywhere, the node that did it forgets it there (and, for a
    one-round transaction, its recorded decision); the ABORTs are kept."""
    monkeypatch.setattr(resolver, "FORGET_AFTER_SECONDS", 0.0)
    n = start_node(shards=2)
    keys = keys_by_shard(2)
    with kvstore.connect(n.address, timeout=5) as one, \
            kvstore.connect(n.address, timeout=5, one_round_commit=False) as two:
        transfers(one, keys, 10)
        transfers(two, keys, 10)
        wait_until(lambda: kept(n, 2, "finished", COMMIT) == 0, what="every COMMIT forgotten")
        assert kept(n, 2, "decided", COMMIT) == 10  # the two-round ones' (a retried decide reads it)
        assert (kept(n, 2, "finished", ABORT), kept(n, 2, "decided", ABORT)) == (4, 2)
        assert [one.get(keys[0][0]), one.get(keys[1][0])] == [b"0", b"20"]


def test_commits_whose_forget_was_lost_are_swept_by_the_shard_leaders(start_node, monkeypatch):
    """The node that carried COMMITs out crashed before its forgets (here: its queue of
    them is dropped). Two sweeps in a row find them, carry them out everywhere again and
    forget them."""
    monkeypatch.setattr(resolver, "FORGET_AFTER_SECONDS", 3600.0)
    monkeypatch.setattr(resolver, "SWEEP_EVERY_SECONDS", 0.2)
    n = start_node(shards=2)
    keys = keys_by_shard(2)
    with kvstore.connect(n.address, timeout=5) as c:
        transfers(c, keys, 3)
        wait_until(lambda: len(n.node._to_forget) >= 3, what="every forget queued")
        assert kept(n, 2, "finished", COMMIT) == 6
        monkeypatch.setattr(n.node, "_to_forget", [])  # lost with the node that queued them
        monkeypatch.setattr(resolver, "FORGET_AFTER_SECONDS", 0.0)
        wait_until(lambda: kept(n, 2, "finished", COMMIT) == 0, what="every lingering COMMIT forgotten")
        assert kept(n, 2, "finished", ABORT) == 2  # the conflict's, kept


def test_a_coordinator_retrying_after_its_commit_was_forgotten_hears_commit_and_applies_nothing_twice(
        start_node, monkeypatch):
    """After the forget, a retried prepare is answered from the client's session (no
    second lock, no second vote), and a two-round coordinator retrying its decide still
    hears COMMIT: the recorded decision of a two-round transaction is kept."""
    monkeypatch.setattr(resolver, "FORGET_AFTER_SECONDS", 0.0)
    n = start_node(shards=2)
    keys = keys_by_shard(2)
    a, b = keys[0][1], keys[1][1]
    with kvstore.connect(n.address, timeout=5) as c:
        transfers(c, keys, 1)  # one-round: the shards take TxnForget from now on
        raw = Raw(n.address)
        try:
            txn = b"Z" * 16
            deadline = int((time.time() + 5) * 1000)
            prepares = [(shard, seq, TxnPrepare(txn, 0, (0, 1), ((key, 0),), ((key, b"once"),),
                                                deadline))
                        for seq, (shard, key) in enumerate(((0, a), (1, b)), 10)]
            for shard, seq, p in prepares:
                assert raw_2pc(raw, shard, seq, p) == (wire.STATUS_OK, True)
            assert raw_decide(raw, 0, txn, COMMIT, (0, 1)) == (wire.STATUS_OK, COMMIT)
            wait_until(lambda: kept(n, 2, "finished", COMMIT) == 0, what="the COMMIT forgotten")
            c.put(a, b"after")
            for shard, seq, p in prepares:  # a late copy: its first answer, nothing locked
                assert raw_2pc(raw, shard, seq, p) == (wire.STATUS_OK, True)
            assert raw_decide(raw, 0, txn, COMMIT, (0, 1)) == (wire.STATUS_OK, COMMIT)
            c.put(b, b"after")  # nothing holds b (a second prepare would have locked it)
            assert [c.get(a), c.get(b)] == [b"after", b"after"]
        finally:
            raw.close()


def test_a_lone_cross_shard_commit_sends_its_prepares_on_the_direct_path(start_node):
    """A lone transaction's reads and its prepares (one per shard, at once) skip the I/O
    thread, as a lone get or put does: the sync client sent all of them through it, the
    asyncio client one prepare of two (two thread hand-offs more than a one-shard commit)."""
    import asyncio

    import kvstore.aio
    n = start_node(shards=2)
    keys = keys_by_shard(2)
    a, b = keys[0][0], keys[1][0]
    with kvstore.connect(n.address, timeout=5, one_round_commit=True) as c:
        c.put(a, b"10")
        c.put(b, b"10")
        before = c._core.direct_calls
        with c.transaction() as t:
            t.put(a, b"%d" % (int(t.get(a)) - 1))
            t.put(b, b"%d" % (int(t.get(b)) + 1))
        assert c._core.direct_calls - before == 4  # two reads, two prepares
        assert [c.get(a), c.get(b)] == [b"9", b"11"]

    async def transfer() -> int:
        async with await kvstore.aio.connect(n.address, timeout=5, one_round_commit=True) as db:
            await db.get(a)
            await db.get(b)
            before = db._core.direct_calls
            async with db.transaction() as t:
                await t.put(a, b"%d" % (int(await t.get(a)) - 1))
                await t.put(b, b"%d" % (int(await t.get(b)) + 1))
            return db._core.direct_calls - before

    assert asyncio.run(transfer()) == 4
    with kvstore.connect(n.address, timeout=5) as c:
        assert [c.get(a), c.get(b)] == [b"8", b"12"]
