"""Leases as replicated state (``kvstore.machine.leases``): attach, detach, revoke, expire,
snapshots; and the lease commands' decoding (hostile ids and ttls refused)."""

import msgpack
import pytest

from kvstore import commands as C
from kvstore.machine.data import value_of
from kvstore.machine.leases import LEASE_ATTACHED, LeaseTable, apply_leased
from kvstore.machine.replica import (SessionCache, apply_client_command, install_snapshot,
                                     lease_records)
from kvstore.paxos.replica import Snapshot
from kvstore.storage import Storage
from kvstore.txn import COMMIT, TxnPrepare, TxnResolve


@pytest.fixture
def shard(tmp_path):
    storage = Storage(str(tmp_path / "s"), shards=1)
    yield storage, storage.shards[0]
    storage.close()


class Applier:
    """Applies commands as a node does, one entry (revision) each, in one LMDB write."""

    def __init__(self, storage, tables) -> None:
        self.storage, self.t = storage, tables
        self.revision = 0

    def __call__(self, *commands, changes=None):
        self.revision += 1
        out = []

        def fn(txn):
            out.clear()
            leases = LeaseTable(txn, self.t.txns)
            for c in commands:
                out.append(apply_leased(txn, self.t.data, self.revision, c, leases, changes))
        self.storage.write(fn)
        return out[0] if len(out) == 1 else out

    def get(self, key):
        return self.storage.read(lambda txn: value_of(key, txn.get(key, db=self.t.data)))

    def leases(self):
        return self.storage.read(lambda txn: lease_records(txn, self.t))

    def attached(self):
        return self.storage.read(lambda txn: LeaseTable(txn, self.t.txns).attached)

    def lease_of(self, key):
        return self.storage.read(lambda txn: LeaseTable(txn, self.t.txns).lease_of(key))


@pytest.fixture
def apply(shard):
    return Applier(*shard)


def test_put_with_a_lease_and_revoke_deletes_exactly_its_keys(apply):
    assert apply(C.lease_grant(7, 1000)) is True
    assert apply(C.lease_grant(8, 1000)) is True
    apply(C.put_lease(b"a", b"1", 7), C.put_lease(b"b", b"2", 7), C.put_lease(b"c", b"3", 8),
          C.put(b"d", b"4"))
    assert apply.attached() == 3
    changes = []
    assert apply(C.lease_revoke(7), changes=changes) == 2
    assert [apply.get(k) for k in (b"a", b"b", b"c", b"d")] == [None, None, b"3", b"4"]
    assert sorted(changes) == [(b"a", None, b"1"), (b"b", None, b"2")]
    assert [lid for lid, _, _ in apply.leases()] == [8]
    assert apply.attached() == 1
    assert apply(C.lease_revoke(7)) is False  # unknown now


def test_a_plain_write_detaches_its_key(apply):
    apply(C.lease_grant(7, 1000))
    apply(C.put_lease(b"a", b"1", 7), C.put_lease(b"b", b"2", 7), C.put_lease(b"c", b"3", 7),
          C.put_lease(b"e", b"5", 7), C.put_lease(b"n", b"5", 7))
    apply(C.put(b"a", b"x"))  # overwrite
    apply(C.cas(b"b", b"2", b"y"))
    apply(C.cas(b"c", b"nope", b"z"))  # a failed cas changes nothing: c stays attached
    apply(C.incr(b"n", 1))
    apply(C.txn([], [], [[b"e", b"t"]]))
    assert apply.lease_of(b"c") == 7 and apply.lease_of(b"a") is None
    assert apply.attached() == 1
    assert apply(C.lease_revoke(7)) == 1
    assert [apply.get(k) for k in (b"a", b"b", b"c", b"e", b"n")] == [b"x", b"y", None, b"t", b"6"]


def test_a_delete_detaches_and_a_re_put_with_another_lease_moves_the_key(apply):
    apply(C.lease_grant(7, 1000))
    apply(C.lease_grant(9, 1000))
    apply(C.put_lease(b"a", b"1", 7))
    apply(C.put_lease(b"a", b"2", 9))  # moved
    assert apply(C.lease_revoke(7)) == 0 and apply.get(b"a") == b"2"
    apply(C.put_lease(b"b", b"1", 9))
    apply(C.delete(b"b"))
    apply(C.put(b"b", b"again"))
    assert apply(C.lease_revoke(9)) == 1
    assert (apply.get(b"a"), apply.get(b"b")) == (None, b"again")
    assert apply.attached() == 0


def test_put_with_an_unknown_lease_changes_nothing(apply):
    assert apply(C.put_lease(b"a", b"1", 5)) == C.NO_LEASE
    assert apply.get(b"a") is None and apply.attached() == 0


def test_expire_loses_to_a_keepalive_that_won_the_race(apply):
    apply(C.lease_grant(7, 1000))  # revision 1
    apply(C.put_lease(b"a", b"1", 7))
    assert apply(C.lease_keepalive(7)) is True  # revision 3: refreshed
    assert apply(C.lease_expire(7, 1)) is False  # the leader decided on revision 1
    assert apply.get(b"a") == b"1"
    assert apply(C.lease_expire(7, 3)) == 1
    assert apply.get(b"a") is None
    assert apply(C.lease_keepalive(7)) is False  # gone


