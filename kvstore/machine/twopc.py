"""Two-phase commit as a shard's replicated state: the pure core over a shard's LMDB tables.

A cross-shard transaction's steps are log entries of the shards it touches
(``kvstore.txn.records``), carried as client commands (``kvstore.commands.TwoPC``): a
client's TxnPrepare, bounded by ``bound_client_2pc`` where it enters a node,
and the TxnDecision and TxnResolve entries that only nodes write (a client asks
for a decision with ``check_decide``'s request; ``kvstore.node.loop``). Every
replica applies them through the same pure code as the simulator
(``ParticipantState``, ``DecisionTable``); only their tables differ: here they
live in the shard's ``txn`` table, in the same write transaction as the data
and the applied point (safety rule 4), under keys of their own::

    TXN_PREPARED + txn id  -> the TxnPrepare (kvstore.txn.records.encode)
    TXN_LOCK + key         -> 1 byte (1: the holder writes the key) + holder's txn id
    TXN_FINISHED + txn id  -> outcome carried out here (1 byte)
    TXN_DECIDED + txn id   -> outcome recorded here as coordinator shard (1 byte)
    TXN_PARTS + txn id     -> a finished transaction's participants (msgpack), where known
    TXN_ONE_ROUND          -> present once a one-round TxnPrepare was applied here

Locks are no-wait (the rule is in ``kvstore.txn.participant``): a prepare or a
single-shard write that meets another transaction's lock loses at once. A plain
``put``/``delete``/``cas`` that meets one is answered ``LOCKED`` and applies
nothing; its client retries it as a new write after a short backoff (the lock
lives until the decision is carried out, at most about a transaction's
deadline). Reads of a key another transaction has prepared to write are
answered "retry" by the node until the decision is carried out: the value
there may be about to change, and returning the old one after the decision
was recorded would not be linearizable.

A committed transaction's outcomes are forgotten once the COMMIT is carried
out on every participant (a ``TxnForget`` the node writes once it heard every
resolve applied, ``kvstore.node.resolver``): what could still ask about the
transaction then is answered right without them; an aborted one's are kept
(``kvstore.txn.participant``, "Forgetting"). Nodes of an earlier version refuse
a ``TxnForget``, so a shard is sent one only once it applied a one-round
prepare (``one_round_seen``: the new feature is in use, which needs every node
upgraded; docs/operations.md, "Upgrade").
"""

from __future__ import annotations

from dataclasses import replace

import msgpack

from kvstore.commands import TwoPC, two_pc
from kvstore.machine.data import apply_writes, read_value, revision_of
from kvstore.txn import (LOCK_ONLY, OUTCOMES, TXN_ID_BYTES, DecisionTable, ParticipantState, TxnDecision,
                         TxnFence, TxnForget, TxnPrepare, TxnResolve)
from kvstore.txn import decode as decode_entry
from kvstore.txn import encode as encode_entry

TXN_PREPARED = b"\x00txn.prepared\x00"
TXN_LOCK = b"\x00txn.lock\x00"
TXN_FINISHED = b"\x00txn.finished\x00"
TXN_DECIDED = b"\x00txn.decided\x00"
TXN_PARTS = b"\x00txn.parts\x00"
TXN_ONE_ROUND = b"\x00txn.one-round\x00"
#: The longest a client's prepared record may hold its locks, in the node's wall-clock
#: milliseconds: the node that takes a client's TxnPrepare cuts its deadline to at
#: most this far past its own clock (``bound_client_2pc``). A lock of a client that
#: went away is then settled by the shard leader's resolver within about this much
#: (plus the clock skew between the two nodes), whatever the client asked for.
TXN_DEADLINE_MAX_MS = 5000


