"""Paxos messages between the replicas of one shard.

One plain dataclass for every type (as etcd's ``raftpb.Message``); each type uses
the fields listed below and leaves the others at their defaults. Words are Paxos
words only (Prepare, Promise, Accept, Accepted), never shared with two-phase commit.

| type            | meaning and fields used                                                   |
| --------------- | ------------------------------------------------------------------------- |
| PreVote         | "would you promise ``ballot``?" (changes nothing); ``commit_index``        |
| PreVoteReply    | ``reject``; ``hint`` = the voter's promise; ``commit_index`` = the voter's  |
| Prepare         | phase 1a for all slots above ``commit_index`` at ``ballot``                |
| Promise         | phase 1b: ``records`` = accepted entries above the candidate's commit index, |
|                 | ``commit_index`` = the promiser's (a refusal's too); ``reject`` + ``hint`` |
|                 | = higher promise                                                           |
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
|                 | waits to see committed (-1: none; a leader fills slots up to it);         |
|                 | ``match_index`` = the asker's commit point (what it has learned)          |
| RecoverReply    | ``hint`` = the reporter's promise (after the fence), ``match_index`` = the |
|                 | highest slot it holds anything at (accepted, chosen or snapshotted),      |
|                 | ``commit_index``; ``context`` echoed                                      |
| Chosen          | ``records`` = chosen values the addressee lacks (slots right above the    |
|                 | commit point it told, through the first membership change among them),   |
|                 | ``commit_index`` = the sender's; ``ballot`` = the sender's promise. Sent  |
|                 | by any member to one behind: a recovering node, or one of an earlier      |
|                 | epoch; never a vote, never a promise. Where the sender compacted those    |
|                 | slots: no records, ``snapshot_index`` = its snapshot's, and the transfer  |
|                 | follows (the addressee lets in that sender's Snapshot chunks)             |

Prepare and Promise carry ``context`` too: the candidate's nonce for this campaign,
echoed, so that a Promise answering a Prepare of an earlier incarnation (one that lost
its disk and may reuse a ballot number) is never counted.

Records are log records in the codec's form (``kvstore._native.encode_record``),
the same bytes that go to disk. ``to_wire``/``from_wire`` give a msgpack-able
form; no pickle, ever.

``from_wire`` takes its input from the network, so it checks every field's range,
not only its type: node indexes under ``NODES_MAX``, ballots and hints at most
``BALLOT_MAX`` (so a candidate's ``round + 1`` always fits the wire: ``ballot.py``),
slots and commit points in ``-1..SLOT_MAX``, counts and snapshot chunks within their
limits, records and data only on the types that carry them, and the ballot of a
proposer's message (Prepare, Accept, Heartbeat, PreVote, a ReadIndexReply's answer)
naming its sender. What needs the receiver's state (its node count, its promise, a
record's payload) is checked where that is known (``transport.wire``, the node, the
replica's guards).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from operator import attrgetter

from kvstore.paxos.ballot import BALLOT_MAX, ballot_node, ballot_round, format_ballot

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
CHOSEN = "Chosen"

MESSAGE_TYPES = (PRE_VOTE, PRE_VOTE_REPLY, PREPARE, PROMISE, ACCEPT, ACCEPTED,
                 HEARTBEAT, HEARTBEAT_REPLY, SNAPSHOT, READ_INDEX, READ_INDEX_REPLY,
                 SNAPSHOT_ACK, RECOVER, RECOVER_REPLY, CHOSEN)
_TYPE_CODE = {t: i for i, t in enumerate(MESSAGE_TYPES)}

#: Nodes in a group at most (``Replica`` refuses more; votes are 64-bit masks).
NODES_MAX = 64
#: The highest slot (and commit point) a message may name; a log record's header holds
#: 64 bits, and a log never gets near 2**62 entries.
SLOT_MAX = (1 << 62) - 1
#: A message's ``context`` (a read round or ReadIndex request number) is below this.
CONTEXT_LIMIT = 1 << 63
#: Log records one message carries at most (a Promise carries a follower's log above
#: the candidate's commit point; a frame's 64 MiB holds fewer records than this).
RECORDS_MAX = 1 << 20
#: A snapshot's size at most (a shard's whole state, sent in chunks).
SNAPSHOT_BYTES_MAX = 1 << 40
#: The types whose ballot is the sender's own (its node index is the sender).
_PROPOSER_TYPES = frozenset((PRE_VOTE, PREPARE, ACCEPT, HEARTBEAT))


@dataclass(frozen=True, init=False)
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

    def __init__(self, type: str, to: int, frm: int, ballot: int = 0, commit_index: int = -1,
                 match_index: int = -1, records: tuple = (), reject: bool = False, hint: int = 0,
                 context: int = 0, snapshot_index: int = -1, offset: int = 0, size: int = 0,
                 data: bytes = b"", done: bool = False) -> None:
        # The frozen dataclass's own __init__ sets each field through object.__setattr__
        # (2 us a message; one is made per send and per receive): the instance's dict is
        # filled at once instead, and the instance stays frozen for everyone else.
        # tests/test_paxos_core.py checks this signature against the fields.
        d = self.__dict__
        d["type"] = type
        d["to"] = to
        d["frm"] = frm
        d["ballot"] = ballot
        d["commit_index"] = commit_index
        d["match_index"] = match_index
        d["records"] = records
        d["reject"] = reject
        d["hint"] = hint
        d["context"] = context
        d["snapshot_index"] = snapshot_index
        d["offset"] = offset
        d["size"] = size
        d["data"] = data
        d["done"] = done

    def __str__(self) -> str:
        parts = [f"{self.type} {self.frm}->{self.to} b={format_ballot(self.ballot)}"]
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
_FIELD_VALUES = attrgetter(*_FIELDS)  # one C call for all fields: a message per send


def to_wire(m: Message) -> list:
    """A msgpack-able list: [type code, to, frm, ballot, ...] in field order."""
    out = list(_FIELD_VALUES(m))
    out[0] = _TYPE_CODE[m.type]
    out[6] = list(m.records)
    return out


def from_wire(w: list) -> Message:
    """Inverse of ``to_wire``; validates the shape and every field's range (it comes
    off the network). Raises ``ValueError`` naming the first bad field."""
    if not isinstance(w, (list, tuple)) or len(w) != len(_FIELDS):
        raise ValueError("malformed paxos message")
    code = w[0]
    if type(code) is not int or not (0 <= code < len(MESSAGE_TYPES)):
        raise ValueError(f"unknown paxos message type {code!r}"[:80])
    vals = list(w)
    vals[0] = MESSAGE_TYPES[code]
    for i in (1, 2, 3, 4, 5, 8, 9, 10, 11, 12):
        if type(vals[i]) is not int:
            raise ValueError(f"paxos message field {_FIELDS[i]} must be an int")
    recs = vals[6]
    if not isinstance(recs, (list, tuple)) or not all(type(r) is bytes for r in recs):
        raise ValueError("paxos message records must be a list of bytes")
    vals[6] = tuple(recs)
    if type(vals[7]) is not bool or type(vals[14]) is not bool:
        raise ValueError("paxos message flags must be bools")
    if type(vals[13]) is not bytes:
        raise ValueError("paxos message data must be bytes")
    m = Message(*vals)
    _check_ranges(m)
    return m


_RANGES = (("to", 0, NODES_MAX - 1), ("frm", 0, NODES_MAX - 1), ("ballot", 0, BALLOT_MAX),
           ("hint", 0, BALLOT_MAX), ("commit_index", -1, SLOT_MAX), ("match_index", -1, SLOT_MAX),
           ("snapshot_index", -1, SLOT_MAX), ("context", 0, CONTEXT_LIMIT - 1),
           ("size", 0, SNAPSHOT_BYTES_MAX))


def _check_ranges(m: Message) -> None:
    """Every field of ``m`` within what an honest replica can send (module docstring)."""
    if not (0 <= m.to < NODES_MAX and 0 <= m.frm < NODES_MAX and 0 <= m.ballot <= BALLOT_MAX
            and 0 <= m.hint <= BALLOT_MAX and -1 <= m.commit_index <= SLOT_MAX
            and -1 <= m.match_index <= SLOT_MAX and -1 <= m.snapshot_index <= SLOT_MAX
            and 0 <= m.context < CONTEXT_LIMIT and 0 <= m.offset <= m.size <= SNAPSHOT_BYTES_MAX):
        for name, lo, hi in _RANGES + (("offset", 0, m.size),):
            v = getattr(m, name)
            if not lo <= v <= hi:
                raise ValueError(f"paxos message field {name} = {v} is out of range {lo}..{hi}"[:120])
    if m.to == m.frm:
        raise ValueError("paxos message addressed to its own sender")
    t = m.type
    if m.records and t not in (ACCEPT, PROMISE, CHOSEN):
        raise ValueError(f"a {t} carries no records")
    if len(m.records) > RECORDS_MAX:
        raise ValueError(f"{len(m.records)} records in one message, over {RECORDS_MAX}")
    if t == SNAPSHOT:
        end = m.offset + len(m.data)
        if m.snapshot_index < 0 or end > m.size or m.done != (end == m.size):
            raise ValueError("snapshot chunk inconsistent with its index, offset and size")
    elif t == SNAPSHOT_ACK:  # how much of a transfer the addressee holds (offset <= size)
        if m.snapshot_index < 0 or m.data or m.done:
            raise ValueError("a snapshot acknowledgement names an index and carries no chunk")
    elif m.data or m.size or m.offset or m.done:
        raise ValueError(f"a {t} carries no snapshot chunk")
    if t in _PROPOSER_TYPES or (t == READ_INDEX_REPLY and not m.reject):
        if ballot_round(m.ballot) < 1 or ballot_node(m.ballot) != m.frm:
            raise ValueError(f"a {t}'s ballot {ballot_round(m.ballot)}.{ballot_node(m.ballot)} "
                             f"is not its sender's ({m.frm})")
