"""The coordinator of one cross-shard transaction, as a pure state machine.

It never touches a socket or a clock: the driver (a client, or the simulator's
process) asks it what to propose (``proposals``), to which shard's log, and
feeds back what applying those entries yielded (``on_vote``, ``on_decision``).
Its state is volatile: if its process dies, the transaction is finished by
whoever finds a prepared record past its deadline (the shard's resolver),
through the same coordinator-shard decision.

Two consensus rounds before the client hears the outcome, in parallel across
shards: every participant's TxnPrepare, then the TxnDecision in the coordinator
shard's log. The outcome is the *recorded* decision (first writer wins), so a
resolver that already recorded ABORT for a slow coordinator wins over a later
COMMIT. A client only *asks* for the decision (a node's ``decide`` request,
naming the ``participants``): the coordinator shard's leader writes the
TxnDecision itself, answers the recorded outcome, and then writes the
TxnResolve entries on every participant, so no client ever writes a decision
or a resolve (``kvstore.node.loop``). A transaction's writes become visible to
other transactions when they are resolved, and until then its locks make every
conflicting reader or writer retry, so nothing observes the gap.

Why not one round (parallel commits): the decision would be implied by every
TxnPrepare being durable, so a recovering resolver must be able to tell a
prepare that never happened from one still in flight; that needs a staging
record and prepare fencing at every participant, which this core does not
argue in the simulator yet. Two rounds are what is proven here.

Read-only transactions: one round, a read-only TxnPrepare per shard that checks
(after all the reads) that nothing read has changed or is locked; all yes means
every value read held at one moment between the last read and the first
validation, so the reads are serializable. Nothing is decided or resolved.
"""

from __future__ import annotations

from kvstore.txn.records import ABORT, COMMIT, TxnDecision, TxnPrepare, TxnResolve

PREPARING = "preparing"
DECIDING = "deciding"
DONE = "done"


class Coordinator:
    """One transaction: ``parts`` maps each shard to its ``(reads, writes)``."""

    def __init__(self, txn_id: bytes, coordinator_shard: int, parts: dict, deadline: int,
                 decision_not_replicated: bool = False) -> None:
        if coordinator_shard not in parts:
            raise ValueError("the coordinator shard must be one of the participants")
        self.txn_id = txn_id
        self.coordinator_shard = coordinator_shard
        self.read_only = all(not writes for _, writes in parts.values())
        self.participants = participants = tuple(sorted(parts))
        self.prepares = {shard: TxnPrepare(txn_id, coordinator_shard, participants, tuple(reads),
                                           tuple(writes), deadline, self.read_only)
                         for shard, (reads, writes) in parts.items()}
        self.votes: dict = {}  # shard -> bool, the first answer heard from each
        self.state = PREPARING
        self.proposed_outcome: int | None = None
        self.outcome: int | None = None  # the recorded decision, once known
        self._planted_early_resolve = decision_not_replicated

    def proposals(self) -> list:
        """``[(shard, entry)]`` to propose now; call again on a timeout (every entry is idempotent)."""
        if self.state == PREPARING:
            return [(shard, p) for shard, p in self.prepares.items() if shard not in self.votes]
        if self.state == DECIDING:
            out = [(self.coordinator_shard, TxnDecision(self.txn_id, self.proposed_outcome))]
            if self._planted_early_resolve:  # planted bug: act on a decision not yet replicated
                out += [(shard, TxnResolve(self.txn_id, self.proposed_outcome))
                        for shard in self.participants]
            return out
        return []

    def on_vote(self, shard: int, vote: bool) -> list:
        """What applying our TxnPrepare at ``shard`` yielded; returns new proposals."""
        if self.state != PREPARING or shard not in self.prepares or shard in self.votes:
            return []
        self.votes[shard] = vote
        if vote and len(self.votes) < len(self.prepares):
            return []
        if self.read_only:
            self.outcome = COMMIT if all(self.votes.values()) and len(self.votes) == len(self.prepares) else ABORT
            self.state = DONE
            return []
        self.proposed_outcome = COMMIT if vote else ABORT
        self.state = DECIDING
        return self.proposals()

    def on_decision(self, outcome: int) -> None:
        """The outcome recorded in the coordinator shard's log (maybe not the one we
        proposed); the node that recorded it carries it out on every participant."""
        if self.state != DECIDING:
            return
        self.outcome = outcome
        self.state = DONE

    @property
    def decided(self) -> bool:
        """The client may be answered: the outcome is recorded (or, read-only, validated)."""
        return self.outcome is not None
