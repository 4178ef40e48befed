"""Locking reads and read locks in the 2PC core (``kvstore.txn.participant``), and the
client's switch to locking reads when optimistic cross-shard reads keep losing."""

from __future__ import annotations

from kvstore.txn import (ABORT, COMMIT, LOCK_ONLY, ParticipantState, TxnPrepare, TxnResolve)
from test_txn_core import DictStore


def test_a_locking_read_locks_without_a_revision_and_keeps_writers_out():
    store, p = DictStore(a="1", b="2"), ParticipantState()
    lock = TxnPrepare(b"L", 0, (0, 1), ((b"a", LOCK_ONLY), (b"b", LOCK_ONLY)), (), 10)
    assert p.apply_prepare(store, lock)  # no revision to match: it only locks
    writer = TxnPrepare(b"W", 0, (0, 1), ((b"a", 1),), ((b"a", b"9"),), 10)
    assert not p.apply_prepare(store, writer)  # the value the reader holds cannot change
    assert not p.apply_single(store, (), ((b"b", b"9"),))
    assert p.apply_resolve(store, TxnResolve(b"L", ABORT))
    assert p.locks == {} and store.data[b"a"] == (1, "1")
    assert p.apply_prepare(store, TxnPrepare(b"W2", 0, (0, 1), ((b"a", 1),), ((b"a", b"9"),), 10))


def test_a_read_only_prepare_passes_a_read_lock_but_not_a_write_lock():
    store, p = DictStore(a="1", b="2"), ParticipantState()
    # T reads a and writes b: a is read-locked, b write-locked
    assert p.apply_prepare(store, TxnPrepare(b"T", 0, (0, 1), ((b"a", 1),), ((b"b", b"7"),), 10))
    audit_a = TxnPrepare(b"R1", 0, (0, 1), ((b"a", 1),), (), 10, read_only=True)
    assert p.apply_prepare(store, audit_a)  # T leaves a as it is
    audit_b = TxnPrepare(b"R2", 0, (0, 1), ((b"b", 1),), (), 10, read_only=True)
    assert not p.apply_prepare(store, audit_b)  # b may be about to change
    # and a writer still meets T's read lock on a
    assert not p.apply_prepare(store, TxnPrepare(b"W", 0, (0, 1), (), ((b"a", b"0"),), 10))
    assert p.apply_resolve(store, TxnResolve(b"T", COMMIT))
    assert store.data[b"b"][1] == b"7"


def test_a_locking_read_then_its_writes_keep_every_lock_until_the_decision():
    store, p = DictStore(a="1", b="2", c="3"), ParticipantState()
    lock = TxnPrepare(b"L", 0, (0,), ((b"a", LOCK_ONLY), (b"b", LOCK_ONLY), (b"c", LOCK_ONLY)), (), 10)
    assert p.apply_prepare(store, lock)
    # its writes, prepared under the same id: the locks it holds are its own
    upgrade = TxnPrepare(b"L", 0, (0,), ((b"a", 1), (b"b", 1)), ((b"a", b"0"), (b"b", b"3")), 20)
    assert p.apply_prepare(store, upgrade)
    assert p.apply_prepare(store, upgrade)  # a duplicate changes nothing
    assert set(p.locks) == {b"a", b"b", b"c"}  # c, locked but not read this time, stays held
    assert not p.apply_prepare(store, TxnPrepare(b"W", 0, (0,), (), ((b"c", b"x"),), 10))
    assert p.apply_resolve(store, TxnResolve(b"L", COMMIT))
    assert p.locks == {} and p.prepared == {}
    assert (store.data[b"a"][1], store.data[b"b"][1], store.data[b"c"][1]) == (b"0", b"3", "3")


def test_an_upgrade_that_meets_another_lock_votes_no_and_keeps_what_it_held():
    store, p = DictStore(a="1", b="2"), ParticipantState()
    assert p.apply_prepare(store, TxnPrepare(b"L", 0, (0,), ((b"a", LOCK_ONLY),), (), 10))
    assert p.apply_prepare(store, TxnPrepare(b"W", 0, (0,), (), ((b"b", b"x"),), 10))
    assert not p.apply_prepare(store, TxnPrepare(b"L", 0, (0,), ((b"a", 1),), ((b"b", b"y"),), 10))
    assert p.locks == {b"a": b"L", b"b": b"W"}
    assert p.apply_resolve(store, TxnResolve(b"L", ABORT))
    assert p.locks == {b"b": b"W"}
