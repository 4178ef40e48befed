"""The watch history and the parked polls (``kvstore.watch``) against a simple model.

The model keeps every change ever applied. Whatever the history's byte bound, the
answers' ``max_bytes`` and the pattern of polls (direct, or parked as a node parks
them and answered when a batch matches or their wait ends): every change in a
watcher's range is delivered exactly once, in order, from where it started or
resumed, and a poll is "compacted" exactly when its revision is older than the
oldest the bound lets the history keep.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.watch import COMPACTED, DELETE, PUT, ParkedPoll, ParkedPolls, ShardHistory
from kvstore.watch.history import REVISION_OVERHEAD_BYTES, change_bytes

KEYS = [b"a", b"a/1", b"a/2", b"b", b"b/x", b"c"]
RANGES = [(b"a", b"a\x00"), (b"a/", b"a0"), (b"", None), (b"b", b"c"), (b"zz", None)]

change = st.tuples(st.sampled_from(KEYS), st.one_of(st.none(), st.binary(max_size=40)),
                   st.one_of(st.none(), st.binary(max_size=8)))
batch = st.lists(st.lists(change, max_size=4), min_size=1, max_size=5)  # revisions, some empty
step = st.one_of(
    st.tuples(st.just("apply"), batch),
    st.tuples(st.just("poll"), st.integers(0, len(RANGES) - 1), st.integers(1, 400)),
    st.tuples(st.just("expire"), st.integers(0, 3)),
)


class Model:
    """Every change applied, and what a bounded history must still hold."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.revisions: list = []  # (revision, changes) with changes
        self.head = 0

    def apply(self, revision: int, changes: list) -> None:
        if changes:
            self.revisions.append((revision, changes))
        self.head = revision

    def oldest(self) -> int:
        """1 + the newest dropped revision: the longest suffix within the bound (at least
        one revision) is kept, the rest dropped oldest first."""
        kept, size = 0, 0
        for revision, changes in reversed(self.revisions):
            size += change_bytes(changes) + REVISION_OVERHEAD_BYTES
            if kept and size > self.max_bytes:
                return revision + 1
            kept += 1
        return 1

    def in_range(self, start: int, lo: bytes, hi) -> list:
        return [(rev, PUT if v is not None else DELETE, k, v)
                for rev, changes in self.revisions if rev >= start
                for k, v, _p in changes if lo <= k and (hi is None or k < hi)]


def flatten(events) -> list:
    return [(rev, t, k, v) for rev, changes in events for t, k, v, _p in changes]


@settings(max_examples=300, deadline=None)
@given(max_bytes=st.integers(0, 1500), steps=st.lists(step, max_size=40),
       parked_mode=st.booleans())
def test_every_change_delivered_once_in_order_and_compacted_exactly_when_due(max_bytes, steps,
                                                                             parked_mode):
    history = ShardHistory(max_bytes, scan_revisions_max=7)
    model = Model(max_bytes)
    parked = ParkedPolls(1, 100, 100, 1 << 30, 1 << 30)
    # per watcher (one per range): its cursor, where its current stream started, what it got
    watchers = [{"cursor": 1, "start": 1, "got": [], "parked": None} for _ in RANGES]
    now = 0

    def deliver(w: dict, answer, lo, hi) -> None:
        if answer is COMPACTED:
            assert w["cursor"] < model.oldest()  # compacted exactly when due
            check(w, lo, hi)
            w["cursor"] = w["start"] = history.oldest  # re-read and resume from the oldest
            w["got"] = []
            return
        events, through = answer
        assert through <= max(history.head, w["cursor"] - 1)
        if events:
            assert events[0][0] >= w["cursor"] and through >= events[-1][0]
        w["got"] += flatten(events)
        w["cursor"] = through + 1

    def check(w: dict, lo, hi) -> None:
        expected = [e for e in model.in_range(w["start"], lo, hi) if e[0] < w["cursor"]]
        assert w["got"] == expected

    for s in steps:
        if s[0] == "apply":
            new = []
            for changes in s[1]:
                revision = history.head + 1
                history.add(revision, changes) if changes else history.advance(revision)
                model.apply(revision, changes)
                if changes:
                    new.append((revision, changes))
            assert history.oldest == model.oldest()
            for poll in parked.due(0, new):
                i = poll.reply_to
                watchers[i]["parked"] = None
                deliver(watchers[i], history.since(poll.first_new, poll.lo, poll.hi,
                                                   poll.max_bytes), poll.lo, poll.hi)
        elif s[0] == "poll":
            i, max_answer = s[1], s[2]
            w = watchers[i]
            lo, hi = RANGES[i]
            if w["parked"] is not None:
                continue  # one outstanding poll per watcher
            if w["cursor"] < model.oldest():
                assert history.since(w["cursor"], lo, hi, max_answer) is COMPACTED
            answer = history.since(w["cursor"], lo, hi, max_answer)
            if parked_mode and answer is not COMPACTED and not answer[0] \
                    and answer[1] >= history.head:
                w["cursor"] = answer[1] + 1
                poll = ParkedPoll(now * 100 + i, "conn", 0, lo, hi, w["cursor"], max_answer,
                                  False, now + 2, i)
                assert parked.park(poll) is None
                w["parked"] = poll
            else:
                deliver(w, answer, lo, hi)
        else:
            now += s[1]
            for poll in parked.expired(now):
                w = watchers[poll.reply_to]
                w["parked"] = None
                deliver(w, ([], max(history.head, poll.from_revision - 1)), poll.lo, poll.hi)
    # finally every watcher catches up: its stream is exactly the model's
    for i, w in enumerate(watchers):
        lo, hi = RANGES[i]
        if w["parked"] is not None:
            parked.remove(w["parked"].token)
        for _ in range(1000):
            answer = history.since(w["cursor"], lo, hi, 1 << 20)
            deliver(w, answer, lo, hi)
            if answer is not COMPACTED and answer[1] >= history.head:
                break
        check(w, lo, hi)
        assert w["cursor"] == history.head + 1
    assert len(parked) == 0 and parked.bytes == 0


