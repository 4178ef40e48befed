"""Linearizable reads of a Paxos replica (safety rule 6): a part of ``Replica``
(``kvstore.paxos.replica`` mixes it in; the protocol is in that module's docstring,
"Reads"). The leader batches reads into confirmation rounds (``_ReadRound``: a heartbeat
round answered by a majority, whose read index is the commit point at its start); a
follower asks the leader for a read index (``_ReadIndexAsk``, one in flight) and serves
its reads once applied up to it. Pure: no I/O, no clock but ticks.
"""

from __future__ import annotations

from kvstore.paxos import messages as M
from kvstore.paxos.interface import FOLLOWER, LEADER, NotLeader
from kvstore.paxos.messages import Message


class _ReadRound:
    __slots__ = ("seq", "read_index", "request_ids", "remote", "acks", "start_tick")

    def __init__(self, seq: int, read_index: int, request_ids: list, remote: list, me: int,
                 start_tick: int = 0) -> None:
        self.seq = seq
        self.start_tick = start_tick  # the leader's tick when the round's heartbeats were made
        self.read_index = read_index
        self.request_ids = request_ids
        self.remote = remote  # (follower, context) of ReadIndex requests answered by this round
        self.acks = 1 << me


class _ReadIndexAsk:
    """A follower's ReadIndex request in flight (one at a time; it carries a batch of reads)."""

    __slots__ = ("context", "leader", "ballot", "sent_tick", "request_ids")

    def __init__(self, context: int, leader: int, ballot: int, sent_tick: int, request_ids: list) -> None:
        self.context = context
        self.leader = leader
        self.ballot = ballot
        self.sent_tick = sent_tick
        self.request_ids = request_ids


