"""Bad input raises InvalidArgument (a ValueError) or KVError, and writes nothing."""

from __future__ import annotations

import pytest

import kvstore
from kvstore import MAX_KEY_SIZE, MAX_VALUE_SIZE, InvalidArgument, KVError

WRONG_TYPES = [1, None, [b"k"], 1.5, True, {b"k": b"v"}, object()]
WRONG_BOUND_TYPES = [1, [b"k"], 1.5, True, object()]
WRONG_LIMITS = [-1, 1.5, "3", b"3", [1], True]


def snapshot(db):
    """Everything observable that a write would change."""
    return db.scan(), [s["commit_index"] for s in db.status()["shards"]]


@pytest.fixture
def seeded(db):
    db.put(b"existing", b"value")
    return db


def raises_invalid(db, call):
    before = snapshot(db)
    with pytest.raises(InvalidArgument) as info:
        call()
    assert isinstance(info.value, ValueError) and isinstance(info.value, KVError)
    assert snapshot(db) == before
    return info.value


@pytest.mark.parametrize("bad", WRONG_TYPES, ids=repr)
def test_wrong_key_types(seeded, bad):
    db = seeded
    raises_invalid(db, lambda: db.get(bad))
    raises_invalid(db, lambda: db.put(bad, b"v"))
    raises_invalid(db, lambda: db.delete(bad))
    raises_invalid(db, lambda: db.cas(bad, None, b"v"))


@pytest.mark.parametrize("bad", WRONG_TYPES, ids=repr)
def test_wrong_value_types(seeded, bad):
    db = seeded
    if bad is not None:  # None is a legal cas expected/new
        raises_invalid(db, lambda: db.cas(b"existing", bad, b"v"))
        raises_invalid(db, lambda: db.cas(b"existing", b"value", bad))
    raises_invalid(db, lambda: db.put(b"k", bad))
    raises_invalid(db, lambda: db.put(b"existing", bad))


@pytest.mark.parametrize("bad", WRONG_BOUND_TYPES, ids=repr)
def test_wrong_scan_bound_types(seeded, bad):
    db = seeded
    raises_invalid(db, lambda: db.scan(bad))
    raises_invalid(db, lambda: db.scan(start=bad))
    raises_invalid(db, lambda: db.scan(end=bad))
    with db.transaction() as txn:
        raises_invalid(db, lambda: txn.scan(bad))
        raises_invalid(db, lambda: txn.scan(start=bad))
        raises_invalid(db, lambda: txn.scan(end=bad))


@pytest.mark.parametrize("bad", WRONG_LIMITS, ids=repr)
def test_wrong_limits(seeded, bad):
    db = seeded
    raises_invalid(db, lambda: db.scan(limit=bad))
    with db.transaction() as txn:
        raises_invalid(db, lambda: txn.scan(limit=bad))


def test_empty_key(seeded):
    db = seeded
    for empty in (b"", ""):
        raises_invalid(db, lambda: db.get(empty))
        raises_invalid(db, lambda: db.put(empty, b"v"))
        raises_invalid(db, lambda: db.delete(empty))
        raises_invalid(db, lambda: db.cas(empty, None, b"v"))


