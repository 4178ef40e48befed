"""Deterministic simulation of one shard's Paxos group (TigerBeetle VOPR style).

One seed drives one ``random.Random`` for everything: message loss, duplication
(in bursts), delay, reordering and long holds (a message kept for many election
timeouts, then delivered), replays of old messages, partitions (one-way ones too),
crashes (losing unsynced writes), pauses (of the leader more often than not),
restarts and the client workload. Swarm testing draws each seed's fault rates
and the replicas' timeouts, windows, batch sizes and retained slots, and turns
lease reads on in half the seeds (a node waking from a pause is told its clock
jumped, as the node's loop does). Clients send half their gets to any node:
followers serve them through the leader's read index (ReadIndex).

A run has a safety phase with faults, then a liveness phase: everything healed
and restarted, no more faults; every client's outstanding request must complete,
and the group must settle on one leader that every node follows, within bounds.
Then a follower is crashed and restarted, and must rejoin without deposing the
leader (pre-vote and stickiness). The figures (ticks to settle, elections and
leader changes after the heal) are reported per run.

In a third of the seeds (``SimConfig.byzantine``; ``--byzantine`` for all), an extra
endpoint sends fuzzed peer messages (``byzantine.py``) through the node's decode
path, and every honest peer message crosses the wire format too (one the checks
refuse is a failure).

Checks after every step (``oracle.py``): acknowledged acceptances never forgotten,
promises never broken, commit and applied points never decreasing, one leader
per ballot, every replica's state equal to a replay of the chosen log.
Checks on every run:
- agreement: no two replicas apply different entries at one slot;
- order: each replica applies slot after slot, exactly once (restarts replay from
  the last durable snapshot);
- validity: only commands some client proposed are applied, each taking effect once;
- durability: every acknowledged write is in the chosen log;
- linearizability of the client history (``check_history``);
- liveness as above.

Long module: the core simulator's world (nodes, network, clients, faults, checks) in one
place. It keeps a driver loop of its own around the pure core, which issue 19 retires in
favour of ``kvstore.sim.realnode``; it stays (``--core``) while three planted core bugs
(``read_before_own_noop``, ``lease_survives_clock_jump``, ``duplicate_prepare_unchecked``)
are found only here.
"""

from __future__ import annotations

import heapq
import random
from collections import deque
from dataclasses import dataclass, field, fields, replace

from kvstore.paxos import messages as M
from kvstore.paxos.replica import KIND_BATCH, Bugs, Config, NotLeader, PersistedState, Replica
from kvstore.sim.byzantine import Byzantine
from kvstore.sim.kv import KV, decode_command, encode_command
from kvstore.sim.linearizability import CheckerGaveUp, Operation, check_history
from kvstore.sim.oracle import Oracle
from kvstore.sim.trace import Trace, failure_report
from kvstore.transport import wire

KEYS = (b"a", b"b", b"c")


class SimulationFailure(Exception):
    pass


@dataclass
class SimConfig:
    seed: int = 0
    nodes: int = 3
    ticks: int = 400  # safety phase
    liveness_ticks: int = 300  # at least; scaled up with the election timeout
    clients: int = 4
    drop_rate: float = 0.05
    duplicate_rate: float = 0.03
    duplicate_burst_max: int = 3  # extra copies of a duplicated message, at most
    duplicate_spread_ticks: int = 3  # an extra copy arrives up to this late (a retransmission)
    delay_max_ticks: int = 3
    long_delay_rate: float = 0.005  # messages held for 2-12 election timeouts
    snapshot_delay_elections: int = 0  # snapshot chunks travel up to this many election timeouts
    replay_rate: float = 0.005  # per tick: an old message is delivered again
    # after a snapshot, restart, compaction, campaign or election changed a node's state: some
    # messages it had already handled arrive again (stale replies from its earlier term among
    # them; the answers they get must still be right)
    redeliver_after_change_rate: float = 0.2
    crash_rate: float = 0.004  # per node per tick
    # a crashed node restarts with an empty disk (a replaced disk): this often, per restart,
    # when the fault model allows (one node without its state at a time: ``_may_wipe``)
    wipe_rate: float = 0.0
    partition_rate: float = 0.01  # per tick
    pause_rate: float = 0.003  # per node per tick
    leader_pause_rate: float = 0.003  # per tick: the leader stalls (a GC pause), often long
    snapshot_every: int = 8  # applied entries between application snapshots
    client_timeout_ticks: int = 25
    election_timeout_ticks: int = 10
    heartbeat_interval_ticks: int = 2
    pipeline_window: int = 8
    batch_commands_max: int = 4
    entries_per_message_max: int = 4
    log_retain_slots: int = 4
    snapshot_chunk_bytes: int = 64
    lease_read_ticks: int = 0  # lease reads (0: off); swarm turns them on in some seeds
    bugs: Bugs = field(default_factory=Bugs)
    trace_lines: int = 60
    swarm: bool = True  # each seed draws its own fault rates and replica settings (swarm testing)
    crash_in_ready_rate: float = 0.005  # per crash point in a Ready's handling
    # a leader's Accepts and Heartbeats leave before its own write is durable (as the
    # node does, and etcd's raft): they announce nothing of the leader's disk
    leader_sends_before_persist: bool = True
    rejoin_check: bool = True  # after settling: a restarted follower must not depose the leader
    # a byzantine-input sender (byzantine.py); None: in the seeds where seed % 3 == 2 (``run``)
    byzantine: bool | None = None
    byzantine_rate: float = 0.15  # per tick: it sends one fuzzed message
    verbose: bool = False


