"""The backup file format (version 1): framed, checksummed per frame and as a whole.

A backup is one file::

    file    = MAGIC  header-frame  rows-frame*  trailer-frame  (end of file)
    frame   = kind (1 byte) | length (4 bytes, big-endian) | payload | CRC32C (4 bytes)

The CRC32C of a frame covers its kind, length and payload: a flipped byte
anywhere in a frame fails that frame. ``MAGIC`` says what the file is before
anything is parsed; the frame kinds are

- ``HEADER`` (first): msgpack of ``{"format": 1, "shards": n, "source": {...},
  "cut": {"revisions": [per shard], ...}, "created": ISO 8601 UTC, "kvstore":
  version}``. ``revisions[s]`` is the highest revision shard ``s``'s state can
  hold at the cut: a restored store continues above it, so every revision a
  transaction compares keeps growing;
- ``ROWS``: ``shard`` (2 bytes) | ``table`` (1 byte: ``DATA`` or ``LEASES``) |
  ``count`` (4 bytes) | ``count`` x (key length (4) | key | value length (4) | value).
  A data row's value is the stored value (revision, the value's own CRC32C, the
  user's value: ``kvstore.machine.data``), checked again at restore; a lease row
  is a row of the shard's lease records (``kvstore.machine.leases``). Rows come
  in (shard, table, key) order, strictly increasing: the restore appends them;
- ``TRAILER`` (last): msgpack of ``{"rows": [[data rows, lease rows] per
  shard], "frames": rows frames, "bytes": bytes before the trailer, "crc32c":
  CRC32C of every byte before the trailer}``. A backup cut short has no
  trailer, and is refused.

Everything read is checked before it is used: lengths against ``FRAME_BYTES_MAX``
before a byte is allocated, every checksum, the order, the counts, the shard
count. The first problem raises ``CorruptRecord`` naming the file and the byte
offset. msgpack only for the two small maps, never pickle.

The writer (``BackupWriter``) writes ``FILE.tmp``, fsyncs it and renames it over
``FILE`` (then fsyncs the directory): a crash leaves the old ``FILE`` or the new
one, never a half-written one under that name.
"""

from __future__ import annotations

import datetime
import os
import struct
from dataclasses import dataclass, field
from typing import BinaryIO, Iterator

import msgpack

from kvstore import _native, msgmap
from kvstore.errors import CorruptRecord, InvalidArgument, StorageError
from kvstore.keys import MAX_KEY_SIZE
from kvstore.storage.staging import fsync_directory

MAGIC = b"KVBACKUP"
FORMAT_VERSION = 1

HEADER, ROWS, TRAILER = 1, 2, 3
KINDS = (HEADER, ROWS, TRAILER)
#: Tables of a shard a backup holds (``ROWS``' ``table`` byte).
DATA, LEASES = 0, 1
TABLES = (DATA, LEASES)

_FRAME_HEAD = struct.Struct(">BI")
_ROWS_HEAD = struct.Struct(">HBI")
_LEN = struct.Struct(">I")
_CRC = struct.Struct(">I")

#: The largest frame payload read or written (a row's value is at most MAX_VALUE_SIZE,
#: 4 MiB; a frame holds one row at least).
FRAME_BYTES_MAX = 16 * 1024 * 1024
#: A rows frame is cut once its payload passes this many bytes.
CHUNK_BYTES = 1024 * 1024
#: The header and the trailer are small maps.
MAP_BYTES_MAX = 1024 * 1024
MAX_SHARDS = 256


# -- frames: pure functions over bytes --------------------------------------------------------

def encode_frame(kind: int, payload: bytes) -> bytes:
    """One frame: kind, length, payload, CRC32C of the three."""
    if kind not in KINDS:
        raise ValueError(f"no frame kind {kind}")
    if len(payload) > FRAME_BYTES_MAX:
        raise ValueError(f"a frame payload of {len(payload)} bytes is over {FRAME_BYTES_MAX}")
    head = _FRAME_HEAD.pack(kind, len(payload))
    return head + payload + _CRC.pack(_native.crc32c(payload, _native.crc32c(head)))


def encode_rows(shard: int, table: int, rows: list) -> bytes:
    """A ``ROWS`` payload: ``rows`` are ``(key, value)`` bytes pairs."""
    parts = [_ROWS_HEAD.pack(shard, table, len(rows))]
    for key, value in rows:
        parts += (_LEN.pack(len(key)), key, _LEN.pack(len(value)), value)
    return b"".join(parts)


