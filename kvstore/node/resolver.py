"""The 2PC resolver: the cross-shard transaction steps a node writes itself. Part of
``Node`` (``kvstore.node.loop`` mixes it in).

A client (the coordinator of its transaction) asks the coordinator shard's leader
for a decision (``_on_decide``); that node proposes the TxnDecision as its own
write, answers the recorded outcome and carries it out on every participant. The
shard leaders settle prepared transactions whose coordinator went quiet
(``_resolve_abandoned``): ask the coordinator shard to decide ABORT (a decision
already recorded wins), then carry out what was recorded; a one-round
transaction is recovered from its prepares instead (``_recover``: a TxnFence on
every participant, then the outcome they imply, ``kvstore.txn.Recovery``). Every step is an
idempotent log entry (``kvstore.txn``), so a duplicate or a race changes nothing.
The node's own writes go through the same intake as a client's
(``Intake._on_request``), under the identity ``("self", token)`` and a client
session of their own.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from kvstore.commands import TwoPC, command_wire, two_pc
from kvstore.machine.twopc import check_decide
from kvstore.txn import ABORT, OUTCOMES, Recovery, TxnDecision, TxnFence, TxnPrepare, TxnResolve
from kvstore.transport import wire

log = logging.getLogger("kvstore.node")

#: How often a shard's leader looks for prepared cross-shard transactions past their
#: deadline (their coordinator went quiet) to settle them (``_resolve_abandoned``).
RESOLVE_EVERY_SECONDS = 0.25
#: A settlement of an abandoned transaction not finished in this long is started again.
RESOLVE_RETRY_SECONDS = 3.0


@dataclass(slots=True)
class OwnWrite:
    """A write of this node's own (a 2PC decision or resolve) until it is answered."""

    callback: Callable  # callback(result), once applied
    since: float  # monotonic; given up after RESOLVE_RETRY_SECONDS
    on_failure: Callable | None  # on_failure(status, value), or None: the resolver retries
    shard: int


