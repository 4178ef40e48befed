"""One node of a cluster: the shard replicas, their storage, the sockets and the clock.

This is the only place where the pure Paxos core meets I/O. A node owns one
``kvstore.paxos.Replica`` per shard, one ``ReplicaStorage`` (the write-ahead
log and LMDB) for all of them, one ``NodeSockets`` (a ROUTER for clients, one
for peers, a DEALER per peer) and a monotonic clock, and runs them from a single
thread in one loop. The sockets and the clock are ports (``kvstore.node.ports``):
the deterministic simulator (``kvstore.sim.realnode``) drives this same class
over an in-memory transport, its own clock and a simulated disk. ``run()`` is
the production shell (poll the sockets until the next tick is due); ``turn()``
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
   c. **answer** clients: writes whose commands were applied here (rule 5;
      a write whose entry was durable here before this save is answered from
      inside the save, once its result is computed: ``_answer_durable_early``),
      reads whose read index is now applied (rule 6), and a redirect for
      proposals and reads the replica dropped;
   d. ``advance``.

Clients are never answered from anywhere else, and nothing is sent before it
is persisted. The protocol retransmits on its own timers (heartbeats reset a
follower's progress), so a dropped frame only costs time.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
from collections import Counter, defaultdict, deque
from dataclasses import dataclass
from typing import Callable

import zmq

from kvstore.commands import (LOCKED, POISONED, STALE, DecodedCommands, TwoPC, client_command, command_wire,
                               decode_logged_command, encode_client_command, session_of, two_pc)
from kvstore._native import record_slot
from kvstore.errors import CorruptRecord
from kvstore.keys import MAX_CLUSTER_TXN_SIZE, MAX_COMMAND_BYTES, check_key
from kvstore.paxos import messages as M
from kvstore.paxos.ballot import BALLOT_MAX, format_ballot
from kvstore.paxos.replica import LEADER, Config, NotLeader, Replica
from kvstore.node.ports import NO_BUGS, NodeBugs, SystemClock
from kvstore.machine.replica import ReplicaStorage, ShardWrite, check_snapshot_data
from kvstore.machine.twopc import bound_client_2pc, check_decide
from kvstore.node.storage import WalReplicaStorage
from kvstore.txn import ABORT, TxnDecision, TxnPrepare, TxnResolve
from kvstore.sharding import shard_of
from kvstore.transport import wire
from kvstore.transport.sockets import (CLIENT, NodeSockets, derived_peer_address,
                                      peer_identity, shape_fingerprint)

log = logging.getLogger("kvstore.node")

#: Ticks carried out in one loop turn at most (a stalled process catches up gradually).
MAX_TICKS_PER_TURN = 3
#: Ready rounds per loop turn at most (a round can make another ready; bounded).
MAX_READY_ROUNDS = 4
#: A peer frame is cut into several above this many bytes (estimated).
PEER_FRAME_TARGET_BYTES = 8 * 1024 * 1024
#: Requests a node keeps waiting at most; beyond, new ones are told to retry.
WAITING_MAX = 100_000
#: A waiting write or read older than this is forgotten (its client has long retried).
WAITING_EXPIRE_SECONDS = 60.0
#: Bytes of client commands handed to one replica per loop turn at most (~ one entry).
PROPOSE_BYTES_PER_TURN = 4 * 1024 * 1024
#: Bytes of commands a leader keeps proposed but uncommitted per shard at most: a new
#: leader's Promises carry them all, and must fit a 64 MiB frame.
UNCOMMITTED_BYTES_MAX = 24 * 1024 * 1024
#: Messages a leader may send before the persist of their Ready (see the module docstring).
EARLY_TYPES = frozenset((M.ACCEPT, M.HEARTBEAT))
#: How often a shard's leader looks for prepared cross-shard transactions past their
#: deadline (their coordinator went quiet) to settle them (``_resolve_abandoned``).
RESOLVE_EVERY_SECONDS = 0.25
#: A settlement of an abandoned transaction not finished in this long is started again.
RESOLVE_RETRY_SECONDS = 3.0
#: Frame kinds of the peer protocol: accepted only on the peer socket.
PEER_KINDS = frozenset((wire.PAXOS, wire.FORWARD, wire.FORWARDED))
#: How often the node looks for a client key added to or revoked from ``clients/``.
RELOAD_KEYS_SECONDS = 2.0
#: A replica this many slots behind the commit point its leader last told it is "catching up".
CATCHING_UP_SLOTS = 100
#: Ticks after start at which a node campaigns for the shards it prefers to lead
#: (shard % nodes == its index) if they have no leader yet: leaders spread over nodes.
PREFERRED_CAMPAIGN_TICKS = (15, 40)


@dataclass(slots=True)
class WaitingWrite:
    """A client write proposed here, answered once its command is applied (or failed)."""

    identity: object  # a client's routing id, ("peer", index) or ("self", token)
    request_id: int
    shard: int
    since: float  # monotonic; forgotten after WAITING_EXPIRE_SECONDS


@dataclass(slots=True)
class WaitingRead:
    """A read waiting for its read index to be applied here."""

    identity: object
    request_id: int
    shard: int
    since: float
    op: str  # wire.OP_GET or wire.OP_SCAN
    args: list  # as the request carried them, checked


@dataclass(slots=True)
class Forwarded:
    """A request forwarded to the shard's leader: whom to give its answer."""

    identity: object
    request_id: int
    since: float