def decode_rows(payload: bytes) -> tuple[int, int, list]:
    """``(shard, table, [(key, value), ...])`` of a ``ROWS`` payload; ``ValueError`` if
    it is not one (a length past its end, bytes left over, an unknown table)."""
    if len(payload) < _ROWS_HEAD.size:
        raise ValueError("a rows frame shorter than its header")
    shard, table, count = _ROWS_HEAD.unpack_from(payload, 0)
    if table not in TABLES:
        raise ValueError(f"unknown table {table}")
    view = memoryview(payload)
    at, end = _ROWS_HEAD.size, len(payload)
    if count > (end - at) // 8:
        raise ValueError(f"{count} rows cannot fit in {end - at} bytes")
    rows = []
    for _ in range(count):
        parts = []
        for _part in range(2):
            if at + 4 > end:
                raise ValueError("a row's length runs past the frame")
            (n,) = _LEN.unpack_from(payload, at)
            at += 4
            if n > end - at:
                raise ValueError("a row runs past the frame")
            parts.append(bytes(view[at:at + n]))
            at += n
        rows.append((parts[0], parts[1]))
    if at != end:
        raise ValueError(f"{end - at} bytes after the last row")
    return shard, table, rows


def encode_map(value: dict) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def decode_map(payload: bytes) -> dict:
    """A header's or trailer's map; ``ValueError`` if it is none."""
    return msgmap.decode_map(payload, MAP_BYTES_MAX, "the header or trailer")


# -- rows ---------------------------------------------------------------------------------

def row_problem(shard: int, table: int, key: bytes, value: bytes, cut: int) -> str | None:
    """What is wrong with a row of ``shard``'s ``table`` in a backup whose cut holds
    revisions up to ``cut``, or None: a data row's key is a key, its value passes its
    own checksum and its revision is at most the cut's; a lease row's key is a lease
    row's (``kvstore.machine.leases.LEASE_ROW_RANGES``). Checked when a backup is
    written and when it is restored."""
    from kvstore.machine.leases import LEASE_ROW_RANGES
    if table == LEASES:
        if not any(lo <= key < hi for lo, hi in LEASE_ROW_RANGES):
            return f"a lease row of shard {shard} has a key that is no lease's"
        return None
    if not 0 < len(key) <= MAX_KEY_SIZE:
        return f"a key of {len(key)} bytes in shard {shard}"
    try:
        _native.unpack_value(key, value)  # its own checksum
    except CorruptRecord as e:
        return f"the value of {key[:40]!r} in shard {shard} fails its checksum ({e})"
    revision = _native.unpack_revision(value)
    if revision > cut:
        return (f"the value of {key[:40]!r} in shard {shard} has revision {revision}, past "
                f"the cut's {cut}")
    return None


# -- the header and the trailer ---------------------------------------------------------------

@dataclass
class Header:
    """What a backup holds and where it came from."""

    shards: int
    source: dict  # {"kind": "embedded" | "cluster", ...}
    revisions: list  # per shard: the highest revision its state can hold at the cut
    cut: dict = field(default_factory=dict)  # how the cut was made (points, fence)
    created: str = ""
    kvstore: str = ""
    format: int = FORMAT_VERSION

    def encode(self) -> bytes:
        return encode_map({"format": self.format, "shards": self.shards, "source": self.source,
                           "cut": {**self.cut, "revisions": list(self.revisions)},
                           "created": self.created, "kvstore": self.kvstore})

    @classmethod
    def decode(cls, payload: bytes) -> "Header":
        m = decode_map(payload)
        version = m.get("format")
        if version != FORMAT_VERSION:
            raise ValueError(f"backup format {version!r}; this kvstore reads format "
                             f"{FORMAT_VERSION}")
        shards, cut, source = m.get("shards"), m.get("cut"), m.get("source")
        if type(shards) is not int or not 1 <= shards <= MAX_SHARDS:
            raise ValueError(f"a shard count of {shards!r}")
        if type(cut) is not dict or type(source) is not dict:
            raise ValueError("no cut or no source")
        revisions = cut.get("revisions")
        if (type(revisions) is not list or len(revisions) != shards
                or not all(type(r) is int and 0 <= r < 1 << 63 for r in revisions)):
            raise ValueError(f"the cut's revisions {str(revisions)[:80]} do not match "
                             f"{shards} shard(s)")
        created, version_text = m.get("created", ""), m.get("kvstore", "")
        if type(created) is not str or type(version_text) is not str:
            raise ValueError("created and kvstore are text")
        return cls(shards, source, revisions, {k: v for k, v in cut.items() if k != "revisions"},
                   created, version_text)


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# -- writing --------------------------------------------------------------------------------