class _TableMap:
    """The few dict operations the 2PC core uses, over one key prefix of an LMDB table."""

    def __init__(self, txn, db, prefix: bytes, encode, decode) -> None:
        self.txn, self.db, self.prefix = txn, db, prefix
        self.encode, self.decode = encode, decode

    def get(self, key: bytes, default=None):
        raw = self.txn.get(self.prefix + key, db=self.db)
        return default if raw is None else self.decode(bytes(raw))

    def __contains__(self, key: bytes) -> bool:
        return self.txn.get(self.prefix + key, db=self.db) is not None

    def __setitem__(self, key: bytes, value) -> None:
        self.txn.put(self.prefix + key, self.encode(value), db=self.db)

    def __delitem__(self, key: bytes) -> None:
        self.txn.delete(self.prefix + key, db=self.db)

    def pop(self, key: bytes, default=None):
        value = self.get(key, default)
        self.txn.delete(self.prefix + key, db=self.db)
        return value

    def setdefault(self, key: bytes, value):
        found = self.get(key)
        if found is None:
            self[key] = value
            return value
        return found

    def values(self) -> list:
        return [self.decode(bytes(v)) for _k, v in _prefixed(self.txn, self.db, self.prefix)]


def _prefixed(txn, db, prefix: bytes, start: bytes = b""):
    """``(key without prefix, value)`` of every row under ``prefix``, from ``prefix + start``."""
    cursor = txn.cursor(db)
    try:
        if not cursor.set_range(prefix + start):
            return
        for key, value in cursor.iternext():
            key = bytes(key)
            if not key.startswith(prefix):
                return
            yield key[len(prefix):], value
    finally:
        cursor.close()


def _encode_outcome(outcome: int) -> bytes:
    return bytes((outcome,))


def _decode_outcome(raw: bytes) -> int:
    return raw[0]


class _Locks(_TableMap):
    """key -> holder's txn id; the stored value also says whether the holder writes the key
    (set by ``ParticipantState`` as reads then writes, so a write overrides a read)."""

    def __init__(self, txn, db, writes: frozenset = frozenset()) -> None:
        super().__init__(txn, db, TXN_LOCK, None, lambda raw: raw[1:])
        self.writes = writes

    def __setitem__(self, key: bytes, txn_id: bytes) -> None:
        self.txn.put(TXN_LOCK + key, (b"\x01" if key in self.writes else b"\x00") + txn_id, db=self.db)


class _ShardData:
    """``kvstore.txn.Store`` over a shard's data table, writing at one revision."""

    def __init__(self, txn, db, revision: int, changes: list | None = None) -> None:
        self.txn, self.db, self.revision_now = txn, db, revision
        self.changes = changes

    def revision(self, key: bytes) -> int:
        return revision_of(self.txn.get(key, db=self.db))

    def write(self, key: bytes, value: bytes | None) -> None:
        apply_writes(self.txn, self.db, self.revision_now, ((key, value),), self.changes)


def _encode_parts(participants) -> bytes:
    return msgpack.packb(list(participants))


def _decode_parts(raw: bytes):
    parts = msgpack.unpackb(raw)
    return tuple(parts) if isinstance(parts, list) and all(type(p) is int for p in parts) else None


def participant(txn, tables, writes=()) -> ParticipantState:
    """The shard's ``ParticipantState`` on its txn table, inside ``txn``."""
    db = tables.txns
    return ParticipantState(
        prepared=_TableMap(txn, db, TXN_PREPARED, encode_entry, decode_entry),
        locks=_Locks(txn, db, frozenset(writes)),
        finished=_TableMap(txn, db, TXN_FINISHED, _encode_outcome, _decode_outcome),
        parts=_TableMap(txn, db, TXN_PARTS, _encode_parts, _decode_parts))


def one_round_seen(txn, tables) -> bool:
    """Whether this shard applied a one-round TxnPrepare: TxnForget may be written to it."""
    return txn.get(TXN_ONE_ROUND, db=tables.txns) is not None


