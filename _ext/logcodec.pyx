# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled twin of kvstore/_native/logcodec_py.py: log records, CRC32C, log append and
checksummed stored values.

The record and value formats are documented in the twin. Decoding validates the header,
the length and the checksum before it returns anything, and raises
``CorruptRecord`` naming the offset (and the slot the header claims).
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from cpython.bytes cimport (PyBytes_AS_STRING, PyBytes_GET_SIZE, PyBytes_CheckExact,
                            PyBytes_FromStringAndSize)

from kvstore.errors import CorruptRecord

cdef extern from "crc32c.h":
    void kv_crc32c_init()
    uint32_t kv_crc32c(uint32_t value, const unsigned char *p, size_t n) nogil
    int kv_crc32c_set_hw(int allow)

kv_crc32c_init()

FORMAT_VERSION = 1
RECORD_HEADER_SIZE = 28
MAX_PAYLOAD_SIZE = 1 << 30

VALUE_HEADER_SIZE = 12
#: The largest stored value: a header and kvstore.MAX_VALUE_SIZE bytes.
MAX_STORED_VALUE_SIZE = 12 + 4 * 1024 * 1024

DEF HEADER = 28
DEF VALUE_HEADER = 12
DEF MAX_STORED_VALUE = 12 + 4 * 1024 * 1024
DEF CRC_AT = 24
DEF VERSION = 1
DEF U64_MAX = 0xFFFFFFFFFFFFFFFF


cdef inline void put_u16(uint8_t *p, uint16_t v) noexcept nogil:
    p[0] = v & 0xFF
    p[1] = v >> 8


cdef inline void put_u32(uint8_t *p, uint32_t v) noexcept nogil:
    p[0] = v & 0xFF
    p[1] = (v >> 8) & 0xFF
    p[2] = (v >> 16) & 0xFF
    p[3] = v >> 24


cdef inline void put_u64(uint8_t *p, uint64_t v) noexcept nogil:
    cdef int i
    for i in range(8):
        p[i] = (v >> (8 * i)) & 0xFF


cdef inline uint32_t get_u32(const uint8_t *p) noexcept nogil:
    return (<uint32_t>p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16) |
            (<uint32_t>p[3] << 24))


cdef inline uint64_t get_u64(const uint8_t *p) noexcept nogil:
    cdef uint64_t v = 0
    cdef int i
    for i in range(7, -1, -1):
        v = (v << 8) | p[i]
    return v


cdef inline bytes as_bytes(object data):
    if PyBytes_CheckExact(data):
        return <bytes>data
    return bytes(data)


def crc32c(data, value=0):
    """CRC32C of ``data``; pass a previous result as ``value`` to continue it."""
    cdef bytes b = as_bytes(data)
    cdef uint32_t v = <uint32_t>(int(value) & 0xFFFFFFFF)
    return kv_crc32c(v, <const unsigned char *>PyBytes_AS_STRING(b), PyBytes_GET_SIZE(b))


def _use_hardware_crc(allow):
    """Tests only: allow (True) or forbid (False) the SSE4.2 path; returns the old mode."""
    return bool(kv_crc32c_set_hw(1 if allow else 0))


cdef inline void check_fields(object slot, object ballot, object kind, Py_ssize_t length) except *:
    if not (0 <= slot <= U64_MAX):
        raise ValueError(f"slot out of range: {slot}")
    if not (0 <= ballot <= U64_MAX):
        raise ValueError(f"ballot out of range: {ballot}")
    if not (0 <= kind <= 255):
        raise ValueError(f"kind out of range: {kind}")
    if length > MAX_PAYLOAD_SIZE:
        raise ValueError(f"payload of {length} bytes is over {MAX_PAYLOAD_SIZE}")


