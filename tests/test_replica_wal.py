"""A node's storage on the write-ahead log (``kvstore.node.storage``): what a save makes
durable, what a crash between checkpoints keeps, what a checkpoint moves to LMDB."""

from __future__ import annotations

import os

import msgpack
import pytest

from kvstore._native import encode_record
from kvstore.commands import OP_PUT
from kvstore.paxos.replica import KIND_BATCH, Entry, Snapshot
from kvstore.commands import encode_client_command
from kvstore.machine.replica import ShardWrite
from kvstore.node.storage import WAL_DIR, WalReplicaStorage
from kvstore.storage.replay import commit_point

BALLOT = 65536


def put_entry(slot: int, key: bytes, value: bytes, client=b"c"):
    cmd = encode_client_command(client, slot + 1, slot + 1, [OP_PUT, key, value])
    return encode_record(slot, BALLOT, KIND_BATCH, msgpack.packb([cmd])), \
        Entry(slot, BALLOT, KIND_BATCH, [cmd])


def crash(st: WalReplicaStorage) -> None:
    """Stop as a SIGKILL would: no checkpoint, nothing flushed but what the log holds."""
    st.checkpointer.stop()
    st.checkpointer = None
    st.wal.close()
    st.storage.close()


def wal_segments(path) -> list:
    return sorted(os.listdir(os.path.join(path, WAL_DIR)))


@pytest.fixture
def open_storage(tmp_path):
    opened = []

    def make(name="s", shards=2, **kw):
        st = WalReplicaStorage(str(tmp_path / name), shards, checkpoint_seconds=3600, **kw)
        opened.append(st)
        return st

    yield make
    for st in opened:
        if st.wal is not None:
            st.close()


def test_a_save_is_read_at_once_and_survives_a_crash_before_any_checkpoint(open_storage):
    st = open_storage()
    rec, entry = put_entry(0, b"k", b"v")
    results = st.save([ShardWrite(1, promised=BALLOT, commit_index=0, records=[rec],
                                  committed=[entry])])
    assert results == [(1, 0, (b"c", 1), None)]
    assert st.get(1, b"k") == (b"v", 1)  # the overlay, before any checkpoint
    assert st.scan(1, b"", None, None) == [(b"k", b"v", 1)]
    crash(st)
    st = open_storage()
    p = st.load(1)
    # the hard state and the record come back from the log; the applied state is LMDB's
    # (nothing checkpointed): the replica re-applies the chosen entry above it
    assert (p.promised, p.commit_index, p.applied_index, p.records) == (BALLOT, 0, -1, [rec])
    assert st.get(1, b"k") == (None, 0)
    assert st.save([ShardWrite(1, committed=[entry])]) == [(1, 0, (b"c", 1), None)]
    assert st.get(1, b"k") == (b"v", 1)


def test_a_checkpoint_moves_state_and_records_to_lmdb_and_drops_the_log_below(open_storage):
    st = open_storage(segment_bytes=64 * 1024)
    for slot in range(200):
        rec, entry = put_entry(slot, b"k%03d" % slot, bytes(300))
        st.save([ShardWrite(0, promised=BALLOT, commit_index=slot, records=[rec],
                            committed=[entry])])
    before = wal_segments(st.path)
    assert len(before) > 1
    assert st.checkpointer.checkpoint()
    assert len(wal_segments(st.path)) < len(before)  # segments below the checkpoint: gone
    assert st.get(0, b"k007") == (bytes(300), 8)
    crash(st)
    st = open_storage()
    p = st.load(0)
    assert (p.commit_index, p.applied_index, len(p.records)) == (199, 199, 200)
    assert st.get(0, b"k199") == (bytes(300), 200)  # LMDB: nothing to re-apply


