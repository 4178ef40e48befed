"""The upgrade path from log format 1: read it, never write it.

A data directory written before issue 20's one log format (segment format
version 1) opens with this release: its format-1 segments are read, each
record translated here into what the same record means in format 2, and
replayed through the one replay (``kvstore.storage.replay``) with the rest.
Appends go to a new segment, in format 2 only (``WriteAheadLog`` never
appends to a segment of another version). Once a checkpoint has moved past
the last format-1 segment it is deleted as any old segment is, and the
directory is format 2 for good.

Format 1 framed records exactly as format 2 does (the same log record, prefix
and kinds; promises, commit points and checkpoints mean the same); only an
entry's record (``KIND_ENTRY``) differs, in one of two ways, told apart by
its tag:

- a cluster node's (tag 0): the payload is a whole encoded Paxos record
  (``kvstore._native.encode_record``: slot, ballot, entry kind, payload, and
  its own CRC32C), the log record's header ballot 0. Its CRC is verified and
  its slot must be the log record's; its fields become the format-2 entry's.
- an embedded store's (tag ``KIND_COMMANDS``, 1): the payload is msgpack of
  the list of bare commands (``kvstore.commands.encode_commands``). Format 2
  holds the same commands as a batch (``kvstore.paxos.batch``: a msgpack list
  of each command's msgpack bytes), entry kind ``KIND_BATCH`` (also 1),
  ballot 0.

An entry that does not decode is ``CorruptRecord`` naming the segment and
the log position, as any corrupt record of the log is.
"""

from __future__ import annotations

import msgpack

from kvstore import _native
from kvstore.commands import KIND_COMMANDS, decode_commands
from kvstore.errors import CorruptRecord

#: The segment format version this module reads.
FORMAT = 1
#: The tag of a node's format-1 entry record (its payload a whole Paxos record).
_NODE_ENTRY = 0
#: ``kvstore.paxos.replica.KIND_BATCH``: storage never imports paxos, and
#: ``tests/test_log_format.py`` pins that the two agree.
KIND_BATCH = 1


def upgrade_entry(slot: int, tag: int, payload: bytes, path: str, position: int
                  ) -> tuple[int, int, bytes]:
    """``(ballot, entry kind, payload)`` in format 2 of the format-1 entry record at log
    ``position`` of segment ``path`` (its header's ``slot``, its prefix's ``tag``)."""
    if tag == _NODE_ENTRY:
        try:
            inner_slot, ballot, kind, inner = _native.decode_record(payload)
        except CorruptRecord as e:
            raise _corrupt(path, position, f"its Paxos record does not validate ({e})") from None
        if inner_slot != slot:
            raise _corrupt(path, position, f"its Paxos record is of slot {inner_slot}, the log "
                                           f"record's of slot {slot}")
        return ballot, kind, bytes(inner)
    if tag == KIND_COMMANDS:
        try:
            commands = decode_commands(payload, slot)
        except CorruptRecord as e:
            raise _corrupt(path, position, str(e)) from None
        return 0, KIND_BATCH, batch_payload(commands)
    raise _corrupt(path, position, f"an entry of unknown tag {tag}")


def batch_payload(commands: list) -> bytes:
    """The format-2 payload of an embedded entry of ``commands``: the batch of each
    command's msgpack (``kvstore.embedded.recovery.entry`` writes the same bytes)."""
    pack = msgpack.Packer(use_bin_type=True).pack
    return msgpack.packb([pack(c) for c in commands], use_bin_type=True)


def _corrupt(path: str, position: int, why: str) -> CorruptRecord:
    return CorruptRecord(f"corrupt log record in {path} (log format {FORMAT}) at log position "
                         f"{position}: {why}; nothing from it on is applied",
                         offset=position, path=path)


__all__ = ["FORMAT", "upgrade_entry", "batch_payload"]
