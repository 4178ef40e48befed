"""Invariants the simulator checks after every step, against what the nodes told the world.

The end-of-run checks (agreement, durability, linearizability) see a bug only once
it has reached a client. These see it the moment a replica's state contradicts
something it already announced:

- a replica never forgets an acceptance it acknowledged (an Accepted or
  HeartbeatReply naming ``match_index``), unless the slot is at or below its
  commit point or it holds the value chosen there instead: the oracle keeps
  each acknowledged ``(node, slot, ballot)``;
- a node that announced a promise for ballot B never accepts below B, and its
  promise never goes back below B, across restarts;
- commit and applied points never decrease within one run of a replica;
- no two leaders ever hold the same ballot (counted once the ballot is durable);
- a Promise shows every slot its sender knows is chosen above the candidate's commit
  point (else the candidate may fill a chosen slot with something else);
- once a majority has accepted a value at a slot (it is chosen), every proposal at a
  higher ballot for that slot carries that value (Paxos' P2b), and one ballot never
  proposes two values for one slot: a wrong re-proposal is caught when it is sent,
  before any replica applies it;
- a replica applies only chosen values (a majority accepted them at one ballot);
- the state every replica applied equals a replay of the chosen log, slot by slot,
  across snapshots and restarts (so exactly-once apply is checked, not assumed).

Memberships (issue 23): a value is chosen at a slot when a majority of the voters of its
ballot's epoch accepted it there; a membership change chosen at slot s ends its epoch, so
what that epoch accepts above s is void (never chosen, and a replica may forget it); the
next epoch's voters are the change's. The oracle learns each epoch's voters from the
changes it sees chosen.
"""

from __future__ import annotations

from kvstore._native import decode_record
from kvstore.paxos import messages as M
from kvstore.paxos.ballot import ballot_epoch, format_ballot
from kvstore.paxos.membership import decode_membership
from kvstore.paxos.replica import KIND_BATCH, KIND_CONFIG, LEADER
from kvstore.sim.kv import KV


class InvariantViolation(Exception):
    pass


def _is_chosen(chosen, entry) -> bool:
    """``entry`` (ballot, kind, payload, ...) holds the value chosen at its slot, at a ballot
    it was chosen at or above: holding it instead of a later acceptance of the same value
    forgets nothing that could change what is chosen (a node that learned the slot is
    chosen may keep the record the leader sent, at its original ballot)."""
    return chosen is not None and entry[0] >= chosen[0] and entry[1:3] == chosen[1:]