def test_compaction_and_a_snapshot_install_are_kept_across_a_restart(open_storage):
    src = open_storage("src", shards=1)
    for slot in range(10):
        rec, entry = put_entry(slot, b"k%d" % slot, b"v%d" % slot)
        src.save([ShardWrite(0, promised=BALLOT, commit_index=slot, records=[rec],
                             committed=[entry])])
    src.save([ShardWrite(0, compacted_through=5)])
    snapshot = Snapshot(9, src.snapshot_data(0))
    src.close()
    src = open_storage("src", shards=1)
    p = src.load(0)
    assert [int.from_bytes(r[8:16], "little") for r in p.records] == [6, 7, 8, 9]
    assert (p.snapshot_index, p.applied_index) == (9, 9)

    dst = open_storage("dst", shards=1)
    rec, entry = put_entry(0, b"old", b"gone")
    dst.save([ShardWrite(0, promised=BALLOT, commit_index=0, records=[rec], committed=[entry])])
    dst.save([ShardWrite(0, snapshot=snapshot)])
    assert dst.get(0, b"old") == (None, 0) and dst.get(0, b"k3") == (b"v3", 4)
    rec, entry = put_entry(10, b"after", b"x")
    dst.save([ShardWrite(0, commit_index=10, records=[rec], committed=[entry])])
    crash(dst)
    dst = open_storage("dst", shards=1)
    p = dst.load(0)
    assert (p.commit_index, p.applied_index, p.snapshot_index) == (10, 9, 9)
    assert dst.get(0, b"k9") == (b"v9", 10)
    assert dst.save([ShardWrite(0, committed=[entry])])[0][3] is None
    assert dst.get(0, b"after") == (b"x", 11)


def test_a_save_that_only_learns_commit_points_costs_no_fsync(open_storage):
    st = open_storage()
    rec, entry = put_entry(0, b"k", b"v")
    st.save([ShardWrite(0, promised=BALLOT, records=[rec])])  # accepted: synced
    appends = st.wal.appends
    st.save([ShardWrite(0, commit_index=0, committed=[entry])])  # chosen: applied, no fsync
    assert st.wal.appends == appends
    assert st.get(0, b"k") == (b"v", 1)
    crash(st)
    st = open_storage()
    p = st.load(0)  # the commit point was not in the log: learned again from the peers
    assert (p.commit_index, p.applied_index, p.records) == (-1, -1, [rec])
    rec1, entry1 = put_entry(1, b"k1", b"v1")
    st.save([ShardWrite(0, commit_index=0, committed=[entry])])
    st.save([ShardWrite(0, records=[rec1])])  # the next append carries the commit point
    crash(st)
    assert open_storage().load(0).commit_index == 0


def test_a_log_that_lost_checkpointed_records_is_refused(open_storage, tmp_path):
    import shutil
    from kvstore.errors import CorruptRecord
    st = open_storage()
    rec, entry = put_entry(0, b"k", b"v")
    st.save([ShardWrite(0, promised=BALLOT, commit_index=0, records=[rec], committed=[entry])])
    assert st.checkpointer.checkpoint()
    crash(st)
    shutil.rmtree(os.path.join(str(tmp_path / "s"), WAL_DIR))  # the log is gone, LMDB is not
    with pytest.raises(CorruptRecord, match="records this node acknowledged are missing"):
        WalReplicaStorage(str(tmp_path / "s"), 2)
    with pytest.raises(CorruptRecord, match="missing"):  # not "in use": nothing left locked
        WalReplicaStorage(str(tmp_path / "s"), 2)


def slots_of(records: list) -> list:
    return [int.from_bytes(r[8:16], "little") for r in records]