cdef inline void write_record(uint8_t *out, uint64_t slot, uint64_t ballot, int kind,
                              const uint8_t *payload, Py_ssize_t n) noexcept nogil:
    cdef uint32_t crc
    out[0] = VERSION
    out[1] = <uint8_t>kind
    put_u16(out + 2, 0)
    put_u32(out + 4, <uint32_t>n)
    put_u64(out + 8, slot)
    put_u64(out + 16, ballot)
    memcpy(out + HEADER, payload, n)
    crc = kv_crc32c(0, out, CRC_AT)
    crc = kv_crc32c(crc, payload, n)
    put_u32(out + CRC_AT, crc)


def encode_record(slot, ballot, kind, payload):
    """One record: header then payload."""
    cdef bytes p = as_bytes(payload)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(p)
    check_fields(slot, ballot, kind, n)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, HEADER + n)
    write_record(<uint8_t *>PyBytes_AS_STRING(out), <uint64_t>slot, <uint64_t>ballot,
                 <int>kind, <const uint8_t *>PyBytes_AS_STRING(p), n)
    return out


def encode_batch(records):
    """Records ``(slot, ballot, kind, payload)`` laid end to end, in one allocation."""
    cdef list items = []
    cdef Py_ssize_t total = 0, n
    cdef bytes p
    for slot, ballot, kind, payload in records:
        p = as_bytes(payload)
        n = PyBytes_GET_SIZE(p)
        check_fields(slot, ballot, kind, n)
        items.append((slot, ballot, kind, p))
        total += HEADER + n
    cdef bytes out = PyBytes_FromStringAndSize(NULL, total)
    cdef uint8_t *w = <uint8_t *>PyBytes_AS_STRING(out)
    for slot, ballot, kind, p in items:
        n = PyBytes_GET_SIZE(p)
        write_record(w, <uint64_t>slot, <uint64_t>ballot, <int>kind,
                     <const uint8_t *>PyBytes_AS_STRING(p), n)
        w += HEADER + n
    return out


cdef tuple decode_at(const uint8_t *base, Py_ssize_t end, Py_ssize_t offset,
                     Py_ssize_t *next_offset):
    cdef const uint8_t *h = base + offset
    cdef Py_ssize_t body = offset + HEADER
    cdef uint32_t length, stored, actual
    cdef uint64_t slot, ballot
    if end - offset < HEADER:
        raise CorruptRecord(
            f"truncated record header at offset {offset}: {end - offset} of "
            f"{HEADER} bytes", offset=offset)
    if h[0] != VERSION:
        raise CorruptRecord(f"unknown record format version {h[0]} at offset {offset}",
                            offset=offset)
    if h[2] != 0 or h[3] != 0:
        raise CorruptRecord(f"corrupt record header at offset {offset} (reserved bits set)",
                            offset=offset)
    length = get_u32(h + 4)
    slot = get_u64(h + 8)
    ballot = get_u64(h + 16)
    if length > end - body:
        raise CorruptRecord(
            f"truncated record at offset {offset}: payload of {length} bytes, "
            f"{end - body} present", offset=offset)
    stored = get_u32(h + CRC_AT)
    actual = kv_crc32c(kv_crc32c(0, h, CRC_AT), h + HEADER, length)
    if actual != stored:
        raise CorruptRecord(
            f"checksum mismatch in record at offset {offset} (header says slot {slot}): "
            f"stored {stored:#010x}, computed {actual:#010x}", offset=offset)
    next_offset[0] = body + length
    return (slot, ballot, <int>h[1],
            PyBytes_FromStringAndSize(<const char *>(h + HEADER), length))