def test_put_ttl_makes_an_anonymous_lease_per_put(apply):
    apply(C.put_ttl(b"a", b"1", 500), C.put_ttl(b"b", b"2", 700))  # one entry, one revision
    records = apply.leases()
    assert len(records) == 2 and len({lid for lid, _, _ in records}) == 2
    assert all(lid > C.LEASE_ID_MAX for lid, _, _ in records)
    lid_a = apply.lease_of(b"a")
    assert apply(C.lease_expire(lid_a, 1)) == 1
    assert (apply.get(b"a"), apply.get(b"b")) == (None, b"2")
    apply(C.put(b"b", b"for good"))  # its anonymous lease held only b: it ends with it
    assert apply.leases() == [] and apply.attached() == 0
    apply(C.put_ttl(b"c", b"1", 500))
    apply(C.put_ttl(b"c", b"2", 900))  # a new ttl: the first anonymous lease ends
    assert [ttl for _lid, ttl, _rev in apply.leases()] == [900]


def test_no_lease_lookup_on_a_shard_without_attached_keys(shard):
    """The hot path: with nothing attached, a plain put reads nothing of the lease state."""
    storage, t = shard

    class Counting:
        def __init__(self, txn):
            self.txn, self.gets = txn, []

        def get(self, key, default=None, db=None):
            self.gets.append(key)
            return self.txn.get(key, default, db=db)

        def put(self, key, value, db=None):
            return self.txn.put(key, value, db=db)

    def fn(txn):
        view = Counting(txn)
        leases = LeaseTable(view, t.txns)
        view.gets.clear()
        for i in range(10):
            apply_leased(view, t.data, 1, C.put(b"k%d" % i, b"v"), leases)
        return view.gets
    assert storage.write(fn) == []


def test_snapshots_carry_leases(shard, tmp_path):
    storage, t = shard
    apply = Applier(storage, t)
    apply(C.lease_grant(7, 1000))
    apply(C.put_lease(b"a", b"1", 7))
    rows = storage.read(lambda txn: [(bytes(k), bytes(v)) for k, v in txn.cursor(t.data)])
    txn_rows = storage.read(lambda txn: [(bytes(k), bytes(v)) for k, v in txn.cursor(t.txns)])
    data = msgpack.packb([rows, txn_rows], use_bin_type=True)
    other = Storage(str(tmp_path / "o"), shards=1)
    try:
        ot = other.shards[0]
        other.write(lambda txn: install_snapshot(txn, ot, Snapshot(index=2, data=data)))
        copy = Applier(other, ot)
        copy.revision = 2
        assert copy.leases() == [(7, 1000, 1)]
        assert copy(C.lease_revoke(7)) == 1 and copy.get(b"a") is None
    finally:
        other.close()


def test_client_sessions_apply_lease_commands_and_a_2pc_commit_detaches(shard):
    storage, t = shard
    results = []

    def entry(slot, command):
        def fn(txn):
            sessions = SessionCache(txn, t.txns)
            leases = LeaseTable(txn, t.txns)
            results.append(apply_client_command(
                txn, t, slot, C.ClientCommand(b"c", slot, 0, command), sessions, leases=leases)[1])
            sessions.flush()
        storage.write(fn)

    entry(0, C.lease_grant(7, 1000))
    entry(1, C.put_lease(b"a", b"1", 7))
    prepare = TxnPrepare(b"t" * 16, 0, (0,), (), ((b"a", b"2"),), 1 << 60)
    entry(2, C.two_pc(prepare))
    entry(3, C.lease_revoke(7))  # a prepared transaction holds a: nothing changes
    assert results[-1] == C.LOCKED
    entry(4, C.two_pc(TxnResolve(b"t" * 16, COMMIT)))
    entry(5, C.lease_revoke(7))
    assert results[-1] == 0  # a was detached by the transaction's write
    assert storage.read(lambda txn: value_of(b"a", txn.get(b"a", db=t.data))) == b"2"


@pytest.mark.parametrize("bad", [
    [C.OP_LEASE_GRANT, 0, 1000], [C.OP_LEASE_GRANT, 1 << 63, 1000], [C.OP_LEASE_GRANT, -1, 1000],
    [C.OP_LEASE_GRANT, 1, 0], [C.OP_LEASE_GRANT, 1, C.TTL_MS_MAX + 1], [C.OP_LEASE_GRANT, 1, 1.5],
    [C.OP_LEASE_GRANT, True, 10], [C.OP_LEASE_GRANT, 1], [C.OP_LEASE_KEEPALIVE, b"x"],
    [C.OP_LEASE_REVOKE, 1 << 64], [C.OP_PUT_LEASE, b"k", b"v", 0], [C.OP_PUT_LEASE, "k", b"v", 1],
    [C.OP_PUT_TTL, b"k", b"v", -5], [C.OP_PUT_TTL, b"k", None, 5], [C.OP_LEASE_EXPIRE, 0, 0],
    [C.OP_LEASE_EXPIRE, 1, -1],
])
def test_forged_lease_commands_are_refused(bad):
    with pytest.raises(ValueError):
        C.decode_command(bad)


def test_ttl_bounds_in_the_api():
    assert C.check_ttl(0.001) == 1 and C.check_ttl(2) == 2000
    for bad in (0, -1, 0.0001, 366 * 86400, float("nan"), float("inf"), "5", True, None):
        with pytest.raises(C.InvalidArgument):
            C.check_ttl(bad)
    for bad in (0, 1 << 63, -3, "1", 1.0, True):
        with pytest.raises(C.InvalidArgument):
            C.check_lease_id(bad)


def test_attached_count_lives_in_the_state(apply, shard):
    storage, t = shard
    apply(C.lease_grant(7, 1000))
    apply(C.put_lease(b"a", b"1", 7))
    raw = storage.read(lambda txn: bytes(txn.get(LEASE_ATTACHED, db=t.txns)))
    assert int.from_bytes(raw, "big") == 1
