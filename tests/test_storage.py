"""The storage layer as users meet it: directory lock, map growth, corrupt or unusable
directories, log compaction."""

from __future__ import annotations

import os
import subprocess
import threading
import time

import pytest

import kvstore
import kvstore.embedded.store
from conftest import PYTHON, child_env
from kvstore import StorageError


def test_second_process_gets_storage_error_naming_the_holder(tmp_path):
    path = str(tmp_path / "kv")
    child = subprocess.Popen(
        [PYTHON, "-c", "import sys, kvstore; db = kvstore.open(sys.argv[1]); db.put(b'k', b'v');"
         "print('open', flush=True); sys.stdin.read(); db.close(); print('closed', flush=True)",
         path],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env())
    try:
        assert child.stdout.readline() == b"open\n", child.stderr.read().decode()
        with pytest.raises(StorageError) as info:
            kvstore.open(path)
        assert str(child.pid) in str(info.value)
        assert path in str(info.value) and info.value.path == path
        child.stdin.close()  # the holder closes the store and exits
        assert child.stdout.readline() == b"closed\n"
        assert child.wait(30) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
        child.stderr.close()
    with kvstore.open(path) as db:
        assert db.get(b"k") == b"v"


def test_second_open_in_the_same_process_is_refused(store):
    db = store()
    with pytest.raises(StorageError, match="in use"):
        kvstore.open(db.path)
    db.put(b"k", b"v")  # the refused open did not disturb the holder
    assert db.get(b"k") == b"v"


def test_writes_far_past_the_requested_map_size_under_concurrent_readers(store, shards):
    db = store(shards=shards, map_size=1 << 20)
    initial = db.status()["map_size"]
    db.put(b"anchor", b"A" * 1000)
    stop = threading.Event()
    started = threading.Barrier(3)
    errors, reads = [], [0]

    def reader(scan):
        started.wait()
        try:
            while not stop.is_set():
                if scan:
                    rows = db.scan(b"anchor")
                    assert rows == [(b"anchor", b"A" * 1000)]
                else:
                    with db.transaction() as txn:  # a snapshot held across a few reads
                        assert txn.get(b"anchor") == b"A" * 1000
                        txn.get(b"big/000")
                    assert db.get(b"anchor") == b"A" * 1000
                reads[0] += 1
        except BaseException as e:
            errors.append(e)

    readers = [threading.Thread(target=reader, args=(s,)) for s in (True, False)]
    for t in readers:
        t.start()
    started.wait()
    value = bytes(range(256)) * 64  # 16 KiB
    try:
        for i in range(400):  # ~6.5 MiB, far past the 1 MiB map
            db.put(b"big/%03d" % i, value[i % 256:] + value[:i % 256])
    finally:
        stop.set()
        for t in readers:
            t.join(60)
    assert errors == []
    assert reads[0] > 0
    assert db.status()["map_size"] >= initial
    for i in range(400):
        assert db.get(b"big/%03d" % i) == value[i % 256:] + value[:i % 256]
    db = store.reopen(db)
    assert len(db.scan(b"big/")) == 400


def test_a_transaction_held_open_never_stalls_writes_past_the_map(store):
    """Issue 11 #10: growing the map waited for every open snapshot, the writer's own
    included: this put of 6.5 MiB into a 1 MiB map waited 60 s and failed."""
    db = store(map_size=1 << 20)
    db.put(b"anchor", b"A")
    value = b"v" * 65536
    with db.transaction() as txn:
        assert txn.get(b"anchor") == b"A"  # a snapshot is open in this very thread
        started = time.monotonic()
        for i in range(100):
            db.put(b"big/%03d" % i, value)
        txn.put(b"large", b"L" * (4 << 20))
    assert time.monotonic() - started < 30
    assert db.get(b"large") == b"L" * (4 << 20)
    assert db.get(b"big/099") == value


def test_map_grows_inside_one_big_transaction(store):
    db = store(map_size=1 << 20)
    value = b"x" * 100_000
    with db.transaction() as txn:
        for i in range(40):
            txn.put(b"t%02d" % i, value)
    assert all(db.get(b"t%02d" % i) == value for i in range(40))


def test_corrupt_data_file_is_storage_error_naming_the_path(tmp_path):
    path = str(tmp_path / "kv")
    kvstore.open(path).close()
    data = os.path.join(path, "data.mdb")
    with open(data, "r+b") as f:
        f.write(os.urandom(8192) * 4)
    with pytest.raises(StorageError) as info:
        kvstore.open(path)
    assert path in str(info.value) and info.value.path == path
    with pytest.raises(StorageError):  # again: the failed open released the lock
        kvstore.open(path)


