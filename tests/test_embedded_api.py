"""The Python API of shared/API.md section 1 on an embedded store, with 1 and 3 shards."""

from __future__ import annotations

import threading

import pytest

import kvstore
from kvstore import InvalidArgument, KVError, TransactionConflict


def commit_indexes(db) -> list[int]:
    return [s["commit_index"] for s in db.status()["shards"]]


# -- get / put / delete ---------------------------------------------------------------------

def test_get_missing_is_none(db):
    assert db.get(b"nope") is None


def test_put_get_overwrite(db):
    assert db.put(b"k", b"v1") is None
    assert db.get(b"k") == b"v1"
    db.put(b"k", b"v2")
    assert db.get(b"k") == b"v2"


def test_str_keys_and_values_are_utf8_and_results_bytes(db):
    db.put("clé", "välue")
    assert db.get("clé") == "välue".encode("utf-8")
    assert db.get("clé".encode("utf-8")) == "välue".encode("utf-8")
    assert isinstance(db.get("clé"), bytes)
    [(key, value)] = db.scan("cl")
    assert key == "clé".encode("utf-8") and type(key) is bytes and type(value) is bytes


def test_bytearray_and_memoryview_accepted(db):
    db.put(bytearray(b"ba"), memoryview(b"mv"))
    assert db.get(b"ba") == b"mv"
    assert type(db.get(bytearray(b"ba"))) is bytes


def test_empty_value_allowed_and_distinct_from_absent(db):
    db.put(b"empty", b"")
    assert db.get(b"empty") == b""
    assert db.scan(b"empty") == [(b"empty", b"")]
    assert db.delete(b"empty") is True
    assert db.get(b"empty") is None


def test_binary_keys_and_values(db):
    key, value = bytes(range(1, 256)), bytes(range(256)) * 4
    db.put(key, value)
    assert db.get(key) == value
    db.put(b"\x00", b"\x00")
    assert db.get(b"\x00") == b"\x00"


def test_delete_returns_whether_it_existed(db):
    assert db.delete(b"k") is False
    db.put(b"k", b"v")
    assert db.delete(b"k") is True
    assert db.get(b"k") is None
    assert db.delete(b"k") is False


# -- cas ------------------------------------------------------------------------------------

def test_cas_expected_none_means_absent(db):
    assert db.cas(b"c", None, b"1") is True
    assert db.get(b"c") == b"1"
    assert db.cas(b"c", None, b"2") is False
    assert db.get(b"c") == b"1"


def test_cas_swaps_only_on_match(db):
    db.put(b"c", b"1")
    assert db.cas(b"c", b"2", b"3") is False
    assert db.get(b"c") == b"1"
    assert db.cas(b"c", b"1", b"3") is True
    assert db.get(b"c") == b"3"
    assert db.cas(b"absent", b"x", b"y") is False
    assert db.get(b"absent") is None


def test_cas_new_none_deletes(db):
    db.put(b"c", b"1")
    assert db.cas(b"c", b"0", None) is False
    assert db.get(b"c") == b"1"
    assert db.cas(b"c", b"1", None) is True
    assert db.get(b"c") is None
    assert db.scan(b"c") == []
    # absent -> absent is a successful no-op
    assert db.cas(b"c", None, None) is True
    assert db.get(b"c") is None


def test_cas_empty_value_is_not_absent(db):
    assert db.cas(b"e", b"", b"x") is False
    db.put(b"e", b"")
    assert db.cas(b"e", None, b"x") is False
    assert db.cas(b"e", b"", b"x") is True
    assert db.get(b"e") == b"x"


def test_cas_str_arguments(db):
    assert db.cas("s", None, "é") is True
    assert db.cas("s", "é", "ü") is True
    assert db.get(b"s") == "ü".encode()


# -- scan -----------------------------------------------------------------------------------

KEYS = [b"a", b"a\x00", b"a\xff", b"ab", b"abc", b"abd", b"ac", b"b", b"ba", b"\xff", b"\xff\xff"]


