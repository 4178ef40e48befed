"""Cluster transactions: ``ClusterTxn`` and the plans that carry out its I/O.

A transaction inside one shard is one log entry whose reads are validated at
apply. One across shards runs two-phase commit (``two_phase_commit``; the
entries and their rules are in ``kvstore.txn`` and ``kvstore.machine.twopc``):
this client is its coordinator (it prepares, then asks the coordinator shard's
leader for the decision, which that node records and carries out), the shards'
logs hold every step, and a node's resolver finishes it if this client goes
away. What it read and will write is a ``kvstore.txnbuffer.TxnBuffer``, the
state every engine's transaction keeps.

A transaction's logic lives here once, as plans (generators of request
batches); the sync client drives them with ``run_plan``, the asyncio one
(``kvstore.client.aio``) on the event loop.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

from kvstore.commands import two_pc, txn
from kvstore.errors import InvalidArgument, KVError, TransactionConflict
from kvstore.keys import MAX_CLUSTER_TXN_SIZE, MAX_COMMAND_BYTES, check_key, check_value
from kvstore.transport import wire
from kvstore.txn import ABORT, COMMIT, LOCK_ONLY, TXN_ID_BYTES, Coordinator, TxnPrepare
from kvstore.txn.coordinator import DECIDING
from kvstore.txnbuffer import NOT_WRITTEN, BufferedTxn, TxnBuffer

if TYPE_CHECKING:
    from kvstore.client.core import ClientCore
    from kvstore.client.kv import ClusterKV

#: A cross-shard transaction's prepared records carry this deadline (wall clock): past
#: it, the shard leaders' resolvers ask the coordinator shard to settle it (ABORT unless
#: decided). Only liveness rests on clocks: a resolver that acts early costs an abort.
TXN_DEADLINE_SECONDS = 2.0
#: ``run_transaction`` takes the reads of a cross-shard transaction by locking them once
#: it has lost this many attempts to concurrent writers (optimistic reads over several
#: shards can lose to a steady stream of writers for ever; locked ones cannot be changed).
LOCKING_AFTER_CONFLICTS = 2


def _conflict() -> TransactionConflict:
    return TransactionConflict(
        "a concurrent transaction changed or holds what this transaction read or writes; "
        "nothing of it was applied (run_transaction retries automatically)")


class Detached(list):
    """A plan's batch sent without waiting for the answers (the plan is sent ``None``s)."""


def _step(shard: int, entry: TxnPrepare) -> tuple:
    """A TxnPrepare as one write of a plan's batch: a command of ``shard``'s log."""
    return wire.OP_WRITE, shard, two_pc(entry).wire()


def _decide(shard: int, txn_id: bytes, outcome: int, participants, implied: bool = False) -> tuple:
    """Ask the leader of ``shard`` (the coordinator shard) to record ``outcome`` for
    ``txn_id`` (first recorded wins) and carry it out on ``participants``: one request
    of a plan's batch, answered with the recorded outcome. The node writes the
    TxnDecision and the TxnResolve entries; a client never does. ``implied``: a
    one-round transaction's outcome, fixed by its votes: carried out as it is recorded."""
    args = [shard, txn_id, outcome, list(participants)]
    return wire.OP_DECIDE, shard, args + [True] if implied else args


def _deadline_ms() -> int:
    return int((time.time() + TXN_DEADLINE_SECONDS) * 1000)


def _answer(answer):
    if isinstance(answer, BaseException):
        raise answer
    return answer


# A *plan* is a generator that yields batches ``[(op, shard, payload)]`` to send at once
# and is sent back, in order, each request's result or the ``KVError`` it raised; what it
# returns is the outcome. One plan serves the sync client (``run_plan``) and the asyncio
# one (``kvstore.client.aio``): a transaction's logic lives once, its I/O twice.

