"""The coordinator of one cross-shard transaction, as a pure state machine.

It never touches a socket or a clock: the driver (a client, or the simulator's
process) asks it what to propose (``proposals``), to which shard's log, and
feeds back what applying those entries yielded (``on_vote``, ``on_decision``).
Its state is volatile: if its process dies, the transaction is finished by
whoever finds a prepared record past its deadline (the shard's resolver),
through the same coordinator-shard decision.

Two rounds (``one_round=False``): every participant's TxnPrepare, then the
TxnDecision in the coordinator shard's log, both before the client hears the
outcome, in parallel across shards. The outcome is the *recorded* decision
(first writer wins), so a resolver that already recorded ABORT for a slow
coordinator wins over a later COMMIT. A client only *asks* for the decision (a
node's ``decide`` request, naming the ``participants``): the coordinator
shard's leader writes the TxnDecision itself, answers the recorded outcome, and
then writes the TxnResolve entries on every participant, so no client ever
writes a decision or a resolve (``kvstore.node.resolver``). A transaction's
writes become visible to other transactions when they are resolved, and until
then its locks make every conflicting reader or writer retry, so nothing
observes the gap.

One round (``one_round=True``, parallel commits): every TxnPrepare carries the
full participant list and the flag. The transaction is COMMITTED as soon as
every participant's yes vote is chosen in its shard's log (the *implicit*
outcome), and ABORTED as soon as one participant can never hold one (it voted
no: it is then finished as ABORT there, and any later copy of the prepare votes
no). The client is answered when it has heard every vote (commit) or one no
(abort); the TxnDecision and the resolves are written after the answer by the
coordinator shard's leader, in one round: the resolves carry out the implicit
outcome, so they need not wait for its record (the client's decide request
says so: "implied"). The recorded decision stays first writer wins, and the
argument is that whoever writes it, or carries an outcome out, writes the
implicit outcome:

- the client proposes COMMIT only having heard every yes, ABORT only having
  heard a no: the implicit outcome in both cases. A client that heard neither
  (an error) proposes nothing; its transaction is left to recovery.
- Recovery (``Recovery``; a resolver finding a one-round prepared record past
  its deadline, or anyone): it applies a TxnFence in every participant's log.
  A fence at slot f makes the shard's answer final: a yes prepare of the
  transaction chosen before f is held (or was carried out, which needs a
  recorded decision) and is reported; none before f means none ever, because
  the fence finishes the transaction there as ABORT and a prepare after f
  votes no. So once every fence is applied the implicit outcome is fixed and
  known: COMMIT iff every fence reported a yes vote. One fence reporting none
  settles ABORT at once (that shard can never vote yes), without the others.
  A participant whose fence cannot be applied (no quorum) blocks recovery,
  exactly as it blocks the prepare itself; recovery is retried until it can.
- Hence a client told COMMIT (every prepare chosen yes before any fence) can
  only ever see COMMIT recorded, and one told ABORT only ABORT. A recovery
  racing the client, or another recovery, reads the same final answers.
- A resolve applied before the record changes no fence's answer (a COMMIT
  resolve leaves COMMIT carried out, reported as a yes; an ABORT one leaves
  ABORT). If the record is lost while every resolve is applied, nothing is
  recorded, and nothing needs to be: no participant holds the prepare, so no
  resolver asks, and a late copy of the prepare finds it finished. While one
  still holds it, its resolver's recovery records the implied outcome.

A fence of a two-round transaction's record reports no yes (its recovery may
only abort: the client waits for the recorded decision there), and a locking
read's transaction (``kvstore.client.txn``) always commits in two rounds: its
lock-only prepares are yes votes that must not count as a commit. Nodes of an
earlier version do not know the one-round prepare or the fence: the client
sends them only when told to (docs/operations.md, "Upgrade").

Read-only transactions: one round, a read-only TxnPrepare per shard that checks
(after all the reads) that nothing read has changed or is locked; all yes means
every value read held at one moment between the last read and the first
validation, so the reads are serializable. Nothing is decided or resolved.
"""

from __future__ import annotations

