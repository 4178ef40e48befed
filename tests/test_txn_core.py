"""The two-phase-commit core (``kvstore/txn``): records, participant, decision table, coordinator,
and the bank simulator that drives them through crashes, outages and a lossy network."""

from __future__ import annotations

import os
import pathlib
import re
from dataclasses import fields

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.sim.bank import BankConfig, run_bank_seed
import msgpack

from kvstore.txn import (ABORT, COMMIT, Coordinator, DecisionTable, ParticipantState, Recovery, TxnBugs,
                         TxnDecision, TxnFence, TxnForget, TxnPrepare, TxnResolve, decode, encode)

BANK_SEEDS = int(os.environ.get("KVSTORE_BANK_SEEDS", "300"))


class DictStore:
    def __init__(self, **values) -> None:
        self.data = {k.encode(): (1, v) for k, v in values.items()}
        self.slot = 1

    def revision(self, key):
        return self.data[key][0] if key in self.data else 0

    def write(self, key, value):
        self.slot += 1
        if value is None:
            self.data.pop(key, None)
        else:
            self.data[key] = (self.slot, value)


def prepare(txn_id=b"t1", reads=((b"a", 1),), writes=((b"a", b"9"),), read_only=False, deadline=10,
            one_round=False):
    return TxnPrepare(txn_id, 0, (0, 1), reads, writes, deadline, read_only, one_round)


keys = st.binary(min_size=1, max_size=8)
entries = st.one_of(
    st.builds(TxnPrepare, keys, st.integers(0, 7), st.tuples(st.integers(0, 7)),
              st.lists(st.tuples(keys, st.integers(0, 2**40)), max_size=4).map(tuple),
              st.lists(st.tuples(keys, st.one_of(st.none(), keys)), max_size=4).map(tuple),
              st.integers(0, 2**40), st.booleans(), st.booleans()),
    st.builds(TxnFence, keys),
    st.builds(TxnDecision, keys, st.sampled_from([COMMIT, ABORT])),
    st.builds(TxnResolve, keys, st.sampled_from([COMMIT, ABORT])),
    st.builds(TxnForget, st.lists(st.binary(min_size=1, max_size=64), min_size=1, max_size=5).map(tuple),
              st.booleans()),
)


@settings(max_examples=300, deadline=None)
@given(entries)
def test_entries_round_trip(entry):
    assert decode(encode(entry)) == entry


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_junk_is_a_value_error(data):
    try:
        decode(data)
    except ValueError:
        pass


def test_a_two_round_prepare_keeps_the_form_earlier_versions_read():
    """Rolling upgrade: a two-round prepare is the eight fields of earlier versions; only a
    one-round one (and a fence) carries what an earlier node refuses as unknown."""
    assert len(msgpack.unpackb(encode(prepare()))) == 8
    assert len(msgpack.unpackb(encode(prepare(one_round=True)))) == 9
    body = msgpack.unpackb(encode(prepare(one_round=True)))
    body[8] = False  # the ninth field is only ever True
    with pytest.raises(ValueError):
        decode(msgpack.packb(body))


def test_prepare_validates_reads_and_locks():
    store = DictStore(a=b"1", b=b"2")
    part = ParticipantState()
    assert part.apply_prepare(store, prepare()) is True
    assert part.locks == {b"a": b"t1"}
    assert part.apply_prepare(store, prepare()) is True  # a duplicate
    # Another transaction meets the lock: no, at once (no waiting, so no deadlock).
    assert part.apply_prepare(store, prepare(b"t2")) is False
    assert part.apply_single(store, (), ((b"a", b"x"),)) is False
    assert store.data[b"a"] == (1, b"1")  # nothing written before the decision
    part.apply_resolve(store, TxnResolve(b"t1", COMMIT))
    assert store.data[b"a"][1] == b"9" and part.locks == {}
    # A transaction that read revision 1 of a, now gone: no. And its late copy stays no.
    assert part.apply_prepare(store, prepare(b"t3")) is False
    assert part.apply_prepare(store, prepare(b"t3")) is False


def test_a_late_prepare_after_its_abort_never_locks():
    store = DictStore(a=b"1")
    part = ParticipantState()
    assert part.apply_resolve(store, TxnResolve(b"t1", ABORT)) is False  # the resolver got here first
    assert part.apply_prepare(store, prepare()) is False
    assert part.locks == {} and part.prepared == {}


def test_read_only_prepare_holds_nothing():
    store = DictStore(a=b"1")
    part = ParticipantState()
    assert part.apply_prepare(store, prepare(writes=(), read_only=True)) is True
    assert part.locks == {} and part.prepared == {}
    store.write(b"a", b"2")
    assert part.apply_prepare(store, prepare(b"t2", writes=(), read_only=True)) is False


def test_expired_prepared_records_are_listed():
    store = DictStore(a=b"1")
    part = ParticipantState()
    part.apply_prepare(store, prepare(deadline=10))
    assert part.expired(9) == []
    assert [p.txn_id for p in part.expired(10)] == [b"t1"]