def two_phase_commit(parts: dict, txn_id: bytes | None = None, coordinator_shard: int | None = None,
                     one_round: bool = False):
    """Plan: commit a transaction across shards (``parts``: shard -> ``(reads, writes)``).

    ``kvstore.txn.Coordinator`` says what to propose: every participant's
    TxnPrepare, then the decision, which the coordinator shard's leader records
    and carries out (``_decide``). It returns on commit and raises
    ``TransactionConflict`` on an abort; a failure before the decision is
    recorded is raised as it came (``Unavailable``: the outcome is unknown only
    if COMMIT was proposed). ``txn_id`` and ``coordinator_shard`` are a locking
    read's when its transaction writes: its prepares then add the writes to the
    locks it holds.

    ``one_round`` (parallel commits, ``kvstore.txn.coordinator``): the votes are the
    outcome, heard after one consensus round; the decision is asked for without
    waiting (its node records and carries it out; if the request is lost, the
    resolvers recover the transaction from its prepares after its deadline). A
    prepare that failed with no vote heard leaves the outcome unknown: its error
    is raised, and the resolvers settle it.
    """
    coordinator = Coordinator(txn_id or os.urandom(TXN_ID_BYTES),
                              min(parts) if coordinator_shard is None else coordinator_shard,
                              parts, _deadline_ms(), one_round=one_round)
    error = None
    prepares = coordinator.proposals()
    answers = yield [_step(shard, entry) for shard, entry in prepares]
    for (shard, _entry), answer in zip(prepares, answers):
        if isinstance(answer, BaseException):
            error = error or answer
            coordinator.on_vote_unknown(shard)  # two rounds: abort now; one: recovery's
        else:
            coordinator.on_vote(shard, bool(answer))
    if coordinator.one_round:
        if coordinator.decided:  # the implicit outcome: record it, not waiting
            (shard, entry), = coordinator.proposals()
            yield Detached([_decide(shard, entry.txn_id, entry.outcome, coordinator.participants,
                                    implied=True)])
            if coordinator.outcome == COMMIT:
                return
            raise _conflict()
        raise error
    if coordinator.state == DECIDING:
        (shard, entry), = coordinator.proposals()
        (answer,) = yield [_decide(shard, entry.txn_id, entry.outcome, coordinator.participants)]
        # The outcome is recorded, and the node resolves it everywhere (two rounds, not
        # three). Until a resolve is applied, reads and writes of the keys it frees wait
        # (LOCKED), so nobody sees the gap; a lost resolve is done by the resolvers.
        coordinator.on_decision(_answer(answer))
    if coordinator.outcome == COMMIT:
        return
    raise error or _conflict()


def locking_read(keys_by_shard: dict):
    """Plan: lock ``keys_by_shard`` (shard -> keys) in every shard at once and read them.

    One TxnPrepare of locking reads per shard (``kvstore.txn.LOCK_ONLY``), in
    parallel; each answers the values as of its slot. The values are one
    consistent cut only if every lock was still held when the last was taken:
    a read-only transaction confirms it by recording COMMIT in the coordinator
    shard (``ClusterTxn._confirm_locked_reads``), one that writes by its own
    two-phase commit under the same transaction id.
    Returns ``(txn_id, shards, {key: (value, revision)})``; if a shard says no
    (a writer holds a key) or fails, what was locked is released and the
    conflict or error raised."""
    txn_id = os.urandom(TXN_ID_BYTES)
    shards = tuple(sorted(keys_by_shard))
    deadline = _deadline_ms()
    batch = [_step(shard, TxnPrepare(txn_id, shards[0], shards,
                                     tuple((k, LOCK_ONLY) for k in sorted(keys_by_shard[shard])),
                                     (), deadline))
             for shard in shards]
    answers = yield batch
    values, failure = {}, None
    for answer in answers:
        if isinstance(answer, BaseException) or not answer[0]:
            failure = failure or (answer if isinstance(answer, BaseException) else _conflict())
            continue
        for key, value, revision in answer[1]:
            values[key] = (value, revision)
    if failure is not None:
        yield from release_locks(txn_id, shards)
        raise failure
    return txn_id, shards, values


def release_locks(txn_id: bytes, shards) -> None:
    """Plan: free a locking read's locks, without waiting: ABORT is recorded in its
    coordinator shard (``shards[0]``) and carried out on every shard by that shard's
    leader (if the request is lost, the resolvers do it after the deadline)."""
    yield Detached([_decide(shards[0], txn_id, ABORT, shards)])