def decode_record(data, expected_slot=None):
    """Decode exactly one record filling ``data``; ``(slot, ballot, kind, payload)``.

    ``expected_slot`` (the LMDB key it was read under) must match the header.
    ``data`` may be a buffer into a memory map: its length is checked against
    the header before any byte past the header is read.
    """
    cdef Py_buffer view
    cdef Py_ssize_t end, nxt = 0
    cdef const uint8_t *base
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        end = view.len
        base = <const uint8_t *>view.buf
        if end >= HEADER and get_u32(base + 4) != <uint64_t>(end - HEADER):
            raise CorruptRecord(
                f"record length mismatch: header says {get_u32(base + 4)} payload bytes, "
                f"{end - HEADER} stored", offset=0)
        record = decode_at(base, end, 0, &nxt)
    finally:
        PyBuffer_Release(&view)
    if nxt != end:
        raise CorruptRecord(
            f"{end - nxt} trailing bytes after record for slot {record[0]}",
            slot=record[0], offset=nxt)
    if expected_slot is not None and record[0] != expected_slot:
        raise CorruptRecord(
            f"record stored under slot {expected_slot} says slot {record[0]}",
            slot=expected_slot, offset=0)
    return record


def decode_batch(data):
    """Decode records laid end to end; all of ``data`` must be whole records."""
    cdef bytes b = as_bytes(data)
    cdef Py_ssize_t end = PyBytes_GET_SIZE(b), offset = 0
    cdef const uint8_t *base = <const uint8_t *>PyBytes_AS_STRING(b)
    cdef list out = []
    while offset < end:
        out.append(decode_at(base, end, offset, &offset))
    return out


cdef inline bytes slot_key_c(uint64_t slot):
    cdef bytes out = PyBytes_FromStringAndSize(NULL, 8)
    cdef uint8_t *p = <uint8_t *>PyBytes_AS_STRING(out)
    cdef int i
    for i in range(8):
        p[i] = (slot >> (56 - 8 * i)) & 0xFF
    return out


def append_log(txn, db, entries):
    """Write ``(slot, encoded_record)`` pairs, slots ascending, into the log ``db``.

    One cursor pass: LMDB append mode when every slot is past the last key in
    the log (the common case), plain overwriting puts otherwise (a slot
    re-accepted at a higher ballot). Returns the number of records written.
    """
    if not entries:
        return 0
    cdef list items = []
    cdef object prev = -1
    for slot, record in entries:
        if slot <= prev:
            raise ValueError(f"append_log needs ascending slots: {slot} after {prev}")
        if not (0 <= slot <= U64_MAX):
            raise ValueError(f"slot out of range: {slot}")
        prev = slot
        items.append((slot_key_c(<uint64_t>slot), record))
    cursor = txn.cursor(db)
    try:
        append = (not cursor.last()) or items[0][0] > bytes(cursor.key())
        cursor.putmulti(items, append=append)
    finally:
        cursor.close()
    return len(items)


# -- stored values: revision + checksum + value (see the twin) ---------------------------------

cdef inline uint32_t value_crc(const uint8_t *key, Py_ssize_t nk, const uint8_t *raw,
                               Py_ssize_t n) noexcept nogil:
    cdef uint32_t crc = kv_crc32c(0, key, nk)
    crc = kv_crc32c(crc, raw, 8)
    return kv_crc32c(crc, raw + VALUE_HEADER, n - VALUE_HEADER)


cdef inline uint64_t get_u64_be(const uint8_t *p) noexcept nogil:
    cdef uint64_t v = 0
    cdef int i
    for i in range(8):
        v = (v << 8) | p[i]
    return v


cdef object corrupt_value(bytes key, object raw, str why):
    shown = key[:64] + (b"..." if len(key) > 64 else b"")
    return CorruptRecord(f"the stored value of key {shown!r} is corrupt ({why})")


def pack_value(key, revision, value):
    """The data-table value of ``value`` written at ``revision`` under ``key``."""
    cdef bytes k = as_bytes(key)
    cdef bytes v = as_bytes(value)
    if not (0 <= revision <= U64_MAX):
        raise ValueError(f"revision out of range: {revision}")
    cdef uint64_t rev = <uint64_t>revision
    cdef Py_ssize_t n = PyBytes_GET_SIZE(v)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, VALUE_HEADER + n)
    cdef uint8_t *o = <uint8_t *>PyBytes_AS_STRING(out)
    cdef int i
    for i in range(8):
        o[i] = (rev >> (56 - 8 * i)) & 0xFF
    memcpy(o + VALUE_HEADER, PyBytes_AS_STRING(v), n)
    put_u32(o + 8, value_crc(<const uint8_t *>PyBytes_AS_STRING(k), PyBytes_GET_SIZE(k),
                             o, VALUE_HEADER + n))
    return out