@pytest.fixture
def filled(db):
    for i, k in enumerate(KEYS):
        db.put(k, b"v%d" % i)
    return db


def expected(prefix=b"", start=None, end=None, limit=None):
    out = [(k, b"v%d" % KEYS.index(k)) for k in sorted(KEYS)
           if k.startswith(prefix) and (start is None or k >= start) and (end is None or k < end)]
    return out if limit is None else out[:limit]


def test_scan_everything_in_byte_order(filled):
    result = filled.scan()
    assert result == expected()
    assert [k for k, _ in result] == sorted(KEYS)


@pytest.mark.parametrize("prefix", [b"a", b"ab", b"abc", b"b", b"\xff", b"\xff\xff", b"z", b"a\xff"])
def test_scan_prefix(filled, prefix):
    assert filled.scan(prefix) == expected(prefix)


@pytest.mark.parametrize("start,end", [(b"ab", b"b"), (b"ab", None), (None, b"ab"), (b"abc", b"abd"),
                                       (b"a\x00", b"a\xff"), (b"b", b"a"), (b"b", b"b"),
                                       (b"", b"\xff"), (b"aa", b"ab\x00")])
def test_scan_start_inclusive_end_exclusive(filled, start, end):
    assert filled.scan(start=start, end=end) == expected(start=start, end=end)


def test_scan_prefix_with_start_and_end(filled):
    assert filled.scan(b"a", start=b"ab", end=b"ac") == expected(b"a", b"ab", b"ac")
    assert filled.scan(b"ab", start=b"a", end=b"z") == expected(b"ab")
    assert filled.scan(b"ab", start=b"b") == []


@pytest.mark.parametrize("limit", [0, 1, 2, 5, 100])
def test_scan_limit(filled, limit):
    assert filled.scan(limit=limit) == expected(limit=limit)
    assert filled.scan(b"a", limit=limit) == expected(b"a", limit=limit)
    assert filled.scan(start=b"ab", end=b"b\x00", limit=limit) == \
        expected(start=b"ab", end=b"b\x00", limit=limit)


def test_scan_str_arguments(filled):
    assert filled.scan("ab", start="abc", end="abd") == expected(b"ab", b"abc", b"abd")


def test_scan_across_many_keys_and_shards(store, shards):
    db = store(shards=shards)
    keys = [b"key%04d" % i for i in range(300)]
    for k in reversed(keys):
        db.put(k, k[::-1])
    assert db.scan(b"key") == [(k, k[::-1]) for k in keys]
    assert db.scan(b"key", limit=17) == [(k, k[::-1]) for k in keys[:17]]
    assert db.scan(start=b"key0100", end=b"key0200") == [(k, k[::-1]) for k in keys[100:200]]
    if shards > 1:  # the keys really are spread out
        assert sum(1 for s in db.status()["shards"] if s["keys"] > 0) > 1


# -- transactions ---------------------------------------------------------------------------

def test_transaction_commits_on_clean_exit(db):
    with db.transaction() as txn:
        txn.put(b"t1", b"1")
        txn.put("t2", "2")
        assert db.get(b"t1") is None  # not visible outside before commit
    assert db.get(b"t1") == b"1" and db.get(b"t2") == b"2"


def test_transaction_discards_on_exception(db):
    db.put(b"keep", b"old")
    before = commit_indexes(db)
    with pytest.raises(RuntimeError):
        with db.transaction() as txn:
            txn.put(b"new", b"1")
            txn.delete(b"keep")
            raise RuntimeError("boom")
    assert db.get(b"new") is None and db.get(b"keep") == b"old"
    assert commit_indexes(db) == before


