"""The embedded store over the write-ahead log: crashes, power loss, torn writes, checkpoints.

The log runs on ``kvstore.sim.disk.FaultyFiles``, an in-memory twin of its files that,
at a simulated power loss, drops everything not fdatasync'd and can tear the
last write. LMDB stays on real files: it only ever moves by synced commits, so
what a crash leaves of it is what it committed. A "crash" here is the store
abandoned without ``close()`` (no last checkpoint), then the power loss.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import threading

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import kvstore.embedded.store
from kvstore.embedded.store import EmbeddedKV
from test_wal import FaultyFiles, PowerLoss


def crash(db: EmbeddedKV, files: FaultyFiles, keep: int = 0, mode: str = "prefix") -> None:
    """The process dies mid-flight: no close, no last checkpoint; then the power goes."""
    db._closed = True
    db._committer.stop()
    db._checkpointer.stop()  # a checkpoint under way finishes: LMDB commits are atomic
    db._wal._closed = True
    db._wal._fd = None  # its handles die with the process
    db._storage.close()
    files.power_loss(keep, mode)


def torn_put(db: EmbeddedKV, files: FaultyFiles, key: bytes, value: bytes) -> None:
    """A put whose fdatasync never returns: the power goes while it runs."""
    files.crash_at_sync = True
    with pytest.raises(PowerLoss):
        db.put(key, value)


@pytest.fixture
def small_segments(monkeypatch):
    monkeypatch.setattr(kvstore.embedded.store, "WAL_SEGMENT_BYTES", 2048)


def test_acknowledged_writes_survive_power_loss_and_a_torn_write_is_whole_or_absent(
        tmp_path, small_segments):
    for mode in ("prefix", "junk", "sectors"):
        for keep_fraction in (0.0, 0.3, 0.7, 1.0):
            path = str(tmp_path / f"{mode}-{keep_fraction}")
            files = FaultyFiles(seed=7)
            db = EmbeddedKV(path, wal_files=files)
            for i in range(40):
                db.put(b"k%02d" % i, b"v%02d" % i)
                if i == 20:
                    assert db.checkpoint()
            assert db.delete(b"k03")
            torn_put(db, files, b"k05", b"torn")
            crash(db, files, int(files.unsynced_write_size() * keep_fraction), mode)
            db = EmbeddedKV(path, wal_files=files)
            assert db.get(b"k03") is None
            assert db.get(b"k05") in (b"v05", b"torn")
            for i in range(40):
                if i not in (3, 5):
                    assert db.get(b"k%02d" % i) == b"v%02d" % i
            db.put(b"after", b"x")  # the log takes appends after its tail was cut
            db.close()
            with EmbeddedKV(path, wal_files=files) as db:
                assert db.get(b"after") == b"x"


def test_a_torn_multi_shard_transaction_is_all_or_nothing(tmp_path):
    keys = [b"t%02d" % i for i in range(12)]  # spread over the 3 shards
    outcomes = set()
    for cut in range(0, 400, 9):
        path = str(tmp_path / f"cut-{cut}")
        files = FaultyFiles(seed=cut)
        db = EmbeddedKV(path, shards=3, wal_files=files)
        with db.transaction() as txn:
            for k in keys:
                txn.put(k, b"old")
        files.crash_at_sync = True
        with pytest.raises(PowerLoss):
            with db.transaction() as txn:
                for k in keys:
                    txn.put(k, b"new")
        size = files.unsynced_write_size()
        crash(db, files, min(cut, size))
        with EmbeddedKV(path, wal_files=files) as db:
            seen = {db.get(k) for k in keys}
            assert seen in ({b"old"}, {b"new"}), (cut, seen)
            outcomes.add(seen.pop())
            assert db.verify()["keys_compared"] == len(keys)
        if cut > size:
            break
    assert outcomes == {b"old", b"new"}  # both sides of the cut were tried


def test_an_entry_whose_commit_point_was_torn_off_is_never_applied(tmp_path):
    """The power goes after a group's entry reached the disk but before its commit
    point: the entry stays a valid record in the log, and the next append reuses its
    slot. Neither that open nor a later one may apply it (the hypothesis machine
    found the later one doing so)."""
    from kvstore.storage.wal import RECORD_OVERHEAD
    path = str(tmp_path / "kv")
    files = FaultyFiles()
    db = EmbeddedKV(path, wal_files=files)
    db.put(b"k", b"v")
    torn_put(db, files, b"orphan", b"x")
    crash(db, files, files.unsynced_write_size() - RECORD_OVERHEAD)  # the entry, whole
    db = EmbeddedKV(path, wal_files=files)
    assert db.get(b"orphan") is None
    db.put(b"next", b"y")
    crash(db, files)
    with EmbeddedKV(path, wal_files=files) as db:
        assert db.get(b"orphan") is None and db.get(b"next") == b"y"
        assert db.scan() == [(b"k", b"v"), (b"next", b"y")]
        db.verify()


def test_replay_applies_nothing_twice_and_keeps_revisions(tmp_path, small_segments):
    """A crash after a checkpoint: the log before it is skipped, after it replayed once;
    a cas and a transaction's read check decide the same way on replay."""
    path = str(tmp_path / "kv")
    files = FaultyFiles()
    db = EmbeddedKV(path, shards=3, wal_files=files)
    for i in range(30):
        db.put(b"c", b"%d" % i)
    assert db.cas(b"c", b"29", b"swapped")
    assert db.checkpoint()
    assert not db.cas(b"c", b"29", b"again")  # replayed: must fail again
    db.put(b"n", b"1")
    with db.transaction() as txn:
        txn.put(b"n", b"%d" % (int(txn.get(b"n")) + 1))
    db.delete(b"c")
    before = [s["commit_index"] for s in db.status()["shards"]]
    revisions = db.run_transaction(lambda t: (t.get(b"n"), dict(t._buffer.reads)))
    crash(db, files)
    for _ in range(2):  # and a second open replays the same log to the same state
        db = EmbeddedKV(path, wal_files=files)
        assert db.get(b"c") is None and db.get(b"n") == b"2"
        assert [s["commit_index"] for s in db.status()["shards"]] == before
        assert db.run_transaction(lambda t: (t.get(b"n"), dict(t._buffer.reads))) == revisions
        db.verify()
        crash(db, files)


