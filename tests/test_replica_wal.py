"""A node's storage on the write-ahead log (``kvstore.replica_wal``): what a save makes
durable, what a crash between checkpoints keeps, what a checkpoint moves to LMDB."""

from __future__ import annotations

import os

import msgpack
import pytest

from kvstore._native import encode_record
from kvstore.codec import OP_PUT
from kvstore.paxos.replica import KIND_BATCH, Entry, Snapshot
from kvstore.replica_storage import ShardWrite, encode_client_command
from kvstore.replica_wal import WAL_DIR, WalReplicaStorage

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
