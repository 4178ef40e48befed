"""Pure-Python reference of the log-record kernel (twin of ``_ext/logcodec.pyx``).

A record is a 28-byte little-endian header followed by the payload::

    offset size field
    0      1    format version (FORMAT_VERSION)
    1      1    kind (what the payload is; the codec does not interpret it)
    2      2    reserved, must be 0
    4      4    payload length in bytes
    8      8    slot
    16     8    ballot (an int: round << 16 | node index, see kvstore.paxos.ballot)
    24     4    CRC32C (Castagnoli) of bytes 0..23 followed by the payload

A batch is records laid end to end. Decoding validates everything and raises
``CorruptRecord`` naming the offset (and the slot once the header is trusted);
it never returns data that did not pass the checksum.

The log itself is an LMDB database of ``slot_key(slot) -> record``;
``append_log`` writes a batch of them in one cursor pass.

A stored value (the data table's ``key -> value``, DESIGN.md "Storage") is a
12-byte header followed by the user's value::

    offset size field
    0      8    revision (big-endian, so a raw value sorts and reads as before)
    8      4    CRC32C (little-endian) of the key, bytes 0..7 and the value

``pack_value`` writes one; ``unpack_value`` returns the value only after its
checksum matched (a flipped byte in a value, an overflow page, or a value
under the wrong key raises ``CorruptRecord``).
"""

from __future__ import annotations

import struct
from typing import Iterable, Sequence

from kvstore.errors import CorruptRecord

FORMAT_VERSION = 1
RECORD_HEADER_SIZE = 28
MAX_PAYLOAD_SIZE = 1 << 30

VALUE_HEADER_SIZE = 12
#: The largest stored value: a header and kvstore.MAX_VALUE_SIZE bytes.
MAX_STORED_VALUE_SIZE = 12 + 4 * 1024 * 1024
#: LMDB's largest key (its default build).
_MAX_KEY = 511

_HEADER = struct.Struct("<BBHIQQ")  # the 24 bytes the CRC covers before the payload
_CRC = struct.Struct("<I")
_SLOT_KEY = struct.Struct(">Q")
_VALUE_HEADER = struct.Struct(">Q")
_VALUE_CRC = struct.Struct("<I")
_U64_MAX = (1 << 64) - 1


def _make_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _make_table()


def crc32c(data: bytes, value: int = 0) -> int:
    """CRC32C of ``data``; pass a previous result as ``value`` to continue it."""
    crc = (value & 0xFFFFFFFF) ^ 0xFFFFFFFF
    table = _CRC_TABLE
    for b in bytes(data):
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def slot_key(slot: int) -> bytes:
    """The 8-byte big-endian LMDB key of a slot, so byte order is slot order."""
    return _SLOT_KEY.pack(slot)


def key_slot(key: bytes) -> int:
    """Inverse of ``slot_key``."""
    return _SLOT_KEY.unpack(key)[0]


def _check_fields(slot: int, ballot: int, kind: int, payload: bytes) -> None:
    if not (0 <= slot <= _U64_MAX):
        raise ValueError(f"slot out of range: {slot}")
    if not (0 <= ballot <= _U64_MAX):
        raise ValueError(f"ballot out of range: {ballot}")
    if not (0 <= kind <= 255):
        raise ValueError(f"kind out of range: {kind}")
    if len(payload) > MAX_PAYLOAD_SIZE:
        raise ValueError(f"payload of {len(payload)} bytes is over {MAX_PAYLOAD_SIZE}")


def encode_record(slot: int, ballot: int, kind: int, payload: bytes) -> bytes:
    """One record: header then payload."""
    payload = bytes(payload)
    _check_fields(slot, ballot, kind, payload)
    header = _HEADER.pack(FORMAT_VERSION, kind, 0, len(payload), slot, ballot)
    return header + _CRC.pack(crc32c(payload, crc32c(header))) + payload


