"""``EmbeddedKV.watch``: every durable change delivered once, in each shard's revision
order, to watchers reading while threads write; resume by position; ``Compacted`` below
the history; a closed store ends its watchers with an error, never a hang."""

from __future__ import annotations

import threading
from collections import defaultdict

import pytest

import kvstore
from kvstore import Compacted, Event, InvalidArgument, KVError

pytestmark = pytest.mark.timeout(60)


def take(watch, count: int, timeout: float = 10.0) -> list:
    out = []
    while len(out) < count:
        event = watch.get(timeout)
        assert event is not None, f"only {len(out)} of {count} events arrived"
        out.append(event)
    return out


@pytest.mark.parametrize("shards", [1, 3])
def test_threads_write_while_a_watcher_sees_every_event_once_in_order(store, shards):
    db = store(shards=shards)
    writers, per_writer = 4, 150
    with db.watch(prefix=b"t") as watch, db.watch(key=b"t0/7", prev_value=True) as one:
        def write(i: int) -> None:
            for n in range(per_writer):
                key = b"t%d/%d" % (i, n % 10)
                if n % 7 == 6:
                    db.delete(key)
                else:
                    db.put(key, b"%d" % n)
        threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
        for t in threads:
            t.start()
        db.put(b"other", b"x")  # outside the prefix
        for t in threads:
            t.join(30)
        expected = []  # per writer, what it changed, in its order
        for i in range(writers):
            present = set()
            for n in range(per_writer):
                key = b"t%d/%d" % (i, n % 10)
                if n % 7 == 6:
                    if key in present:
                        expected.append(("delete", key, None))
                        present.discard(key)
                else:
                    expected.append(("put", key, b"%d" % n))
                    present.add(key)
        events = take(watch, len(expected))
        assert watch.get(0.05) is None  # nothing more, nothing twice
        last = defaultdict(int)
        for e in events:
            assert isinstance(e, Event) and e.key.startswith(b"t")
            assert e.revision >= last[e.shard]  # each shard in revision order
            last[e.shard] = e.revision
        # each key's changes in its writer's order, each once (a key lives in one shard;
        # across shards there is no order, so with one shard each writer's whole order)
        keys = {x[1] for x in expected}
        for key in keys:
            assert ([(e.type, e.key, e.value) for e in events if e.key == key]
                    == [x for x in expected if x[1] == key])
        if shards == 1:
            for i in range(writers):
                mine = [(e.type, e.key, e.value) for e in events if e.key.startswith(b"t%d/" % i)]
                assert mine == [x for x in expected if x[1].startswith(b"t%d/" % i)]
        # the key watch saw that key's changes alone, with the values they replaced
        key_events = [e for e in events if e.key == b"t0/7"]
        got = take(one, len(key_events))
        assert [(e.type, e.value) for e in got] == [(e.type, e.value) for e in key_events]
        previous = None
        for e in got:
            assert e.prev_value == previous
            previous = e.value


def test_a_watch_resumes_from_its_position_without_loss_or_repeat(store):
    db = store(shards=3)
    first = db.watch()
    for n in range(30):
        db.put(b"k%d" % n, b"%d" % n)
    head = take(first, 12)
    position = dict(first.position)
    first.close()
    assert first.get(0) is None and list(first) == []
    for n in range(30, 40):
        db.put(b"k%d" % n, b"%d" % n)
    with db.watch(start_revision=position) as second:
        rest = take(second, 28)
        assert second.get(0.05) is None
    # each put is a revision of its own here: the position after 12 events is exact
    keys = [e.key for e in head] + [e.key for e in rest]
    assert sorted(set(keys)) == sorted(b"k%d" % n for n in range(40))
    assert len(keys) == 40


def test_watching_below_the_history_is_compacted_naming_the_oldest(store):
    db = store(shards=2, watch_history_bytes=4000)
    for n in range(100):
        db.put(b"c%d" % n, b"x" * 100)
    watch = db.watch(start_revision=1)
    with pytest.raises(Compacted) as e:
        watch.get(1)
    oldest = e.value.oldest
    assert set(oldest) == {0, 1} and min(oldest.values()) > 1
    with db.watch(start_revision=oldest) as again:
        events = take(again, 1)
        assert events[0].revision >= oldest[events[0].shard]


def test_closing_the_store_ends_waiting_watchers_with_an_error(store):
    db = store()
    watch = db.watch()
    errors = []

    def wait() -> None:
        try:
            watch.get()
        except KVError as e:
            errors.append(e)

    t = threading.Thread(target=wait)
    t.start()
    db.close()
    t.join(10)
    assert not t.is_alive(), "the watcher hung on a closed store"
    assert len(errors) == 1 and "closed" in str(errors[0])
    with pytest.raises(KVError):
        db.watch()


def test_bad_watch_arguments_are_invalid(store, tmp_path):
    db = store()
    for kwargs in ({"key": b"a", "prefix": b"a"}, {"key": b""}, {"start_revision": 0},
                   {"start_revision": "1"}, {"start_revision": {1: 3}}, {"prev_value": 1}):
        with pytest.raises(InvalidArgument):
            db.watch(**kwargs)
    for bad in (-1, 1.5, True, "64MiB"):
        with pytest.raises(InvalidArgument):
            kvstore.open(str(tmp_path / "bad"), watch_history_bytes=bad)


def test_a_key_whose_lease_expires_is_a_delete_event_and_a_revoke_too(store):
    db = store(shards=2)
    with db.watch(prefix=b"l/", prev_value=True) as watch:
        db.put(b"l/ttl", b"1", ttl=0.2)
        lease = db.lease(ttl=30)
        db.put(b"l/held", b"2", lease=lease)
        lease.revoke()
        events = take(watch, 4)
    by_key = {}
    for e in events:
        by_key.setdefault(e.key, []).append((e.type, e.value, e.prev_value))
    assert by_key == {b"l/ttl": [("put", b"1", None), ("delete", None, b"1")],
                      b"l/held": [("put", b"2", None), ("delete", None, b"2")]}