def apply_2pc(txn, tables, revision: int, entry, changes: list | None = None):
    """Apply one (decoded) 2PC entry at ``revision``: TxnPrepare -> vote (bool; with
    locking reads ``[vote, [[key, value, revision], ...]]``), TxnDecision -> the recorded
    outcome (int), TxnResolve -> whether it changed anything (bool), TxnFence -> whether
    the shard holds the transaction's one-round yes vote (bool), TxnForget -> True. ``changes``: the
    data changes (a resolve's writes) reported as ``kvstore.machine.data.apply_writes``."""
    store = _ShardData(txn, tables.data, revision, changes)
    if isinstance(entry, TxnPrepare):
        if entry.one_round and not one_round_seen(txn, tables):
            txn.put(TXN_ONE_ROUND, b"\x01", db=tables.txns)
        vote = participant(txn, tables, (k for k, _ in entry.writes)).apply_prepare(store, entry)
        locking = [key for key, revision in entry.reads if revision == LOCK_ONLY]
        if not locking:
            return vote
        # locking reads: the values as of this slot, held by the locks just taken
        return [vote, [[key, *read_value(key, txn.get(key, db=tables.data))] for key in locking]
                if vote else []]
    if isinstance(entry, TxnDecision):
        return _decisions(txn, tables).apply_decision(entry.txn_id, entry.outcome)
    if isinstance(entry, TxnResolve):
        return participant(txn, tables).apply_resolve(store, entry)
    if isinstance(entry, TxnFence):
        return participant(txn, tables).apply_fence(entry.txn_id)
    if isinstance(entry, TxnForget):
        here, decisions = participant(txn, tables), _decisions(txn, tables)
        for txn_id in entry.txn_ids:
            here.forget(txn_id)
            if entry.decisions:
                decisions.forget(txn_id)
        return True
    raise ValueError(f"not a 2PC entry: {entry!r}")


def _decisions(txn, tables) -> DecisionTable:
    return DecisionTable(_TableMap(txn, tables.txns, TXN_DECIDED, _encode_outcome, _decode_outcome))


def finished_outcomes(txn, tables, limit: int) -> list:
    """Up to ``limit`` outcomes this shard carried out and still keeps:
    ``[(txn_id, outcome, participants or None)]`` (what a sweep finds lingering)."""
    state = participant(txn, tables)
    out = []
    for txn_id, raw in _prefixed(txn, tables.txns, TXN_FINISHED):
        if len(out) >= limit:
            break
        out.append((txn_id, _decode_outcome(bytes(raw)), state.parts.get(txn_id)))
    return out


def txn_records(txn, tables) -> dict:
    """How many outcomes the shard remembers, and transactions it holds prepared:
    ``{"finished": {COMMIT: n, ABORT: n}, "decided": {...}, "prepared": n}``."""
    counts = {}
    for name, prefix in (("finished", TXN_FINISHED), ("decided", TXN_DECIDED)):
        by_outcome = {outcome: 0 for outcome in OUTCOMES}
        for _txn_id, raw in _prefixed(txn, tables.txns, prefix):
            outcome = _decode_outcome(bytes(raw))
            by_outcome[outcome] = by_outcome.get(outcome, 0) + 1
        counts[name] = by_outcome
    counts["prepared"] = sum(1 for _ in _prefixed(txn, tables.txns, TXN_PREPARED))
    return counts


def bound_client_2pc(command: TwoPC, shard: int, nshards: int, now_ms: int,
                     internal: bool = False) -> TwoPC:
    """The 2PC command a client asks ``shard`` to log, as the node proposes it; ValueError
    (the client's InvalidArgument) if the entry is refused. Nothing is changed then.
    ``internal``: the node's own write (or a peer's): its decisions and resolves pass.

    A client may send only a TxnPrepare (read-only, locking or writing; one-round
    only if it writes and locks no read): decisions, resolves and fences are
    node-internal (``kvstore.node.loop``: the decide request, the
    resolver). Its id must be ``TXN_ID_BYTES`` long; its participants this cluster's
    shards, sorted, once each, with ``shard`` and its coordinator among them (so the
    resolver can always reach the coordinator shard); its reads' revisions >= 0 or
    ``LOCK_ONLY``. Its deadline, in the client's clock, is cut to ``now_ms +
    TXN_DEADLINE_MAX_MS`` in this node's: the resolvers compare it with the leader's
    wall clock, so no client can hold a lock past that (a shorter one is kept)."""
    entry = command.entry
    if internal and not isinstance(entry, TxnPrepare):
        return command
    if not isinstance(entry, TxnPrepare):
        raise ValueError(f"a client may not send a {type(entry).__name__}: decisions and "
                         f"resolves are written by the nodes (ask for a decision with the "
                         f"'decide' request)")
    check_txn_id(entry.txn_id)
    participants = check_participants(entry.participants, nshards)
    if shard not in participants or entry.coordinator not in participants:
        raise ValueError(f"a TxnPrepare's participants {list(participants)} must include the "
                         f"shard it is sent to ({shard}) and its coordinator shard "
                         f"({entry.coordinator})")
    if type(entry.deadline) is not int or entry.deadline < 0:
        raise ValueError("a TxnPrepare's deadline is a wall-clock time in ms >= 0")
    if any(type(r) is not int or (r < 0 and r != LOCK_ONLY) for _k, r in entry.reads):
        raise ValueError(f"a read's revision is >= 0 (0: absent) or {LOCK_ONLY} (lock only)")
    if entry.one_round and (entry.read_only or any(r == LOCK_ONLY for _k, r in entry.reads)):
        raise ValueError("a one-round TxnPrepare neither is read-only nor locks reads (its yes "
                         "votes commit the transaction: a locking read's would commit nothing)")
    deadline = min(entry.deadline, now_ms + TXN_DEADLINE_MAX_MS)
    if deadline == entry.deadline:
        return command
    return two_pc(replace(entry, deadline=deadline))


