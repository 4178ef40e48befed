"""A Multi-Paxos replica for one shard: a pure, deterministic state machine.

It takes messages (``step``), time (``tick``), client commands (``propose``) and
reads (``read``), and hands back what must happen next as a :class:`Ready`. It
does no I/O, reads no clock and uses no global randomness (the config carries a
seeded ``random.Random``, or anything with its ``randrange``).

The replica is one class in rooms: this module holds the core protocol (elections,
phases 1 and 2, the commit point, compaction and the ``Ready``); ``kvstore.paxos.reads``
the linearizable reads, ``kvstore.paxos.snapshots`` the snapshot transfer,
``kvstore.paxos.recovery`` the wiped-node recovery, each a mixin of ``Replica`` sharing
its state; ``kvstore.paxos.interface`` what the driver sees (``Config``, ``Ready``...).
Long module: it stays over 600 lines on purpose: its handlers (``_on_prepare``,
``_on_promise``, ``_on_accept``, ``_on_accepted``, ``_become_leader``...) keep the
invariants stated below together (a Promise shows every accepted value above the
candidate's commit point; every entry at or below ``commit_index`` is chosen), and
cutting them apart would put one invariant's halves in two files.

Driver loop (the node's, or the simulator's) -- the ordering contract::

    while True:
        feed replica.step(m) / replica.tick() / replica.propose(cmd) / replica.read(rid)
        if replica.has_ready():
            rd = replica.ready()    # handed out: from here the replica counts rd as done
            1. persist rd.promised / rd.commit_index, rd.records (overwrite by slot),
               rd.snapshot, and delete log records <= rd.compacted_through,
               in ONE durable (synced) write;
            2. only then send rd.messages (safety rule 1);
            3. if rd.snapshot: restore the state machine from it; then apply
               rd.committed in order (slot order, each exactly once; rule 4);
            4. serve rd.reads (their read index is now applied; rule 6);
            5. fail rd.dropped_commands / rd.dropped_reads back to their clients;
            6. replica.advance(rd)  (nothing left to do: see ``advance``)

``ready()`` does the bookkeeping that etcd's raft leaves to ``Advance``: it moves
``applied_index`` to the commit point and empties the replica's outboxes as it
builds the Ready. So the driver must carry out all of ``rd`` (steps 1-5) before it
calls into the replica again, and if it cannot (a save that fails), it must drop
the replica and restart from what is durable (the node's loop raises out of
``turn`` and the process exits: ``kvstore.server``); a replica never sees a Ready
half done.

The phases: a candidate picks a ballot above any it has seen, runs phase 1 for
every slot above its commit point (one Prepare covers them all), re-proposes in
each such slot the value accepted at the highest ballot among a majority of
promises (a no-op where none; rule 3), then appends a no-op of its own ballot.
As leader it batches commands into entries and pipelines up to
``pipeline_window`` slots above the commit point; the commit point travels with
accepts and heartbeats.

Reads (rule 6). The leader batches reads into one confirmation round: a heartbeat
to every peer carrying the round's number, answered by a majority; it starts only
once the leader's own no-op of its ballot has committed (so its commit point covers
every slot chosen under earlier leaders), and its read index is the commit point at
its start. A follower that knows a leader serves reads too (read load spreads over
the nodes): it batches them into one ReadIndex request to that leader (one in
flight at a time, numbered from a random start so that no answer to a request made
before a restart matches one made after); the leader adds the request to its next
confirmation round and answers ReadIndexReply with the round's read index; the
follower hands the reads out once it has applied up to that index. It drops them
(``Ready.dropped_reads``) the moment it stops following that leader at that ballot,
and when no answer comes within an election timeout; an answer from any other
leader, ballot or request is ignored.

A replica knows a slot is chosen (and may commit it) when a leader of ballot B
says "committed up to C" and its own entry at that slot was accepted at B, or
when the entry came with a message saying it is at or below the sender's
commit point. Invariant: every log entry at or below ``commit_index`` holds the
chosen value of its slot.

Promises and compaction (why a candidate never fills a chosen slot with something
else). A Promise must show the candidate every value accepted above the
candidate's commit point. A promiser that has compacted (or installed a snapshot)
past that point cannot, so it refuses and sends its snapshot instead: checked on
every copy of a Prepare, since a duplicate of one already promised may arrive
after a snapshot changed the log the first answer came from (issue 10). And the
candidate, independently, counts no Promise whose commit point is above its own
unless the records cover every slot in between; those slots are chosen (the
promiser's invariant above), so the new leader stores them as they are and
commits them at once, before it re-proposes by ballot above them. Either half
alone closes the bug; the simulator checks the first as an invariant (a Promise
never hides a slot its sender knows is chosen) and the second by planting both
off together (``Bugs.duplicate_prepare_unchecked``).

Wiped nodes (a node that lost its disk: issue 19). A replica whose durable promise is
0 has either never promised nor accepted anything or forgotten what it did; it cannot
tell which, and an acceptor that forgot can break Paxos (it promises below a ballot it
promised, or answers "nothing accepted" for a slot whose value was chosen with its
vote). So it starts *recovering* (``self.recovery``): it sends no Promise, no Accepted
and grants no pre-vote; it still learns (records at or below a leader's commit point,
snapshots) and knows the leader (clients are forwarded). It votes once:

1. every OTHER node has reported its promise (``Recover``/``RecoverReply``, a fresh
   nonce per question so no answer to an earlier incarnation counts). If this node and
   the empty reporters (promise 0, nothing held) are a majority, it is a new cluster:
   it votes at once (a majority without its state is outside the fault model);
2. every other node has raised its promise to the fence F and reported again its
   promise and the highest slot it holds anything at. F is the highest promise of
   step 1, or the first ballot of the next round if that one is this node's own:
   every ballot this node led before it lost its disk was promised durably by another
   node, so it is <= that promise, and < F. After its report no node accepts at such a
   ballot, so an Accept this node sent before it lost its disk and still in flight can
   no longer make a value chosen behind the reports' back;
3. it holds the chosen values up to H, the highest slot reported (a leader asked for
   slots up to H that it has not proposed fills them with no-ops), then persists as
   its promise P, the highest promise of step 2, and votes.

Why that is safe (one node without its state at a time). Promises: a ballot B this
node promised before matters only if B's candidate, another node, counted it; that
candidate had promised B durably first, so P >= B, and this node never accepts below
P. Acceptances: a value this node accepted at slot s came from a leader that stored
it first (at s), and that leader reports a slot >= s (or, if the leader was this node
itself, its late Accepts are fenced off, and any other acceptance was reported): every
slot where a forgotten acceptance could count is <= H, where this node now holds the
chosen value, as committed (a Promise shows it as chosen). Its durable marker is the
promise P itself: persisted after the records and commit point it covers (the log
appends promises last), so a crash during recovery starts it again. In an even-sized
cluster any two majorities share two nodes, so a single forgetful node is never the
only witness: it votes after step 2 (in a 2-node cluster the other node could not
commit up to H alone). Liveness price: step 1 and 2 need every other node, so with
another node of a 3-node cluster down the wiped node stays a non-voter until that node
returns (etcd has the operator remove and re-add the member instead).
The simulator wipes nodes' disks and catches ``Bugs.wiped_votes_at_once``.

Membership (issue 23). Who votes changes through the log: a ``KIND_CONFIG`` entry at
slot s, proposed by the leader (``propose_membership``) and chosen by the current voters
like any value, ENDS the current epoch at s; slots above s belong to the next epoch, a
Paxos instance of its own with the new voters (stoppable Paxos: Lamport, Malkhi and
Zhou). The epoch is in a ballot's top bits (``ballot.py``), so every ballot of the new
epoch outranks every ballot of the old. What each replica does:

- the commit point never passes a change of its epoch (``_set_commit`` stops at its slot
  and moves the replica to the next epoch, ``_enter_membership``): so every entry at or
  below the commit point is chosen in the epoch that decides its slot;
- a leader proposes nothing after its change (``config_slot``): in its epoch it would be
  void; commands that wait go back to their clients at the switch, who retry with the new
  leader. A new leader that finds a change among the values it re-proposes stops there too;
- at the switch the old leader tells the old members that the change is chosen (a
  heartbeat with the commit point) and steps down; the new epoch's voters raise their
  promise to the new epoch's floor, so no Accept or Prepare of the old epoch is taken
  again; acceptances above s at old-epoch ballots are void and dropped (``_void_old_epochs``),
  and a candidate ignores them in the promises it counts;
- only a voter of the epoch a replica knows campaigns; one that has seen a ballot of a later
  epoch waits to learn it (from a leader of that epoch: a message from a node it does not
  know is taken when its ballot is of a later epoch);
- a member that sees a node behind it by a change (an old epoch's Prepare, PreVote, Accept
  or Heartbeat; a refusal whose promise is of an earlier epoch, with the refuser's commit
  point; a wiped node's Recover, with the asker's) sends it the chosen values it lacks, up
  to the first change (``Chosen``; its snapshot where its log is compacted): a chosen value
  is a fact whoever tells it, and the new epoch may have no leader to tell it, because
  the node behind is the vote it needs (a learner promoted while cut off; a wiped voter
  still waiting for a report from one removed since);
- learners receive the log and answer,
  but their answers count for nothing; a replica of a removed node neither votes nor
  campaigns;
- a snapshot travels with the membership at its index (``membership.wrap_snapshot``) and
  installing one past a change moves the replica to that epoch.

Why one voter at a time, though safety does not need it (no slot is decided by two
epochs): the new epoch elects only with a majority of its voters, and with one voter
added or removed, any majority of the new voters includes a voter of the old majority
that chose s, which knows it is chosen and brings the others there.

 a heartbeat
reply carries the follower's point now, lower than the leader thought if it restarted
or lost its disk, and the leader resends from there (or sends a snapshot).
"""

