"""Bank transfers over two-phase commit, each shard a real Paxos group (issue 14, item 5).

``bank.py`` models a shard as an abstract linearizable log that may go dark; this
simulator puts the same workload, the same coordinator processes and the same
checks on top of real groups: each shard is ``cluster.Simulation``'s group of N
``kvstore.paxos.Replica`` cores, with every fault it injects (loss, duplication
in bursts, reordering, long holds, replays, partitions, pauses, crashes of any
node, the leader included, crashes in the middle of handling a Ready) and its
oracle checking the Paxos invariants of each group after every step. Nothing of
the group's machinery is copied: a ``ShardGroup`` is a ``cluster.Simulation``
whose state machine is a shard's ``bank.Shard`` (the ``ParticipantState`` and
``DecisionTable`` of ``kvstore.txn``) fed log commands, and whose client replies
go to the bank's processes.

What travels through a group's log, one command each (msgpack, the sim's
``[client, seq, kind, key, args]``): TxnPrepare (its result is the vote),
TxnDecision (the recorded outcome), TxnResolve, a single-shard transfer, and a
read of some keys (reads go through the log so they are linearizable without a
read index). Every one is idempotent, so a retried or duplicated command may be
chosen at two slots; the validity check of ``cluster.py`` still holds each
command to changing the transaction's state at most once.

Processes (clients that coordinate their own transactions, ``bank.Process``)
send a command to the node they believe leads the shard, follow "not the
leader" hints a few times, and otherwise re-propose on their retry timer; they
crash at any moment and come back with no memory. A shard's leader runs the
resolver: its applied state's prepared records past their deadline are decided
ABORT through the coordinator shard's log (first writer wins) and resolved.
Besides the groups' own faults, the coordinator shard's leader is crashed right
after it proposed a TxnDecision (mid-commit), in some seeds often.

Checks: those of ``bank.py`` (a participant writes only to carry out a COMMIT
recorded by the coordinator shard, never at prepare; decisions carried out are
the recorded ones; two prepared transactions never hold one key; every audit
that commits sees the conserved total; after the heal nothing stays prepared or
locked, each transaction is carried out alike everywhere, the money is all
there), with "recorded" meaning the first TxnDecision applied by any replica of
the coordinator shard, which every other replica must then apply alike (a
decision never changes); plus each group's invariants and its check that every
acknowledged command is in the chosen log.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import msgpack

from kvstore.paxos.replica import Bugs
from kvstore.sim.bank import (Answer, BankConfig, BankFailure, BankSimulation, Propose, Shard, _bug_flags,
                              run_bank)
from kvstore.sim.cluster import ClientReply, ClientRequest, SimConfig, Simulation, SimulationFailure
from kvstore.sim.cluster import _bug_flags as _paxos_bug_flags
from kvstore.sim.cluster import swarm as group_swarm
from kvstore.sim.kv import decode_command, encode_command
from kvstore.sim.oracle import InvariantViolation
from kvstore.txn import TxnDecision, TxnPrepare, TxnResolve, decode, encode

_TXN_KINDS = {TxnPrepare: "prepare", TxnDecision: "decide", TxnResolve: "resolve"}


@dataclass
class BankPaxosConfig(BankConfig):
    nodes: int = 3  # replicas per shard
    # per TxnDecision a coordinator shard's leader proposes: it crashes right after (mid-commit)
    mid_commit_crash_rate: float = 0.1
    retry_backoff_max: int = 8
    redirects_max: int = 3  # "not the leader" hints a request follows before its proposer's timer
    minority_stays_down: bool = True  # through the liveness phase (see ``_heal``)
    group_fault_scale: float = 1.0  # swarm: cluster.py's node crashes, pauses, partitions, times this
    paxos_bugs: Bugs = field(default_factory=Bugs)
    trace_lines: int = 200


def bank_paxos_swarm(c: BankPaxosConfig, rng) -> BankPaxosConfig:
    """An operation takes several consensus rounds (a few ticks each, an election up to ~40):
    slower timers, and processes that live long enough to finish one, in most seeds."""
    pick = lambda *xs: xs[rng.randrange(len(xs))]  # noqa: E731
    return replace(c, mid_commit_crash_rate=pick(0.0, 0.1, 0.3), retry_ticks=pick(4, 8, 16),
                   txn_deadline_ticks=pick(15, 40, 100), crash_rate=pick(0.0, 0.002, 0.005, 0.01),
                   group_fault_scale=pick(0.1, 0.25, 0.5, 1.0), locking_after_conflicts=pick(0, 1, 2))


def group_config(c: BankPaxosConfig, rng) -> SimConfig:
    """The groups' settings and fault rates: one draw of ``cluster.swarm`` for all of them.

    Node crashes (in the middle of a Ready too), pauses and partitions are scaled by
    ``group_fault_scale``: an operation needs every shard it touches, so with every group as
    stormy as ``cluster.py``'s worst seeds hardly any would finish.
    """
    base = SimConfig(seed=c.seed, nodes=c.nodes, ticks=c.ticks, clients=0, bugs=c.paxos_bugs,
                     verbose=c.verbose, swarm=False)
    g = group_swarm(base, rng) if c.swarm else base
    f = c.group_fault_scale
    return replace(g, crash_rate=g.crash_rate * f, pause_rate=g.pause_rate * f,
                   leader_pause_rate=g.leader_pause_rate * f, partition_rate=g.partition_rate * f,
                   crash_in_ready_rate=g.crash_in_ready_rate * f,
                   # A shard's state is a few KB, and the core joins a snapshot's chunks only in
                   # order from one burst, resent whole every election timeout: with 64-byte chunks
                   # (a hundred) over a reordering network a follower may never catch up.
                   snapshot_chunk_bytes=max(g.snapshot_chunk_bytes, 512),
                   # One command per slot and per round trip (as a node never runs) is less than the
                   # bank's processes and resolvers re-propose at their longest backoff: the backlog
                   # would only grow (seed 102130 on 3 shards: 90 commands queued at a leader).
                   batch_commands_max=max(g.batch_commands_max, 4))


# ---------------------------------------------------------------------- log commands
def encode_entry(client: int, seq: int, entry) -> tuple:
    """``(kind, key, command)``: a bank entry as one command of a group's log."""
    kind = _TXN_KINDS.get(type(entry))
    if kind is not None:
        return kind, entry.txn_id, encode_command(client, seq, kind, entry.txn_id, (encode(entry),))
    kind = entry[0]
    if kind == "single":
        _, reads, writes, txn_id = entry
        return kind, txn_id, encode_command(client, seq, kind, txn_id,
                                            ([list(r) for r in reads], [list(w) for w in writes]))
    if kind == "read":
        return kind, b"", encode_command(client, seq, kind, b"", (list(entry[1]),))
    raise AssertionError(f"unknown entry {entry!r}")


