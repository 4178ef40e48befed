"""The write-ahead log (kvstore/storage/wal.py): real files, and a twin file system that
loses what was not synced at a power loss and tears the last write at any byte."""

from __future__ import annotations

import errno
import os
import random

import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from kvstore.errors import CorruptRecord, StorageError
from kvstore.storage import wal
from kvstore.storage.wal import (KIND_CHECKPOINT, KIND_COMMIT_POINT, KIND_ENTRY, KIND_PROMISE,
                                 RECORD_OVERHEAD, SEGMENT_HEADER_SIZE, OsFiles, Record,
                                 WriteAheadLog)

# the twin file system lives in the package: the simulator runs real nodes on it
from kvstore.sim.disk import SECTOR, FaultyFiles, PowerLoss  # noqa: E402,F401


DIR = "/log"


def rec(i: int, size: int = 20) -> Record:
    return Record(KIND_ENTRY, shard=i % 3, slot=i, ballot=(i << 16) | 1,
                  payload=bytes([i % 251]) * size, tag=1)


def replayed(log) -> list[Record]:
    return [r for _p, r in log.replay()]


# -- real files -------------------------------------------------------------------------------

def test_append_replay_reopen_real_files(tmp_path):
    path = str(tmp_path / "wal")
    records = [Record(KIND_PROMISE, shard=2, ballot=5, payload=b"hard state"),
               rec(1), rec(2, 0),
               Record(KIND_COMMIT_POINT, shard=1, slot=2),
               Record(KIND_CHECKPOINT, slot=12345)]
    with WriteAheadLog.open(path, segment_bytes=4096) as log:
        end1 = log.append(records[:3])
        end2 = log.append(records[3:])
        assert SEGMENT_HEADER_SIZE < end1 < end2 == log.end
    with WriteAheadLog.open(path, segment_bytes=4096) as log:
        got = list(log.replay())
        assert [r for _p, r in got] == records
        assert got[0][0] == SEGMENT_HEADER_SIZE
        assert [p for p, _r in got] == sorted(p for p, _r in got)
        assert [r for _p, r in log.replay(end1)] == records[3:]
        log.append([rec(9)])
    with WriteAheadLog.open(path, segment_bytes=4096) as log:
        assert replayed(log) == records + [rec(9)]


def test_segments_are_preallocated_and_an_append_does_not_grow_them(tmp_path):
    path = str(tmp_path / "wal")
    with WriteAheadLog.open(path, segment_bytes=64 * 1024) as log:
        log.append([rec(0)])
        (name,) = os.listdir(path)
        before = os.stat(os.path.join(path, name))
        assert before.st_size == 64 * 1024
        assert before.st_blocks * 512 >= 64 * 1024  # allocated, not sparse
        for i in range(1, 50):
            log.append([rec(i, 100)])
        after = os.stat(os.path.join(path, name))
        assert (after.st_size, after.st_blocks) == (before.st_size, before.st_blocks)


class CountingFiles(OsFiles):
    def __init__(self):
        self.calls: dict[str, int] = {}

    def __getattribute__(self, name):
        attr = object.__getattribute__(self, name)
        if callable(attr) and not name.startswith("_"):
            calls = object.__getattribute__(self, "calls")

            def counted(*args):
                calls[name] = calls.get(name, 0) + 1
                return attr(*args)
            return counted
        return attr


def test_an_append_is_one_write_and_one_fdatasync(tmp_path):
    files = CountingFiles()
    log = WriteAheadLog.open(str(tmp_path / "wal"), files=files, segment_bytes=1 << 20)
    log.append([rec(0)])  # creates the segment
    files.calls.clear()
    for i in range(10):
        log.append([rec(i * 8 + j) for j in range(8)])
    assert files.calls == {"pwrite": 10, "fdatasync": 10}
    log.close()


def test_segments_roll_and_truncate_before_deletes_only_whole_segments(tmp_path):
    path = str(tmp_path / "wal")
    log = WriteAheadLog.open(path, segment_bytes=600)
    ends = [log.append([rec(i, 100)]) for i in range(20)]
    segments = sorted(os.listdir(path))
    assert len(segments) > 3
    checkpoint = ends[9]
    assert log.truncate_before(checkpoint) > 0
    assert log.first_position <= checkpoint
    kept = [p for p, _r in log.replay()]
    assert kept[0] >= log.first_position
    assert [r for p, r in log.replay(checkpoint)] == [rec(i, 100) for i in range(10, 20)]
    left = len(os.listdir(path))
    assert log.truncate_before(log.end + 1000) == left - 1  # never the one being appended to
    assert len(os.listdir(path)) == 1
    log.append([rec(99)])
    log.close()
    with WriteAheadLog.open(path, segment_bytes=600) as log:
        assert replayed(log)[-1] == rec(99)