def test_key_size_limit(seeded):
    db = seeded
    longest = b"k" * MAX_KEY_SIZE
    too_long = b"k" * (MAX_KEY_SIZE + 1)
    err = raises_invalid(db, lambda: db.put(too_long, b"v"))
    assert str(MAX_KEY_SIZE) in str(err)
    raises_invalid(db, lambda: db.get(too_long))
    raises_invalid(db, lambda: db.delete(too_long))
    raises_invalid(db, lambda: db.cas(too_long, None, b"v"))
    # a str key is measured in UTF-8 bytes
    raises_invalid(db, lambda: db.put("é" * (MAX_KEY_SIZE // 2 + 1), b"v"))
    db.put(longest, b"v")
    assert db.get(longest) == b"v"
    assert db.scan(b"k") == [(longest, b"v")]
    assert db.cas(longest, b"v", b"w") is True
    with db.transaction() as txn:
        raises_invalid(db, lambda: txn.put(too_long, b"v"))
        txn.put(longest, b"x")
    assert db.get(longest) == b"x"


def test_value_size_limit(store):
    db = store()
    biggest = b"v" * MAX_VALUE_SIZE
    too_big = b"v" * (MAX_VALUE_SIZE + 1)
    err = raises_invalid(db, lambda: db.put(b"k", too_big))
    assert str(MAX_VALUE_SIZE) in str(err)
    raises_invalid(db, lambda: db.cas(b"k", None, too_big))
    raises_invalid(db, lambda: db.cas(b"k", too_big, b"v"))
    with db.transaction() as txn:
        raises_invalid(db, lambda: txn.put(b"k", too_big))
    assert db.get(b"k") is None
    db.put(b"k", biggest)
    assert db.get(b"k") == biggest


def test_unencodable_str_is_invalid(seeded):
    db = seeded
    lone_surrogate = "\ud800"
    raises_invalid(db, lambda: db.put(lone_surrogate, b"v"))
    raises_invalid(db, lambda: db.put(b"k", lone_surrogate))
    raises_invalid(db, lambda: db.get(lone_surrogate))
    raises_invalid(db, lambda: db.scan(lone_surrogate))
    raises_invalid(db, lambda: db.cas(b"existing", lone_surrogate, b"v"))


@pytest.mark.parametrize("bad", WRONG_TYPES, ids=repr)
def test_wrong_types_inside_a_transaction_write_nothing(seeded, bad):
    db = seeded
    before = snapshot(db)
    with pytest.raises(InvalidArgument):
        with db.transaction() as txn:
            txn.put(b"first", b"1")
            txn.put(bad, b"v")
    with pytest.raises(InvalidArgument):
        with db.transaction() as txn:
            txn.put(b"first", b"1")
            txn.get(bad)
    if bad is not None:
        with pytest.raises(InvalidArgument):
            with db.transaction() as txn:
                txn.put(b"first", b"1")
                txn.put(b"second", bad)
    with pytest.raises(InvalidArgument):
        with db.transaction() as txn:
            txn.delete(bad)
    assert snapshot(db) == before


def test_closed_store(store):
    db = store()
    db.put(b"k", b"v")
    db.close()
    for call in (lambda: db.put(b"k", b"w"), lambda: db.get(b"k"), lambda: db.delete(b"k"),
                 lambda: db.cas(b"k", b"v", b"w"), lambda: db.scan(), lambda: db.status(),
                 lambda: db.transaction()):
        with pytest.raises(KVError):
            call()
    db = store(db.path)
    assert db.scan() == [(b"k", b"v")]


def test_transaction_open_when_store_closes(store):
    db = store()
    db.put(b"k", b"v")
    with pytest.raises(KVError):
        with db.transaction() as txn:
            assert txn.get(b"k") == b"v"
            db.close()
            txn.put(b"k", b"w")
    db = store(db.path)
    assert db.get(b"k") == b"v"


def test_txn_after_commit_or_after_with(seeded):
    db = seeded
    with db.transaction() as txn:
        txn.put(b"a", b"1")
    before = snapshot(db)
    for call in (lambda: txn.put(b"b", b"1"), lambda: txn.get(b"a"), lambda: txn.delete(b"a"),
                 lambda: txn.scan(), lambda: txn.commit()):
        with pytest.raises(KVError):
            call()
    assert snapshot(db) == before
    # and after an explicit commit, inside the with block
    with db.transaction() as txn2:
        txn2.put(b"c", b"1")
        txn2.commit()
        with pytest.raises(KVError):
            txn2.put(b"d", b"1")
    assert db.get(b"c") == b"1" and db.get(b"d") is None
    # and after a discarding exception
    with pytest.raises(RuntimeError):
        with db.transaction() as txn3:
            raise RuntimeError
    with pytest.raises(KVError):
        txn3.put(b"e", b"1")
    assert db.get(b"e") is None


def test_txn_used_outside_with(seeded):
    db = seeded
    txn = db.transaction()
    before = snapshot(db)
    with pytest.raises(KVError):
        txn.put(b"x", b"1")
    with pytest.raises(KVError):
        txn.get(b"x")
    assert snapshot(db) == before


def test_entering_a_txn_twice(seeded):
    db = seeded
    txn = db.transaction()
    before = snapshot(db)
    with txn:
        with pytest.raises(InvalidArgument):
            with txn:
                pass
        txn.put(b"inner", b"1")
    assert db.get(b"inner") == b"1"
    with pytest.raises(InvalidArgument):
        with txn:
            pass
    assert len(snapshot(db)[0]) == len(before[0]) + 1


@pytest.mark.parametrize("bad", [None, 1, b"fn", [len]], ids=repr)
def test_run_transaction_non_callable(seeded, bad):
    db = seeded
    raises_invalid(db, lambda: db.run_transaction(bad))


@pytest.mark.parametrize("bad", [-1, 1.5, "3", True], ids=repr)
def test_run_transaction_bad_retries(seeded, bad):
    db = seeded
    calls = []
    raises_invalid(db, lambda: db.run_transaction(lambda txn: calls.append(txn.put(b"x", b"1")),
                                                  retries=bad))
    assert calls == []


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), "3", True], ids=repr)
def test_run_transaction_bad_timeout(seeded, bad):
    db = seeded
    calls = []
    raises_invalid(db, lambda: db.run_transaction(lambda txn: calls.append(txn.put(b"x", b"1")),
                                                  timeout=bad))
    assert calls == []