cdef bytes checked_value_at(bytes k, const uint8_t *p, Py_ssize_t n):
    if n < VALUE_HEADER:
        raise corrupt_value(k, None, f"{n} bytes, shorter than its {VALUE_HEADER}-byte header")
    if n > MAX_STORED_VALUE:
        raise corrupt_value(k, None, f"{n} bytes, longer than any value can be")
    cdef uint32_t actual = value_crc(<const uint8_t *>PyBytes_AS_STRING(k),
                                     PyBytes_GET_SIZE(k), p, n)
    cdef uint32_t stored = get_u32(p + 8)
    if actual != stored:
        raise corrupt_value(k, None, f"checksum stored {stored:#010x}, computed {actual:#010x}")
    return PyBytes_FromStringAndSize(<const char *>(p + VALUE_HEADER), n - VALUE_HEADER)


cdef bytes checked_value(bytes k, object raw):
    """``raw`` is bytes, or a buffer into the map whose length is checked before reading."""
    cdef Py_buffer view
    if PyBytes_CheckExact(raw):
        return checked_value_at(k, <const uint8_t *>PyBytes_AS_STRING(raw),
                                PyBytes_GET_SIZE(raw))
    PyObject_GetBuffer(raw, &view, PyBUF_SIMPLE)
    try:
        return checked_value_at(k, <const uint8_t *>view.buf, view.len)
    finally:
        PyBuffer_Release(&view)


cdef inline bytes key_bytes(object key):
    """A key as bytes; from a buffer only once its length is a key's (LMDB's 511 at most)."""
    if PyBytes_CheckExact(key):
        return <bytes>key
    if len(key) > 511:
        raise CorruptRecord(f"a stored key of {len(key)} bytes, longer than any key can be")
    return bytes(key)


def unpack_value(key, raw):
    """The user's value in ``raw`` (None for None), its checksum verified.

    ``raw`` may be bytes or a buffer into the map (a transaction's ``buffers=True``).
    """
    if raw is None:
        return None
    return checked_value(key_bytes(key), raw)


def unpack_revision(raw):
    """The revision of a stored value (0 for None); the checksum is not verified."""
    if raw is None:
        return 0
    cdef Py_buffer view
    PyObject_GetBuffer(raw, &view, PyBUF_SIMPLE)
    try:
        if view.len < VALUE_HEADER:
            raise CorruptRecord(f"a stored value of {view.len} bytes is shorter than "
                                f"its {VALUE_HEADER}-byte header")
        return get_u64_be(<const uint8_t *>view.buf)
    finally:
        PyBuffer_Release(&view)


def unpack_rows(rows):
    """``[(key, value)]`` of ``[(key, raw)]`` rows, every checksum verified."""
    cdef list out = []
    cdef bytes k
    for key, raw in rows:
        k = key_bytes(key)
        out.append((k, checked_value(k, raw)))
    return out


def collect_values(rows, hi, limit):
    """``[(key, value)]`` of ``(key, raw)`` rows while ``key < hi`` (None: no bound), at
    most ``limit`` (None: all), every checksum verified: the loop of a scan."""
    cdef list out = []
    cdef bytes k
    cdef Py_ssize_t n = -1 if limit is None else limit
    if n == 0:
        return out
    for key, raw in rows:
        k = key_bytes(key)
        if hi is not None and k >= hi:
            break
        out.append((k, checked_value(k, raw)))
        if len(out) == n:
            break
    return out
