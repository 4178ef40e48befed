"""The backup file codec (``kvstore.backup.format``), property-tested: what the writer
writes the reader gives back exactly; any cut or flipped byte is refused with
``CorruptRecord``; hostile frames (lengths past the end, huge claims) are refused
before anything is allocated."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.backup.format import (DATA, LEASES, MAGIC, ROWS, BackupReader, BackupWriter,
                                   Header, decode_rows, encode_frame, encode_rows, read_all)
from kvstore.errors import CorruptRecord

keys = st.binary(min_size=1, max_size=40)
values = st.binary(max_size=300)


@st.composite
def backups(draw):
    shards = draw(st.integers(1, 4))
    tables = {}
    for shard in range(shards):
        for table in (DATA, LEASES):
            rows = draw(st.dictionaries(keys, values, max_size=30))
            tables[(shard, table)] = sorted(rows.items())
    revisions = draw(st.lists(st.integers(0, 1 << 40), min_size=shards, max_size=shards))
    chunk = draw(st.integers(1, 2000))
    return shards, tables, revisions, chunk


def write(path, shards, tables, revisions, chunk) -> dict:
    header = Header(shards=shards, source={"kind": "test", "path": "x"}, revisions=revisions,
                    cut={"fence": "ab"}, created="2026-01-01T00:00:00+00:00", kvstore="0")
    with BackupWriter(path, header, chunk_bytes=chunk) as w:
        for (shard, table), rows in sorted(tables.items()):
            for i in range(0, len(rows), 7):  # added in several calls
                w.add(shard, table, rows[i:i + 7])
        return w.finish()


@settings(max_examples=60, deadline=None)
@given(backup=backups())
def test_what_is_written_reads_back_exactly(tmp_path_factory, backup):
    shards, tables, revisions, chunk = backup
    path = tmp_path_factory.mktemp("b") / "x.kvb"
    trailer = write(path, *backup)
    assert not os.path.exists(str(path) + ".tmp")
    header, chunks = read_all(path)
    assert (header.shards, header.revisions, header.cut) == (shards, revisions, {"fence": "ab"})
    got: dict = {k: [] for k in tables}
    for shard, table, rows in chunks:
        got[(shard, table)] += rows
    assert got == tables
    assert trailer["rows"] == [[len(tables[(s, t)]) for t in (DATA, LEASES)]
                               for s in range(shards)]


@settings(max_examples=60, deadline=None)
@given(backup=backups(), data=st.data())
def test_a_cut_or_flipped_byte_is_refused(tmp_path_factory, backup, data):
    path = tmp_path_factory.mktemp("b") / "x.kvb"
    write(path, *backup)
    raw = bytearray(path.read_bytes())
    if data.draw(st.booleans()):
        raw = raw[:data.draw(st.integers(0, len(raw) - 1))]
    else:
        raw[data.draw(st.integers(0, len(raw) - 1))] ^= 1 << data.draw(st.integers(0, 7))
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptRecord):
        read_all(path)


@given(shard=st.integers(0, 65535), table=st.sampled_from([DATA, LEASES]),
       rows=st.lists(st.tuples(keys, values), max_size=20))
def test_rows_round_trip(shard, table, rows):
    assert decode_rows(encode_rows(shard, table, rows)) == (shard, table, rows)


@given(payload=st.binary(max_size=200))
def test_any_rows_payload_decodes_or_is_refused(payload):
    try:
        shard, table, rows = decode_rows(payload)
    except ValueError:
        return
    assert encode_rows(shard, table, rows) == payload


def test_a_frame_claiming_more_than_the_limit_is_refused_before_reading(tmp_path):
    path = tmp_path / "x.kvb"
    header = Header(shards=1, source={}, revisions=[0])
    head = MAGIC + encode_frame(1, header.encode())
    path.write_bytes(head + bytes([ROWS]) + (0xFFFFFFFF).to_bytes(4, "big"))
    with BackupReader(path) as r, pytest.raises(CorruptRecord, match="claims"):
        list(r.chunks())


def test_not_a_backup_is_refused(tmp_path):
    (tmp_path / "x").write_bytes(b"hello world, not a backup")
    with pytest.raises(CorruptRecord, match="not a kvstore backup"):
        read_all(tmp_path / "x")


def test_rows_added_out_of_order_are_a_bug_not_a_backup(tmp_path):
    header = Header(shards=1, source={}, revisions=[0])
    with BackupWriter(tmp_path / "x", header) as w:
        w.add(0, DATA, [(b"b", b"")])
        with pytest.raises(ValueError):
            w.add(0, DATA, [(b"a", b"")])
    assert not os.path.exists(tmp_path / "x.tmp") and not os.path.exists(tmp_path / "x")