class BackupWriter:
    """Writes a backup to ``path + ".tmp"``; ``finish()`` fsyncs and renames it to ``path``.

    Rows are added in (shard, table, key) order (``add``), cut into frames of about
    ``CHUNK_BYTES``. Used as a context manager, an exception removes the temporary
    file and leaves ``path`` as it was.
    """

    def __init__(self, path: str | os.PathLike, header: Header,
                 chunk_bytes: int = CHUNK_BYTES) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self.tmp_path = self.path + ".tmp"
        self.header = header
        self.chunk_bytes = chunk_bytes
        self.counts = [[0, 0] for _ in range(header.shards)]
        self.frames = 0
        self.bytes = 0
        self._crc = 0
        self._chunk: list = []
        self._chunk_bytes = 0
        self._chunk_of: tuple | None = None
        self._last: tuple | None = None
        if os.path.isdir(self.path):
            raise InvalidArgument(f"{self.path} is a directory; give a file name for the backup")
        try:
            self._file: BinaryIO | None = open(self.tmp_path, "wb")
        except OSError as e:
            raise _storage_error(e, self.tmp_path, "creating the backup file") from e
        self._write(MAGIC)
        self._write(encode_frame(HEADER, header.encode()))

    def _write(self, data: bytes) -> None:
        try:
            self._file.write(data)
        except OSError as e:
            raise _storage_error(e, self.tmp_path, "writing the backup") from e
        self._crc = _native.crc32c(data, self._crc)
        self.bytes += len(data)

    def add(self, shard: int, table: int, rows: list, check: bool = False) -> None:
        """Append ``rows`` (``(key, value)``, keys ascending, after every row added
        before to this shard and table) of ``shard``'s ``table``. ``check``: each row
        passes ``row_problem`` first, or ``CorruptRecord`` (the source served a row
        no restore would take: a value corrupt on its disk)."""
        if not 0 <= shard < self.header.shards or table not in TABLES:
            raise ValueError(f"no table {table} of shard {shard}")
        if check:
            cut = self.header.revisions[shard]
            for key, value in rows:
                problem = row_problem(shard, table, key, value, cut)
                if problem is not None:
                    raise CorruptRecord(f"the backup's source {self.header.source} served a "
                                        f"row it should not hold: {problem}; nothing was "
                                        f"written to {self.path}"[:600])
        for key, value in rows:
            where = (shard, table, key)
            if self._last is not None and where <= self._last:
                raise ValueError("rows out of order")
            self._last = where
            if self._chunk_of != (shard, table) or self._chunk_bytes >= self.chunk_bytes:
                self._flush()
                self._chunk_of = (shard, table)
            self._chunk.append((key, value))
            self._chunk_bytes += len(key) + len(value) + 8
            self.counts[shard][table] += 1

    def _flush(self) -> None:
        if self._chunk:
            shard, table = self._chunk_of
            self._write(encode_frame(ROWS, encode_rows(shard, table, self._chunk)))
            self.frames += 1
        self._chunk, self._chunk_bytes = [], 0

    def finish(self) -> dict:
        """Write the trailer, fsync, rename over ``path``; the trailer's map."""
        self._flush()
        trailer = {"rows": self.counts, "frames": self.frames, "bytes": self.bytes,
                   "crc32c": self._crc}
        self._write(encode_frame(TRAILER, encode_map(trailer)))
        f, self._file = self._file, None
        try:
            f.flush()
            os.fsync(f.fileno())
            f.close()
            os.rename(self.tmp_path, self.path)
            fsync_directory(os.path.dirname(self.path) or ".")
        except OSError as e:
            f.close()
            self.abort()
            raise _storage_error(e, self.path, "finishing the backup") from e
        return trailer

    def abort(self) -> None:
        """Remove the temporary file (nothing of this backup stays)."""
        f, self._file = self._file, None
        if f is not None:
            f.close()
        try:
            os.unlink(self.tmp_path)
        except FileNotFoundError:
            pass

    def __enter__(self) -> "BackupWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or self._file is not None:
            self.abort()


def _storage_error(e: OSError, path: str, doing: str) -> StorageError:
    from kvstore.storage.environment import translate
    return translate(e, path, doing)


# -- reading --------------------------------------------------------------------------------

