"""Quorum tallies: native == pure, and never a commit without a majority at one ballot.

The slow, obvious twin below is the model (etcd's quorum/quick_test.go does
the same for its fast quorum code): it keeps every vote and recomputes the
commit index from scratch.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel_impls import QUORUM


class SlowTally:
    def __init__(self, num_nodes: int, window: int, commit_index: int = -1) -> None:
        self.num_nodes, self.window = num_nodes, window
        self.ballot, self.commit_index = 0, commit_index
        self.votes: dict[int, set[int]] = {}

    def reset(self, ballot: int, commit_index: int) -> None:
        self.ballot, self.commit_index, self.votes = ballot, commit_index, {}

    def record(self, node: int, first: int, last: int, ballot: int) -> int:
        if ballot == self.ballot:
            for slot in range(max(first, self.commit_index + 1),
                              min(last, self.commit_index + self.window) + 1):
                self.votes.setdefault(slot, set()).add(node)
            while len(self.votes.get(self.commit_index + 1, ())) > self.num_nodes // 2:
                self.commit_index += 1
        return self.commit_index


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("vote"), st.integers(0, 6), st.integers(-2, 40), st.integers(0, 12),
                  st.integers(0, 2)),
        st.tuples(st.just("reset"), st.integers(0, 2), st.integers(-1, 10)),
    ),
    max_size=60)


@pytest.mark.parametrize("impl", sorted(QUORUM))
@settings(max_examples=300, deadline=None)
@given(num_nodes=st.integers(1, 7), window=st.sampled_from([1, 4, 16, 64]), ops=OPS)
def test_tally_matches_the_slow_model(impl, num_nodes, window, ops):
    fast = QUORUM[impl].QuorumTally(num_nodes, window)
    slow = SlowTally(num_nodes, window)
    for op in ops:
        if op[0] == "reset":
            fast.reset(op[1], op[2])
            slow.reset(op[1], op[2])
            continue
        _, node, first, length, ballot = op
        node %= num_nodes
        assert fast.record(node, first, first + length, ballot) == \
            slow.record(node, first, first + length, ballot)
        assert fast.commit_index == slow.commit_index
        for slot in range(slow.commit_index + 1, slow.commit_index + window + 1):
            expected = sum(1 << n for n in slow.votes.get(slot, ()))
            assert fast.votes(slot) == expected


def test_commit_needs_a_majority_at_one_ballot():
    for impl in QUORUM.values():
        tally = impl.QuorumTally(5, window=8, ballot=7)
        assert tally.record(0, 0, 3, 7) == -1
        assert tally.record(1, 0, 3, 7) == -1
        assert tally.record(2, 0, 3, 6) == -1  # stale ballot: ignored
        assert tally.record(3, 0, 1, 8) == -1  # a ballot we are not counting
        assert tally.record(2, 0, 1, 7) == 1   # third vote at 7 for slots 0..1
        assert tally.record(4, 2, 3, 7) == 3
        assert tally.votes(2) == 0             # committed slots leave the window


def test_window_slides_without_losing_votes():
    for impl in QUORUM.values():
        tally = impl.QuorumTally(3, window=4)
        commit = -1
        for start in range(0, 400, 4):
            tally.record(0, start, start + 3, 0)
            commit = tally.record(1, start, start + 3, 0)
        assert commit == 399
        assert tally.record(1, 500, 600, 0) == 399  # beyond the window: clipped, no commit


def test_random_vote_streams_agree_over_many_cases():
    rng = random.Random(50_000)
    for _ in range(2000):
        n = rng.randint(1, 7)  # every size, even ones included
        window = rng.choice([2, 8, 32])
        tallies = [impl.QuorumTally(n, window) for impl in QUORUM.values()]
        slow = SlowTally(n, window)
        for _ in range(20):
            node, first = rng.randrange(n), rng.randrange(0, 40)
            last, ballot = first + rng.randrange(0, 8), rng.randrange(2)
            expected = slow.record(node, first, last, ballot)
            assert [t.record(node, first, last, ballot) for t in tallies] == [expected] * 2


def test_promise_tally():
    for impl in QUORUM.values():
        promises = impl.PromiseTally(5, ballot=9)
        assert not promises.record(0, 9)
        assert not promises.record(0, 9)  # duplicates count once
        assert not promises.record(1, 8)  # other ballots do not count
        assert not promises.record(1, 9)
        assert promises.record(2, 9)
        assert promises.has_majority
        promises.reset(10)
        assert not promises.has_majority
        assert [impl.majority(n) for n in range(1, 8)] == [1, 2, 2, 3, 3, 4, 4]
        for n in range(1, 8):  # every size, even ones included: exactly a majority elects
            tally = impl.PromiseTally(n, ballot=1)
            outcomes = [tally.record(node, 1) for node in range(n)]
            assert outcomes.index(True) == n // 2, (n, outcomes)


def test_bad_arguments_are_value_errors():
    for impl in QUORUM.values():
        for bad in (0, 65):
            with pytest.raises(ValueError):
                impl.QuorumTally(bad)
            with pytest.raises(ValueError):
                impl.PromiseTally(bad)
        with pytest.raises(ValueError):
            impl.QuorumTally(3, window=0)
        with pytest.raises(ValueError):
            impl.QuorumTally(3).record(3, 0, 0, 0)
        with pytest.raises(ValueError):
            impl.PromiseTally(3).record(-1, 0)


ACKS = st.lists(st.tuples(st.integers(0, 6), st.integers(-2, 40), st.integers(0, 12), st.integers(0, 2)),
                max_size=40)


@pytest.mark.parametrize("impl", sorted(QUORUM))
@settings(max_examples=200, deadline=None)
@given(num_nodes=st.integers(1, 7), window=st.sampled_from([1, 4, 16]),
       batches=st.lists(ACKS, max_size=5))
def test_record_many_equals_one_record_per_ack(impl, num_nodes, window, batches):
    batched = QUORUM[impl].QuorumTally(num_nodes, window)
    slow = SlowTally(num_nodes, window)
    for batch in batches:
        acks = [(node % num_nodes, first, first + length, ballot) for node, first, length, ballot in batch]
        expected = slow.commit_index
        for ack in acks:
            expected = slow.record(*ack)
        assert batched.record_many(acks) == expected
        for slot in range(slow.commit_index + 1, slow.commit_index + window + 1):
            assert batched.votes(slot) == sum(1 << n for n in slow.votes.get(slot, ()))


def test_record_many_with_a_bad_node_counts_nothing():
    for impl in QUORUM.values():
        tally = impl.QuorumTally(3, window=8)
        tally.record(0, 0, 3, 0)
        with pytest.raises(ValueError):
            tally.record_many([(1, 0, 3, 0), (3, 0, 3, 0)])
        assert tally.commit_index == -1 and tally.votes(0) == 1
        assert tally.record_many(iter([(1, 0, 1, 0), (2, 2, 3, 0)])) == 3  # any iterable