def test_transaction_sees_own_writes_and_deletes(db):
    db.put(b"a", b"1")
    db.put(b"b", b"2")
    with db.transaction() as txn:
        assert txn.get(b"a") == b"1"
        txn.put(b"a", b"10")
        assert txn.get(b"a") == b"10"
        assert txn.delete(b"b") is True
        assert txn.get(b"b") is None
        assert txn.delete(b"b") is False
        assert txn.delete(b"never") is False
        txn.put(b"c", b"3")
        assert txn.get("c") == b"3"
        assert txn.delete(b"c") is True
        assert txn.get(b"c") is None
        txn.put(b"d", b"")
        assert txn.get(b"d") == b""
    assert db.get(b"a") == b"10" and db.get(b"b") is None and db.get(b"c") is None
    assert db.get(b"d") == b""


def test_transaction_scan_merges_own_writes(db):
    for k in [b"p1", b"p3", b"p5", b"q"]:
        db.put(k, b"old")
    with db.transaction() as txn:
        txn.put(b"p2", b"new")
        txn.put(b"p3", b"upd")
        txn.delete(b"p1")
        txn.put(b"p0", b"")
        assert txn.scan(b"p") == [(b"p0", b""), (b"p2", b"new"), (b"p3", b"upd"),
                                  (b"p5", b"old")]
        assert txn.scan(b"p", limit=2) == [(b"p0", b""), (b"p2", b"new")]
        assert txn.scan(start=b"p2", end=b"p5") == [(b"p2", b"new"), (b"p3", b"upd")]
        assert txn.scan(limit=0) == []
        assert txn.scan() == [(b"p0", b""), (b"p2", b"new"), (b"p3", b"upd"), (b"p5", b"old"),
                              (b"q", b"old")]
    assert db.scan(b"p") == [(b"p0", b""), (b"p2", b"new"), (b"p3", b"upd"), (b"p5", b"old")]


def test_transaction_scan_limit_with_many_own_deletes(db):
    for i in range(20):
        db.put(b"k%02d" % i, b"v")
    with db.transaction() as txn:
        for i in range(0, 20, 2):
            txn.delete(b"k%02d" % i)
        assert txn.scan(b"k", limit=3) == [(b"k01", b"v"), (b"k03", b"v"), (b"k05", b"v")]
        for i in range(1, 20, 2):
            txn.delete(b"k%02d" % i)
        assert txn.scan(b"k", limit=3) == []


def test_transaction_reads_a_snapshot(db):
    db.put(b"x", b"1")
    with pytest.raises(TransactionConflict):
        with db.transaction() as txn:
            assert txn.get(b"x") == b"1"
            db.put(b"x", b"2")
            db.put(b"y", b"2")
            assert txn.get(b"x") == b"1"  # still the snapshot
            assert txn.get(b"y") is None
            txn.put(b"z", b"1")
    assert db.get(b"z") is None


def test_conflict_on_read_key_applies_nothing(db):
    db.put(b"acct", b"10")
    with pytest.raises(TransactionConflict):
        with db.transaction() as txn:
            value = txn.get(b"acct")
            db.put(b"acct", b"20")  # a concurrent write invalidates the read
            txn.put(b"acct", value + b"0")
            txn.put(b"other", b"x")
            txn.put(b"more", b"y")
    assert db.get(b"acct") == b"20"
    assert db.get(b"other") is None and db.get(b"more") is None
    assert db.scan() == [(b"acct", b"20")]


def test_conflict_on_absent_key_that_appears(db):
    with pytest.raises(TransactionConflict):
        with db.transaction() as txn:
            assert txn.get(b"lock") is None
            db.put(b"lock", b"them")
            txn.put(b"lock", b"me")
    assert db.get(b"lock") == b"them"


def test_conflict_on_deleted_read_key(db):
    db.put(b"k", b"v")
    with pytest.raises(TransactionConflict):
        with db.transaction() as txn:
            assert txn.get(b"k") == b"v"
            db.delete(b"k")
            txn.put(b"out", b"1")
    assert db.get(b"out") is None


def test_conflict_on_phantom_in_scanned_range(db):
    db.put(b"r1", b"1")
    with pytest.raises(TransactionConflict):
        with db.transaction() as txn:
            rows = txn.scan(b"r")
            db.put(b"r2", b"phantom")  # a new key inside the scanned range
            txn.put(b"count", str(len(rows)).encode())
    assert db.get(b"count") is None