def test_a_group_larger_than_a_segment_gets_a_segment_of_its_own(tmp_path):
    path = str(tmp_path / "wal")
    with WriteAheadLog.open(path, segment_bytes=600) as log:
        big = [rec(i, 1000) for i in range(3)]
        log.append(big)
    with WriteAheadLog.open(path, segment_bytes=600) as log:
        assert replayed(log) == big


# -- torn tails and corruption ------------------------------------------------------------

def fresh(files, segment_bytes=4096):
    return WriteAheadLog.open(DIR, files=files, segment_bytes=segment_bytes)


def test_a_torn_last_write_is_cut_at_every_byte():
    synced = [rec(0), rec(1)]
    inflight = [rec(2, 30), rec(3, 5), rec(4, 0)]
    bounds = [0]
    for r in inflight:
        bounds.append(bounds[-1] + RECORD_OVERHEAD + len(r.payload))
    for keep in range(bounds[-1] + 1):
        for mode in ("prefix", "junk"):
            files = FaultyFiles(seed=keep)
            log = fresh(files)
            log.append(synced)
            files.crash_at_sync = True
            with pytest.raises(PowerLoss):
                log.append(inflight)
            assert files.unsynced_write_size() == bounds[-1]
            f, offset, data = files.last_write
            files.power_loss(keep, mode)
            # Bytes the tear lost may equal what was there (zeros) or the junk: count what matches.
            same = 0
            while same < len(data) and f.data[offset + same] == data[same]:
                same += 1
            assert same >= keep
            whole = sum(1 for b in bounds[1:] if b <= same)
            with fresh(files) as again:
                assert replayed(again) == synced + inflight[:whole], (keep, mode)
                again.append([rec(7)])
            files.power_loss()
            with fresh(files) as again:
                assert replayed(again) == synced + inflight[:whole] + [rec(7)], (keep, mode)


def test_a_stale_record_of_a_torn_write_never_comes_back():
    # Sectors persisted out of order: a later record of the torn write survives, an earlier
    # one does not. Recovery cuts at the hole and zeroes the rest, so a shorter append and
    # a new append that ends exactly where a stale record starts cannot revive it.
    files = FaultyFiles(seed=3)
    log = fresh(files, segment_bytes=8192)
    log.append([rec(0)])
    files.crash_at_sync = True
    with pytest.raises(PowerLoss):
        log.append([rec(1, 600), rec(2, 600), rec(3, 600)])
    f, offset, data = files.last_write
    files.power_loss(0, "prefix")
    survived = bytearray(data)
    survived[0:SECTOR] = bytes(SECTOR)  # the first sector is lost, the rest made it
    f.data[offset:offset + len(data)] = survived
    with fresh(files, 8192) as again:
        assert replayed(again) == [rec(0)]
        again.append([rec(5, 600)])  # as long as rec(1, 600): rec(2, 600) would follow it
    with fresh(files, 8192) as again:
        assert replayed(again) == [rec(0), rec(5, 600)]


def flip(files, path, offset):
    f = files.files[path]
    f.data[offset] ^= 0x40
    f.durable = bytes(f.data)


def test_corruption_before_a_later_append_is_reported_with_file_and_offset():
    files = FaultyFiles()
    with fresh(files) as log:
        log.append([rec(0)])
        log.append([rec(1)])  # starts at this offset
        log.append([rec(2)])
    seg = DIR + "/" + wal.segment_name(0)
    second = SEGMENT_HEADER_SIZE + RECORD_OVERHEAD + 20
    flip(files, seg, second + 40)
    with pytest.raises(CorruptRecord) as info:
        fresh(files)
    assert info.value.path == seg and info.value.offset == second
    assert seg in str(info.value) and str(second) in str(info.value)


def test_corruption_in_an_earlier_segment_is_reported_never_cut():
    files = FaultyFiles()
    with fresh(files, segment_bytes=600) as log:
        for i in range(8):
            log.append([rec(i, 200)])
    first = DIR + "/" + wal.segment_name(0)
    flip(files, first, len(files.files[first].data.rstrip(b"\0")) - 3)  # its last record
    with pytest.raises(CorruptRecord) as info:
        fresh(files, 600)
    assert info.value.path == first