def test_garbage_in_a_fresh_directory(tmp_path):
    path = tmp_path / "kv"
    path.mkdir()
    (path / "data.mdb").write_bytes(b"this is not an LMDB file" * 1000)
    with pytest.raises(StorageError) as info:
        kvstore.open(str(path))
    assert str(path) in str(info.value)


def test_path_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_bytes(b"hello")
    with pytest.raises(StorageError) as info:
        kvstore.open(str(f))
    assert str(f) in str(info.value)
    assert "not a directory" in str(info.value)
    with pytest.raises(StorageError) as info:
        kvstore.open(str(f / "sub"))
    assert str(f / "sub") in str(info.value)
    assert f.read_bytes() == b"hello"


def test_status_reports_disk_and_map(store):
    db = store()
    status = db.status()
    assert status["map_size"] > 0 and status["disk_bytes"] > 0
    assert status["path"] == db.path


def test_checkpoints_delete_old_log_segments_and_reopen(store, shards, monkeypatch):
    """The log is truncated below each checkpoint: it holds the last segments only, and
    the store reopens from LMDB's checkpoint plus what the log still holds."""
    monkeypatch.setattr(kvstore.embedded.store, "WAL_SEGMENT_BYTES", 4096)
    db = store(shards=shards)
    key = b"same"  # one key: every put lands in the same shard
    for i in range(200):
        db.put(key, b"%d" % i)
        if i % 50 == 49:
            assert db.checkpoint()
    log = db.status()["log"]
    segments = sorted(os.listdir(log["path"]))
    assert log["first_position"] > 0  # the first segments are gone
    assert len(segments) <= 3
    assert db.verify()["records"] >= 1
    db.put(key, b"not checkpointed")
    db = store.reopen(db)
    assert db.get(key) == b"not checkpointed"
    assert max(s["commit_index"] for s in db.status()["shards"]) == 201
    db.put(key, b"after")
    assert db.get(key) == b"after"


def test_an_io_error_on_a_full_filesystem_reads_as_disk_full(tmp_path, monkeypatch):
    """LMDB turns a short write (the disk filled mid-commit) into EIO."""
    import errno
    import os

    from kvstore.storage import environment

    short_write = OSError(errno.EIO, "mdb_txn_commit: Input/output error")
    statvfs = os.statvfs(tmp_path)

    class Full:
        f_bavail, f_frsize = 1, statvfs.f_frsize

    monkeypatch.setattr(environment.os, "statvfs", lambda path: Full)
    err = environment.translate(short_write, str(tmp_path), "writing")
    assert "disk full" in str(err) and err.path == str(tmp_path)
    monkeypatch.setattr(environment.os, "statvfs", lambda path: statvfs)
    err = environment.translate(short_write, str(tmp_path), "writing")
    assert "disk full" not in str(err) and "Input/output error" in str(err)


def test_a_store_dropped_without_close_releases_its_directory(tmp_path):
    """Nothing of a store outlives it: not the directory lock, not a helper thread."""
    import gc

    path = str(tmp_path / "kv")
    for i in range(3):
        db = kvstore.open(path)
        db.put(b"k", b"%d" % i)  # from the main thread: through a helper thread
        del db
        gc.collect()
    with kvstore.open(path) as db:
        assert db.get(b"k") == b"2"
    for helper in [t for t in threading.enumerate() if t.name == "kvstore-commit"]:
        helper.join(10)  # each ends once its store is gone (or closed)
        assert not helper.is_alive()


def test_a_limited_address_space_reserves_a_smaller_map(tmp_path):
    """With ulimit -v below the 1 TiB reservation, open reserves less instead of failing."""
    script = ("import resource, sys, kvstore\n"
              "resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))\n"
              "with kvstore.open(sys.argv[1]) as db:\n"
              "    db.put(b'k', b'v' * 1000)\n"
              "    print(db.get(b'k') == b'v' * 1000, db.status()['map_size'])\n")
    proc = subprocess.run([PYTHON, "-c", script, str(tmp_path / "kv")], capture_output=True,
                          env=child_env(), timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
    ok, map_size = proc.stdout.split()
    assert ok == b"True" and int(map_size) < 3 << 30