class Resolver:
    """The 2PC resolver, a part of ``Node`` (the module docstring)."""

    def _on_decide(self, identity, request_id: int, args: list) -> None:
        """A coordinator (a client) asks for its transaction's decision: this node, if it
        leads the coordinator shard, proposes the TxnDecision as its own write, answers
        the recorded outcome (first recorded wins: maybe a resolver's ABORT), then
        carries it out on every participant (``_resolve_everywhere``). The client never
        writes a decision or a resolve itself; a lost resolve is done by the resolvers.
        ``implied`` (a one-round transaction: its votes fixed the outcome) carries it out
        while it is recorded, in the same round (``kvstore.txn.coordinator``)."""
        shard, decision, participants, implied = check_decide(args, self.nshards)
        r = self.replicas[shard]
        if not r.is_leader:
            self._not_leader(identity, request_id, wire.OP_DECIDE, args, r.leader_hint)
            return
        self.counters["txn_decide_requests"] += 1

        def recorded(outcome) -> None:
            self.stats.count(wire.OP_DECIDE, wire.STATUS_OK)
            self.stats.txn_decisions["abort" if outcome == ABORT else "commit"] += 1
            self._reply(identity, request_id, wire.STATUS_OK, outcome)
            if not implied:
                self._resolve_everywhere(decision.txn_id, outcome, participants)

        def failed(status: int, value) -> None:
            self.stats.count(wire.OP_DECIDE, status)
            self._reply(identity, request_id, status, value)

        self._own_write(shard, two_pc(decision), recorded, failed)
        if implied:
            # a one-round transaction's outcome is fixed by its votes (kvstore.txn.coordinator):
            # carried out alongside the record, in the same round (the coordinator shard's
            # resolve in the decision's batch), not after it
            self._resolve_everywhere(decision.txn_id, decision.outcome, participants)

    def _resolve_abandoned(self, now: float) -> None:
        """Settle the prepared cross-shard transactions of the shards this node leads
        whose deadline passed (their coordinator, a client, went quiet or died): ask
        the coordinator shard to decide ABORT (a decision already recorded wins: first
        writer), then carry the recorded outcome out here. Any node may do this at any
        time (``kvstore.txn``): each step is an idempotent log entry, so a duplicate
        or a race with the live coordinator changes nothing. Rule 7 holds because a
        resolver only ever proposes ABORT and acts on what the log recorded; for a
        one-round transaction, whose client may have been told COMMIT already, it
        proposes what the fenced prepares imply (``_recover``)."""
        self._last_resolve = now
        for txn_id in [t for t, at in self._resolving.items() if now - at > RESOLVE_RETRY_SECONDS]:
            del self._resolving[txn_id]
        for token in [t for t, w in self._own_writes.items() if now - w.since > RESOLVE_RETRY_SECONDS]:
            del self._own_writes[token]
        now_ms = int(self.clock.time() * 1000)
        for shard, r in enumerate(self.replicas):
            if not r.is_leader:
                continue
            for prepare in self.storage.expired_prepares(shard, now_ms):
                if prepare.txn_id in self._resolving:
                    continue
                self._resolving[prepare.txn_id] = now
                if not 0 <= prepare.coordinator < self.nshards:
                    # no such shard can ever record a decision (a record older than the
                    # intake checks): only ABORT is possible, carried out here
                    self._carry_out(shard, prepare, ABORT)
                    continue
                self.counters["txn_settlements_started"] += 1
                log.info("shard %d: settling transaction %s (prepared, past its deadline)",
                         shard, prepare.txn_id.hex(),
                         extra={"event": "txn_settle", "node": self.name, "shard": shard,
                                "txn": prepare.txn_id.hex()})
                if prepare.one_round:
                    self._recover(shard, prepare)
                    continue
                self._own_write(prepare.coordinator, two_pc(TxnDecision(prepare.txn_id, ABORT)),
                                lambda outcome, s=shard, p=prepare: self._carry_out(s, p, outcome))

    def _recover(self, shard: int, prepare: TxnPrepare) -> None:
        """Settle a one-round transaction from its prepares (``kvstore.txn.Recovery``): a
        TxnFence in every participant's log, in parallel, then the outcome their answers
        imply as the decision, carried out everywhere. A step that fails ends it; the
        resolver starts again after ``RESOLVE_RETRY_SECONDS`` (all steps idempotent)."""
        recovery = Recovery(prepare.txn_id, prepare.coordinator, prepare.participants)

        def step(proposals: list) -> None:
            for target, entry in proposals:
                if type(entry) is TxnFence:
                    self._own_write(target, two_pc(entry), lambda held, t=target: fenced(t, held))
                else:
                    self._own_write(target, two_pc(entry), recorded)

        def fenced(target: int, held) -> None:
            if type(held) is bool:  # anything else (a late duplicate's answer): no answer
                step(recovery.on_fenced(target, held))

        def recorded(outcome) -> None:
            if outcome not in OUTCOMES:
                return
            recovery.on_decision(outcome)
            self._carry_out(shard, prepare, outcome)
            self._resolve_everywhere(prepare.txn_id, outcome,
                                     [s for s in prepare.participants if s != shard])

        step(recovery.proposals())

    def _carry_out(self, shard: int, prepare: TxnPrepare, outcome) -> None:
        """The coordinator shard recorded ``outcome`` for ``prepare``: resolve it here."""
        def done(_changed) -> None:
            self._resolving.pop(prepare.txn_id, None)
            self.counters["txn_settled"] += 1

        self._own_write(shard, two_pc(TxnResolve(prepare.txn_id, outcome)), done)

    def _resolve_everywhere(self, txn_id: bytes, outcome: int, participants) -> None:
        """Carry out a recorded decision on every participant shard (the resolves of a
        decide request); one that fails is done by that shard's resolver later."""
        entry = two_pc(TxnResolve(txn_id, outcome))
        for shard in participants:
            self._own_write(shard, entry, _ignore)

    def _own_write(self, shard: int, command, callback, on_failure=None) -> None:
        """Propose ``command`` to ``shard`` as this node's own client (routed like any
        client write: here if this node leads the shard, else forwarded to its leader);
        ``callback(result)`` runs once it is applied. A failure goes to
        ``on_failure(status, value)`` if given, else is dropped: the resolver starts
        the settlement again later."""
        token = next(self._tokens)
        # the shard's session floor: its oldest own write still unanswered (2PC entries
        # are idempotent; the floor only keeps that session's results few)
        floor = min((t for t, w in self._own_writes.items() if w.shard == shard), default=token)
        self._own_writes[token] = OwnWrite(callback, self.clock.monotonic(), on_failure, shard)
        self._on_request(("self", token), token, wire.OP_WRITE,
                         [shard, self._resolver_id, token, floor, list(command_wire(command))])

    def _on_own_reply(self, token: int, status: int, value) -> None:
        w = self._own_writes.pop(token, None)
        if w is None:
            return
        if status == wire.STATUS_OK_FORWARDED and type(value) is list and len(value) == 2:
            status, value = wire.STATUS_OK, value[0]
        if status == wire.STATUS_OK:
            w.callback(value)
        elif w.on_failure is not None:
            w.on_failure(status, value)


def _ignore(_result) -> None:
    pass
