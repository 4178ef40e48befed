"""``cas(key, expected, new, lease=...)``: a cas whose new value lives with a lease, one
command (``CasLease``) on every engine: the lock recipe's "create only if absent, held by
my lease" without a window between the check and the write."""

import pytest

import kvstore
from kvstore import commands as C
from kvstore.machine.data import value_of
from kvstore.machine.leases import LeaseTable, apply_leased
from kvstore.storage import Storage


@pytest.fixture
def apply(tmp_path):
    storage = Storage(str(tmp_path / "s"), shards=1)
    tables = storage.shards[0]
    revision = [0]

    def run(command, changes=None):
        revision[0] += 1
        out = []
        storage.write(lambda txn: out.append(apply_leased(
            txn, tables.data, revision[0], command, LeaseTable(txn, tables.txns), changes)))
        return out[0]

    run.get = lambda key: storage.read(lambda txn: value_of(key, txn.get(key, db=tables.data)))
    run.lease_of = lambda key: storage.read(lambda txn: LeaseTable(txn, tables.txns).lease_of(key))
    yield run
    storage.close()


def test_a_cas_with_a_lease_creates_if_absent_attaches_and_goes_with_the_lease(apply):
    assert apply(C.cas_lease(b"k", None, b"a", 7)) == C.NO_LEASE, "no such lease: refused"
    assert apply.get(b"k") is None
    apply(C.lease_grant(7, 1000))
    changes = []
    assert apply(C.cas_lease(b"k", None, b"a", 7), changes) is True
    assert changes == [(b"k", b"a", None)]
    assert apply.get(b"k") == b"a" and apply.lease_of(b"k") == 7
    assert apply(C.cas_lease(b"k", None, b"b", 7)) is False, "present: not swapped"
    assert apply(C.cas_lease(b"k", b"a", b"b", 7)) is True
    assert apply(C.lease_revoke(7)) == 1
    assert apply.get(b"k") is None


def test_a_cas_with_a_lease_that_deletes_detaches_and_a_gone_lease_changes_nothing(apply):
    apply(C.lease_grant(7, 1000))
    apply(C.cas_lease(b"k", None, b"a", 7))
    changes = []
    assert apply(C.cas_lease(b"k", b"a", None, 7), changes) is True
    assert changes == [(b"k", None, b"a")]
    assert apply.get(b"k") is None and apply.lease_of(b"k") is None
    apply(C.put(b"k", b"plain"))
    apply(C.lease_revoke(7))
    assert apply(C.cas_lease(b"k", b"plain", b"x", 7)) == C.NO_LEASE
    assert apply.get(b"k") == b"plain"


@pytest.mark.parametrize("forged", [
    [C.OP_CAS_LEASE, b"k", None, b"v"],                   # no lease id
    [C.OP_CAS_LEASE, b"k", None, b"v", 0],                # out of range
    [C.OP_CAS_LEASE, b"k", None, b"v", True],             # a bool is no id
    [C.OP_CAS_LEASE, b"k", None, b"v", 1 << 63],          # an anonymous lease's id
    [C.OP_CAS_LEASE, "k", None, b"v", 1],                 # a str key
    [C.OP_CAS_LEASE, b"k", 3, b"v", 1],                   # expected not bytes
])
def test_a_forged_cas_with_a_lease_is_refused_where_it_is_decoded(forged):
    with pytest.raises(ValueError):
        C.decode_command(forged)


def test_decoding_a_cas_with_a_lease_round_trips():
    command = C.cas_lease(b"k", None, b"v", 5)
    assert C.decode_command(list(command)) == command


def test_the_embedded_store_cas_with_a_lease(tmp_path):
    with kvstore.open(str(tmp_path / "db"), shards=3) as db:
        lease = db.lease(10)
        assert db.cas("k", None, "holder", lease=lease) is True
        assert db.cas("k", None, "other", lease=lease) is False
        assert db.get("k") == b"holder"
        lease.revoke()
        assert db.get("k") is None
        with pytest.raises(kvstore.LeaseExpired):
            db.cas("k", None, "late", lease=lease)
        assert db.get("k") is None
        assert db.cas("k", None, "plain") is True  # without a lease: as before


def test_a_cluster_cas_with_a_lease_sync_and_asyncio(tmp_path):
    import asyncio

    from conftest import child_env
    from kvstore.server.local import LocalCluster
    lc = LocalCluster(str(tmp_path / "c"), 1, 2, env=child_env())
    try:
        lc.start_all()
        lc.wait_ready(timeout=30)
        with lc.client() as db:
            lease = db.lease(10)
            assert db.cas("k", None, "holder", lease=lease) is True
            assert db.cas("k", None, "other", lease=lease) is False
            lease.revoke()
            assert db.get("k") is None
            with pytest.raises(kvstore.LeaseExpired):
                db.cas("k", None, "late", lease=lease)

            async def main():
                a = await kvstore.aio.connect(db._addresses)
                try:
                    async_lease = await a.lease(10)
                    assert await a.cas("k2", None, "x", lease=async_lease) is True
                    assert await a.cas("k2", None, "y", lease=async_lease) is False
                    await async_lease.revoke()
                    assert await a.get("k2") is None
                    with pytest.raises(kvstore.LeaseExpired):
                        await a.cas("k2", None, "z", lease=async_lease)
                finally:
                    await a.close()

            asyncio.run(main())
    finally:
        lc.close()