def test_conflict_on_phantom_in_scanned_range_across_shards(store):
    db = store(shards=3)
    db.put(b"r0", b"1")
    for i in range(1, 6):  # whichever shard the phantom lands in, it is caught
        with pytest.raises(TransactionConflict):
            with db.transaction() as txn:
                txn.scan(start=b"r", end=b"s")
                db.put(b"r%d" % i, b"x")
                txn.put(b"out", b"x")
        assert db.get(b"out") is None


def test_conflict_on_removed_row_in_scanned_range(db):
    db.put(b"r1", b"1")
    db.put(b"r2", b"2")
    with pytest.raises(TransactionConflict):
        with db.transaction() as txn:
            txn.scan(start=b"r1", end=b"r3")
            db.delete(b"r2")
            txn.put(b"sum", b"3")
    assert db.get(b"sum") is None


def test_no_conflict_outside_the_read_set(db):
    db.put(b"mine", b"1")
    with db.transaction() as txn:
        txn.get(b"mine")
        txn.scan(b"m")
        db.put(b"theirs", b"2")  # neither read nor in a scanned range
        txn.put(b"mine", b"2")
    assert db.get(b"mine") == b"2" and db.get(b"theirs") == b"2"


def test_scan_with_limit_conflicts_only_on_what_it_covered(db):
    for i in range(10):
        db.put(b"k%d" % i, b"v")
    with db.transaction() as txn:
        assert [k for k, _ in txn.scan(b"k", limit=2)] == [b"k0", b"k1"]
        db.put(b"k9", b"changed")  # beyond what the limited scan read
        txn.put(b"out", b"1")
    assert db.get(b"out") == b"1"


def test_blind_writes_do_not_conflict(db):
    with db.transaction() as txn:
        txn.put(b"k", b"mine")
        db.put(b"k", b"theirs")
    assert db.get(b"k") == b"mine"


def test_read_only_transaction_commits(db):
    db.put(b"k", b"v")
    with db.transaction() as txn:
        assert txn.get(b"k") == b"v"
        db.put(b"k", b"w")
        before = commit_indexes(db)
        assert txn.get(b"k") == b"v"
    assert commit_indexes(db) == before  # a read-only transaction writes nothing
    assert db.get(b"k") == b"w"


def test_transaction_spanning_shards_is_atomic(store):
    db = store(shards=3)
    keys = [b"multi%d" % i for i in range(12)]
    with db.transaction() as txn:
        for k in keys:
            txn.put(k, b"1")
    assert all(db.get(k) == b"1" for k in keys)
    with pytest.raises(TransactionConflict):
        with db.transaction() as txn:
            for k in keys:
                txn.put(k, (int(txn.get(k)) + 1).__str__().encode())
            db.put(keys[-1], b"9")
    assert [db.get(k) for k in keys] == [b"1"] * 11 + [b"9"]


def test_explicit_commit_and_discard(db):
    txn = db.transaction()
    with txn:
        txn.put(b"a", b"1")
        txn.discard()
    assert db.get(b"a") is None
    with db.transaction() as txn:
        txn.put(b"b", b"1")
        txn.commit()
    assert db.get(b"b") == b"1"


# -- run_transaction ------------------------------------------------------------------------

def test_run_transaction_returns_fns_result(db):
    db.put(b"n", b"41")

    def incr(txn):
        value = int(txn.get(b"n")) + 1
        txn.put(b"n", str(value).encode())
        return value

    assert db.run_transaction(incr) == 42
    assert db.get(b"n") == b"42"


def test_run_transaction_retries_on_conflict(db):
    db.put(b"n", b"0")
    calls = []

    def fn(txn):
        calls.append(1)
        value = int(txn.get(b"n"))
        if len(calls) <= 3:
            db.put(b"n", str(value + 100).encode())  # someone else wins, three times
        txn.put(b"n", str(value + 1).encode())
        return len(calls)

    assert db.run_transaction(fn) == 4
    assert db.get(b"n") == b"301"