def decode_entry(kind: str, key: bytes, args: tuple):
    if kind in _TXN_KINDS.values():
        return decode(args[0])
    if kind == "single":
        return ("single", tuple(tuple(r) for r in args[0]), tuple(tuple(w) for w in args[1]), key)
    if kind == "read":
        return ("read", tuple(args[0]))
    raise ValueError(f"unknown bank command {kind!r}")


class ShardMachine:
    """One replica's state machine: a ``bank.Shard`` fed log commands, with snapshots.

    ``cluster.Node`` calls ``apply(command) -> ((client, seq), result, took_effect)``;
    ``took_effect`` says whether the command changed its transaction's state here (a
    duplicate must not, a second time).
    """

    def __init__(self, shard: Shard) -> None:
        self.shard = shard

    def apply(self, command: bytes) -> tuple:
        client, seq, kind, key, args = decode_command(command)
        entry = decode_entry(kind, key, args)
        before = self._mark(entry)
        result = self.shard.apply(entry)
        if isinstance(entry, TxnDecision):
            self.shard.sim.note_decision(self.shard.id, entry.txn_id, result)
        return (client, seq), result, before is not None and self._mark(entry) != before

    def _mark(self, entry):
        """What of ``entry``'s transaction this shard holds (None: a read, which changes nothing)."""
        if isinstance(entry, tuple) and entry[0] == "read":
            return None
        txn_id = entry[3] if isinstance(entry, tuple) else entry.txn_id
        s = self.shard
        return (txn_id in s.participant.prepared, s.participant.finished.get(txn_id),
                s.decisions.decisions.get(txn_id), s.singles.get(txn_id))

    def snapshot(self) -> bytes:
        s = self.shard
        p = s.participant
        return msgpack.packb([s.slot, sorted([k, rev, v] for k, (rev, v) in s.data.items()),
                              [encode(p.prepared[t]) for t in sorted(p.prepared)], sorted(p.locks.items()),
                              sorted(p.finished.items()), sorted(s.decisions.decisions.items()),
                              sorted(s.singles.items())], use_bin_type=True)

    def restore_into(self, data: bytes) -> "ShardMachine":
        s = self.shard
        p = s.participant
        slot, items, prepared, locks, finished, decisions, singles = msgpack.unpackb(data, raw=False)
        s.slot = slot
        s.data = {k: (rev, v) for k, rev, v in items}
        p.prepared = {e.txn_id: e for e in map(decode, prepared)}
        p.locks = dict(locks)
        p.finished = dict(finished)
        s.decisions.decisions = dict(decisions)
        s.singles = dict(singles)
        return self


