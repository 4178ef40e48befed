"""The state machine reports what it changes (``changes``), and reporting changes nothing.

Random commands are applied to two stores, one collecting changes and one not: the
results and the states are equal, and the reported changes, replayed over a model,
give the same state, each with the value it replaced (a delete of an absent key, a
failed compare-and-set or transaction, a refused incr report nothing).
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.commands import OP_CAS, OP_DELETE, OP_INCR, OP_PUT, OP_TXN, OP_TXN_WRITES
from kvstore.machine.data import apply_command, revision_of, scan_rows, value_of
from kvstore.storage import Storage

KEYS = [b"a", b"b", b"c"]
values = st.one_of(st.none(), st.sampled_from([b"1", b"2", b"x"]))
key = st.sampled_from(KEYS)
command = st.one_of(
    st.tuples(st.just(OP_PUT), key, st.sampled_from([b"1", b"2", b"x"])),
    st.tuples(st.just(OP_DELETE), key),
    st.tuples(st.just(OP_CAS), key, values, values),
    st.tuples(st.just(OP_INCR), key, st.integers(-3, 3)),
    st.tuples(st.just(OP_TXN_WRITES), st.lists(st.tuples(key, values), max_size=3,
                                               unique_by=lambda w: w[0])),
    st.tuples(st.just(OP_TXN), st.lists(st.tuples(key, st.integers(0, 4)), max_size=2),
              st.just([]), st.lists(st.tuples(key, values), max_size=3,
                                    unique_by=lambda w: w[0])),
)


def state(storage) -> dict:
    db = storage.shards[0].data
    return storage.read(lambda txn: {k: (value_of(k, raw), revision_of(raw))
                                     for k, raw in scan_rows(txn, db, b"", None, None)})


@settings(max_examples=150, deadline=None)
@given(commands=st.lists(command, max_size=25))
def test_reported_changes_replay_to_the_state_and_cost_no_behaviour(tmp_path_factory, commands):
    plain = Storage(str(tmp_path_factory.mktemp("plain")), shards=1)
    watched = Storage(str(tmp_path_factory.mktemp("watched")), shards=1)
    try:
        model: dict = {}
        for revision, cmd in enumerate(commands, 1):
            changes: list = []
            r1 = plain.write(lambda txn: apply_command(txn, plain.shards[0].data, revision, cmd))
            r2 = watched.write(lambda txn: apply_command(txn, watched.shards[0].data, revision,
                                                         cmd, changes))
            assert r1 == r2
            for k, v, prev in changes:
                assert prev == model.get(k)  # the value it replaced
                assert v is not None or prev is not None  # deleting nothing is no change
                if v is None:
                    del model[k]
                else:
                    model[k] = v
            if r1 is False or (cmd[0] == OP_INCR and type(r1) is not int):
                assert changes == []
        assert state(plain) == state(watched)
        assert {k: v for k, (v, _rev) in state(watched).items()} == model
    finally:
        plain.close()
        watched.close()


def test_a_cross_shard_transaction_reports_its_writes_when_its_decision_is_carried_out(tmp_path):
    from kvstore.machine.twopc import apply_2pc
    from kvstore.txn import COMMIT, TXN_ID_BYTES, TxnPrepare, TxnResolve
    storage = Storage(str(tmp_path / "s"), shards=1)
    try:
        tables = storage.shards[0]
        storage.write(lambda txn: apply_command(txn, tables.data, 1, (OP_PUT, b"a", b"old")))
        txn_id = b"t" * TXN_ID_BYTES
        prepare = TxnPrepare(txn_id, 0, (0, 1), (), ((b"a", b"new"), (b"gone", None)), 10**15)
        at_prepare, at_resolve = [], []
        assert storage.write(lambda txn: apply_2pc(txn, tables, 2, prepare, at_prepare)) is True
        assert at_prepare == []  # a prepare only locks
        storage.write(lambda txn: apply_2pc(txn, tables, 3, TxnResolve(txn_id, COMMIT),
                                            at_resolve))
        assert at_resolve == [(b"a", b"new", b"old")]  # deleting an absent key: no change
    finally:
        storage.close()