from __future__ import annotations

from kvstore._native import PromiseTally, QuorumTally, decode_record, encode_record, majority, record_fields
from kvstore.paxos import messages as M
from kvstore.paxos.ballot import (EPOCH_SHIFT, ballot_epoch, ballot_node, ballot_round, epoch_floor, epoch_of_round,
                                  format_ballot, make_ballot, next_round)
from kvstore.paxos.batch import decode_batch, encode_batch
from kvstore.paxos.interface import (CANDIDATE, FOLLOWER, KIND_BATCH, KIND_CONFIG, KIND_NOOP, LEADER, PRE_CANDIDATE,
                                     Bugs, Config, Entry, Membership, NotLeader, PersistedState, Ready, Snapshot)
from kvstore.paxos.membership import bootstrap, check_change, check_membership, decode_membership, encode_membership
from kvstore.paxos.messages import NODES_MAX, Message
from kvstore.paxos.reads import Reads, _ReadIndexAsk, _ReadRound
from kvstore.paxos.recovery import WipedRecovery, _Recovery
from kvstore.paxos.snapshots import SnapshotTransfer, _SnapshotIn

#: The driver's vocabulary, importable from here as before the replica had rooms.
__all__ = ["Replica", "Config", "Bugs", "PersistedState", "Entry", "Snapshot", "Ready", "NotLeader",
           "Membership", "KIND_NOOP", "KIND_BATCH", "KIND_CONFIG", "FOLLOWER", "PRE_CANDIDATE", "CANDIDATE",
           "LEADER", "TALLY_WINDOW", "SLOT_SPAN_MAX", "ROUND_JUMP_MAX", "EPOCH_JUMP_MAX"]

TALLY_WINDOW = 4096
#: A peer's message is ignored when it names a slot this far above the commit point
#: (a Promise's or an Accept's record; a candidate fills every slot up to the highest
#: it is shown, one by one) or a round this far above the highest seen (``_ignored``).
#: Liveness does not need them: a leader falls back to sending a follower entries from
#: just above its match point (within a pipeline window of its commit point, or a
#: snapshot), a candidate that far behind a promiser is not the one to lead, and a
#: round grows by one per campaign.
SLOT_SPAN_MAX = 1 << 24
ROUND_JUMP_MAX = 1 << 20  # within one epoch (whose rounds are 2**30: ``ballot.py``)
#: A peer's message naming an epoch this far above this replica's is ignored (a replica
#: that far behind learns the memberships in between from the log, one by one).
EPOCH_JUMP_MAX = 1 << 10


class _Progress:
    """The leader's view of one follower. Invariant: match < next."""

    __slots__ = ("match", "next", "snapshot_sent_tick", "heard_tick")

    def __init__(self, next_slot: int) -> None:
        self.match = -1
        self.next = next_slot
        self.snapshot_sent_tick = -(1 << 30)
        self.heard_tick = -(1 << 30)  # the leader's tick of its last reply at this ballot


