"""The embedded commit's two ways to apply a batch agree: a batch of plain puts takes
``_apply_puts`` (one loop, no view objects), every other batch ``_apply_batch`` through
the state code (``apply_command``). For any state of the overlay and LMDB below it, the
plain-put way must make the same writes, entries and changes (what a watcher is told)
as the general way: the put's meaning lives in ``kvstore.machine.data``, and this test
holds the fast loop to it."""

from __future__ import annotations

import tempfile

from hypothesis import given, settings
from hypothesis import strategies as st

import kvstore
from kvstore.commands import OP_PUT
from kvstore.embedded.commit import _apply_batch, _apply_puts, _views
from kvstore.embedded.groupcommit import Request
from kvstore.storage.overlay import LazyRead

KEYS = [b"k%d" % i for i in range(6)]
ops = st.lists(st.tuples(st.sampled_from(["put", "delete", "checkpoint"]),
                         st.sampled_from(KEYS), st.binary(max_size=8)), max_size=12)
puts = st.lists(st.tuples(st.sampled_from(KEYS), st.binary(max_size=8)), min_size=1,
                max_size=8)


def _both_ways(store, batch: list):
    overlay, storage = store._overlay, store._storage
    active, frozen = overlay.active, overlay.frozen
    txns = []

    def begin():
        txn = storage.begin_read()
        txns.append(txn)
        return txn

    try:
        fast = _apply_puts(store, batch, active, frozen, LazyRead(begin))
        pending: dict = {}
        view, lease_table = _views(store, pending, active, frozen, LazyRead(begin), {})
        general = _apply_batch(store, view, batch, lease_table)
    finally:
        for txn in txns:
            storage.end_read(txn)
    return fast, (pending, general.entries, general.changes), list(general)


@settings(max_examples=60, deadline=None)
@given(before=ops, batch=puts, shards=st.sampled_from([1, 3]))
def test_a_batch_of_plain_puts_applies_as_the_state_code_says(before, batch, shards):
    with tempfile.TemporaryDirectory() as d:
        with kvstore.open(d, shards=shards) as store:
            for op, key, value in before:
                if op == "put":
                    store.put(key, value)
                elif op == "delete":
                    store.delete(key)
                else:
                    store._checkpointer.checkpoint()  # the overlay's writes into LMDB
            requests = [Request((store._shard(k), (OP_PUT, k, v)), len(k) + len(v))
                        for k, v in batch]
            fast, general, results = _both_ways(store, requests)
            assert fast is not None
            pending, entries, changes = fast
            g_pending, g_entries, g_changes = general
            assert pending == {s: dict(level) for s, level in g_pending.items() if level}
            assert entries == g_entries
            assert {s: c for s, c in changes.items() if c} == \
                {s: c for s, c in g_changes.items() if c}
            assert results == [None] * len(batch)
