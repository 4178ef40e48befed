"""Deterministic simulation of the real node: ``python -m kvstore.sim`` (the default).

The one simulator of the replicated store (the core's own driver, a copy of the
node's loop, is retired: one driver, the one that runs). It builds N real
``kvstore.node.loop.Node`` objects with
real ``WalReplicaStorage``, and drives them through their ports
(``kvstore.node.ports``): an in-memory transport, a clock the simulation moves, and
per node a data directory whose write-ahead log lives in the power-loss twin
(``kvstore.sim.disk.FaultyFiles``) and whose LMDB files live on a real
(tmpfs) directory. LMDB is only ever committed synced, so its files as they
are at a crash are what a power loss leaves; the log loses every write not
fdatasync'd, and its last unsynced write may be torn. Checkpoints have no
thread here: the simulation schedules them as steps.

One seed drives one ``random.Random`` for everything; iteration is sorted
where order matters; no threads, no wall clock. Each step is one tick: the
frames due are delivered, faults strike, checkpoints run, and every live node
takes one ``turn()`` (receive, tick, drive: persist, send, answer), in index
order. Clients speak the wire protocol as ``kvstore.client.core`` does: writes
(puts and compare-and-sets) with client sessions (``OP_WRITE`` with client
id, sequence and floor), linearizable gets (``OP_GET``), retries at the
leader a redirect names, one request id for every attempt of an operation.
With ``bank``, bank clients too (``realbank.py``): transfers and audits as
``kvstore.client``'s own transactions, across shards by two-phase commit.

Faults (swarm testing draws each seed's rates): frames dropped, duplicated,
delayed and so reordered, some held for many election timeouts; stalls (a node
takes no turn for a while, its clock running on: with lease reads on, in some
seeds, it must void its leases; a leader's, often long; on waking it reads
its connections in any interleaving);
partitions (a node cut from the others, or two halves, some one way);
crash-restarts of one node, of a minority, of the whole cluster,
each a power loss of the log's unsynced writes (sometimes inside a save,
between its write and its fsync, tearing the write), some with an empty disk
(one node without its state at a time); checkpoints at random times; in a
third of the seeds, the byzantine sender (``realbyzantine.py``).

With ``membership_changes`` (``--members``), an operator (``realmembers.py``) adds,
promotes and removes members through ``kvstore.client.members`` during the faults; the
simulation has room for nodes past the bootstrap ones, a removed node is stopped and its
index may go to a new node (a new generation: frames meant for the old one never reach
it), and a wiped member restarts with what ``--join`` gets. Its checks: only a voter of
a ballot's epoch campaigns with it (``check_campaign``), and at the end every member
holds one membership per shard naming the nodes running (``check_members``).

Checks after every step: the core's oracle per shard (``oracle.py``), fed what
each node's replicas made, in order, once its save returned; every slot any
node applies holds what every other applied there; every revision in any node's
watch history holds what every other's held there (``check_watch``); the bank's
(``realbank.py``).
Checks at restarts and at the end:

- acceptor memory, at every restart: the recovered promise covers every
  ballot the node announced before the crash (in a Promise or an Accepted),
  and the log holds every slot it acknowledged (``match_index`` of its
  Accepteds) that is above its snapshot (safety rule 1);
- recovery succeeds (``check_recovered`` refuses an inconsistent directory);
- agreement: once everything is healed and every node applied the same
  point, every node holds the same state of every shard (``snapshot_data``);
- the client history is linearizable (``check_history``): acknowledged writes
  included, so a write acknowledged and then lost fails it; every key is read
  at the end;
- liveness: once faults stop, every shard elects a leader every node follows
  and every client operation completes within a bound; then, with no faults,
  no leader is deposed, not even by a follower that crashes and rejoins
  (on 3 nodes or more: on 2, the one left is no majority).

A failing seed prints the command that replays it exactly.

Long module: one seed's world (the nodes and their ports, the network, the disks, the
faults, the register clients and the per-step checks) draws from one random stream in one
order; the bank workload (``realbank``), the byzantine sender (``realbyzantine``), the
disk (``disk``) and the oracle (``oracle``) are their own modules already.
"""

from __future__ import annotations

import heapq
from collections import deque
import logging
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, fields, replace

from kvstore.commands import OP_CAS, OP_PUT
from kvstore.errors import CorruptRecord
from kvstore.node.loop import EARLY_TYPES, Node, NodeConfig
from kvstore.paxos import messages as M
from kvstore.paxos.ballot import ballot_epoch, format_ballot
from kvstore.paxos.replica import LEADER
from kvstore.node.ports import NO_BUGS, NodeBugs
from kvstore.transport.sockets import CLIENT, PEER
from kvstore.node.resolver import FORGET_AFTER_SECONDS, RESOLVE_EVERY_SECONDS, SWEEP_EVERY_SECONDS
from kvstore.node.storage import WalReplicaStorage
from kvstore.sharding import shard_of
from kvstore.sim.disk import FaultyFiles, PowerLoss
from kvstore.sim.endpoint import OneOpAtATime
from kvstore.sim.oracle import InvariantViolation, Oracle
from kvstore.sim.realbyzantine import RealNodeByzantine
from kvstore.sim.realbackup import BackupTaker
from kvstore.sim.realbank import BankClient, Ledger
from kvstore.sim.realmembers import Operator, client_address, peer_address
from kvstore.transport.members import MAX_NODES
from kvstore.sim.reallease import LeaseChecks, LeaseClient, LeaseFailure
from kvstore.sim.realwatch import WatchChecks, Watcher, WatchFailure
from kvstore.sim.linearizability import CheckerGaveUp, Operation, check_history
from kvstore.sim.trace import Trace, failure_report
from kvstore.transport import wire

#: One tick of simulated time, in seconds: a power of two, so clock sums are exact.
TICK = 1 / 64
#: The simulated wall clock starts here (seconds since the epoch).
EPOCH = 1_700_000_000.0
KEYS = (b"a", b"b", b"c", b"d", b"e")
#: The log's segments are small so that rolls and truncations happen in every run.
SEGMENT_BYTES = 16 * 1024


class SimulationFailure(Exception):
    """A check failed (the message says which)."""