def record_fields(record) -> tuple[int, int, int, memoryview]:
    """``(slot, ballot, kind, payload)`` of a record this process encoded, the payload a
    view into it: the header is read, the checksum not verified (``decode_record``
    verifies it, for a record that comes from a disk or a peer)."""
    _version, kind, _reserved, length, slot, ballot = _HEADER.unpack_from(record)
    return slot, ballot, kind, memoryview(record)[RECORD_HEADER_SIZE:RECORD_HEADER_SIZE + length]


def encode_batch(records: Iterable[tuple[int, int, int, bytes]]) -> bytes:
    """Records ``(slot, ballot, kind, payload)`` laid end to end."""
    return b"".join(encode_record(s, b, k, p) for s, b, k, p in records)


def _decode_at(data: bytes, offset: int) -> tuple[tuple[int, int, int, bytes], int]:
    end = len(data)
    if end - offset < RECORD_HEADER_SIZE:
        raise CorruptRecord(
            f"truncated record header at offset {offset}: {end - offset} of "
            f"{RECORD_HEADER_SIZE} bytes", offset=offset)
    version, kind, reserved, length, slot, ballot = _HEADER.unpack_from(data, offset)
    if version != FORMAT_VERSION:
        raise CorruptRecord(f"unknown record format version {version} at offset {offset}",
                            offset=offset)
    if reserved != 0:
        raise CorruptRecord(f"corrupt record header at offset {offset} (reserved bits set)",
                            offset=offset)
    body = offset + RECORD_HEADER_SIZE
    if length > end - body:
        raise CorruptRecord(
            f"truncated record at offset {offset}: payload of {length} bytes, "
            f"{end - body} present", offset=offset)
    (stored,) = _CRC.unpack_from(data, offset + 24)
    payload = bytes(data[body:body + length])
    actual = crc32c(payload, crc32c(bytes(data[offset:offset + 24])))
    if actual != stored:
        raise CorruptRecord(
            f"checksum mismatch in record at offset {offset} (header says slot {slot}): "
            f"stored {stored:#010x}, computed {actual:#010x}", offset=offset)
    return (slot, ballot, kind, payload), body + length


def decode_record(data: bytes, expected_slot: int | None = None) -> tuple[int, int, int, bytes]:
    """Decode exactly one record filling ``data``; ``(slot, ballot, kind, payload)``.

    ``expected_slot`` (the LMDB key it was read under) must match the header.
    ``data`` may be a buffer into a memory map: its length is checked against
    the header before any byte past the header is read.
    """
    view = memoryview(data)
    if len(view) >= RECORD_HEADER_SIZE:
        (length,) = _CRC.unpack_from(view, 4)
        if length != len(view) - RECORD_HEADER_SIZE:
            raise CorruptRecord(
                f"record length mismatch: header says {length} payload bytes, "
                f"{len(view) - RECORD_HEADER_SIZE} stored", offset=0)
    data = bytes(view)
    record, end = _decode_at(data, 0)
    if end != len(data):
        raise CorruptRecord(
            f"{len(data) - end} trailing bytes after record for slot {record[0]}",
            slot=record[0], offset=end)
    if expected_slot is not None and record[0] != expected_slot:
        raise CorruptRecord(
            f"record stored under slot {expected_slot} says slot {record[0]}",
            slot=expected_slot, offset=0)
    return record