def test_records_replayed_at_a_restart_survive_the_next_checkpoint(open_storage):
    """Issue 19, defects 1 and 4: the log's records after the checkpoint were replayed
    into the replica only, so the first checkpoint after a restart moved LMDB's log
    position past them without putting them in LMDB, and once their segment was
    deleted they were gone: holes below the commit point at the next restart."""
    st = open_storage(shards=1, segment_bytes=1024)
    rec0, entry0 = put_entry(0, b"a", b"0")
    st.save([ShardWrite(0, promised=BALLOT, commit_index=0, records=[rec0], committed=[entry0])])
    assert st.checkpointer.checkpoint()
    rec1, entry1 = put_entry(1, b"b", b"1")
    st.save([ShardWrite(0, records=[rec1, put_entry(2, b"c", b"2")[0]])])
    st.save([ShardWrite(0, commit_index=1, committed=[entry1])])
    st.save([ShardWrite(0, records=[put_entry(3, b"d", b"3")[0]])])  # carries commit point 1
    crash(st)  # a SIGKILL: LMDB holds slot 0, the log slots 1 to 3
    st = open_storage(shards=1, segment_bytes=1024)
    p = st.load(0)
    assert (p.commit_index, p.applied_index, slots_of(p.records)) == (1, 0, [0, 1, 2, 3])
    st.save([ShardWrite(0, committed=[entry1])])  # the replica re-applies slot 1
    first = wal_segments(st.path)[0]
    for slot in range(4, 12):  # the log moves on to new segments
        st.save([ShardWrite(0, records=[put_entry(slot, b"k", bytes(200))[0]])])
    assert st.checkpointer.checkpoint()
    assert first not in wal_segments(st.path)  # slots 1 to 3 are in LMDB only now
    crash(st)
    st = open_storage(shards=1, segment_bytes=1024)
    p = st.load(0)
    assert (p.commit_index, p.applied_index, slots_of(p.records)) == (1, 1, list(range(12)))
    assert st.get(0, b"b") == (b"1", 2)


def test_a_directory_whose_checkpoint_passed_replayed_records_starts(open_storage,
                                                                     monkeypatch):
    """The captured directory of issue 19 (defect 1), in small: written before the fix,
    LMDB's log position lies past records LMDB never received; the log still holds
    them, and recovery takes them from there (and checkpoints them, this time)."""
    st = open_storage(shards=1, segment_bytes=1024)
    rec0, entry0 = put_entry(0, b"a", b"0")
    st.save([ShardWrite(0, promised=BALLOT, commit_index=0, records=[rec0], committed=[entry0])])
    assert st.checkpointer.checkpoint()
    rec1, entry1 = put_entry(1, b"b", b"1")
    rec2, entry2 = put_entry(2, b"c", b"2")
    st.save([ShardWrite(0, commit_index=1, records=[rec1, rec2])])
    crash(st)
    with monkeypatch.context() as m:  # the recovery of old: nothing replayed is published
        m.setattr(WalReplicaStorage, "_replayed", lambda self, hard, records, before: {})
        st = open_storage(shards=1, segment_bytes=1024)
        st.load(0)
        st.save([ShardWrite(0, commit_index=2, committed=[entry1, entry2])])
        assert st.checkpointer.checkpoint()
        crash(st)
    st = open_storage(shards=1, segment_bytes=1024)
    p = st.load(0)
    assert (p.commit_index, p.applied_index, slots_of(p.records)) == (2, 2, [0, 1, 2])
    first = wal_segments(st.path)[0]
    for slot in range(3, 10):  # the log moves on to new segments
        st.save([ShardWrite(0, records=[put_entry(slot, b"k", bytes(200))[0]])])
    assert st.checkpointer.checkpoint()
    assert first not in wal_segments(st.path)  # slots 1 and 2 are in LMDB only now
    crash(st)
    p = open_storage(shards=1, segment_bytes=1024).load(0)
    assert slots_of(p.records) == list(range(10))
def test_a_promise_replayed_at_a_restart_survives_a_checkpoint_of_other_shards(open_storage):
    """A promise in the log only (the shard saved nothing since the restart) must not
    be forgotten when another shard's save is checkpointed: an acceptor that forgot a
    promise could accept below it."""
    st = open_storage(shards=2)
    st.save([ShardWrite(0, promised=BALLOT), ShardWrite(1, promised=BALLOT)])
    assert st.checkpointer.checkpoint()
    st.save([ShardWrite(0, promised=3 * BALLOT)])
    crash(st)
    st = open_storage(shards=2)
    assert st.load(0).promised == 3 * BALLOT
    st.save([ShardWrite(1, records=[put_entry(0, b"k", b"v")[0]])])  # shard 1 only
    assert st.checkpointer.checkpoint()
    crash(st)
    assert open_storage(shards=2).load(0).promised == 3 * BALLOT


