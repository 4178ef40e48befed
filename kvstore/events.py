"""What a watch delivers: ``Event``, one change of one key at one revision of its shard.

The public shape (docs/watch.md): a put or a delete of ``key`` in ``shard`` at
``revision`` (the shard's revision: ``slot + 1`` of the log entry that wrote it),
with the previous value when the watch asked for it (``prev_value=True``). Events
of one shard arrive in revision order, those of one revision in the entry's order;
across shards there is no order (revisions are per shard).
"""

from __future__ import annotations

from typing import NamedTuple

#: ``Event.type`` of a write that left the key with a value.
PUT = "put"
#: ``Event.type`` of a write that removed the key.
DELETE = "delete"


class Event(NamedTuple):
    """One change delivered by a watch (see the module docstring)."""

    type: str  # PUT or DELETE
    key: bytes
    value: bytes | None  # None for a delete
    revision: int  # of the key's shard
    prev_value: bytes | None  # filled only when the watch asked prev_value=True
    shard: int


__all__ = ["Event", "PUT", "DELETE"]
