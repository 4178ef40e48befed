"""kvstore.recipes (lock, election, queue) against an in-memory double of the store API
(tests/recipes_double.py): the recipes' own logic, with a fake clock for the leases.
The same recipes on the embedded store and a real cluster: tests/test_recipes_engines.py.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from kvstore.errors import InvalidArgument
from kvstore.recipes import Election, Lock, Queue
from kvstore.recipes import aio as recipes_aio
from kvstore.recipes import plans
from kvstore.recipes.keys import QueueKeys, shard_for

from recipes_double import DoubleKV, FakeClock

WAIT = 10.0  # a bound on any wait for another thread, never reached when all is well


@pytest.fixture(params=[1, 3], ids=["1shard", "3shards"])
def kv(request):
    return DoubleKV(nshards=request.param)


def in_thread(fn, *args):
    """Start ``fn(*args)`` in a thread; returns (thread, box) where box holds its result."""
    box: dict = {}

    def target():
        try:
            box["result"] = fn(*args)
        except BaseException as e:  # handed to the test
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, box


def result_of(thread, box):
    thread.join(WAIT)
    assert not thread.is_alive(), "the thread did not finish"
    if "error" in box:
        raise box["error"]
    return box["result"]


def wait_until(predicate, what: str) -> None:
    """Wait (on the double's condition) until ``predicate()``; bounded."""
    import time
    end = time.monotonic() + WAIT
    while not predicate():
        assert time.monotonic() < end, f"timed out waiting until {what}"
        time.sleep(0.001)


# ------------------------------------------------------------------ lock
def test_a_lock_is_taken_and_released_and_its_tokens_increase(kv):
    lock = Lock(kv, "job", ttl=5)
    tokens = []
    for _ in range(3):
        assert lock.acquire() is True
        assert lock.locked()
        tokens.append(lock.token)
        assert kv.get(lock.key) is not None
        assert lock.release() is True
        assert not lock.locked() and lock.token is None
    assert tokens == sorted(set(tokens)) and tokens[0] > 0
    assert kv.get(lock.key) is None
    assert not kv.leases, "every acquisition's lease was revoked at its release"


def test_the_token_is_the_revision_of_the_acquiring_write(kv):
    kv.put("unrelated", "x")
    lock = Lock(kv, "job")
    with lock:
        value, revision = kv.read_revision(lock.key)
        shard = shard_for(lock.key, kv.nshards)
        put_events = [e for r, changes in kv.history[shard] for e in changes
                      if e.key == lock.key and e.type == "put"]
        assert lock.token == revision == put_events[-1].revision


def test_a_contender_waits_on_the_watch_and_takes_the_lock_at_release(kv):
    holder, waiter = Lock(kv, "job"), Lock(kv, "job")
    assert holder.acquire()
    t, box = in_thread(waiter.acquire)
    wait_until(lambda: kv.calls["watch"] >= 1, "the waiter watches the key")
    cas_before = kv.calls["cas"]
    kv.put("noise", "1")  # other writes do not wake it
    assert t.is_alive()
    assert kv.calls["cas"] == cas_before, "the waiter does not spin"
    first = holder.token
    holder.release()
    assert result_of(t, box) is True
    assert waiter.token > first


def test_acquire_with_a_timeout_gives_up_and_leaves_nothing_held(kv):
    holder, waiter = Lock(kv, "job"), Lock(kv, "job")
    holder.acquire()
    assert waiter.acquire(timeout=0.05) is False
    assert not waiter.locked() and waiter.token is None
    assert len(kv.leases) == 1, "the waiter's lease was revoked"
    holder.release()
    assert waiter.acquire(timeout=0) is True


def test_a_dead_holder_frees_the_lock_after_its_ttl_and_the_next_token_is_larger(kv):
    clock = kv.clock
    holder, waiter = Lock(kv, "job", ttl=10), Lock(kv, "job", ttl=10)
    holder.acquire()
    dead_token = holder.token
    holder._state.lease.die()  # its process is gone: no more keep-alives
    t, box = in_thread(waiter.acquire)
    wait_until(lambda: kv.calls["watch"] >= 1, "the waiter watches the key")
    clock.advance(9.9)
    assert t.is_alive(), "the lock is not freed before the TTL"
    clock.advance(0.2)
    assert result_of(t, box) is True
    assert waiter.token > dead_token
    assert holder.release() is False, "the old holder learns it had lost the lock"
    assert waiter.locked() and kv.get(waiter.key) is not None


def test_a_waiter_behind_the_history_kept_watches_from_its_oldest_and_does_not_spin(kv):
    holder, waiter = Lock(kv, "job"), Lock(kv, "job")
    holder.acquire()
    shard = shard_for(holder.key, kv.nshards)
    others = [k for k in (b"other%d" % i for i in range(100))
              if shard_for(k, kv.nshards) == shard][:3]
    for k in others:  # later writes on the lock's shard
        kv.put(k, b"x")
    kv.compact()  # the holder's write is older than any watch can start from
    t, box = in_thread(waiter.acquire)
    wait_until(lambda: kv.calls["watch"] >= 2, "the waiter watches from the oldest kept")
    first = holder.token
    holder.release()
    assert result_of(t, box) is True and waiter.token > first
    # the holder's acquire and release, the waiter's attempt and its success: no spin
    assert kv.calls["cas"] == 4


def test_a_lock_is_mutual_exclusion_among_threads_with_increasing_tokens(kv):
    inside, tokens, errors = [0], [], []

    def worker():
        lock = Lock(kv, "counter")
        for _ in range(15):
            with lock:
                inside[0] += 1
                if inside[0] != 1:
                    errors.append("two holders at once")
                tokens.append(lock.token)
                inside[0] -= 1

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert len(tokens) == 60 and tokens == sorted(tokens) and len(set(tokens)) == 60


def test_a_lock_object_is_not_reentrant_and_release_needs_a_holding(kv):
    lock = Lock(kv, "job")
    with pytest.raises(InvalidArgument):
        lock.release()
    lock.acquire()
    with pytest.raises(InvalidArgument):
        lock.acquire(timeout=0)
    assert lock.locked()
    with pytest.raises(InvalidArgument):
        Lock(kv, "job", ttl=0)
    assert lock.release() is True
    with pytest.raises(InvalidArgument):
        lock.acquire(timeout=-1)
    assert not lock.locked()


# ------------------------------------------------------------------ election
def test_an_election_hands_over_when_the_leader_resigns(kv):
    a, b = Election(kv, "office"), Election(kv, "office")
    assert a.leader() is None
    assert a.campaign("node-a")
    assert b.leader() == b"node-a"
    t, box = in_thread(b.campaign, "node-b")
    wait_until(lambda: kv.calls["watch"] >= 1, "b watches the office")
    assert b.leader() == b"node-a" and t.is_alive()
    assert a.resign() is True
    assert result_of(t, box) is True
    assert a.leader() == b"node-b" and b.is_leader() and not a.is_leader()
    assert b.token > 0


def test_an_election_hands_over_when_the_leader_dies(kv):
    a, b = Election(kv, "office", ttl=3), Election(kv, "office", ttl=3)
    a.campaign("a")
    a._state.lease.die()
    t, box = in_thread(b.campaign, "b")
    wait_until(lambda: kv.calls["watch"] >= 1, "b watches the office")
    kv.clock.advance(3)
    assert result_of(t, box) is True
    assert b.leader() == b"b"


def test_observe_reports_the_leader_now_and_every_change(kv):
    a, b, watcher = Election(kv, "office"), Election(kv, "office"), Election(kv, "office")
    a.campaign("a")
    seen = watcher.observe()
    assert next(seen) == b"a"
    a.resign()
    assert next(seen) is None
    b.campaign("b")
    assert next(seen) == b"b"
    seen.close()
    assert kv.calls["watch"] >= 1


def test_observe_goes_on_after_the_history_moved_past_the_office(kv):
    a, b = Election(kv, "office"), Election(kv, "office")
    a.campaign("a")
    seen = b.observe()
    assert next(seen) == b"a"
    shard = shard_for(a.key, kv.nshards)
    for k in [k for k in (b"o%d" % i for i in range(100)) if shard_for(k, kv.nshards) == shard][:3]:
        kv.put(k, b"x")
    kv.compact()  # the observer's next revision is no longer kept
    t, box = in_thread(next, seen)
    wait_until(lambda: kv.calls["watch"] >= 2, "the observer watches from the oldest kept")
    a.resign()
    assert result_of(t, box) is None, "the change, not the leader it already reported"
    b.campaign("b")
    assert next(seen) == b"b"
    seen.close()


def test_a_consumer_behind_the_history_kept_starts_afresh_and_loses_nothing(kv):
    producer, consumer = Queue(kv, "jobs"), Queue(kv, "jobs")
    producer.put("a")
    assert consumer.get(timeout=1).ack() is True
    producer.put("b")
    kv.compact()  # the consumer's watch has not read "b" yet: it is compacted away
    item = consumer.get(timeout=1)
    assert item is not None and item.value == b"b"
    item.ack()
    consumer.close()


# ------------------------------------------------------------------ queue
def test_queue_keys_all_live_on_the_queue_shard():
    for nshards in (1, 3, 5):
        keys = QueueKeys("jobs", nshards)
        for _ in range(20):
            item_id = keys.new_item_id()
            assert shard_for(keys.item(item_id), nshards) == keys.home
            assert shard_for(keys.claim(item_id), nshards) == keys.home
        consumer = keys.new_consumer_id()
        for shard in range(nshards):
            assert shard_for(keys.anchor(consumer, shard), nshards) == shard


def test_one_consumer_gets_items_in_put_order_and_an_acked_item_never_again(kv):
    producer, consumer = Queue(kv, "jobs"), Queue(kv, "jobs")
    for i in range(5):
        producer.put(f"job{i}")
    got = [consumer.get(timeout=1) for _ in range(5)]
    assert [g.value for g in got] == [b"job%d" % i for i in range(5)]
    assert [g.revision for g in got] == sorted(g.revision for g in got)
    for g in got:
        assert g.ack() is True
    assert consumer.get(timeout=0.05) is None
    assert kv.scan("_kvstore/queue/jobs/i/") == []
    view = consumer._state.view
    assert view.items == {} and view.seen == {}, "nothing kept of acked items"
    consumer.close()


def test_a_waiting_consumer_is_woken_by_the_put_not_by_polling(kv):
    consumer = Queue(kv, "jobs")
    t, box = in_thread(consumer.get, WAIT)
    wait_until(lambda: kv.calls["watch.get"] >= 2, "the consumer waits on its watch")
    gets_before = kv.calls["get"]
    Queue(kv, "jobs").put("x")
    item = result_of(t, box)
    assert item.value == b"x"
    assert kv.calls["get"] - gets_before <= 2  # the claim's check and the item's read
    item.ack()
    consumer.close()


def test_an_item_is_acked_while_its_consumer_waits_in_get_in_another_thread(kv):
    consumer = Queue(kv, "jobs")
    consumer.put("first")
    first = consumer.get(timeout=1)
    t, box = in_thread(consumer.get, WAIT)
    wait_until(lambda: kv.calls["watch.get"] >= 3, "the get waits on the watch")
    acking, ack_box = in_thread(first.ack)
    assert result_of(acking, ack_box) is True, "an ack does not wait for the get"
    consumer.put("second")
    assert result_of(t, box).value == b"second"
    consumer.close()


def test_an_item_held_by_a_dead_consumer_is_delivered_again_after_its_lease(kv):
    producer = Queue(kv, "jobs")
    first, second = Queue(kv, "jobs", visibility_timeout=5), Queue(kv, "jobs")
    producer.put("a")
    producer.put("b")
    taken = first.get(timeout=1)
    assert taken.value == b"a"
    assert second.get(timeout=1).value == b"b", "a held item is skipped, not waited for"
    first._state.lease.die()
    assert second.get(timeout=0.05) is None
    kv.clock.advance(5)
    again = second.get(timeout=1)
    assert again.value == b"a" and again.id == taken.id
    assert again.ack() is True
    assert taken.ack() is False, "the dead consumer's claim had lapsed"


def test_release_hands_an_item_back_at_once_and_close_hands_back_everything(kv):
    producer, a, b = Queue(kv, "jobs"), Queue(kv, "jobs"), Queue(kv, "jobs")
    producer.put("x")
    producer.put("y")
    x = a.get(timeout=1)
    y = a.get(timeout=1)
    assert (x.value, y.value) == (b"x", b"y")
    assert b.get(timeout=0.05) is None
    x.release()
    assert b.get(timeout=1).value == b"x"
    a.close()
    assert b.get(timeout=1).value == b"y"


def test_many_consumers_and_producers_deliver_every_item_and_acked_ones_once(kv):
    n_items, consumers = 60, 3
    delivered, acked, lock = [], set(), threading.Lock()
    stop = threading.Event()

    def produce(start):
        q = Queue(kv, "work")
        for i in range(start, n_items, 2):
            q.put(b"%d" % i)

    def consume(index):
        q = Queue(kv, "work", visibility_timeout=2)
        while not stop.is_set():
            item = q.get(timeout=0.05)
            if item is None:
                continue
            with lock:
                assert item.value not in acked, "an acked item was delivered again"
                delivered.append(item.value)
            if index == 0 and len(delivered) % 5 == 0:
                item.release()  # not done: another takes it
                continue
            with lock:
                acked.add(item.value)
            item.ack()
        q.close()

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(consumers)]
    threads += [threading.Thread(target=produce, args=(s,)) for s in (0, 1)]
    for t in threads:
        t.start()
    wait_until(lambda: len(acked) == n_items, "every item is acked")
    stop.set()
    for t in threads:
        t.join(WAIT)
    assert acked == {b"%d" % i for i in range(n_items)}
    assert kv.scan("_kvstore/queue/work/i/") == []


