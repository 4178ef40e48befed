"""Deterministic simulation of cross-shard bank transfers over two-phase commit.

Layered on what the real-node simulator (``realnode.py``) proves of one shard (its
log is linearizable and applies every entry once, in order, under every fault it
injects), this
simulator treats each shard as such a log that may be unreachable for a while
(no quorum: a leader election, a partitioned majority), and puts the faults
where two-phase commit can go wrong: between the processes that coordinate
transactions and the shards' logs. Messages are dropped, duplicated (in bursts,
the extra copies late), delayed and reordered; shards go dark and come back;
coordinator processes crash at any moment, mid-commit included, losing all they
held, and restart. One seed drives one ``random.Random``; a failure prints the
seed, the command that replays it and the trace.

The processes model ``kvstore.client.txn``: they propose the prepares and ask the
coordinator shard for a decision (a TxnDecision request naming the
participants); the node that records it, not the process, proposes the
TxnResolve entries on every participant (``carry_out``), as ``kvstore.node.loop``
does, so a process that crashes after asking leaves nothing to resolve.

Workload: processes move money between accounts spread over the shards
(transfers inside one shard are one log entry; across shards, 2PC) and audit
all accounts in read-only transactions across every shard.

Checks, after every step where they apply:
- a participant writes only when it carries out a decision that the
  coordinator shard has recorded (never at prepare, never ahead of the decision),
  and every decision carried out is the one recorded (decisions never change);
- two prepared transactions never hold the same key;
- every audit that commits sees the conserved total (isolation, read-only too);
and at the end, after a liveness phase with every fault healed:
- no transaction is left prepared and no key locked (nothing blocked forever);
- atomicity: each transaction's participants all carried out its recorded
  decision, and a client told "committed" got exactly that;
- the money is all there.

Long module: one seed's world of the abstract bank (its network, its participants and
coordinators, the clients' plans, the faults and the checks) shares one random stream
and one schedule; the checks read the world's private tables as the faults change them.
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field, fields, replace

from kvstore.sim.trace import Trace, failure_report
from kvstore.txn import (ABORT, COMMIT, LOCK_ONLY, Coordinator, DecisionTable, ParticipantState, Recovery,
                         TxnBugs, TxnDecision, TxnFence, TxnPrepare, TxnResolve)

INITIAL_BALANCE = 100
#: The tags of requests whose entry is a TxnDecision: ``(kind, txn id, participants)``;
#: "implied": a one-round transaction's outcome, carried out as it is recorded, not after.
DECISION_REQUESTS = ("decide", "confirm", "release", "implied")


class BankFailure(Exception):
    pass


@dataclass
class BankConfig:
    seed: int = 0
    shards: int = 3
    accounts: int = 6
    processes: int = 3
    ticks: int = 400  # fault phase
    liveness_ticks: int = 600
    drop_rate: float = 0.05
    duplicate_rate: float = 0.03
    duplicate_spread_ticks: int = 20
    delay_max_ticks: int = 3
    outage_rate: float = 0.005  # per shard per tick: no quorum for a while
    outage_ticks_max: int = 40
    crash_rate: float = 0.005  # per process per tick
    down_ticks_max: int = 40
    txn_deadline_ticks: int = 30  # a prepared record may be resolved by anyone after this
    retry_ticks: int = 6  # a process re-proposes what it has no answer to after this
    # each unanswered retry of an operation doubles its wait, up to this many times retry_ticks;
    # background re-proposals and resolvers wait that long. 1: no backoff (an abstract log answers
    # in a few ticks; a Paxos group under load must not be flooded with retries)
    retry_backoff_max: int = 1
    # as kvstore.client.txn does: a cross-shard operation that lost this many attempts to conflicts
    # takes its reads by locking them in every shard at once (0: an aborted operation is not
    # retried, and reads are always optimistic)
    locking_after_conflicts: int = 0
    # kvstore.client.txn's read-only locking transaction as it is today: its values are trusted once
    # every shard voted yes. Not serializable: a lock past its deadline may have been released by
    # a resolver (ABORT recorded) before the last shard's vote came (bank-paxos seed 1208 on 3
    # shards). Off: the audit first records COMMIT in the coordinator shard, which no resolver's
    # ABORT can then have preceded, so every lock was still held when the last one was taken.
    locking_audit_trusts_votes: bool = False
    audit_share: float = 0.3
    # the share of (optimistic) cross-shard transfers committed in one round (parallel commits,
    # kvstore.txn.coordinator); the others in two, as a client that was not told to (an upgrade)
    one_round_share: float = 1.0
    bugs: TxnBugs = field(default_factory=TxnBugs)
    swarm: bool = True
    trace_lines: int = 80
    verbose: bool = False


def swarm(c: BankConfig, rng: random.Random) -> BankConfig:
    pick = lambda *xs: xs[rng.randrange(len(xs))]  # noqa: E731
    return replace(c, drop_rate=pick(0.0, 0.05, 0.15), duplicate_rate=pick(0.0, 0.03, 0.1),
                   duplicate_spread_ticks=pick(3, 20, 60), delay_max_ticks=pick(1, 3, 6),
                   outage_rate=pick(0.0, 0.005, 0.02), crash_rate=pick(0.0, 0.005, 0.02),
                   txn_deadline_ticks=pick(10, 30, 60), retry_ticks=pick(3, 6, 12),
                   audit_share=pick(0.1, 0.3, 0.5), accounts=pick(3, 6, 12),
                   one_round_share=pick(1.0, 1.0, 0.5),
                   processes=pick(2, 3, 5))


@dataclass(frozen=True)
class Propose:
    """A process asks shard ``to`` to append ``entry`` (a read when ``entry`` is a key tuple)."""

    to: int
    frm: tuple  # (process, incarnation), where the answer goes
    tag: tuple
    entry: object


@dataclass(frozen=True)
class Answer:
    to: tuple
    tag: tuple
    result: object


class Shard:
    """One shard's log as its replicas apply it: data, prepared records, decisions."""

    def __init__(self, sim: "BankSimulation", index: int, keys: list) -> None:
        self.sim = sim
        self.id = index
        self.data = {k: (1, b"%d" % INITIAL_BALANCE) for k in keys}  # key -> (revision, value)
        self.participant = ParticipantState(bugs=sim.config.bugs)
        self.decisions = DecisionTable()
        self.slot = 1
        self.down_until = -1
        self.applying: object = None  # the entry being applied (the write oracle looks)
        self.asked: dict = {}  # resolver: txn id -> tick it last asked the coordinator shard
        self.recoveries: dict = {}  # resolver: txn id -> Recovery of a one-round transaction
        self.resolving_outcome = None  # the outcome the resolve being applied must carry out
        self.singles: dict = {}  # txn id -> result: a retried one-shard transaction applies once

    # Store, for ParticipantState
    def revision(self, key: bytes) -> int:
        return self.data[key][0] if key in self.data else 0

    def write(self, key: bytes, value: bytes | None) -> None:
        entry = self.applying
        if isinstance(entry, TxnResolve):
            if entry.outcome != COMMIT or self.resolving_outcome != COMMIT:
                self.sim.fail(f"atomicity: s{self.id} wrote {key!r} for {entry.txn_id!r}, whose outcome "
                              f"(recorded, or implied by its one-round votes) is {self.resolving_outcome}")
        elif not (isinstance(entry, tuple) and entry[0] == "single"):
            self.sim.fail(f"atomicity: s{self.id} wrote {key!r} while applying {type(entry).__name__}, "
                          f"before any decision")
        if value is None:
            self.data.pop(key, None)
        else:
            self.data[key] = (self.slot, value)

    def apply(self, entry):
        """Append ``entry`` to the log and apply it; its result goes back to the proposer."""
        self.slot += 1
        self.applying = entry
        try:
            return self._apply(entry)
        finally:
            self.applying = None

    def _apply(self, entry):
        sim = self.sim
        if isinstance(entry, TxnPrepare):
            vote = self.participant.apply_prepare(self, entry)
            if vote and not entry.read_only:
                sim.check_locks(self)
            locking = [key for key, revision in entry.reads if revision == LOCK_ONLY]
            if not locking:
                return vote
            # locking reads (as a node answers them): the values as of this slot, under the locks
            return vote, [(key, *self._read(key)) for key in locking] if vote else []
        if isinstance(entry, TxnDecision):
            if entry.txn_id in sim.coordinator_of and sim.coordinator_of[entry.txn_id] != self.id:
                sim.fail(f"decision for {entry.txn_id!r} proposed to s{self.id}, not its coordinator shard")
            recorded = self.decisions.apply_decision(entry.txn_id, entry.outcome)
            told = sim.told.get(entry.txn_id)
            if told is not None and told != recorded:  # a one-round client hears it first
                sim.fail(f"decision: {entry.txn_id!r}'s client was told {told}, {recorded} is recorded")
            return recorded
        if isinstance(entry, TxnFence):
            return self.participant.apply_fence(entry.txn_id)
        if isinstance(entry, TxnResolve):
            # every resolve carries out a recorded decision (a locking read's release too: its
            # coordinator shard records ABORT first, kvstore.node.loop ``_on_decide``), or the
            # outcome a one-round transaction's votes imply (its decision may come later)
            self.resolving_outcome = sim.outcome_of(entry.txn_id)
            if self.resolving_outcome != entry.outcome:
                sim.fail(f"decision: s{self.id} carries out {entry.outcome} for {entry.txn_id!r}, "
                         f"but its outcome is {self.resolving_outcome} (recorded "
                         f"{sim.recorded_decision(entry.txn_id)}, implied {sim.implied(entry.txn_id)})")
            if self.participant.apply_resolve(self, entry):
                sim.carried_out.setdefault(entry.txn_id, {})[self.id] = entry.outcome
            return True
        kind = entry[0]
        if kind == "single":
            txn_id = entry[3]
            if txn_id not in self.singles:  # the client session table's job, in a node
                self.singles[txn_id] = self.participant.apply_single(self, entry[1], entry[2])
            return self.singles[txn_id]
        if kind == "read":  # a linearizable read of some keys: value and revision
            return [(k, *self._read(k)) for k in entry[1]]
        raise AssertionError(f"unknown entry {entry!r}")

    def _read(self, key: bytes) -> tuple:
        rev, value = self.data.get(key, (0, None))
        return value, rev

    def resolve_expired(self, now: int) -> None:
        """The shard's resolver: ask the coordinator shard about prepared records past their
        deadline; a one-round one is recovered from its prepares (``recover``)."""
        sim = self.sim
        for p in self.participant.expired(now):
            if now - self.asked.get(p.txn_id, -10**9) < sim.config.retry_ticks * sim.config.retry_backoff_max:
                continue
            self.asked[p.txn_id] = now
            if p.one_round:
                self.recover(p)
                continue
            sim.log(f"s{self.id} resolver asks s{p.coordinator} about {p.txn_id!r}")
            sim.send(Propose(p.coordinator, ("resolver", self.id), ("decide", p.txn_id, p.participants),
                             TxnDecision(p.txn_id, ABORT)))


    def recover(self, p: TxnPrepare) -> None:
        """Fence every participant, then decide what the fences imply (``Recovery``); a
        recovery already under way proposes again what it has no answer to."""
        sim = self.sim
        rec = self.recoveries.get(p.txn_id)
        if rec is None:
            rec = self.recoveries[p.txn_id] = Recovery(p.txn_id, p.coordinator, p.participants,
                                                       sim.config.bugs)
            sim.log(f"s{self.id} resolver recovers one-round {p.txn_id!r} from its prepares")
        self.propose(rec, rec.proposals())

    def propose(self, rec: Recovery, proposals: list) -> None:
        for shard, entry in proposals:
            tag = (("fence", rec.txn_id, shard) if isinstance(entry, TxnFence)
                   else ("decide", rec.txn_id, rec.participants))
            self.sim.send(Propose(shard, ("resolver", self.id), tag, entry))

    def on_answer(self, a: "Answer") -> None:
        """A recovery's fence or decision was applied (other answers: nothing to do here)."""
        rec = self.recoveries.get(a.tag[1])
        if rec is None:
            return
        if a.tag[0] == "fence":
            self.propose(rec, rec.on_fenced(a.tag[2], a.result))
        elif a.tag[0] == "decide":
            rec.on_decision(a.result)  # carried out by the node that recorded it
            del self.recoveries[a.tag[1]]

    def lose_volatile(self) -> None:
        """A leader change: the resolver's recoveries under way are lost (started again)."""
        self.recoveries.clear()