@dataclass(slots=True)
class OwnWrite:
    """A write of this node's own (a 2PC decision or resolve) until it is answered."""

    callback: Callable  # callback(result), once applied
    since: float  # monotonic; given up after RESOLVE_RETRY_SECONDS
    on_failure: Callable | None  # on_failure(status, value), or None: the resolver retries
    shard: int


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
    #: A ``kvstore keygen`` directory: CurveZMQ on every socket (``[security]``), or None.
    curve_keys: str | None = None
    #: name -> "tcp://host:port" where the node's peers connect (``[nodes.NAME]
    #: peer_address``); a node missing here listens on its client port + 10000.
    peer_addresses: dict | None = None

    @property
    def index(self) -> int:
        return self.names.index(self.name)

    def peer_address(self, name: str) -> str:
        """Where node ``name`` listens for its peers (see ``kvstore.transport.sockets``)."""
        given = (self.peer_addresses or {}).get(name)
        return given if given is not None else derived_peer_address(self.addresses[name])


class Node:
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
        self.index = config.index
        self.n = len(config.names)
        self.rng = rng or random.Random(int.from_bytes(os.urandom(8), "little"))
        self.storage = storage or WalReplicaStorage(config.data_dir, config.shards)
        self.nshards = self.storage.nshards
        self.counters: Counter = Counter()
        try:
            self.replicas = [self._make_replica(s) for s in range(self.nshards)]
            names = config.names
            peer_addresses = {nm: config.peer_address(nm) for nm in names}
            peers = {i: peer_addresses[nm] for i, nm in enumerate(names) if i != self.index}
            keys = None
            if config.curve_keys:
                from kvstore.transport.security import CurveKeys
                keys = CurveKeys(config.curve_keys, "node")
            # peers agree on the cluster's shape, or refuse each other's frames
            shape = shape_fingerprint(self.nshards, names, config.addresses, peer_addresses)
            self.sockets = transport or NodeSockets(
                config.addresses[self.name], peer_addresses[self.name], peers, keys=keys,
                identity=peer_identity(self.index, self.nshards, shape))
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
        self._tokens = itertools.count(1)
        self._roles = [(r.role, r.leader_hint) for r in self.replicas]
        self._stopping = False
        self._ticks = 0
        self._campaign_at = list(PREFERRED_CAMPAIGN_TICKS) if self.n > 1 else []
        self._last_expiry = self.clock.monotonic()
        # the resolver: this node's own writes (2PC settlements) go through _on_request
        # under the identity ("self", token) with their own client session
        self._resolver_id = b"resolver-" + self.rng.randbytes(8)
        # token (= its seq) -> OwnWrite
        self._own_writes: dict = {}
        self._resolving: dict = {}  # txn id -> monotonic time its settlement started
        self._last_resolve = self.clock.monotonic()
        self._refusals_logged: set = set()  # peer routing ids whose refusal was logged
        self._next_tick = self.clock.monotonic() + config.tick_seconds
        self._next_reload = self.clock.monotonic()

    def _make_replica(self, shard: int) -> Replica:
        c = self.config
        cfg = Config(node=self.index, num_nodes=self.n, rng=self.rng,
                     election_timeout_ticks=c.election_timeout_ticks,
                     heartbeat_interval_ticks=c.heartbeat_interval_ticks,
                     pipeline_window=c.pipeline_window, batch_commands_max=c.batch_commands_max,
                     entries_per_message_max=c.entries_per_message_max,
                     pending_commands_max=c.pending_commands_max,
                     log_retain_slots=c.log_retain_slots,
                     snapshot_chunk_bytes=c.snapshot_chunk_bytes,
                     lease_read_ticks=c.lease_read_ticks, snapshot_ok=check_snapshot_data)
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
        then one ``turn``. Returns after ``stop()``."""
        poller = zmq.Poller()
        poller.register(self.sockets.peer_router, zmq.POLLIN)
        poller.register(self.sockets.client_router, zmq.POLLIN)
        self._next_reload = self.clock.monotonic()
        self._next_tick = self.clock.monotonic() + self.config.tick_seconds
        log.info("node %s up at %s (peers at %s): %d shard(s), %d node(s)", self.name,
                 self.config.addresses[self.name], self.config.peer_address(self.name),
                 self.nshards, self.n,
                 extra={"event": "start", "node": self.name})
        try:
            while not self._stopping:
                wait = self._next_tick - self.clock.monotonic()
                self.turn(bool(poller.poll(max(0, int(wait * 1000) + 1) if wait > 0 else 0)))
            self.finish()
        finally:
            self.close()

    def turn(self, inbox_ready: bool = True) -> None:
        """One turn of the loop (the module docstring): receive (if ``inbox_ready``),
        tick if a tick is due on the clock, drive, flush the replies. The production
        loop calls it once its poll returns; the simulator calls it once per step."""
        tick = self.config.tick_seconds
        lease = self.config.lease_read_ticks > 0
        if inbox_ready:
            if lease and self.clock.monotonic() - self._next_tick > tick:
                self._clock_jumped()  # before any read: the ticks lag the clock
            self._receive()
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
            if now - self._last_expiry > 1.0:
                self._expire_waiting(now)
            if now - self._last_resolve > RESOLVE_EVERY_SECONDS:
                self._resolve_abandoned(now)
            if now >= self._next_reload:  # a client key added to or revoked from clients/
                self._next_reload = now + RELOAD_KEYS_SECONDS
                self.sockets.reload_keys()
        self._drive()
        self._flush_replies()

    def finish(self) -> None:
        """After ``stop()``: finish in-flight work that is already decided (one last
        persist/send/answer)."""
        self._drive()
        self._flush_replies()

    def _clock_jumped(self) -> None:
        for r in self.replicas:
            r.clock_jumped()

    def close(self) -> None:
        sockets, self.sockets = getattr(self, "sockets", None), None
        if sockets is not None:
            sockets.close()
            self.storage.close()
            log.info("node %s stopped", self.name, extra={"event": "stop", "node": self.name})

    # ------------------------------------------------------------------ 1. receive
    def _receive(self) -> None:
        """Frames from both ROUTERs: client kinds only from the client socket, the peer
        protocol only from the peer socket (``kvstore.transport.sockets``); anything
        else is dropped and counted by reason before it is decoded further."""
        sockets = self.sockets
        for role, identity, frame in sockets.recv_many():
            try:
                body = wire.decode(frame, wire.MAX_REQUEST_FRAME_BYTES if role == CLIENT
                                   else wire.MAX_PEER_FRAME_BYTES)
            except wire.FrameError as e:
                self._drop("malformed", e)
                continue
            kind = body[0]
            if role == CLIENT:
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
                self._on_paxos(body[1], body[2])
            else:
                frm = body[1]
                if not (0 <= frm < self.n) or frm == self.index:
                    self._drop("malformed", f"forward from unknown node {frm}")
                elif kind == wire.FORWARDED:
                    self._on_forwarded(frm, body[2])
                else:
                    for forward_id, op, args in body[2]:
                        self._on_request(("peer", frm), forward_id, op, args)
        self._log_refused_peers()

    def _log_refused_peers(self) -> None:
        """One line per peer connection refused for its shape (``NodeSockets.refusals``)."""
        refusals = self.sockets.refusals
        if len(refusals) == len(self._refusals_logged):
            return
        for identity, why in refusals.items():
            if identity not in self._refusals_logged:
                self._refusals_logged.add(identity)
                log.error("refused a peer: %s; it takes no part in this cluster", why,
                          extra={"event": "peer_refused", "node": self.name, "why": why})

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
        if not (0 <= frm < self.n) or frm == self.index:
            self._drop("malformed", f"paxos batch from unknown node {frm}")
            return
        for shard, m in items:
            if not (0 <= shard < self.nshards):
                self._drop("malformed", f"paxos message for shard {shard}")
                continue
            why = wire.check_paxos_message(m, self.index, self.n, self._check_peer_command)
            if why is not None:
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

    def _on_request(self, identity: bytes, request_id: int, op: str, args: list) -> None:
        if self._stopping:
            self._reply(identity, request_id, wire.STATUS_RETRY, "stopping")
            return
        try:
            if op == wire.OP_HELLO or op == wire.OP_STATUS:
                self._reply(identity, request_id, wire.STATUS_OK, self.status())
                return
            if len(self.waiting_writes) + len(self.waiting_reads) >= WAITING_MAX:
                self._reply(identity, request_id, wire.STATUS_RETRY, "overloaded")
                return
            if op == wire.OP_WRITE:
                self._on_write(identity, request_id, args)
            elif op == wire.OP_DECIDE:
                self._on_decide(identity, request_id, args)
            else:
                self._on_read(identity, request_id, op, args)
        except (ValueError, TypeError) as e:
            name = type(e).__name__ if type(e).__name__ == "InvalidArgument" else "InvalidArgument"
            self._reply(identity, request_id, wire.STATUS_ERROR, [name, str(e)[:500]])

    def _shard_arg(self, v) -> int:
        if type(v) is not int or not 0 <= v < self.nshards:
            raise ValueError(f"no shard {v!r} (this cluster has {self.nshards})")
        return v

    def _not_leader(self, identity, request_id: int, op: str, args: list, hint) -> None:
        """Not the shard's leader: forward a client's request to the leader this node
        knows (its answer comes back through here, naming the leader so the client goes
        straight there next time); a forwarded request is never forwarded again."""
        forwardable = type(identity) is bytes or identity[0] == "self"
        if forwardable and hint is not None and hint != self.index:
            forward_id = next(self._tokens)
            self._forwarded[forward_id] = Forwarded(identity, request_id, self.clock.monotonic())
            self._forward_out[hint].append((forward_id, op, args))
            return
        self._reply(identity, request_id, wire.STATUS_NOT_LEADER, hint)

    def _on_forwarded(self, frm: int, replies: list) -> None:
        for forward_id, status, value in replies:
            w = self._forwarded.pop(forward_id, None)
            if w is None:
                continue
            if status == wire.STATUS_OK:
                self._reply(w.identity, w.request_id, wire.STATUS_OK_FORWARDED, [value, frm])
            else:
                self._reply(w.identity, w.request_id, status, value)

    def _check_keys_in_shard(self, shard: int, keys) -> None:
        if self.nshards == 1:
            return
        for key in keys:
            if shard_of(key, self.nshards) != shard:
                raise ValueError(f"key {key[:40]!r} belongs to shard {shard_of(key, self.nshards)}, "
                                 f"not {shard}")

    def _on_write(self, identity: bytes, request_id: int, args: list) -> None:
        if len(args) != 5:
            raise ValueError("write takes [shard, client_id, seq, floor, command]")
        shard = self._shard_arg(args[0])
        write = client_command(*args[1:])  # decoded, checked and typed: once, here
        command = write.command
        if type(command) is TwoPC:
            # a client's TxnPrepare bounded (its deadline cut to this node's clock + a cap);
            # a decision or a resolve only from this node's own writes, or a peer's
            # (forwarded after that peer checked it): never from a client
            bounded = bound_client_2pc(command, shard, self.nshards,
                                       int(self.clock.time() * 1000), _internal(identity))
            if bounded is not command:
                write = write._replace(command=bounded)
        self._check_keys_in_shard(shard, write.command.keys())
        r = self.replicas[shard]
        if not r.is_leader:
            self._not_leader(identity, request_id, wire.OP_WRITE, _write_args(shard, write),
                             r.leader_hint)
            return
        raw = encode_client_command(*write)
        if len(raw) > MAX_COMMAND_BYTES:
            raise ValueError(f"a write command of {len(raw)} bytes is over the cluster's limit "
                             f"of {MAX_COMMAND_BYTES} (a transaction writes at most "
                             f"MAX_CLUSTER_TXN_SIZE = {MAX_CLUSTER_TXN_SIZE} bytes)")
        self._decoded.add(raw, write)
        self._proposals[shard].append((raw, identity, request_id, shard, write))
        self.waiting_writes[(write.client_id, write.seq)] = WaitingWrite(
            identity, request_id, shard, self.clock.monotonic())

    def _on_decide(self, identity, request_id: int, args: list) -> None:
        """A coordinator (a client) asks for its transaction's decision: this node, if it
        leads the coordinator shard, proposes the TxnDecision as its own write, answers
        the recorded outcome (first recorded wins: maybe a resolver's ABORT), then
        carries it out on every participant (``_resolve_everywhere``). The client never
        writes a decision or a resolve itself; a lost resolve is done by the resolvers."""
        shard, decision, participants = check_decide(args, self.nshards)
        r = self.replicas[shard]
        if not r.is_leader:
            self._not_leader(identity, request_id, wire.OP_DECIDE, args, r.leader_hint)
            return
        self.counters["txn_decide_requests"] += 1

        def recorded(outcome) -> None:
            self._reply(identity, request_id, wire.STATUS_OK, outcome)
            self._resolve_everywhere(decision.txn_id, outcome, participants)

        def failed(status: int, value) -> None:
            self._reply(identity, request_id, status, value)

        self._own_write(shard, two_pc(decision), recorded, failed)

    def _feed_proposals(self) -> None:
        """Hand queued writes to the replicas, bounded in bytes.

        The core cuts entries by command count only; a node bounds their bytes
        so that no entry, Accept or Promise outgrows a frame (``MAXMSGSIZE``,
        which a peer enforces by dropping the connection, so an oversized
        message would stall the shard for good): commands go to a replica only
        when its own queue is empty, at most ``PROPOSE_BYTES_PER_TURN`` per
        turn (one entry), a command larger than that in an entry of its own
        (at most ``MAX_COMMAND_BYTES``, checked at intake), and while less than
        ``UNCOMMITTED_BYTES_MAX`` it leads with are still uncommitted.
        """
        for shard, queue in enumerate(self._proposals):
            if not queue:
                continue
            r = self.replicas[shard]
            if not r.is_leader:
                while queue:
                    raw, identity, request_id, _shard, write = queue.popleft()
                    self._decoded.forget(raw)
                    self.waiting_writes.pop((write.client_id, write.seq), None)
                    self._not_leader(identity, request_id, wire.OP_WRITE,
                                     _write_args(shard, write), r.leader_hint)
                continue
            if r.pending_commands:
                continue
            fed = 0
            while queue and self._uncommitted_bytes[shard] < UNCOMMITTED_BYTES_MAX:
                if fed and fed + len(queue[0][0]) > PROPOSE_BYTES_PER_TURN:
                    break  # the next entry's
                raw = queue.popleft()[0]
                r.propose(raw)
                fed += len(raw)
                self._uncommitted_bytes[shard] += len(raw)

    def _on_read(self, identity: bytes, request_id: int, op: str, args: list) -> None:
        if op == wire.OP_GET:
            if len(args) != 3:
                raise ValueError("get takes [shard, key, with_revision]")
            check_key(args[1])
            if type(args[1]) is not bytes:
                raise ValueError("key must be bytes")
        elif op == wire.OP_SCAN:
            if len(args) != 5:
                raise ValueError("scan takes [shard, lo, hi, limit, with_revision]")
            lo, hi, limit = args[1], args[2], args[3]
            if type(lo) is not bytes or (hi is not None and type(hi) is not bytes):
                raise ValueError("scan bounds must be bytes")
            if limit is not None and (type(limit) is not int or limit < 0):
                raise ValueError("scan limit must be an int >= 0")
        else:
            raise ValueError(f"unknown op {op!r}")
        shard = self._shard_arg(args[0])
        if op == wire.OP_GET:
            self._check_keys_in_shard(shard, (args[1],))
        token = next(self._tokens)
        try:
            self.replicas[shard].read(token)
        except NotLeader as e:
            self._not_leader(identity, request_id, op, args, e.leader_hint)
            return
        self.waiting_reads[token] = WaitingRead(identity, request_id, shard, self.clock.monotonic(),
                                                op, args)

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
                                 rd.compacted_through, rd.committed, decoded=self._decoded)
                      for s, rd in readies
                      if (rd.promised is not None or rd.commit_index is not None or rd.records
                          or rd.snapshot is not None or rd.compacted_through is not None
                          or rd.committed)]
            # slots whose records this save makes durable: their writes wait for it
            self._fresh_slots = {(w.shard, record_slot(r)) for w in writes for r in w.records}
            outbox: dict = defaultdict(list)
            early: dict = defaultdict(list)
            for s, rd in readies:
                for m in rd.messages:
                    (early if m.type in EARLY_TYPES and writes else outbox)[m.to].append((s, m))
            for peer, items in early.items():  # the leader's Accepts overlap its own fsync
                for frame in _frames(self.index, items):
                    self.sockets.send_peer(peer, frame)
            results = self.storage.save(writes, self._answer_durable_early) if writes else []
            self._fresh_slots = None
            self.counters["poisoned_values"] += sum(1 for r in results if r[3] is POISONED)
            # b. send: one frame (or a few, if huge) per peer, across shards
            for peer, items in outbox.items():
                for frame in _frames(self.index, items):
                    self.sockets.send_peer(peer, frame)
            # c. answer
            self._answer_writes(results)
            for s, rd in readies:
                if rd.reads:
                    self._serve_reads(rd.reads)
                if rd.dropped_commands or rd.dropped_reads:
                    self._answer_dropped(s, rd)
            # d. advance
            for s, rd in readies:
                replicas[s].advance(rd)
                if rd.snapshot is not None:
                    log.info("shard %d: installed a snapshot through slot %d from the leader",
                             s, rd.snapshot.index,
                             extra={"event": "snapshot_installed", "node": self.name, "shard": s,
                                    "index": rd.snapshot.index})
        self._observe_roles()
        self._maybe_snapshot()

    def _campaign_for_preferred_shards(self) -> None:
        for s, r in enumerate(self.replicas):
            if s % self.n == self.index and r.leader_hint is None:
                r.campaign()

    def _maybe_snapshot(self) -> None:
        """Snapshot a shard whose log grew by ``snapshot_every_slots`` since the last one.

        The snapshot is the applied state itself (durable in the storage at
        ``applied_index``); the replica keeps it for followers too far behind
        for the log and drops older log records (deleted at the next save).
        """
        every = self.config.snapshot_every_slots
        for s, r in enumerate(self.replicas):
            if r.applied_index - max(r.snapshot_index, -1) >= every:
                index = r.applied_index
                data = self.storage.snapshot_data(s)
                r.compact(index, data)
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

    def _answer_writes(self, results: list) -> None:
        waiting = self.waiting_writes
        if not waiting:
            return
        for _shard, _slot, key, result in results:
            w = waiting.pop(key, None)
            if w is not None and result is not STALE:
                self._reply(w.identity, w.request_id, wire.STATUS_OK, result)

    def _serve_reads(self, tokens: list) -> None:
        for token in tokens:
            w = self.waiting_reads.pop(token, None)
            if w is None:
                continue
            identity, request_id, shard, op, args = w.identity, w.request_id, w.shard, w.op, w.args
            client = type(identity) is bytes
            if client and not self.sockets.reply_room(identity):
                continue  # a client that does not read its replies: cut off (counted)
            if op == wire.OP_GET:
                found = self.storage.get(shard, args[1])
                if found is LOCKED:  # a prepared transaction writes it: its value may change
                    self._reply(identity, request_id, wire.STATUS_RETRY, LOCKED)
                    continue
                result = [found[0], found[1]] if args[2] else found[0]
                size = len(found[0] or b"")
            else:
                rows = self.storage.scan(shard, args[1], args[2], args[3])
                if rows is LOCKED:
                    self._reply(identity, request_id, wire.STATUS_RETRY, LOCKED)
                    continue
                result = ([[k, v, rev] for k, v, rev in rows] if args[4]
                          else [[k, v] for k, v, _rev in rows])
                size = sum(len(k) + len(v) + 16 for k, v, _rev in rows)
            if client:
                self.sockets.charge(identity, size)
            self._reply(identity, request_id, wire.STATUS_OK, result)

    def _answer_dropped(self, shard: int, rd) -> None:
        hint = self.replicas[shard].leader_hint
        status = wire.STATUS_NOT_LEADER if hint != self.index else wire.STATUS_RETRY
        value = hint if status == wire.STATUS_NOT_LEADER else "dropped"
        for raw in rd.dropped_commands:
            self._decoded.forget(raw)
            w = self.waiting_writes.pop(session_of(raw), None)
            if w is not None:
                self._reply(w.identity, w.request_id, status, value)
        for token in rd.dropped_reads:
            w = self.waiting_reads.pop(token, None)
            if w is not None:
                self._reply(w.identity, w.request_id, status, value)

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
            leader = None if now[1] is None else self.config.names[now[1]]
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

    def _fail_waiting_writes(self, shard: int, hint) -> None:
        """This node stopped leading ``shard``: its clients should retry at the new leader
        (a command already in the log may still be chosen; the retry is then answered
        from the session table, not applied twice)."""
        self._proposals[shard].clear()  # their waiting entries are answered just below
        for key, w in list(self.waiting_writes.items()):
            if w.shard == shard:
                del self.waiting_writes[key]
                self._reply(w.identity, w.request_id, wire.STATUS_NOT_LEADER, hint)

    def _expire_waiting(self, now: float) -> None:
        self._last_expiry = now
        cutoff = now - WAITING_EXPIRE_SECONDS
        for table in (self.waiting_writes, self.waiting_reads, self._forwarded):
            for key in [k for k, w in table.items() if w.since < cutoff]:
                del table[key]

    # ------------------------------------------------------------------ 2PC resolver
    def _resolve_abandoned(self, now: float) -> None:
        """Settle the prepared cross-shard transactions of the shards this node leads
        whose deadline passed (their coordinator, a client, went quiet or died): ask
        the coordinator shard to decide ABORT (a decision already recorded wins: first
        writer), then carry the recorded outcome out here. Any node may do this at any
        time (``kvstore.txn``): each step is an idempotent log entry, so a duplicate
        or a race with the live coordinator changes nothing. Rule 7 holds because a
        resolver only ever proposes ABORT and acts on what the log recorded."""
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
                self._own_write(prepare.coordinator, two_pc(TxnDecision(prepare.txn_id, ABORT)),
                                lambda outcome, s=shard, p=prepare: self._carry_out(s, p, outcome))

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

    def _own_write(self, shard: int, command: TwoPC, callback, on_failure=None) -> None:
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
                         [shard, self._resolver_id, token, floor, list(command.wire())])

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

    # ------------------------------------------------------------------ status
    def status(self) -> dict:
        """Per shard: this replica's role, leader, commit and applied points, and ``state``:
        "recovering" (it restarted without its Paxos state and does not vote yet: README,
        "A node that lost its disk"), "catching up" (receiving a snapshot, or more than
        ``CATCHING_UP_SLOTS`` behind the commit point its leader told it) or "ok"; on the
        leader, ``followers``: how far it knows each node holds the log."""
        names = self.config.names
        shards = []
        for s, r in enumerate(self.replicas):
            hint = r.leader_hint
            st = r.status()
            state = ("recovering" if st["recovering"] else
                     "catching up" if st["receiving_snapshot"] or st["behind"] > CATCHING_UP_SLOTS else "ok")
            shard = {"shard": s, "role": r.role,
                     "leader": None if hint is None else names[hint],
                     "leader_index": hint, "commit_index": r.commit_index,
                     "applied_index": r.applied_index, "ballot": format_ballot(r.promised),
                     "state": state, "recovery_phase": st["recovering"]}
            if "match" in st:
                shard["followers"] = {names[i]: m for i, m in enumerate(st["match"])}
            shards.append(shard)
        return {"node": self.name, "index": self.index,
                "nodes": [{"id": nm, "address": self.config.addresses[nm]} for nm in names],
                "nshards": self.nshards, "shards": shards,
                "counters": dict(self.counters) | dict(self.sockets.counters)}


def _internal(identity) -> bool:
    """A request of this node's own (``("self", token)``) or forwarded by a peer
    (``("peer", index)``, checked by that peer when its client sent it)."""
    return type(identity) is tuple


def _write_args(shard: int, write) -> list:
    """A write's request arguments, as a client sends them (forwarded to the leader)."""
    return [shard, write.client_id, write.seq, write.floor, command_wire(write.command)]


def _ignore(_result) -> None:
    pass


def _frames(frm: int, items: list):
    """``items`` for one peer as frames of about ``PEER_FRAME_TARGET_BYTES`` at most."""
    batch, size = [], 0
    for shard, m in items:
        n = wire.paxos_message_bytes(m)
        if batch and size + n > PEER_FRAME_TARGET_BYTES:
            yield wire.encode_paxos(frm, batch)
            batch, size = [], 0
        batch.append((shard, m))
        size += n
    if batch:
        yield wire.encode_paxos(frm, batch)