class MachineFactory:
    """``cluster.Simulation``'s ``machine``: a fresh shard (``()``) or one from a snapshot."""

    def __init__(self, sim: "BankPaxosSimulation", shard: int, keys: list) -> None:
        self.sim, self.shard, self.keys = sim, shard, keys

    def __call__(self) -> ShardMachine:
        return ShardMachine(Shard(self.sim, self.shard, self.keys))

    def restore(self, data: bytes) -> ShardMachine:
        return self().restore_into(data)


class _GroupTrace:
    """A group's events in the one trace of the run, named by shard."""

    def __init__(self, trace, shard: int) -> None:
        self.trace, self.prefix = trace, f"s{shard}"

    def add(self, tick: int, line: str) -> None:
        self.trace.add(tick, f"{self.prefix} {line}")


class ShardGroup(Simulation):
    """One shard's Paxos group, stepped by the bank; its client replies go to the bank."""

    def __init__(self, bank: "BankPaxosSimulation", index: int, config: SimConfig, machine) -> None:
        self.bank = bank
        self.index = index
        super().__init__(config, rng=bank.rng, trace=_GroupTrace(bank.trace, index), machine=machine)

    def on_client_reply(self, m: ClientReply) -> None:
        self.bank.on_reply(self, m)

    def _deliver(self, m) -> None:
        super()._deliver(m)
        if not (self.faults and isinstance(m, ClientRequest) and m.kind == "decide"):
            return
        node = self.nodes[m.to]
        if node.up and node.replica.is_leader and self.rng.random() < self.bank.config.mid_commit_crash_rate:
            node.crash(f"leader, mid-commit of {m.key!r}")
            node.down_until = self.tick + 1 + self.rng.randrange(6 * self.config.election_timeout_ticks)