class Oracle:
    def __init__(self, nodes: int, machine=KV, voters: int | None = None) -> None:
        """``nodes`` node indexes exist; the first ``voters`` (default all) vote in epoch 0."""
        self.majority = nodes // 2 + 1
        self.voters: dict = {0: frozenset(range(nodes if voters is None else voters))}  # epoch -> voters
        self.stops: dict = {}  # epoch -> the slot of the change that ended it
        self.waiting: dict = {}  # epoch -> [(node, slot, ballot)] votes of an epoch not known yet
        self.proposals: dict = {}  # slot -> {ballot: (kind, payload)}
        self.votes: dict = {}  # (slot, ballot) -> bitmask of nodes that accepted it
        self.chosen: dict = {}  # slot -> (lowest ballot it was chosen at, kind, payload)
        self.acked: list = [dict() for _ in range(nodes)]  # slot -> highest ballot acknowledged
        self.promised: list = [0] * nodes  # highest ballot announced in a Promise or an Accepted
        self.points: list = [(-1, -1)] * nodes  # (commit, applied) last seen, this incarnation
        self.incarnation: list = [0] * nodes
        self.leaders: dict = {}  # ballot -> (node, incarnation)
        self.prepared_from: dict = {}  # ballot -> the candidate's commit point in its Prepare
        # Reference replay of the chosen log (``machine``: the replicated state machine): the
        # state after each slot.
        self._ref = machine()
        self._ref_index = -1
        self._state_after: dict = {-1: machine().snapshot()}

    @staticmethod
    def fail(why: str) -> None:
        raise InvariantViolation(why)

    # ------------------------------------------------------------------ events
    def restarted(self, node: int, replica) -> None:
        self.incarnation[node] += 1
        if replica.promised < self.promised[node]:
            self.fail(f"promise: n{node} restarted with promise {format_ballot(replica.promised)} below "
                      f"the {format_ballot(self.promised[node])} it announced")
        self.points[node] = (replica.commit_index, replica.applied_index)
        self.check(node, replica)

    def recovered(self, node: int, log: dict, commit_index: int) -> None:
        """``node`` restarted holding ``log`` (slot -> (ballot, kind, payload, ...)). Above
        its commit point each record is an acceptance on its disk, a vote whether or not it
        was announced (the power may have gone after a save's records were synced, before
        its messages left). At or below it a record is a chosen value the node holds, not
        necessarily its vote at the record's ballot: a node recovering from a lost disk
        learns chosen values as the leader holds them, at their original ballot (seed
        108613: slot 7 learned at ballot 5.2, the value chosen later at a higher ballot
        after 6.0 had proposed another one; counted as a vote at 5.2 it made 5.2 look
        chosen). Where the chosen value is known it must be that value; where it is not,
        the record counts as a vote, as above."""
        for slot, (ballot, kind, payload, *_rest) in sorted(log.items()):
            self._proposed(slot, ballot, (kind, payload))
            if slot <= commit_index and slot in self.chosen:
                self._claimed_chosen(node, slot, (kind, payload))
            else:  # a vote (on 1 node, its own vote chose it, maybe unannounced)
                self._accepted(node, slot, ballot)

    def wiped(self, node: int) -> None:
        """``node`` lost its disk: what it announced is forgotten with it (that is the fault);
        the votes it cast still count towards what was chosen, so a value chosen with its
        help and then lost is still caught (``chosen value lost``, agreement)."""
        self.promised[node] = 0
        self.acked[node] = {}
        self.points[node] = (-1, -1)

    def sent(self, node: int, m) -> None:
        """``m`` left ``node`` (its Ready was synced first)."""
        if m.reject:
            return
        if m.type == M.PREPARE:
            self.prepared_from[m.ballot] = m.commit_index
        elif m.type == M.ACCEPT:
            for rec in m.records:
                slot, ballot, kind, payload = decode_record(rec)
                if ballot == m.ballot:
                    self._proposed(slot, ballot, (kind, payload))  # its own vote counts at ``synced``
                elif slot <= m.commit_index:
                    self._claimed_chosen(node, slot, (kind, payload))
        elif m.type == M.CHOSEN:  # every record it tells is a claim that its value is chosen
            for rec in m.records:
                slot, _ballot, kind, payload = decode_record(rec)
                if slot > m.commit_index:
                    self.fail(f"chosen: n{node} told slot {slot} as chosen above its commit point "
                              f"{m.commit_index}")
                self._claimed_chosen(node, slot, (kind, payload))
        elif m.type == M.PROMISE:
            self.promised[node] = max(self.promised[node], m.ballot)
            shown = {decode_record(rec)[0] for rec in m.records}
            since = self.prepared_from.get(m.ballot, m.commit_index)
            hidden = [s for s in range(since + 1, m.commit_index + 1) if s not in shown]
            if hidden:
                self.fail(f"promise: n{node} promised ballot {format_ballot(m.ballot)} with commit point "
                          f"{m.commit_index} but hid chosen slots {hidden[0]}..{hidden[-1]} from a "
                          f"candidate at {since}")
        elif m.type in (M.ACCEPTED, M.HEARTBEAT_REPLY):
            if m.ballot < self.promised[node]:
                self.fail(f"promise: n{node} acknowledged ballot {format_ballot(m.ballot)} after "
                          f"promising {format_ballot(self.promised[node])}")
            self.promised[node] = m.ballot
            acked = self.acked[node]
            for slot in range(m.commit_index + 1, m.match_index + 1):
                if acked.get(slot, -1) < m.ballot:
                    acked[slot] = m.ballot
                self._accepted(node, slot, m.ballot)

    # ------------------------------------------------------------------ chosen values (P2b)
    def _proposed(self, slot: int, ballot: int, value: tuple) -> None:
        by_ballot = self.proposals.setdefault(slot, {})
        first = by_ballot.setdefault(ballot, value)
        if first != value:
            self.fail(f"proposals: ballot {format_ballot(ballot)} proposed two values at slot {slot}")
        chosen = self.chosen.get(slot)
        if chosen is not None and ballot > chosen[0] and value != chosen[1:] and not self.void(slot, ballot):
            self.fail(f"chosen value lost: slot {slot} was chosen at ballot {format_ballot(chosen[0])}, "
                      f"and ballot {format_ballot(ballot)} proposes another value there")

    def void(self, slot: int, ballot: int) -> bool:
        """An acceptance at ``slot`` at ``ballot`` is void: its epoch had ended below it."""
        stop = self.stops.get(ballot_epoch(ballot))
        return stop is not None and slot > stop

    def _accepted(self, node: int, slot: int, ballot: int) -> None:
        key = (slot, ballot)
        votes = self.votes.get(key, 0) | (1 << node)
        self.votes[key] = votes
        epoch = ballot_epoch(ballot)
        voters = self.voters.get(epoch)
        if voters is None:
            self.waiting.setdefault(epoch, []).append((node, slot, ballot))
            return
        if self.void(slot, ballot):
            return
        if sum(1 for v in voters if votes >> v & 1) < len(voters) // 2 + 1:
            return
        chosen = self.chosen.get(slot)
        if chosen is not None and chosen[0] <= ballot:
            return
        value = self.proposals.get(slot, {}).get(ballot)
        if value is None:
            self.fail(f"acceptance: slot {slot} accepted at ballot {format_ballot(ballot)}, never proposed")
        self.chosen[slot] = (ballot, *value)
        for other, proposed in self.proposals[slot].items():
            if other > ballot and proposed != value and not self.void(slot, other):
                self.fail(f"chosen value lost: slot {slot} is chosen at ballot {format_ballot(ballot)}, "
                          f"and ballot {format_ballot(other)} proposed another value there")
        if value[0] == KIND_CONFIG:
            self._epoch_ended(epoch, slot, value[1])

    def _epoch_ended(self, epoch: int, slot: int, payload: bytes) -> None:
        """The change at ``slot`` is chosen: ``epoch`` ends there; the next one's voters are
        known (its waiting votes count now); what ``epoch`` chose above ``slot`` is void."""
        if epoch in self.stops:
            if self.stops[epoch] != slot:
                self.fail(f"membership: epoch {epoch} ended at slot {self.stops[epoch]} and at {slot}")
            return
        try:
            nxt = decode_membership(payload, slot)
        except ValueError as e:
            self.fail(f"membership: the change chosen at slot {slot} does not decode: {e}")
        if nxt.epoch != epoch + 1:
            self.fail(f"membership: the change chosen at slot {slot} in epoch {epoch} begins epoch {nxt.epoch}")
        self.stops[epoch] = slot
        self.voters[nxt.epoch] = frozenset(nxt.voters)
        for s in [s for s, c in self.chosen.items() if s > slot and ballot_epoch(c[0]) == epoch]:
            del self.chosen[s]  # counted before the change was known chosen: void
        for node, s, b in self.waiting.pop(nxt.epoch, []):
            self._accepted(node, s, b)

    def applied(self, node: int, slot: int, kind: int, payload: bytes) -> None:
        chosen = self.chosen.get(slot)
        if chosen is None:
            self.fail(f"commit: n{node} applied slot {slot}, which no majority accepted")
        if (kind, payload) != chosen[1:]:
            self.fail(f"commit: n{node} applied at slot {slot} a value other than the one chosen "
                      f"at ballot {format_ballot(chosen[0])}")

    def _claimed_chosen(self, node: int, slot: int, value: tuple) -> None:
        chosen = self.chosen.get(slot)
        if chosen is not None and value != chosen[1:]:
            self.fail(f"chosen value lost: n{node} sent slot {slot} as chosen with a value other than "
                      f"the one chosen at ballot {format_ballot(chosen[0])}")

    def synced(self, node: int, replica, durable_commit: int, records: list) -> None:
        """``node``'s disk now holds everything its replica handed out (``records`` just now)."""
        acked = self.acked[node]
        for slot in [s for s in acked if s <= durable_commit]:
            del acked[slot]
        if replica.role == LEADER:
            for rec in records:  # the leader's own acceptances count once they are durable
                slot, ballot, kind, payload = decode_record(rec)
                if ballot == replica.ballot:
                    self._proposed(slot, ballot, (kind, payload))
                    self._accepted(node, slot, ballot)
            who = (node, self.incarnation[node])
            first = self.leaders.setdefault(replica.ballot, who)
            if first != who:
                self.fail(f"leaders: n{node} (run {who[1]}) leads at ballot {format_ballot(replica.ballot)}, "
                          f"which n{first[0]} (run {first[1]}) led at already")

    def check(self, node: int, replica) -> None:
        """After every step of ``node``: its state contradicts nothing it announced."""
        if replica.promised < self.promised[node]:
            self.fail(f"promise: n{node} holds promise {format_ballot(replica.promised)}, below the "
                      f"{format_ballot(self.promised[node])} it announced")
        commit, applied = replica.commit_index, replica.applied_index
        last_commit, last_applied = self.points[node]
        if commit < last_commit or applied < last_applied:
            self.fail(f"monotonic: n{node} went from commit {last_commit} / applied {last_applied} "
                      f"to {commit} / {applied}")
        self.points[node] = (commit, applied)
        log = replica.log
        chosen = self.chosen
        for slot, ballot in self.acked[node].items():
            if slot > commit and not self.void(slot, ballot):
                entry = log.get(slot)
                if entry is None or (entry[0] < ballot and not _is_chosen(chosen.get(slot), entry)):
                    held = "nothing" if entry is None else f"ballot {format_ballot(entry[0])}"
                    self.fail(f"acceptance forgotten: n{node} acknowledged slot {slot} at ballot "
                              f"{format_ballot(ballot)} and now holds {held} there (commit {commit})")

    # ------------------------------------------------------------------ reference replay
    def state_after(self, slot: int, chosen: dict) -> bytes:
        """The state machine's snapshot after applying the chosen log through ``slot``."""
        while self._ref_index < slot:
            s = self._ref_index + 1
            value = chosen.get(s)
            if value is None:
                self.fail(f"state: slot {slot} was applied, but slot {s} below it never was")
            kind, commands = value
            if kind == KIND_BATCH:
                for cmd in commands:
                    self._ref.apply(cmd)
            self._ref_index = s
            self._state_after[s] = self._ref.snapshot()
        return self._state_after[slot]
