"""Paxos messages between the replicas of one shard.

One plain dataclass for every type (as etcd's ``raftpb.Message``); each type uses
the fields listed below and leaves the others at their defaults. Words are Paxos
words only (Prepare, Promise, Accept, Accepted), never shared with two-phase commit.

| type            | meaning and fields used                                                   |
| --------------- | ------------------------------------------------------------------------- |
| PreVote         | "would you promise ``ballot``?" (changes nothing); ``commit_index``        |
| PreVoteReply    | ``reject``; ``hint`` = the voter's promise                                 |
| Prepare         | phase 1a for all slots above ``commit_index`` at ``ballot``                |
| Promise         | phase 1b: ``records`` = accepted entries above the candidate's commit index, |
|                 | ``commit_index`` = the promiser's; ``reject`` + ``hint`` = higher promise   |
| Accept          | phase 2a: ``records`` at ``ballot`` (or already chosen ones at slots        |
|                 | <= ``commit_index``), the leader's ``commit_index``                        |
| Accepted        | phase 2b: ``match_index`` = every slot up to it is accepted at ``ballot``   |
|                 | or known chosen; ``commit_index``; ``reject`` + ``hint`` = higher promise   |
| Heartbeat       | leader liveness + ``commit_index`` + read confirmation round ``context``   |
| HeartbeatReply  | as Accepted, echoing ``context``                                           |
| Snapshot        | a chunk: ``snapshot_index``, ``offset``, ``data``, ``done``, ``size``       |
| ReadIndex       | a follower asks the leader of ``ballot`` for a read index; ``context`` =    |
|                 | the follower's request number (a batch of its reads)                       |
| ReadIndexReply  | ``commit_index`` = the read index, confirmed by a quorum round at         |
|                 | ``ballot``; ``context`` echoed; ``reject`` = not the leader of ``ballot``    |
| SnapshotAck     | the receiver holds ``offset`` bytes of the transfer of ``snapshot_index`` |
|                 | (``size``) from the addressee: the sender slides its window of chunks     |
| Recover         | a node that restarted with no Paxos state asks for a report; ``ballot`` = |
|                 | a fence (0: none) the addressee raises its promise to first;              |
|                 | ``context`` = the asker's nonce; ``commit_index`` = a slot the asker      |
|                 | waits to see committed (-1: none; a leader fills slots up to it)          |
| RecoverReply    | ``hint`` = the reporter's promise (after the fence), ``match_index`` = the |
|                 | highest slot it holds anything at (accepted, chosen or snapshotted),      |
|                 | ``commit_index``; ``context`` echoed                                      |

Prepare and Promise carry ``context`` too: the candidate's nonce for this campaign,
echoed, so that a Promise answering a Prepare of an earlier incarnation (one that lost
its disk and may reuse a ballot number) is never counted.

Records are log records in the codec's form (``kvstore._native.encode_record``),
the same bytes that go to disk. ``to_wire``/``from_wire`` give a msgpack-able
form; no pickle, ever.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

PRE_VOTE = "PreVote"
PRE_VOTE_REPLY = "PreVoteReply"
PREPARE = "Prepare"
PROMISE = "Promise"
ACCEPT = "Accept"
ACCEPTED = "Accepted"
HEARTBEAT = "Heartbeat"
HEARTBEAT_REPLY = "HeartbeatReply"
SNAPSHOT = "Snapshot"
READ_INDEX = "ReadIndex"
READ_INDEX_REPLY = "ReadIndexReply"
SNAPSHOT_ACK = "SnapshotAck"
RECOVER = "Recover"
RECOVER_REPLY = "RecoverReply"

MESSAGE_TYPES = (PRE_VOTE, PRE_VOTE_REPLY, PREPARE, PROMISE, ACCEPT, ACCEPTED,
                 HEARTBEAT, HEARTBEAT_REPLY, SNAPSHOT, READ_INDEX, READ_INDEX_REPLY,
                 SNAPSHOT_ACK, RECOVER, RECOVER_REPLY)
_TYPE_CODE = {t: i for i, t in enumerate(MESSAGE_TYPES)}


@dataclass(frozen=True)
class Message:
    type: str
    to: int
    frm: int
    ballot: int = 0
    commit_index: int = -1
    match_index: int = -1
    records: tuple = ()
    reject: bool = False
    hint: int = 0
    context: int = 0
    snapshot_index: int = -1
    offset: int = 0
    size: int = 0
    data: bytes = b""
    done: bool = False

    def __str__(self) -> str:
        parts = [f"{self.type} {self.frm}->{self.to} b={self.ballot >> 16}.{self.ballot & 0xFFFF}"]
        for f in fields(self)[4:]:
            v = getattr(self, f.name)
            if v != f.default:
                if f.name == "records":
                    v = len(v)
                elif f.name == "data":
                    v = f"{len(v)}B"
                parts.append(f"{f.name}={v}")
        return " ".join(parts)


_FIELDS = [f.name for f in fields(Message)]


def to_wire(m: Message) -> list:
    """A msgpack-able list: [type code, to, frm, ballot, ...] in field order."""
    out = [getattr(m, name) for name in _FIELDS]
    out[0] = _TYPE_CODE[m.type]
    out[6] = list(m.records)
    return out


def from_wire(w: list) -> Message:
    """Inverse of ``to_wire``; validates the shape (it comes off the network)."""
    if not isinstance(w, (list, tuple)) or len(w) != len(_FIELDS):
        raise ValueError("malformed paxos message")
    code = w[0]
    if not isinstance(code, int) or not (0 <= code < len(MESSAGE_TYPES)):
        raise ValueError(f"unknown paxos message type {code!r}")
    vals = list(w)
    vals[0] = MESSAGE_TYPES[code]
    for i in (1, 2, 3, 4, 5, 8, 9, 10, 11, 12):
        if not isinstance(vals[i], int) or isinstance(vals[i], bool):
            raise ValueError(f"paxos message field {_FIELDS[i]} must be an int")
    recs = vals[6]
    if not isinstance(recs, (list, tuple)) or not all(isinstance(r, bytes) for r in recs):
        raise ValueError("paxos message records must be a list of bytes")
    vals[6] = tuple(recs)
    if not isinstance(vals[7], bool) or not isinstance(vals[14], bool):
        raise ValueError("paxos message flags must be bools")
    if not isinstance(vals[13], bytes):
        raise ValueError("paxos message data must be bytes")
    return Message(*vals)