def swarm(config: SimConfig, rng: random.Random) -> SimConfig:
    """One seed's own mix: some calm, some storms; long or short timeouts, big or tiny windows."""
    pick = lambda *xs: xs[rng.randrange(len(xs))]  # noqa: E731
    election = pick(5, 10, 10, 20)
    return replace(config,
                   drop_rate=pick(0.0, 0.02, 0.05, 0.15),
                   duplicate_rate=pick(0.0, 0.03, 0.1),
                   duplicate_burst_max=pick(1, 3, 6),
                   duplicate_spread_ticks=pick(3, 2 * election, 6 * election),
                   snapshot_delay_elections=pick(0, 2, 6),
                   delay_max_ticks=pick(1, 3, 6),
                   long_delay_rate=pick(0.0, 0.005, 0.02),
                   replay_rate=pick(0.0, 0.005, 0.03),
                   redeliver_after_change_rate=pick(0.0, 0.2, 1.0),
                   crash_rate=pick(0.0, 0.003, 0.01, 0.02),
                   wipe_rate=pick(0.0, 0.0, 0.3, 0.7),
                   partition_rate=pick(0.0, 0.01, 0.03),
                   pause_rate=pick(0.0, 0.003, 0.01),
                   leader_pause_rate=pick(0.0, 0.005, 0.02),
                   crash_in_ready_rate=pick(0.0, 0.005, 0.02, 0.05),
                   election_timeout_ticks=election,
                   heartbeat_interval_ticks=pick(1, 2, max(2, election // 4)),
                   client_timeout_ticks=max(25, 3 * election),
                   pipeline_window=pick(1, 4, 8, 32),
                   batch_commands_max=pick(1, 4, 16),
                   entries_per_message_max=pick(1, 4, 32),
                   log_retain_slots=pick(0, 1, 4, 32),
                   snapshot_every=pick(2, 8, 32),
                   snapshot_chunk_bytes=pick(16, 64, 4096),
                   leader_sends_before_persist=pick(False, True),
                   # the sim's clocks do not drift; a paused node's clock jumps when it wakes
                   lease_read_ticks=pick(0, election - 2))


# ---------------------------------------------------------------------- client <-> node messages
@dataclass(frozen=True)
class ClientRequest:
    to: int
    frm: int  # client id
    seq: int
    kind: str
    key: bytes
    args: tuple
    command: bytes | None  # writes: the encoded command (same bytes on every retry)

    def __str__(self) -> str:
        return f"ClientRequest c{self.frm}->n{self.to} seq={self.seq} {self.kind} {self.key!r} {self.args!r}"


@dataclass(frozen=True)
class ClientReply:
    to: int  # client id
    frm: int
    seq: int
    ok: bool
    result: object = None
    leader_hint: int | None = None

    def __str__(self) -> str:
        return f"ClientReply n{self.frm}->c{self.to} seq={self.seq} ok={self.ok} {self.result!r} hint={self.leader_hint}"


class Disk:
    """A node's simulated disk: writes land in a buffer that a crash loses until synced."""

    def __init__(self) -> None:
        self.promised = 0
        self.commit_index = -1
        self.records: dict = {}  # slot -> record
        self.snapshot_index = -1
        self.snapshot_data = b""
        self._pending: list = []

    def write(self, op: tuple) -> None:
        self._pending.append(op)

    def sync(self) -> None:
        for op in self._pending:
            what = op[0]
            if what == "hard":
                self.promised, self.commit_index = op[1], op[2]
            elif what == "record":
                self.records[op[1]] = op[2]
            elif what == "snapshot":
                if op[1] > self.snapshot_index:
                    self.snapshot_index, self.snapshot_data = op[1], op[2]
                    for s in [s for s in self.records if s <= op[1]]:
                        del self.records[s]
                    self.commit_index = max(self.commit_index, op[1])
            elif what == "compact":
                for s in [s for s in self.records if s <= op[1]]:
                    del self.records[s]
        self._pending = []

    def lose_unsynced(self) -> None:
        self._pending = []

    def persisted(self) -> PersistedState:
        return PersistedState(promised=self.promised, commit_index=self.commit_index,
                              records=[self.records[s] for s in sorted(self.records)],
                              snapshot_index=self.snapshot_index, snapshot_data=self.snapshot_data)


class Node:
    def __init__(self, sim: "Simulation", index: int) -> None:
        self.sim = sim
        self.id = index
        self.disk = Disk()
        self.up = True
        self.paused_until = -1
        self.down_until = -1
        # peer messages delivered lately, the last few of each type (so a rare type, a Promise
        # or a Snapshot chunk, is as likely to come again as a heartbeat)
        self.handled: dict = {}
        self.heal_target: int | None = None
        self.start()

    def start(self) -> None:
        sim = self.sim
        c = sim.config
        cfg = Config(node=self.id, num_nodes=c.nodes, rng=sim.rng,
                     election_timeout_ticks=c.election_timeout_ticks,
                     heartbeat_interval_ticks=c.heartbeat_interval_ticks,
                     pipeline_window=c.pipeline_window, batch_commands_max=c.batch_commands_max,
                     entries_per_message_max=c.entries_per_message_max,
                     log_retain_slots=c.log_retain_slots, snapshot_chunk_bytes=c.snapshot_chunk_bytes,
                     lease_read_ticks=c.lease_read_ticks, bugs=c.bugs,
                     snapshot_ok=getattr(sim.machine, "check_snapshot", None))
        self.replica = Replica(cfg, self.disk.persisted())
        self.replica.trace = []
        self.restore(self.disk.snapshot_index, self.disk.snapshot_data)
        self.waiting_writes: dict = {}  # (client, seq) -> True
        # request id -> (client, seq, key, the highest slot of a write acknowledged before it came)
        self.waiting_reads: dict = {}
        self.up = True
        sim.oracle.restarted(self.id, self.replica)
        sim.redeliver(self, "restart")

    def restore(self, index: int, data: bytes) -> None:
        """The state machine from a snapshot (or empty): it must equal the chosen log's replay."""
        self.kv = self.sim.machine.restore(data) if index >= 0 else self.sim.machine()
        self.last_applied = index
        if self.kv.snapshot() != self.sim.oracle.state_after(index, self.sim.chosen):
            self.sim.fail(f"state: n{self.id} restored a snapshot through {index} that differs from "
                          f"a replay of the chosen log")

    def awake(self) -> bool:
        """Up and not paused; a node waking from a pause first learns its clock jumped."""
        if not self.up or self.paused_until > self.sim.tick:
            return False
        if self.paused_until >= 0:
            self.paused_until = -1
            self.replica.clock_jumped()
        return True

    def crash(self, why: str) -> None:
        self.sim.log(f"CRASH n{self.id} ({why})")
        self.disk.lose_unsynced()
        self.up = False
        self.replica = None

    def wipe(self) -> None:
        """The node (down) loses its whole disk: it restarts empty, and must recover."""
        self.sim.log(f"WIPE n{self.id}: its disk is replaced, empty")
        self.disk = Disk()
        self.sim.oracle.wiped(self.id)
        # it has recovered, for the fault model, once it has recovered and applied what was
        # chosen when it lost its disk (``Simulation._may_wipe``)
        self.heal_target = max(self.sim.oracle.chosen, default=-1)

    # ------------------------------------------------------------------ inputs
    def on_client_request(self, req: ClientRequest) -> None:
        r = self.replica
        if req.kind == "get":
            # Leader or follower: a follower asks the leader for the read index (ReadIndex).
            rid = self.sim.next_request_id()
            self.waiting_reads[rid] = (req.frm, req.seq, req.key, self.sim.acked_slot)
            try:
                r.read(rid)
            except NotLeader as e:
                self.waiting_reads.pop(rid)
                self.sim.send(ClientReply(req.frm, self.id, req.seq, False, leader_hint=e.leader_hint))
            return
        if not r.is_leader:
            self.sim.send(ClientReply(req.frm, self.id, req.seq, False, leader_hint=r.leader_hint))
            return
        self.waiting_writes[(req.frm, req.seq)] = True
        if not r.propose(req.command):
            self.sim.send(ClientReply(req.frm, self.id, req.seq, False, leader_hint=r.leader_hint))

    def drain(self) -> None:
        """Carry out Readies: persist, sync, send, apply, answer (crashes may cut in)."""
        sim = self.sim
        rng = sim.rng
        crash_p = sim.crash_in_ready_p
        for _ in range(100):
            r = self.replica
            if r is None or not r.has_ready():
                return
            rd = r.ready()
            sim.flush_trace(self)
            # 0. a leader's requests (phase 2a) may go out while its own write is under way
            messages = rd.messages
            if sim.config.leader_sends_before_persist:
                early = [m for m in messages if m.type in (M.ACCEPT, M.HEARTBEAT)]
                messages = [m for m in messages if m.type not in (M.ACCEPT, M.HEARTBEAT)]
                for m in early:
                    sim.oracle.sent(self.id, m)
                    sim.send(m)
            # 1. persist (unsynced until sync)
            d = self.disk
            if rd.promised is not None:
                d.write(("hard", rd.promised, rd.commit_index))
            for rec in rd.records:
                d.write(("record", int.from_bytes(rec[8:16], "little"), rec))
            if rd.snapshot is not None:
                d.write(("snapshot", rd.snapshot.index, rd.snapshot.data))
            if rd.compacted_through is not None:
                d.write(("compact", rd.compacted_through))
            if crash_p and rng.random() < crash_p:
                self.crash("before sync")
                return
            d.sync()
            sim.oracle.synced(self.id, r, d.commit_index, rd.records)
            if crash_p and rng.random() < crash_p:
                self.crash("after sync, before send")
                return
            # 2. send
            for m in messages:
                sim.oracle.sent(self.id, m)
                sim.send(m)
            if crash_p and rng.random() < crash_p:
                self.crash("after send, before apply")
                return
            # 3. apply
            if rd.snapshot is not None:
                self.restore(rd.snapshot.index, rd.snapshot.data)
                sim.log(f"n{self.id} restored snapshot through {rd.snapshot.index}")
                sim.redeliver(self, "snapshot")
            for e in rd.committed:
                self.apply(e)
            # 4. reads
            for rid in rd.reads:
                w = self.waiting_reads.pop(rid, None)
                if w is not None:
                    client, seq, key, acked_before = w
                    if self.last_applied < acked_before:
                        sim.fail(f"stale read: n{self.id} served c{client}'s read at slot {self.last_applied}, "
                                 f"but a write at slot {acked_before} was acknowledged before the read came")
                    sim.send(ClientReply(client, self.id, seq, True, result=self.kv.get(key)))
            # 5. dropped
            for cmd in rd.dropped_commands:
                client, seq, *_ = decode_command(cmd)
                if self.waiting_writes.pop((client, seq), None):
                    sim.send(ClientReply(client, self.id, seq, False, leader_hint=r.leader_hint))
            for rid in rd.dropped_reads:
                w = self.waiting_reads.pop(rid, None)
                if w is not None:
                    sim.send(ClientReply(w[0], self.id, w[1], False, leader_hint=r.leader_hint))
            r.advance(rd)
            # The application snapshots its state now and then; durable first, then compact.
            if self.last_applied - r.snapshot_index >= sim.config.snapshot_every:
                data = self.kv.snapshot()
                d.write(("snapshot", self.last_applied, data))
                d.sync()
                r.compact(self.last_applied, data)
                sim.redeliver(self, "compaction")
            sim.oracle.check(self.id, r)
        raise SimulationFailure(f"n{self.id}: Ready loop did not settle")

    def apply(self, e) -> None:
        sim = self.sim
        if e.slot != self.last_applied + 1:
            sim.fail(f"order: n{self.id} applied slot {e.slot} after slot {self.last_applied}")
        self.last_applied = e.slot
        _ballot, kind, payload, _rec = self.replica.log[e.slot]
        sim.oracle.applied(self.id, e.slot, kind, payload)
        value = (e.kind, tuple(e.commands))
        prev = sim.chosen.get(e.slot)
        if prev is None:
            sim.chosen[e.slot] = value
        elif prev != value:
            sim.fail(f"agreement: n{self.id} applied {_fmt_entry(value)} at slot {e.slot}, "
                     f"another replica applied {_fmt_entry(prev)}")
        if e.kind != KIND_BATCH:
            return
        for cmd in e.commands:
            if cmd not in sim.proposed:
                sim.fail(f"validity: n{self.id} applied a command nobody proposed at slot {e.slot}")
            key, result, took_effect = self.kv.apply(cmd)
            if took_effect:
                seen = sim.effect_slot.get(key)
                if seen is None:
                    sim.effect_slot[key] = e.slot
                elif seen != e.slot:
                    sim.fail(f"validity: command {key} took effect at slot {seen} and again at {e.slot}")
            if self.waiting_writes.pop(key, None):
                sim.acked_slot = max(sim.acked_slot, e.slot)
                sim.send(ClientReply(key[0], self.id, key[1], True, result=result))
        if self.kv.snapshot() != sim.oracle.state_after(e.slot, sim.chosen):
            sim.fail(f"state: n{self.id}'s state after slot {e.slot} differs from a replay of the chosen log")


def _fmt_entry(v) -> str:
    kind, cmds = v
    if kind != KIND_BATCH:
        return "no-op"
    return "[" + ", ".join(str(decode_command(c)) for c in cmds) + "]"


class Client:
    def __init__(self, sim: "Simulation", index: int) -> None:
        self.sim = sim
        self.id = index
        self.seq = 0
        self.op: dict | None = None
        self.target = sim.rng.randrange(sim.config.nodes)
        self.idle_until = 0
        self.probe: tuple | None = None  # (node, from tick, until tick): read from a paused leader

    def start_op(self) -> None:
        sim = self.sim
        rng = sim.rng
        self.seq += 1
        key = KEYS[rng.randrange(len(KEYS))]
        kind = ("get", "put", "delete", "cas", "get", "put")[rng.randrange(6)]
        if kind == "get" and rng.random() < 0.5:
            # Reads spread over the nodes: followers serve them through the leader's read index.
            self.target = rng.randrange(sim.config.nodes)
        if self.probe is not None:
            node, start, until = self.probe
            if start <= sim.tick < until:
                kind, self.target, self.probe = "get", node, None
                sim.log(f"c{self.id} reads from the paused leader n{node}")
        val = lambda: b"v%d" % rng.randrange(5)  # noqa: E731
        if kind == "put":
            args = (val(),)
        elif kind == "cas":
            args = (None if rng.random() < 0.3 else val(), None if rng.random() < 0.2 else val())
        else:
            args = ()
        command = None
        if kind != "get":
            command = encode_command(self.id, self.seq, kind, key, args)
            sim.proposed.add(command)
        self.op = {"seq": self.seq, "kind": kind, "key": key, "args": args, "command": command,
                   "call": sim.now(), "deadline": 0}
        self.send()

    def send(self) -> None:
        op = self.op
        op["deadline"] = self.sim.tick + self.sim.config.client_timeout_ticks
        self.sim.send(ClientRequest(self.target, self.id, op["seq"], op["kind"], op["key"], op["args"],
                                    op["command"]))

    def on_reply(self, rep: ClientReply) -> None:
        op = self.op
        if op is None or rep.seq != op["seq"]:
            return
        sim = self.sim
        if rep.ok:
            sim.history.append(Operation(self.id, op["key"], op["kind"], op["args"], op["call"],
                                         sim.now(), rep.result))
            if op["command"] is not None:
                sim.acked.append(op["command"])
            self.op = None
            self.idle_until = sim.tick + sim.rng.randrange(3)
            return
        if rep.leader_hint is not None and rep.leader_hint != rep.frm:
            self.target = rep.leader_hint
        else:
            self.target = sim.rng.randrange(sim.config.nodes)
        op["deadline"] = sim.tick + 1  # retry at the next tick
        op["redirected"] = True

    def on_tick(self, may_start: bool) -> None:
        sim = self.sim
        if self.op is None:
            if may_start and sim.tick >= self.idle_until:
                self.start_op()
            return
        op = self.op
        if sim.tick >= op["deadline"]:
            if not op.pop("redirected", False):  # a timeout: try another node
                self.target = sim.rng.randrange(sim.config.nodes)
            self.send()


class Simulation:
    """One Paxos group under faults.

    ``rng``, ``trace`` and ``machine`` let a larger simulator run several groups in one
    world (``bank_paxos.py``: one group per shard, one seed's generator and trace for all):
    ``machine`` is the replicated state machine, ``KV`` or anything with its ``apply``,
    ``snapshot`` and ``restore``.
    """

    def __init__(self, config: SimConfig, rng: random.Random | None = None, trace: Trace | None = None,
                 machine=KV) -> None:
        self.rng = random.Random(config.seed) if rng is None else rng
        self.machine = machine
        if config.swarm:
            config = swarm(config, self.rng)
        self.config = config
        self.liveness_ticks = max(config.liveness_ticks, 30 * config.election_timeout_ticks)
        self.tick = 0
        self._event = 0
        self._msg_seq = 0
        self._request_id = 0
        self.queue: list = []  # (due tick, seq, message)
        self.cut: set = set()  # (frm, to) node pairs whose messages are lost (one-way cuts too)
        self.trace = Trace(config.trace_lines, config.verbose) if trace is None else trace
        self.chosen: dict = {}
        self.proposed: set = set()
        self.effect_slot: dict = {}
        self.acked: list = []
        self.acked_slot = -1  # the highest slot of a write whose success was sent to its client
        self.history: list = []
        self.recent: deque = deque(maxlen=256)  # messages sent lately, for replays
        self.faults = True
        self.crash_in_ready_p = 0.0
        self.oracle = Oracle(config.nodes, machine)
        # Liveness figures, counted from the last heal.
        self.elections = 0
        self.leader_changes = 0
        self.settle_ticks: int | None = None
        self.check_command = getattr(machine, "check_command", None)
        self.byzantine = Byzantine(self, config.seed) if config.byzantine else None
        self.nodes = [Node(self, i) for i in range(config.nodes)]
        self.clients = [Client(self, i) for i in range(config.clients)]

    # ------------------------------------------------------------------ plumbing
    def now(self) -> int:
        self._event += 1
        return self.tick * 100_000 + self._event

    def next_request_id(self) -> int:
        self._request_id += 1
        return self._request_id

    def log(self, line: str) -> None:
        self.trace.add(self.tick, line)

    def flush_trace(self, node: Node) -> None:
        tr = node.replica.trace
        if tr:
            changed = None
            for line in tr:
                if " campaign ballot " in line:
                    self.elections += 1
                    changed = "its campaign"
                elif " leader at ballot " in line:
                    self.leader_changes += 1
                    changed = "its election"
                self.log(line)
            tr.clear()
            if changed is not None:
                self.redeliver(node, changed)  # stale replies from its earlier term come in

    def fail(self, why: str) -> None:
        raise SimulationFailure(why)

    def send(self, m) -> None:
        c = self.config
        rng = self.rng
        if self.faults and rng.random() < c.drop_rate:
            self.log(f"drop {m}")
            return
        copies = 1
        if self.faults and rng.random() < c.duplicate_rate:
            copies += 1 + rng.randrange(c.duplicate_burst_max)
        # A healthy network (after the heal) answers well within an election timeout.
        delay_max = c.delay_max_ticks if self.faults else max(1, min(c.delay_max_ticks, c.election_timeout_ticks // 4))
        if self.faults and c.snapshot_delay_elections and getattr(m, "type", None) == M.SNAPSHOT:
            delay_max = c.snapshot_delay_elections * c.election_timeout_ticks  # a big transfer is slow
        for copy in range(copies):
            delay = 1 + rng.randrange(delay_max if copy == 0 else max(delay_max, c.duplicate_spread_ticks))
            if self.faults and rng.random() < c.long_delay_rate:
                delay = c.election_timeout_ticks * (2 + rng.randrange(11))
                self.log(f"hold for {delay} ticks: {m}")
            self._enqueue(self.tick + delay, m)
        if not isinstance(m, (ClientRequest, ClientReply)):
            self.recent.append(m)

    def _enqueue(self, due: int, m) -> None:
        self._msg_seq += 1
        heapq.heappush(self.queue, (due, self._msg_seq, m))

    def _deliver(self, m) -> None:
        if isinstance(m, ClientReply):
            self.on_client_reply(m)
            return
        node = self.nodes[m.to]
        if not node.up:
            return
        if not node.awake():
            # A paused process: the message waits in a socket buffer, and the process takes what
            # waits in its buffers in no particular order when it wakes (peers and clients have
            # connections of their own): a client's read may come before news of a new leader.
            self._msg_seq += 1
            heapq.heappush(self.queue, (node.paused_until, (self.rng.randrange(1 << 20) << 32) | self._msg_seq, m))
            return
        if isinstance(m, ClientRequest):
            self.log(f"recv {m}")
            node.on_client_request(m)
        else:
            if (m.frm, m.to) in self.cut:
                return
            if self.byzantine is not None:
                self._check_honest(m)
            if m.type not in (M.HEARTBEAT, M.HEARTBEAT_REPLY):
                self.log(f"recv {m}")
            node.handled.setdefault(m.type, deque(maxlen=4)).append(m)
            node.replica.step(m)
            self.oracle.check(node.id, node.replica)
        self.flush_trace(node)
        node.drain()  # a node carries out what each message asks before it takes the next

    def _check_honest(self, m) -> None:
        """An honest peer message crosses the wire format and the node's checks unrefused."""
        try:
            (_shard, decoded), = wire.decode(wire.encode_paxos(m.frm, [(0, m)]))[2]
        except (wire.FrameError, ValueError, OverflowError) as e:
            self.fail(f"wire: an honest message was refused at decode ({e}): {m}")
        why = wire.check_paxos_message(decoded, m.to, self.config.nodes, self.check_command)
        if why is not None or decoded != m:
            self.fail(f"wire: an honest message was refused by the node's checks ({why}): {m}")

    def on_client_reply(self, m: ClientReply) -> None:
        self.clients[m.to].on_reply(m)
        self.log(f"recv {m}")

    def leader(self) -> Node | None:
        """The node that leads, if exactly one up node believes it does."""
        leaders = [n for n in self.nodes if n.up and n.replica.is_leader]
        return leaders[0] if len(leaders) == 1 else None

    # ------------------------------------------------------------------ faults
    def _faults(self) -> None:
        c = self.config
        rng = self.rng
        n = c.nodes
        leader = self.leader()
        for node in self.nodes:
            if node.up:
                if rng.random() < c.crash_rate:
                    node.crash("random")
                    node.down_until = self.tick + 1 + rng.randrange(60)
                elif rng.random() < c.pause_rate and node.paused_until <= self.tick:
                    node.paused_until = self.tick + 1 + rng.randrange(4 * c.election_timeout_ticks)
                    self.log(f"PAUSE n{node.id} until t{node.paused_until}")
            elif self.tick >= node.down_until:
                if c.wipe_rate and rng.random() < c.wipe_rate and self._may_wipe(node):
                    node.wipe()
                self.log(f"RESTART n{node.id}")
                node.start()
        if leader is not None and leader.paused_until <= self.tick and rng.random() < c.leader_pause_rate:
            # A GC stall, long enough often for the others to elect another leader and write.
            span = c.election_timeout_ticks * (1 + rng.randrange(8))
            leader.paused_until = self.tick + span
            self.log(f"PAUSE leader n{leader.id} until t{leader.paused_until}")
            if n >= 4 and rng.random() < 0.5:
                # The same trouble leaves one follower on the paused leader's side of a partition:
                # when it wakes, deposed by the majority, one node still follows it, and a read
                # quorum must not be that node.
                stale = [x.id for x in self.nodes if x is not leader][rng.randrange(n - 1)]
                side = (leader.id, stale)
                others = [i for i in range(n) if i not in side]
                self.cut = {(a, b) for a in side for b in others} | {(b, a) for a in side for b in others}
                self.log(f"PARTITION [n{leader.id} (paused), n{stale}] | {others}")
            elif n == 3 and c.lease_read_ticks and rng.random() < 0.5:
                # With leases: the paused leader wakes cut off, with a lease that its clock,
                # stopped while it slept, would say still holds.
                others = [i for i in range(n) if i != leader.id]
                self.cut = {(leader.id, b) for b in others} | {(b, leader.id) for b in others}
                self.log(f"PARTITION [n{leader.id} (paused)] | {others}")
            self._probe_paused_leader(leader)
        if n > 1 and rng.random() < c.partition_rate:
            if self.cut and rng.random() < 0.5:
                self.cut = set()
                self.log("HEAL all links")
            else:
                side = [i for i in range(n) if rng.random() < 0.5]
                other = [i for i in range(n) if i not in side]
                one_way = rng.random() < 0.3
                self.cut = {(a, b) for a in side for b in other}
                if not one_way:
                    self.cut |= {(b, a) for a in side for b in other}
                self.log(f"PARTITION {side} {'->x' if one_way else '|'} {other}")
        if self.recent and rng.random() < c.replay_rate:
            m = self.recent[rng.randrange(len(self.recent))]
            self.log(f"replay {m}")
            self._enqueue(self.tick + 1, m)

    def _may_wipe(self, node: Node) -> bool:
        """The fault model of wiped nodes (README, "A node that lost its disk"): one node of
        a group without its state at a time, so every other node has voted durably (its
        promise is on its disk) and has recovered, if it once lost its disk itself."""
        for other in self.nodes:
            if other is node:
                continue
            if other.heal_target is not None and other.up and not other.replica.recovering \
                    and other.replica.commit_index >= other.heal_target:
                other.heal_target = None
            if other.disk.promised == 0 or other.heal_target is not None:
                return False
        return self.config.nodes > 1

    def redeliver(self, node: Node, change: str) -> None:
        """Messages ``node`` handled before its state changed arrive again, soon."""
        rng = self.rng
        if not (self.faults and node.handled and rng.random() < self.config.redeliver_after_change_rate):
            return
        kinds = sorted(node.handled)
        for _ in range(1 + rng.randrange(5)):
            of_kind = node.handled[kinds[rng.randrange(len(kinds))]]
            m = of_kind[rng.randrange(len(of_kind))]
            self.log(f"redeliver after {change}: {m}")
            self._enqueue(self.tick + 1 + rng.randrange(3), m)

    def _probe_paused_leader(self, leader: Node) -> None:
        """Clients will read from the paused leader later in its pause, when another
        leader may have taken over and written: the old one must not answer from its state."""
        span = leader.paused_until - self.tick
        for client in self.clients:
            start = self.tick + span // 2 + self.rng.randrange(span - span // 2)
            client.probe = (leader.id, start, leader.paused_until)

    def _heal(self) -> None:
        self.faults = False
        self.crash_in_ready_p = 0.0
        self.cut = set()
        for node in self.nodes:
            if node.up and node.paused_until >= 0:
                node.replica.clock_jumped()
            node.paused_until = -1
            if not node.up:
                self.log(f"RESTART n{node.id} (heal)")
                node.start()
        self.elections = self.leader_changes = 0
        self.log("HEAL everything; liveness phase")

    # ------------------------------------------------------------------ run
    def _step_tick(self, may_start: bool) -> None:
        self.tick += 1
        if self.faults:
            self._faults()
        while self.queue and self.queue[0][0] <= self.tick:
            _, _, m = heapq.heappop(self.queue)
            self._deliver(m)
        if self.byzantine is not None and self.byzantine.rng.random() < self.config.byzantine_rate:
            self.byzantine.inject()
        for node in self.nodes:
            if node.awake():
                node.replica.tick()
                node.drain()
        for client in self.clients:
            client.on_tick(may_start)
        for node in self.nodes:
            if node.awake():
                node.drain()

    def _settled(self) -> bool:
        """One leader, followed by every node, and no node recovering (a wiped one votes again)."""
        leader = self.leader()
        return leader is not None and all(n.replica.leader_hint == leader.id and not n.replica.recovering
                                          for n in self.nodes)

    def run(self) -> None:
        c = self.config
        self.crash_in_ready_p = c.crash_in_ready_rate
        while self.tick < c.ticks:
            self._step_tick(True)
        self._heal()
        healed = self.tick
        end = healed + self.liveness_ticks
        while any(cl.op is not None for cl in self.clients) or self.settle_ticks is None:
            if self.tick >= end:
                stuck = [f"c{cl.id}:{cl.op['kind']} seq={cl.op['seq']}" for cl in self.clients if cl.op]
                self.fail(f"liveness: {'no settled leader' if self.settle_ticks is None else stuck} "
                          f"{self.liveness_ticks} ticks after the last heal")
            self._step_tick(False)
            if self.settle_ticks is None and self._settled():
                self.settle_ticks = self.tick - healed
        if c.rejoin_check and c.nodes >= 3:
            self._check_rejoin()
        self.check_end()

    def _check_rejoin(self) -> None:
        """Crash a follower for a few election timeouts and restart it: the leader stays."""
        leader = self.leader()
        ballot = leader.replica.ballot
        follower = self.nodes[(leader.id + 1 + self.rng.randrange(self.config.nodes - 1)) % self.config.nodes]
        timeout = self.config.election_timeout_ticks
        follower.crash("rejoin check")
        for _ in range(3 * timeout):
            self._step_tick(False)
        self.log(f"RESTART n{follower.id} (rejoin check)")
        follower.start()
        for _ in range(10 * timeout):
            self._step_tick(False)
        if not (leader.up and leader.replica.is_leader and leader.replica.ballot == ballot):
            self.fail(f"liveness: n{follower.id} rejoined and deposed the live leader n{leader.id}")
        if not self._settled():
            self.fail(f"liveness: n{follower.id} did not follow leader n{leader.id} "
                      f"{10 * timeout} ticks after it rejoined")

    def check_end(self) -> None:
        chosen_cmds = set()
        for slot in self.chosen:
            kind, cmds = self.chosen[slot]
            chosen_cmds.update(cmds)
        for cmd in self.acked:
            if cmd not in chosen_cmds:
                self.fail(f"durability: acknowledged {decode_command(cmd)} is not in the chosen log")
        pending = []
        for cl in self.clients:
            if cl.op is not None:
                op = cl.op
                pending.append(Operation(cl.id, op["key"], op["kind"], op["args"], op["call"], None))
        try:
            res = check_history(self.history + pending)
        except CheckerGaveUp:
            self.log("linearizability checker gave up (history too large); not checked")
            return
        if not res.ok:
            self.fail(f"linearizability: key {res.key!r}\n{res.explanation}")


@dataclass
class RunResult:
    """One seed's outcome and its liveness figures."""

    ok: bool
    text: str
    settle_ticks: int | None = None
    elections: int = 0
    leader_changes: int = 0


def _bug_flags(bugs: Bugs) -> str:
    return "".join(f" --bug {f.name}" for f in fields(bugs) if getattr(bugs, f.name))


def byzantine_by_default(seed: int) -> bool:
    """The seeds a byzantine-input sender joins unless told otherwise: a third of them."""
    return seed % 3 == 2


def run(config: SimConfig) -> RunResult:
    """Run one seed; on failure the text has the reason, the replay command and the trace."""
    forced = config.byzantine is not None and config.byzantine != byzantine_by_default(config.seed)
    if config.byzantine is None:
        config = replace(config, byzantine=byzantine_by_default(config.seed))
    sim = Simulation(config)
    try:
        sim.run()
    except Exception as e:  # noqa: BLE001 - a crash of the core is a finding like any other
        flag = (" --byzantine" if config.byzantine else " --no-byzantine") if forced else ""
        return RunResult(False, failure_report(
            f"seed {config.seed}", e, SimulationFailure,
            f"python -m kvstore.sim --core --seed {config.seed} --nodes {config.nodes} --ticks {config.ticks}"
            f"{_bug_flags(config.bugs)}{flag} --verbose", sim.trace))
    byzantine = f"; {sim.byzantine.summary()}" if sim.byzantine is not None else ""
    return RunResult(True, f"seed {config.seed}: ok, {len(sim.chosen)} slots chosen, "
                           f"{len(sim.history)} ops completed, {len(sim.acked)} writes acknowledged; "
                           f"after the heal: settled in {sim.settle_ticks} ticks, {sim.elections} elections, "
                           f"{sim.leader_changes} leader changes{byzantine}",
                     sim.settle_ticks, sim.elections, sim.leader_changes)


def run_seed(config: SimConfig) -> tuple[bool, str]:
    """Run one seed; ``(True, summary)`` or ``(False, report with trace)``."""
    result = run(config)
    return result.ok, result.text
