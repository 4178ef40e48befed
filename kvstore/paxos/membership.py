"""Memberships: who votes in which slots, and the rules for changing it.

A change is a log entry of kind ``KIND_CONFIG`` whose payload is the next membership
(``encode_membership``). Chosen at slot s by the current epoch's voters, it ends that
epoch at s; the next epoch decides slots s + 1 onwards with its own voters and ballots
(``ballot.py``: the epoch is in a ballot's top bits). See "Membership" in
``kvstore.paxos.replica`` for why this is safe and what each replica does at the switch.

A payload comes from peers and from disk: ``decode_membership`` checks its shape and
ranges and raises ``ValueError`` for anything else.
"""

from __future__ import annotations

import struct

import msgpack

from kvstore.paxos.ballot import EPOCH_MAX
from kvstore.paxos.interface import Membership
from kvstore.paxos.messages import NODES_MAX

#: The driver's ``info`` bytes at most (names and addresses of 64 nodes fit many times).
INFO_BYTES_MAX = 1 << 16


def bootstrap(num_nodes: int) -> Membership:
    return Membership(0, 0, tuple(range(num_nodes)), (), b"")


def encode_membership(m: Membership) -> bytes:
    """The payload of the ``KIND_CONFIG`` entry that begins ``m`` (``start`` is implied:
    the entry's slot + 1)."""
    return msgpack.packb([m.epoch, list(m.voters), list(m.learners), m.info], use_bin_type=True)


def decode_membership(payload: bytes, slot: int) -> Membership:
    """The membership a ``KIND_CONFIG`` entry at ``slot`` begins; ``ValueError`` if the
    payload is not one."""
    try:
        v = msgpack.unpackb(payload, raw=False, use_list=True, max_array_len=NODES_MAX,
                            max_bin_len=INFO_BYTES_MAX)
    except Exception as e:  # msgpack raises several unrelated classes
        raise ValueError(f"undecodable membership: {type(e).__name__}: {e}"[:200]) from None
    if type(v) is not list or len(v) != 4:
        raise ValueError("a membership is [epoch, voters, learners, info]")
    epoch, voters, learners, info = v
    if type(epoch) is not int or not 1 <= epoch <= EPOCH_MAX:
        raise ValueError(f"membership epoch {epoch!r} out of range 1..{EPOCH_MAX}"[:120])
    if type(info) is not bytes:
        raise ValueError("membership info must be bytes")
    m = Membership(epoch, slot + 1, _nodes(voters, "voters"), _nodes(learners, "learners"), info)
    check_membership(m)
    return m


def _nodes(v, what: str) -> tuple:
    if type(v) is not list or not all(type(i) is int and 0 <= i < NODES_MAX for i in v):
        raise ValueError(f"membership {what} must be node indexes 0..{NODES_MAX - 1}")
    if v != sorted(set(v)):
        raise ValueError(f"membership {what} must be sorted and distinct")
    return tuple(v)


def check_membership(m: Membership) -> None:
    """``ValueError`` unless ``m`` is a membership some epoch could have."""
    if not m.voters:
        raise ValueError("a membership needs at least one voter")
    if set(m.voters) & set(m.learners):
        raise ValueError(f"node(s) {sorted(set(m.voters) & set(m.learners))} cannot both vote "
                         f"and learn")
    for i in m.voters + m.learners:
        if not 0 <= i < NODES_MAX:
            raise ValueError(f"node index {i} out of range 0..{NODES_MAX - 1}")
    if len(m.info) > INFO_BYTES_MAX:
        raise ValueError(f"membership info of {len(m.info)} bytes, over {INFO_BYTES_MAX}")


def check_change(current: Membership, voters, learners, info: bytes) -> Membership:
    """The membership that follows ``current`` with these voters and learners, or
    ``ValueError`` saying why not. One voter is added or removed at a time: the new
    epoch is electable only with a majority of its voters caught up through the change,
    and one change at a time keeps a node that knows of it in every new majority."""
    nxt = Membership(current.epoch + 1, 0, tuple(sorted(set(voters))), tuple(sorted(set(learners))),
                     bytes(info))
    if nxt.epoch > EPOCH_MAX:
        raise ValueError("no membership epoch left (a cluster changes members 65,535 times at most)")
    check_membership(nxt)
    moved = set(current.voters) ^ set(nxt.voters)
    if len(moved) > 1:
        raise ValueError(f"one voter at a time: this change adds or removes {len(moved)} "
                         f"({sorted(moved)}); make it in steps")
    return nxt


_MAGIC = b"KVSM"
_HEADER = struct.Struct(">4sI")


def wrap_snapshot(m: Membership, data: bytes) -> bytes:
    """A snapshot as it travels between replicas: the membership at its index, then the
    application's bytes (a replica that installs it learns the voters with the state).
    An epoch-0 snapshot goes as the bare application bytes, as before memberships could
    change, so that nodes of both versions exchange snapshots during a rolling upgrade."""
    if m.epoch == 0:
        return data
    head = msgpack.packb([m.epoch, m.start, list(m.voters), list(m.learners), m.info], use_bin_type=True)
    return _HEADER.pack(_MAGIC, len(head)) + head + data


def unwrap_snapshot(blob: bytes, index: int) -> tuple:
    """``(membership, application bytes)`` of a snapshot through ``index``: membership
    None for a bare epoch-0 snapshot (``wrap_snapshot``); ``ValueError`` if the membership
    part is not one, or could not be the membership at ``index``."""
    if not blob.startswith(_MAGIC):
        return None, blob
    if len(blob) < _HEADER.size:
        raise ValueError("a snapshot too short for its membership")
    _magic, n = _HEADER.unpack_from(blob)
    if n > INFO_BYTES_MAX + 1024 or _HEADER.size + n > len(blob):
        raise ValueError("a snapshot's membership overruns it")
    try:
        v = msgpack.unpackb(blob[_HEADER.size:_HEADER.size + n], raw=False, use_list=True,
                            max_array_len=NODES_MAX, max_bin_len=INFO_BYTES_MAX)
    except Exception as e:  # msgpack raises several unrelated classes
        raise ValueError(f"undecodable snapshot membership: {type(e).__name__}"[:200]) from None
    if type(v) is not list or len(v) != 5:
        raise ValueError("a snapshot's membership is [epoch, start, voters, learners, info]")
    epoch, start, voters, learners, info = v
    if (type(epoch) is not int or type(start) is not int
            or not 1 <= epoch <= EPOCH_MAX or not 1 <= start <= index + 1 or type(info) is not bytes):
        raise ValueError("a snapshot's membership epoch or start is out of range")
    m = Membership(epoch, start, _nodes(voters, "voters"), _nodes(learners, "learners"), info)
    check_membership(m)
    return m, blob[_HEADER.size + n:]


__all__ = ["Membership", "bootstrap", "encode_membership", "decode_membership", "check_membership",
           "check_change", "wrap_snapshot", "unwrap_snapshot", "INFO_BYTES_MAX"]
