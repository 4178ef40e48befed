"""Encoding of state-machine commands, the payload of a log record.

A log entry carries a batch of commands (``encode_commands``); msgpack with a
schema we own: lists of small ints, bytes and None, checked on the way in.
Never pickle: log payloads come back from disk and, in a cluster, from peers.

Commands (tuples; the first item is the op code):

- ``(OP_PUT, key, value)``                 -> None
- ``(OP_DELETE, key)``                     -> bool, the key existed
- ``(OP_CAS, key, expected, new)``         -> bool, swapped (None: absent / delete)
- ``(OP_TXN, reads, ranges, writes)``      -> bool, committed (False: conflict)
    reads  = [(key, revision)]                revision 0 = read as absent
    ranges = [(lo, hi, [(key, revision)])]    hi None = unbounded; the rows seen
    writes = [(key, value or None)]           None deletes
- ``(OP_TXN_WRITES, writes)``              -> True: the part of a transaction
  already validated across shards (its decision was commit)
- ``(OP_2PC, entry)``                      -> a cluster's two-phase-commit step, ``entry``
  a ``kvstore.txn.records`` encoding (TxnPrepare -> vote, TxnDecision -> recorded
  outcome, TxnResolve -> changed); applied by ``kvstore.machine.twopc``. A client
  sends only TxnPrepare; decisions and resolves are written by the nodes
"""

from __future__ import annotations

import msgpack

from kvstore.errors import CorruptRecord

OP_PUT = 1
OP_DELETE = 2
OP_CAS = 3
OP_TXN = 4
OP_TXN_WRITES = 5
OP_2PC = 6

#: Log record kinds (the ``kind`` byte of a record header).
KIND_NOOP = 0
KIND_COMMANDS = 1


def encode_commands(commands: list) -> bytes:
    """The payload of one log entry holding ``commands``."""
    return msgpack.packb(commands, use_bin_type=True)


def decode_commands(payload: bytes, slot: int | None = None) -> list:
    """Inverse of ``encode_commands``; a payload that does not parse is a CorruptRecord."""
    try:
        commands = msgpack.unpackb(payload, raw=False, use_list=True)
    except Exception as e:  # msgpack raises several unrelated classes
        raise CorruptRecord(f"undecodable command batch in slot {slot}: {e}", slot=slot) from e
    if not isinstance(commands, list):
        raise CorruptRecord(f"command batch in slot {slot} is not a list", slot=slot)
    return commands