def damage(path: str, shards: int, shard: int, change) -> None:
    """``change(txn, tables)`` on the closed directory's LMDB, as a disk or a bug might."""
    from kvstore.storage import Storage
    storage = Storage(path, shards=shards)
    try:
        storage.write(lambda txn: change(txn, storage.shards[shard]))
    finally:
        storage.close()


def put_hard(hard: list):
    from kvstore.machine.replica import META_PAXOS
    return lambda txn, t: txn.put(META_PAXOS, msgpack.packb(hard), db=t.meta)


def put_log(slot: int, record: bytes):
    from kvstore._native import slot_key
    return lambda txn, t: txn.put(slot_key(slot), record, db=t.log)


@pytest.mark.parametrize("change,message", [
    (put_hard([BALLOT, 12, 9, -1]), r"slots 10-12, at or below the commit point, are not in the "
                                    r"log"),
    (put_hard([BALLOT, 9, 10, -1]), r"its points are out of order \(promised 1.0, commit 9, "
                                    r"applied 10, compacted -1\)"),
    (put_hard([BALLOT, 9, 9, 10]), r"its points are out of order"),
    (put_hard([BALLOT, 9, 9]), r"its hard state \[65536, 9, 9\] is not four integers"),
    (put_log(1, put_entry(4, b"k", b"v")[0]), r"the log record kept at slot 1 is slot 4's"),
    (put_log(1, put_entry(1, b"k", b"v")[0][:-1] + b"\x00"),
     r"the log record at slot 1 does not validate"),
], ids=["commit-above-records", "applied-above-commit", "compacted-above-applied",
        "hard-state-shape", "record-at-another-slot", "torn-record"])
def test_an_inconsistent_persisted_state_is_refused_at_recovery(open_storage, tmp_path,
                                                                change, message):
    """Issue 19: every recovery checks the persisted state's relations, and refuses
    one that fails them in one line naming the directory (not an AssertionError
    from the replica's first Ready)."""
    from kvstore.errors import CorruptRecord
    st = open_storage(shards=1, segment_bytes=1024)
    for slot in range(10):
        rec, entry = put_entry(slot, b"k%d" % slot, bytes(200))
        st.save([ShardWrite(0, promised=BALLOT, commit_index=slot, records=[rec],
                            committed=[entry])])
    st.close()  # checkpointed: the log keeps its last segment only, after slot 1
    path = str(tmp_path / "s")
    damage(path, 1, 0, change)
    with pytest.raises(CorruptRecord, match=message) as info:
        WalReplicaStorage(path, 1)
    assert path in str(info.value) and "\n" not in str(info.value)
    assert "shard 0" in str(info.value) and "rejoin" in str(info.value)


def test_a_recovering_node_that_learned_past_a_hole_restarts(open_storage, tmp_path):
    """A node recovering from a lost disk (promise 0: it holds no vote) learns chosen
    values as the leader sends them, with holes below some (slot 42 before 4-41): its
    commit point stays below them. Seed 103221 of a 3-node sweep restarted such a node
    after a checkpoint and the recovery check refused it ('slot 42 was accepted at ballot
    1.1, above the promise 0.0'). What it learned is no vote: it starts (its replica
    drops what lies above its commit point and learns it again)."""
    st = open_storage(shards=1)
    held = [put_entry(slot, b"k%d" % slot, b"v") for slot in (0, 1, 2, 3)]
    learned, _ = put_entry(42, b"k42", b"v")
    st.save([ShardWrite(0, commit_index=3, records=[rec for rec, _ in held] + [learned],
                        committed=[entry for _, entry in held])])
    st.close()  # checkpointed: the learned record is in LMDB now, with promise 0
    again = WalReplicaStorage(str(tmp_path / "s"), 1)
    try:
        state = again.load(0)
        assert (state.promised, state.commit_index) == (0, 3)
    finally:
        again.close()