class Reads:
    """Linearizable reads, a part of ``Replica`` (the module docstring)."""

    def read(self, request_id) -> None:
        """Ask for a linearizable read; it comes back in ``Ready.reads`` when it may be served.

        On the leader: batched into the next confirmation round (rule 6). On a follower that
        knows a leader: batched into one ReadIndex request to it; the leader answers with the
        read index once its own round confirms it still leads, and the read comes back once
        this replica has applied up to that index. It comes back in ``Ready.dropped_reads``
        instead if the leader changes (or this replica stops following it) before then, or if
        no answer comes within an election timeout. Raises NotLeader when this replica
        neither leads nor follows a known leader.
        """
        if self.role == LEADER:
            if self.bugs.read_without_quorum or (self.ticks < self.lease_until and self._own_noop_committed()):
                self.reads_confirmed.append((self.commit_index, request_id))  # (a lease read)
                return
            self.reads_queued.append(request_id)  # the confirmation round starts at the next ready()
            return
        self._check_follower_reads()
        if self.role != FOLLOWER or self.leader is None:
            raise NotLeader(self.leader)
        self.follower_reads_leader = (self.leader, self._followed_ballot())
        self.follower_reads_queued.append(request_id)  # asked at the next ready()

    def up_to_date(self) -> bool:
        """Whether this replica knows now that its applied state is the shard's latest
        (a watch reply's ``current``): it leads, its own no-op is committed, it applied
        its commit point, and it holds a read lease or heard from a majority within the
        last election timeout (each of a majority replied at this ballot since then). A
        follower does not know it: False."""
        if (self.role != LEADER or self.applied_index != self.commit_index
                or not self._own_noop_committed()):
            return False
        if self.ticks < self.lease_until:
            return True
        since = self.ticks - self.config.election_timeout_ticks
        heard = 1 + sum(1 for i, pr in self.progress.items() if i in self.vpos and pr.heard_tick > since)
        return heard >= self.quorum

    def clock_jumped(self) -> None:
        """The driver could not deliver every elapsed tick (it stalled): a lease is void."""
        if not self.bugs.lease_survives_clock_jump:
            self.lease_until = -1
            if self.read_round is not None:
                # Its start was measured on the clock that jumped: it confirms its reads, but
                # it starts no lease.
                self.read_round.start_tick = -(1 << 62)

    def _own_noop_committed(self) -> bool:
        return self.commit_index >= self.own_first_slot or self.bugs.read_before_own_noop

    def _maybe_start_read_round(self) -> None:
        if (self.role != LEADER or self.read_round is not None
                or not (self.reads_queued or self.remote_queued) or not self._own_noop_committed()):
            return
        self._start_read_round()

    def _start_read_round(self) -> None:
        self.read_seq += 1
        self.read_round = _ReadRound(self.read_seq, self.commit_index, self.reads_queued,
                                     self.remote_queued, self.id, self.ticks)
        self.reads_queued = []
        self.remote_queued = []
        if self.peers:
            self._broadcast_heartbeat()
        self._maybe_confirm_reads()

    def _maybe_confirm_reads(self) -> None:
        rr = self.read_round
        if rr is None or self._votes(rr.acks) < self.quorum:
            return
        self.reads_confirmed.extend((rr.read_index, rid) for rid in rr.request_ids)
        if self.config.lease_read_ticks:
            self.lease_until = max(self.lease_until, rr.start_tick + self.config.lease_read_ticks)
        for follower, context in rr.remote:
            self._send(Message(M.READ_INDEX_REPLY, follower, self.id, ballot=self.ballot,
                               commit_index=rr.read_index, context=context))
        self.read_round = None
        self._maybe_start_read_round()

    def _on_read_index(self, m: Message) -> None:
        """The leader: a follower asks for a read index; it joins the next confirmation round."""
        if self.role != LEADER or m.ballot != self.ballot:
            self._send(Message(M.READ_INDEX_REPLY, m.frm, self.id, ballot=m.ballot, context=m.context,
                               reject=True, hint=self.promised))
            return
        if self.bugs.read_without_quorum or (self.ticks < self.lease_until and self._own_noop_committed()):
            self._send(Message(M.READ_INDEX_REPLY, m.frm, self.id, ballot=self.ballot,
                               commit_index=self.commit_index, context=m.context))
            return
        self.remote_queued.append((m.frm, m.context))  # the round starts at the next ready()

    def _on_read_index_reply(self, m: Message) -> None:
        ask = self.read_ask
        # Only the answer to the request in flight, from the leader (and ballot) it was asked
        # of; that leader is still the one followed (``_check_follower_reads`` after every
        # step drops the request the moment it is not).
        if ask is None or m.context != ask.context or m.frm != ask.leader or m.ballot != ask.ballot:
            return
        self.read_ask = None
        if m.reject:
            self._out_dropped_reads.extend(ask.request_ids)
            return
        index = -1 if self.bugs.follower_read_before_apply else m.commit_index
        self.reads_confirmed.extend((index, rid) for rid in ask.request_ids)

    def _maybe_ask_read_index(self) -> None:
        fl = self.follower_reads_leader
        if self.read_ask is not None or not self.follower_reads_queued or fl is None:
            return
        self.read_ask_seq += 1
        self.read_ask = _ReadIndexAsk(self.read_ask_seq, fl[0], fl[1], self.ticks, self.follower_reads_queued)
        self.follower_reads_queued = []
        self._send(Message(M.READ_INDEX, fl[0], self.id, ballot=fl[1], context=self.read_ask_seq))

    def _drop_follower_reads(self) -> None:
        """Every follower read not yet served fails back: the leader it relied on is gone."""
        if self.follower_reads_leader is None:
            return
        self._fail_back_reads(self.follower_reads_queued, self.read_ask)
        self.follower_reads_queued, self.read_ask = [], None
        self.follower_reads_leader = None

    def _fail_back_reads(self, queued: list, in_flight: _ReadRound | _ReadIndexAsk | None) -> None:
        """Every read not yet served goes to ``Ready.dropped_reads`` and ``reads_confirmed``
        is emptied: those ``queued``, those of the round or ask ``in_flight``, and those
        confirmed but not yet applied, in that order. A leader that steps down and a
        follower whose leader is gone end their reads alike: no read is served on the
        word of a leadership that may have passed (safety rule 6). The caller clears
        ``queued`` and ``in_flight``, which are its own."""
        dropped = list(queued)
        if in_flight is not None:
            dropped.extend(in_flight.request_ids)
        dropped.extend(rid for _, rid in self.reads_confirmed)
        self._out_dropped_reads.extend(dropped)
        self.reads_confirmed = []

    def _check_follower_reads(self) -> None:
        fl = self.follower_reads_leader
        if fl is None:
            return
        if self.role != FOLLOWER or (self.leader, self._followed_ballot()) != fl:
            self._drop_follower_reads()
            return
        ask = self.read_ask
        if ask is not None and self.ticks - ask.sent_tick >= self.config.election_timeout_ticks:
            self._log_event(f"no read index from {ask.leader} within an election timeout")
            self._out_dropped_reads.extend(ask.request_ids)
            self.read_ask = None
        if not (self.follower_reads_queued or self.read_ask or self.reads_confirmed):
            self.follower_reads_leader = None

    def _reads_due(self, applied: int) -> list:
        due = [rid for idx, rid in self.reads_confirmed if idx <= applied]
        if due:
            self.reads_confirmed = [(i, r) for i, r in self.reads_confirmed if i > applied]
        return due