def test_a_missing_segment_is_reported():
    files = FaultyFiles()
    with fresh(files, segment_bytes=600) as log:
        for i in range(8):
            log.append([rec(i, 200)])
    names = sorted(files.files)
    del files.files[names[1]]
    with pytest.raises(CorruptRecord, match="missing or cut"):
        fresh(files, 600)


def test_bit_rot_in_the_last_append_is_cut_as_a_torn_tail():
    # Documented limit (as in etcd and LevelDB): nothing after it proves it was durable.
    files = FaultyFiles()
    with fresh(files) as log:
        log.append([rec(0)])
        log.append([rec(1), rec(2)])
    seg = DIR + "/" + wal.segment_name(0)
    flip(files, seg, len(files.files[seg].data.rstrip(b"\0")) - 3)
    with fresh(files) as log:
        assert replayed(log) == [rec(0), rec(1)]


def test_a_torn_segment_creation_is_removed():
    files = FaultyFiles()
    log = fresh(files, segment_bytes=600)
    log.append([rec(0, 300)])
    files.crash_at_sync = True
    with pytest.raises(PowerLoss):
        log.append([rec(1, 300)])  # needs a new segment; its header never got synced
    files.power_loss(5, "prefix")
    with fresh(files, 600) as again:
        assert replayed(again) == [rec(0, 300)]
        again.append([rec(2, 300)])
    with fresh(files, 600) as again:
        assert replayed(again) == [rec(0, 300), rec(2, 300)]


# -- errors ----------------------------------------------------------------------------------

def test_disk_full_creating_a_segment_is_a_storage_error_and_the_log_stays_usable():
    files = FaultyFiles()
    log = fresh(files, segment_bytes=600)
    log.append([rec(0, 300)])
    files.disk_full = True
    with pytest.raises(StorageError, match="disk full") as info:
        log.append([rec(1, 300)])
    assert info.value.path == DIR + "/" + wal.segment_name(log.end)
    files.disk_full = False
    log.append([rec(2, 300)])
    log.close()
    with fresh(files, 600) as again:
        assert replayed(again) == [rec(0, 300), rec(2, 300)]


def test_a_failed_fdatasync_poisons_the_log_until_reopened():
    files = FaultyFiles()
    log = fresh(files)
    log.append([rec(0)])
    files.fail["fdatasync"] = OSError(errno.EIO, "Input/output error")
    with pytest.raises(StorageError) as info:
        log.append([rec(1)])
    assert info.value.path == DIR + "/" + wal.segment_name(0)
    with pytest.raises(StorageError, match="reopen"):
        log.append([rec(2)])
    files.power_loss()
    with fresh(files) as again:
        assert replayed(again) == [rec(0)]


def test_real_disk_full_from_fallocate_is_a_storage_error(tmp_path, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "posix_fallocate", full)
    path = str(tmp_path / "wal")
    log = WriteAheadLog.open(path)
    with pytest.raises(StorageError, match="disk full"):
        log.append([rec(0)])
    assert os.listdir(path) == []
    monkeypatch.undo()
    assert log.append([rec(0)]) > 0
    log.close()


# -- random appends, power losses, tears and reopens against a model ----------------------

records_st = st.lists(st.builds(
    Record, kind=st.sampled_from(wal.KINDS), shard=st.integers(0, 65535),
    slot=st.integers(0, 2**64 - 1), ballot=st.integers(0, 2**64 - 1),
    payload=st.binary(max_size=400), tag=st.integers(0, 255)), min_size=1, max_size=4)


