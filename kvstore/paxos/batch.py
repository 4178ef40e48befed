"""The payload of a ``KIND_BATCH`` log entry: a msgpack list of commands, each opaque bytes.

The replica cuts proposals into batches (``encode_batch``) and hands committed
batches back as command lists (``decode_batch``); what a command's bytes mean is the
application's (the node's client commands, the simulator's KV commands). A payload
comes back from disk and from peers, so ``decode_batch`` checks the shape and raises
``ValueError`` for anything else: a record is refused before it is accepted when its
payload is not a batch (``transport.wire``), and a chosen one that is not (a log
written before that check) is applied as a no-op (``Replica.ready``).
"""

from __future__ import annotations

import msgpack

#: Commands one batch holds at most (a node batches a few hundred per entry).
BATCH_COMMANDS_MAX = 1 << 16


def encode_batch(commands: list) -> bytes:
    return msgpack.packb(commands, use_bin_type=True)


def decode_batch(payload: bytes) -> list:
    """The commands of a batch payload; ``ValueError`` if it is not one."""
    try:
        commands = msgpack.unpackb(payload, raw=False, use_list=True, max_array_len=BATCH_COMMANDS_MAX)
    except Exception as e:  # msgpack raises several unrelated classes
        raise ValueError(f"undecodable command batch: {type(e).__name__}: {e}"[:200]) from None
    if type(commands) is not list or not all(type(c) is bytes for c in commands):
        raise ValueError("a command batch is a list of bytes")
    return commands