from kvstore.txn.records import ABORT, COMMIT, TxnDecision, TxnFence, TxnPrepare, TxnResolve

PREPARING = "preparing"
DECIDING = "deciding"
DONE = "done"


class Coordinator:
    """One transaction: ``parts`` maps each shard to its ``(reads, writes)``."""

    def __init__(self, txn_id: bytes, coordinator_shard: int, parts: dict, deadline: int,
                 decision_not_replicated: bool = False, one_round: bool = False) -> None:
        if coordinator_shard not in parts:
            raise ValueError("the coordinator shard must be one of the participants")
        self.txn_id = txn_id
        self.coordinator_shard = coordinator_shard
        self.read_only = all(not writes for _, writes in parts.values())
        self.participants = participants = tuple(sorted(parts))
        self.one_round = one_round and not self.read_only
        self.prepares = {shard: TxnPrepare(txn_id, coordinator_shard, participants, tuple(reads),
                                           tuple(writes), deadline, self.read_only, self.one_round)
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
        if self.one_round:  # the implicit outcome, final now: the client may hear it
            self.outcome = self.proposed_outcome
        self.state = DECIDING
        return self.proposals()

    def on_vote_unknown(self, shard: int) -> None:
        """No answer from ``shard`` (an error): two rounds may abort now; one round may
        not (the prepare may be chosen yet), and leaves the transaction to recovery."""
        if not self.one_round:
            self.on_vote(shard, False)

    def on_decision(self, outcome: int) -> None:
        """The outcome recorded in the coordinator shard's log (maybe not the one we
        proposed: two rounds; one round: always the implicit one, already answered);
        the node that recorded it carries it out on every participant."""
        if self.state != DECIDING:
            return
        if self.outcome is None:
            self.outcome = outcome
        self.state = DONE

    @property
    def decided(self) -> bool:
        """The client may be answered: the outcome is recorded (two rounds), implied by
        the votes (one round) or, read-only, validated."""
        return self.outcome is not None


FENCING = "fencing"


class Recovery:
    """Settle an abandoned one-round transaction from its prepares (the module docstring,
    "One round"): a TxnFence in every participant's log, then the outcome they imply as
    the decision. Volatile like ``Coordinator``: whoever loses it starts again (every
    entry is idempotent, and the fences' answers never change)."""

    def __init__(self, txn_id: bytes, coordinator_shard: int, participants, bugs=None) -> None:
        self.txn_id = txn_id
        self.coordinator_shard = coordinator_shard
        self.participants = tuple(participants)
        self.held: dict = {}  # shard -> its fence's answer (True: holds a yes vote)
        self.state = FENCING
        self.proposed_outcome: int | None = None
        self.outcome: int | None = None
        if bugs is not None and bugs.one_round_recovery_aborts:  # planted: decide as two rounds
            self._decide(ABORT)

    def proposals(self) -> list:
        """``[(shard, entry)]`` to propose now; again on a timeout (all idempotent)."""
        if self.state == FENCING:
            return [(shard, TxnFence(self.txn_id)) for shard in self.participants
                    if shard not in self.held]
        if self.state == DECIDING:
            return [(self.coordinator_shard, TxnDecision(self.txn_id, self.proposed_outcome))]
        return []

    def on_fenced(self, shard: int, holds_yes: bool) -> list:
        """What applying our TxnFence at ``shard`` yielded; returns new proposals."""
        if self.state != FENCING or shard not in self.participants or shard in self.held:
            return []
        self.held[shard] = holds_yes
        if not holds_yes:
            return self._decide(ABORT)  # that shard can never vote yes: ABORT is implied
        if len(self.held) == len(self.participants):
            return self._decide(COMMIT)  # every yes vote chosen: COMMIT was implied
        return []

    def _decide(self, outcome: int) -> list:
        self.proposed_outcome = outcome
        self.state = DECIDING
        return self.proposals()

    def on_decision(self, outcome: int) -> None:
        """The recorded outcome; the node that recorded it carries it out everywhere."""
        if self.state == DECIDING:
            self.outcome = outcome
            self.state = DONE
