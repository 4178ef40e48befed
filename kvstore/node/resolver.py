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
Whoever carries a COMMIT out on every participant forgets it once each resolve
(and the decision) is applied: a ``TxnForget`` per shard, batched, some seconds
later (``_forget_later``; why that is safe, and why an ABORT is kept:
``kvstore.txn.participant``, "Forgetting"), so the shards' records do not grow
with every committed transaction.
The node's own writes go through the same intake as a client's
(``Intake._on_request``), under the identity ``("self", token)`` and a client
session of their own.
"""

from __future__ import annotations

import heapq
import logging
from dataclasses import dataclass
from typing import Callable

from kvstore.commands import TwoPC, command_wire, two_pc
from kvstore.machine.twopc import check_decide
from kvstore.txn import (ABORT, COMMIT, OUTCOMES, Recovery, TxnDecision, TxnFence, TxnForget, TxnPrepare,
                         TxnResolve)
from kvstore.txn.records import FORGET_MAX_IDS
from kvstore.transport import wire

log = logging.getLogger("kvstore.node")

#: How often a shard's leader looks for prepared cross-shard transactions past their
#: deadline (their coordinator went quiet) to settle them (``_resolve_abandoned``).
RESOLVE_EVERY_SECONDS = 0.25
#: A settlement of an abandoned transaction not finished in this long is started again.
RESOLVE_RETRY_SECONDS = 3.0
#: A COMMIT carried out everywhere is forgotten this long after (the resolves and
#: decisions still in flight for it are in by then, mostly: see ``_forget_later``).
FORGET_AFTER_SECONDS = 3.0
#: How often a shard's leader looks for COMMITs still kept (their forget was lost with
#: the node that carried them out): one found by two sweeps in a row is forgotten
#: (``_sweep_lingering``).
SWEEP_EVERY_SECONDS = 5.0
#: Outcomes one sweep looks at, per shard.
SWEEP_MAX = 4096


@dataclass(slots=True)
class OwnWrite:
    """A write of this node's own (a 2PC decision or resolve) until it is answered."""

    callback: Callable  # callback(result), once applied
    since: float  # monotonic; given up after RESOLVE_RETRY_SECONDS
    on_failure: Callable | None  # on_failure(status, value), or None: the resolver retries
    shard: int