class Process:
    """A client that coordinates its own transactions; everything it holds dies with it."""

    def __init__(self, sim: "BankSimulation", index: int) -> None:
        self.sim = sim
        self.id = index
        self.incarnation = 0
        self.down_until = -1
        self.restart()

    def restart(self) -> None:
        self.incarnation += 1
        self.up = True
        self.op: dict | None = None
        self.background: dict = {}  # txn id -> Coordinator still resolving after its answer
        self.idle_until = self.sim.tick + self.sim.rng.randrange(3)

    @property
    def address(self) -> tuple:
        return (self.id, self.incarnation)

    def crash(self) -> None:
        sim = self.sim
        sim.log(f"CRASH p{self.id} ({'idle' if self.op is None else self.op['kind'] + ' ' + self.op['phase']})")
        if self.op is not None and self.op.get("txn_id") is not None:
            sim.unknown.add(self.op["txn_id"])
        self.up = False
        self.op = None
        self.background = {}

    # ------------------------------------------------------------------ operations
    def start(self, again: dict | None = None) -> None:
        """A new operation, or ``again`` one that lost to a conflict (as kvstore.client.txn retries)."""
        sim = self.sim
        rng = sim.rng
        if again is not None:
            self.op = {k: again[k] for k in ("kind", "keys", "amount") if k in again}
            self.op["conflicts"] = again.get("conflicts", 0) + 1
        elif rng.random() < sim.config.audit_share:
            keys = list(sim.accounts)
            self.op = {"kind": "audit", "keys": keys}
        else:
            a, b = rng.sample(sim.accounts, 2)
            self.op = {"kind": "transfer", "keys": [a, b], "amount": 1 + rng.randrange(30)}
        self.op.update(phase="read", seen={}, txn_id=None, coordinator=None, deadline=sim.tick,
                       retries=0, id=sim.next_id())
        shards = sorted({sim.shard_of[k] for k in self.op["keys"]})
        locking = sim.config.locking_after_conflicts
        if locking and len(shards) > 1 and self.op.get("conflicts", 0) >= locking:
            self.begin_locking(shards)
        else:
            self.send_reads()

    def begin_locking(self, shards: list) -> None:
        """Lock every key read in every shard at once (one TxnPrepare of locking reads each):
        once all voted yes the values answered are one consistent cut."""
        sim = self.sim
        op = self.op
        txn_id = b"t%d.%d.%d" % (self.id, self.incarnation, sim.next_id())
        deadline = sim.tick + sim.config.txn_deadline_ticks
        op.update(phase="lock", txn_id=txn_id, locking=True, locked=set(), shards=tuple(shards),
                  lock_prepares={shard: TxnPrepare(txn_id, shards[0], tuple(shards), tuple(
                      (k, LOCK_ONLY) for k in sorted(k for k in op["keys"] if sim.shard_of[k] == shard)),
                      (), deadline) for shard in shards})
        sim.coordinator_of[txn_id] = shards[0]  # a resolver settles it there if it is abandoned
        self.send_locks()

    def send_locks(self) -> None:
        op = self.op
        for shard, prepare in op["lock_prepares"].items():
            if shard not in op["locked"]:
                self.sim.send(Propose(shard, self.address, ("lock", op["txn_id"], shard), prepare))
        self.arm()

    def release_locks(self) -> None:
        """Free a locking read's locks, without waiting: ask its coordinator shard to record
        ABORT, which that shard's node carries out everywhere (a lost one: the resolvers)."""
        op = self.op
        self.sim.send(Propose(op["shards"][0], self.address, ("release", op["txn_id"], op["shards"]),
                              TxnDecision(op["txn_id"], ABORT)))

    def send_confirm(self) -> None:
        """A locking audit's values are one cut if no lock was released before the last was
        taken: recording COMMIT first in the coordinator shard proves no resolver aborted it
        (the node that records it then frees the locks everywhere)."""
        op = self.op
        self.sim.send(Propose(op["shards"][0], self.address, ("confirm", op["txn_id"], op["shards"]),
                              TxnDecision(op["txn_id"], COMMIT)))
        self.arm()

    def on_locked(self, shard: int, result) -> None:
        op = self.op
        vote, values = result
        if not vote:
            self.release_locks()
            self.finish(ABORT)
            return
        op["locked"].add(shard)
        for key, value, rev in values:
            op["seen"].setdefault(key, (value, rev))
        if len(op["locked"]) < len(op["shards"]):
            return
        if op["kind"] != "audit":
            self.begin_commit()
        elif self.sim.config.locking_audit_trusts_votes:
            op["undecided"] = True
            self.release_locks()
            self.finish(COMMIT)
        else:
            op["phase"] = "confirm"
            self.send_confirm()

    def send_reads(self) -> None:
        sim = self.sim
        by_shard: dict = {}
        for k in self.op["keys"]:
            if k not in self.op["seen"]:
                by_shard.setdefault(sim.shard_of[k], []).append(k)
        for shard, keys in sorted(by_shard.items()):
            sim.send(Propose(shard, self.address, ("read", self.op["id"]), ("read", tuple(keys))))
        self.arm()

    def on_answer(self, a: Answer) -> None:
        sim = self.sim
        tag = a.tag
        if tag[0] in ("prepare", "decide", "implied", "resolve"):
            txn_id = tag[1]
            co = self.op["coordinator"] if self.op and self.op.get("txn_id") == txn_id else self.background.get(txn_id)
            if co is None:
                return
            proposals = []
            if tag[0] == "prepare":
                proposals = co.on_vote(tag[2], a.result)
            elif tag[0] in ("decide", "implied"):
                co.on_decision(a.result)  # the node that recorded it carries it out
            self.propose(co, proposals)
            if co.state == "done":
                self.background.pop(txn_id, None)
            if self.op is not None and self.op.get("txn_id") == txn_id and co.decided:
                self.finish(co.outcome)
            return
        op = self.op
        if op is None:
            return
        if tag[0] == "lock" and op["phase"] == "lock" and tag[1] == op["txn_id"] and tag[2] not in op["locked"]:
            self.on_locked(tag[2], a.result)
        elif tag[0] == "confirm" and op["phase"] == "confirm" and tag[1] == op["txn_id"]:
            self.finish(a.result)
        elif tag[0] == "read" and op["phase"] == "read" and tag[1] == op["id"]:
            for key, value, rev in a.result:
                op["seen"].setdefault(key, (value, rev))
            if len(op["seen"]) == len(op["keys"]):
                self.begin_commit()
        elif tag[0] == "single" and op["phase"] == "commit" and tag[1] == op["txn_id"]:
            self.finish(COMMIT if a.result else ABORT)

    def begin_commit(self) -> None:
        sim = self.sim
        op = self.op
        seen = op["seen"]
        parts: dict = {}
        for k in op["keys"]:
            parts.setdefault(sim.shard_of[k], ([], []))[0].append((k, seen[k][1]))
        if op["kind"] == "transfer":
            a, b = op["keys"]
            have = int(seen[a][0])
            amount = min(op["amount"], have)
            for key, value in ((a, have - amount), (b, int(seen[b][0]) + amount)):
                parts[sim.shard_of[key]][1].append((key, b"%d" % value))
        locked = op.get("locking", False)  # its prepares add the writes to the locks it holds
        txn_id = op["txn_id"] if locked else b"t%d.%d.%d" % (self.id, self.incarnation, sim.next_id())
        op.update(phase="commit", txn_id=txn_id)
        if len(parts) == 1 and op["kind"] == "transfer":
            (shard, (reads, writes)), = parts.items()
            op["single"] = Propose(shard, self.address, ("single", txn_id),
                                   ("single", tuple(reads), tuple(writes), txn_id))
            sim.send(op["single"])
            self.arm()
            return
        coordinator_shard = op["shards"][0] if locked else sorted(parts)[sim.rng.randrange(len(parts))]
        one_round = not locked and sim.rng.random() < sim.config.one_round_share
        co = Coordinator(txn_id, coordinator_shard, parts, sim.tick + sim.config.txn_deadline_ticks,
                         decision_not_replicated=sim.config.bugs.decision_not_replicated,
                         one_round=one_round)
        sim.coordinator_of[txn_id] = coordinator_shard
        if co.one_round:
            sim.one_round_participants[txn_id] = co.participants
        op["coordinator"] = co
        self.propose(co, co.proposals())

    def propose(self, co: Coordinator, proposals: list) -> None:
        sim = self.sim
        for shard, entry in proposals:
            kind = {TxnPrepare: "prepare", TxnDecision: "decide", TxnResolve: "resolve"}[type(entry)]
            if kind == "decide" and co.one_round:
                kind = "implied"  # the votes fixed it: the node carries it out as it records it
            # a decide request names the participants: the node that records it resolves them
            tag = (kind, co.txn_id, co.participants if kind in DECISION_REQUESTS else shard)
            sim.send(Propose(shard, self.address, tag, entry))
        if self.op is not None and self.op.get("coordinator") is co:
            self.arm()

    def finish(self, outcome: int) -> None:
        sim = self.sim
        op = self.op
        co = op.get("coordinator")
        if op["kind"] == "audit" and outcome == COMMIT:
            total = sum(int(v) for v, _ in op["seen"].values())
            if total != sim.total:
                sim.fail(f"isolation: p{self.id}'s audit {op['txn_id']!r} committed having seen a total of "
                         f"{total}, not {sim.total}")
        if not op.get("undecided"):  # (a locking audit that trusts its votes is decided by nobody)
            sim.told[op["txn_id"]] = outcome
        sim.completed += 1
        sim.log(f"p{self.id} {op['kind']} {op['txn_id']!r} -> {'COMMIT' if outcome == COMMIT else 'ABORT'}")
        if co is not None and co.state != "done":
            self.background[op["txn_id"]] = co
        self.op = None
        self.idle_until = sim.tick + sim.rng.randrange(3)
        if outcome == ABORT and sim.config.locking_after_conflicts and op.get("conflicts", 0) < 4:
            self.start(again=op)

    def arm(self) -> None:
        """Retry the operation if nothing is heard by its deadline (later after each retry)."""
        c = self.sim.config
        self.op["deadline"] = self.sim.tick + c.retry_ticks * min(1 << self.op["retries"], c.retry_backoff_max)

    def on_tick(self, may_start: bool) -> None:
        sim = self.sim
        for co in list(self.background.values()):
            if sim.tick % (sim.config.retry_ticks * sim.config.retry_backoff_max) == 0:
                self.propose(co, co.proposals())
        op = self.op
        if op is None:
            if may_start and sim.tick >= self.idle_until:
                self.start()
            return
        if sim.tick < op["deadline"]:
            return
        op["retries"] += 1
        if op["phase"] == "read":
            self.send_reads()
        elif op["phase"] == "lock":
            self.send_locks()
        elif op["phase"] == "confirm":
            self.send_confirm()
        elif op.get("single") is not None:
            sim.send(op["single"])
            self.arm()
        else:
            self.propose(op["coordinator"], op["coordinator"].proposals())