def test_a_log_that_lost_checkpointed_records_is_refused(tmp_path):
    """LMDB says the log reached position P; a log ending before P lost durable records."""
    path = str(tmp_path / "kv")
    files = FaultyFiles()
    db = EmbeddedKV(path, wal_files=files)
    db.put(b"k", b"v")
    assert db.checkpoint()
    crash(db, files)
    for name in list(files.files):
        del files.files[name]  # the log's files are gone
    with pytest.raises(kvstore.StorageError, match="checkpointed up to position"):
        EmbeddedKV(path, wal_files=files)


def test_a_directory_written_before_the_log_opens_and_goes_on(tmp_path):
    """No wal/, no log position in meta, its writes in the LMDB ``log`` table (the
    format before issue 12): it opens with its applied point from that table, takes
    writes through the log, and its state checks against both logs."""
    import lmdb

    from kvstore._native import encode_record
    from kvstore.commands import KIND_COMMANDS, OP_PUT, encode_commands
    from kvstore.storage.environment import META_LOG_CLOSED, META_LOG_POSITION

    path = str(tmp_path / "kv")
    with EmbeddedKV(path) as db:
        db.put(b"old", b"1")
    shutil.rmtree(os.path.join(path, "wal"))
    env = lmdb.open(path, max_dbs=8)
    try:
        log, meta = env.open_db(b"s0.log"), env.open_db(b"s0.meta")
        with env.begin(write=True) as txn:
            for name in (META_LOG_POSITION, META_LOG_CLOSED, b"applied", b"commit"):
                txn.delete(name, db=meta)
            txn.put((1).to_bytes(8, "big"), encode_record(
                1, 0, KIND_COMMANDS, encode_commands([(OP_PUT, b"old", b"1")])), db=log)
    finally:
        env.close()
    with EmbeddedKV(path) as db:
        assert db.get(b"old") == b"1"
        assert db.status()["shards"][0]["commit_index"] == 1
        db.put(b"new", b"2")
        assert db.verify()["records"] == 2  # one in each log
    with EmbeddedKV(path) as db:
        assert db.scan() == [(b"new", b"2"), (b"old", b"1")]
        assert db.status()["shards"][0]["commit_index"] == 2
        db.verify()


def test_a_failed_append_changes_nothing_and_the_store_says_to_reopen(tmp_path):
    import errno
    path = str(tmp_path / "kv")
    files = FaultyFiles()
    db = EmbeddedKV(path, wal_files=files)
    db.put(b"k", b"v")
    files.fail["fdatasync"] = OSError(errno.EIO, "Input/output error")
    with pytest.raises(kvstore.StorageError) as info:
        db.put(b"k", b"lost")
    assert info.value.path == db.path
    assert db.get(b"k") == b"v"  # the write that failed is not visible
    with pytest.raises(kvstore.StorageError, match="closed and opened again"):
        db.put(b"k2", b"v2")
    assert db.get(b"k") == b"v" and db.scan() == [(b"k", b"v")]
    db.close()
    with EmbeddedKV(path, wal_files=files) as db:
        db.put(b"k2", b"v2")
        assert db.scan() == [(b"k", b"v"), (b"k2", b"v2")]


