"""A shard's side of two-phase commit: prepared records, locks, decisions, as applied state.

Everything here runs while a shard applies its log, on every replica alike, so
it is deterministic and pure: the key-value data is reached only through a
small ``Store`` (revision of a key, write a key), which the simulator gives as a
dict and a node as its LMDB state.

Locking reads: a read whose revision is ``LOCK_ONLY`` is not validated, only
locked; the driver reads its value when the prepare is applied (the shard's
state at that slot), and the lock keeps it so until the transaction is
resolved. A transaction that lost its optimistic reads to writers several times
takes its reads this way, prepared in every shard at once: once every shard has
voted yes, every value read holds at one moment (all locks held), so it is
serializable without a revision check (see ``kvstore.client.txn``). If it writes,
it then prepares its writes under the same transaction id: that prepare adds
them to what the transaction holds (its locks are its own, so nothing another
transaction did since can fail it but a lock on a key it did not lock), and it
ends like any other, by its decision.

A read-only prepare ignores another transaction's lock on a key that
transaction only reads (its value does not change); a lock of a writer fails it.

Conflicts (the rule, written down): a TxnPrepare or a single-shard write that
meets a lock held by another transaction does not wait: the prepare votes no
(the transaction aborts, its client retries after a randomized backoff) and the
write reports a conflict. Nothing ever waits for a lock, so there is no
deadlock; a lock lives at most until its transaction's decision is resolved,
and a prepared record whose coordinator went quiet is resolved by anyone once
its deadline passes (``expired``), so no key stays locked for long: a hot key
is never starved by a dead holder, only contended by live ones.

Forgetting. A shard remembers each transaction's outcome (``finished``; and,
as coordinator shard, ``DecisionTable``) so that nothing can act on the
transaction again in a way that contradicts it. The outcomes of *committed*
transactions are forgotten (``forget``, a ``TxnForget`` entry) once the COMMIT
is carried out on every participant (the node that carried it out heard each
resolve applied; ``kvstore.node.resolver``). Nothing can need them then:

- A committed transaction had every prepare of it applied (its client, or a
  recovery, saw every yes vote), so no prepare of it can be applied for the
  first time any more; a copy of one already applied is answered from the
  client's session (applied once per ``(client, seq)``).
- A participant that recovers late (its resolve not applied) still holds the
  prepare, and nothing is forgotten until it is resolved.
- A recovery starts only from a prepared record, which the forget waits for; a
  stale one still running may find no yes vote and record ABORT, which nothing
  acts on (every participant carried the COMMIT out; its resolves find nothing
  prepared).
- The coordinator shard's recorded COMMIT goes too for a one-round transaction
  (``TxnForget.decisions``): its client never reads the record (its votes are
  its answer), and a retried decide records the same implied COMMIT again. A
  two-round transaction's stays: its client, retrying a decide whose answer was
  lost, reads it, and a resolver's ABORT still in flight (sent before the last
  resolve was applied) could otherwise be recorded in its place.

ABORT outcomes are kept: a prepare of an aborted transaction may still be
applied for the first time (it was late) while its client waits for the votes;
the outcome kept (a fence's, a resolve's, a no vote's) makes it vote no. Were
it forgotten, that late yes could complete the client's votes and be taken for
a COMMIT. Bounding them needs an expiry the log itself can check (a prepare
valid only up to a slot of each participant), not a clock.

The node that carried a COMMIT out may crash before its forget: a COMMIT that
lingers is found by its shard leader's sweep. One whose participants are known
(``parts``: it was prepared here) is carried out everywhere again and then
forgotten, as above; one without was made again by a late duplicate resolve of
a transaction carried out and forgotten everywhere, and is forgotten on its
shard alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Protocol

from kvstore.txn.records import ABORT, COMMIT, TxnPrepare, TxnResolve


#: The revision of a locking read: lock the key, check nothing (see the module docstring).
LOCK_ONLY = -1


@dataclass(frozen=True)
class TxnBugs:
    """Planted 2PC bugs, for tests of the simulator only. All off by default."""

    decision_not_replicated: bool = False  # the coordinator resolves before its decision is applied
    apply_before_decision: bool = False  # a participant writes at prepare, not at the decision
    prepare_skips_read_validation: bool = False  # a prepare does not check what was read
    locks_released_at_vote: bool = False  # a prepared transaction holds no locks
    # a one-round transaction's recovery decides ABORT, as a two-round one's does, without
    # fencing the participants or looking at their votes (its client may have heard COMMIT)
    one_round_recovery_aborts: bool = False
    # a one-round recovery looks at the participants' votes without fencing them: a prepare
    # still in flight is taken for one that never happened, and chosen after the look
    one_round_recovery_unfenced: bool = False


class Store(Protocol):
    def revision(self, key: bytes) -> int: ...

    def write(self, key: bytes, value: bytes | None) -> None: ...


@dataclass
class ParticipantState:
    """Invariant: a key is in ``locks`` iff a transaction in ``prepared`` read or writes it."""

    prepared: dict = field(default_factory=dict)  # txn id -> TxnPrepare
    locks: dict = field(default_factory=dict)  # key -> txn id
    finished: dict = field(default_factory=dict)  # txn id -> COMMIT / ABORT, as carried out here
    bugs: TxnBugs = field(default_factory=TxnBugs)
    # txn id -> its participants, where a finished one's are known (it was prepared here, or
    # voted no): whoever finds its record lingering can carry it out everywhere and forget it
    parts: dict = field(default_factory=dict)

    def _finish(self, txn_id: bytes, outcome: int, participants=None) -> None:
        self.finished[txn_id] = outcome
        if participants is not None:
            self.parts[txn_id] = tuple(participants)

    def _valid(self, store: Store, txn_id: bytes, reads, writes, read_only: bool = False) -> bool:
        for key, _ in (*reads, *writes):
            holder = self.locks.get(key)
            if holder is not None and holder != txn_id:
                if read_only and not self._writes(holder, key):
                    continue  # a read lock: its holder leaves the value as it is
                return False
        if self.bugs.prepare_skips_read_validation:
            return True
        return all(revision == LOCK_ONLY or store.revision(key) == revision
                   for key, revision in reads)

    def apply_prepare(self, store: Store, p: TxnPrepare) -> bool:
        """Apply a TxnPrepare; its result is this shard's TxnVote (True: prepared, yes)."""
        done = self.finished.get(p.txn_id)
        if done is not None:  # a late copy: the transaction is over here
            return done == COMMIT
        held = self.prepared.get(p.txn_id)
        if held is not None:
            if held.writes or not p.writes:
                return True  # a duplicate, or nothing to add to what it holds
            # a locking read's transaction now prepares its writes: keep what it locked
            if not self._valid(store, p.txn_id, p.reads, p.writes):
                return False  # it keeps its locks until its decision (ABORT) is carried out
            seen = {key for key, _ in p.reads}
            p = replace(p, reads=p.reads + tuple(r for r in held.reads if r[0] not in seen))
        elif not self._valid(store, p.txn_id, p.reads, p.writes, p.read_only):
            if not p.read_only:
                self._finish(p.txn_id, ABORT, p.participants)  # a later copy must not prepare it
            return False
        if p.read_only:
            return True  # validated now, after all its reads: nothing to hold
        if self.bugs.apply_before_decision:
            for key, value in p.writes:
                store.write(key, value)
        self.prepared[p.txn_id] = p
        if not self.bugs.locks_released_at_vote:
            for key, _ in (*p.reads, *p.writes):
                self.locks[key] = p.txn_id
        return True

    def apply_fence(self, txn_id: bytes) -> bool:
        """Apply a TxnFence: True if this shard holds the transaction's one-round yes
        vote (or carried out its COMMIT). Otherwise the transaction is finished here as
        ABORT, unless it is already: a prepare of it applied later votes no, so from this
        slot on the answer can never change (``kvstore.txn.coordinator``, "Recovery")."""
        if self.bugs.one_round_recovery_unfenced:
            return self.peek_vote(txn_id)
        done = self.finished.get(txn_id)
        if done is not None:
            return done == COMMIT
        held = self.prepared.get(txn_id)
        if held is not None:
            return held.one_round  # a two-round transaction: its recovery may only abort
        self.finished[txn_id] = ABORT
        return False

    def forget(self, txn_id: bytes) -> None:
        """Apply a TxnForget: a COMMIT carried out here goes (the module docstring,
        "Forgetting"); an ABORT stays, and so does a prepared record."""
        if self.finished.get(txn_id) == COMMIT:
            del self.finished[txn_id]
            if txn_id in self.parts:
                del self.parts[txn_id]

    def peek_vote(self, txn_id: bytes) -> bool:
        """The planted bug's fence (``one_round_recovery_unfenced``): a look, no fence."""
        done = self.finished.get(txn_id)
        if done is not None:
            return done == COMMIT
        held = self.prepared.get(txn_id)
        return held is not None and held.one_round

    def _writes(self, holder: bytes, key: bytes) -> bool:
        p = self.prepared.get(holder)
        return p is None or any(k == key for k, _ in p.writes)

    def apply_resolve(self, store: Store, r: TxnResolve) -> bool:
        """Carry out a recorded decision; True if this call changed anything."""
        p = self.prepared.pop(r.txn_id, None)
        if p is None:
            # Never prepared here (its TxnPrepare lost, late, or voted no): remember the
            # outcome so that a late TxnPrepare cannot prepare it afterwards.
            self.finished.setdefault(r.txn_id, r.outcome)
            return False
        if r.outcome == COMMIT and not self.bugs.apply_before_decision:
            for key, value in p.writes:
                store.write(key, value)
        for key, _ in (*p.reads, *p.writes):
            if self.locks.get(key) == r.txn_id:
                del self.locks[key]
        self._finish(r.txn_id, r.outcome, p.participants)
        return True

    def apply_single(self, store: Store, reads, writes) -> bool:
        """A transaction inside this shard alone (one log entry): validate, then write."""
        if not self._valid(store, b"", reads, writes):
            return False
        for key, value in writes:
            store.write(key, value)
        return True

    def expired(self, now: int) -> list:
        """Prepared transactions past their deadline: anyone may ask their coordinator shard."""
        return [p for p in self.prepared.values() if p.deadline <= now]


@dataclass
class DecisionTable:
    """The coordinator shard's record of outcomes: the first TxnDecision applied wins."""

    decisions: dict = field(default_factory=dict)  # txn id -> COMMIT / ABORT

    def apply_decision(self, txn_id: bytes, outcome: int) -> int:
        """Record ``outcome`` unless one is recorded already; return the recorded one."""
        return self.decisions.setdefault(txn_id, outcome)

    def forget(self, txn_id: bytes) -> None:
        """Apply a TxnForget here: a recorded COMMIT goes (carried out everywhere); an
        ABORT stays (``ParticipantState``'s module docstring, "Forgetting")."""
        if self.decisions.get(txn_id) == COMMIT:
            del self.decisions[txn_id]