def run_plan(core: "ClientCore", plan):
    """Drive ``plan`` on the sync client: each batch sent at once, answers awaited; on
    the direct path when the connection is idle (``kvstore.client.direct``: no
    hand-over to the I/O thread and back)."""
    try:
        batch = next(plan)
        while True:
            if len(batch) == 1 and not isinstance(batch, Detached):
                try:
                    answer = core.call(*batch[0])
                except KVError as e:
                    answer = e
                batch = plan.send([answer])
                continue
            if isinstance(batch, Detached):
                for op, shard, payload in batch:
                    core.submit(op, shard, payload)
                batch = plan.send([None] * len(batch))
                continue
            batch = plan.send(core.call_batch(batch))
    except StopIteration as done:
        return done.value


class ClusterTxn(BufferedTxn):
    """A transaction: linearizable reads that record revisions, buffered writes, and at
    commit either one log entry (OP_TXN, one shard: the replicas validate its reads when
    they apply it) or two-phase commit across the shards it touched
    (``two_phase_commit``). A changed read: ``TransactionConflict``, nothing applied.

    With ``lock_keys`` (``run_transaction``, after conflicts) its first read locks
    and reads all of those keys at once (``locking_read``); its reads are then
    that consistent cut, and a read of another key is a conflict whose retry
    locks it too. Each operation is a plan (``*_plan``); this class drives them
    on the sync client, ``kvstore.aio.AsyncTxn`` on the event loop."""

    def __init__(self, kv: ClusterKV, lock_keys=None) -> None:
        self._kv = kv
        self._shards: set = set()
        self._buffer = TxnBuffer(MAX_CLUSTER_TXN_SIZE, "MAX_CLUSTER_TXN_SIZE")
        self._state = "new"
        self._lock_keys = None if lock_keys is None else set(lock_keys)
        self._locked = None  # (txn id, shards, {key: (value, revision)}) while locks are held
        self.wanted: set = set()  # every key this transaction read (what to lock next time)

    def _run(self, plan):
        return run_plan(self._kv._core, plan)

    def _check(self) -> None:
        self._check_state()
        self._kv._core_check()

    def get(self, key):
        return self._run(self.get_plan(key))

    def get_plan(self, key):
        self._check()
        key = check_key(key)
        value = self._buffer.written(key)
        if value is not NOT_WRITTEN:
            return value
        shard = self._kv._shard(key)
        self._shards.add(shard)
        self.wanted.add(key)
        if self._lock_keys is not None:
            if self._locked is None:
                keys = self._lock_keys | {key}
                by_shard: dict = {}
                for k in keys:
                    by_shard.setdefault(self._kv._shard(k), []).append(k)
                self._shards.update(by_shard)
                try:
                    self._locked = yield from locking_read(by_shard)
                except KVError:
                    self._state = "discarded"  # nothing held: locking_read freed it
                    raise
            found = self._locked[2].get(key)
            if found is None:  # outside what it locked: its retry locks this key too
                self._state = "discarded"
                yield from self.release_plan()
                raise _conflict()
            value, revision = found
        else:
            (answer,) = yield [(wire.OP_GET, shard, [shard, key, True])]
            value, revision = _answer(answer)
        self._buffer.record_read(shard, key, revision)
        return value

    def put(self, key, value) -> None:
        self._check()
        key = check_key(key)
        self._buffer.put(key, check_value(value))  # InvalidArgument past the limit, nothing changed
        self._shards.add(self._kv._shard(key))

    def delete(self, key) -> bool:
        return self._run(self.delete_plan(key))

    def delete_plan(self, key):
        self._check()
        key = check_key(key)
        self._buffer.check_delete(key)  # past the limit: raise before reading anything
        existed = (yield from self.get_plan(key)) is not None
        self._buffer.delete(key)
        return existed

    def scan(self, prefix=b"", start=None, end=None, limit=None):
        return self._run(self.scan_plan(prefix, start, end, limit))

    def scan_plan(self, prefix=b"", start=None, end=None, limit=None):
        self._check()
        scan = self._buffer.scan(prefix, start, end, limit)
        if scan is None:
            return []
        if self._kv.nshards > 1:
            raise KVError(f"a scan inside a transaction reads every shard of this cluster "
                          f"({self._kv.nshards}), and cross-shard transactions validate keys, "
                          f"not ranges: read the keys with get(), or scan outside the "
                          f"transaction")
        self._shards.add(0)
        (answer,) = yield [(wire.OP_SCAN, 0, [0, scan.lo, scan.hi, scan.fetch, True])]
        scan.add(0, _answer(answer))
        return scan.result()

    def commit(self) -> None:
        self._run(self.commit_plan())

    def commit_plan(self):
        self._check()
        buffer = self._buffer
        size = buffer.entry_bytes()
        if size > MAX_COMMAND_BYTES - 64 * 1024:
            self._state = "discarded"
            yield from self.release_plan()
            raise InvalidArgument(
                f"this transaction's log entry would be about {size} bytes (its writes and "
                f"the keys it read or scanned); a cluster takes {MAX_COMMAND_BYTES} at most: "
                f"split it into smaller transactions")
        self._state = "committed"
        try:
            locked = self._locked
            if locked is not None and not buffer.writes:
                yield from self._confirm_locked_reads(locked)
                return
            if not self._shards:
                return
            if len(self._shards) == 1 and locked is None:
                (shard,) = self._shards
                command = txn(list(buffer.reads.get(shard, {}).items()),
                              buffer.ranges.get(shard, []), list(buffer.writes.items()))
                (ok,) = yield [(wire.OP_WRITE, shard, command)]
                if not _answer(ok):
                    raise _conflict()
                return
            parts = {shard: ([], []) for shard in self._shards}
            for shard, shard_reads in buffer.reads.items():
                parts[shard][0].extend(shard_reads.items())
            for key, value in buffer.writes.items():
                parts[self._kv._shard(key)][1].append((key, value))
            if locked is None:
                yield from two_phase_commit(parts, one_round=self._kv.one_round_commit)
            else:  # prepare its writes under the locks it holds: its reads cannot have moved
                self._locked = None
                yield from two_phase_commit(parts, locked[0], locked[1][0])
        except TransactionConflict:
            self._state = "discarded"
            raise

    def _confirm_locked_reads(self, locked):
        """Plan: trust a read-only locking read only once COMMIT is recorded for it in its
        coordinator shard. Every shard voting yes is not enough: a lock past its deadline
        may have been freed by its shard's resolver (which records ABORT first) before
        the last lock was taken, and a writer may have slipped in between (the bank
        simulator found it: ``--locking-audit-trusts-votes``). No resolver frees a lock
        before the decision is recorded, so a recorded COMMIT means every lock was still
        held then: the values were one cut at that moment."""
        self._locked = None
        txn_id, shards, _values = locked
        # the node that records it frees the locks everywhere (it wrote nothing)
        (answer,) = yield [_decide(shards[0], txn_id, COMMIT, shards)]
        if isinstance(answer, BaseException):  # unknown: the resolvers settle it
            raise answer
        if answer != COMMIT:
            raise _conflict()

    def release_plan(self):
        """Plan: free this transaction's locks of a locking read, if it holds any."""
        locked, self._locked = self._locked, None
        if locked is not None:
            yield from release_locks(locked[0], locked[1])

    def discard(self) -> None:
        try:
            self._run(self.discard_plan())
        except KVError:
            pass  # its resolvers free the locks after the deadline

    def discard_plan(self):
        """Plan: drop every write, and free the locks of a locking read if it holds any."""
        if self._state in ("new", "open"):
            self._state = "discarded"
        yield from self.release_plan()


def lock_keys_for(previous, attempt: int):
    """The keys ``run_transaction``'s next attempt locks at its first read, or None
    (optimistic): a cross-shard transaction that lost ``LOCKING_AFTER_CONFLICTS``
    times locks everything its attempts read or wrote so far."""
    if previous is None or attempt < LOCKING_AFTER_CONFLICTS or len(previous._shards) < 2:
        return None
    return previous.wanted | set(previous._buffer.writes) | (previous._lock_keys or set())
