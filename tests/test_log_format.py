"""One log format for the embedded store and a cluster node (issue 20), and what happens to a
directory of the format before it: refused in one line naming it, left as it was."""

from __future__ import annotations

import os
import shutil

import pytest

import kvstore
from kvstore.errors import StorageError
from kvstore.node.storage import WalReplicaStorage
from kvstore.storage.wal import WAL_DIR, WAL_FORMAT_VERSION

OLD = os.path.join(os.path.dirname(__file__), "data", "wal-format-1")  # README.md there


def old_directory(tmp_path, engine: str) -> tuple[str, str, bytes]:
    """A data directory whose log is format 1 (``engine``: embedded or node): ``(path,
    segment path, segment bytes)``."""
    path = str(tmp_path / engine)
    os.makedirs(os.path.join(path, WAL_DIR))
    segment = os.path.join(path, WAL_DIR, "0000000000000000.wal")
    shutil.copy(os.path.join(OLD, engine, "0000000000000000.wal"), segment)
    with open(segment, "rb") as f:
        return path, segment, f.read()


def check_refusal(error: StorageError, path: str) -> None:
    text = str(error)
    assert "\n" not in text
    assert f"the write-ahead log of {path} is in log format 1; this kvstore reads format " \
           f"{WAL_FORMAT_VERSION}" in text, text
    assert "close it cleanly" in text and "rejoin" in text, text  # what to do, either engine
    assert error.path == path


def test_an_embedded_store_in_the_old_log_format_is_refused_and_left_as_it_was(tmp_path):
    path, segment, before = old_directory(tmp_path, "embedded")
    with pytest.raises(StorageError) as refused:
        kvstore.open(path, shards=2)
    check_refusal(refused.value, path)
    with open(segment, "rb") as f:
        assert f.read() == before  # not cut as a torn tail, not zeroed, not removed


def test_a_node_directory_in_the_old_log_format_is_refused_and_left_as_it_was(tmp_path):
    path, segment, before = old_directory(tmp_path, "node")
    with pytest.raises(StorageError) as refused:
        WalReplicaStorage(path, 2)
    check_refusal(refused.value, path)
    with open(segment, "rb") as f:
        assert f.read() == before


def test_kvstore_server_refuses_an_old_log_format_in_one_line(tmp_path):
    from conftest import refused_start
    path, _segment, _before = old_directory(tmp_path, "node")
    err = refused_start(tmp_path, path, 2)
    assert f"the write-ahead log of {path} is in log format 1" in err, err


def test_the_way_out_for_an_embedded_store_keeps_every_write(tmp_path):
    """What the refusal tells an embedded store's user: close it cleanly (LMDB then holds
    every write), delete its wal/ directory, open it again: nothing is lost."""
    path = str(tmp_path / "db")
    db = kvstore.open(path, shards=2)
    for i in range(20):
        db.put(b"k%d" % i, b"v%d" % i)
    db.close()
    shutil.rmtree(os.path.join(path, WAL_DIR))
    with kvstore.open(path) as db:
        assert [db.get(b"k%d" % i) for i in range(20)] == [b"v%d" % i for i in range(20)]
        db.put(b"after", b"1")
    with kvstore.open(path) as db:
        assert db.get(b"after") == b"1"


def test_both_engines_write_one_entry_record(tmp_path):
    """An embedded store's entry and a node's are the same record: slot and ballot in the
    log record's header, shard and entry kind (a batch) in its prefix, the entry's payload
    (a node's is not a Paxos record with a second header and CRC), read back by one replay."""
    import msgpack

    from kvstore._native import encode_record
    from kvstore.commands import OP_PUT
    from kvstore.machine.replica import ShardWrite
    from kvstore.paxos.batch import decode_batch
    from kvstore.paxos.replica import KIND_BATCH
    from kvstore.storage.replay import replay
    from kvstore.storage.wal import WriteAheadLog

    db = kvstore.open(str(tmp_path / "db"))
    db.put(b"k", b"v")
    db._wal.close()  # a crash: the entry is in the log only
    db._storage.close()
    node = WalReplicaStorage(str(tmp_path / "node"), 1, checkpoint_seconds=3600)
    payload = msgpack.packb([b"a client-session command"])
    node.save([ShardWrite(0, promised=65536, records=[encode_record(0, 65536, KIND_BATCH,
                                                                    payload)])])
    node.close()
    logs = {}
    for engine in ("db", "node"):
        with WriteAheadLog.open(str(tmp_path / engine / WAL_DIR)) as log:
            logs[engine], = replay(log.replay_groups(), 1)
    assert (logs["db"].commit, list(logs["db"].entries)) == (1, [1])
    slot, ballot, kind, batch = logs["db"].entries[1]
    assert (ballot, kind) == (0, KIND_BATCH)
    assert [msgpack.unpackb(c) for c in decode_batch(batch)] == [[OP_PUT, b"k", b"v"]]
    assert (logs["node"].promised, list(logs["node"].entries)) == (65536, [0])
    assert logs["node"].entries[0] == (0, 65536, KIND_BATCH, payload)  # the payload, once