def test_the_view_skips_what_the_scan_already_showed():
    keys = QueueKeys("q", 1)
    view = plans.QueueView(keys, b"me")
    item = keys.item(b"0001")
    view.load([(item, b"v", 5)])
    view.apply("put", item, b"v", 5)  # replayed by the watch
    assert view.next_candidate() == (b"0001", 5)
    assert view.next_candidate() is None, "offered once"
    view.apply("put", keys.claim(b"0001"), b"other", 6)
    view.apply("delete", keys.claim(b"0001"), None, 7)  # the other's claim ended
    view.apply("delete", keys.claim(b"0001"), None, 7)  # replayed: no-op
    assert view.next_candidate() == (b"0001", 5)
    assert view.next_candidate() is None


# ------------------------------------------------------------------ asyncio
def test_the_asyncio_lock_and_queue_on_a_sync_store(kv):
    async def main():
        a, b = recipes_aio.Lock(kv, "job"), recipes_aio.Lock(kv, "job")
        async with a:
            waiting = asyncio.ensure_future(b.acquire())
            await asyncio.sleep(0.05)
            assert not waiting.done()
            first = a.token
        assert await asyncio.wait_for(waiting, WAIT) is True
        assert b.token > first
        assert await b.release() is True
        # a cancelled waiter leaves nothing held
        async with a:
            waiting = asyncio.ensure_future(b.acquire())
            await asyncio.sleep(0.05)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
        assert not b.locked()

        q = recipes_aio.Queue(kv, "jobs")
        await q.put("one")
        item = await q.get(timeout=1)
        assert item.value == b"one"
        await item.ack()
        assert await q.get(timeout=0.05) is None
        await q.close()

        e = recipes_aio.Election(kv, "office")
        assert await e.campaign("me")
        assert await e.leader() == b"me"
        seen = e.observe()
        assert await seen.__anext__() == b"me"
        await e.resign()
        assert await seen.__anext__() is None
        await seen.aclose()

    asyncio.run(main())
    assert kv.get("_kvstore/lock/job") is None
    assert all(not record["keys"] for record in kv.leases.values())