class Replica(Reads, SnapshotTransfer, WipedRecovery):
    def __init__(self, config: Config, persisted: PersistedState | None = None) -> None:
        if not (1 <= config.num_nodes <= NODES_MAX) or not (0 <= config.node < NODES_MAX):
            raise ValueError("bad node/num_nodes")
        if config.lease_read_ticks and not (0 < config.lease_read_ticks <= config.election_timeout_ticks - 2):
            raise ValueError("lease_read_ticks must be 0 (off) or at most election_timeout_ticks - 2 "
                             "(less the clock drift over an election timeout)")
        self.config = config
        self.id = config.node
        self.rng = config.rng
        self.bugs = config.bugs
        p = persisted or PersistedState()
        # Durable state (as of the last Ready handed out).
        self.promised = p.promised
        self.commit_index = p.commit_index
        self.snapshot_index = p.snapshot_index
        self.snapshot_data = p.snapshot_data
        # log: slot -> (ballot, kind, payload, record). Slots <= snapshot_index may be gone.
        self.log: dict = {}
        for rec in p.records:
            slot, ballot, kind, payload = decode_record(rec)
            self.log[slot] = (ballot, kind, payload, rec)
        self.log_start = self.snapshot_index + 1
        if self.log:
            self.log_start = min(self.log_start, min(self.log))
        # Invariant: snapshot_index <= applied_index <= commit_index
        self.commit_index = max(self.commit_index, self.snapshot_index)
        self.applied_index = p.applied_index if p.applied_index is not None else self.snapshot_index
        self.max_round = ballot_round(self.promised)
        self._membership_on_disk = p.membership
        # Volatile.
        self.role = FOLLOWER
        self.leader: int | None = None
        self.ballot = 0  # the ballot this replica leads/campaigns with
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self.ticks = 0
        self.attempts = 0
        self.randomized_timeout = 0
        self._reset_timeout()
        self.prevote_granted = 0
        self.prevote_round = 0
        self.reports: dict = {}
        self.progress: dict = {}  # a leader's: node -> _Progress, for every other member
        self.config_slot: int | None = None  # a leader's: the slot of its membership change
        self.pending_config: bytes | None = None  # a leader's: a change waiting for the window
        self._out_membership: Membership | None = None
        membership = p.membership or config.membership or bootstrap(config.num_nodes)
        check_membership(membership)
        self._set_membership(membership)
        self.next_slot = 0
        self.own_first_slot = 0  # first slot proposed at this leader's ballot
        self.pending_commands: list = []
        self.recent_active = 0
        self.read_seq = 0
        self.read_round: _ReadRound | None = None
        self.reads_queued: list = []
        self.reads_confirmed: list = []  # (read_index, request_id)
        self.remote_queued: list = []  # leader: (follower, context) of ReadIndex requests
        self.lease_until = -1  # lease reads: the leader serves them while ticks < this
        # Follower reads: the leader (node, ballot) they were asked of, the reads not yet
        # asked, the request in flight. Request numbers start at a random point so that an
        # answer to a request made before a restart never matches one made after it.
        self.follower_reads_leader: tuple | None = None
        self.follower_reads_queued: list = []
        self.read_ask: _ReadIndexAsk | None = None
        self.read_ask_seq = self.rng.randrange(1 << 40) << 20
        self._match_cache = (-1, -1)  # (ballot, match)
        self.snapshot_inbound: _SnapshotIn | None = None
        # Outputs for the next Ready.
        self._hard_dirty = False
        self._out_records: dict = {}
        self._deferred_records: dict = {}
        self._out_snapshot: Snapshot | None = None
        self._out_compacted: int | None = None
        self._out_messages: list = []
        self._out_dropped_commands: list = []
        self._out_dropped_reads: list = []
        self.trace: list | None = None  # a driver may set a list to collect state changes
        # Snapshot transfers this node sends (any role): receiver -> _SnapshotOut.
        self.snapshots_out: dict = {}
        # (sender, ballot) of a member that offered this replica, behind, its snapshot
        # (``Chosen`` with a snapshot index): its transfer is let in like a leader's
        self.snapshot_source: tuple | None = None
        self.snapshots_sent = 0  # transfers started (a count for the operator's metrics)
        # Campaign nonce: a Promise counts only if it echoes the Prepare's (see messages).
        self.campaign_context = 0
        # Wiped nodes ("Wiped nodes" in the module docstring). A node whose durable promise is 0
        # has never promised nor accepted anything, or has lost its disk: it does not vote
        # until it has recovered. The promise it persists at the end is the durable marker.
        self.recovery: _Recovery | None = None
        self.learn_ballot = 0  # a recovering node: the ballot of the leader it learns from
        self.noop_target = -1  # a leader: a recovering node waits for this slot to commit
        self.heard_commit = self.commit_index  # the highest commit point a leader told us
        # Memberships chosen above the applied point (entries the application applies again).
        self.snapshot_membership = self.membership if self.snapshot_index >= self.membership.start - 1 else None
        self._walk_memberships()
        if (self.promised == 0 and self.is_voter and len(self.membership.voters) > 1
                and not self.bugs.wiped_votes_at_once):
            self.recovery = _Recovery(self.rng.randrange(1 << 40) << 20)
            # Records above the commit point are not known chosen and were not announced
            # (a vote is announced only once its promise is durable): a learner drops them.
            for slot in [s for s in self.log if s > self.commit_index]:
                del self.log[slot]
            self._log_event("recovering: no Paxos state on disk; not voting until recovered")
            self._recovery_ask()

    # ------------------------------------------------------------------ helpers
    def _log_event(self, what: str) -> None:
        if self.trace is not None:
            self.trace.append(f"n{self.id} {what}")

    def _reset_timeout(self) -> None:
        t = self.config.election_timeout_ticks
        spread = t * min(1 << self.attempts, 8)
        self.randomized_timeout = t + self.rng.randrange(spread)

    def _send(self, m: Message) -> None:
        self._out_messages.append(m)

    def _persist_record(self, slot: int, rec: bytes) -> None:
        if self.bugs.announce_before_persist:
            self._deferred_records[slot] = rec
        else:
            self._out_records[slot] = rec

    def _store(self, slot: int, ballot: int, kind: int, payload: bytes, rec: bytes | None = None) -> None:
        if rec is None:
            rec = encode_record(slot, ballot, kind, payload)
        self.log[slot] = (ballot, kind, payload, rec)
        self._persist_record(slot, rec)

    def _set_promised(self, b: int) -> None:
        if b != self.promised:
            assert b > self.promised, "a promise never goes down"
            self.promised = b
            self._hard_dirty = True
        self.max_round = max(self.max_round, ballot_round(b))

    def _set_commit(self, c: int) -> None:
        """Move the commit point to ``c``, but never past a membership change of this epoch:
        the commit point stops at its slot and the replica moves to the next epoch
        ("Membership"); what lies above is decided by the new voters, and learned again."""
        if c <= self.commit_index:
            return
        log = self.log
        start = max(self.commit_index + 1, self.membership.start)
        for slot in range(start, c + 1):
            e = log.get(slot)
            if e is not None and e[1] == KIND_CONFIG:
                self.commit_index = slot
                self._hard_dirty = True
                self._enter_config_entry(slot)
                return
        self.commit_index = c
        self._hard_dirty = True

    # ------------------------------------------------------------------ membership
    def _set_membership(self, m: Membership) -> None:
        """Make ``m`` the membership this replica votes and counts in."""
        self.membership = m
        self.voters = m.voters
        self.vpos = {node: i for i, node in enumerate(m.voters)}  # dense, for the tallies
        self.voter_mask = sum(1 << v for v in m.voters)
        self.member_set = frozenset(m.voters) | frozenset(m.learners)
        self.peers = tuple(i for i in m.members if i != self.id)
        self.quorum = majority(len(m.voters))
        self.promise_tally = PromiseTally(len(m.voters))
        self.tally = QuorumTally(len(m.voters), TALLY_WINDOW)

    @property
    def is_voter(self) -> bool:
        return self.id in self.vpos

    @property
    def removed(self) -> bool:
        """This node is not a member of the epoch this replica is in: it neither votes nor
        campaigns (it keeps answering what it knows; its node may stop serving the shard)."""
        return self.id not in self.member_set

    def _votes(self, mask: int) -> int:
        return bin(mask & self.voter_mask).count("1")

    def _walk_memberships(self) -> None:
        """At start: move through the membership changes chosen above the application's
        applied point (up to the commit point, in slot order), then drop what this epoch
        voids (``_void_old_epochs``)."""
        for slot in sorted(s for s in self.log if self.membership.start <= s <= self.commit_index):
            if self.log[slot][1] == KIND_CONFIG:
                self._enter_config_entry(slot, starting=True)
        self._void_old_epochs()

    def _void_old_epochs(self) -> None:
        """An acceptance above this epoch's start at an earlier epoch's ballot is void (that
        epoch ended before its slot): forget it, so that it is never reported or committed."""
        m = self.membership
        if m.epoch:
            for slot in [s for s, e in self.log.items() if s >= m.start and ballot_epoch(e[0]) < m.epoch]:
                del self.log[slot]

    def _enter_config_entry(self, slot: int, starting: bool = False) -> None:
        try:
            m = decode_membership(self.log[slot][2], slot)
        except ValueError as e:  # a chosen change that is not one: applied as a no-op
            self._log_event(f"slot {slot}: membership change ignored: {e}")
            return
        if m.epoch != self.membership.epoch + 1:
            self._log_event(f"slot {slot}: membership epoch {m.epoch} does not follow "
                            f"{self.membership.epoch}; ignored")
            return
        self._enter_membership(m, starting)

    def _enter_membership(self, m: Membership, starting: bool = False) -> None:
        """Move to epoch ``m`` (its change is chosen, or a snapshot past it installed).

        The old epoch's leader steps down (its proposals and reads go back to their
        clients); every voter of the new epoch raises its promise to the new epoch's
        floor, so no message of the old epoch is accepted here again (and a voter that
        was a learner has a durable promise: it is not taken for a wiped node later);
        acceptances above the change at old ballots are void; the old leader, if it
        still votes, campaigns at once.
        """
        was_leader = self.role == LEADER
        self._log_event(f"membership epoch {m.epoch} from slot {m.start}: voters {list(m.voters)}, "
                        f"learners {list(m.learners)}")
        if was_leader:
            # The change is chosen: say so to the old epoch's members (a heartbeat with the
            # commit point), so they move on now, not after an election of the old epoch.
            for i in self.peers:
                self._send(Message(M.HEARTBEAT, i, self.id, ballot=self.ballot, commit_index=self.commit_index,
                                   context=self.read_seq))
        if self.role != FOLLOWER:
            self._become_follower(None)
        self._drop_follower_reads()
        self._set_membership(m)
        self.progress = {}
        self.config_slot = None
        self.pending_config = None
        self.snapshots_out = {}
        self.reports = {}
        self.prevote_granted = 0
        self.leader = None
        self._out_membership = m
        if not starting:
            self._void_old_epochs()
        if self.recovery is not None:
            if self.is_voter and len(m.voters) > 1:
                self._restart_recovery()
            else:
                self.recovery = None
                self.learn_ballot = 0
        elif self.promised < epoch_floor(m.epoch) and not starting:
            self._set_promised(epoch_floor(m.epoch))
        if was_leader and self.is_voter:
            self.election_elapsed = self.randomized_timeout  # campaign at the next tick

    def propose_membership(self, voters, learners, info: bytes = b"") -> None:
        """Propose the next membership (the leader only). It takes effect when its entry
        commits (``Ready.membership``). Raises ``NotLeader``, or ``ValueError`` saying why
        the change cannot be made (``membership.check_change``; one at a time)."""
        if self.role != LEADER:
            raise NotLeader(self.leader_hint)
        if self.config_slot is not None or self.pending_config is not None:
            raise ValueError(f"a membership change (to epoch {self.membership.epoch + 1}) is already "
                             f"in progress; wait until it commits")
        nxt = check_change(self.membership, voters, learners, info)
        self._check_new_voters_answer(nxt)
        self.pending_config = encode_membership(nxt)
        self._log_event(f"proposing membership epoch {nxt.epoch}: voters {list(nxt.voters)}, "
                        f"learners {list(nxt.learners)}")

    def _check_new_voters_answer(self, nxt: Membership) -> None:
        """Refuse a change of voters after which the new voters would hold no majority that
        answers this leader now (etcd's strict reconfiguration check): it would commit, and
        the new epoch could elect no one. A voter answers if it acknowledged this ballot
        within the last election timeout; one that does not vote yet (it is recovering)
        does not. Found by the simulator: a voter removed while two others were recovering
        (--members --nodes 5 --seed 424); the shard never had a leader again."""
        if set(nxt.voters) == set(self.membership.voters):
            return
        t = self.config.election_timeout_ticks
        answering = [v for v in nxt.voters if v == self.id or (
            (pr := self.progress.get(v)) is not None and self.ticks - pr.heard_tick <= t)]
        if len(answering) < majority(len(nxt.voters)):
            raise ValueError(f"the new voters {list(nxt.voters)} would have no majority that votes: only "
                             f"{answering} answer the leader now (the others are down, cut off, or "
                             f"still recovering); bring them back first")

    def _last_slot(self) -> int:
        return max(self.log) if self.log else self.snapshot_index

    def _match(self, b: int) -> int:
        """Highest slot such that every slot up to it is chosen-known or accepted at ``b``."""
        cb, cm = self._match_cache
        s = max(cm, self.commit_index) if cb == b else self.commit_index
        log = self.log
        while True:
            e = log.get(s + 1)
            if e is None or e[0] != b:
                break
            s += 1
        self._match_cache = (b, s)
        return s

    @property
    def is_leader(self) -> bool:
        return self.role == LEADER

    @property
    def leader_hint(self) -> int | None:
        return self.id if self.role == LEADER else self.leader

    # ------------------------------------------------------------------ role changes
    def _become_follower(self, leader: int | None) -> None:
        if self.role != FOLLOWER or leader != self.leader:
            self._log_event(f"follower (leader {leader}, promised {format_ballot(self.promised)})")
        if self.role == LEADER:
            self._out_dropped_commands.extend(self.pending_commands)
            self.pending_commands = []
            self._fail_back_reads(self.reads_queued, self.read_round)
            self.reads_queued, self.read_round = [], None
            self.remote_queued = []
            self.lease_until = -1
        self.role = FOLLOWER
        self.leader = leader
        self.election_elapsed = 0
        self._reset_timeout()

    def campaign(self) -> None:
        """Start an election now (pre-vote first when configured). Only a voter of the
        epoch it knows campaigns; one that has seen a later epoch waits to learn it."""
        if self.role == LEADER or self.recovery is not None or not self.is_voter:
            return
        r = next_round(self.max_round, self.membership.epoch)
        if r is None:
            if epoch_of_round(self.max_round) > self.membership.epoch:
                self._log_event("a later membership epoch exists; learning it before campaigning")
            else:  # unreachable legitimately (ballot.py)
                self._log_event("no ballot left to campaign with (round cap)")
            self._become_follower(self.leader if self.role == FOLLOWER else None)
            return
        self._drop_follower_reads()
        if self.config.pre_vote and len(self.voters) > 1:
            self.role = PRE_CANDIDATE
            self.leader = None
            self.election_elapsed = 0
            self.prevote_granted = 1 << self.id
            self.prevote_round = r
            b = make_ballot(r, self.id)
            # A grant counts only for this attempt (its reply echoes the nonce): one held by
            # a partition and delivered after the heal, when its granter follows a new
            # leader, would start a campaign that deposes that leader.
            self.campaign_context = self.rng.randrange(1 << 40) << 20
            self._log_event(f"pre-vote for {format_ballot(b)}")
            for i in self.voters:
                if i != self.id:
                    self._send(Message(M.PRE_VOTE, i, self.id, ballot=b, commit_index=self.commit_index,
                                       context=self.campaign_context))
            self._reset_timeout()
            return
        self._campaign_real()

    def _campaign_real(self) -> None:
        r = next_round(self.max_round, self.membership.epoch)
        if r is None or not self.is_voter:  # a later epoch seen meanwhile (``campaign``)
            self._become_follower(None)
            return
        self.max_round = r
        b = make_ballot(self.max_round, self.id)
        self._set_promised(b)
        self.role = CANDIDATE
        self.leader = None
        self.ballot = b
        self.election_elapsed = 0
        self.attempts += 1
        self._reset_timeout()
        self._log_event(f"campaign ballot {format_ballot(b)}")
        self.promise_tally.reset(b)
        self.campaign_context = self.rng.randrange(1 << 40) << 20
        self.reports = {self.id: ([(s, *self.log[s]) for s in sorted(self.log) if s > self.commit_index],
                                  self.commit_index)}
        if self._promises_elect(self.id):
            self._become_leader()
            return
        for i in self.voters:
            if i != self.id:
                self._send(Message(M.PREPARE, i, self.id, ballot=b, commit_index=self.commit_index,
                                   context=self.campaign_context))

    def _records_above(self, c: int) -> tuple:
        return tuple(self.log[s][3] for s in sorted(self.log) if s > c)

    def _become_leader(self) -> None:
        self._drop_follower_reads()
        b = self.ballot
        # Slots at or below a promiser's commit point are chosen, and its Promise carried them
        # all (``_on_promise`` counts no Promise that does not): the new leader learns them as
        # chosen and commits them at once. This is how a candidate behind a promiser catches up
        # before it leads; re-proposing by ballot alone would give the same values, but only
        # if no promiser ever omitted one, and a missing chosen slot must never become a no-op.
        chosen: dict = {}
        for node in sorted(self.reports):
            decoded, their_commit = self.reports[node]
            for slot, rb, kind, payload, rec in decoded:
                if self.commit_index < slot <= their_commit:
                    chosen[slot] = (rb, kind, payload, rec)
        for slot in sorted(chosen):
            rb, kind, payload, rec = chosen[slot]
            self._store(slot, rb, kind, payload, rec)
        if chosen:
            epoch = self.membership.epoch
            self._set_commit(max(chosen))
            if self.membership.epoch != epoch:
                return  # a membership change was among them: this epoch's campaign is over
        c = self.commit_index
        start = self.membership.start
        # Rule 3: per slot above the commit point, the value accepted at the highest
        # ballot among the promises (a majority), a no-op where none.
        best: dict = {}
        reporters = [self.id] if self.bugs.recover_from_own_log else sorted(self.reports)
        for node in reporters:
            for slot, rb, kind, payload, _rec in self.reports[node][0]:
                if slot <= c or (slot >= start and ballot_epoch(rb) < self.membership.epoch):
                    continue  # chosen already, or void (accepted in an epoch that had ended)
                cur = best.get(slot)
                if cur is None:
                    best[slot] = (rb, kind, payload)
                elif self.bugs.repropose_lowest:
                    if rb < cur[0]:
                        best[slot] = (rb, kind, payload)
                elif rb > cur[0]:
                    best[slot] = (rb, kind, payload)
        top = max(best) if best else c
        top = max(top, c)
        self.reports = {}
        self.role = LEADER
        self.leader = self.id
        self.attempts = 0
        self.heartbeat_elapsed = 0
        self.election_elapsed = 0
        self.recent_active = 1 << self.id
        self._log_event(f"leader at ballot {format_ballot(b)}, re-proposing {c + 1}..{top}")
        self.tally.reset(b, c)
        self.config_slot = self.pending_config = None
        for slot in range(c + 1, top + 1):
            v = best.get(slot)
            kind, payload = (v[1], v[2]) if v is not None else (KIND_NOOP, b"")
            self._store(slot, b, kind, payload)
            if kind == KIND_CONFIG and self.config_slot is None:
                self.config_slot = slot  # a change under way: nothing new is proposed after it
        self.own_first_slot = top + 1
        self.noop_target = -1
        self._store(top + 1, b, KIND_NOOP, b"")
        self.next_slot = top + 2
        commit = self.tally.record(self.vpos[self.id], c + 1, top + 1, b)
        self.progress = {i: _Progress(c + 1) for i in self.peers}
        for i in self.peers:
            self._send_entries(i)
        self._on_commit(commit)

    # ------------------------------------------------------------------ public inputs
    def tick(self) -> None:
        self.ticks += 1
        if self.follower_reads_leader is not None:
            self._check_follower_reads()
        if self.snapshots_out:
            self._tick_snapshots()
        if self._deferred_records and self.ticks % self.config.election_timeout_ticks == 0:
            # Planted bug (a): the write-behind buffer is flushed only now.
            self._out_records.update(self._deferred_records)
            self._deferred_records = {}
        if self.role == LEADER:
            self.heartbeat_elapsed += 1
            self.election_elapsed += 1
            if self.election_elapsed >= self.config.election_timeout_ticks:
                # Check quorum: step down if we did not hear from a majority lately.
                self.election_elapsed = 0
                if self._votes(self.recent_active) < self.quorum:
                    self._log_event("lost contact with a majority; stepping down")
                    self._become_follower(None)
                    return
                self.recent_active = 1 << self.id
            if self.heartbeat_elapsed >= self.config.heartbeat_interval_ticks:
                self.heartbeat_elapsed = 0
                if self.config.lease_read_ticks and self.read_round is None and self._own_noop_committed():
                    self._start_read_round()  # an empty round: it renews the lease
                else:
                    self._broadcast_heartbeat()
            return
        self.election_elapsed += 1
        rc = self.recovery
        if rc is not None:
            if self.ticks - rc.asked_tick >= self.config.election_timeout_ticks:
                self._recovery_ask()
            self._advance_recovery()
            return
        if self.election_elapsed >= self.randomized_timeout:
            self.campaign()

    def propose(self, command: bytes) -> bool:
        """Queue a client command; False when this replica does not lead (see ``leader_hint``)."""
        if self.role != LEADER:
            return False
        if len(self.pending_commands) >= self.config.pending_commands_max:
            self._out_dropped_commands.append(command)
            return True
        self.pending_commands.append(command)  # cut into entries at the next ready()
        return True


    def compact(self, index: int, data: bytes) -> None:
        """The application has durably saved a snapshot of its state through ``index``.

        The replica keeps it to send to lagging followers and drops log entries
        more than ``log_retain_slots`` below it.
        """
        if index <= self.snapshot_index or index > self.applied_index or index < self.membership.start - 1:
            return  # (a point before this epoch began: its voters are not the current ones)
        self.snapshot_index = index
        self.snapshot_data = data
        self.snapshot_membership = self.membership
        cut = index - self.config.log_retain_slots
        if cut >= self.log_start:
            for s in range(self.log_start, cut + 1):
                self.log.pop(s, None)
            self.log_start = cut + 1
            self._out_compacted = cut

    def _ignored(self, m: Message) -> bool:
        """Guards against what no honest peer sends (``messages.from_wire`` checked each
        field's range; these need this replica's state). Ignoring a message is always
        safe in Paxos: it only costs a retransmission."""
        if m.to != self.id or m.frm == self.id:
            return True
        if m.frm not in self.member_set and ballot_epoch(m.ballot) <= self.membership.epoch:
            return True  # not a member of this epoch, and not of a later one that we would learn
        if self.bugs.unchecked_peer_input:
            return False
        t = m.type
        if self._round_too_far(ballot_round(m.ballot)) or self._round_too_far(ballot_round(m.hint)):
            return True
        if t == M.SNAPSHOT:
            # A snapshot replaces the state whole, past every per-slot check; only the
            # leader of the ballot this replica promised, whose commit point it already
            # trusts, may send one (the leader of a ballot is its node index).
            # (A recovering replica has promised nothing yet: it follows the ballot of the
            # leader it learns from, ``_followed_ballot``.)
            return ((m.ballot != self._followed_ballot() or ballot_node(m.ballot) != m.frm)
                    and (m.frm, m.ballot) != self.snapshot_source and not self.bugs.snapshot_from_anyone)
        if t == M.ACCEPT or t == M.PROMISE or t == M.CHOSEN:
            top = self.commit_index + SLOT_SPAN_MAX
            return any(record_fields(rec)[0] > top for rec in m.records)
        if (t == M.ACCEPTED or t == M.HEARTBEAT_REPLY) and not m.reject:
            # a follower can have accepted only what this leader proposed (slots < next_slot)
            return self.role == LEADER and m.ballot == self.ballot and m.match_index >= self.next_slot
        return False

    def _ahead_of_us(self, hint: int) -> bool:
        """A rejection by a replica of a later epoch: it only withholds its vote. This epoch's
        leader or candidate goes on with the others: it may be the one that must commit the
        change that ends the epoch (the replica ahead learned it; the others wait for it),
        and stepping down would leave both epochs without a leader (sim seed 1021)."""
        return ballot_epoch(hint) > self.membership.epoch

    def _saw_round(self, r: int) -> None:
        """A peer's promise told us of round ``r``: campaign above it next time. A round of
        an epoch this replica has not reached is not taken (it learns that epoch from the log
        first; one forged would otherwise stop it campaigning for good)."""
        if epoch_of_round(r) <= self.membership.epoch and r > self.max_round:
            self.max_round = r

    def _round_too_far(self, r: int) -> bool:
        """A round no honest peer sends yet: in an epoch far above ours, or far above the
        highest round we have seen in its own epoch (``ROUND_JUMP_MAX``, ``EPOCH_JUMP_MAX``)."""
        e = epoch_of_round(r)
        if e > self.membership.epoch + EPOCH_JUMP_MAX:
            return True
        seen = self.max_round if epoch_of_round(self.max_round) == e else e << EPOCH_SHIFT
        return r > seen + ROUND_JUMP_MAX

    def step(self, m: Message) -> None:
        if self._ignored(m):
            return
        t = m.type
        if t in _PROPOSALS:
            e = ballot_epoch(m.ballot)
            if e > self.membership.epoch:
                self._from_later_epoch(m)
                return
            if e < self.membership.epoch and m.commit_index < self.commit_index:
                self._send_chosen(m.frm, m.commit_index)  # it missed a change: tell it
        elif (m.reject and (t == M.PROMISE or t == M.PRE_VOTE_REPLY) and m.commit_index < self.commit_index
              and ballot_epoch(m.hint) < self.membership.epoch):
            # a voter of our epoch that has not reached it (a learner promoted by a change it
            # missed, or a recovering one) refuses us: it must learn the change first
            self._send_chosen(m.frm, m.commit_index)
        if t == M.PRE_VOTE:
            self._on_pre_vote(m)
        elif t == M.PRE_VOTE_REPLY:
            self._on_pre_vote_reply(m)
        elif t == M.PREPARE:
            self._on_prepare(m)
        elif t == M.PROMISE:
            self._on_promise(m)
        elif t in (M.ACCEPT, M.HEARTBEAT):
            self._on_accept(m)
        elif t in (M.ACCEPTED, M.HEARTBEAT_REPLY):
            self._on_accepted(m)
        elif t == M.SNAPSHOT:
            self._on_snapshot(m)
        elif t == M.READ_INDEX:
            self._on_read_index(m)
        elif t == M.READ_INDEX_REPLY:
            self._on_read_index_reply(m)
        elif t == M.SNAPSHOT_ACK:
            self._on_snapshot_ack(m)
        elif t == M.RECOVER:
            self._on_recover(m)
        elif t == M.RECOVER_REPLY:
            self._on_recover_reply(m)
        elif t == M.CHOSEN:
            self._on_chosen(m)
        if self.recovery is not None:
            self._advance_recovery()
        if self.follower_reads_leader is not None:
            self._check_follower_reads()

    # ------------------------------------------------------------------ phase 1
    def _heard_leader_recently(self) -> bool:
        if self.role == LEADER:
            return True
        if self.config.lease_read_ticks and self.ticks < self.config.election_timeout_ticks:
            return True  # just (re)started: an old leader's lease may still hold on our word
        return self.leader is not None and self.election_elapsed < self.config.election_timeout_ticks

    def _on_pre_vote(self, m: Message) -> None:
        grant = (self.recovery is None and m.ballot > self.promised and not self._heard_leader_recently()
                 and m.commit_index + 1 >= self.log_start)
        self._send(Message(M.PRE_VOTE_REPLY, m.frm, self.id, ballot=m.ballot,
                           reject=not grant, hint=self.promised, context=m.context,
                           commit_index=self.commit_index))

    def _on_pre_vote_reply(self, m: Message) -> None:
        if self.role != PRE_CANDIDATE:
            return
        if m.reject:
            self._saw_round(ballot_round(m.hint))
            return
        if ballot_round(m.ballot) != self.prevote_round or m.context != self.campaign_context:
            return  # a grant to another attempt (held by the network, or a replay)
        self.prevote_granted |= 1 << m.frm
        if self._votes(self.prevote_granted) >= self.quorum:
            self._campaign_real()

    def _on_prepare(self, m: Message) -> None:
        if self.recovery is not None:
            return  # no vote before recovery; a lost message, to the candidate
        b = m.ballot
        if b < self.promised or (b == self.promised and ballot_node(b) != m.frm):
            self._send(Message(M.PROMISE, m.frm, self.id, ballot=b, reject=True, hint=self.promised,
                               commit_index=self.commit_index))
            return
        # Leader stickiness: a follower that hears a live leader does not depose it.
        if b > self.promised and self._heard_leader_recently() and self.leader != m.frm:
            self._send(Message(M.PROMISE, m.frm, self.id, ballot=b, reject=True, hint=self.promised,
                               commit_index=self.commit_index))
            return
        # A Promise must carry every accepted value above the candidate's commit point. If we
        # compacted slots it has not committed, we cannot: it must catch up first. Checked on
        # every copy of a Prepare, a duplicate of one already promised included: a snapshot
        # installed (or a compaction) between two copies drops slots the first answer held.
        duplicate = b == self.promised
        if m.commit_index + 1 < self.log_start and not (duplicate and self.bugs.duplicate_prepare_unchecked):
            self._send(Message(M.PROMISE, m.frm, self.id, ballot=b, reject=True, hint=self.promised,
                               commit_index=self.commit_index))
            self._send_snapshot(m.frm, b)  # ignored by the candidate now (``_ignored``): issue 18
            return
        if b > self.promised:
            self._set_promised(b)
            if self.role != FOLLOWER:
                self._become_follower(None)
            self.leader = None
            self.election_elapsed = 0
        self._send(Message(M.PROMISE, m.frm, self.id, ballot=b, commit_index=self.commit_index,
                           records=self._records_above(m.commit_index), context=m.context))

    def _on_promise(self, m: Message) -> None:
        if m.reject:
            if m.hint > self.promised or (self.role == CANDIDATE and m.hint > self.ballot):
                self._saw_round(ballot_round(m.hint))
                if (self.role in (CANDIDATE, LEADER) and m.hint > self.ballot
                        and not self._ahead_of_us(m.hint)):
                    self._become_follower(None)
            return
        if self.role != CANDIDATE or m.ballot != self.ballot or m.context != self.campaign_context:
            return  # not for this campaign (a Promise to an earlier incarnation's Prepare, say)
        if m.frm in self.reports:
            return  # a duplicate; count each vote once
        decoded = [(*decode_record(rec), rec) for rec in m.records]
        if m.commit_index > self.commit_index and not self.bugs.duplicate_prepare_unchecked:
            # The promiser knows slots up to its commit point are chosen; unless its records
            # show every one of them above ours, this Promise cannot tell us what they hold.
            shown = {slot for slot, *_ in decoded}
            if any(s not in shown for s in range(self.commit_index + 1, m.commit_index + 1)):
                self._log_event(f"promise from {m.frm} omits chosen slots "
                                f"{self.commit_index + 1}..{m.commit_index}; not counted")
                return
        self.reports[m.frm] = (decoded, m.commit_index)
        if self._promises_elect(m.frm):
            self._become_leader()

    def _promises_elect(self, node: int) -> bool:
        """Count ``node``'s promise for our ballot (once); True when they make a majority."""
        pos = self.vpos.get(node)
        if pos is None:
            return False  # a learner's promise is not a vote
        elected = self.promise_tally.record(pos, self.ballot)
        if self.bugs.election_quorum_short:
            return elected or len(self.reports) >= self.quorum - 1
        return elected

    # ------------------------------------------------------------------ phase 2
    def _on_accept(self, m: Message) -> None:
        b = m.ballot
        reply_type = M.ACCEPTED if m.type == M.ACCEPT else M.HEARTBEAT_REPLY
        if m.commit_index > self.heard_commit:
            self.heard_commit = m.commit_index
        if self.recovery is not None:
            self._learn(m, reply_type)
            return
        if b < self.promised and not self.bugs.accept_below_promise:
            self._send(Message(reply_type, m.frm, self.id, ballot=b, reject=True,
                               hint=self.promised, context=m.context))
            return
        if b > self.promised:
            self._set_promised(b)
        if self.role != FOLLOWER or self.leader != m.frm:
            self._become_follower(m.frm)
        self.learn_ballot = 0  # following a leader of our epoch: no later one to learn from
        self.election_elapsed = 0
        self.attempts = 0
        learned = set()
        for rec in m.records:
            slot, rb, kind, payload = decode_record(rec)
            if slot <= self.commit_index or slot < self.log_start:
                continue
            if slot <= m.commit_index:
                learned.add(slot)  # at or below the sender's commit point: chosen
            elif rb != b:
                continue  # never accept at a ballot other than the promised one
            cur = self.log.get(slot)
            if cur is not None and (cur[3] == rec or (slot in learned and cur[1:3] == (kind, payload))):
                # Already held; or the chosen value is held, accepted at a ballot of ours that
                # may be higher than the record's: keep our acceptance (and spare a write).
                continue
            self._store(slot, rb, kind, payload, rec)
        commit = self.commit_index
        log = self.log
        while commit < m.commit_index:
            e = log.get(commit + 1)
            if e is None or (e[0] != b and (commit + 1) not in learned and not self.bugs.commit_any_ballot):
                break
            commit += 1
        self._set_commit(commit)
        self._send(Message(reply_type, m.frm, self.id, ballot=b, match_index=self._match(b),
                           commit_index=self.commit_index, context=m.context))

    def _on_accepted(self, m: Message) -> None:
        if m.reject:
            if m.hint > self.promised:
                self._saw_round(ballot_round(m.hint))
                if self.role == LEADER and not self._ahead_of_us(m.hint):
                    self._log_event(f"rejected by {m.frm} (promised {format_ballot(m.hint)})")
                    self._become_follower(None)
            elif m.hint == 0 and self.role == LEADER and m.ballot == self.ballot:
                # A node that does not vote yet (it is recovering: ``_learn``) holds the chosen
                # values through ``match_index``: send it what follows (or a snapshot).
                pr = self.progress.get(m.frm)
                if pr is None:
                    return
                pr.match = m.match_index
                if m.type == M.HEARTBEAT_REPLY or pr.next <= pr.match:
                    pr.next = pr.match + 1
                self._send_entries(m.frm)
            return
        if self.role != LEADER or m.ballot != self.ballot:
            return
        pr = self.progress.get(m.frm)
        if pr is None:
            return  # not a member of this epoch (a late reply of one removed)
        self.recent_active |= 1 << m.frm
        pr.heard_tick = self.ticks
        if m.match_index > pr.match or m.type == M.HEARTBEAT_REPLY:
            # A heartbeat reply says where the follower is now: lower than we thought if it
            # restarted or lost its disk since (then resend from there, or a snapshot).
            pr.match = m.match_index
        pos = self.vpos.get(m.frm, m.frm % len(self.voters) if self.bugs.learner_votes else None)
        if m.match_index > self.commit_index and pos is not None:  # a learner's acceptance is no vote
            self._on_commit(self.tally.record(pos, self.commit_index + 1, m.match_index, self.ballot))
            if self.role != LEADER:
                return  # the commit ended this epoch (a membership change)
        if m.type == M.HEARTBEAT_REPLY:
            pr.next = pr.match + 1  # retransmit whatever was lost
            rr = self.read_round
            if rr is not None and m.context >= rr.seq:
                rr.acks |= 1 << m.frm
                self._maybe_confirm_reads()
        elif pr.next <= pr.match:
            pr.next = pr.match + 1
        self._send_entries(m.frm)

    def _on_commit(self, commit: int) -> None:
        if commit > self.commit_index:
            self._set_commit(commit)
            self._flush_proposals()
            self._maybe_start_read_round()

    def _send_entries(self, to: int) -> None:
        pr = self.progress[to]
        last = self.next_slot - 1
        if pr.next > last:
            return
        if pr.next < self.log_start:
            if (to not in self.snapshots_out
                    and self.ticks - pr.snapshot_sent_tick >= self.config.election_timeout_ticks):
                pr.snapshot_sent_tick = self.ticks
                self._send_snapshot(to, self.ballot)
            return
        hi = min(last, pr.next + self.config.entries_per_message_max - 1)
        recs = tuple(self.log[s][3] for s in range(pr.next, hi + 1))
        self._send(Message(M.ACCEPT, to, self.id, ballot=self.ballot, commit_index=self.commit_index,
                           records=recs))
        pr.next = hi + 1

    def _flush_proposals(self) -> None:
        if self.role != LEADER or not (self.pending_commands or self.noop_target >= self.next_slot
                                       or self.pending_config is not None):
            return
        if self.config_slot is not None:
            return  # nothing follows a membership change in its epoch (it would be void)
        first = self.next_slot
        cfg = self.config
        while self.noop_target >= self.next_slot and self.next_slot <= self.commit_index + cfg.pipeline_window:
            # a recovering node waits for these slots to be chosen (``_on_recover``); this
            # leader's phase 1 covered every slot, so it may fill them with no-ops
            self._store(self.next_slot, self.ballot, KIND_NOOP, b"")
            self.next_slot += 1
        while self.pending_commands and self.next_slot <= self.commit_index + cfg.pipeline_window:
            batch = self.pending_commands[:cfg.batch_commands_max]
            del self.pending_commands[:cfg.batch_commands_max]
            self._store(self.next_slot, self.ballot, KIND_BATCH, encode_batch(batch))
            self.next_slot += 1
        if (self.pending_config is not None and not self.pending_commands
                and self.next_slot <= self.commit_index + cfg.pipeline_window):
            # after every command proposed before it, and then nothing more in this epoch
            self._store(self.next_slot, self.ballot, KIND_CONFIG, self.pending_config)
            self.config_slot, self.pending_config = self.next_slot, None
            self.next_slot += 1
        if self.next_slot == first:
            return
        commit = self.tally.record(self.vpos[self.id], first, self.next_slot - 1, self.ballot)
        for i, pr in self.progress.items():
            if pr.next == first:
                self._send_entries(i)
        if commit > self.commit_index:
            self._on_commit(commit)

    def _broadcast_heartbeat(self) -> None:
        ctx = self.read_round.seq if self.read_round is not None else self.read_seq
        for i in self.peers:
            if True:
                self._send(Message(M.HEARTBEAT, i, self.id, ballot=self.ballot,
                                   commit_index=self.commit_index, context=ctx))

    # ------------------------------------------------------------------ reads (rule 6)


    # ------------------------------------------------------------------ follower reads


    # ------------------------------------------------------------------ snapshots
    # Flow control: a sender keeps at most ``snapshot_window_chunks`` chunks in flight to one
    # receiver; the receiver acknowledges the bytes it holds in order (SnapshotAck) and keeps
    # a few chunks that arrive early; each ack slides the window. With no ack for a while the
    # sender goes back to the last acknowledged offset (not to the start), waiting twice as
    # long each time nothing moved; a transfer with no progress for many election timeouts
    # is dropped (the leader starts it again if the follower still needs it, and the
    # receiver's first ack moves it to where it stands). So a snapshot of any size finishes
    # over a network that loses, duplicates and reorders, at a window's pace.


    # ------------------------------------------------------------------ wiped nodes


    def _from_later_epoch(self, m: Message) -> None:
        """A leader or candidate of an epoch this replica has not reached (it missed
        membership changes). It promises nothing at a ballot of an epoch it does not know
        (a forged one would silence it for good), and votes for no one there; from a
        leader it learns the chosen values (records at or below its commit point) until
        its own commit point passes the changes in between, and says how far it holds
        them so that the leader sends what follows (or a snapshot)."""
        if m.type in (M.PREPARE, M.PRE_VOTE):
            reply = M.PROMISE if m.type == M.PREPARE else M.PRE_VOTE_REPLY
            self._send(Message(reply, m.frm, self.id, ballot=m.ballot, reject=True, hint=self.promised,
                               commit_index=self.commit_index,
                               context=m.context if reply == M.PRE_VOTE_REPLY else 0))
            return
        if self.recovery is not None:
            self._learn(m, M.ACCEPTED if m.type == M.ACCEPT else M.HEARTBEAT_REPLY)
            return
        if m.ballot >= self.learn_ballot:
            self.learn_ballot = m.ballot
            if self.role != FOLLOWER:
                self._become_follower(m.frm)
            self.leader = m.frm
            self.election_elapsed = 0
        self._take_chosen(m.records, m.commit_index)
        self._send_progress(M.ACCEPTED if m.type == M.ACCEPT else M.HEARTBEAT_REPLY, m.frm, m.ballot, m.context)

    def _take_chosen(self, records: tuple, upto: int) -> None:
        """Store the chosen values (records at or below ``upto``, a peer's commit point) that
        extend the commit point, through the first membership change among them: everything
        stored is then at or below the commit point (nothing held above the promise:
        ``check_recovered`` refuses that at a restart), and what follows a change is learned
        again under the epoch it begins."""
        chosen = {}
        for rec in records:
            slot, rb, kind, payload = decode_record(rec)
            if self.commit_index < slot <= upto and slot >= self.log_start:
                chosen[slot] = (rb, kind, payload, rec)
        commit = self.commit_index
        while commit + 1 in chosen:
            commit += 1
            rb, kind, payload, rec = chosen[commit]
            if self.log.get(commit, (None, None, None, None))[3] != rec:
                self._store(commit, rb, kind, payload, rec)
            if kind == KIND_CONFIG:
                break
        self._set_commit(commit)

    def _send_chosen(self, to: int, after: int) -> None:
        """Send ``to`` the chosen values right above its commit point ``after``, through the
        first membership change among them (``Chosen``). Any member may: a chosen value is a
        fact, whoever tells it. This is how a node that missed a change, or is recovering
        from a lost disk, learns that its epoch ended when the new epoch has no leader yet
        (it may be the very voter the new epoch needs: sim seed 6 on 5 nodes). Where this
        replica compacted those slots, it offers its snapshot instead and sends it."""
        lo = after + 1
        if lo > self.commit_index:
            return
        if lo < self.log_start:
            # compacted here: offer the snapshot (it then takes a transfer from us), and the
            # log above it follows once its commit point is there
            if self.snapshot_index > after and self.snapshot_membership is not None:
                out = self.snapshots_out.get(to)  # one under way: offer it at its own ballot
                b = out.ballot if out is not None and out.index == self.snapshot_index else self.promised
                self._send(Message(M.CHOSEN, to, self.id, ballot=b, commit_index=self.commit_index,
                                   snapshot_index=self.snapshot_index))
                self._send_snapshot(to, b)
            return
        hi = min(self.commit_index, lo + self.config.entries_per_message_max - 1)
        recs = []
        for slot in range(lo, hi + 1):
            e = self.log.get(slot)
            if e is None:
                break
            recs.append(e[3])
            if e[1] == KIND_CONFIG:
                break
        if recs:
            self._send(Message(M.CHOSEN, to, self.id, ballot=self.promised, commit_index=self.commit_index,
                               records=tuple(recs)))

    def _on_chosen(self, m: Message) -> None:
        """Chosen values from a member that saw this replica behind (``_send_chosen``): taken
        only where they extend the commit point (a recovering replica too: it learns, it does
        not vote). A leader learns its epoch's values through its own rounds: only a sender
        of a later epoch (its epoch ended) makes it step down and learn."""
        if m.commit_index <= self.commit_index:
            return
        if self.role == LEADER:
            if ballot_epoch(m.ballot) <= self.membership.epoch:
                return
            self._become_follower(None)
        if not m.records:
            if m.snapshot_index > self.commit_index:
                self.snapshot_source = (m.frm, m.ballot)  # its transfer is let in (``_ignored``)
            return
        self._take_chosen(m.records, m.commit_index)

    def _send_progress(self, reply_type: str, to: int, ballot: int, context: int) -> None:
        """A recovering node's answer to an Accept or Heartbeat: no vote (``reject``, no
        promise), only how far it holds the chosen values, so the leader resends from there."""
        self._send(Message(reply_type, to, self.id, ballot=ballot, reject=True, hint=0,
                           match_index=self.commit_index, commit_index=self.commit_index, context=context))

    def _learn(self, m: Message, reply_type: str) -> None:
        """A recovering node takes from an Accept or Heartbeat only what is chosen: records
        at or below the sender's commit point. Its log holds nothing else (records above
        its commit point were dropped when it started), so it commits what it holds."""
        if m.ballot >= self.learn_ballot:
            self.learn_ballot = m.ballot
            self.leader = m.frm
            self.election_elapsed = 0
        for rec in m.records:
            slot, rb, kind, payload = decode_record(rec)
            if self.commit_index < slot <= m.commit_index and slot >= self.log_start and slot not in self.log:
                self._store(slot, rb, kind, payload, rec)
        commit = self.commit_index
        while commit < m.commit_index and (commit + 1) in self.log:
            commit += 1
        self._set_commit(commit)
        self._send_progress(reply_type, m.frm, m.ballot, m.context)

    # ------------------------------------------------------------------ Ready

    def has_ready(self) -> bool:
        if self.role == LEADER:
            if ((self.pending_commands or self.noop_target >= self.next_slot or self.pending_config is not None)
                    and self.config_slot is None
                    and self.next_slot <= self.commit_index + self.config.pipeline_window):
                return True
            if ((self.reads_queued or self.remote_queued) and self.read_round is None
                    and self._own_noop_committed()):
                return True
        elif self.follower_reads_queued and self.read_ask is None:
            return True
        return bool(self._hard_dirty or self._out_records or self._out_snapshot
                    or self._out_membership is not None
                    or self._out_messages or self.applied_index < self.commit_index
                    or self._out_compacted is not None or self._out_dropped_commands
                    or self._out_dropped_reads
                    or any(idx <= self.applied_index for idx, _ in self.reads_confirmed))

    def ready(self) -> Ready:
        """Everything to do now. The replica counts it as carried out from here (its
        applied point moves to the commit point; its outboxes are emptied): the driver
        does all of it before it calls into the replica again (module docstring)."""
        self._flush_proposals()
        self._maybe_start_read_round()
        self._maybe_ask_read_index()
        rd = Ready()
        if self._hard_dirty:
            rd.promised = self.promised
            rd.commit_index = self.commit_index
            self._hard_dirty = False
        rd.records = [self._out_records[s] for s in sorted(self._out_records)]
        self._out_records = {}
        rd.snapshot, self._out_snapshot = self._out_snapshot, None
        rd.compacted_through, self._out_compacted = self._out_compacted, None
        rd.messages, self._out_messages = self._out_messages, []
        if self.applied_index < self.commit_index:
            committed = []
            for s in range(self.applied_index + 1, self.commit_index + 1):
                e = self.log.get(s)
                if e is None:
                    raise AssertionError(f"n{self.id}: committed slot {s} is not in the log "
                                         f"(commit {self.commit_index}): persisted state is inconsistent")
                ballot, kind, payload, _rec = e
                committed.append(_committed_entry(s, ballot, kind, payload))
            if self.bugs.apply_out_of_order and len(committed) > 1:
                committed.reverse()
            rd.committed = committed
            self.applied_index = self.commit_index
        rd.reads = self._reads_due(self.applied_index)
        rd.dropped_commands, self._out_dropped_commands = self._out_dropped_commands, []
        rd.dropped_reads, self._out_dropped_reads = self._out_dropped_reads, []
        rd.membership, self._out_membership = self._out_membership, None
        return rd

    def advance(self, rd: Ready) -> None:
        """The driver carried out ``rd`` (persisted, sent, applied). A no-op: ``ready``
        already did the bookkeeping (module docstring); drivers call it so that the
        loop keeps etcd's shape and a replica that needs it later has its hook."""
        return None

    def status(self) -> dict:
        """Where this replica stands; ``recovering`` (1-3: the phase) while it does not vote,
        ``receiving_snapshot`` while a snapshot comes in, and on a leader each node's
        ``match`` (the slot up to which the leader knows it holds the log)."""
        st = {"node": self.id, "role": self.role, "leader": self.leader_hint,
              "promised": self.promised, "commit_index": self.commit_index,
              "applied_index": self.applied_index, "snapshot_index": self.snapshot_index,
              "recovering": 0 if self.recovery is None else self.recovery.phase,
              "receiving_snapshot": self.snapshot_inbound is not None,
              "behind": max(0, max(self.heard_commit, self.commit_index) - self.applied_index),
              "epoch": self.membership.epoch, "voters": list(self.voters),
              "learners": list(self.membership.learners)}
        if self.role == LEADER:
            st["match"] = {i: (self.next_slot - 1 if i == self.id else self.progress[i].match)
                           for i in self.membership.members if i == self.id or i in self.progress}
        return st


#: Messages whose ballot is the sender's own proposal (``_from_later_epoch`` handles those of
#: an epoch this replica has not reached).
_PROPOSALS = frozenset((M.PREPARE, M.PRE_VOTE, M.ACCEPT, M.HEARTBEAT))


def _committed_entry(slot: int, ballot: int, kind: int, payload: bytes) -> Entry:
    """A chosen value as an Entry; one that is not a batch (a poisoned value) is a no-op
    with its ``error`` said, never an exception in the driver's loop."""
    if kind == KIND_CONFIG:
        try:
            return Entry(slot, ballot, kind, [], membership=decode_membership(payload, slot))
        except ValueError as e:
            return Entry(slot, ballot, KIND_NOOP, [], f"slot {slot}: {e}")
    if kind == KIND_NOOP:
        return Entry(slot, ballot, kind, [], None if not payload else f"slot {slot}: a no-op with a payload")
    if kind != KIND_BATCH:
        return Entry(slot, ballot, KIND_NOOP, [], f"slot {slot}: unknown entry kind {kind}")
    try:
        return Entry(slot, ballot, kind, decode_batch(payload))
    except ValueError as e:
        return Entry(slot, ballot, KIND_NOOP, [], f"slot {slot}: {e}")
