"""One node of a cluster: the shard replicas, their storage, the sockets and the clock.

This is the only place where the pure Paxos core meets I/O. A node owns one
``kvstore.paxos.Replica`` per shard, one ``ReplicaStorage`` (the write-ahead
log and LMDB) for all of them, one ``NodeSockets`` (a ROUTER for clients, one
for peers, a DEALER per peer) and a monotonic clock, and runs them from a single
thread in one loop. The sockets and the clock are ports (``kvstore.node.ports``):
the deterministic simulator (``kvstore.sim.realnode``) drives this same class
over an in-memory transport, its own clock and a simulated disk. ``run()`` is
the production shell (poll the sockets until the next tick is due, awake for a
moment first while messages come close together: ``kvstore.node.waiter``); ``turn()``
is one turn of the loop, the same for both. Each turn:

1. **receive**: read what waits on the ROUTERs (bounded; client kinds only from
   the client socket, the peer protocol only from the peer socket); Paxos batches go to
   the replicas (``step``), client writes are queued for their shard's
   replica (handed to ``propose`` bounded in bytes, ``_feed_proposals``),
   reads become linearizable reads (``read``: the leader's read index; on a
   follower, the read index it asks the leader for, served here once applied),
   writes for a shard another node leads are forwarded there; a malformed, oversized or unknown frame
   is dropped and counted (``wire.decode``);
2. **tick**: one ``tick()`` per replica per elapsed ``tick_seconds`` of
   ``self.clock.monotonic()`` (a few at most per turn, so a stalled process wakes up
   to its inbox before it times anybody out; with lease reads on, a stall, or
   ticks not delivered, void the leases first: ``clock_jumped``);
3. **drive** every replica that ``has_ready()``, all shards together:

   a. **persist**: every shard's hard state, log records, snapshot and
      compaction, in ONE ``ReplicaStorage.save``: one append to the
      write-ahead log and one fdatasync for all shards
      (``kvstore.node.storage``). The committed entries are applied in that
      same save, into the overlay that LMDB checkpoints take off this path
      (safety rule 4: the applied point moves with the state it describes);
   b. **send**, only once (a) returned (safety rule 1: a promise or an
      acceptance is durable before the message announcing it leaves): every
      message for one peer, across shards, in one frame. The one exception
      is a leader's Accept and Heartbeat (phase 2a: a request, announcing
      nothing of this node's disk), sent just before (a) so that followers
      write while the leader writes (as etcd's raft does). The core counts
      the leader's own acceptance when it proposes, but acts on that count
      only when a follower's Accepted arrives, and this loop reads nothing
      before (a) returns: the leader's vote is effectively counted once
      durable;

      a'. when no client waits on this node for the entries this round
      committed (a follower, mostly), they are applied after (b), in a
      save of their own (``_apply_after_send``): a follower's Accepted or
      HeartbeatReply waits for its append only, not for the apply of the
      entries its leader's message committed (the state changes still reach
      the overlay with their applied point, rule 4);
   c. **answer** clients: writes whose commands were applied here (rule 5;
      a write whose entry was durable here before this save is answered from
      inside the save, once its result is computed: ``_answer_durable_early``),
      then the watch history: the changes this save applied, durable now, join
      each shard's history (a snapshot installed resets it) and the parked
      watch polls they match are answered (``kvstore.node.watching``; never
      before (a) returned), then reads whose read index is now applied (rule 6),
      and a redirect for proposals and reads the replica dropped;
   d. ``advance`` (a no-op: ``Replica.ready`` already counted the Ready as done,
      which is why nothing here calls into a replica between its ``ready`` and
      the end of c; a save that fails raises out of ``turn``: the node stops, and
      starts again from its disk).

Clients are never answered from anywhere else, and nothing is sent before it
is persisted.

The node is one class in several rooms: this module (the loop: ``turn``, receive,
persist/send/answer in that order, roles, snapshots), request intake
(``kvstore.node.intake.Intake``: a client's request checked, decoded once, queued,
forwarded or answered), the 2PC resolver (``kvstore.node.resolver.Resolver``:
the decide request and the settlement of abandoned transactions), watch
(``kvstore.node.watching.Watching``: the histories and the parked ``OP_WATCH``
polls, whose waits end on the tick step), lease expiry
(``kvstore.node.leases.LeaseExpiry``: deadlines noted at apply, the leader's
LeaseExpire entries), backups (``kvstore.node.backups``) and members
(``kvstore.node.membership``: who, the links to them, changes) and status
(``kvstore.node.status``). ``Node`` mixes them in; they share its state and never reorder its side effects. The protocol retransmits on its own timers (heartbeats reset a
follower's progress), so a dropped frame only costs time.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
from collections import Counter, defaultdict, deque
from dataclasses import dataclass

from kvstore.commands import POISONED, DecodedCommands, decode_logged_command
from kvstore._native import record_fields
from kvstore.errors import CorruptRecord
from kvstore.paxos import messages as M
from kvstore.paxos.ballot import BALLOT_MAX, format_ballot
from kvstore.paxos.replica import LEADER, Config, Replica
from kvstore.node.backups import Backups
from kvstore.node.intake import Intake
from kvstore.node.leases import LeaseExpiry
from kvstore.node.membership import MemberDirectory
from kvstore.node.ports import NO_BUGS, NodeBugs, SystemClock
from kvstore.node.resolver import RESOLVE_EVERY_SECONDS, Resolver
from kvstore.node.stats import PUBLISH_EVERY_SECONDS, NodeStats, view
from kvstore.node.status import NodeStatus
from kvstore.node.waiter import LoopWaiter
from kvstore.node.watching import DEFAULT_HISTORY_BYTES, Watching
from kvstore.machine.replica import ReplicaStorage, ShardWrite, check_snapshot_data
from kvstore.node.storage import WalReplicaStorage
from kvstore.transport import wire
from kvstore.transport.members import MAX_NODES
from kvstore.transport.sockets import CLIENT, derived_peer_address

log = logging.getLogger("kvstore.node")

#: Ticks carried out in one loop turn at most (a stalled process catches up gradually).
MAX_TICKS_PER_TURN = 3
#: Ready rounds per loop turn at most (a round can make another ready; bounded).
MAX_READY_ROUNDS = 4
#: A peer frame is cut into several above this many bytes (estimated).
PEER_FRAME_TARGET_BYTES = 8 * 1024 * 1024
#: Messages a leader may send before the persist of their Ready (see the module docstring).
EARLY_TYPES = frozenset((M.ACCEPT, M.HEARTBEAT))
#: Frame kinds of the peer protocol: accepted only on the peer socket.
PEER_KINDS = frozenset((wire.PAXOS, wire.FORWARD, wire.FORWARDED))
#: How often the node looks for a client key added to or revoked from ``clients/``.
RELOAD_KEYS_SECONDS = 2.0
#: Ticks after start at which a node campaigns for the shards it prefers to lead
#: (shard % nodes == its index) if they have no leader yet: leaders spread over nodes.
PREFERRED_CAMPAIGN_TICKS = (15, 40)


@dataclass
class NodeConfig:
    """What a node needs to know; ``kvstore.node.config`` builds it from cluster.toml."""

    name: str
    names: list  # every node's name; sorted, a node's Paxos index is its position
    addresses: dict  # name -> "tcp://host:port"
    shards: int
    data_dir: str
    tick_seconds: float = 0.01
    election_timeout_ticks: int = 30
    heartbeat_interval_ticks: int = 5
    pipeline_window: int = 64
    batch_commands_max: int = 256
    entries_per_message_max: int = 4  # x an entry's <= ~8 MiB: under the 64 MiB frame limit
    pending_commands_max: int = 16384
    #: The state is snapshotted (and the log below it compacted) every so many applied slots.
    snapshot_every_slots: int = 20_000
    log_retain_slots: int = 1000
    snapshot_chunk_bytes: int = 1 << 20
    #: Lease reads: off (0) by default. When on, a leader serves reads without a quorum
    #: round of their own for this many ticks after a confirmation round began (see
    #: ``kvstore.paxos.replica.Config.lease_read_ticks``). The clock assumption: over one
    #: election timeout, no two nodes' monotonic clocks drift apart by more than D ticks,
    #: and lease_read_ticks <= election_timeout_ticks - D - 2. The loop voids every lease
    #: (``clock_jumped``) when it wakes more than a tick late (a stall, SIGSTOP, a GC pause)
    #: before it reads a request, and when it cannot deliver every elapsed tick.
    lease_read_ticks: int = 0
    #: ``[tuning] busy_poll_us``: after a turn that received something, while messages
    #: come close together, the loop polls awake for up to this long before it sleeps
    #: (``kvstore.node.waiter``). None: the process decides (``kvstore-server``:
    #: ``SERVER_BUSY_POLL_US``; an embedded replica, which shares the application's GIL: off).
    busy_poll_us: int | None = None
    #: A ``kvstore keygen`` directory: CurveZMQ on every socket (``[security]``), or None.
    curve_keys: str | None = None
    #: name -> "tcp://host:port" where the node's peers connect (``[nodes.NAME]
    #: peer_address``); a node missing here listens on its client port + 10000.
    peer_addresses: dict | None = None
    #: ``[watch] history_bytes``: the watch histories of all shards of the node together.
    watch_history_bytes: int = DEFAULT_HISTORY_BYTES
    #: The cluster's identity for a node that joins (given by the cluster, ``--join``);
    #: None: the data directory's, else cluster.toml's (``kvstore.node.membership``).
    cluster_id: bytes | None = None

    #: A node that joins a running cluster (``kvstore-server --join``): its index and each
    #: shard's membership as the cluster told it (None: cluster.toml bootstraps them).
    node_index: int | None = None
    memberships: list | None = None

    @property
    def index(self) -> int:
        return self.node_index if self.node_index is not None else self.names.index(self.name)

    def peer_address(self, name: str) -> str:
        """Where node ``name`` listens for its peers (see ``kvstore.transport.sockets``)."""
        given = (self.peer_addresses or {}).get(name)
        return given if given is not None else derived_peer_address(self.addresses[name])


class Node(Intake, Resolver, Watching, LeaseExpiry, Backups, MemberDirectory, NodeStatus):
    """A cluster node; ``run()`` is its loop (blocking), ``stop()`` ends it from anywhere."""

    def __init__(self, config: NodeConfig, storage: ReplicaStorage | None = None,
                 rng: random.Random | None = None, *, transport=None, clock=None,
                 bugs: NodeBugs = NO_BUGS) -> None:
        """``transport`` and ``clock`` are the node's ports (``Transport``, ``Clock``):
        ZeroMQ sockets and the system clock unless given (the simulator gives its own,
        ``kvstore.sim.realnode``). ``bugs`` plants bugs for the simulator to find."""
        self.config = config
        self.clock = clock or SystemClock()
        self.bugs = bugs
        self.name = config.name
        self.n = len(config.names)
        self.rng = rng or random.Random(int.from_bytes(os.urandom(8), "little"))
        self.storage = storage or WalReplicaStorage(config.data_dir, config.shards)
        self.nshards = self.storage.nshards
        self.counters: Counter = Counter()
        self.stats = NodeStats(self.nshards)  # requests, latencies, leader changes (stats.py)
        #: ``publish(view)``: called by the loop every ``PUBLISH_EVERY_SECONDS`` with a copy
        #: of its stats and status (``kvstore-server --metrics``); None: nothing published.
        self.publish = None
        self._next_publish = 0.0
        try:
            # this node's index and the cluster's identity (its data directory keeps them)
            self.index, self.cluster = self._identity(own_directory=transport is None)
            self.replicas = [self._make_replica(s) for s in range(self.nshards)]
            #: index -> Member: every node this one knows an address for (the members of
            #: every shard's current epoch; ``kvstore.node.membership`` keeps it current)
            self.members = self._current_members()
            self._check_members(checked=transport is None)
            self.sockets = transport or self._open_sockets()
        except BaseException:
            self.storage.close()
            raise
        self.waiting_writes: dict = {}  # (client_id, seq) -> WaitingWrite
        self.waiting_reads: dict = {}  # token -> WaitingRead
        self._replies: dict = {}  # identity -> [(request_id, status, value)], sent once per turn
        # writes waiting to be handed to each shard's replica (see _feed_proposals)
        self._proposals = [deque() for _ in range(self.nshards)]
        self._uncommitted_bytes = [0] * self.nshards
        self._forwarded: dict = {}  # forward id -> Forwarded
        self._forward_out: dict = defaultdict(list)  # peer -> [(forward_id, op, args)]
        self._fresh_slots: set | None = None  # (shard, slot) made durable by the save running
        self._decoded = DecodedCommands()  # log commands decoded at intake, until applied
        # Ids of what this node asks others (forwarded requests, 2PC requests): the answers
        # come back by id, so an incarnation must not reuse its predecessor's ids (an answer
        # to a request forwarded before a crash completed another one after the restart:
        # a compare-and-set answered with a put's result, real-node sweep seed 103726).
        self._tokens = itertools.count(self.rng.randrange(1 << 40) << 20)
        self._roles = [(r.role, r.leader_hint) for r in self.replicas]
        self._stopping = False
        self._ticks = 0
        self._campaign_at = list(PREFERRED_CAMPAIGN_TICKS) if len(self.members) > 1 else []
        self._last_expiry = self.clock.monotonic()
        self._init_resolver()
        self._refusals_logged: set = set()  # peer routing ids whose refusal was logged
        self._init_member_links()
        self._next_tick = self.clock.monotonic() + config.tick_seconds
        self._next_reload = self.clock.monotonic()
        self._init_watching(config.watch_history_bytes)
        self._init_leases()  # lease expiry (``kvstore.node.leases``)
        self._init_backups()  # backup read points (``kvstore.node.backups``)

    def _make_replica(self, shard: int) -> Replica:
        c = self.config
        cfg = Config(node=self.index, num_nodes=max(1, self.n), rng=self.rng,
                     membership=self._start_membership(shard),
                     election_timeout_ticks=c.election_timeout_ticks,
                     heartbeat_interval_ticks=c.heartbeat_interval_ticks,
                     pipeline_window=c.pipeline_window, batch_commands_max=c.batch_commands_max,
                     entries_per_message_max=c.entries_per_message_max,
                     pending_commands_max=c.pending_commands_max,
                     log_retain_slots=c.log_retain_slots,
                     snapshot_chunk_bytes=c.snapshot_chunk_bytes,
                     lease_read_ticks=c.lease_read_ticks, snapshot_ok=check_snapshot_data,
                     bugs=self.bugs.paxos)
        replica = Replica(cfg, self.storage.load(shard))
        if replica.promised > BALLOT_MAX:
            # A promise to a ballot no replica can make (a forged message before issue 18's
            # checks): lowering it could break the real promise it overwrote, so it stands,
            # and this replica can neither campaign nor accept again in this shard.
            log.error("shard %d: the promise on disk (%s) is past any ballot a node can make; "
                      "this node cannot vote in the shard: wipe its data directory and let it "
                      "rejoin from its peers", shard, format_ballot(replica.promised),
                      extra={"event": "forged_promise", "node": self.name, "shard": shard})
        if replica.recovering:
            log.warning("shard %d: no Paxos state on disk (a new or wiped node): recovering from the "
                        "peers; this node votes once every other node has reported (README, \"A node "
                        "that lost its disk\")", shard,
                        extra={"event": "recovering", "node": self.config.name, "shard": shard})
        replica.trace = []  # its recovery steps are logged (``_observe_roles``)
        return replica

    # ------------------------------------------------------------------ the loop
    def stop(self) -> None:
        """Ask the loop to finish its turn, answer what it can, and return (any thread)."""
        self._stopping = True

    def run(self) -> None:
        """The production loop's shell: wait on the sockets until the next tick is due,
        then one ``turn`` (``kvstore.node.waiter``: awake for a moment first while messages
        come close together). Returns after ``stop()``."""
        waiter = LoopWaiter([self.sockets.peer_router, self.sockets.client_router], self.clock,
                            (self.config.busy_poll_us or 0) / 1e6, self.counters)
        self._next_reload = self.clock.monotonic()
        self._next_tick = self.clock.monotonic() + self.config.tick_seconds
        log.info("node %s up at %s (peers at %s): %d shard(s), %d node(s)", self.name,
                 self.config.addresses[self.name], self.config.peer_address(self.name),
                 self.nshards, self.n,
                 extra={"event": "start", "node": self.name})
        received = False
        try:
            while not self._stopping:
                received = self.turn(waiter.wait(self._next_tick, received))
            self.finish()
        finally:
            self.close()

    def turn(self, inbox_ready: bool = True) -> bool:
        """One turn of the loop (the module docstring): receive (if ``inbox_ready``),
        tick if a tick is due on the clock, drive, flush the replies. The production
        loop calls it once its poll returns; the simulator calls it once per step.
        True if it received a frame (the production loop then waits awake a moment)."""
        tick = self.config.tick_seconds
        lease = self.config.lease_read_ticks > 0
        received = False
        if inbox_ready:
            if lease and self.clock.monotonic() - self._next_tick > tick:
                self._clock_jumped()  # before any read: the ticks lag the clock
            received = self._receive()
        now = self.clock.monotonic()
        if now >= self._next_tick:
            owed = int((now - self._next_tick) / tick) + 1
            due = min(owed, MAX_TICKS_PER_TURN)
            if lease and owed > due:
                self._clock_jumped()  # the ticks not delivered are lost to the replicas
            for _ in range(due):
                for r in self.replicas:
                    r.tick()
            self._ticks += due
            if self._campaign_at and self._ticks >= self._campaign_at[0]:
                del self._campaign_at[0]
                self._campaign_for_preferred_shards()
            self._next_tick = max(self._next_tick + due * tick, now)
            if self.parked:
                self._expire_watches(now)
            if now - self._last_expiry > 1.0:
                self._expire_waiting(now)
            if now - self._last_resolve > RESOLVE_EVERY_SECONDS:
                self._resolve_abandoned(now)
            self._expire_leases(now)
            self._expire_backups(now)
            if now >= self._next_reload:  # a client key added to or revoked from clients/
                self._next_reload = now + RELOAD_KEYS_SECONDS
                self.sockets.reload_keys()
            if now >= self._next_publish:  # the stats' window rolls; a copy goes out
                self._next_publish = now + PUBLISH_EVERY_SECONDS
                self.stats.roll(now)
                if self.publish is not None:
                    self.publish(view(self, now))
        self._drive()
        self._flush_replies()
        return received

    def finish(self) -> None:
        """After ``stop()``: finish in-flight work that is already decided (one last
        persist/send/answer)."""
        self._drive()
        self._release_watches()
        self._flush_replies()

    def _clock_jumped(self) -> None:
        for r in self.replicas:
            r.clock_jumped()

    def close(self) -> None:
        sockets, self.sockets = getattr(self, "sockets", None), None
        if sockets is not None:
            sockets.close()
            self._close_backups()  # their read transactions end before the environment
            self.storage.close()
            log.info("node %s stopped", self.name, extra={"event": "stop", "node": self.name})

    # ------------------------------------------------------------------ 1. receive
    def _receive(self) -> bool:
        """Frames from both ROUTERs: client kinds only from the client socket, the peer
        protocol only from the peer socket (``kvstore.transport.sockets``); anything
        else is dropped and counted by reason before it is decoded further. True if a
        frame was read."""
        sockets = self.sockets
        frames = sockets.recv_many()
        for role, identity, frame in frames:
            try:
                body = wire.decode(frame, wire.MAX_REQUEST_FRAME_BYTES if role == CLIENT
                                   else wire.MAX_PEER_FRAME_BYTES)
            except wire.FrameError as e:
                self._drop("malformed", e)
                continue
            kind = body[0]
            if role == CLIENT:
                self.stats.clients.add(identity)
                if kind == wire.REQUEST or kind == wire.REQUESTS:
                    for request_id, op, args in ([body[1:]] if kind == wire.REQUEST else body[1]):
                        self._on_request(identity, request_id, op, args)
                elif kind in PEER_KINDS:
                    self._drop("peer_frame_from_client", f"a peer frame (kind {kind}) on "
                               f"the client port")
                else:
                    self._drop("unexpected", f"frame kind {kind} is not for a node")
                continue
            if kind not in PEER_KINDS:
                self._drop("client_frame_from_peer" if kind in (wire.REQUEST, wire.REQUESTS)
                           else "unexpected", f"frame kind {kind} on the peer port")
                continue
            if body[1] != sockets.peer_index(identity):
                self._drop("malformed", f"a peer frame saying it is from node {body[1]} on "
                           f"the link of node {sockets.peer_index(identity)}")
                continue
            if kind == wire.PAXOS:
                if body[1] not in self.members and body[1] not in self._provisional \
                        and not self._link_unknown_peer(body[1], identity):
                    continue
                self._on_paxos(body[1], body[2])
            else:
                frm = body[1]
                if frm not in self.members or frm == self.index:
                    self._drop("malformed", f"forward from unknown node {frm}")
                elif kind == wire.FORWARDED:
                    self._on_forwarded(frm, body[2])
                else:
                    for forward_id, op, args in body[2]:
                        self._on_request(("peer", frm), forward_id, op, args)
        self._log_refused_peers()
        return bool(frames)

    def _reply(self, identity: bytes, request_id: int, status: int, value=None) -> None:
        """Queue a reply; ``_flush_replies`` sends each client's in one frame per turn."""
        pending = self._replies.get(identity)
        if pending is None:
            self._replies[identity] = [(request_id, status, value)]
        else:
            pending.append((request_id, status, value))

    def _flush_replies(self) -> None:
        for _ in range(3):  # an own write's callback may reply too (a decide): sent now
            replies, self._replies = self._replies, {}
            if not replies:
                break
            for identity, items in replies.items():
                if type(identity) is tuple and identity[0] == "self":  # this node's own write
                    for _request_id, status, value in items:
                        self._on_own_reply(identity[1], status, value)
                elif type(identity) is tuple:  # ("peer", index): answers to forwarded requests
                    self.sockets.send_peer(identity[1], wire.encode_forwarded(self.index, items))
                else:
                    self.sockets.reply(identity, items)
        if self._forward_out:
            out, self._forward_out = self._forward_out, defaultdict(list)
            for peer, items in out.items():
                if not self.sockets.send_peer(peer, wire.encode_forward(self.index, items)):
                    for forward_id, _op, _args in items:  # the leader is unreachable from here
                        w = self._forwarded.pop(forward_id, None)
                        if w is not None:
                            self._reply(w.identity, w.request_id, wire.STATUS_NOT_LEADER, None)

    def _drop(self, why: str, detail) -> None:
        self.counters["dropped_" + why] += 1
        n = self.counters["dropped_" + why]
        if n & (n - 1) == 0:  # 1, 2, 4, 8...: a flood of junk cannot flood the log
            log.warning("dropped a %s frame (%d so far): %s", why, n, detail,
                        extra={"event": "dropped_frame", "node": self.name, "why": why,
                               "count": n})

    def _on_paxos(self, frm: int, items: list) -> None:
        """A peer's Paxos batch (``wire.decode`` range-checked every field): each message
        is checked against this node (its sender and addressee, every command its
        records carry: ``wire.check_paxos_message``) before its replica sees it; one
        that fails is dropped and counted, and changes nothing."""
        if frm == self.index or (frm not in self.members and frm not in self._provisional):
            self._drop("malformed", f"paxos batch from unknown node {frm}")
            return
        for shard, m in items:
            if not (0 <= shard < self.nshards):
                self._drop("malformed", f"paxos message for shard {shard}")
                continue
            why = wire.check_paxos_message(m, self.index, MAX_NODES, self._check_peer_command)
            if why is not None and not self.bugs.paxos.unchecked_peer_input:
                self._drop("invalid", f"paxos {m.type}: {why}")
                continue
            try:
                self.replicas[shard].step(m)
            except (ValueError, TypeError, KeyError, CorruptRecord) as e:
                self._drop("malformed", f"paxos message rejected by the replica: {e!r}")

    def _check_peer_command(self, raw: bytes) -> None:
        """A command of a peer's record, decoded once here (``ValueError`` if this node
        could not apply it); the typed command waits for apply in ``_decoded``."""
        self._decoded.add(raw, decode_logged_command(raw))


    # ------------------------------------------------------------------ 3. drive
    def _drive(self) -> None:
        replicas = self.replicas
        for _ in range(MAX_READY_ROUNDS):
            self._feed_proposals()
            readies = [(s, r.ready()) for s, r in enumerate(replicas) if r.has_ready()]
            if not readies:
                break
            for s, rd in readies:
                if rd.committed and self._uncommitted_bytes[s]:
                    done = sum(len(c) for e in rd.committed for c in e.commands)
                    self._uncommitted_bytes[s] = max(0, self._uncommitted_bytes[s] - done)
            # a. persist (and apply) everything, one durable write for all shards
            writes = [ShardWrite(s, rd.promised, rd.commit_index, rd.records, rd.snapshot,
                                 rd.compacted_through, rd.committed, decoded=self._decoded,
                                 changes=[])
                      for s, rd in readies
                      if (rd.promised is not None or rd.commit_index is not None or rd.records
                          or rd.snapshot is not None or rd.compacted_through is not None
                          or rd.committed)]
            applies = self._apply_after_send(writes)
            # slots whose records this save makes durable: their writes wait for it
            self._fresh_slots = {(w.shard, record_fields(r)[0]) for w in writes for r in w.records}
            outbox: dict = defaultdict(list)
            early: dict = defaultdict(list)
            for s, rd in readies:
                for m in rd.messages:
                    (early if m.type in EARLY_TYPES and writes else outbox)[m.to].append((s, m))
            for peer, items in early.items():  # the leader's Accepts overlap its own fsync
                for frame in wire.encode_paxos_frames(self.index, items, PEER_FRAME_TARGET_BYTES):
                    self.sockets.send_peer(peer, frame)
            results = self.storage.save(writes, self._answer_durable_early) if writes else []
            self._fresh_slots = None
            for s, rd in readies:
                if rd.membership is not None:  # a new epoch: links to its members first
                    self._on_membership(s, rd.membership)
            self._note_leases(writes)
            # b. send: one frame (or a few, if huge) per peer, across shards
            for peer, items in outbox.items():
                for frame in wire.encode_paxos_frames(self.index, items, PEER_FRAME_TARGET_BYTES):
                    self.sockets.send_peer(peer, frame)
            if applies:  # a'. nobody waits here for these entries: applied after the send
                results = results + self.storage.save(applies)
                writes = writes + applies
                self._note_leases(applies)
            self.counters["poisoned_values"] += sum(1 for r in results if r[3] is POISONED)
            # c. answer
            self._answer_writes(results)
            self._feed_history(writes)
            for s, rd in readies:
                if rd.reads:
                    self._serve_reads(rd.reads)
                if rd.dropped_commands or rd.dropped_reads:
                    self._answer_dropped(s, rd)
            # d. advance
            for s, rd in readies:
                replicas[s].advance(rd)
                if rd.snapshot is not None:
                    self.stats.snapshots_installed[s] += 1
                    log.info("shard %d: installed a snapshot through slot %d from the leader",
                             s, rd.snapshot.index,
                             extra={"event": "snapshot_installed", "node": self.name, "shard": s,
                                    "index": rd.snapshot.index})
        self._observe_roles()
        self._maybe_snapshot()

    def _apply_after_send(self, writes: list) -> list:
        """Take the committed entries out of ``writes`` (into writes of their own, returned)
        when no client waits on this node for any of them: then the messages of this Ready
        (a follower's Accepted, its HeartbeatReply to a read index round) leave once what
        they announce is durable (the log append, if any), without waiting for the apply,
        which follows them in a save of its own (``_drive``, a'.). The apply needs no append
        (the entries are in the log already, their commit point rides with the next append),
        and nothing is answered or served before it. A write left with nothing but its
        commit point is dropped from ``writes`` (the apply's write carries it). A leader
        with writes waiting keeps one save: it answers them from inside it, before its fsync
        (``_answer_durable_early``). Empty: nothing split, one save as before."""
        if self.waiting_writes or not any(w.committed for w in writes):
            return []
        applies = []
        for w in writes:
            if w.committed:
                applies.append(ShardWrite(w.shard, None, w.commit_index, committed=w.committed,
                                          decoded=w.decoded, changes=[]))
                w.committed = []
        writes[:] = [w for w in writes if w.records or w.promised is not None
                     or w.snapshot is not None or w.compacted_through is not None]
        return applies

    def _campaign_for_preferred_shards(self) -> None:
        for s, r in enumerate(self.replicas):
            voters = r.membership.voters
            if r.is_voter and voters[s % len(voters)] == self.index and r.leader_hint is None:
                r.campaign()

    def _maybe_snapshot(self) -> None:
        """Snapshot a shard whose log grew by ``snapshot_every_slots`` since the last one.

        The snapshot is the applied state itself (durable in the storage at
        ``applied_index``); the replica keeps it for followers too far behind
        for the log and drops older log records (deleted at the next save).
        """
        every = self.config.snapshot_every_slots
        for s, r in enumerate(self.replicas):
            if r.applied_index - max(r.snapshot_index, -1) >= every or self._snapshot_due(s, r):
                index = r.applied_index
                data = self.storage.snapshot_data(s)
                r.compact(index, data)
                self.stats.snapshots_taken[s] += 1
                log.info("shard %d: snapshot through slot %d (%d bytes)", s, index, len(data),
                         extra={"event": "snapshot", "node": self.name, "shard": s,
                                "index": index, "bytes": len(data)})

    def _answer_durable_early(self, results: list) -> None:
        """Inside the save, before its fsync: answer writes whose entries were already
        durable on this node before this save (a leader's own records, persisted when it
        proposed them; the followers' acks that committed them came later). Such a write
        is chosen and durable on a majority, and its result is computed; the state
        change itself becomes durable with this save, and this loop serves no read
        before that (a crash here re-applies the entry from the log at restart). So the
        client waits for one fsync of the leader, not two."""
        fresh = self._fresh_slots
        early = [r for r in results if (r[0], r[1]) not in fresh or self.bugs.answer_before_fsync]
        if early:
            self._answer_writes(early)
            self._flush_replies()

    def _observe_roles(self) -> None:
        for s, r in enumerate(self.replicas):
            if r.trace:
                for event in r.trace:
                    if "recover" in event:
                        log.info("shard %d: %s", s, event.split(" ", 1)[1],
                                 extra={"event": "recovery", "node": self.name, "shard": s})
                r.trace.clear()
            now = (r.role, r.leader_hint)
            before = self._roles[s]
            if now == before:
                continue
            self._roles[s] = now
            if now[1] is not None and now[1] != before[1]:
                self.stats.leader_changes[s] += 1
            leader = None if now[1] is None else self._name_of(now[1])
            event = "elected" if now[0] == LEADER else "leader_change"
            log.info("shard %d: %s%s (ballot %s)", s,
                     "this node leads" if now[0] == LEADER else f"{now[0]}, leader {leader}",
                     "" if before[0] != LEADER or now[0] == LEADER else " (stepped down)",
                     format_ballot(r.promised),
                     extra={"event": event, "node": self.name, "shard": s, "role": now[0],
                            "leader": leader, "ballot": format_ballot(r.promised)})
            if before[0] == LEADER and now[0] != LEADER:
                self._uncommitted_bytes[s] = 0
                self._fail_waiting_writes(s, now[1])