@dataclass
class RealNodeConfig:
    seed: int = 0
    nodes: int = 3
    shards: int = 0  # 0: the seed draws 1-3
    ticks: int = 500  # the fault phase
    settle_ticks: int = 600  # the bound on electing and finishing every operation after it
    stable_ticks: int = 200  # the fault-free tail in which no leader may be deposed
    clients: int = 3
    drop_rate: float = 0.03
    duplicate_rate: float = 0.03
    delay_max_ticks: int = 3
    # a frame held for 2-12 election timeouts, then delivered (a retransmission from long
    # ago, a link that buffered): old ballots, old snapshots, old Accepts arrive late
    long_delay_rate: float = 0.0
    partition_rate: float = 0.01  # per tick: a partition starts (one ends at the same rate x3)
    crash_rate: float = 0.006  # per tick: a crash-restart (one node, a minority or all)
    crash_in_save_rate: float = 0.5  # of crashes: the power goes inside the node's next save
    crash_after_restart_rate: float = 0.2  # a restarted node's power goes again while it catches up
    down_ticks_max: int = 40  # a crashed node stays down up to this long
    # a crashed node restarts with an empty directory (a replaced disk): this often, per
    # restart, when the fault model allows it (one node without its state at a time)
    wipe_rate: float = 0.0
    pause_rate: float = 0.003  # per tick: a node stalls (no turns; its clock runs on)
    # per tick: a shard's leader stalls (a GC pause), for 1-8 election timeouts: the others
    # elect another and write; it wakes to the requests that waited in its inbox
    leader_pause_rate: float = 0.0
    lease_read_ticks: int = 0  # lease reads (0: off); swarm turns them on in some seeds
    replay_rate: float = 0.0  # per tick: a peer frame sent lately arrives again
    probe_rate: float = 0.0  # per tick: the read prober's gets (``Simulation.probe``)
    checkpoint_rate: float = 0.05  # per node per tick
    election_timeout_ticks: int = 10
    heartbeat_interval_ticks: int = 2
    snapshot_every_slots: int = 40
    log_retain_slots: int = 8
    client_retry_ticks: int = 12
    client_give_up_ticks: int = 80
    # watchers of every shard (``realwatch.py``); None: the seed's own stream draws 0-2
    watchers: int | None = None
    # lease holders (``reallease.py``); None: their own stream draws 0-2
    lease_clients: int | None = None
    bank: bool = False  # bank clients too: transfers and audits across shards (realbank.py)
    bank_clients: int = 3
    accounts: int = 6
    # with bank: cluster backups taken meanwhile (realbackup.py); None: its own stream draws 0-1
    backups: int | None = None
    # a byzantine-input sender (realbyzantine.py); None: in the seeds where seed % 3 == 2
    byzantine: bool | None = None
    byzantine_rate: float = 0.15  # per tick: it sends one fuzzed frame to an awake node
    # an operator adds, promotes and removes members during the faults (realmembers.py)
    membership_changes: bool = False
    bugs: NodeBugs = NO_BUGS
    swarm: bool = True
    trace_lines: int = 60
    verbose: bool = False


