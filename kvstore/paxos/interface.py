"""What a Paxos replica and its driver exchange: the replica's configuration, what it
restarts from, and what it hands out (``Ready``, ``Entry``, ``Snapshot``), with the role
names and entry kinds. ``kvstore.paxos.replica`` is the replica itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

KIND_NOOP = 0
KIND_BATCH = 1  # payload: msgpack list of command bytes
KIND_CONFIG = 2  # payload: the next membership (``kvstore.paxos.membership``); ends an epoch

FOLLOWER = "follower"
PRE_CANDIDATE = "pre-candidate"
CANDIDATE = "candidate"
LEADER = "leader"


class NotLeader(Exception):
    """This replica does not lead; ``leader_hint`` is the node it believes does (or None)."""

    def __init__(self, leader_hint: int | None) -> None:
        super().__init__(f"not the leader (hint: {leader_hint})")
        self.leader_hint = leader_hint


@dataclass(frozen=True)
class Bugs:
    """Planted bugs, for tests of the simulator only. All off by default."""

    # (a) acceptances go to a write-behind buffer flushed every election timeout (like a
    # journal synced on a timer), so Accepted is announced before the acceptance is durable
    announce_before_persist: bool = False
    repropose_lowest: bool = False  # (b) new leader re-proposes the lowest-ballot value
    apply_out_of_order: bool = False  # (c) committed entries handed out in reverse slot order
    read_without_quorum: bool = False  # (d) reads answered without the confirmation round
    # (e) promise handling: a duplicate of a Prepare already promised is answered without the
    # compaction check, and the candidate trusts whatever records a Promise shows (issue 10)
    duplicate_prepare_unchecked: bool = False
    # (f) phase-1 recovery: the new leader re-proposes from its own log only, ignoring the
    # values its promisers reported
    recover_from_own_log: bool = False
    accept_below_promise: bool = False  # (g) a follower accepts an Accept below its promise
    election_quorum_short: bool = False  # (h) quorum counting: one promise short of a majority elects
    # (i) commit-point propagation: a follower commits whatever it holds up to the leader's
    # commit point, whatever ballot its entries were accepted at
    commit_any_ballot: bool = False
    snapshot_backwards: bool = False  # (j) a snapshot at or below the commit point is installed
    # (k) read index: a new leader serves reads before its own no-op commits, i.e. before it
    # knows every slot chosen under earlier leaders
    read_before_own_noop: bool = False
    # (l) follower reads: a follower serves a read as soon as the leader's read index comes
    # back, without waiting until it has applied up to that index
    follower_read_before_apply: bool = False
    # (m) lease reads: the leader keeps its lease across a clock jump (a pause it slept
    # through), i.e. ``clock_jumped`` is ignored
    lease_survives_clock_jump: bool = False
    # (n) peer input: the simulator's byzantine sender reaches the replica without the wire's
    # range checks or the node's payload checks, and the replica's own guards (``_ignored``,
    # ``snapshot_ok``) are off
    unchecked_peer_input: bool = False
    # (o) snapshots: one is installed from any sender at any ballot (the rule before issue 18)
    snapshot_from_anyone: bool = False
    # (p) a node that restarts with no Paxos state (a wiped disk) votes at once, as if it
    # had never promised or accepted anything (no recovery: see "Wiped nodes" above)
    wiped_votes_at_once: bool = False


@dataclass(frozen=True)
class Membership:
    """Who decides a range of slots: the voters of one epoch (``kvstore.paxos.membership``).

    ``start`` is the first slot the epoch decides (the slot after the ``KIND_CONFIG``
    entry that began it; 0 for the bootstrap, epoch 0). ``info`` is the driver's (the
    node keeps its members' names and addresses there), carried and persisted with the
    membership but never read by Paxos.
    """

    epoch: int = 0
    start: int = 0
    voters: tuple = ()
    learners: tuple = ()
    info: bytes = b""

    @property
    def members(self) -> tuple:
        return tuple(sorted(set(self.voters) | set(self.learners)))


class Jitter(Protocol):
    """The one thing the replica asks of randomness: a seeded ``random.Random`` has it."""

    def randrange(self, stop: int) -> int: ...


@dataclass
class Config:
    node: int
    num_nodes: int
    rng: Jitter
    election_timeout_ticks: int = 10
    heartbeat_interval_ticks: int = 2
    pipeline_window: int = 32  # slots in flight above the commit point, at most
    batch_commands_max: int = 64  # commands per log entry
    entries_per_message_max: int = 32
    pending_commands_max: int = 4096  # proposals waiting for the window; beyond: dropped
    snapshot_chunk_bytes: int = 4096
    #: Snapshot chunks a sender keeps in flight to one receiver, at most: each SnapshotAck
    #: slides the window; with no ack for ``snapshot_resend_ticks`` it goes back to the
    #: last acknowledged offset (go-back-N), never to the start.
    snapshot_window_chunks: int = 8
    snapshot_resend_ticks: int = 4
    log_retain_slots: int = 32  # entries kept below a snapshot point, for cheap catch-up
    pre_vote: bool = True
    #: The application's check of a snapshot's state (it decodes), run before an
    #: installed snapshot replaces anything; None accepts any bytes.
    snapshot_ok: Callable[[bytes], bool] | None = None
    #: Lease reads, off (0) by default. When > 0, a leader whose confirmation round (a
    #: heartbeat quorum) started at its tick T serves reads without a round of their own
    #: until its tick T + lease_read_ticks; and every replica refuses to promise a new
    #: leader for an election timeout after it last heard the old one, or after it started.
    #: The clock assumption: over one election timeout, the tick clocks of any two nodes
    #: drift apart by at most D ticks, and lease_read_ticks <= election_timeout_ticks - D - 2
    #: (a tick of granularity on each side); the driver delivers every elapsed tick before
    #: it hands in a read, or calls ``clock_jumped()`` when it cannot (it stalled). Then no
    #: other leader can be chosen while the lease holds, so the leader's commit point is a
    #: read index without a quorum round.
    lease_read_ticks: int = 0
    #: The bootstrap membership (epoch 0); None: every node 0..num_nodes-1 votes.
    membership: Membership | None = None
    bugs: Bugs = field(default_factory=Bugs)


@dataclass
class PersistedState:
    """What a replica restarts from: everything a Ready asked to persist."""

    promised: int = 0
    commit_index: int = -1
    records: list = field(default_factory=list)  # encoded records, any order
    snapshot_index: int = -1
    snapshot_data: bytes = b""
    applied_index: int | None = None  # the application's applied point (>= snapshot_index)
    #: The membership as of the applied point (the application keeps it in its state, from
    #: ``Entry.membership`` and ``Snapshot.membership``); None: the config's bootstrap.
    membership: Membership | None = None


@dataclass
class Entry:
    """A committed log entry, to apply. ``commands`` is empty for a no-op."""

    slot: int
    ballot: int
    kind: int
    commands: list
    #: Why the chosen value is not a batch of commands (it is applied as a no-op), or None.
    #: Peers' records are checked before they are accepted, so only a log written
    #: before that check can hold one; the node logs and counts it.
    error: str | None = None
    #: On a ``KIND_CONFIG`` entry: the membership that begins right after this slot.
    membership: Membership | None = None


@dataclass
class Snapshot:
    index: int  # every slot <= index is in it
    data: bytes  # opaque, produced by the application
    membership: Membership | None = None  # the membership at ``index``


@dataclass
class Ready:
    """Everything the driver must do, in field order (see the module docstring).

    - ``promised``: the promise ballot to persist, or None if unchanged.
      Durable BEFORE any of ``messages`` is sent.
    - ``commit_index``: the commit point to persist (with the records), or None.
    - ``records``: encoded log records (slot ascending) to persist, overwriting
      any record at the same slot. Durable BEFORE ``messages`` are sent.
    - ``snapshot``: an installed snapshot to persist, then restore the state
      machine from BEFORE applying ``committed``; log records at slots <= its
      index may be dropped.
    - ``compacted_through``: log records at slots <= this may be deleted (the
      application's snapshot covering them is already durable).
    - ``messages``: to send, ONLY after the persist above is durable.
    - ``committed``: entries to apply, in slot order, each exactly once.
    - ``reads``: request ids of reads that may be served once ``committed`` is applied.
    - ``dropped_commands`` / ``dropped_reads``: proposals and reads this replica
      will not carry out (it lost leadership or was full); tell their clients.
    - ``membership``: this Ready moved the replica to a new epoch (the latest, if several):
      connect to new members, stop talking to removed ones.
    """

    promised: int | None = None
    commit_index: int | None = None
    records: list = field(default_factory=list)
    snapshot: Snapshot | None = None
    compacted_through: int | None = None
    messages: list = field(default_factory=list)
    committed: list = field(default_factory=list)
    reads: list = field(default_factory=list)
    dropped_commands: list = field(default_factory=list)
    dropped_reads: list = field(default_factory=list)
    membership: Membership | None = None
