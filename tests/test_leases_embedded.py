"""Leases and TTLs on the embedded store: expiry never before the ttl and within ttl + the
reaper's wake-up + one commit, keep-alive (automatic while the Lease lives, explicit),
revoke, detach on a plain write, every shard, a restart, and the hot path untouched."""

from __future__ import annotations

import gc
import time

import pytest

import kvstore


#: A key of a lease nobody keeps alive is gone within ttl + this (the reaper wakes at the
#: deadline and writes one group commit; generous for a loaded 2-core test machine).
SLACK = 0.5

pytestmark = pytest.mark.timeout(60)


def wait_gone(db, key: bytes, until: float) -> float:
    """Poll ``key`` until a read finds it gone (when that read returned); a read that
    still finds it, begun after ``until`` (monotonic), fails."""
    while True:
        started = time.monotonic()
        if db.get(key) is None:
            return time.monotonic()
        assert started < until, f"{key!r} still there {started - until:.3f} s past its bound"
        time.sleep(0.005)


def test_a_ttl_put_vanishes_never_before_its_ttl_and_soon_after(db):
    ttl = 0.4
    before = time.monotonic()
    db.put(b"session", b"v", ttl=ttl)
    after = time.monotonic()
    db.put(b"forever", b"v")
    gone = wait_gone(db, b"session", after + ttl + SLACK)
    assert gone >= before + ttl, f"expired {before + ttl - gone:.3f} s early"
    assert db.get(b"forever") == b"v"
    print(f"embedded ttl expiry: {1000 * (gone - after - ttl):.1f} ms after the ttl")


def test_a_lease_lives_while_kept_alive_and_dies_once_dropped(db):
    ttl = 0.3
    lease = db.lease(ttl)
    keys = [b"k%d" % i for i in range(6)]  # over every shard of a 3-shard store
    for k in keys:
        db.put(k, b"v", lease=lease)
    deadline = time.monotonic() + 4 * ttl
    while time.monotonic() < deadline:  # the timer keeps it alive past several ttls
        assert all(db.get(k) == b"v" for k in keys)
        time.sleep(0.02)
    assert lease.active and not lease.expired
    dropped = time.monotonic()
    del lease
    gc.collect()  # the timer held it weakly: nobody keeps it alive any more
    gone = wait_gone(db, keys[0], dropped + ttl + ttl / 3 + SLACK)
    assert all(db.get(k) is None for k in keys)
    assert gone >= dropped + ttl - ttl / 3  # its last keep-alive was at most ttl/3 earlier


def test_revoke_deletes_exactly_its_keys_and_a_plain_write_detaches(db):
    lease = db.lease(30)
    other = db.lease(30)
    db.put(b"a", b"1", lease=lease)
    db.put(b"b", b"2", lease=lease)
    db.put(b"c", b"3", lease=other)
    db.put(b"b", b"mine")  # a plain write: b now lives for good
    assert lease.revoke() == 1
    assert (db.get(b"a"), db.get(b"b"), db.get(b"c")) == (None, b"mine", b"3")
    with pytest.raises(kvstore.LeaseExpired):
        db.put(b"a", b"again", lease=lease)
    assert db.get(b"a") is None
    with pytest.raises(kvstore.LeaseExpired):
        lease.keepalive()
    with other:
        other.keepalive()
    assert db.get(b"c") is None  # revoked on leaving the with block


def test_a_keepalive_after_expiry_says_so(store):
    db = store()
    lease = kvstore.Lease(db, db.lease(0.1).id, 0.1, keep_alive=False)  # no timer
    db.put(b"a", b"1", lease=lease)
    wait_gone(db, b"a", time.monotonic() + 0.1 + SLACK)
    with pytest.raises(kvstore.LeaseExpired):
        lease.keepalive()
    assert lease.expired


def test_leases_survive_a_restart_with_a_full_ttl_from_the_open(store):
    db = store()
    db.put(b"a", b"1", ttl=0.5)
    lease = db.lease(60)
    db.put(b"b", b"2", lease=lease.id)
    lease_id = lease.id
    time.sleep(0.3)  # a part of a's ttl passes before the restart
    db.close()
    opened = time.monotonic()
    db = store(db.path)
    assert db.get(b"a") == b"1" and db.get(b"b") == b"2"
    gone = wait_gone(db, b"a", opened + 0.5 + SLACK)
    assert gone >= opened + 0.5  # a full ttl from the open
    assert kvstore.Lease(db, lease_id, 60, keep_alive=False).revoke() == 1
    assert db.get(b"b") is None
    assert db.verify()["values"] == 0


def test_a_store_without_leases_never_looks_at_them(store):
    db = store(shards=2)
    for i in range(50):
        db.put(b"k%d" % i, b"v")
    db.delete(b"k1")
    with db.transaction() as t:
        t.put(b"k2", b"w")
    assert db._lease_shards == [False, False]
    assert db._reaper._thread is None


def test_bad_lease_arguments_change_nothing(db):
    for kwargs in ({"lease": 0}, {"lease": 1 << 63}, {"lease": "x"}, {"ttl": 0},
                   {"ttl": -1}, {"ttl": float("nan")}, {"ttl": 10 ** 9}, {"lease": 5, "ttl": 1}):
        with pytest.raises(kvstore.InvalidArgument):
            db.put(b"a", b"1", **kwargs)
    with pytest.raises(kvstore.LeaseExpired):
        db.put(b"a", b"1", lease=12345)  # never granted
    for ttl in (0, -1, "1", None, 10 ** 9):
        with pytest.raises(kvstore.InvalidArgument):
            db.lease(ttl)
    assert db.get(b"a") is None


def test_reaper_expires_through_group_commit_with_a_command_that_lost_the_race(store):
    """A keep-alive applied after the reaper chose to expire keeps the lease: the
    LeaseExpire names the revision it saw refreshed, and changes nothing."""
    db = store()
    lease = kvstore.Lease(db, db.lease(30).id, 30, keep_alive=False)
    db.put(b"a", b"1", lease=lease)
    (shard, lease_id), (_deadline, revision) = next(iter(db._reaper._deadlines.items()))
    lease.keepalive()  # refreshed after the revision the reaper knew
    from kvstore.commands import lease_expire
    assert db._expire_lease(shard, lease_expire(lease_id, revision)) is False
    assert db.get(b"a") == b"1"



def test_an_expiry_and_a_revoke_are_delete_events_at_one_revision(db):
    with db.watch(prefix=b"w/", prev_value=True) as watch:
        lease = db.lease(30)
        db.put(b"w/a", b"1", lease=lease)
        db.put(b"w/b", b"2", lease=lease)
        db.put(b"w/t", b"3", ttl=0.2)
        lease.revoke()
        events = [watch.get(timeout=10) for _ in range(6)]
    # in order within a shard, interleaved across shards
    assert sorted((e.type, e.key, e.prev_value) for e in events) == [
        ("delete", b"w/a", b"1"), ("delete", b"w/b", b"2"), ("delete", b"w/t", b"3"),
        ("put", b"w/a", None), ("put", b"w/b", None), ("put", b"w/t", None)]
    for key in (b"w/a", b"w/b", b"w/t"):
        put, delete = [e for e in events if e.key == key]
        assert (put.type, delete.type) == ("put", "delete") and delete.revision > put.revision
    revoked = [e for e in events if e.type == "delete" and e.key != b"w/t"]
    if revoked[0].shard == revoked[1].shard:  # one command: one revision on its shard
        assert revoked[0].revision == revoked[1].revision