def test_run_transaction_reraises_after_retries_exhausted(db):
    db.put(b"n", b"0")
    calls = []

    def always_loses(txn):
        calls.append(1)
        txn.get(b"n")
        db.put(b"n", str(len(calls)).encode())
        txn.put(b"n", b"mine")
        txn.put(b"side", b"effect")

    with pytest.raises(TransactionConflict):
        db.run_transaction(always_loses, retries=2)
    assert len(calls) == 3
    assert db.get(b"n") == b"3" and db.get(b"side") is None


def test_run_transaction_other_errors_propagate_without_retry(db):
    calls = []

    def fn(txn):
        calls.append(1)
        txn.put(b"k", b"v")
        raise KeyError("mine")

    with pytest.raises(KeyError):
        db.run_transaction(fn)
    assert calls == [1] and db.get(b"k") is None


# -- status ---------------------------------------------------------------------------------

def test_status_shape(db, shards):
    db.put(b"k", b"v")
    status = db.status()
    assert isinstance(status["nodes"], list) and status["nodes"]
    assert isinstance(status["shards"], list) and len(status["shards"]) == shards
    for shard in status["shards"]:
        assert shard["leader"] is not None
        assert isinstance(shard["commit_index"], int) and shard["commit_index"] >= 0
    assert sum(s["commit_index"] for s in status["shards"]) >= 1
    assert status["implementation"] in ("native", "pure", "cython")


def test_commit_index_counts_writes(db):
    start = sum(commit_indexes(db))
    db.put(b"a", b"1")
    db.put(b"b", b"1")
    db.delete(b"a")
    assert sum(commit_indexes(db)) == start + 3


# -- lifecycle ------------------------------------------------------------------------------

def test_close_is_idempotent_and_use_after_close_raises(store):
    db = store()
    db.put(b"k", b"v")
    db.close()
    db.close()
    calls = [lambda: db.get(b"k"), lambda: db.put(b"k", b"v"), lambda: db.delete(b"k"),
             lambda: db.cas(b"k", None, b"v"), lambda: db.scan(), lambda: db.transaction(),
             lambda: db.status(), lambda: db.run_transaction(lambda txn: txn.get(b"k"))]
    for call in calls:
        with pytest.raises(KVError):
            call()


def test_context_manager_closes(store):
    path = store.new_path()
    with kvstore.open(path) as db:
        db.put(b"k", b"v")
    with pytest.raises(KVError):
        db.get(b"k")
    with kvstore.open(path) as db2:  # the lock was released
        assert db2.get(b"k") == b"v"


def test_reopen_keeps_data(store, shards):
    db = store(shards=shards)
    for i in range(50):
        db.put(b"k%02d" % i, b"v%d" % i)
    db.delete(b"k07")
    with db.transaction() as txn:
        txn.put(b"t", b"x")
    db = store.reopen(db)
    assert db.get(b"k00") == b"v0" and db.get(b"k07") is None and db.get(b"t") == b"x"
    assert len(db.scan(b"k")) == 49
    assert len(db.status()["shards"]) == shards
    db.put(b"after", b"reopen")  # and keeps working
    db = store.reopen(db, shards=shards)
    assert db.get(b"after") == b"reopen"


def test_reopen_with_different_shards_is_invalid(store, shards):
    db = store(shards=shards)
    db.put(b"k", b"v")
    db.close()
    with pytest.raises(InvalidArgument) as info:
        store(db.path, shards=shards + 1)
    assert str(shards) in str(info.value)
    db = store(db.path)  # the refused open left the directory usable and unlocked
    assert db.get(b"k") == b"v"


def test_transaction_in_another_thread_sees_committed_state(db):
    db.put(b"k", b"v")
    seen = []
    t = threading.Thread(target=lambda: seen.append(db.run_transaction(lambda t: t.get(b"k"))))
    t.start()
    t.join()
    assert seen == [b"v"]