@pytest.mark.parametrize("bad", [0, -1, 1.5, "3", True, 10_000])
def test_bad_shard_counts(tmp_path, bad):
    with pytest.raises(InvalidArgument):
        kvstore.open(str(tmp_path / "kv"), shards=bad)


def test_bad_open_path_type():
    with pytest.raises(InvalidArgument):
        kvstore.open(42)


@pytest.mark.parametrize("bad", [-1, 0, 2**70, "x", 1.5, True, b"1"])
def test_bad_map_sizes(tmp_path, bad):
    """Issue 11 #11: OverflowError, TypeError or ValueError from LMDB before."""
    with pytest.raises(InvalidArgument, match="map_size"):
        kvstore.open(str(tmp_path / "kv"), map_size=bad)
    assert not (tmp_path / "kv" / "data.mdb").exists()


@pytest.mark.parametrize("bad", ["", b"", "kv\0x", b"kv\0x"])
def test_empty_paths_and_paths_with_a_nul_are_invalid(tmp_path, monkeypatch, bad):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InvalidArgument):
        kvstore.open(bad)
    assert list(tmp_path.iterdir()) == []  # open("") did not open the current directory


def test_a_bytes_path_is_accepted(tmp_path):
    path = str(tmp_path / "kv")
    with kvstore.open(path.encode()) as db:
        db.put(b"k", b"v")
        assert db.path == path
    with kvstore.open(path) as db:
        assert db.get(b"k") == b"v"


@pytest.mark.parametrize("limit", [2**63 - 1, 2**63, 2**64, 10**30])
def test_huge_scan_limits_mean_no_limit(seeded, limit):
    """Issue 11 #12: islice raised a bare ValueError past sys.maxsize on several shards."""
    seeded.put(b"more", b"v")
    expected = [(b"existing", b"value"), (b"more", b"v")]
    assert seeded.scan(limit=limit) == expected
    assert seeded.scan(b"", start=b"a", limit=limit) == expected
    with seeded.transaction() as txn:
        assert txn.scan(limit=limit) == expected


def test_a_transaction_over_max_txn_size_is_refused_alone(store):
    """Issue 11 #9: 300 x 4 MiB raised a bare ValueError, and failed a neighbour's put in
    the same group commit; now the put that crosses MAX_TXN_SIZE is refused by itself."""
    import threading

    from kvstore.keys import MAX_TXN_SIZE

    db = store(shards=3)
    value = b"x" * MAX_VALUE_SIZE
    fits = MAX_TXN_SIZE // (MAX_VALUE_SIZE + 16)
    neighbour_errors = []

    def neighbour():
        try:
            for i in range(20):
                db.put(b"small/%02d" % i, b"v")
        except BaseException as e:
            neighbour_errors.append(e)

    thread = threading.Thread(target=neighbour)
    thread.start()
    with pytest.raises(InvalidArgument, match="MAX_TXN_SIZE") as info:
        with db.transaction() as txn:
            for i in range(300):
                txn.put(b"big/%03d" % i, value)
    assert isinstance(info.value, ValueError)
    thread.join(60)
    assert neighbour_errors == []
    assert len(db.scan(b"small/")) == 20
    assert db.scan(b"big/") == []  # the refused transaction wrote nothing
    with pytest.raises(RuntimeError, match="discard"):
        with db.transaction() as txn:
            for i in range(fits):
                txn.put(b"big/%03d" % i, value)
            with pytest.raises(InvalidArgument, match="transaction is unchanged"):
                txn.put(b"big/one-too-many", value)
            txn.put(b"big/one-too-many", b"")  # a small one still fits
            assert txn.get(b"big/one-too-many") == b""
            assert txn.get(b"big/%03d" % (fits - 1)) == value
            raise RuntimeError("discard it: committing 60 MiB would only slow the test")
    assert db.scan(b"big/") == []