def test_reads_during_checkpoints_are_never_stale(store, monkeypatch):
    """Checkpoints run back to back while a writer writes and readers read: a read
    started after a put returned sees it (or a later write), through get, scan and
    transactions, whichever of overlay, frozen generation or LMDB holds it."""
    monkeypatch.setattr(kvstore.embedded.store, "CHECKPOINT_SECONDS", 0.0005)
    monkeypatch.setattr(kvstore.embedded.store, "CHECKPOINT_BYTES", 1024)
    db = store(shards=2)
    n_keys, rounds = 16, 150
    keys = [b"r%02d" % j for j in range(n_keys)]
    acked = [-1] * n_keys
    done = threading.Event()
    problems: list[str] = []

    def writer():
        try:
            for i in range(rounds):
                for j, k in enumerate(keys):
                    db.put(k, b"%08d" % i)
                    acked[j] = i
        finally:
            done.set()

    def check(j: int, floor: int, raw, how: str) -> None:
        got = -1 if raw is None else int(raw)
        if got < floor:
            problems.append(f"{how} of {keys[j]!r} saw {got} after {floor} was acknowledged")

    def reader(seed: int):
        rng = random.Random(seed)
        while not done.is_set() and not problems:
            j = rng.randrange(n_keys)
            how = rng.choice(["get", "scan", "txn"])
            floors = list(acked)
            if how == "get":
                check(j, floors[j], db.get(keys[j]), how)
            elif how == "scan":
                rows = dict(db.scan(prefix=b"r"))
                for jj, k in enumerate(keys):
                    check(jj, floors[jj], rows.get(k), how)
            else:
                values = db.run_transaction(lambda t: [t.get(k) for k in keys])
                for jj, raw in enumerate(values):
                    check(jj, floors[jj], raw, how)

    threads = [threading.Thread(target=writer)] + [
        threading.Thread(target=reader, args=(s,)) for s in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert problems == []
    assert db.status()["log"]["checkpoints"] >= 5
    assert all(db.get(k) == b"%08d" % (rounds - 1) for k in keys)
    db.verify()


# -- random operations, crashes and reopens against a model ------------------------------------

KEYS = [b"a", b"b", b"c", b"ab", b"\x00", b"\xff"]
keys_st = st.sampled_from(KEYS)
values_st = st.sampled_from([b"", b"x", b"y", b"long" * 40])


class CrashMachine(RuleBasedStateMachine):
    """Puts, deletes, cas, transactions, checkpoints, clean reopens and power losses
    (with a torn last write) against a dict; after each step the store equals it."""

    @initialize(shards=st.sampled_from([1, 3]), seed=st.integers(0, 1000))
    def open_store(self, shards, seed):
        self.dir = tempfile.mkdtemp(prefix="kvstore-crash-")
        self.path = os.path.join(self.dir, "kv")
        self.files = FaultyFiles(seed)
        self.db = EmbeddedKV(self.path, shards=shards, wal_files=self.files)
        self.model: dict[bytes, bytes] = {}

    def teardown(self) -> None:
        if getattr(self, "db", None) is not None:
            self.db.close()
        shutil.rmtree(getattr(self, "dir", ""), ignore_errors=True)

    @rule(key=keys_st, value=values_st)
    def put(self, key, value):
        self.db.put(key, value)
        self.model[key] = value

    @rule(key=keys_st)
    def delete(self, key):
        assert self.db.delete(key) == (key in self.model)
        self.model.pop(key, None)

    @rule(key=keys_st, expected=st.none() | values_st, new=st.none() | values_st)
    def cas(self, key, expected, new):
        swapped = self.db.cas(key, expected, new)
        assert swapped == (self.model.get(key) == expected)
        if swapped:
            if new is None:
                self.model.pop(key, None)
            else:
                self.model[key] = new

    @rule(writes=st.dictionaries(keys_st, st.none() | values_st, min_size=1, max_size=4))
    def transaction(self, writes):
        with self.db.transaction() as txn:
            for key, value in writes.items():
                txn.get(key)
                if value is None:
                    txn.delete(key)
                else:
                    txn.put(key, value)
        for key, value in writes.items():
            if value is None:
                self.model.pop(key, None)
            else:
                self.model[key] = value

    @rule()
    def checkpoint(self):
        self.db.checkpoint()

    @rule()
    def reopen(self):
        self.db.close()
        self.db = EmbeddedKV(self.path, wal_files=self.files)

    @rule(key=keys_st, value=values_st, torn=st.booleans(), keep=st.floats(0, 1),
          mode=st.sampled_from(["prefix", "junk", "sectors"]))
    def power_loss(self, key, value, torn, keep, mode):
        if torn:
            torn_put(self.db, self.files, key, value)
        crash(self.db, self.files, int(self.files.unsynced_write_size() * keep), mode)
        self.db = EmbeddedKV(self.path, wal_files=self.files)
        if torn:
            got = self.db.get(key)
            assert got in (self.model.get(key), value)
            if got is None:
                self.model.pop(key, None)
            else:
                self.model[key] = got

    @invariant()
    def matches_model(self):
        if getattr(self, "db", None) is None:
            return
        assert self.db.scan() == sorted(self.model.items())
        for key in KEYS:
            assert self.db.get(key) == self.model.get(key)


CrashMachine.TestCase.settings = settings(
    max_examples=40, stateful_step_count=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


@pytest.fixture
def crash_segments(monkeypatch):
    monkeypatch.setattr(kvstore.embedded.store, "WAL_SEGMENT_BYTES", 1024)


@pytest.mark.usefixtures("crash_segments")
class TestCrashMachine(CrashMachine.TestCase):
    pass