def decode_batch(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """Decode records laid end to end; all of ``data`` must be whole records."""
    data = bytes(data)
    out = []
    offset = 0
    while offset < len(data):
        record, offset = _decode_at(data, offset)
        out.append(record)
    return out


def append_log(txn, db, entries: Sequence[tuple[int, bytes]]) -> int:
    """Write ``(slot, encoded_record)`` pairs, slots ascending, into the log ``db``.

    One cursor pass: LMDB append mode when every slot is past the last key in
    the log (the common case), plain overwriting puts otherwise (a slot
    re-accepted at a higher ballot). Returns the number of records written.
    """
    if not entries:
        return 0
    cursor = txn.cursor(db)
    try:
        append = (not cursor.last()) or slot_key(entries[0][0]) > bytes(cursor.key())
        prev = -1
        items = []
        for slot, record in entries:
            if slot <= prev:
                raise ValueError(f"append_log needs ascending slots: {slot} after {prev}")
            prev = slot
            items.append((slot_key(slot), record))
        _consumed, added = cursor.putmulti(items, append=append)
        return len(items)
    finally:
        cursor.close()


def _corrupt_value(key: bytes, why: str) -> CorruptRecord:
    shown = key[:64] + (b"..." if len(key) > 64 else b"")
    return CorruptRecord(f"the stored value of key {shown!r} is corrupt ({why})")


def pack_value(key: bytes, revision: int, value: bytes) -> bytes:
    """The data-table value of ``value`` written at ``revision`` under ``key``."""
    if not (0 <= revision <= _U64_MAX):
        raise ValueError(f"revision out of range: {revision}")
    head = _VALUE_HEADER.pack(revision)
    value = bytes(value)
    crc = crc32c(value, crc32c(head, crc32c(bytes(key))))
    return head + _VALUE_CRC.pack(crc) + value


def _checked_value(key: bytes, raw) -> bytes:
    """``raw`` is bytes, or a buffer into the map whose length is checked before reading."""
    n = len(raw)
    if n < VALUE_HEADER_SIZE:
        raise _corrupt_value(key, f"{n} bytes, shorter than its {VALUE_HEADER_SIZE}-byte header")
    if n > MAX_STORED_VALUE_SIZE:
        raise _corrupt_value(key, f"{n} bytes, longer than any value can be")
    raw = bytes(raw)
    (stored,) = _VALUE_CRC.unpack_from(raw, 8)
    value = raw[VALUE_HEADER_SIZE:]
    actual = crc32c(value, crc32c(raw[:8], crc32c(key)))
    if actual != stored:
        raise _corrupt_value(key, f"checksum stored {stored:#010x}, computed {actual:#010x}")
    return value


def _key_bytes(key) -> bytes:
    """A key as bytes; from a buffer only once its length is a key's."""
    if type(key) is bytes:
        return key
    if len(key) > _MAX_KEY:
        raise CorruptRecord(f"a stored key of {len(key)} bytes, longer than any key can be")
    return bytes(key)


def unpack_value(key: bytes, raw) -> bytes | None:
    """The user's value in ``raw`` (None for None), its checksum verified.

    ``raw`` may be bytes or a buffer into the map (a transaction's ``buffers=True``).
    """
    if raw is None:
        return None
    return _checked_value(_key_bytes(key), raw)


def unpack_revision(raw) -> int:
    """The revision of a stored value (0 for None); the checksum is not verified."""
    if raw is None:
        return 0
    if len(raw) < VALUE_HEADER_SIZE:
        raise CorruptRecord(f"a stored value of {len(raw)} bytes is shorter than its "
                            f"{VALUE_HEADER_SIZE}-byte header")
    return _VALUE_HEADER.unpack_from(raw)[0]


def unpack_rows(rows: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """``[(key, value)]`` of ``[(key, raw)]`` rows, every checksum verified."""
    out = []
    for key, raw in rows:
        key = _key_bytes(key)
        out.append((key, _checked_value(key, raw)))
    return out


def collect_values(rows, hi: bytes | None, limit: int | None) -> list[tuple[bytes, bytes]]:
    """``[(key, value)]`` of ``(key, raw)`` rows while ``key < hi`` (None: no bound), at
    most ``limit`` (None: all), every checksum verified: the loop of a scan."""
    out: list[tuple[bytes, bytes]] = []
    if limit == 0:
        return out
    for key, raw in rows:
        key = _key_bytes(key)
        if hi is not None and key >= hi:
            break
        out.append((key, _checked_value(key, raw)))
        if limit is not None and len(out) >= limit:
            break
    return out
