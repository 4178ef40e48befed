"""What a node may answer: every reply the client acts on is checked here first.

``check_result`` passes a result of the shape a kvstore node sends for the
call's operation and raises ``MalformedReply`` for anything else; the engine
(``kvstore.client.core``) then fails that call with ``Unavailable`` naming the
endpoint, never with an exception of another class.
"""

from __future__ import annotations

from kvstore.commands import (LOCKED, NO_LEASE, NOT_INTEGER, OP_2PC, OP_INCR, OP_LEASE_REVOKE, OP_PUT,
                              OP_PUT_LEASE, OP_PUT_TTL, OVERFLOW, is_int64)
from kvstore.commands import OP_CAS_LEASE
from kvstore.transport import wire
from kvstore.txn import ABORT, COMMIT

class MalformedReply(ValueError):
    """A reply no kvstore node sends (``check_result``): the call fails as ``Unavailable``."""


def _optional_bytes(v) -> bool:
    return v is None or type(v) is bytes


def check_status(value) -> dict:
    """A node's hello or status answer, checked in every part the client reads."""
    if type(value) is not dict:
        raise MalformedReply("a status that is not a map")
    nodes, shards, nshards = value.get("nodes"), value.get("shards"), value.get("nshards")
    if type(value.get("node")) is not str or type(nodes) is not list or not nodes or not all(
            type(n) is dict and type(n.get("id")) is str and type(n.get("address")) is str
            and n["address"].startswith("tcp://") for n in nodes):
        raise MalformedReply("a status that names no nodes")
    if (type(nshards) is not int or not 0 < nshards <= 1 << 16 or type(shards) is not list
            or len(shards) != nshards):
        raise MalformedReply("a status without its shards")
    for sh in shards:
        leader = sh.get("leader_index") if type(sh) is dict else None
        if not (type(sh) is dict and type(sh.get("role")) is str
                and type(sh.get("commit_index")) is int and type(sh.get("applied_index")) is int
                and (leader is None or (type(leader) is int and 0 <= leader < len(nodes)))):
            raise MalformedReply("a status with a malformed shard")
    return value


_OP_WATCH = getattr(wire, "OP_WATCH", "watch")


def check_watch(args, value):
    """An ``OP_WATCH`` answer ``[events, oldest, through, current]`` for the poll
    ``args = [shard, lo, hi, from_revision, ...]``: whole revisions ascending, none
    below ``from_revision``, none past ``through``, every key in ``[lo, hi)``, a put
    with a value and a delete without; ``events`` None (compacted here)."""
    if type(value) is not list or len(value) != 4:
        raise MalformedReply("a watch answer that is not [events, oldest, through, current]")
    revisions, oldest, through, current = value
    if type(oldest) is not int or type(through) is not int or type(current) is not bool:
        raise MalformedReply("a watch answer without its oldest, through and current")
    if revisions is None:
        return value
    if type(revisions) is not list:
        raise MalformedReply("a watch answer whose events are not a list")
    lo, hi, last = args[1], args[2], args[3] - 1
    for r in revisions:
        if type(r) is not list or len(r) != 2 or type(r[0]) is not int or r[0] <= last \
                or type(r[1]) is not list or not r[1]:
            raise MalformedReply("a watch answer whose revisions are out of order or empty")
        last = r[0]
        for change in r[1]:
            if (type(change) is not list or len(change) != 4 or change[0] not in (0, 1)
                    or type(change[0]) is not int or type(change[1]) is not bytes
                    or change[1] < lo or (hi is not None and change[1] >= hi)
                    or (type(change[2]) is not bytes if change[0] == 0 else change[2] is not None)
                    or not _optional_bytes(change[3])):
                raise MalformedReply("a watch answer with a change outside the watch or "
                                     "of the wrong shape")
    if revisions and through < last:
        raise MalformedReply("a watch answer whose through is below its last revision")
    return value


def split_revision(value) -> tuple:
    """``(result, revision)`` of a write sent with ``want_revision``: ``[result,
    revision]``; a bare ``LOCKED`` (nothing applied) or a locked result has no revision."""
    if value == LOCKED:
        return value, None
    if type(value) is not list or len(value) != 2 or type(value[1]) is not int:
        raise MalformedReply("a write's answer that is not [result, revision]")
    return value[0], (None if value[0] == LOCKED else value[1])


def check_result(call, value):
    """``value`` if it is what a node answers to ``call``; ``MalformedReply`` otherwise."""
    op = call.op
    if op == wire.OP_HELLO or op == wire.OP_STATUS:
        return check_status(value)
    if op == wire.OP_GET:
        ok = ((type(value) is list and len(value) == 2 and _optional_bytes(value[0])
               and type(value[1]) is int) if call.payload[2] else _optional_bytes(value))
    elif op == wire.OP_SCAN:
        width = 3 if call.payload[4] else 2
        ok = type(value) is list and all(
            type(r) is list and len(r) == width and type(r[0]) is bytes and type(r[1]) is bytes
            and (width == 2 or type(r[2]) is int) for r in value)
    elif op == _OP_WATCH:
        return check_watch(call.payload, value)
    elif op == wire.OP_DECIDE:
        ok = type(value) is int and value in (COMMIT, ABORT)
    elif op == wire.OP_BACKUP_OPEN:  # [session id, [revision per shard]]
        ok = (type(value) is list and len(value) == 2 and type(value[0]) is bytes
              and type(value[1]) is list and all(type(r) is int and r >= 0 for r in value[1]))
    elif op == wire.OP_BACKUP_PAGE:  # [[[key, value], ...], done]
        ok = (type(value) is list and len(value) == 2 and type(value[0]) is list
              and type(value[1]) is bool and all(
                  type(r) is list and len(r) == 2 and type(r[0]) is bytes and type(r[1]) is bytes
                  for r in value[0]))
    elif op == wire.OP_BACKUP_CLOSE:
        ok = type(value) is bool
    elif op == wire.OP_WRITE:
        kind = call.payload[0]
        if kind == OP_PUT or kind == OP_PUT_TTL:
            ok = value is None
        elif kind == OP_PUT_LEASE:  # or its lease was gone
            ok = value is None or value == NO_LEASE
        elif kind == OP_CAS_LEASE:  # swapped, or its lease was gone
            ok = type(value) is bool or value == NO_LEASE
        elif kind == OP_LEASE_REVOKE:  # the keys deleted, or False: unknown
            ok = value is False or (type(value) is int and value >= 0)
        elif kind == OP_INCR:  # the new value, or a refusal (not an integer, overflow)
            ok = is_int64(value) or value == NOT_INTEGER or value == OVERFLOW
        elif kind == OP_2PC:  # a vote, or with locking reads [vote, [[key, value, revision]]]
            ok = type(value) is bool or (
                type(value) is list and len(value) == 2 and type(value[0]) is bool
                and type(value[1]) is list and all(
                    type(r) is list and len(r) == 3 and type(r[0]) is bytes
                    and _optional_bytes(r[1]) and type(r[2]) is int for r in value[1]))
        else:
            ok = type(value) is bool
    else:
        ok = True
    if not ok:
        raise MalformedReply(f"a result of the wrong shape ({type(value).__name__})")
    return value