class BankSimulation:
    def __init__(self, config: BankConfig) -> None:
        self.rng = random.Random(config.seed)
        if config.swarm:
            config = swarm(config, self.rng)
        self.config = config
        self.tick = 0
        self._seq = 0
        self._ids = 0
        self.faults = True
        self.queue: list = []
        self.trace = Trace(config.trace_lines, config.verbose)
        self.accounts = [b"acct%02d" % i for i in range(config.accounts)]
        self.shard_of = {k: i % config.shards for i, k in enumerate(self.accounts)}
        self.total = INITIAL_BALANCE * config.accounts
        self.shards = [Shard(self, s, [k for k in self.accounts if self.shard_of[k] == s])
                       for s in range(config.shards)]
        self.processes = [Process(self, p) for p in range(config.processes)]
        self.coordinator_of: dict = {}  # txn id -> its coordinator shard
        self.one_round_participants: dict = {}  # txn id -> participants, of a one-round one
        self.carried_out: dict = {}  # txn id -> {shard: outcome} of the resolves applied
        self.told: dict = {}  # txn id -> the outcome its client was told
        self.unknown: set = set()  # transactions whose client died before hearing
        self.completed = 0

    # ------------------------------------------------------------------ plumbing
    def next_id(self) -> int:
        self._ids += 1
        return self._ids

    def log(self, line: str) -> None:
        self.trace.add(self.tick, line)

    def fail(self, why: str) -> None:
        raise BankFailure(why)

    def recorded_decision(self, txn_id: bytes) -> int | None:
        shard = self.coordinator_of.get(txn_id)
        return None if shard is None else self.shards[shard].decisions.decisions.get(txn_id)

    def implied(self, txn_id: bytes) -> int | None:
        """The outcome a one-round transaction's votes imply (kvstore.txn.coordinator): COMMIT
        once every participant holds its yes vote (or carried out COMMIT), ABORT once one is
        finished there as ABORT (it voted no or was fenced), else None (or not one-round)."""
        participants = self.one_round_participants.get(txn_id)
        if participants is None:
            return None
        states = []
        for s in participants:
            part = self.shards[s].participant
            held = part.prepared.get(txn_id)
            states.append(COMMIT if (held is not None and held.one_round) else part.finished.get(txn_id))
        if ABORT in states:
            return ABORT
        return COMMIT if all(state == COMMIT for state in states) else None

    def outcome_of(self, txn_id: bytes) -> int | None:
        """The recorded decision, or else what the one-round votes imply."""
        recorded = self.recorded_decision(txn_id)
        return recorded if recorded is not None else self.implied(txn_id)

    def check_locks(self, shard: Shard) -> None:
        held: dict = {}
        for txn_id, p in shard.participant.prepared.items():
            for key, _ in (*p.reads, *p.writes):
                other = held.setdefault(key, txn_id)
                if other != txn_id:
                    self.fail(f"isolation: s{shard.id} holds {other!r} and {txn_id!r} prepared on {key!r}")

    def send(self, m) -> None:
        c = self.config
        rng = self.rng
        if self.faults and rng.random() < c.drop_rate:
            self.log(f"drop {m}")
            return
        copies = 1
        if self.faults and rng.random() < c.duplicate_rate:
            copies += 1 + rng.randrange(3)
        for copy in range(copies):
            spread = c.delay_max_ticks if copy == 0 else max(c.delay_max_ticks, c.duplicate_spread_ticks)
            self._seq += 1
            heapq.heappush(self.queue, (self.tick + 1 + rng.randrange(spread), self._seq, m))

    def _deliver(self, m) -> None:
        if isinstance(m, Answer):
            self.answer(m)
            return
        if m.tag[0] == "implied":  # the node carries it out as it records it, quorum or not
            self.resolve_everywhere(m, m.entry.outcome)
        shard = self.shards[m.to]
        if shard.down_until > self.tick:
            return  # no quorum: the proposal is lost
        self.log(f"s{m.to} applies {m.entry!r} for {m.frm}")
        result = shard.apply(m.entry)
        self.carry_out(m, result)
        self.send(Answer(m.frm, m.tag, result))

    def carry_out(self, m: Propose, result) -> None:
        """A decision request (a process's decide, confirm or release, or a resolver's decide)
        was recorded: the node that recorded it, not the process, resolves it on every
        participant (kvstore.node.loop ``_on_decide``), whether or not its answer arrives."""
        if m.tag[0] in DECISION_REQUESTS and m.tag[0] != "implied":
            self.resolve_everywhere(m, result)

    def resolve_everywhere(self, m: Propose, outcome: int) -> None:
        _kind, txn_id, participants = m.tag
        for shard in participants:
            self.send(Propose(shard, ("resolver", m.to), ("resolve", txn_id, shard),
                              TxnResolve(txn_id, outcome)))

    def answer(self, m: Answer) -> None:
        """What a shard's log answered reaches its proposer (a process's dead run hears nothing)."""
        if m.to[0] == "resolver":
            # its decisions are carried out where they are recorded (``carry_out``); a
            # recovery's fences and decision go on from what they answered
            self.shards[m.to[1]].on_answer(m)
            return
        process = self.processes[m.to[0]]
        if process.up and process.incarnation == m.to[1]:
            process.on_answer(m)

    # ------------------------------------------------------------------ run
    def _faults(self) -> None:
        c = self.config
        rng = self.rng
        for shard in self.shards:
            if shard.down_until <= self.tick and rng.random() < c.outage_rate:
                shard.down_until = self.tick + 1 + rng.randrange(c.outage_ticks_max)
                shard.lose_volatile()
                self.log(f"OUTAGE s{shard.id} until t{shard.down_until}")
        self._process_faults()

    def _process_faults(self) -> None:
        """Coordinator processes crash (losing all they hold) and come back later."""
        c = self.config
        rng = self.rng
        for p in self.processes:
            if p.up and rng.random() < c.crash_rate:
                p.crash()
                p.down_until = self.tick + 1 + rng.randrange(c.down_ticks_max)
            elif not p.up and self.tick >= p.down_until:
                self.log(f"RESTART p{p.id}")
                p.restart()

    def _step(self, may_start: bool) -> None:
        self.tick += 1
        if self.faults:
            self._faults()
        while self.queue and self.queue[0][0] <= self.tick:
            _, _, m = heapq.heappop(self.queue)
            self._deliver(m)
        for shard in self.shards:
            if shard.down_until <= self.tick:
                shard.resolve_expired(self.tick)
        for p in self.processes:
            if p.up:
                p.on_tick(may_start)

    def _quiet(self) -> bool:
        return (all(p.op is None and not p.background for p in self.processes if p.up)
                and all(not s.participant.prepared for s in self.shards))

    def _heal(self) -> None:
        self.faults = False
        for shard in self.shards:
            shard.down_until = -1
        for p in self.processes:
            if not p.up:
                p.restart()
        self.log("HEAL everything; liveness phase")

    def _stuck(self) -> str:
        stuck = [(s.id, sorted(s.participant.prepared)) for s in self.shards if s.participant.prepared]
        return f"still prepared: {stuck}; ops: {[p.op and p.op['kind'] for p in self.processes]}"

    def run(self) -> None:
        while self.tick < self.config.ticks:
            self._step(True)
        self._heal()
        liveness_ticks = self.liveness_ticks()
        end = self.tick + liveness_ticks
        while not self._quiet():
            if self.tick >= end:
                self.fail(f"liveness: {liveness_ticks} ticks after the heal, {self._stuck()}")
            self._step(False)
        self.check_end()

    def liveness_ticks(self) -> int:
        return self.config.liveness_ticks

    def check_end(self) -> None:
        for shard in self.shards:
            if shard.participant.locks:
                self.fail(f"liveness: s{shard.id} still locks {sorted(shard.participant.locks)}")
        for txn_id, by_shard in self.carried_out.items():
            recorded = self.outcome_of(txn_id)
            participants = None
            for shard in self.shards:
                if txn_id in shard.participant.finished:
                    participants = participants or set()
                    participants.add(shard.id)
            if any(outcome != recorded for outcome in by_shard.values()):
                self.fail(f"atomicity: {txn_id!r} carried out {by_shard}, recorded {recorded}")
            if recorded == COMMIT:
                missing = [s for s, out in ((s.id, s.participant.finished.get(txn_id)) for s in self.shards)
                           if s in (participants or ()) and out != COMMIT]
                if missing:
                    self.fail(f"atomicity: {txn_id!r} committed but not carried out at {missing}")
        for txn_id, outcome in self.told.items():
            recorded = self.recorded_decision(txn_id)
            if recorded is not None and recorded != outcome:
                self.fail(f"decision: {txn_id!r}'s client was told {outcome}, the record says {recorded}")
            participants = self.one_round_participants.get(txn_id, ())
            if outcome == COMMIT and any(self.shards[s].participant.finished.get(txn_id) != COMMIT
                                         for s in participants):
                self.fail(f"atomicity: {txn_id!r}'s client was told COMMIT, carried out as "
                          f"{[self.shards[s].participant.finished.get(txn_id) for s in participants]}")
        total = sum(int(v) for s in self.shards for _, v in s.data.values())
        if total != self.total:
            self.fail(f"atomicity: the accounts hold {total}, not {self.total}")


def _bug_flags(bugs: TxnBugs) -> str:
    return "".join(f" --txn-bug {f.name}" for f in fields(bugs) if getattr(bugs, f.name))


def run_bank_seed(config: BankConfig) -> tuple[bool, str]:
    return run_bank(BankSimulation(config), f"bank seed {config.seed}",
                    f"python -m kvstore.sim --bank --model --seed {config.seed}{_bug_flags(config.bugs)} --verbose")


def run_bank(sim: BankSimulation, title: str, reproduce: str, expected=BankFailure) -> tuple[bool, str]:
    """Run one bank simulation; ``(True, summary)`` or ``(False, report with replay command and trace)``."""
    try:
        sim.run()
    except Exception as e:  # noqa: BLE001 - a crash of the core is a finding like any other
        return False, failure_report(title, e, expected, reproduce, sim.trace)
    committed = sum(1 for o in sim.told.values() if o == COMMIT)
    return True, (f"{title}: ok, {sim.completed} transactions answered "
                  f"({committed} committed), {len(sim.unknown)} left to the resolvers")