def check_txn_id(txn_id) -> bytes:
    if type(txn_id) is not bytes or len(txn_id) != TXN_ID_BYTES:
        raise ValueError(f"a transaction id is {TXN_ID_BYTES} random bytes")
    return txn_id


def check_participants(participants, nshards: int) -> tuple:
    """``participants`` as a tuple if they are shards of this cluster, sorted, once each."""
    shards = tuple(participants) if isinstance(participants, (list, tuple)) else None
    if (not shards or any(type(s) is not int for s in shards)
            or list(shards) != sorted(set(shards)) or shards[0] < 0 or shards[-1] >= nshards):
        raise ValueError(f"participants must be this cluster's shards (0..{nshards - 1}), "
                         f"sorted, each once; got {participants!r}"[:200])
    return shards


def check_decide(args, nshards: int) -> tuple:
    """A client's decide request ``[shard, txn_id, outcome, participants(, implied)]``,
    checked: ``(shard, TxnDecision, participants, implied)``; ValueError if malformed.
    ``implied`` (True, or absent: False): a one-round transaction's outcome, fixed by
    the votes its client heard, so the node carries it out as it records it
    (``kvstore.node.resolver``)."""
    if type(args) is not list or len(args) not in (4, 5):
        raise ValueError("decide takes [shard, txn_id, outcome, participants(, implied)]")
    if len(args) == 5 and args[4] is not True:
        raise ValueError("a decide request's fifth field (implied by the votes) is true or absent")
    shard, txn_id, outcome, participants = args[:4]
    participants = check_participants(participants, nshards)
    if type(shard) is not int or shard not in participants:
        raise ValueError(f"the coordinator shard {shard!r} must be one of the participants")
    if type(outcome) is not int or outcome not in OUTCOMES:
        raise ValueError(f"a decision's outcome is one of {OUTCOMES}")
    return shard, TxnDecision(check_txn_id(txn_id), outcome), participants, len(args) == 5


def any_locked(txn, tables, keys) -> bool:
    """True if a prepared transaction holds a lock on any of ``keys`` (read or write)."""
    get, db = txn.get, tables.txns
    return any(get(TXN_LOCK + key, db=db) is not None for key in keys)


def key_write_locked(txn, tables, key: bytes) -> bool:
    """True if a prepared transaction is to write ``key``: a read of it must wait for
    the transaction's decision to be carried out."""
    raw = txn.get(TXN_LOCK + key, db=tables.txns)
    return raw is not None and bytes(raw[:1]) == b"\x01"


def range_write_locked(txn, tables, lo: bytes, hi: bytes | None) -> bool:
    """True if a prepared transaction is to write a key in ``[lo, hi)`` (``hi`` None:
    unbounded): a scan of it must wait, as a read of the key would."""
    for key, value in _prefixed(txn, tables.txns, TXN_LOCK, lo):
        if hi is not None and key >= hi:
            return False
        if bytes(value[:1]) == b"\x01":
            return True
    return False


def expired_prepares(txn, tables, now_ms: int) -> list:
    """Prepared transactions whose deadline (wall-clock ms) has passed."""
    return participant(txn, tables).expired(now_ms)
