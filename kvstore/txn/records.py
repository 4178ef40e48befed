"""The two-phase-commit log entries and their encoding.

Every step of a cross-shard transaction that must survive a crash is an entry in
some shard's Paxos log, applied by every replica of that shard alike:

- ``TxnPrepare`` (participant shard): validate what the transaction read, lock
  what it read and wrote, remember its writes; applying it yields the shard's
  ``TxnVote`` (yes: prepared; no: conflict, nothing held). A read-only prepare
  only validates, and holds nothing.
- ``TxnDecision`` (coordinator shard): propose an outcome; applying it yields
  the outcome recorded for the transaction, which is the first one proposed:
  written once, never changed (DESIGN.md rule 7).
- ``TxnResolve`` (participant shard): carry out a recorded decision: apply the
  writes on commit, and release the locks either way.
- ``TxnFence`` (participant shard): a recovery of a one-round transaction
  (``kvstore.txn.coordinator``) makes sure no yes vote of it can be chosen
  there any more: applying it yields whether the shard holds the
  transaction's one-round yes prepare (or carried out its COMMIT); if it holds
  nothing, the transaction is finished there as ABORT, so a later copy of its
  prepare votes no.
- ``TxnForget`` (any shard, node-internal): forget the COMMIT outcomes of
  transactions committed on every participant (and, for one-round ones, the
  recorded COMMIT), so that these records do not grow with every transaction
  (``kvstore.txn.participant``, "Forgetting").

A one-round prepare (``one_round``: the transaction is committed as soon as
every participant holds its yes vote) is encoded with a ninth field; a
two-round one keeps the eight of the earlier versions, so nodes of an earlier
version read it. They refuse a one-round prepare and a TxnFence as an
unknown entry (docs/operations.md, "Upgrade").

Words are 2PC's only (TxnPrepare, TxnVote, TxnDecision), never Paxos's Prepare,
Promise, Accept. Encoded as msgpack lists with a tag; never pickle.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack

COMMIT = 1
ABORT = 2
OUTCOMES = (COMMIT, ABORT)
#: A cluster transaction's id is this many random bytes: nobody can name (and so ask
#: to decide) another client's transaction.
TXN_ID_BYTES = 16

_TAG_PREPARE = "TxnPrepare"
_TAG_DECISION = "TxnDecision"
_TAG_RESOLVE = "TxnResolve"
_TAG_FENCE = "TxnFence"
_TAG_FORGET = "TxnForget"
#: A TxnForget names at most this many transactions (one entry per shard and flush).
FORGET_MAX_IDS = 1024


@dataclass(frozen=True)
class TxnPrepare:
    txn_id: bytes
    coordinator: int  # the shard whose log holds the decision
    participants: tuple  # every shard the transaction touches, coordinator included
    reads: tuple  # ((key, revision seen), ...); 0 = read as absent, -1 = lock only
    writes: tuple  # ((key, value or None), ...); None deletes
    deadline: int  # after this (the driver's clock), anyone may ask the coordinator shard
    read_only: bool = False
    # committed once every participant holds its yes vote; the decision is recorded
    # after the client is answered (kvstore.txn.coordinator, "One round")
    one_round: bool = False


@dataclass(frozen=True)
class TxnDecision:
    txn_id: bytes
    outcome: int  # COMMIT or ABORT, as proposed; the recorded one may differ (first wins)


@dataclass(frozen=True)
class TxnResolve:
    txn_id: bytes
    outcome: int  # the recorded decision


@dataclass(frozen=True)
class TxnFence:
    txn_id: bytes  # of a one-round transaction being recovered: no yes vote of it after this


@dataclass(frozen=True)
class TxnForget:
    txn_ids: tuple  # transactions committed on every participant: their COMMITs go
    decisions: bool = True  # the recorded COMMIT too (one-round transactions)


def encode(entry) -> bytes:
    if isinstance(entry, TxnPrepare):
        body = [_TAG_PREPARE, entry.txn_id, entry.coordinator, list(entry.participants),
                [list(r) for r in entry.reads], [list(w) for w in entry.writes], entry.deadline,
                entry.read_only]
        if entry.one_round:
            body.append(True)
    elif isinstance(entry, TxnFence):
        body = [_TAG_FENCE, entry.txn_id]
    elif isinstance(entry, TxnForget):
        body = [_TAG_FORGET, list(entry.txn_ids), entry.decisions]
    elif isinstance(entry, (TxnDecision, TxnResolve)):
        tag = _TAG_DECISION if isinstance(entry, TxnDecision) else _TAG_RESOLVE
        body = [tag, entry.txn_id, entry.outcome]
    else:
        raise TypeError(f"not a 2PC entry: {entry!r}")
    return msgpack.packb(body, use_bin_type=True)


def _pairs(items, second_types) -> tuple:
    out = []
    for item in items:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], bytes)
                and isinstance(item[1], second_types)):
            raise ValueError("malformed key pair in a 2PC entry")
        out.append((item[0], item[1]))
    return tuple(out)


def decode(data: bytes):
    """Inverse of ``encode``; anything else is a ValueError (it comes off disk or the wire)."""
    try:
        body = msgpack.unpackb(data, raw=False)
    except Exception as e:  # msgpack raises several unrelated classes
        raise ValueError(f"undecodable 2PC entry: {e}") from e
    if isinstance(body, list) and len(body) == 3 and body[0] == _TAG_FORGET:
        ids, decisions = body[1], body[2]
        if not (isinstance(ids, list) and 0 < len(ids) <= FORGET_MAX_IDS and type(decisions) is bool
                and all(isinstance(t, bytes) and 0 < len(t) <= 64 for t in ids)):
            raise ValueError("malformed TxnForget")
        return TxnForget(tuple(ids), decisions)
    if not isinstance(body, list) or not body or not isinstance(body[1] if len(body) > 1 else None, bytes):
        raise ValueError("malformed 2PC entry")
    tag = body[0]
    if tag == _TAG_PREPARE and len(body) in (8, 9):
        _, txn_id, coordinator, participants, reads, writes, deadline, read_only = body[:8]
        one_round = body[8] if len(body) == 9 else False
        if not (isinstance(coordinator, int) and isinstance(participants, list)
                and all(isinstance(p, int) for p in participants) and isinstance(deadline, int)
                and isinstance(read_only, bool)
                and (len(body) == 8 or one_round is True)):
            raise ValueError("malformed TxnPrepare")
        return TxnPrepare(txn_id, coordinator, tuple(participants), _pairs(reads, int),
                          _pairs(writes, (bytes, type(None))), deadline, read_only, one_round)
    if tag == _TAG_FENCE and len(body) == 2:
        return TxnFence(body[1])
    if tag in (_TAG_DECISION, _TAG_RESOLVE) and len(body) == 3 and body[2] in OUTCOMES:
        cls = TxnDecision if tag == _TAG_DECISION else TxnResolve
        return cls(body[1], body[2])
    raise ValueError(f"unknown 2PC entry {tag!r}")
