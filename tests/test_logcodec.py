"""Log records: CRC32C vectors, native == pure, and every corruption is detected."""

from __future__ import annotations

import random

import lmdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.errors import CorruptRecord, StorageError
from kernel_impls import LOGCODEC, _logcodec, pure

U64 = st.integers(min_value=0, max_value=2**64 - 1)
RECORDS = st.lists(st.tuples(U64, U64, st.integers(0, 255), st.binary(max_size=300)),
                   max_size=8)

# RFC 3720 (iSCSI) appendix B.4 and the common check value.
CRC32C_VECTORS = [
    (b"123456789", 0xE3069283),
    (bytes(32), 0x8A9136AA),
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
    (b"", 0),
]


@pytest.mark.parametrize("impl", sorted(LOGCODEC))
@pytest.mark.parametrize("data,expected", CRC32C_VECTORS)
def test_crc32c_vectors(impl, data, expected):
    assert LOGCODEC[impl].crc32c(data) == expected


@pytest.mark.parametrize("hardware", [True, False])
def test_crc32c_hardware_and_portable_paths_agree(hardware):
    old = _logcodec._use_hardware_crc(hardware)
    try:
        rng = random.Random(32)
        for n in list(range(0, 70)) + [1000, 4099]:
            data = rng.randbytes(n)
            assert _logcodec.crc32c(data) == pure.logcodec.crc32c(data)
            # continuing a CRC equals computing it in one go
            cut = n // 3
            assert _logcodec.crc32c(data[cut:], _logcodec.crc32c(data[:cut])) == \
                _logcodec.crc32c(data)
        for data, expected in CRC32C_VECTORS:
            assert _logcodec.crc32c(data) == expected
    finally:
        _logcodec._use_hardware_crc(old)


@settings(max_examples=300, deadline=None)
@given(RECORDS)
def test_encode_decode_native_equals_pure(records):
    encoded = _logcodec.encode_batch(records)
    assert encoded == pure.logcodec.encode_batch(records)
    assert _logcodec.decode_batch(encoded) == records
    assert pure.logcodec.decode_batch(encoded) == records
    for slot, ballot, kind, payload in records:
        one = _logcodec.encode_record(slot, ballot, kind, payload)
        assert one == pure.logcodec.encode_record(slot, ballot, kind, payload)
        assert len(one) == _logcodec.RECORD_HEADER_SIZE + len(payload)
        assert _logcodec.decode_record(one, slot) == (slot, ballot, kind, payload)
        assert pure.logcodec.decode_record(one, slot) == (slot, ballot, kind, payload)


def _batch() -> bytes:
    return pure.logcodec.encode_batch(
        [(7, 3 << 16 | 1, 1, b"first payload"), (8, 3 << 16 | 1, 1, b""),
         (9, 4 << 16 | 2, 0, b"\x00\xff" * 9)])


@pytest.mark.parametrize("impl", sorted(LOGCODEC))
def test_every_single_bit_flip_is_detected(impl):
    decode = LOGCODEC[impl].decode_batch
    data = _batch()
    for bit in range(len(data) * 8):
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(CorruptRecord):
            decode(bytes(flipped))


@pytest.mark.parametrize("impl", sorted(LOGCODEC))
def test_every_truncation_is_detected(impl):
    codec = LOGCODEC[impl]
    data = _batch()
    ends = {codec.RECORD_HEADER_SIZE + 13, 2 * codec.RECORD_HEADER_SIZE + 13, len(data)}
    for cut in range(1, len(data)):
        if cut in ends:  # a cut at a record boundary leaves whole records
            assert len(codec.decode_batch(data[:cut])) in (1, 2)
            continue
        with pytest.raises(CorruptRecord) as info:
            codec.decode_batch(data[:cut])
        assert info.value.offset is not None
    single = codec.encode_record(5, 1, 1, b"payload")
    for cut in range(len(single)):
        with pytest.raises(CorruptRecord):
            codec.decode_record(single[:cut])


@pytest.mark.parametrize("impl", sorted(LOGCODEC))
def test_errors_name_the_offset_and_slot(impl):
    codec = LOGCODEC[impl]
    data = bytearray(_batch())
    second = codec.RECORD_HEADER_SIZE + 13
    data[second + 10] ^= 0x10  # the slot field of the second record
    with pytest.raises(CorruptRecord) as info:
        codec.decode_batch(bytes(data))
    assert info.value.offset == second
    assert f"offset {second}" in str(info.value)
    record = codec.encode_record(42, 1, 1, b"x")
    with pytest.raises(CorruptRecord) as info:
        codec.decode_record(record, expected_slot=43)
    assert info.value.slot == 43 and "42" in str(info.value)
    with pytest.raises(CorruptRecord):
        codec.decode_record(record + b"\x00")
    assert issubclass(CorruptRecord, StorageError)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_only_ever_raise_corrupt_record(data):
    for codec in LOGCODEC.values():
        for decode in (codec.decode_batch, codec.decode_record):
            try:
                result = decode(data)
            except CorruptRecord:
                continue
            # Accepted only if it is a genuine encoding of what it returned.
            records = result if decode is codec.decode_batch else [result]
            assert codec.encode_batch(records) == data


@pytest.mark.parametrize("impl", sorted(LOGCODEC))
def test_bad_fields_are_value_errors(impl):
    codec = LOGCODEC[impl]
    for args in [(-1, 0, 0, b""), (2**64, 0, 0, b""), (0, -1, 0, b""), (0, 0, 256, b""),
                 (0, 0, -1, b"")]:
        with pytest.raises(ValueError):
            codec.encode_record(*args)


