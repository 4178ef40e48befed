"""The transaction buffer every engine shares (``kvstore.txnbuffer``), against a dict model.

An engine is modelled as a few shards of committed ``key -> (value, revision)``;
a transaction's writes are laid over it. Whatever the writes, the range and the
limit, a scan through ``ScanMerge`` (each shard asked for ``fetch`` rows, as the
embedded store and the cluster client do) answers what a plain dict of "committed,
then these writes" answers, and records ranges that cover every row it answered.
"""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from kvstore.errors import InvalidArgument
from kvstore.txnbuffer import NOT_WRITTEN, TxnBuffer

SHARDS = 3
keys = st.sampled_from([bytes([a, b]) for a in b"abcd" for b in b"abcd"] + [b"a", b"b", b"c"])
values = st.binary(max_size=4)
committed = st.dictionaries(keys, st.tuples(st.binary(min_size=1, max_size=4),
                                            st.integers(1, 1000)), max_size=20)
writes = st.lists(st.tuples(keys, st.none() | values), max_size=20)
bounds = st.none() | keys


def shard(key: bytes) -> int:
    return key[-1] % SHARDS


def engine_rows(data: dict, s: int, lo: bytes, hi: bytes | None, fetch: int | None) -> list:
    rows = [(k, v, rev) for k, (v, rev) in sorted(data.items())
            if shard(k) == s and k >= lo and (hi is None or k < hi)]
    return rows if fetch is None else rows[:fetch]


@settings(max_examples=300, deadline=None)
@given(committed, writes, keys, bounds, st.none() | st.integers(1, 8))
def test_a_scan_is_the_committed_rows_with_the_writes_laid_over_them(data, ops, lo, hi, limit):
    buffer = TxnBuffer(1 << 20, "LIMIT")
    model = {k: v for k, (v, _rev) in data.items()}
    for key, value in ops:
        if value is None:
            buffer.delete(key)
            model.pop(key, None)
        else:
            buffer.put(key, value)
            model[key] = value
    expected = [(k, v) for k, v in sorted(model.items()) if k >= lo and (hi is None or k < hi)]
    if limit is not None:
        expected = expected[:limit]
    scan = buffer.scan(b"", lo, hi, limit)
    if scan is None:  # an empty range: no engine is asked
        assert expected == [] and hi is not None and hi <= lo
        return
    for s in range(SHARDS):
        scan.add(s, engine_rows(data, s, lo, hi, scan.fetch))
    assert scan.result() == expected
    # what it answered from the engine lies inside a recorded range of its shard, with
    # the revision the engine had
    for k, v in expected:
        if buffer.written(k) is NOT_WRITTEN:
            (lo_r, hi_r, seen), = buffer.ranges[shard(k)]
            assert lo_r <= k and (hi_r is None or k < hi_r) and (k, data[k][1]) in seen


@settings(max_examples=200, deadline=None)
@given(writes, st.integers(0, 40))
def test_writes_are_read_back_and_the_limit_refuses_a_write_changing_nothing(ops, limit):
    buffer = TxnBuffer(limit, "LIMIT")
    model: dict = {}
    for key, value in ops:
        before = dict(buffer.writes), buffer.writes.size
        try:
            buffer.delete(key) if value is None else buffer.put(key, value)
        except InvalidArgument as e:
            assert "LIMIT" in str(e) and "unchanged" in str(e)
            assert (dict(buffer.writes), buffer.writes.size) == before
            continue
        model[key] = value
    assert dict(buffer.writes) == model
    assert buffer.writes.size == sum(len(k) + len(v or b"") for k, v in model.items()) <= limit
    for key in {k for k, _ in ops}:
        assert buffer.written(key) == model.get(key, NOT_WRITTEN)


def test_the_first_read_of_a_key_is_the_revision_validated():
    buffer = TxnBuffer(100, "LIMIT")
    buffer.record_read(1, b"k", 5)
    buffer.record_read(1, b"k", 7)
    buffer.record_read(0, b"j", 2)
    assert buffer.reads == {1: {b"k": 5}, 0: {b"j": 2}}


def test_a_delete_past_the_limit_is_refused_before_anything_is_read():
    buffer = TxnBuffer(4, "LIMIT")
    buffer.put(b"ab", b"cd")
    with pytest.raises(InvalidArgument, match="LIMIT = 4"):
        buffer.check_delete(b"x")
    buffer.check_delete(b"ab")  # replacing a put by a delete shrinks the writes