class Resolver:
    """The 2PC resolver, a part of ``Node`` (the module docstring)."""

    def _init_resolver(self) -> None:
        # this node's own writes (2PC settlements) go through _on_request under the
        # identity ("self", token) with their own client session
        self._resolver_id = b"resolver-" + self.rng.randbytes(8)
        self._own_writes: dict = {}  # token (= its seq) -> OwnWrite
        self._resolving: dict = {}  # txn id -> monotonic time its settlement started
        self._to_forget: list = []  # heap of (due, n, txn id, participants): _forget_later
        self._lingering: dict = {}  # shard -> finished txn ids the last sweep found
        self._last_sweep = self._last_resolve = self.clock.monotonic()

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

        carried_out = None

        def recorded(outcome) -> None:
            self.stats.count(wire.OP_DECIDE, wire.STATUS_OK)
            self.stats.txn_decisions["abort" if outcome == ABORT else "commit"] += 1
            self._reply(identity, request_id, wire.STATUS_OK, outcome)
            if carried_out is not None:
                carried_out()  # the record is one of the steps its forget waits for
            else:
                self._resolve_everywhere(decision.txn_id, outcome, participants)

        def failed(status: int, value) -> None:
            self.stats.count(wire.OP_DECIDE, status)
            self._reply(identity, request_id, status, value)

        if implied:
            # a one-round transaction's outcome is fixed by its votes (kvstore.txn.coordinator):
            # carried out alongside the record, in the same round (the coordinator shard's
            # resolve in the decision's batch), not after it
            carried_out = self._resolve_everywhere(decision.txn_id, decision.outcome,
                                                   participants, also=1, one_round=True)
        self._own_write(shard, two_pc(decision), recorded, failed)

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
        self._flush_forgets(now)
        if now - self._last_sweep > SWEEP_EVERY_SECONDS:
            self._sweep_lingering(now)
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
                                lambda outcome, s=shard, p=prepare: self._carry_out(s, p, outcome,
                                                                                    everywhere=True))

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
            self._carry_out(shard, prepare, outcome, everywhere=True)

        step(recovery.proposals())

    def _carry_out(self, shard: int, prepare: TxnPrepare, outcome, everywhere: bool = False) -> None:
        """The coordinator shard recorded ``outcome`` for ``prepare``: resolve it here, and
        with ``everywhere`` on its other participants too (then forget it)."""
        def done(_changed) -> None:
            self._resolving.pop(prepare.txn_id, None)
            self.counters["txn_settled"] += 1

        if not everywhere or not all(0 <= s < self.nshards for s in prepare.participants):
            self._own_write(shard, two_pc(TxnResolve(prepare.txn_id, outcome)), done)
            return
        self._resolve_everywhere(prepare.txn_id, outcome, prepare.participants,
                                 on_applied={shard: done}, one_round=prepare.one_round)

    def _resolve_everywhere(self, txn_id: bytes, outcome: int, participants, also: int = 0,
                            on_applied: dict | None = None, one_round: bool = False):
        """Carry out a recorded decision on every participant shard, then, a COMMIT,
        forget it (``_forget_later``; its recorded COMMIT too if ``one_round``) once
        every resolve is applied and ``also`` more steps are done: each calls the
        function returned. A resolve that fails leaves it to that shard's resolver, or
        to the sweep of lingering COMMITs, which carry it out everywhere again (and
        forget it then). ``on_applied``: shard -> called with its result too."""
        participants = tuple(participants)
        waiting = [len(participants) + also]

        def step_done(_result=None) -> None:
            waiting[0] -= 1
            if waiting[0] == 0 and outcome == COMMIT:
                self._forget_later(txn_id, participants, one_round)

        entry = two_pc(TxnResolve(txn_id, outcome))
        for shard in participants:
            extra = (on_applied or {}).get(shard)
            self._own_write(shard, entry, step_done if extra is None
                            else lambda result, f=extra: (f(result), step_done()))
        return step_done

    def _forget_later(self, txn_id: bytes, participants, decisions: bool) -> None:
        """``txn_id``'s COMMIT is carried out on every participant: forget it there (and
        the recorded COMMIT on its coordinator shard, one of them, with ``decisions``)
        after ``FORGET_AFTER_SECONDS``."""
        heapq.heappush(self._to_forget, (self.clock.monotonic() + FORGET_AFTER_SECONDS,
                                         next(self._tokens), txn_id, tuple(participants),
                                         decisions))

    def _flush_forgets(self, now: float) -> None:
        """One TxnForget per shard for the transactions due; one that fails leaves their
        records (a leak only: nothing needs them)."""
        due: dict = {}
        queue = self._to_forget
        while queue and queue[0][0] <= now:
            _at, _n, txn_id, participants, decisions = heapq.heappop(queue)
            for shard in participants:
                due.setdefault((shard, decisions), []).append(txn_id)
        for (shard, decisions), ids in due.items():
            self._forget(shard, ids, decisions)

    def _forget(self, shard: int, txn_ids: list, decisions: bool) -> None:
        """TxnForget ``txn_ids`` on ``shard``, if it takes one (``one_round_seen``: nodes of
        an earlier version refuse it; until then the records stay, as they did there)."""
        if not self.storage.one_round_seen(shard):
            return
        for i in range(0, len(txn_ids), FORGET_MAX_IDS):
            entry = TxnForget(tuple(txn_ids[i:i + FORGET_MAX_IDS]), decisions)
            self._own_write(shard, two_pc(entry), _ignore)

    def _sweep_lingering(self, now: float) -> None:
        """The COMMITs the shards this node leads still keep after two sweeps in a row
        (their forget was lost, with the node that carried them out): one whose
        participants are known is carried out everywhere again and then forgotten; one
        without (made again by a late resolve) is forgotten here alone. The recorded
        COMMIT is kept (whether the transaction was one-round is not known here). Why
        this is safe: ``kvstore.txn.participant``, "Forgetting"."""
        self._last_sweep = now
        for shard, r in enumerate(self.replicas):
            if not r.is_leader or not self.storage.one_round_seen(shard):
                self._lingering.pop(shard, None)
                continue
            found = [(t, p) for t, outcome, p in self.storage.finished_outcomes(shard, SWEEP_MAX)
                     if outcome == COMMIT]
            before = self._lingering.get(shard, set())
            self._lingering[shard] = {txn_id for txn_id, _p in found}
            alone = []
            for txn_id, parts in found:
                if txn_id not in before:
                    continue
                if parts and shard in parts and all(0 <= s < self.nshards for s in parts):
                    self._resolve_everywhere(txn_id, COMMIT, parts)
                else:
                    alone.append(txn_id)
            if alone:
                self._forget(shard, alone, False)

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