@pytest.mark.parametrize("impl", sorted(LOGCODEC))
def test_append_log_appends_in_order_and_overwrites_when_needed(impl, tmp_path):
    codec = LOGCODEC[impl]
    env = lmdb.open(str(tmp_path / "log"), max_dbs=2)
    db = env.open_db(b"log")
    first = [(s, codec.encode_record(s, 1, 1, b"v%d" % s)) for s in range(1, 6)]
    with env.begin(write=True) as txn:
        assert codec.append_log(txn, db, first) == 5
        assert codec.append_log(txn, db, []) == 0
    # Slots 4 and 5 re-accepted at a higher ballot, 6 new: overwrite mode.
    again = [(s, codec.encode_record(s, 2, 1, b"w%d" % s)) for s in range(4, 7)]
    with env.begin(write=True) as txn:
        assert codec.append_log(txn, db, again) == 3
    with env.begin(db=db) as txn:
        rows = [(pure.logcodec.key_slot(k), codec.decode_record(v, pure.logcodec.key_slot(k)))
                for k, v in txn.cursor()]
    assert [slot for slot, _ in rows] == [1, 2, 3, 4, 5, 6]
    assert [rec[1] for _, rec in rows] == [1, 1, 1, 2, 2, 2]
    assert rows[4][1][3] == b"w5"
    with env.begin(write=True) as txn, pytest.raises(ValueError):
        codec.append_log(txn, db, [(9, b"x"), (8, b"y")])
    env.close()


def test_slot_keys_sort_as_slots():
    slots = [0, 1, 255, 256, 2**32, 2**64 - 1]
    keys = [pure.logcodec.slot_key(s) for s in slots]
    assert keys == sorted(keys)
    assert [pure.logcodec.key_slot(k) for k in keys] == slots


# -- stored values: revision + CRC32C + value (issue 11 #7) -----------------------------------

KEYS = st.binary(min_size=1, max_size=511)


@given(KEYS, U64, st.binary(max_size=3000))
@settings(max_examples=200, deadline=None)
def test_pack_value_native_equals_pure_and_round_trips(key, revision, value):
    native, twin = LOGCODEC["native"], LOGCODEC["pure"]
    raw = native.pack_value(key, revision, value)
    assert raw == twin.pack_value(key, revision, value)
    assert int.from_bytes(raw[:8], "big") == revision  # the revision leads, big-endian
    for impl in (native, twin):
        assert impl.unpack_value(key, raw) == value
        assert impl.unpack_value(key, memoryview(raw)) == value  # a buffer into the map
        assert impl.unpack_revision(raw) == revision
        assert impl.unpack_rows([(key, raw)]) == [(key, value)]
        assert impl.collect_values(iter([(key, raw)]), None, None) == [(key, value)]
        assert impl.unpack_value(key, None) is None and impl.unpack_revision(None) == 0


@pytest.mark.parametrize("impl", sorted(LOGCODEC))
def test_every_bit_flip_of_a_stored_value_is_detected(impl):
    codec = LOGCODEC[impl]
    key, value = b"user/1", b"some value of a few bytes"
    raw = codec.pack_value(key, 77, value)
    for i in range(len(raw) * 8):
        bad = bytearray(raw)
        bad[i // 8] ^= 1 << (i % 8)
        with pytest.raises(CorruptRecord, match="user/1"):
            codec.unpack_value(key, bytes(bad))
    with pytest.raises(CorruptRecord):  # the right bytes under another key
        codec.unpack_value(b"user/2", raw)
    for cut in range(len(raw)):
        with pytest.raises(CorruptRecord):
            codec.unpack_value(key, raw[:cut])


@pytest.mark.parametrize("impl", sorted(LOGCODEC))
def test_impossible_lengths_are_refused_before_a_byte_is_read(impl):
    codec = LOGCODEC[impl]
    with pytest.raises(CorruptRecord, match="longer than any value"):
        codec.unpack_value(b"k", memoryview(bytes(codec.MAX_STORED_VALUE_SIZE + 1)))
    with pytest.raises(CorruptRecord, match="longer than any key"):
        codec.unpack_rows([(memoryview(bytes(600)), codec.pack_value(b"k", 1, b""))])
    record = codec.encode_record(5, 1, 1, b"payload")
    with pytest.raises(CorruptRecord, match="length mismatch"):
        codec.decode_record(memoryview(record + b"\0" * 100), 5)


@pytest.mark.parametrize("impl", sorted(LOGCODEC))
def test_collect_values_stops_at_the_bound_and_the_limit(impl):
    codec = LOGCODEC[impl]
    rows = [(b"k%d" % i, codec.pack_value(b"k%d" % i, i, b"v%d" % i)) for i in range(6)]
    assert codec.collect_values(iter(rows), b"k3", None) == [(b"k%d" % i, b"v%d" % i)
                                                               for i in range(3)]
    assert codec.collect_values(iter(rows), None, 2) == [(b"k0", b"v0"), (b"k1", b"v1")]
    assert codec.collect_values(iter(rows), None, 0) == []


@given(U64, U64, st.integers(0, 255), st.binary(max_size=300))
def test_record_fields_reads_what_decode_record_checks(slot, ballot, kind, payload):
    """``record_fields`` (the header of a record this process made, unchecked) agrees with
    ``decode_record``: the node writes a Paxos record's fields into the log record this way."""
    from kvstore._native import encode_record, record_fields
    record = encode_record(slot, ballot, kind, payload)
    got = record_fields(record)
    assert got[:3] == (slot, ballot, kind) and bytes(got[3]) == payload
    assert got[:3] + (bytes(got[3]),) == tuple(pure.logcodec.decode_record(record))
