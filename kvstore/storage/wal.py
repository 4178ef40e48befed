"""The write-ahead log: append-only, preallocated segment files of checksummed records.

DESIGN.md "Storage": the log is the durability point. One group commit is one
``pwrite`` of all its records and one ``fdatasync`` (both release the GIL);
a segment file is preallocated (``posix_fallocate``) when it is created, so
an append writes inside the file and never grows it.

Layout: a directory of segment files ``<start>.wal``, ``start`` the log
position (16 hex digits) of the segment's first byte. A position is a byte
address in one logical stream: segment ``k + 1`` starts exactly where the
records of segment ``k`` end, so positions only grow and a missing or cut
segment is seen. Each segment begins with a ``KIND_SEGMENT`` record; past
its last record a segment holds zeros (preallocated, never written).

A record is a ``kvstore._native`` log record (28-byte header, CRC32C over
header and payload) whose payload starts with a 20-byte prefix::

    offset size field
    0      8    position of this record (so a record read at the wrong place fails)
    8      8    group: position of the first record of its append
    16     2    shard
    18     1    tag (for KIND_ENTRY, the entry's own kind; else 0)
    19     1    reserved, 0

followed by the caller's payload. The record kinds serve an embedded store
and a cluster node alike: ``KIND_ENTRY`` (a shard's log entry: the header's
slot and ballot, the prefix's tag its entry kind, the payload the entry's
payload; the one checksum is the log record's), ``KIND_PROMISE`` (a shard's
promised ballot, its hard state), ``KIND_COMMIT_POINT`` (chosen slots: the
header's ``(shard, slot)``, more pairs in the payload), ``KIND_CHECKPOINT``
(the state is durable up to the position in ``slot``). ``kvstore.storage.replay``
reads them back, for both.

Format versions (the segment header's): 1 wrapped a cluster node's whole
Paxos record (its own header and CRC) in an entry's payload; 2 (this one)
carries the entry's fields in the log record itself. Read 1, write 2: the
records of a format-1 segment are read translated into format 2
(``kvstore.storage.legacy``, the upgrade path), and appends never go to such
a segment but to a new one, in format 2. A segment of any other version (a
newer release's) is refused (``StorageError`` naming the directory, in one
line), never read, and nothing is changed.

Recovery (``WriteAheadLog.open``) reads every segment. A record that does not
validate at offset X of the LAST segment is a torn tail, cut at X, when no
valid record of a LATER append lies after it (a record whose group starts
after X): an append is issued only once the previous one's ``fdatasync``
returned, so such a record proves X was durable, and X is then reported as
``CorruptRecord`` naming the file and offset, never applied. Anything but
zeros after the records of an earlier segment is ``CorruptRecord`` too
(a segment is only left once all of it is durable). The bytes of a cut tail
are zeroed and synced before the log accepts an append, so a stale record
can never reappear behind a newer one. What recovery cannot tell apart:
bit rot inside the last durable append, with nothing after it, looks like a
torn write and is cut (as in etcd and LevelDB).

After a failed ``pwrite`` or ``fdatasync`` the log zeroes and syncs what the
append wrote (so the failed write changes nothing, even at a reopen), then
refuses appends (what the kernel kept of the page cache is unknown, see
"fsyncgate"); reopen it. A full disk while creating a segment leaves the log
usable (the next segment is made smaller, down to what the append needs,
before a full disk refuses it). Every OS error goes through
``kvstore.storage.environment.translate``: a ``StorageError`` naming
the path.

The file system is a port (``OsFiles``); tests and the simulator of real
nodes inject a twin that loses what was not synced at a power loss and tears
writes (``kvstore.sim.disk.FaultyFiles``).
"""

from __future__ import annotations

import errno
import os
import struct
import threading
import time
from typing import Iterator, NamedTuple, Sequence

from kvstore import _native
from kvstore._native import RECORD_HEADER_SIZE
from kvstore.errors import CorruptRecord, InvalidArgument, StorageError
from kvstore.ops.histogram import FSYNC_BUCKETS, Histogram
from kvstore.storage import legacy
from kvstore.storage.environment import translate

KIND_SEGMENT = 0
KIND_ENTRY = 1
KIND_PROMISE = 2
KIND_COMMIT_POINT = 3
KIND_CHECKPOINT = 4
KINDS = (KIND_ENTRY, KIND_PROMISE, KIND_COMMIT_POINT, KIND_CHECKPOINT)