def swarm(config: RealNodeConfig, rng: random.Random) -> RealNodeConfig:
    """One seed's own mix of fault rates and settings (swarm testing)."""
    pick = lambda *xs: xs[rng.randrange(len(xs))]  # noqa: E731
    election = pick(8, 10, 16)
    shards = rng.randint(1, 3)  # drawn even when given, so that a replay draws the same rest
    return replace(config,
                   shards=config.shards or shards,
                   clients=pick(3, 6),
                   down_ticks_max=pick(40, 100),
                   drop_rate=pick(0.0, 0.02, 0.08),
                   duplicate_rate=pick(0.0, 0.03, 0.1),
                   delay_max_ticks=pick(1, 3, 6),
                   long_delay_rate=pick(0.0, 0.005, 0.02),
                   replay_rate=pick(0.0, 0.01, 0.05),
                   partition_rate=pick(0.0, 0.01, 0.03),
                   crash_rate=pick(0.003, 0.01, 0.02),
                   crash_in_save_rate=pick(0.2, 0.5, 0.8),
                   crash_after_restart_rate=pick(0.0, 0.2, 0.5),
                   wipe_rate=pick(0.0, 0.3, 0.7),
                   pause_rate=pick(0.0, 0.003, 0.01),
                   leader_pause_rate=pick(0.0, 0.003, 0.01),
                   lease_read_ticks=pick(0, election - 3),
                   checkpoint_rate=pick(0.02, 0.1, 0.3),
                   election_timeout_ticks=election,
                   heartbeat_interval_ticks=pick(1, 2, max(2, election // 4)),
                   snapshot_every_slots=pick(10, 40, 1000),
                   log_retain_slots=pick(2, 8, 50),
                   bank_clients=pick(2, 4), accounts=pick(3, 6))


# ---------------------------------------------------------------------------------- ports

class SimClock:
    """The simulation's time, as every node reads it (``kvstore.node.ports.Clock``)."""

    def __init__(self, sim: "Simulation") -> None:
        self.sim = sim

    def monotonic(self) -> float:
        return self.sim.now * TICK

    def time(self) -> float:
        return EPOCH + self.sim.now * TICK


class SimTransport:
    """A node's end of the in-memory network (``kvstore.node.ports.Transport``, what the node
    uses of ``NodeSockets``): frames wait in ``inbox`` tagged by the socket they came on
    (``CLIENT`` or ``PEER``); a peer's routing id names its index, as a real peer's does."""

    def __init__(self, sim: "Simulation", index: int) -> None:
        self.sim = sim
        self.index = index
        self.inbox: list = []  # (source, identity, frame)
        self.first_only: int | None = None  # the next recv_many returns this many, at most
        self.counters: dict = {}
        self.refusals: dict = {}  # no peer of another cluster shape here
        self.links: dict = {}  # index -> peer address, as the node opened them (add_peer)

    def recv_many(self) -> list:
        if self.first_only is not None:  # after a stall: the rest comes at the next turn
            frames, self.inbox = self.inbox[:self.first_only], self.inbox[self.first_only:]
            self.first_only = None
            return frames
        frames, self.inbox = self.inbox, []
        return frames

    def peer_index(self, identity: bytes) -> int:
        return int(identity[len(b"node-"):])

    def send_peer(self, index: int, frame: bytes) -> bool:
        sim = self.sim
        if not 0 <= index < len(sim.nodes) or not sim.nodes[index].up:
            return False  # as IMMEDIATE does: nothing is queued for a peer that is down
        target = sim.nodes[index]
        if sim.config.membership_changes and self.links.get(index) != target.peer_address:
            return False  # no link to the node now at that index (a new one, or removed)
        sim.send(("node", self.index), ("node", index, target.generation), PEER,
                 b"node-%d" % self.index, frame)
        return True

    def peer_address_of(self, identity: bytes) -> str | None:
        """The peer address a real routing id names: the node's now at that index (with
        membership changes; else None: the nodes of a fixed simulation know each other)."""
        sim = self.sim
        if not sim.config.membership_changes:
            return None
        index = self.peer_index(identity)
        node = sim.nodes[index] if 0 <= index < len(sim.nodes) else None
        return node.peer_address if node is not None and node.present else None

    def add_peer(self, index: int, address: str) -> None:
        self.links[index] = address

    def remove_peer(self, index: int) -> None:
        self.links.pop(index, None)

    def reply(self, identity: bytes, items: list) -> None:
        client = self.sim.client_by_identity.get(identity)
        if client is not None:
            self.sim.send(("node", self.index), ("client", client.index), CLIENT, identity,
                          wire.encode_replies(items))

    def reply_room(self, identity: bytes) -> bool:
        return True  # the simulated clients read every reply

    def charge(self, identity: bytes, size: int) -> None:
        pass

    def reload_keys(self) -> None:
        pass  # no CurveZMQ keys in a simulation

    def may_administer(self, identity: bytes) -> bool:
        return True  # no keys: every client may, as without Curve

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------- nodes

class SimNode:
    """One node's incarnations over one data directory (LMDB on tmpfs, the log in a twin)."""

    def __init__(self, sim: "Simulation", index: int, root: str, generation: int = 0,
                 name: str | None = None) -> None:
        self.sim = sim
        self.index = index
        # a node index a removed node had is given to a new node (``member add`` numbers a
        # new node with the lowest free index): a new generation, name, disk and addresses
        self.generation = generation
        self.name = name or f"n{index}"
        self.present = generation == 0 and index < sim.config.nodes  # a member started
        self.join: NodeConfig | None = None  # what it starts with (``--join``), else cluster.toml
        if sim.config.membership_changes:
            self.address, self.peer_address = client_address(self.name), peer_address(self.name)
        else:
            self.address, self.peer_address = f"sim://{self.name}", f"sim://{self.name}-peers"
        self.dir = os.path.join(root, f"n{index}" + (f".{generation}" if generation else ""))
        os.makedirs(self.dir)
        self.files = FaultyFiles(seed=sim.rng.randrange(1 << 30))
        self.transport = SimTransport(sim, index)
        self.node: Node | None = None
        self.down_until = 0
        self.paused_until = 0
        self.stalled = False
        self.incarnation = 0
        # what this node announced since it last started: checked at its next restart
        self.heal_target = None  # after a wipe: per shard, the slot it must commit to count as healed
        self.promised_sent = {}  # shard -> highest ballot in a Promise or an Accepted
        self.matched_sent = {}  # shard -> highest match_index in an Accepted

    @property
    def up(self) -> bool:
        return self.node is not None

    def start(self) -> None:
        sim, c = self.sim, self.sim.config
        self.incarnation += 1
        timing = dict(data_dir=self.dir, tick_seconds=TICK,
                      election_timeout_ticks=c.election_timeout_ticks,
                      heartbeat_interval_ticks=c.heartbeat_interval_ticks,
                      snapshot_every_slots=c.snapshot_every_slots,
                      log_retain_slots=c.log_retain_slots, snapshot_chunk_bytes=256,
                      lease_read_ticks=c.lease_read_ticks)
        if self.join is not None:
            cfg = replace(self.join, **timing)
        else:
            names = [f"n{i}" for i in range(c.nodes)]  # cluster.toml's
            tcp = c.membership_changes  # an info that names them needs tcp:// addresses
            cfg = NodeConfig(name=self.name, names=names,
                             addresses={nm: client_address(nm) if tcp else f"sim://{nm}"
                                        for nm in names},
                             peer_addresses={nm: peer_address(nm) if tcp else f"sim://{nm}-peers"
                                             for nm in names},
                             shards=c.shards, **timing)
        try:
            storage = WalReplicaStorage(self.dir, c.shards, files=self.files,
                                        checkpoint_thread=False, segment_bytes=SEGMENT_BYTES,
                                        bugs=c.bugs)
        except CorruptRecord as e:
            raise SimulationFailure(f"n{self.index} cannot restart: {e}") from e
        self.watch_saves(storage)
        rng = random.Random(sim.rng.randrange(1 << 62))
        self.node = Node(cfg, storage, rng, transport=self.transport, clock=sim.clock,
                         bugs=c.bugs)
        self.transport.links = {i: m.peer_address for i, m in self.node.members.items()
                                if i != self.index}
        self.made, self.durable_upto = [], 0
        self.watch_readies()
        self.watch_reads()
        self.check_memory()
        self.applied_seen = [r.applied_index for r in self.node.replicas]
        self.watch_seen = [h.head for h in self.node.histories]  # its history starts anew
        for shard, r in enumerate(self.node.replicas):
            sim.oracles[shard].recovered(self.index, r.log, r.commit_index)
            sim.oracles[shard].restarted(self.index, r)
        self.promised_sent, self.matched_sent = {}, {}
        sim.log(f"n{self.index} starts (incarnation {self.incarnation})")
        if sim.phase == "faults" and sim.rng.random() < c.crash_after_restart_rate:
            self.files.crash_after_syncs = sim.rng.randint(0, 3)  # while it catches up
            sim.log(f"n{self.index}: the power will go again at a coming sync")

    def wipe(self) -> None:
        """The node (down) loses its whole disk: it restarts empty, and must recover from
        its peers before it votes (``kvstore.paxos.replica``, "Wiped nodes")."""
        sim = self.sim
        shutil.rmtree(self.dir)
        os.makedirs(self.dir)
        self.files = FaultyFiles(seed=sim.rng.randrange(1 << 30))
        self.promised_sent, self.matched_sent = {}, {}
        for oracle in sim.oracles:
            oracle.wiped(self.index)
        self.heal_target = [max(o.chosen, default=-1) for o in sim.oracles]
        sim.log(f"n{self.index}: its disk is replaced, empty")

    def healed(self) -> bool:
        """Not (any more) a node that lost its disk: it recovered what was chosen then."""
        if self.heal_target is not None and self.up and all(
                not r.recovering and r.commit_index >= target
                for r, target in zip(self.node.replicas, self.heal_target)):
            self.heal_target = None
        return self.heal_target is None

    def watch_saves(self, storage: WalReplicaStorage) -> None:
        """Tell the oracle what each save made durable: a leader's own acceptances count
        towards what is chosen once they are on its disk."""
        save = storage.save

        def saved(writes: list, applied=None) -> list:
            results = save(writes, applied)
            self.durable_upto = len(self.made)  # its messages go now
            for w in writes:
                for entry in w.committed:
                    self.sim.watch_checks.note_entry(w.shard, entry)
            if self.node is not None:
                for w in writes:
                    self.sim.oracles[w.shard].synced(self.index, self.node.replicas[w.shard],
                                                     storage._hard[w.shard][1], w.records)
            return results

        storage.save = saved

    def check_step(self) -> None:
        """After this node's turn: each replica contradicts nothing it announced (the
        oracle), and every slot it applied holds the value chosen there, the one every
        other node applied (while the slot is still in its log)."""
        oracles, applied_values = self.sim.oracles, self.sim.applied_values
        committed_high = self.sim.committed_high
        for shard, r in enumerate(self.node.replicas):
            oracle = oracles[shard]
            oracle.check(self.index, r)
            if r.commit_index > committed_high[shard]:
                committed_high[shard] = r.commit_index
            seen, now = self.applied_seen[shard], r.applied_index
            if now <= seen:
                continue
            log, values = r.log, applied_values[shard]
            for slot in range(max(seen + 1, now - 4096), now + 1):
                entry = log.get(slot)
                if entry is None:
                    continue  # below a snapshot it installed
                value = entry[1:3]
                first = values.setdefault(slot, value)
                if first != value:
                    raise SimulationFailure(f"agreement: n{self.index} shard {shard} applied at "
                                            f"slot {slot} a value other than another node did")
                oracle.applied(self.index, slot, *value)
            self.applied_seen[shard] = now
        self.check_watch()

    def check_watch(self) -> None:
        """The node's watch histories (``kvstore.node.watching``): none runs past what
        its replica applied, and every revision one holds (the changes applied there, or
        none) is what every other node's held there: what a watcher is told does not
        depend on the node it asks. Each revision is checked once per incarnation."""
        watch_values = self.sim.watch_values
        for shard, history in enumerate(self.node.histories):
            if history.head > self.node.replicas[shard].applied_index + 1:
                raise SimulationFailure(f"watch: n{self.index} shard {shard}'s history holds "
                                        f"revision {history.head}, past its applied point")
            start = max(self.watch_seen[shard] + 1, history.oldest)
            values = watch_values[shard]
            while start <= history.head:
                events, through = history.since(start, b"", None, 1 << 62)
                changes_at = {revision: changes for revision, changes in events}
                for revision in range(start, through + 1):
                    changes = [tuple(c) for c in changes_at.get(revision, ())]
                    first = values.setdefault(revision, changes)
                    if first != changes:
                        raise SimulationFailure(
                            f"watch: n{self.index} shard {shard} holds at revision {revision} "
                            f"changes {changes!r:.200} where another node held {first!r:.200}")
                start = through + 1
            self.watch_seen[shard] = max(self.watch_seen[shard], history.head)

    def check_memory(self) -> None:
        """The restarted node remembers every promise and acceptance it announced."""
        for shard, r in enumerate(self.node.replicas):
            ballot = self.promised_sent.get(shard, 0)
            if r.promised < ballot:
                raise SimulationFailure(
                    f"n{self.index} shard {shard}: restarted with promise {r.promised}, below "
                    f"the ballot {ballot} it announced before the crash (a forgotten promise)")
            matched = self.matched_sent.get(shard, -1)
            oracle = self.sim.oracles[shard]
            acked = oracle.acked[self.index]
            # an acceptance past the end of its epoch is void (no value is chosen by it): a
            # replica may forget it (``oracle.py``, "Memberships")
            missing = [s for s in range(r.snapshot_index + 1, matched + 1) if s not in r.log
                       and not (s in acked and oracle.void(s, acked[s]))]
            if missing:
                raise SimulationFailure(
                    f"n{self.index} shard {shard}: restarted without slots {missing[:5]} it had "
                    f"acknowledged as accepted (match_index {matched}): a forgotten acceptance")

    def crash(self, in_save: bool) -> None:
        """The process dies and the machine loses power: the log keeps what was synced
        (the last unsynced write maybe torn); LMDB keeps its synced commits."""
        node, self.node = self.node, None
        storage = node.storage
        storage.storage.close()  # LMDB: every commit was synced; nothing else is written
        unsynced = self.files.unsynced_write_size()
        keep = self.sim.rng.randint(0, unsynced) if unsynced else 0
        mode = self.sim.rng.choice(("prefix", "junk", "sectors"))
        self.files.power_loss(keep, mode)
        self.transport.inbox, self.transport.first_only = [], None
        self.sim.log(f"n{self.index} crashes{' inside a save' if in_save else ''} "
                     f"(power loss: {unsynced} unsynced bytes, {keep} kept, {mode})")

    def turn(self) -> None:
        if self.sim.now < self.paused_until:
            self.stalled = True
            return  # stalled: frames wait in its inbox, its clock runs on
        if self.stalled:
            self.stalled = False
            self.interleave_inbox()
        self.made, self.durable_upto = [], 0
        try:
            self.node.turn()
        except PowerLoss:
            # the power went in a save: what its replicas made before it was sent, and of
            # the rest only the leader's Accepts and Heartbeats (sent before its own fsync)
            self.sim.announced(self.index, self.made[:self.durable_upto] + [
                (s, m) for s, m in self.made[self.durable_upto:] if m.type in EARLY_TYPES])
            self.crash(in_save=True)
            self.down_until = self.sim.now + self.sim.rng.randint(1, self.sim.config.down_ticks_max)
            return
        self.sim.announced(self.index, self.made)
        self.check_step()

    def interleave_inbox(self) -> None:
        """After a stall, what waited on its sockets is read in any interleaving of its
        connections (each in its own order, as TCP keeps it): a client's request may come
        before the peer frames that would have told the node it no longer leads, and
        the node's first turn may see only part of it."""
        queues: dict = {}
        for item in self.transport.inbox:
            queues.setdefault((item[0], item[1]), []).append(item)
        queues = [q[::-1] for q in queues.values()]
        out = []
        rng = self.sim.rng
        while queues:
            i = rng.randrange(len(queues))
            out.append(queues[i].pop())
            if not queues[i]:
                queues.pop(i)
        self.transport.inbox = out
        if out:  # and not all of it at once: what the sockets had received by then
            self.transport.first_only = rng.randint(1, len(out))

    def watch_readies(self) -> None:
        """Note each message a replica makes, in order (``announced``)."""
        for shard, r in enumerate(self.node.replicas):
            def ready(ready=r.ready, shard=shard):
                rd = ready()
                self.made.extend((shard, m) for m in rd.messages)
                return rd
            r.ready = ready

    def watch_reads(self) -> None:
        """The read-index rule, checked where a read is served (the core simulator's "stale
        read", here on the real node): a slot any node had committed when a read reached
        this node's replica was chosen, so the read must be served with that slot applied,
        on a leader (its read index, or its lease) as on a follower (the leader's read
        index). Committed anywhere, not acknowledged: a read that comes while a new leader
        has not yet learned what the old one committed is the case this catches, and it
        needs no client to have seen the write."""
        node, bounds = self.node, {}
        committed_high = self.sim.committed_high
        for shard, r in enumerate(node.replicas):
            def read(token, read=r.read, shard=shard):
                bounds[token] = committed_high[shard]
                return read(token)
            r.read = read
        serve = node._serve_reads

        def serve_reads(tokens: list) -> None:
            for token in tokens:
                w, bound = node.waiting_reads.get(token), bounds.pop(token, None)
                if w is None or bound is None:
                    continue
                applied = node.replicas[w.shard].applied_index
                if applied < bound:
                    raise SimulationFailure(
                        f"stale read: n{self.index} served a read of shard {w.shard} with "
                        f"slot {applied} applied, but slot {bound} was committed before the "
                        f"read reached it")
            serve(tokens)
        node._serve_reads = serve_reads

    def close(self) -> None:
        if self.node is not None:
            node, self.node = self.node, None
            node.storage.storage.close()


# ---------------------------------------------------------------------------------- clients

class SimClient(OneOpAtATime):
    """A client of the wire protocol, one operation at a time (as ``kvstore.client.core``)."""

    def __init__(self, sim: "Simulation", index: int) -> None:
        self.sim = sim
        self.index = index
        self.identity = b"client-%d" % index
        self.client_id = b"sim-client-%d" % index
        self.seq = 0
        self.request_ids = 0
        self.op: dict | None = None  # the operation in flight
        self.target = sim.rng.randrange(len(sim.nodes))
        self.last_value = {}  # key -> last value this client saw (for its cas)

    def start(self) -> None:
        sim, rng = self.sim, self.sim.rng
        key = rng.choice(KEYS)
        kind = rng.choice(("put", "put", "get", "get", "cas"))
        shard = shard_of(key, sim.config.shards)
        value = b"%d.%d" % (self.index, sim.now)
        if kind == "get":
            op, args, hist_args = wire.OP_GET, [shard, key, False], ()
        else:
            self.seq += 1
            if kind == "put":
                command, hist_args = [OP_PUT, key, value], (value,)
            else:
                expected = self.last_value.get(key)
                command, hist_args = [OP_CAS, key, expected, value], (expected, value)
            # one write at a time: every earlier one is answered or given up (floor = seq)
            op, args = wire.OP_WRITE, [shard, self.client_id, self.seq, self.seq, command]
        self.op = {"op": op, "args": args, "kind": kind, "key": key, "hist_args": hist_args,
                   "call": sim.now, "request_id": None, "sent": None}
        self.send()

    def start_get(self, key: bytes) -> None:
        shard = shard_of(key, self.sim.config.shards)
        self.op = {"op": wire.OP_GET, "args": [shard, key, False], "kind": "get", "key": key,
                   "hist_args": (), "call": self.sim.now, "request_id": None, "sent": None}
        self.send()

    def send(self) -> None:
        """Send (or resend) the operation, under one request id for all its attempts as
        ``kvstore.client`` does: an answer to any of them completes it."""
        op = self.op
        if op["request_id"] is None:
            self.request_ids += 1
            op["request_id"] = self.request_ids
        op["sent"] = self.sim.now
        frame = wire.encode_request(op["request_id"], op["op"], op["args"])
        self.sim.send(("client", self.index), ("node", self.target), CLIENT, self.identity, frame)

    def refused(self, value) -> None:
        raise SimulationFailure(f"client {self.index}: a valid request refused: {value}")

    def retarget(self) -> None:
        self.target = self.sim.rng.randrange(len(self.sim.nodes))

    def finish(self, result) -> None:
        op, self.op = self.op, None
        sim = self.sim
        kind, key = op["kind"], op["key"]
        if kind == "put":
            result = None
            self.last_value[key] = op["hist_args"][0]
        elif kind == "get":
            self.last_value[key] = result
        elif result:
            self.last_value[key] = op["hist_args"][1]
        sim.history.append(Operation(self.index, key, kind, op["hist_args"], op["call"], sim.now,
                                     result))
        sim.log(f"client {self.index}: {kind} {key!r} {op['hist_args']} -> {result!r}")

    def on_tick(self, may_start: bool) -> None:
        sim, c = self.sim, self.sim.config
        op = self.op
        if op is None:
            if may_start and sim.rng.random() < 0.3:
                self.start()
            return
        if sim.now - op["call"] > c.client_give_up_ticks and sim.phase == "faults":
            # given up: it may or may not take effect (the history keeps it open)
            sim.history.append(Operation(self.index, op["key"], op["kind"], op["hist_args"],
                                         op["call"], None))
            self.op = None
            self.last_value.pop(op["key"], None)
            return
        if sim.now - op["sent"] >= c.client_retry_ticks:
            self.target = sim.rng.randrange(len(sim.nodes))
            self.send()


# ---------------------------------------------------------------------------------- the run

class Simulation:
    def __init__(self, config: RealNodeConfig, root: str) -> None:
        self.rng = random.Random(config.seed)
        if config.swarm:
            config = swarm(config, self.rng)
        elif not config.shards:
            config = replace(config, shards=1)
        self.config = config
        self.trace = Trace(config.trace_lines, config.verbose)
        self.now = 0
        self.phase = "faults"
        self.clock = SimClock(self)
        self.queue: list = []  # (due, sequence, destination, source, identity, frame)
        self.sequence = 0
        self.cut: set = set()  # (a, b): node a's frames do not reach node b
        self.recent: deque = deque(maxlen=256)  # peer frames sent lately, for replays
        self.old: list = []  # a sample of older peer frames (1 in 32, 256 at most), too
        self.prepares: deque = deque(maxlen=32)  # (node, shard, Prepare): the last campaigns'
        self.history: list = []
        # checked after every step: the Paxos invariants per shard, the values applied per slot
        # with membership changes, any node index may come to be used (``self.nodes`` grows
        # as nodes join: ``join_node``)
        indexes = MAX_NODES if config.membership_changes else config.nodes
        self.oracles = [Oracle(indexes, voters=config.nodes) for _ in range(config.shards)]
        self.applied_values = [{} for _ in range(config.shards)]
        self.watch_values = [{} for _ in range(config.shards)]  # revision -> changes seen
        # per shard: the highest commit point any node has reached (after each turn)
        self.committed_high = [-1] * config.shards
        byzantine = config.byzantine if config.byzantine is not None else config.seed % 3 == 2
        self.byzantine = RealNodeByzantine(self, config.seed) if byzantine else None
        self.probe_rng = random.Random(config.seed * 2 + 1)
        self.probe_requests = 0
        if config.swarm:
            config = self.config = replace(config, probe_rate=self.probe_rng.choice((0.0, 0.5, 1.0)))
        self.root = root
        self.nodes = [SimNode(self, i, root) for i in range(config.nodes)]
        self.address_index = {n.address: n.index for n in self.nodes if n.present}
        self.registers = [SimClient(self, i) for i in range(config.clients)]
        self.clients = list(self.registers)
        self.ledger = None
        self.bank_clients: list = []
        if config.bank:
            self.ledger = Ledger(self, config.accounts)
            self.bank_clients = [BankClient(self, i, self.ledger)
                                 for i in range(len(self.clients),
                                                len(self.clients) + config.bank_clients)]
            self.clients += self.bank_clients
        self.backup_takers: list = []
        if config.bank:  # a stream of their own: no other draw moves
            backup_rng = random.Random(config.seed * 7 + 1)
            count = config.backups if config.backups is not None else backup_rng.choice((0, 1))
            self.backup_takers = [BackupTaker(self, len(self.clients) + i, self.ledger,
                                              random.Random(backup_rng.random()))
                                  for i in range(count)]
            self.clients += self.backup_takers
        # lease holders and watchers draw from streams of their own: they move none of the
        # other draws, so a seed's faults and register clients stay what they were
        lease_rng = random.Random(config.seed * 5 + 3)
        count = (config.lease_clients if config.lease_clients is not None
                 else lease_rng.choice((0, 1, 2)))
        holders = [LeaseClient(self, len(self.clients) + i, random.Random(lease_rng.random()))
                   for i in range(count)]
        self.clients += holders
        self.leases = LeaseChecks(self, holders)
        watch_rng = random.Random(config.seed * 3 + 5)
        count = config.watchers if config.watchers is not None else watch_rng.choice((0, 1, 2))
        self.watch_checks = WatchChecks(self)
        self.watchers = [Watcher(self, len(self.clients) + i, random.Random(watch_rng.random()))
                         for i in range(count)]
        self.endpoints = self.clients + self.watchers  # what a "client" address names
        self.operator = None
        if config.membership_changes:
            self.operator = Operator(self, len(self.endpoints), random.Random(config.seed * 7 + 1))
            self.endpoints.append(self.operator)
        self.client_by_identity = {c.identity: c for c in self.endpoints}
        self.unchecked = False  # the linearizability checker gave up
        self.settled_at: int | None = None
        for n in self.nodes:
            if n.present:
                n.start()

    def log(self, line: str) -> None:
        self.trace.add(self.now, line)

    def fail(self, why: str) -> None:
        raise SimulationFailure(why)

    # -- the network ---------------------------------------------------------------------------

    def send(self, frm: tuple, to: tuple, source: str, identity: bytes, frame: bytes) -> None:
        c, rng = self.config, self.rng
        if frm[0] == "node" and to[0] == "node" and (frm[1], to[1]) in self.cut:
            return
        faulty = self.phase == "faults"
        if faulty and rng.random() < c.drop_rate:
            return
        copies = 2 if faulty and rng.random() < c.duplicate_rate else 1
        for _ in range(copies):
            delay = rng.randint(0, c.delay_max_ticks) if faulty else rng.randint(0, 1)
            if faulty and c.long_delay_rate and rng.random() < c.long_delay_rate:
                delay = rng.randint(2, 12) * c.election_timeout_ticks
            self.sequence += 1
            heapq.heappush(self.queue, (self.now + 1 + delay, self.sequence, to, source,
                                        identity, frame))
        if to[0] == "node" and c.replay_rate:
            self.recent.append((to, source, identity, frame))
            if rng.random() < 1 / 32:  # and a sample of older ones, kept far longer
                if len(self.old) < 256:
                    self.old.append((to, source, identity, frame))
                else:
                    self.old[rng.randrange(256)] = (to, source, identity, frame)

    def deliver(self) -> None:
        while self.queue and self.queue[0][0] <= self.now:
            _due, _seq, to, source, identity, frame = heapq.heappop(self.queue)
            if to[0] == "client":
                self.endpoints[to[1]].on_frame(frame)
                continue
            node = self.nodes[to[1]]
            if len(to) > 2 and to[2] != node.generation:
                continue  # sent to a node no longer there (its index is a new node's)
            if node.up and not (source == PEER and (node.transport.peer_index(identity), to[1])
                                in self.cut):
                node.transport.inbox.append((source, identity, frame))

    def announced(self, index: int, messages: list) -> None:
        """``messages`` (shard, message) left node ``index`` in the order its replicas made
        them, each once what it announces of its disk was durable: the oracle checks them,
        and they are what the node must remember at its next restart.

        Made, not as sent: the node sends one frame per peer, so a Promise to one peer
        may leave before the Accepted to another that its replica made first."""
        node = self.nodes[index]
        oracles = self.oracles
        for shard, m in messages:
            oracles[shard].sent(index, m)
            if m.type == M.PREPARE:
                self.check_campaign(index, shard, m.ballot)
            if m.type == M.PREPARE and self.config.replay_rate:
                self.prepares.append((index, shard, m))
            if m.type not in (M.PROMISE, M.ACCEPTED, M.HEARTBEAT_REPLY):
                continue
            # a granted Promise or Accepted announces its ballot; a refusal, its promise
            ballot = m.hint if m.reject else m.ballot
            if ballot > node.promised_sent.get(shard, 0):
                node.promised_sent[shard] = ballot
            if m.type == M.ACCEPTED and not m.reject and \
                    m.match_index > node.matched_sent.get(shard, -1):
                node.matched_sent[shard] = m.match_index

    def check_campaign(self, index: int, shard: int, ballot: int) -> None:
        """Only a voter of a ballot's epoch campaigns with it: never a learner, never a
        node removed (the epoch's voters as the changes chosen say, once known)."""
        epoch = ballot_epoch(ballot)
        voters = self.oracles[shard].voters.get(epoch)
        if voters is not None and index not in voters:
            raise SimulationFailure(f"membership: n{index} campaigned in shard {shard} at ballot "
                                    f"{format_ballot(ballot)}, but epoch {epoch}'s voters are "
                                    f"{sorted(voters)}")

    # -- members (``realmembers.py``): what the operator does to the nodes ----------------------

    def indexes_in_use(self) -> int:
        """One past the highest node index a node has or any membership held names."""
        named = [i for node in self.nodes if node.up for r in node.node.replicas
                 for i in (*r.membership.voters, *r.membership.learners)]
        return max(len(self.nodes), max(named, default=-1) + 1)

    def live(self) -> list:
        """The nodes that are members (started, not removed): up or down."""
        return [node for node in self.nodes if node.present]

    def join_node(self, name: str, view) -> None:
        """``kvstore-server --join``: the new member ``name`` starts empty with what the
        cluster told it (its index, each shard's membership)."""
        from kvstore.server.join import config_from_view
        index = view.index_of(name)
        while len(self.nodes) <= index:  # an index no node had yet: room for it
            self.nodes.append(SimNode(self, len(self.nodes), self.root))
        old = self.nodes[index]
        if old.present:
            self.fail(f"member add gave index {index}, which n{index} ({old.name}) still has")
        node = SimNode(self, index, self.root, old.generation + 1, name)
        node.incarnation = old.incarnation  # (index, incarnation) names one run of one node
        node.present = True
        node.join = config_from_view(view, name, node.dir)
        self.nodes[index] = node
        self.address_index[node.address] = index
        for oracle in self.oracles:  # a new node: nothing it announced before
            oracle.wiped(index)
        node.start()

    def retire_node(self, name: str) -> None:
        """A removed member's node is stopped (the operator's procedure), for good."""
        node = next((n for n in self.nodes if n.present and n.name == name), None)
        if node is None:
            return
        node.close()
        node.present = False
        self.address_index.pop(node.address, None)
        self.log(f"n{node.index} ({name}) stopped: no member any more")

    def rejoin_config(self, node: "SimNode") -> NodeConfig:
        """What a wiped member restarts with (``kvstore-server --join`` with its name):
        each shard's membership as the most advanced member up holds it."""
        best = []
        for s in range(self.config.shards):
            held = [n.node.replicas[s].membership for n in self.live() if n.up]
            best.append(max(held, key=lambda m: m.epoch))
        return NodeConfig(name=node.name, names=[node.name], addresses={node.name: node.address},
                          peer_addresses={node.name: node.peer_address},
                          shards=self.config.shards, data_dir=node.dir, cluster_id=b"",
                          node_index=node.index, memberships=best)

    def check_members(self) -> None:
        """At the end, healed: every member's node holds the same membership of each shard,
        and its voters and learners are the nodes running, voters within the bounds."""
        for s in range(self.config.shards):
            held = {(n.index, n.name): n.node.replicas[s].membership for n in self.live()}
            kinds = {(m.epoch, m.voters, m.learners) for m in held.values()}
            if len(kinds) != 1:
                raise SimulationFailure(f"membership: shard {s}'s members disagree when healed: "
                                        + ", ".join(f"n{i} epoch {m.epoch} voters "
                                                    f"{list(m.voters)} learners {list(m.learners)}"
                                                    for (i, _), m in sorted(held.items())))
            epoch, voters, learners = kinds.pop()
            running = {n.index for n in self.live()}
            if set(voters) | set(learners) != running:
                raise SimulationFailure(f"membership: shard {s} epoch {epoch} names voters "
                                        f"{list(voters)}, learners {list(learners)}; the nodes "
                                        f"running are {sorted(running)}")

    # -- faults --------------------------------------------------------------------------------

    def faults(self) -> None:
        c, rng = self.config, self.rng
        n = len(self.nodes)
        # the nodes a fault strikes: with membership changes, the members (not an index
        # no node has now); the same draws as range(n) otherwise
        pool = [node.index for node in self.live()] if c.membership_changes else range(n)
        if rng.random() < c.partition_rate and len(pool) > 1:
            if rng.random() < 0.5:
                victim = pool[rng.randrange(len(pool))]
                side = {victim}
            else:
                side = set(rng.sample(pool, rng.randint(1, len(pool) - 1)))
            oneway = rng.random() < 0.2
            self.cut = {(a, b) for a in sorted(side) for b in range(n) if b not in side}
            if not oneway:
                self.cut |= {(b, a) for a, b in self.cut}
            self.log(f"partition {sorted(side)} | rest{' (one way)' if oneway else ''}")
        elif self.cut and rng.random() < 3 * c.partition_rate:
            self.cut = set()
            self.log("partition healed")
        if rng.random() < c.crash_rate:
            up = [node for node in self.nodes if node.up]
            scope = rng.choice(("one", "one", "minority", "all"))
            count = {"one": 1, "minority": max(1, (n - 1) // 2), "all": n}[scope]
            for node in rng.sample(up, min(count, len(up))):
                node.down_until = self.now + rng.randint(1, c.down_ticks_max)
                if rng.random() < c.crash_in_save_rate:
                    node.files.crash_after_syncs = rng.randint(0, 2)  # inside a coming save
                    self.log(f"n{node.index}: the power will go at a coming sync")
                else:
                    node.crash(in_save=False)
        if rng.random() < c.pause_rate:
            node = self.nodes[pool[rng.randrange(len(pool))]]
            node.paused_until = self.now + rng.randint(1, 4 * c.election_timeout_ticks)
            self.log(f"n{node.index} stalls until t{node.paused_until}")
        if c.leader_pause_rate and rng.random() < c.leader_pause_rate:
            leaders = [node.index for node in self.nodes
                       if node.up and any(r.role == LEADER for r in node.node.replicas)]
            if leaders:
                node = self.nodes[leaders[rng.randrange(len(leaders))]]
                node.paused_until = self.now + c.election_timeout_ticks * rng.randint(1, 8)
                self.log(f"n{node.index} (a leader) stalls until t{node.paused_until}")
        if self.recent and rng.random() < c.replay_rate:
            # a frame sent lately, or long ago, arrives again (a network that duplicated
            # it): an old Prepare after a snapshot, an old Accept after a new leader's
            pool = rng.choice((self.old or self.recent, self.recent, self.prepares or self.recent))
            item = pool[rng.randrange(len(pool))]
            if pool is self.prepares:  # a campaign's Prepare, after its leader wrote for long
                frm, shard, m = item
                item = (("node", m.to), PEER, b"node-%d" % frm, wire.encode_paxos(frm, [(shard, m)]))
            to, source, identity, frame = item
            self.log(f"an old frame to n{to[1]} arrives again")
            self.sequence += 1
            heapq.heappush(self.queue, (self.now + 1, self.sequence, to, source, identity, frame))
        for node in self.nodes:
            if node.up and rng.random() < c.checkpoint_rate:
                try:
                    node.node.storage.checkpointer.checkpoint()
                except PowerLoss:  # while it deleted the log segments it covers
                    node.crash(in_save=True)

    def restarts(self) -> None:
        c = self.config
        for node in self.nodes:
            if node.present and not node.up and self.now >= node.down_until:
                if self.phase == "faults" and c.wipe_rate and self.rng.random() < c.wipe_rate \
                        and self.may_wipe(node):
                    node.wipe()
                    if c.membership_changes:
                        node.join = self.rejoin_config(node)
                node.start()

    def may_wipe(self, node: SimNode) -> bool:
        """The fault model of wiped nodes (README, "A node that lost its disk"): one node
        without its state at a time, so every other node has voted durably (a promise on
        its disk in every shard) and has recovered, if it once lost its disk itself."""
        for other in self.live():
            if other is node:
                continue
            if not other.healed() or not other.up or any(
                    h[0] == 0 for h in other.node.storage._hard):
                return False
        return self.config.nodes > 1

    # -- steps -----------------------------------------------------------------------------------

    def step(self, may_start: bool = True) -> None:
        self.now += 1
        self.deliver()
        if self.phase == "faults":
            self.faults()
        self.restarts()
        if self.byzantine is not None and self.byzantine.rng.random() < self.config.byzantine_rate:
            self.byzantine.inject()
        if self.operator is not None:
            self.operator.on_tick(may_start)
        self.probe()
        for node in self.nodes:
            if node.up:
                node.turn()
        for client in self.clients:
            client.on_tick(may_start)
        for watcher in self.watchers:
            watcher.on_tick(may_start)
        self.leases.check_step()

    def probe(self) -> None:
        """The read prober, in the seeds swarm gives one: a linearizable get now and then to
        a node picked at random, its answer dropped. It is not in the history; it is there so
        that reads reach every node at every moment (a leader just elected, a leader waking
        from a stall with a lease), where ``watch_reads`` checks each one served. Its own
        random stream: its draws move nothing else's."""
        rng = self.probe_rng
        if not self.config.probe_rate or rng.random() >= self.config.probe_rate:
            return
        target = rng.randrange(len(self.nodes))
        key = rng.choice(KEYS)
        self.probe_requests += 1
        frame = wire.encode_request(self.probe_requests, wire.OP_GET,
                                    [shard_of(key, self.config.shards), key, False])
        self.sequence += 1
        heapq.heappush(self.queue, (self.now + 1 + rng.randint(0, self.config.delay_max_ticks),
                                    self.sequence, ("node", target), CLIENT, b"probe", frame))

    def leaders(self) -> list:
        """Per shard, the node every live node follows (None: not settled)."""
        out = []
        up = [node for node in self.nodes if node.up]
        for s in range(self.config.shards):
            hints = {node.node.replicas[s].leader_hint for node in up}
            leader = hints.pop() if len(hints) == 1 else None
            if leader is None or not self.nodes[leader].up or \
                    self.nodes[leader].node.replicas[s].role != LEADER:
                leader = None
            out.append(leader)
        return out

    def run(self) -> None:
        c = self.config
        for _ in range(c.ticks):
            self.step()
        # liveness: faults stop, everything heals and restarts
        self.phase = "settle"
        self.cut = set()
        for node in self.nodes:
            node.files.crash_after_syncs = None
            node.down_until = node.paused_until = 0
        self.log("faults stop: healed, every node restarts")
        deadline = self.now + c.settle_ticks
        while True:
            self.step(may_start=False)
            if None not in self.leaders() and all(cl.op is None for cl in self.clients) \
                    and (self.operator is None or self.operator.idle()):
                break
            if self.now >= deadline:
                pending = [cl.index for cl in self.clients if cl.op is not None]
                self.check_history_so_far()  # a stuck cluster may have broken safety first
                operator = "" if self.operator is None or self.operator.idle() else \
                    f", the operator's {self.operator.command} not done"
                raise SimulationFailure(
                    f"no progress {c.settle_ticks} ticks after the faults stopped: leaders "
                    f"{self.leaders()}, clients still waiting {pending}{operator}")
        self.settled_at = self.now - (deadline - c.settle_ticks)
        self.log(f"settled after {self.settled_at} ticks: leaders {self.leaders()}")
        # a fault-free tail: clients run, a follower crashes and rejoins; no leader deposed
        leaders = self.leaders()
        self.phase = "stable"
        # a follower that crashes and rejoins (only where the rest still is a majority)
        followers = [n.index for n in self.live() if n.index not in leaders] \
            if len(self.live()) >= 3 else []
        rejoin_at = self.now + c.stable_ticks // 3
        for _ in range(c.stable_ticks):
            if followers and self.now == rejoin_at:
                victim = self.nodes[self.rng.choice(followers)]
                victim.crash(in_save=False)
                victim.down_until = self.now + c.election_timeout_ticks
            self.step()
            if None not in (now := self.leaders()) and now != leaders:
                raise SimulationFailure(f"a leader was deposed with no fault: {leaders} -> {now}")
        # every operation finishes, then every key is read once more, through the protocol
        self.finish_operations()
        for i, key in enumerate(KEYS):
            self.registers[i % len(self.registers)].start_get(key)
            self.finish_operations()
        if self.ledger is not None:
            banker = self.bank_clients[-1]
            banker.begin("final")
            self.finish_operations()
            self.ledger.check_end(banker.final)
            self.let_forgets_happen()
        self.check_agreement()
        if self.ledger is not None:
            self.count_txn_records()
        if c.membership_changes:
            self.check_members()
        self.check_history()
        self.finish_watchers()

    # -- what the watchers ask of the world (``realwatch.py``) ----------------------------------

    clock_tick = TICK

    def is_register_key(self, key: bytes) -> bool:
        return key in KEYS

    def is_register_value(self, key: bytes, value: bytes) -> bool:
        return key in KEYS  # every register write's value is unique (client.tick)

    def shard_of(self, key: bytes) -> int:
        return shard_of(key, self.config.shards)

    def finish_watchers(self) -> None:
        """Live: every watcher reaches every shard's applied point once quiet; then every
        acknowledged write reached each watcher that has no gap on its shard."""
        deadline = self.now + self.config.settle_ticks
        first = self.live()[0]
        while not all(w.caught_up() for w in self.watchers):
            if self.now >= deadline:
                behind = {w.index: w.position for w in self.watchers if not w.caught_up()}
                raise SimulationFailure(f"watchers did not catch up with no faults: positions "
                                        f"{behind}, applied "
                                        f"{[r.applied_index for r in first.node.replicas]}")
            self.step(may_start=False)
        self.watch_checks.check_complete(self.watchers)

    def finish_operations(self) -> None:
        deadline = self.now + self.config.settle_ticks
        while any(cl.op is not None for cl in self.clients):
            if self.now >= deadline:
                raise SimulationFailure("client operations did not finish with no faults")
            self.step(may_start=False)

    def let_forgets_happen(self) -> None:
        """Bank: quiet for as long as the resolvers take to forget what was carried out,
        their forget lost in a crash included (two sweeps)."""
        seconds = FORGET_AFTER_SECONDS + 2 * SWEEP_EVERY_SECONDS + 4 * RESOLVE_EVERY_SECONDS
        for _ in range(int(seconds / TICK)):
            self.step(may_start=False)

    def count_txn_records(self) -> None:
        """Bank, once the nodes agree and the resolvers had time to forget: nothing stays
        prepared, and a shard that took a one-round prepare (so takes ``TxnForget``)
        keeps no COMMIT it carried out (``kvstore.txn.participant``, "Forgetting"; the
        ABORTs are kept)."""
        from kvstore.txn import ABORT, COMMIT
        node = self.live()[0].node
        counts = {s: node.storage.txn_records(s) for s in range(self.config.shards)}
        self.txn_records_left = {
            "commits": sum(c["finished"][COMMIT] for c in counts.values()),
            "aborts": sum(c["finished"][ABORT] for c in counts.values()),
            "decided": sum(sum(c["decided"].values()) for c in counts.values())}
        if any(c["prepared"] for c in counts.values()):
            raise SimulationFailure(f"transactions still prepared once quiet: {counts}")
        kept = {s: c for s, c in counts.items()
                if node.storage.one_round_seen(s) and c["finished"][COMMIT]}
        if kept:
            raise SimulationFailure(f"COMMITs carried out everywhere still kept once quiet "
                                    f"(never forgotten): {kept}")

    def check_agreement(self) -> None:
        """Every node applies the same point, then holds the same state, per shard."""
        deadline = self.now + self.config.settle_ticks
        while True:
            applied = [[node.node.replicas[s].applied_index for node in self.live()]
                       for s in range(self.config.shards)]
            if all(len(set(a)) == 1 for a in applied):
                break
            if self.now >= deadline:
                raise SimulationFailure(f"the nodes did not converge: applied points {applied}")
            self.step(may_start=False)
        for s in range(self.config.shards):
            live = self.live()
            states = [node.node.storage.snapshot_data(s) for node in live]
            for node, state in zip(live[1:], states[1:]):
                if state != states[0]:
                    raise SimulationFailure(
                        f"shard {s}: n{node.index}'s state differs from n{live[0].index}'s at "
                        f"applied slot {applied[s][0]}")

    def check_history_so_far(self) -> None:
        """The register history as it stands, operations in flight left open (they may or
        may not have taken effect): a run that fails on liveness still says whether a
        client saw something no linearization allows, which would be the worse finding."""
        history = list(self.history)
        for client in self.registers:
            op = client.op
            if op is not None:
                history.append(Operation(client.index, op["key"], op["kind"], op["hist_args"],
                                         op["call"], None))
        saved, self.history = self.history, history
        try:
            self.check_history()
        finally:
            self.history = saved

    def check_history(self) -> None:
        try:
            result = check_history(self.history)
        except CheckerGaveUp as e:  # said in the result, counted by a sweep: never a silent pass
            self.unchecked = True
            self.log(f"linearizability: checker gave up ({e})")
            return
        if not result.ok:
            raise SimulationFailure(f"not linearizable (key {result.key!r}):\n{result.explanation}")

    def summary(self) -> str:
        watched = (f", {sum(w.delivered for w in self.watchers)} events to "
                   f"{len(self.watchers)} watcher(s)" if self.watchers else "")
        leases = self.leases.summary() if self.leases.clients else ""
        members = self.operator.summary() if self.operator is not None else ""
        return watched + leases + members + self._bank_summary()

    def _bank_summary(self) -> str:
        ledger = self.ledger
        if ledger is None:
            return "" if self.byzantine is None else f"; {self.byzantine.summary()}"
        backups = (f", {sum(t.kept for t in self.backup_takers)} backups kept of "
                   f"{sum(t.kept + t.thrown_away for t in self.backup_takers)}"
                   if self.backup_takers else "")
        left = getattr(self, "txn_records_left", None)
        records = ("" if left is None else
                   f", 2PC outcomes kept: {left['commits']} commits, {left['aborts']} aborts, "
                   f"{left['decided']} decisions")
        return (f", bank: {ledger.committed} of {len(ledger.writes)} transfers committed, "
                f"{ledger.audits} audits{records}{backups}"
                f"{'' if self.byzantine is None else '; ' + self.byzantine.summary()}")

    def close(self) -> None:
        for node in self.nodes:
            node.close()


@dataclass
class RunResult:
    ok: bool
    text: str
    settle_ticks: int | None = None  # ticks from the end of the faults to settled


def replay_command(config: RealNodeConfig) -> str:
    bugs = "".join(f" --node-bug {f.name}" for f in fields(config.bugs)
                   if f.name != "paxos" and getattr(config.bugs, f.name))
    bugs += "".join(f" --bug {f.name}" for f in fields(config.bugs.paxos)
                    if getattr(config.bugs.paxos, f.name))
    shards = f" --shards {config.shards}" if config.shards else ""
    bank = " --bank" if config.bank else ""
    bank += " --members" if config.membership_changes else ""
    if config.bank and config.backups is not None:
        bank += f" --backups {config.backups}"
    if config.byzantine is not None and config.byzantine != (config.seed % 3 == 2):
        bugs += " --byzantine" if config.byzantine else " --no-byzantine"
    return (f"python -m kvstore.sim{bank} --seed {config.seed} --nodes {config.nodes}"
            f"{shards} --ticks {config.ticks}{bugs} --verbose")


def run(config: RealNodeConfig) -> RunResult:
    """Run one seed; on failure the text has the reason, the replay command and the trace."""
    logging.getLogger("kvstore").setLevel(logging.CRITICAL)  # the trace says what happened
    root = tempfile.mkdtemp(prefix="kvstore-sim-", dir="/dev/shm" if os.path.isdir("/dev/shm")
                            else None)
    sim = None
    try:
        sim = Simulation(config, root)
        sim.run()
    except Exception as e:  # noqa: BLE001 - a crash of the node is a finding like any other
        trace = sim.trace if sim is not None else Trace(0, False)
        return RunResult(False, failure_report(f"seed {config.seed}", e,
                                               (SimulationFailure, InvariantViolation, WatchFailure,
                                                LeaseFailure),
                                               replay_command(config), trace))
    finally:
        if sim is not None:
            sim.close()
        shutil.rmtree(root, ignore_errors=True)
    c = sim.config
    return RunResult(True, f"seed {config.seed}: ok, {c.nodes} nodes, {c.shards} shard(s), "
                           f"{len(sim.history)} operations, settled in {sim.settled_at} ticks"
                           f"{sim.summary()}"
                           f"{'; history NOT CHECKED (the checker gave up)' if sim.unchecked else ''}",
                     sim.settled_at)


__all__ = ["RealNodeConfig", "RunResult", "run", "NodeBugs"]