def test_the_newest_revision_is_kept_even_over_the_bound():
    history = ShardHistory(10)
    history.add(1, [(b"k", b"x" * 100, None)])
    history.add(2, [(b"k", b"y" * 100, b"x" * 100)])
    assert history.oldest == 2 and len(history) == 1
    assert history.since(1, b"", None, 1) is COMPACTED
    events, through = history.since(2, b"", None, 1, prev=True)
    assert events == [[2, [[PUT, b"k", b"y" * 100, b"x" * 100]]]] and through == 2


def test_a_reset_starts_after_a_snapshot():
    history = ShardHistory(1 << 20)
    history.add(1, [(b"k", b"1", None)])
    history.reset(11)
    assert (history.oldest, history.head, len(history)) == (11, 10, 0)
    assert history.since(10, b"", None, 100) is COMPACTED
    assert history.since(11, b"", None, 100) == ([], 10)
    with pytest.raises(ValueError):
        history.add(10, [(b"k", b"1", None)])


def test_parked_polls_are_bounded_per_owner_and_in_total():
    parked = ParkedPolls(2, max_total=5, max_per_owner=3, max_total_bytes=1 << 20,
                         max_owner_bytes=1 << 20)

    def poll(token, owner, lo=b"k"):
        return ParkedPoll(token, owner, 0, lo, lo + b"\x00", 1, 100, False, 10.0)

    assert [parked.park(poll(t, "a")) is None for t in range(4)] == [True, True, True, False]
    assert "connection" in parked.park(poll(9, "a"))
    assert parked.park(poll(4, "b")) is None and parked.park(poll(5, "b")) is None
    assert "node" in parked.park(poll(6, "c"))
    assert len(parked) == 5 and parked.owner_count("a") == 3
    # a batch that changes "k" wakes every key poll of it at once, and frees their room
    assert sorted(p.token for p in parked.due(0, [(3, [(b"k", b"v", None)])])) == [0, 1, 2, 4, 5]
    assert len(parked) == 0 and parked.bytes == 0 and parked.owner_count("a") == 0
    small = ParkedPolls(1, 10, 10, max_total_bytes=2500, max_owner_bytes=1500)  # ~1000 each
    assert small.park(poll(1, "a", b"x" * 300)) is None
    assert "connection over" in small.park(poll(2, "a", b"y" * 300))
    assert small.park(poll(3, "b", b"y" * 300)) is None
    assert "on this node" in small.park(poll(4, "c", b"z" * 300))


def test_thousands_of_parked_polls_cost_little_per_batch():
    """10,000 parked key polls and 1,000 prefix polls: a batch of 100 changes is matched
    in milliseconds (key polls by a dict, prefix polls by a bisect each), not 10**6 checks."""
    import time
    parked = ParkedPolls(1, 100_000, 100_000, 1 << 30, 1 << 30)
    for i in range(10_000):
        key = b"key/%05d" % i
        parked.park(ParkedPoll(i, i % 50, 0, key, key + b"\x00", 1, 100, False, 1e9))
    for i in range(1000):
        parked.park(ParkedPoll(10_000 + i, i % 50, 0, b"p/%04d/" % i, b"p/%04d0" % i, 1, 100,
                               False, 1e9))
    batch = [(2, [(b"key/%05d" % (i * 97), b"v", None) for i in range(100)])]
    started = time.perf_counter()
    due = parked.due(0, batch)
    elapsed = time.perf_counter() - started
    assert len(due) == 100 and len(parked) == 10_900
    assert elapsed < 0.05, elapsed


def test_polls_answered_early_leave_no_growing_deadline_heap():
    parked = ParkedPolls(1, 100, 100, 1 << 30, 1 << 30)
    parked.park(ParkedPoll(-1, "c", 0, b"z", None, 1, 100, False, 1e9))  # parked throughout
    for token in range(20_000):  # park, then a batch answers it: over and over
        parked.park(ParkedPoll(token, "c", 0, b"k", b"k\x00", 1, 100, False, 1e9))
        assert len(parked.due(0, [(2, [(b"k", b"v", None)])])) == 1
    assert len(parked._deadlines) <= 1024 + 3


def test_a_leader_knows_it_is_current_only_while_a_majority_answered_lately():
    """``Replica.up_to_date`` (a watch reply's ``current``): a 3-node shard's leader is
    current through every check-quorum window while its followers answer (not only after
    one answered in the window), and not once cut off from them for an election timeout;
    a follower never is."""
    from kvstore.sim.network import Cluster
    c = Cluster(3, election_timeout_ticks=10, heartbeat_interval_ticks=3)
    c.campaign(0)
    c.tick(2)
    leader = c.replicas[0]
    for _ in range(25):  # across two window boundaries: current at every tick
        assert leader.is_leader and leader.up_to_date()
        assert not c.replicas[1].up_to_date() and not c.replicas[2].up_to_date()
        c.tick(1)
    c.isolate(0)
    c.tick(10, nodes=[0])
    assert not leader.up_to_date()