def test_a_fence_before_the_prepare_makes_it_vote_no_for_ever():
    store = DictStore(a=b"1")
    part = ParticipantState()
    assert part.apply_fence(b"t1") is False  # nothing held: finished here as ABORT
    assert part.apply_prepare(store, prepare(one_round=True)) is False
    assert part.apply_fence(b"t1") is False and part.locks == {} and part.prepared == {}


def test_a_fence_after_the_prepare_reports_the_yes_vote_and_changes_nothing():
    store = DictStore(a=b"1")
    part = ParticipantState()
    assert part.apply_prepare(store, prepare(one_round=True)) is True
    assert part.apply_fence(b"t1") is True
    assert part.locks == {b"a": b"t1"}  # still prepared: the decision carries it out
    part.apply_resolve(store, TxnResolve(b"t1", COMMIT))
    assert part.apply_fence(b"t1") is True  # carried out as COMMIT: the answer stays
    assert store.data[b"a"][1] == b"9"


def test_a_fence_of_a_two_round_prepare_reports_no_yes_vote():
    """A two-round transaction's yes votes do not commit it (its client waits for the
    recorded decision; a locking read's lock-only votes commit nothing)."""
    store = DictStore(a=b"1")
    part = ParticipantState()
    assert part.apply_prepare(store, prepare()) is True
    assert part.apply_fence(b"t1") is False
    assert part.locks == {b"a": b"t1"}


def test_decision_is_written_once():
    table = DecisionTable()
    assert table.apply_decision(b"t", ABORT) == ABORT  # a resolver's ABORT came first
    assert table.apply_decision(b"t", COMMIT) == ABORT  # the slow coordinator learns it lost
    assert table.decisions == {b"t": ABORT}


def test_a_forget_of_nothing_or_of_too_many_is_refused():
    for body in (["TxnForget", [], True], ["TxnForget", [b"t" * 16] * 1025, True],
                 ["TxnForget", [b""], True], ["TxnForget", [7], True], ["TxnForget", b"t" * 16, True],
                 ["TxnForget", [b"t" * 16], 1], ["TxnForget", [b"t" * 16]]):
        with pytest.raises(ValueError):
            decode(msgpack.packb(body, use_bin_type=True))


def test_a_forget_drops_a_commit_and_keeps_an_abort_and_a_prepared_record():
    """Forgetting (``kvstore.txn.participant``): a COMMIT carried out everywhere is never
    needed again; an ABORT is (a late first prepare of the transaction must vote no)."""
    store, part = DictStore(a=b"1", b=b"2", c=b"3"), ParticipantState()
    assert part.apply_prepare(store, prepare(b"t1"))
    part.apply_resolve(store, TxnResolve(b"t1", COMMIT))
    assert part.finished == {b"t1": COMMIT} and part.parts == {b"t1": (0, 1)}
    assert part.apply_fence(b"t2") is False  # finished as ABORT here, never prepared
    assert part.apply_prepare(store, prepare(b"t3", reads=((b"b", 1),), writes=((b"b", b"3"),)))
    for t in (b"t1", b"t2", b"t3"):
        part.forget(t)
    assert part.finished == {b"t2": ABORT} and part.parts == {} and set(part.prepared) == {b"t3"}
    assert part.apply_prepare(store, prepare(b"t2", reads=((b"c", 1),), writes=((b"c", b"x"),))) is False
    table = DecisionTable()
    table.apply_decision(b"t1", COMMIT)
    table.apply_decision(b"t2", ABORT)
    table.forget(b"t1")
    table.forget(b"t2")
    assert table.decisions == {b"t2": ABORT}


def test_coordinator_two_rounds_then_follows_the_recorded_outcome():
    co = Coordinator(b"t", 0, {0: ([(b"a", 1)], [(b"a", b"1")]), 1: ([(b"b", 1)], [(b"b", b"2")])}, 50)
    assert sorted(s for s, e in co.proposals() if isinstance(e, TxnPrepare)) == [0, 1]
    assert co.on_vote(0, True) == []
    assert co.on_vote(1, True) == [(0, TxnDecision(b"t", COMMIT))]
    assert co.participants == (0, 1)  # named in the decide request: the node resolves them
    assert not co.decided
    co.on_decision(ABORT)  # the record says otherwise (a resolver won): follow it
    assert co.decided and co.outcome == ABORT
    assert co.proposals() == []  # the resolves are the recording node's, not the coordinator's


def test_coordinator_decides_abort_on_the_first_no():
    co = Coordinator(b"t", 1, {0: ([], [(b"a", b"1")]), 1: ([], [(b"b", b"2")])}, 50)
    assert co.on_vote(1, False) == [(1, TxnDecision(b"t", ABORT))]


PARTS = {0: ([(b"a", 1)], [(b"a", b"1")]), 1: ([(b"b", 1)], [(b"b", b"2")])}