class BankPaxosSimulation(BankSimulation):
    def __init__(self, config: BankPaxosConfig) -> None:
        super().__init__(config)
        if config.swarm:
            self.config = config = bank_paxos_swarm(self.config, self.rng)
        groups = group_config(config, self.rng)
        self.groups = [ShardGroup(self, s, groups, MachineFactory(self, s, [k for k in self.accounts
                                                                            if self.shard_of[k] == s]))
                       for s in range(config.shards)]
        self.shards = []  # the layered model's shards are not used; ``check_end`` looks at the leaders'
        self.recorded: dict = {}  # txn id -> the decision its coordinator shard applied first
        self.requests: dict = {}  # request seq -> [Propose, command, "not the leader" answers]
        self.hints: dict = {}  # (proposer, shard) -> the node it believes leads the shard
        self.last_sent: dict = {}  # (proposer, tag) -> (seq, node) of its latest request

    # ------------------------------------------------------------------ the checks' view
    def recorded_decision(self, txn_id: bytes) -> int | None:
        return self.recorded.get(txn_id)

    def note_decision(self, shard: int, txn_id: bytes, outcome: int) -> None:
        """A replica of ``shard`` applied a TxnDecision: the recorded outcome, the same at every replica."""
        first = self.recorded.setdefault(txn_id, outcome)
        if first != outcome:
            self.fail(f"decision: a replica of s{shard} recorded {outcome} for {txn_id!r}, "
                      f"after {first} was recorded")

    # ------------------------------------------------------------------ processes <-> groups
    def _client(self, frm: tuple) -> int:
        return len(self.processes) + frm[1] if frm[0] == "resolver" else frm[0]

    def send(self, m: Propose) -> None:
        """A process (or a shard's resolver) asks shard ``m.to`` to append ``m.entry`` to its log."""
        seq = self.next_id()
        kind, key, command = encode_entry(self._client(m.frm), seq, m.entry)
        group = self.groups[m.to]
        group.proposed.add(command)
        self.requests[seq] = [m, command, 0]
        target = self.hints.get((m.frm, m.to))
        last = self.last_sent.get((m.frm, m.tag))
        if last is not None and last[0] in self.requests:
            # A retry after a timeout: the node tried last (the hint, often) may be down.
            self.hints.pop((m.frm, m.to), None)
            n = group.config.nodes
            target = (last[1] + 1 + self.rng.randrange(n - 1)) % n if n > 1 else 0
        elif target is None:
            target = self.rng.randrange(group.config.nodes)
        self.last_sent[(m.frm, m.tag)] = (seq, target)
        self.log(f"{m.frm} -> s{m.to}.n{target} {kind} {key!r} seq={seq}")
        group.send(ClientRequest(target, self._client(m.frm), seq, kind, key, (), command))

    def on_reply(self, group: ShardGroup, m: ClientReply) -> None:
        request = self.requests.get(m.seq)
        if request is None:
            return  # a duplicate of an answer already taken
        propose, command, redirects = request
        if m.ok:
            del self.requests[m.seq]
            self.hints[(propose.frm, group.index)] = m.frm
            group.acked.append(command)  # the group checks it is in the chosen log
            self.log(f"s{group.index}.n{m.frm} answers {propose.frm} seq={m.seq}: {m.result!r}")
            self.carry_out(propose, m.result)
            self.answer(Answer(propose.frm, propose.tag, m.result))
            return
        # Not the leader: follow its hint, or try another node, a few times (as cluster.py's
        # clients do); past that, the proposer's own timer sends a new request.
        hint = m.leader_hint if m.leader_hint is not None and m.leader_hint != m.frm else None
        if hint is None:
            self.hints.pop((propose.frm, group.index), None)
            hint = (m.frm + 1 + self.rng.randrange(group.config.nodes - 1)) % group.config.nodes
        else:
            self.hints[(propose.frm, group.index)] = hint
        if redirects < self.config.redirects_max:
            request[2] += 1
            client, seq, kind, key, _ = decode_command(command)
            group.send(ClientRequest(hint, client, seq, kind, key, (), command))

    # ------------------------------------------------------------------ run
    def _step(self, may_start: bool) -> None:
        self.tick += 1
        if self.faults:
            self._process_faults()
        for group in self.groups:
            try:
                group._step_tick(False)
            except (SimulationFailure, InvariantViolation) as e:  # name the group that failed
                raise type(e)(f"s{group.index}: {e}") from e
        for group in self.groups:
            for node in group.nodes:
                if node.up and node.paused_until <= self.tick and node.replica.is_leader:
                    node.kv.shard.resolve_expired(self.tick)
        for p in self.processes:
            if p.up:
                p.on_tick(may_start)

    def _heal(self) -> None:
        """Everything heals, but a minority of each group (drawn per group, maybe none) stays down:
        a majority must be enough to finish or resolve every transaction."""
        super()._heal()
        for group in self.groups:
            group._heal()
            if self.config.minority_stays_down:
                # A node that does not vote yet (it recovers: it never voted durably, or lost
                # its disk) needs every other node: it is among those that stay down, or none is.
                recovering = [n for n in group.nodes if n.replica.recovering]
                others = [n for n in group.nodes if not n.replica.recovering]
                k = self.rng.randrange(group.config.nodes // 2 + 1)
                if len(recovering) > group.config.nodes // 2:
                    k = 0
                down = recovering + self.rng.sample(others, max(0, k - len(recovering))) if k else []
                for node in down:
                    node.crash("stays down through the liveness phase")

    def liveness_ticks(self) -> int:
        """Twice a group's own bound (elections, a leader with a pipeline window of 1 draining a
        backlog of retried commands), plus a few retries at the longest backoff."""
        c = self.config
        return 2 * max(c.liveness_ticks, *(g.liveness_ticks for g in self.groups)) + 4 * c.retry_ticks * c.retry_backoff_max

    def _group_quiet(self, group: ShardGroup) -> bool:
        """One leader followed by every live replica, each applied up to its commit point, nothing prepared."""
        leader = group.leader()
        if leader is None:
            return False
        commit = leader.replica.commit_index
        return all(n.replica.leader_hint == leader.id and n.last_applied == commit
                   and not n.kv.shard.participant.prepared for n in group.nodes if n.up)

    def _quiet(self) -> bool:
        return (all(p.op is None and not p.background for p in self.processes if p.up)
                and all(self._group_quiet(g) for g in self.groups))

    def _stuck(self) -> str:
        groups = []
        for g in self.groups:
            leader = g.leader()
            prepared = sorted({t for n in g.nodes if n.up for t in n.kv.shard.participant.prepared})
            groups.append(f"s{g.index}: leader {leader and leader.id}, prepared {prepared}")
        return f"{'; '.join(groups)}; ops: {[p.op and p.op['kind'] for p in self.processes]}"

    def check_end(self) -> None:
        # Every replica's state equals a replay of its group's chosen log (the oracle checks it at
        # each slot), and all have applied the same prefix: the leader's state stands for the shard.
        self.shards = [g.leader().kv.shard for g in self.groups]
        super().check_end()
        for group in self.groups:
            group.check_end()


def run_bank_paxos_seed(config: BankPaxosConfig) -> tuple[bool, str]:
    return run_bank(BankPaxosSimulation(config), f"bank-paxos seed {config.seed}",
                    f"python -m kvstore.sim --bank --paxos --seed {config.seed} --shards {config.shards} "
                    f"--nodes {config.nodes}{_bug_flags(config.bugs)}{_paxos_bug_flags(config.paxos_bugs)}"
                    f"{' --locking-audit-trusts-votes' if config.locking_audit_trusts_votes else ''} --verbose",
                    expected=(BankFailure, SimulationFailure, InvariantViolation))
