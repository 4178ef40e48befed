"""What a watch delivers: ``Event``, one change of one key at one revision of its shard.

The public shape (docs/watch.md): a put or a delete of ``key`` in ``shard`` at
``revision`` (the shard's revision: ``slot + 1`` of the log entry that wrote it),
with the previous value when the watch asked for it (``prev_value=True``). Events
of one shard arrive in revision order, those of one revision in the entry's order;
across shards there is no order (revisions are per shard).
"""

from __future__ import annotations

from typing import NamedTuple

from kvstore.errors import InvalidArgument
from kvstore.keys import check_bound, check_key, prefix_end

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


#: The wire's type codes (OP_WATCH: 0 put, 1 delete), as ``Event.type``.
_TYPES = (PUT, DELETE)


def events_of(shard: int, revisions: list, prev: bool) -> list:
    """``Event``s of a history's answer ``[[revision, [[type, key, value, prev], ...]], ...]``
    (``kvstore.watch.ShardHistory.since``, OP_WATCH's ``events``)."""
    return [Event(_TYPES[t], k, v, revision, p if prev else None, shard)
            for revision, changes in revisions for t, k, v, p in changes]


def watch_range(key=None, prefix=None) -> tuple:
    """``(lo, hi, key or None)`` of a watch: one key (``hi = key + b"\\x00"``), a prefix, or
    every key (neither given); ``InvalidArgument`` for both or a bad one."""
    if key is not None:
        if prefix is not None:
            raise InvalidArgument("watch takes key= or prefix=, not both")
        key = check_key(key)
        return key, key + b"\x00", key
    prefix = check_bound(prefix, "prefix") or b""
    return prefix, (prefix_end(prefix) if prefix else None), None


def check_start_revision(start_revision, shards) -> dict | None:
    """A watch's ``start_revision`` as ``{shard: revision}`` over ``shards`` (None: from
    now): an int (the same revision on every shard) or a dict (a ``Watch.position``;
    its shards must be ``shards``, or include them for a key's watch)."""
    if start_revision is None:
        return None
    if type(start_revision) is int:
        if start_revision < 1:
            raise InvalidArgument(f"start_revision must be >= 1 (revisions start at 1), "
                                  f"got {start_revision}")
        return {s: start_revision for s in shards}
    if isinstance(start_revision, dict):
        out = {}
        for s in shards:
            r = start_revision.get(s)
            if type(r) is not int or r < 1:
                raise InvalidArgument(f"start_revision has no revision >= 1 for shard {s} "
                                      f"(pass a Watch.position, an int, or None)")
            out[s] = r
        return out
    raise InvalidArgument(f"start_revision must be None, an int or a dict shard -> revision "
                          f"(a Watch.position), not {type(start_revision).__name__}")


__all__ = ["Event", "PUT", "DELETE", "events_of", "watch_range", "check_start_revision"]