class BackupReader:
    """Reads a backup, checking everything (module docstring) as it goes.

    ``header`` is read at construction; ``chunks()`` yields ``(shard, table, rows)``
    and, once the trailer was read and every total matched, returns. Any problem
    raises ``CorruptRecord`` naming the file and the offset; a caller that acts on
    the rows as they come (a restore) must undo what it did when that happens.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.path.abspath(os.fspath(path))
        try:
            self._file: BinaryIO = open(self.path, "rb")
        except FileNotFoundError:
            raise InvalidArgument(f"no backup file at {self.path}") from None
        except IsADirectoryError:
            raise InvalidArgument(f"{self.path} is a directory, not a backup file") from None
        except OSError as e:
            raise _storage_error(e, self.path, "opening the backup") from e
        self.offset = 0
        self._crc = 0
        try:
            magic = self._read(len(MAGIC), "the file's magic")
            if magic != MAGIC:
                self.refuse(0, "it is not a kvstore backup (no KVBACKUP magic)")
            kind, payload, at = self._frame()
            if kind != HEADER:
                self.refuse(at, f"the first frame is of kind {kind}, not the header")
            try:
                self.header = Header.decode(payload)
            except ValueError as e:
                self.refuse(at, f"its header is invalid: {e}")
        except BaseException:
            self._file.close()
            raise

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "BackupReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def refuse(self, offset: int, what: str):
        """Raise the ``CorruptRecord`` that refuses this backup: ``what`` is wrong at
        byte ``offset``."""
        raise CorruptRecord(f"the backup {self.path} is corrupt or incomplete at byte "
                            f"{offset}: {what}; nothing was restored from it",
                            offset=offset, path=self.path)

    def _read(self, n: int, what: str) -> bytes:
        try:
            data = self._file.read(n)
        except OSError as e:
            raise _storage_error(e, self.path, "reading the backup") from e
        if len(data) != n:
            self.refuse(self.offset + len(data),
                          f"the file ends inside {what} (truncated: a backup cut short)")
        self.offset += n
        self._crc = _native.crc32c(data, self._crc)
        return data

    def _frame(self) -> tuple[int, bytes, int]:
        """The next frame's ``(kind, payload, offset)``, its checksum verified."""
        at = self.offset
        head = self._read(_FRAME_HEAD.size, "a frame header")
        kind, length = _FRAME_HEAD.unpack(head)
        if kind not in KINDS:
            self.refuse(at, f"unknown frame kind {kind}")
        if length > FRAME_BYTES_MAX:
            self.refuse(at, f"a frame claims {length} bytes (at most {FRAME_BYTES_MAX})")
        payload = self._read(length, "a frame")
        (crc,) = _CRC.unpack(self._read(_CRC.size, "a frame's checksum"))
        if crc != _native.crc32c(payload, _native.crc32c(head)):
            self.refuse(at, "a frame's checksum does not match its bytes")
        return kind, payload, at

    def chunks(self) -> Iterator[tuple[int, int, list]]:
        """``(shard, table, rows)`` in file order; checked, then the trailer (module
        docstring)."""
        shards = self.header.shards
        counts = [[0, 0] for _ in range(shards)]
        frames = 0
        last: tuple | None = None
        while True:
            crc_before = self._crc
            bytes_before = self.offset
            kind, payload, at = self._frame()
            if kind == TRAILER:
                break
            if kind != ROWS:
                self.refuse(at, f"a frame of kind {kind} among the rows")
            try:
                shard, table, rows = decode_rows(payload)
            except ValueError as e:
                self.refuse(at, f"a rows frame is malformed: {e}")
            if shard >= shards:
                self.refuse(at, f"rows of shard {shard}, but the header says {shards} "
                                  f"shard(s)")
            for key, _value in rows:
                where = (shard, table, key)
                if last is not None and where <= last:
                    self.refuse(at, "rows out of order")
                last = where
                if not 0 < len(key) <= MAX_KEY_SIZE + 64:
                    self.refuse(at, f"a key of {len(key)} bytes")
            frames += 1
            counts[shard][table] += len(rows)
            yield shard, table, rows
        try:
            trailer = decode_map(payload)
        except ValueError as e:
            self.refuse(at, f"its trailer is invalid: {e}")
        expected = {"rows": counts, "frames": frames, "bytes": bytes_before, "crc32c": crc_before}
        for name, value in expected.items():
            if trailer.get(name) != value:
                self.refuse(at, f"its trailer says {name} {str(trailer.get(name))[:80]}, "
                                  f"the file holds {str(value)[:80]}")
        if self._file.read(1):
            self.refuse(self.offset, "bytes after the trailer")


def read_all(path: str | os.PathLike) -> tuple[Header, list]:
    """Every row of a backup, checked: ``(header, [(shard, table, rows), ...])``. For
    small backups and tests; a restore streams ``BackupReader.chunks`` instead."""
    with BackupReader(path) as reader:
        return reader.header, list(reader.chunks())


__all__ = ["MAGIC", "FORMAT_VERSION", "DATA", "LEASES", "Header", "BackupWriter", "BackupReader",
           "read_all", "encode_frame", "encode_rows", "decode_rows", "now_iso"]