#: The log's directory inside a data directory (an embedded store's and a node's alike).
WAL_DIR = "wal"
SEGMENT_SUFFIX = ".wal"
DEFAULT_SEGMENT_BYTES = 64 * 1024 * 1024
WAL_FORMAT_VERSION = 2
_MAGIC = b"kvstore-wal\0"
_PREFIX = struct.Struct("<QQHBx")
PREFIX_SIZE = _PREFIX.size
RECORD_OVERHEAD = RECORD_HEADER_SIZE + PREFIX_SIZE
_U32 = struct.Struct("<I")
_SEGMENT_PAYLOAD = _MAGIC + struct.pack("<I", WAL_FORMAT_VERSION)
#: The segment format versions this release reads (it writes WAL_FORMAT_VERSION only).
READABLE_VERSIONS = (legacy.FORMAT, WAL_FORMAT_VERSION)
SEGMENT_HEADER_SIZE = RECORD_OVERHEAD + len(_SEGMENT_PAYLOAD)
_VERSION_BYTE = bytes([_native.FORMAT_VERSION])


class Record(NamedTuple):
    """One log record. ``tag`` is the entry's own kind for ``KIND_ENTRY``, else 0."""
    kind: int
    shard: int = 0
    slot: int = 0
    ballot: int = 0
    payload: bytes = b""
    tag: int = 0


