"""The hot kernels: compiled (from ``_ext/*.pyx``) when importable, pure Python otherwise.

One API whichever is in use (the pure twins in ``*_py.py`` define it):

- hashing: ``xxh64``, ``jump_consistent_hash``, ``shard_of``, ``shard_of_many``
- log records: ``crc32c``, ``encode_record``, ``encode_batch``, ``decode_record``,
  ``decode_batch``, ``append_log``, ``slot_key``, ``key_slot``, ``record_fields``,
  ``RECORD_HEADER_SIZE``, ``FORMAT_VERSION``
- stored values: ``pack_value``, ``unpack_value``, ``unpack_revision``, ``unpack_rows``,
  ``collect_values``,
  ``VALUE_HEADER_SIZE``
- quorum: ``QuorumTally``, ``PromiseTally``, ``majority``
- wake-ups: ``Waiter``, ``release_all`` (a group commit's writers, woken without the GIL)

``KVSTORE_PURE=1`` in the environment forces the pure-Python reference (as
msgpack-python does); ``IMPLEMENTATION`` says which one was chosen and
``pure`` always holds the reference modules, for tests and benchmarks.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

from kvstore._native import hashing_py, logcodec_py, quorum_py, wakeup_py

pure = SimpleNamespace(hashing=hashing_py, logcodec=logcodec_py, quorum=quorum_py,
                       wakeup=wakeup_py)

IMPLEMENTATION = "pure"
NATIVE_IMPORT_ERROR: str | None = None

if os.environ.get("KVSTORE_PURE", "") not in ("", "0"):
    NATIVE_IMPORT_ERROR = "KVSTORE_PURE is set"
    _hashing, _logcodec, _quorum, _wakeup = hashing_py, logcodec_py, quorum_py, wakeup_py
else:
    try:
        from kvstore._native import (_hashing, _logcodec, _quorum,  # type: ignore[attr-defined]
                                     _wakeup)
        IMPLEMENTATION = "native"
    except ImportError as e:  # not built (e.g. a source checkout without build_ext)
        NATIVE_IMPORT_ERROR = str(e)
        _hashing, _logcodec, _quorum, _wakeup = hashing_py, logcodec_py, quorum_py, wakeup_py

native = (SimpleNamespace(hashing=_hashing, logcodec=_logcodec, quorum=_quorum, wakeup=_wakeup)
          if IMPLEMENTATION == "native" else None)

xxh64 = _hashing.xxh64
jump_consistent_hash = _hashing.jump_consistent_hash
shard_of = _hashing.shard_of
shard_of_many = _hashing.shard_of_many

crc32c = _logcodec.crc32c
encode_record = _logcodec.encode_record
encode_batch = _logcodec.encode_batch
decode_record = _logcodec.decode_record
decode_batch = _logcodec.decode_batch
append_log = _logcodec.append_log
pack_value = _logcodec.pack_value
unpack_value = _logcodec.unpack_value
unpack_revision = _logcodec.unpack_revision
unpack_rows = _logcodec.unpack_rows
collect_values = _logcodec.collect_values
VALUE_HEADER_SIZE = logcodec_py.VALUE_HEADER_SIZE
slot_key = logcodec_py.slot_key
record_fields = logcodec_py.record_fields  # a header read: as fast in Python
key_slot = logcodec_py.key_slot
RECORD_HEADER_SIZE = logcodec_py.RECORD_HEADER_SIZE
FORMAT_VERSION = logcodec_py.FORMAT_VERSION

QuorumTally = _quorum.QuorumTally
PromiseTally = _quorum.PromiseTally
majority = quorum_py.majority

Waiter = _wakeup.Waiter
release_all = _wakeup.release_all

__all__ = [
    "IMPLEMENTATION", "NATIVE_IMPORT_ERROR", "pure", "native",
    "xxh64", "jump_consistent_hash", "shard_of", "shard_of_many",
    "crc32c", "encode_record", "encode_batch", "decode_record", "decode_batch",
    "append_log", "slot_key", "key_slot", "record_fields", "RECORD_HEADER_SIZE", "FORMAT_VERSION",
    "pack_value", "unpack_value", "unpack_revision", "unpack_rows", "collect_values",
    "VALUE_HEADER_SIZE",
    "QuorumTally", "PromiseTally", "majority",
    "Waiter", "release_all",
]
