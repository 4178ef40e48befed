"""The cluster client's watch (``kvstore.client.watch``) and coherent cache
(``kvstore.client.cache``) against a fake cluster (``tests/watch_fake.py``) that
answers ``OP_WATCH`` per the spec, with nodes that lag, die, stall, are compacted
differently and answer late. Real processes: ``tests/test_cluster_watch.py``."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from kvstore.client.cache import MISS, UNCACHED, CoherentCache
from kvstore.client.replies import MalformedReply, check_watch
from kvstore.client.watch import AsyncWatch, Watch
from kvstore.errors import Compacted, InvalidArgument, KVError

from watch_fake import FakeCore


def put(k, v, prev=None):
    return [0, k, v, prev]


def delete(k, prev=None):
    return [1, k, None, prev]


def drain(w, n=None) -> list:
    out = []
    while n is None or len(out) < n:
        e = w.get(0)
        if e is None:
            break
        out.append(e)
    return out


def test_from_now_starts_after_the_applied_point_and_delivers_in_order():
    core = FakeCore()
    core.write(0, [put(b"a", b"old")])
    w = Watch(core, 1, prefix=b"")
    assert core.statuses == 1 and core.polls[0][0][3] == 2
    assert w.position == {0: 2}
    core.write(0, [put(b"a", b"1")])
    core.write(0, [put(b"b", b"2"), delete(b"a")])
    got = drain(w)
    assert [(e.type, e.key, e.value, e.revision) for e in got] == [
        ("put", b"a", b"1", 2), ("put", b"b", b"2", 3), ("delete", b"a", None, 3)]
    assert w.position == {0: 4}
    assert w.get(0) is None


def test_key_watch_sees_only_its_key_and_prefix_watch_only_its_prefix():
    core = FakeCore()
    wk = Watch(core, 1, key=b"k")
    wp = Watch(core, 1, prefix=b"p/")
    core.write(0, [put(b"k", b"1")])
    core.write(0, [put(b"k2", b"x"), put(b"p/1", b"y"), put(b"q", b"z")])
    assert [e.key for e in drain(wk)] == [b"k"]
    assert [e.key for e in drain(wp)] == [b"p/1"]


def test_polls_again_only_once_the_consumer_took_the_reply():
    """Flow control: the client buffers one reply per shard, never more."""
    core = FakeCore()
    w = Watch(core, 1, prefix=b"", max_bytes=10)
    for i in range(5):
        core.write(0, [put(b"k%d" % i, b"v" * 8)])
    assert core.outstanding() == 0  # a reply is buffered: no poll is out
    taken, polls_after = [], []
    for _ in range(5):
        taken.append(w.get(0).revision)
        polls_after.append(len(core.polls))
        assert core.outstanding() == (1 if len(taken) == 5 else 0)
    assert taken == [1, 2, 3, 4, 5]
    # the first reply held revision 1 (the only one then); each later one at most
    # max_bytes (but a whole revision): 2-3, then 4-5; a poll only once a reply is taken
    start = polls_after[0] - 1
    assert [n - start for n in polls_after] == [1, 1, 2, 2, 3]
    assert w.get(0) is None
    assert core.outstanding() == 1  # parked at the node, waiting for revision 6


def test_failover_to_a_lagging_node_delivers_each_revision_once_in_order():
    core = FakeCore()
    a, b, c = core.nodes
    w = Watch(core, 1, prefix=b"")
    for i in range(1, 11):  # b lags from revision 8 on
        core.write(0, [put(b"k", b"%d" % i)], nodes=[a, c] if i >= 8 else None)
    got = drain(w)
    assert [e.revision for e in got] == list(range(1, 11))
    core.fake[c].up = False
    core.kill(a)  # the leader dies: the parked poll (from 11) goes to b, which is at 7
    core.expire()  # b's progress report says through 7: the position must not go back
    assert w.position == {0: 11} and w.get(0) is None
    core.catch_up(b)  # b learns 8..10 and then 11 is written
    core.write(0, [put(b"k", b"11")])
    got = drain(w)
    assert [e.revision for e in got] == [11]


def test_a_late_answer_to_an_older_poll_is_dropped():
    core = FakeCore()
    w = Watch(core, 1, prefix=b"")
    old = [p for p in core.pending if not p[0].done()]
    assert len(old) == 1
    w._poller._pid = -1  # as after a fork: the poll is asked again
    w._poller.check_fork()
    core.write(0, [put(b"k", b"v")])  # both polls answer: only the new one counts
    assert [e.revision for e in drain(w)] == [1]
    core.write(0, [put(b"k", b"w")])
    assert [e.revision for e in drain(w)] == [2]


def test_compacted_on_one_node_asks_the_others():
    core = FakeCore()
    a, b, c = core.nodes
    for i in range(1, 6):
        core.write(0, [put(b"k", b"%d" % i)])
    core.fake[a].compact(0, 4)  # the leader lost 1..3 (a restart), b and c keep them
    w = Watch(core, 1, prefix=b"", start_revision=2)
    assert [e.revision for e in drain(w)] == [2, 3, 4, 5]
    assert w.position == {0: 6}


def test_compacted_everywhere_raises_naming_the_oldest_after_the_events_before():
    core = FakeCore()
    for i in range(1, 6):
        core.write(0, [put(b"k", b"%d" % i)])
    for n, oldest in zip(core.nodes, (4, 3, 5)):
        core.fake[n].compact(0, oldest)
    with pytest.raises(Compacted) as e:
        Watch(core, 1, prefix=b"", start_revision=2)
    assert e.value.oldest == {0: 3}
    assert "revision 2" in str(e.value) and "3" in str(e.value)


def test_compacted_with_a_dead_node_raises_once_every_node_answered_or_failed():
    core = FakeCore()
    a, b, c = core.nodes
    for i in range(1, 4):
        core.write(0, [put(b"k", b"%d" % i)])
    core.fake[a].compact(0, 3)
    core.fake[b].compact(0, 3)
    core.fake[c].stalled = True
    w = Watch(core, 1, prefix=b"", start_revision=1, wait_for_start=False)
    assert w.get(0) is None  # c is still being asked
    core.fail_over(c)  # the engine gives up on c
    with pytest.raises(Compacted):
        w.get(0)


def test_position_resumes_exactly_where_the_consumer_stopped():
    core = FakeCore()
    w = Watch(core, 1, prefix=b"")
    core.write(0, [put(b"a", b"1")])
    core.write(0, [put(b"b", b"2"), put(b"c", b"3")])
    core.write(0, [put(b"d", b"4")])
    assert drain(w, 2)[-1].key == b"b"
    assert w.position == {0: 2}  # revision 2 was taken in part: it comes again whole
    w.close()
    w2 = Watch(core, 1, prefix=b"", start_revision=w.position)
    assert [e.key for e in drain(w2)] == [b"b", b"c", b"d"]
    assert w.get(0) is None and list(w) == []


def test_prev_value_only_when_asked():
    core = FakeCore()
    w1 = Watch(core, 1, key=b"k")
    w2 = Watch(core, 1, key=b"k", prev_value=True)
    core.write(0, [put(b"k", b"2", b"1")])
    assert drain(w1)[0].prev_value is None
    assert drain(w2)[0].prev_value == b"1"


def test_several_shards_each_in_order():
    core = FakeCore(nshards=3)
    w = Watch(core, 3, prefix=b"")
    assert w.position == {0: 1, 1: 1, 2: 1}
    for i in range(4):
        core.write(i % 3, [put(b"k%d" % i, b"v")])
    got = drain(w)
    assert sorted((e.shard, e.revision) for e in got) == [(0, 1), (0, 2), (1, 1), (2, 1)]
    assert w.position == {0: 3, 1: 2, 2: 2}


@pytest.mark.parametrize("bad", [0, -1, True, "3", {5: 1}, {0: 0}])
def test_bad_start_revision_is_refused(bad):
    core = FakeCore()
    with pytest.raises(InvalidArgument):
        Watch(core, 1, prefix=b"", start_revision=bad)
    assert core.polls == [] and core.statuses == 0


def test_key_and_prefix_together_are_refused():
    with pytest.raises(InvalidArgument):
        Watch(FakeCore(), 1, key=b"k", prefix=b"p")


def test_a_refused_poll_ends_the_watch_with_its_error():
    core = FakeCore()
    w = Watch(core, 1, prefix=b"")
    f = next(p[0] for p in core.pending if not p[0].done())
    f.set_exception(KVError("server refused the request: unknown op"))
    with pytest.raises(KVError, match="unknown op"):
        w.get(0)


def test_get_waits_for_an_event_from_another_thread():
    import threading
    core = FakeCore()
    w = Watch(core, 1, prefix=b"")
    t = threading.Timer(0.05, core.write, (0, [put(b"k", b"v")]))
    t.start()
    try:
        assert w.get(5).key == b"k"
    finally:
        t.join()
    start = time.monotonic()
    assert w.get(0.05) is None and time.monotonic() - start >= 0.05


def test_async_watch():
    core = FakeCore()

    async def main():
        async with AsyncWatch(Watch(core, 1, prefix=b"", wait_for_start=False)) as w:
            assert w.position == {0: 1}  # known once entered
            assert (await w) is w
            loop = asyncio.get_running_loop()
            loop.call_later(0.02, core.write, 0, [put(b"a", b"1")])
            loop.call_later(0.03, core.write, 0, [put(b"b", b"2")])
            got = []
            async for e in w:
                got.append(e.key)
                if len(got) == 2:
                    break
            assert await w.get(0.01) is None
            return got, w.position

    assert asyncio.run(main()) == ([b"a", b"b"], {0: 3})


@pytest.mark.parametrize("reply", [
    [[[1, [[0, b"k", b"v", None]]]], 1, 0, True],  # through below the last revision
    [[[0, [[0, b"k", b"v", None]]]], 1, 5, True],  # below from_revision
    [[[2, [[0, b"k", b"v", None]]], [2, [[0, b"k", b"v", None]]]], 1, 5, True],  # repeated
    [[[2, [[0, b"z", b"v", None]]]], 1, 5, True],  # outside the range
    [[[2, [[0, b"k", None, None]]]], 1, 5, True],  # a put without a value
    [[[2, [[1, b"k", b"v", None]]]], 1, 5, True],  # a delete with one
    [[[2, []]], 1, 5, True],  # an empty revision
    [[], 1, 5, 1],  # current not a bool
    [[], 1, 5],
    "x",
])
def test_malformed_watch_replies_are_refused(reply):
    with pytest.raises(MalformedReply):
        check_watch([0, b"a", b"m", 1, 1000, 0, False], reply)


def test_well_formed_watch_replies_pass():
    check_watch([0, b"a", b"m", 1, 1000, 0, False],
                [[[1, [[0, b"k", b"v", None], [1, b"l", None, b"p"]]], [3, [[0, b"a", b"", None]]]],
                 1, 4, True])
    check_watch([0, b"a", None, 9, 1000, 0, False], [None, 12, 20, False])


# -- the coherent cache ------------------------------------------------------------------------

def cached_get(cache, core, key):
    """What ``ClusterKV.get`` does with a cache, on the fake."""
    got = cache.lookup(key)
    if got is UNCACHED:
        raise AssertionError("not cached")
    if type(got) is tuple and got[0] is MISS:
        f = core.submit("get", 0, [0, key, True])
        value, revision = f.result(0)
        cache.fill(got[1], value, revision)
        return "miss", value
    return "hit", got


def test_cache_fills_serves_and_follows_events():
    core = FakeCore()
    core.write(0, [put(b"c/k", b"1")])
    cache = CoherentCache(core, 1, b"c/")
    assert cache.lookup(b"other") is UNCACHED
    assert cached_get(cache, core, b"c/k") == ("miss", b"1")
    assert cached_get(cache, core, b"c/k") == ("hit", b"1")
    core.write(0, [put(b"c/k", b"2")])
    assert cached_get(cache, core, b"c/k") == ("hit", b"2")
    core.write(0, [delete(b"c/k")])
    assert cached_get(cache, core, b"c/k") == ("hit", None)
    assert cached_get(cache, core, b"c/absent") == ("miss", None)
    assert cached_get(cache, core, b"c/absent") == ("hit", None)
    core.write(0, [put(b"c/absent", b"now")])
    assert cached_get(cache, core, b"c/absent") == ("hit", b"now")
    s = cache.stats()
    assert (s["hits"], s["misses"], s["stale"]) == (5, 2, 0)


def test_cache_applies_every_change_of_a_key_in_one_revision():
    """One log entry may change a key twice (a batch of increments): the last one wins."""
    core = FakeCore()
    core.write(0, [put(b"k", b"1")])
    cache = CoherentCache(core, 1, True)
    assert cached_get(cache, core, b"k") == ("miss", b"1")
    core.write(0, [put(b"k", b"2"), put(b"k", b"3")])
    assert cached_get(cache, core, b"k") == ("hit", b"3")


def test_cache_read_your_writes_waits_for_the_watch_to_deliver_the_write():
    core = FakeCore()
    cache = CoherentCache(core, 1, True)
    a, b, c = core.nodes
    core.write(0, [put(b"k", b"1")])
    assert cached_get(cache, core, b"k") == ("miss", b"1")
    # this client writes k=2 at revision 2; the watch's node (a) has not applied it yet
    rev = core.write(0, [put(b"k", b"2")], nodes=[b, c])
    core.revision_hook(0, rev)
    core.leader = b  # the linearizable get goes to the leader, which has it
    assert cached_get(cache, core, b"k") == ("miss", b"2")  # a stale fallback
    assert cache.stats()["stale"] == 1
    core.catch_up(a)  # the watch delivers revision 2
    assert cached_get(cache, core, b"k") == ("hit", b"2")


def test_cache_write_of_unknown_revision_waits_for_a_fresh_current_answer():
    core = FakeCore()
    cache = CoherentCache(core, 1, True)
    assert cached_get(cache, core, b"k") == ("miss", None)
    ticket = cache.lookup(b"j")  # a fill begun before: dropped
    core.revision_hook(0, None)  # a 2PC decision or a timed-out write: entries forgotten
    cache.fill(ticket[1], b"old", 0)
    assert cache.stats()["entries"] == 0
    assert cached_get(cache, core, b"k")[0] == "miss"
    core.expire()  # the parked poll answers (it was sent before the write): not enough
    core.expire()  # the next poll, sent after it, answers current: serving again
    assert cached_get(cache, core, b"k") == ("hit", None)


def test_cache_stops_serving_when_the_watch_stalls(monkeypatch):
    core = FakeCore()
    cache = CoherentCache(core, 1, True, staleness=0.2)
    assert cached_get(cache, core, b"k") == ("miss", None)
    assert cached_get(cache, core, b"k") == ("hit", None)
    clock = [time.monotonic() + 0.3]  # the node answers nothing for longer than the bound
    monkeypatch.setattr("kvstore.client.cache.time.monotonic", lambda: clock[0])
    assert cached_get(cache, core, b"k") == ("miss", None)
    assert cache.stats()["stale"] == 1


def test_cache_does_not_serve_while_the_node_is_not_current():
    core = FakeCore()
    for n in core.fake.values():
        n.current = False
    cache = CoherentCache(core, 1, True)
    core.expire()
    assert cached_get(cache, core, b"k") == ("miss", None)
    assert cached_get(cache, core, b"k") == ("miss", None)


def test_cache_fill_is_dropped_when_an_event_for_the_key_came_meanwhile():
    core = FakeCore()
    core.write(0, [put(b"k", b"1")])
    cache = CoherentCache(core, 1, True)
    ticket = cache.lookup(b"k")[1]
    value, rev = core.submit("get", 0, [0, b"k", True]).result(0)  # reads k=1 ...
    core.write(0, [delete(b"k")])  # ... then the delete's event arrives before the fill
    cache.fill(ticket, value, rev)
    assert cached_get(cache, core, b"k") == ("miss", None)  # not resurrected


def test_cache_fill_older_than_the_entry_is_ignored():
    core = FakeCore()
    core.write(0, [put(b"k", b"1")])
    cache = CoherentCache(core, 1, True)
    assert cached_get(cache, core, b"k") == ("miss", b"1")
    core.write(0, [put(b"k", b"2")])
    ticket = cache.lookup(b"k")
    assert ticket == b"2"  # a hit
    t = cache.lookup(b"new")[1]
    cache.fill(t, b"x", 5)
    t = cache.lookup(b"other")[1]
    cache.fill(t, None, 0)
    # an event older than a fill does not overwrite it
    core.write(0, [put(b"new", b"old")])  # revision 3 < 5
    assert cached_get(cache, core, b"new") == ("hit", b"x")


def test_cache_evicts_least_recently_used_by_bytes():
    core = FakeCore()
    for i in range(4):
        core.write(0, [put(b"k%d" % i, b"v" * 100)])
    cache = CoherentCache(core, 1, True, max_bytes=3 * 250)
    for i in range(3):
        cached_get(cache, core, b"k%d" % i)
    cached_get(cache, core, b"k0")  # k0 used: k1 is the least recent
    cached_get(cache, core, b"k3")
    assert cache.stats()["entries"] == 3 and cache.stats()["bytes"] <= 750
    assert cached_get(cache, core, b"k0")[0] == "hit"
    assert cached_get(cache, core, b"k1")[0] == "miss"


def test_cache_restarts_its_watch_after_compaction_and_forgets_entries():
    core = FakeCore()
    core.write(0, [put(b"k", b"1")])
    cache = CoherentCache(core, 1, True)
    assert cached_get(cache, core, b"k") == ("miss", b"1")
    for n in core.fake.values():
        n.stalled = True
    for i in range(3):
        core.write(0, [put(b"k", b"%d" % (i + 2))])
    for n in core.fake.values():
        n.compact(0, 4)
        n.stalled = False
    core.step()
    assert cache.stats()["restarts"] == 1
    assert cached_get(cache, core, b"k") == ("miss", b"4")
    assert cached_get(cache, core, b"k") == ("hit", b"4")


@pytest.mark.parametrize("bad", [dict(staleness=0), dict(staleness=True), dict(max_bytes=-1)])
def test_cache_bad_arguments(bad):
    with pytest.raises(InvalidArgument):
        CoherentCache(FakeCore(), 1, True, **bad)


@pytest.mark.parametrize("prefixes", [[], None, [True]])
def test_cache_bad_prefixes(prefixes):
    with pytest.raises(InvalidArgument):
        CoherentCache(FakeCore(), 1, prefixes)


def test_watch_and_cache_survive_a_fork():
    core = FakeCore()
    w = Watch(core, 1, prefix=b"")
    r, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its watch polls again (the parent's polls are the parent's)
        code = 1
        try:
            core.pending.clear()
            core.write(0, [put(b"k", b"child")])
            e = w.get(0)
            code = 0 if e is not None and e.value == b"child" else 3
        finally:
            os.write(wfd, bytes([code]))
            os._exit(0)
    os.close(wfd)
    assert os.read(r, 1) == b"\x00"
    os.waitpid(pid, 0)


def test_a_write_answer_with_its_revision_is_checked():
    from kvstore.client.replies import split_revision
    assert split_revision([None, 5]) == (None, 5)
    assert split_revision("locked") == ("locked", None)  # nothing applied: no revision
    for bad in (None, [None], [None, "5"], [None, 5, 6]):
        with pytest.raises(MalformedReply):
            split_revision(bad)


def test_a_watch_its_user_dropped_stops_polling():
    import gc
    core = FakeCore()
    w = Watch(core, 1, prefix=b"")
    assert core.outstanding() == 1
    del w
    gc.collect()
    polls = len(core.polls)
    core.expire()  # the parked poll's progress report: nobody to poll again for
    assert len(core.polls) == polls and core.outstanding() == 0


def test_cache_works_in_a_forked_child():
    core = FakeCore()
    core.write(0, [put(b"k", b"1")])
    cache = CoherentCache(core, 1, True)
    assert cached_get(cache, core, b"k") == ("miss", b"1")
    cache._lock.acquire()  # as if the I/O thread held it at the fork
    r, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            core.pending.clear()  # the parent's polls are the parent's
            core.write(0, [put(b"k", b"2")])
            code = 0 if cached_get(cache, core, b"k") == ("hit", b"2") else 3
        finally:
            os.write(wfd, bytes([code]))
            os._exit(0)
    cache._lock.release()
    os.close(wfd)
    import select
    ready, _, _ = select.select([r], [], [], 20)
    if not ready:
        os.kill(pid, 9)
    os.waitpid(pid, 0)
    assert ready and os.read(r, 1) == b"\x00", "the child hung on the parent's lock"