def test_a_save_whose_append_failed_leaves_nothing_behind(open_storage):
    """A full disk fails a save's append: nothing of it may reach LMDB by a later save
    or the checkpoint at close (its commit point there, without its records, would be
    a commit point for slots the node never held)."""
    import errno
    from kvstore.errors import StorageError
    st = open_storage(shards=1)
    rec0, entry0 = put_entry(0, b"a", b"0")
    st.save([ShardWrite(0, promised=BALLOT, commit_index=0, records=[rec0], committed=[entry0])])

    def refused(_fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    st.wal._files.fdatasync = refused
    rec1, entry1 = put_entry(1, b"b", b"1")
    with pytest.raises(StorageError, match="disk full"):
        st.save([ShardWrite(0, promised=2 * BALLOT, commit_index=1, records=[rec1],
                            committed=[entry1])])
    assert st.get(0, b"b") == (None, 0)
    st.save([ShardWrite(0, committed=[])])  # a save that appends nothing still works
    st.close()
    p = open_storage(shards=1).load(0)
    assert (p.promised, p.commit_index, p.applied_index, slots_of(p.records)) == (BALLOT, 0, 0, [0])


def test_kvstore_server_refuses_an_inconsistent_directory_in_one_line(tmp_path):
    """Issue 19, defect 1: the node died with an AssertionError from its replica's first
    Ready; now the recovery check refuses the directory: exit 2, one line naming it."""
    from conftest import refused_start
    data = str(tmp_path / "n1")
    st = WalReplicaStorage(data, 1)
    rec, entry = put_entry(0, b"k", b"v")
    st.save([ShardWrite(0, promised=BALLOT, commit_index=0, records=[rec], committed=[entry])])
    st.close()
    damage(data, 1, 0, put_hard([BALLOT, 7, 0, -1]))  # a commit point past the records
    err = refused_start(tmp_path, data, 1)
    assert err.startswith("kvstore-server: the persisted state of shard 0 in " + data), err
    assert "slots 1-7, at or below the commit point, are not in the log" in err, err


def test_an_append_torn_before_its_promise_loses_only_what_it_never_announced():
    """A save appends a shard's promise after its records (so that a promise on disk
    implies them: a wiped node's first promise marks it recovered). A crash that tears
    the append after the records keeps acceptances above the commit point at a ballot
    above the promise on disk: nothing of that save was announced, so the replay drops
    them (they were refused as an inconsistent state), and an acceptance they replaced,
    durable before, stands again. Chosen records (at or below the commit point) stay
    whatever their ballot."""
    from kvstore.storage.replay import LogEntry, entry_record, replay
    from kvstore.storage.wal import KIND_PROMISE, Record
    durable = LogEntry(3, BALLOT, KIND_BATCH, b"\x90")
    log = [Record(KIND_PROMISE, 0, ballot=BALLOT), entry_record(0, durable),
           commit_point([(0, 0)])]  # an earlier, whole append
    torn = [entry_record(0, LogEntry(0, 2 * BALLOT, KIND_BATCH, b"\x90")),  # chosen
            entry_record(0, LogEntry(1, 2 * BALLOT, KIND_BATCH, b"\x90")),  # torn
            entry_record(0, LogEntry(2, BALLOT, KIND_BATCH, b"\x90")),  # kept
            entry_record(0, LogEntry(3, 2 * BALLOT, KIND_BATCH, b"\x91"))]  # torn, over slot 3
    shard, = replay([(p, p, r) for p, r in enumerate(log + torn)], 1)
    assert (shard.promised, shard.commit) == (BALLOT, 0)
    assert sorted(shard.entries) == [0, 2, 3]
    assert shard.entries[0].ballot == 2 * BALLOT and shard.entries[3] == durable