class OsFiles:
    """The real file system: each call is one system call (those that wait release the GIL)."""

    def listdir(self, path: str) -> list[str]:
        return os.listdir(path)

    def makedirs(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)

    def create(self, path: str, size: int) -> int:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            os.posix_fallocate(fd, 0, size)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        return fd

    def open(self, path: str) -> int:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)

    def read_all(self, fd: int) -> bytes:
        size = os.fstat(fd).st_size
        parts = []
        offset = 0
        while offset < size:
            chunk = os.pread(fd, min(size - offset, 16 << 20), offset)
            if not chunk:
                break
            parts.append(chunk)
            offset += len(chunk)
        return b"".join(parts)

    def pwrite(self, fd: int, data: bytes, offset: int) -> None:
        n = os.pwrite(fd, data, offset)
        if n == len(data):  # the usual case: one call wrote it all
            return
        view = memoryview(data)[n:]
        offset += n
        while view:
            n = os.pwrite(fd, view, offset)
            view = view[n:]
            offset += n

    def fdatasync(self, fd: int) -> None:
        os.fdatasync(fd)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def close(self, fd: int) -> None:
        os.close(fd)

    def unlink(self, path: str) -> None:
        os.unlink(path)

    def fsync_dir(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class _Segment:
    __slots__ = ("start", "path", "end", "size", "version")

    def __init__(self, start: int, path: str, end: int, size: int,
                 version: int = WAL_FORMAT_VERSION) -> None:
        self.start = start  # position of byte 0 of the file
        self.path = path
        self.end = end  # position just past the segment's last record
        self.size = size  # bytes in the file
        self.version = version  # its format (READABLE_VERSIONS)


def segment_name(start: int) -> str:
    return f"{start:016x}{SEGMENT_SUFFIX}"


def _encode(position: int, group: int, record: Record) -> bytes:
    payload = _PREFIX.pack(position, group, record.shard, record.tag) + record.payload
    return _native.encode_record(record.slot, record.ballot, record.kind, payload)


def _read_at(data: bytes, offset: int, start: int):
    """``(record, end, group)`` of the valid record at ``offset``, or None."""
    if len(data) - offset < RECORD_OVERHEAD:
        return None
    (length,) = _U32.unpack_from(data, offset + 4)
    end = offset + RECORD_HEADER_SIZE + length
    if length < PREFIX_SIZE or end > len(data):
        return None
    try:
        slot, ballot, kind, payload = _native.decode_record(memoryview(data)[offset:end])
    except CorruptRecord:
        return None
    position, group, shard, tag = _PREFIX.unpack_from(payload)
    if position != start + offset or group > position:
        return None
    return Record(kind, shard, slot, ballot, payload[PREFIX_SIZE:], tag), end, group


def _segment_version(first, path: str) -> int | None:
    """The format version of a segment whose first record read is ``first`` (``_read_at``),
    or None when that is no segment header (a torn creation). A version this release does
    not read is refused, in one line naming the directory."""
    if first is None or first[0].kind != KIND_SEGMENT:
        return None
    payload = first[0].payload
    if len(payload) != len(_SEGMENT_PAYLOAD) or not payload.startswith(_MAGIC):
        return None
    (version,) = _U32.unpack_from(payload, len(_MAGIC))
    if version not in READABLE_VERSIONS:
        directory = os.path.dirname(os.path.dirname(path))
        raise StorageError(
            f"the write-ahead log of {directory} is in log format {version} ({path}); this "
            f"kvstore reads formats {' and '.join(map(str, READABLE_VERSIONS))}: open it with "
            f"the newer kvstore release that wrote it", directory)
    return version


def _upgraded(records: list, version: int, path: str) -> list:
    """``records`` (``_scan``'s) of a segment of format ``version``, in this format."""
    if version == WAL_FORMAT_VERSION:
        return records
    upgraded = []
    for position, record, group in records:
        if record.kind == KIND_ENTRY:
            ballot, kind, payload = legacy.upgrade_entry(record.slot, record.tag,
                                                         record.payload, path, position)
            record = record._replace(ballot=ballot, tag=kind, payload=payload)
        upgraded.append((position, record, group))
    return upgraded


def _later_append_after(data: bytes, offset: int, start: int) -> int | None:
    """Offset of a valid record after ``offset`` written by a later append, or None."""
    y = offset + 1
    while True:
        y = data.find(_VERSION_BYTE, y)
        if y < 0 or len(data) - y < RECORD_OVERHEAD:
            return None
        found = _read_at(data, y, start)
        if found is not None and found[2] > start + offset:
            return y
        y += 1


def _scan(data: bytes, start: int, path: str, last: bool):
    """``(records, end_offset, junk_end, version)`` of one segment's bytes.

    ``records`` is ``[(position, Record, group)]`` without the segment record,
    as the segment's format ``version`` wrote them; ``end_offset`` None means
    the segment's own header is torn (last only; ``version`` is then None).
    """
    first = _read_at(data, 0, start)
    records: list[tuple[int, Record]] = []
    version = _segment_version(first, path)
    if version is None:
        offset = 0
    else:
        offset = first[1]
        while True:
            found = _read_at(data, offset, start)
            if found is None:
                break
            records.append((start + offset, found[0], found[2]))
            offset = found[1]
    junk_end = len(data.rstrip(b"\0"))
    if junk_end <= offset:
        return records, (offset if offset > 0 else None), offset, version
    later = _later_append_after(data, offset, start) if last else None
    if not last or later is not None:
        why = (f"a record written by a later append follows at offset {later}"
               if later is not None else "it is not the last segment")
        raise CorruptRecord(
            f"corrupt log record in {path} at offset {offset} (log position "
            f"{start + offset}); not a torn tail: {why}. Nothing from it on is applied",
            offset=offset, path=path)
    return records, (offset if offset > 0 else None), junk_end, version


class WriteAheadLog:
    """An open log directory. ``append`` is thread-safe (appends are serialized)."""

    def __init__(self, path: str, files, segment_bytes: int) -> None:
        self.path = path
        self._files = files
        self._segment_bytes = segment_bytes
        self._segments: list[_Segment] = []
        self._fd: int | None = None  # the last segment's, open for appending
        self._lock = threading.Lock()
        self._failed: StorageError | None = None
        self._closed = False
        self._base = 0  # where the first segment starts when there is none
        self.appends = 0  # groups appended (one fdatasync each), for tests and benchmarks
        self.appended_bytes = 0  # bytes appended since open (the node's metrics)
        self.sync_latency = Histogram(FSYNC_BUCKETS)  # seconds per append's fdatasync

    @classmethod
    def open(cls, path: str, files=None, segment_bytes: int = DEFAULT_SEGMENT_BYTES
             ) -> "WriteAheadLog":
        """Open (or create) the log in directory ``path``, recovering its tail."""
        if segment_bytes < SEGMENT_HEADER_SIZE + RECORD_OVERHEAD:
            raise InvalidArgument(f"segment_bytes of {segment_bytes} is too small")
        log = cls(os.fspath(path), files or OsFiles(), segment_bytes)
        log._recover()
        return log

    def _os(self, doing: str, path: str, fn, *args):
        try:
            return fn(*args)
        except OSError as e:
            raise translate(e, path, doing) from e

    def _recover(self) -> None:
        f = self._files
        self._os("creating the log directory", self.path, f.makedirs, self.path)
        names = self._os("listing the log", self.path, f.listdir, self.path)
        starts = []
        for name in names:
            if not name.endswith(SEGMENT_SUFFIX):
                continue
            try:
                starts.append(int(name[:-len(SEGMENT_SUFFIX)], 16))
            except ValueError:
                continue
        starts.sort()
        previous_end: int | None = None
        for i, start in enumerate(starts):
            seg_path = os.path.join(self.path, segment_name(start))
            last = i == len(starts) - 1
            fd = self._os("opening a log segment", seg_path, f.open, seg_path)
            try:
                data = self._os("reading a log segment", seg_path, f.read_all, fd)
                _records, end_offset, junk_end, version = _scan(data, start, seg_path, last)
                if previous_end is not None and start != previous_end and end_offset is not None:
                    raise CorruptRecord(
                        f"log segment {seg_path} starts at position {start} but the one "
                        f"before it ends at {previous_end}: a segment is missing or cut",
                        offset=0, path=seg_path)
                if end_offset is None and not last:
                    raise CorruptRecord(f"log segment {seg_path} has no valid header but is "
                                        f"not the last segment", offset=0, path=seg_path)
                if end_offset is None:  # a torn segment creation: nothing in it was acknowledged
                    self._os("closing a log segment", seg_path, f.close, fd)
                    fd = None
                    self._os("removing a torn log segment", seg_path, f.unlink, seg_path)
                    self._os("syncing the log directory", self.path, f.fsync_dir, self.path)
                    continue
                if last:
                    if junk_end > end_offset:  # a torn tail: zero it before any append
                        self._os("cutting the log's torn tail", seg_path, f.pwrite, fd,
                                 bytes(junk_end - end_offset), end_offset)
                    # What survived may be in the page cache only (a killed process).
                    self._os("syncing the log", seg_path, f.fdatasync, fd)
                    if version == WAL_FORMAT_VERSION:  # else the next append starts one
                        self._fd, fd = fd, None
                self._segments.append(_Segment(start, seg_path, start + end_offset, len(data),
                                               version))
                previous_end = start + end_offset
            finally:
                if fd is not None:
                    self._os("closing a log segment", seg_path, f.close, fd)

    # -- reading ---------------------------------------------------------------

    @property
    def end(self) -> int:
        """The position just past the last record (where the next append goes)."""
        return self._segments[-1].end if self._segments else self._base

    @property
    def first_position(self) -> int:
        """The position of the first segment kept (records before it were truncated)."""
        return self._segments[0].start if self._segments else self._base

    def replay(self, start: int = 0) -> Iterator[tuple[int, Record]]:
        """``(position, record)`` of every record at or after ``start``, in order."""
        for position, _group, record in self.replay_groups(start):
            yield position, record

    def replay_groups(self, start: int = 0) -> Iterator[tuple[int, int, Record]]:
        """``(position, group, record)`` of every record at or after ``start``, in
        order; ``group`` is the position of the first record of its append, so a
        reader can tell the records of one append (one durable group) apart."""
        f = self._files
        for segment in list(self._segments):
            end = segment.end  # before reading: an append may be under way past it
            if end <= start:
                continue
            fd = self._os("opening a log segment", segment.path, f.open, segment.path)
            try:
                data = self._os("reading a log segment", segment.path, f.read_all, fd)
            finally:
                self._os("closing a log segment", segment.path, f.close, fd)
            records, _end, _junk, version = _scan(data[:end - segment.start], segment.start,
                                                  segment.path, last=False)
            for position, record, group in _upgraded(records, version, segment.path):
                if position >= start:
                    yield position, group, record

    # -- writing ---------------------------------------------------------------

    def append(self, records: Sequence[Record], sync: bool = True) -> int:
        """Write ``records`` durably: one ``pwrite``, one ``fdatasync``.

        ``sync=False`` skips the ``fdatasync``: only for a bug the simulator plants
        (``kvstore.node.ports.NodeBugs.skip_promise_fsync``).

        Returns the position just past the last of them. Raises ``StorageError``
        (the log then refuses appends until reopened, unless the disk was full
        while creating a segment, which leaves it usable).
        """
        if not records:
            raise InvalidArgument("append needs at least one record")
        total = 0
        for r in records:
            if r.kind not in KINDS:
                raise InvalidArgument(f"unknown record kind {r.kind}")
            total += RECORD_OVERHEAD + len(r.payload)
        with self._lock:
            if self._closed:
                raise InvalidArgument("the log is closed")
            if self._failed is not None:
                raise StorageError(f"the log in {self.path} failed earlier ({self._failed}); "
                                   f"reopen it", self.path)
            segment = self._segments[-1] if self._segments else None
            if self._fd is None or segment is None or \
                    segment.end - segment.start + total > segment.size:
                segment = self._roll(total)
            position = group = segment.end
            parts = []
            for record in records:
                encoded = _encode(position, group, record)
                parts.append(encoded)
                position += len(encoded)
            data = parts[0] if len(parts) == 1 else b"".join(parts)
            offset = segment.end - segment.start
            try:
                self._files.pwrite(self._fd, data, offset)
                if sync:
                    started = time.perf_counter()
                    self._files.fdatasync(self._fd)
                    self.sync_latency.observe(time.perf_counter() - started)
            except OSError as e:
                self._failed = translate(e, segment.path, "appending to the log")
                self._erase(data, offset)
                raise self._failed from e
            segment.end = position
            self.appends += 1
            self.appended_bytes += total
            return position

    def size_bytes(self) -> int:
        """Bytes of records the log holds now, over its live segments (any thread)."""
        with self._lock:
            return sum(seg.end - seg.start for seg in self._segments)

    def _erase(self, data: bytes, offset: int) -> None:
        """Zero (and sync) what a failed append may have left in the page cache, best
        effort: a failed write must change nothing, and a reopen reads the page cache.

        After a failed ``fdatasync`` the kernel may have dropped the dirty pages
        or kept them; a synced overwrite with zeros is durable either way. If
        that fails too the disk is gone, and the record may reappear at reopen.
        """
        try:
            self._files.pwrite(self._fd, bytes(len(data)), offset)
            self._files.fdatasync(self._fd)
        except OSError:
            pass

    def _roll(self, needed: int) -> _Segment:
        """Create the next segment (preallocated, header written, synced) and switch to it."""
        f = self._files
        start = self.end
        least = SEGMENT_HEADER_SIZE + needed
        size = max(self._segment_bytes, least)
        path = os.path.join(self.path, segment_name(start))
        while True:
            try:
                fd = f.create(path, size)
                break
            except OSError as e:
                # A nearly full disk gets smaller segments rather than a refused write.
                if e.errno not in (errno.ENOSPC, errno.EDQUOT) or size <= least:
                    raise translate(e, path, "creating a log segment") from e
                size = max(least, size // 4)
        try:
            header = _encode(start, start, Record(KIND_SEGMENT, payload=_SEGMENT_PAYLOAD))
            f.pwrite(fd, header, 0)
            f.fsync(fd)
            f.fsync_dir(self.path)
        except OSError as e:
            self._failed = translate(e, path, "creating a log segment")
            try:
                f.close(fd)
            except OSError:
                pass
            raise self._failed from e
        if self._fd is not None:
            old, self._fd = self._fd, None
            self._os("closing a log segment", self._segments[-1].path, f.close, old)
        self._fd = fd
        segment = _Segment(start, path, start + SEGMENT_HEADER_SIZE, size)
        self._segments.append(segment)
        return segment

    def truncate_before(self, position: int) -> int:
        """Delete the segments whose records all lie below ``position``; how many went."""
        with self._lock:
            doomed = []
            while len(self._segments) > 1 and self._segments[1].start <= position:
                doomed.append(self._segments.pop(0))
            for segment in doomed:
                try:
                    self._files.unlink(segment.path)
                except FileNotFoundError:
                    pass
                except OSError as e:
                    raise translate(e, segment.path, "deleting a log segment") from e
            if doomed:
                self._os("syncing the log directory", self.path, self._files.fsync_dir,
                         self.path)
            return len(doomed)

    def restart_at(self, position: int) -> None:
        """Continue the log at ``position``, past its end: every segment kept (all of
        it below ``position``) is deleted, and the next append starts a segment there.

        For a log whose records are all covered elsewhere (its owner's state was
        checkpointed up to ``position`` at a clean close) but which lost its tail
        or its files since: positions never go back.
        """
        with self._lock:
            if position < self.end:
                raise InvalidArgument(f"the log ends at {self.end}, past {position}")
            if self._fd is not None:
                fd, self._fd = self._fd, None
                self._os("closing a log segment", self.path, self._files.close, fd)
            doomed, self._segments = self._segments, []
            for segment in doomed:
                self._os("deleting a log segment", segment.path, self._files.unlink,
                         segment.path)
            if doomed:
                self._os("syncing the log directory", self.path, self._files.fsync_dir,
                         self.path)
            self._base = position

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._fd is not None:
                fd, self._fd = self._fd, None
                self._os("closing the log", self.path, self._files.close, fd)

    def __enter__(self) -> "WriteAheadLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = [
    "WriteAheadLog", "Record", "OsFiles", "segment_name", "WAL_DIR", "WAL_FORMAT_VERSION",
    "READABLE_VERSIONS",
    "KIND_ENTRY", "KIND_PROMISE", "KIND_COMMIT_POINT", "KIND_CHECKPOINT", "KINDS",
    "RECORD_OVERHEAD", "SEGMENT_HEADER_SIZE", "DEFAULT_SEGMENT_BYTES",
]