def test_one_round_coordinator_is_decided_by_the_votes_and_records_after():
    co = Coordinator(b"t", 0, PARTS, 50, one_round=True)
    assert all(e.one_round for _s, e in co.proposals())
    assert co.on_vote(0, True) == [] and not co.decided
    assert co.on_vote(1, True) == [(0, TxnDecision(b"t", COMMIT))]
    assert co.decided and co.outcome == COMMIT  # the client is answered now
    co.on_decision(COMMIT)
    assert co.outcome == COMMIT and co.proposals() == []


def test_one_round_coordinator_aborts_on_a_no_and_waits_for_nothing():
    co = Coordinator(b"t", 0, PARTS, 50, one_round=True)
    assert co.on_vote(1, False) == [(0, TxnDecision(b"t", ABORT))]
    assert co.decided and co.outcome == ABORT


def test_one_round_coordinator_that_heard_no_vote_leaves_it_to_recovery():
    """An error instead of a vote: the prepare may be chosen yet, so no ABORT (two rounds
    may: nothing is decided before the record)."""
    co = Coordinator(b"t", 0, PARTS, 50, one_round=True)
    co.on_vote(0, True)
    co.on_vote_unknown(1)
    assert not co.decided and co.state == "preparing"
    two = Coordinator(b"t", 0, PARTS, 50)
    two.on_vote_unknown(1)
    assert two.proposals() == [(0, TxnDecision(b"t", ABORT))]


def test_one_round_is_never_used_for_read_only_transactions():
    co = Coordinator(b"t", 0, {0: ([(b"a", 1)], []), 1: ([(b"b", 1)], [])}, 50, one_round=True)
    assert not co.one_round and not any(e.one_round for _s, e in co.proposals())


def test_recovery_commits_only_when_every_fence_finds_a_yes_vote():
    rec = Recovery(b"t", 1, (0, 1, 2))
    assert rec.proposals() == [(s, TxnFence(b"t")) for s in (0, 1, 2)]
    assert rec.on_fenced(0, True) == [] and rec.on_fenced(2, True) == []
    assert rec.on_fenced(1, True) == [(1, TxnDecision(b"t", COMMIT))]
    rec.on_decision(COMMIT)
    assert rec.outcome == COMMIT and rec.proposals() == []


def test_recovery_aborts_at_the_first_fence_without_a_yes_vote():
    rec = Recovery(b"t", 0, (0, 1, 2))
    assert rec.on_fenced(2, False) == [(0, TxnDecision(b"t", ABORT))]
    assert rec.on_fenced(0, True) == []  # decided: later answers change nothing


def test_read_only_coordinator_decides_nothing():
    co = Coordinator(b"t", 0, {0: ([(b"a", 1)], []), 1: ([(b"b", 1)], [])}, 50)
    co.on_vote(0, True)
    co.on_vote(1, True)
    assert co.decided and co.outcome == COMMIT and co.proposals() == []


def test_core_is_pure():
    root = pathlib.Path(__file__).resolve().parent.parent / "kvstore" / "txn"
    banned = re.compile(r"^\s*(import|from)\s+(random|socket|zmq|lmdb|os|time|threading|asyncio|pickle)\b",
                        re.M)
    for path in sorted(root.glob("*.py")):
        assert not banned.search(path.read_text()), f"{path.name} imports I/O, a clock or global randomness"


@pytest.mark.parametrize("shards", [2, 3, 4])
def test_bank_passes_many_seeds(shards):
    for seed in range(BANK_SEEDS if shards == 3 else BANK_SEEDS // 3):
        ok, text = run_bank_seed(BankConfig(seed=seed, shards=shards))
        assert ok, text


BANK_FINDINGS = {
    "decision_not_replicated": ("decision:",),
    "apply_before_decision": ("before any decision",),
    # lost updates: an audit sees a wrong total, or the money is wrong at the end
    "prepare_skips_read_validation": ("isolation", "the accounts hold"),
    "locks_released_at_vote": ("isolation",),
    # a one-round client told COMMIT, then ABORT recorded: caught when it is recorded
    "one_round_recovery_aborts": ("decision:",),
    "one_round_recovery_unfenced": ("decision:",),
}


@pytest.mark.parametrize("bug", sorted(BANK_FINDINGS))
def test_planted_2pc_bug_is_found(bug):
    assert set(BANK_FINDINGS) == {f.name for f in fields(TxnBugs)}
    for seed in range(200):
        ok, text = run_bank_seed(BankConfig(seed=seed, bugs=TxnBugs(**{bug: True})))
        if not ok:
            assert any(f in text.splitlines()[0] for f in BANK_FINDINGS[bug]), text.splitlines()[0]
            assert f"python -m kvstore.sim --bank --model --seed {seed} --txn-bug {bug}" in text
            return
    pytest.fail(f"{bug} not found in 200 seeds")