class LogMachine(RuleBasedStateMachine):
    @initialize(segment_bytes=st.sampled_from([300, 700, 4096]), seed=st.integers(0, 2**32))
    def start(self, segment_bytes, seed):
        self.files = FaultyFiles(seed)
        self.segment_bytes = segment_bytes
        self.log = fresh(self.files, segment_bytes)
        self.model: list[tuple[int, Record]] = []

    def reopen(self):
        self.log = fresh(self.files, self.segment_bytes)

    @rule(records=records_st)
    def append(self, records):
        end = self.log.append(records)
        position = end - sum(RECORD_OVERHEAD + len(r.payload) for r in records)
        for r in records:
            self.model.append((position, r))
            position += RECORD_OVERHEAD + len(r.payload)
        assert position == end

    @rule(records=records_st, fraction=st.floats(0, 1),
          mode=st.sampled_from(["prefix", "junk", "sectors"]))
    def power_loss_during_append(self, records, fraction, mode):
        self.files.crash_at_sync = True
        try:
            self.log.append(records)
        except PowerLoss:
            pass
        self.files.power_loss(int(fraction * self.files.unsynced_write_size()), mode)
        self.reopen()
        got = list(self.log.replay())
        kept = [(p, r) for p, r in self.model if p >= self.log.first_position]
        assert got[:len(kept)] == kept  # every acknowledged record, in order
        extra = got[len(kept):]
        assert [r for _p, r in extra] == records[:len(extra)]  # a prefix of the torn append
        self.model.extend(extra)

    @rule()
    def power_loss_idle(self):
        self.files.power_loss()
        self.reopen()

    @rule()
    def close_and_reopen(self):
        self.log.close()
        self.reopen()

    @rule(fraction=st.floats(0, 1))
    def checkpoint_and_truncate(self, fraction):
        if not self.model:
            return
        position = self.model[int(fraction * (len(self.model) - 1))][0]
        self.log.append([Record(KIND_CHECKPOINT, slot=position)])
        self.log.truncate_before(position)
        assert self.log.first_position <= position
        self.model = [(p, r) for p, r in self.model if p >= self.log.first_position]
        self.model.append((self.log.end - RECORD_OVERHEAD, Record(KIND_CHECKPOINT, slot=position)))

    @invariant()
    def replay_matches_the_model(self):
        if not hasattr(self, "log"):
            return
        got = list(self.log.replay())
        assert got == [(p, r) for p, r in self.model if p >= self.log.first_position]


LogMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestLogMachine = LogMachine.TestCase


# -- a real process killed mid-append ------------------------------------------------------

_WRITER = r"""
import sys
from kvstore.storage.wal import KIND_ENTRY, Record, WriteAheadLog
log = WriteAheadLog.open(sys.argv[1], segment_bytes=8192)
i = 0
while True:
    log.append([Record(KIND_ENTRY, slot=i + j, payload=b"%d" % (i + j) * 20) for j in range(3)])
    i += 3
    print(i, flush=True)  # every record below i is acknowledged (synced)
"""


def test_sigkill_mid_append_keeps_every_acknowledged_record(tmp_path):
    import signal
    import subprocess
    import sys
    path = str(tmp_path / "wal")
    child = subprocess.Popen([sys.executable, "-c", _WRITER, path], stdout=subprocess.PIPE,
                             text=True)
    acknowledged = 0
    try:
        for line in child.stdout:
            acknowledged = int(line)
            if acknowledged >= 600:  # a few segments' worth
                break
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
    with WriteAheadLog.open(path, segment_bytes=8192) as log:
        slots = [r.slot for r in replayed(log)]
        assert slots == list(range(len(slots)))  # in order, no gap, nothing torn applied
        assert len(slots) >= acknowledged
        for _p, r in log.replay():
            assert r.payload == b"%d" % r.slot * 20
        log.append([Record(KIND_ENTRY, slot=len(slots))])


def test_the_segment_format_is_pinned(tmp_path):
    # The directory format is shared by an embedded store and a cluster node: a change to
    # these bytes is a format change (bump WAL_FORMAT_VERSION and say how old logs are read).
    # Format 2 (issue 20): the segment header's version; entries carry their fields in the
    # log record's header and prefix (format 1 wrapped a node's Paxos record whole).
    path = str(tmp_path / "wal")
    with WriteAheadLog.open(path, segment_bytes=4096) as log:
        end = log.append([Record(KIND_PROMISE, shard=3, ballot=(7 << 16) | 2, payload=b"hs"),
                          Record(KIND_ENTRY, shard=3, slot=9, ballot=(7 << 16) | 2,
                                 payload=b"cmd", tag=1)])
    with open(os.path.join(path, wal.segment_name(0)), "rb") as f:
        data = f.read()
    assert len(data) == 4096 and end == 165 and data[end:] == bytes(4096 - end)
    assert data[:end].hex() == (
        "010000002400000000000000000000000000000000000000d2b9d72a000000000000000000000000"
        "00000000000000006b7673746f72652d77616c00020000000102000016000000000000000000000002"
        "0007000000000059f0c1d740000000000000004000000000000000030000006873010100001700000009"
        "00000000000000020007000000000087b5f1aa7200000000000000400000000000000003000100636d64")
