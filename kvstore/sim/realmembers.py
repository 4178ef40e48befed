"""Membership changes in the simulation of real nodes (``python -m kvstore.sim --members``).

An operator changes the members while the faults strike, one change at a time, as a
person at ``kvstore member`` would: add a node as a learner and start it empty with
what ``kvstore-server --join`` starts with, promote it once ``member list`` says it is
caught up, remove a voter (sometimes the leader) and then stop its node; never fewer
than ``MIN_VOTERS`` voters nor more than ``MAX_VOTERS``. A command that fails (a
leader lost, a timeout, "not caught up") is run again later, as the docs tell the
operator: the commands finish what is not done.

The commands are ``kvstore.client.members.Members``' own code, not a copy: it runs over
``SimCore``, a client core of the simulated network. ``Members`` calls block, and the
simulation has no threads, so a command is run again from its start at every tick:
each call returns the answer it got the first time, or sends its request (once) and
ends that run (``Pending``) until an answer or its deadline comes. The calls are
deterministic given their answers (checked: a run that asks something else than the
one before is a failure of the simulator).

Node indexes: ``member add`` numbers a new node (above every index in use, or the lowest
free one past 63); the simulation makes room for it as it joins. An index a removed node
had may go to a new node (a new machine: a new name, new addresses, an empty disk).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from types import SimpleNamespace

from kvstore.client.members import LEARNER, Members
from kvstore.errors import InvalidArgument, KVError, Timeout
from kvstore.transport import wire
from kvstore.transport.sockets import CLIENT

MIN_VOTERS = 3
MAX_VOTERS = 5


class Pending(Exception):
    """The command waits for an answer; it runs again from its start at the next tick."""


class NotDeterministic(Exception):
    """A command's run asked something other than its run before (a simulator bug)."""


def client_address(name: str) -> str:
    """Where node ``name`` takes clients, in the simulation's address plan."""
    return f"tcp://{name}.sim:7000"


def peer_address(name: str) -> str:
    return f"tcp://{name}.sim:17000"


@dataclass
class SimCall:
    request_id: int
    op: str
    shard: object
    payload: list
    target: str | None  # an address: the call goes there only
    deadline: int  # tick
    node: int | None = None  # where its last attempt went
    sent: int = 0
    outcome: tuple | None = None  # ("ok", value) | ("error", exception)


class SimCore:
    """What ``Members`` uses of ``kvstore.client.core``'s core (``call``, ``submit``,
    ``wait``), answering as the real one does: a redirect is followed, a retry or
    silence is tried again elsewhere (at the same address if one was named), a refusal
    is ``InvalidArgument`` (or ``KVError``), a deadline passed is ``Timeout``."""

    def __init__(self, operator: "Operator") -> None:
        self.operator = operator
        self.calls: list = []
        self.position = 0

    def submit(self, op: str, shard, payload, timeout=None, target=None) -> SimCall:
        i = self.position
        self.position += 1
        if i < len(self.calls):
            call = self.calls[i]
            if (call.op, call.shard, call.payload, call.target) != (op, shard, payload, target):
                raise NotDeterministic(f"call {i} of the operator's command was {call.op} "
                                       f"{call.payload!r:.80}, now {op} {payload!r:.80}")
            return call
        call = self.operator.new_call(op, shard, payload, timeout, target)
        self.calls.append(call)
        return call

    def wait(self, call: SimCall):
        if call.outcome is None:
            raise Pending
        kind, value = call.outcome
        if kind == "error":
            raise value
        return value

    def call(self, op: str, shard, payload, timeout=None, target=None):
        return self.wait(self.submit(op, shard, payload, timeout, target))


def _joining(view, name: str):
    """``view`` for ``--join name`` (``kvstore.server.join``): it must name the node, else the
    join is refused (the members answering may be behind the change; it is run again)."""
    if view.index_of(name) is None:
        raise InvalidArgument(f"{name} is no member of the cluster as the nodes that answered "
                              f"see it: add it first")
    return view


class Stage:
    """One ``Members`` command (``run(members)``), replayed until it returns or raises."""

    def __init__(self, what: str, run) -> None:
        self.what = what
        self.run = run
        self.core: SimCore | None = None


class Operator:
    """The operator actor: one command at a time (``on_tick``), its own random stream."""

    #: per tick, when idle in the fault phase: the chance a new change begins
    CHANGE_RATE = 0.1
    #: ticks between a failed command and its next run
    BACKOFF_TICKS = 20

    def __init__(self, sim, index: int, rng: random.Random) -> None:
        self.sim = sim
        self.index = index
        self.identity = b"operator"
        self.rng = rng
        self.request_ids = 0
        self.stage: Stage | None = None
        self.command: tuple | None = None  # (kind, name): retried until done
        self.not_before = 0
        self.joined = 0  # names given to new nodes: j0, j1, ...
        self.done: list = []  # completed commands, for the summary
        self.failures = 0
        self.leaders_removed = 0  # removals chosen while the node led shard 0

    # ------------------------------------------------------------------ the network
    def new_call(self, op, shard, payload, timeout, target) -> SimCall:
        self.request_ids += 1
        ticks = int((timeout or 5.0) / self.sim.clock_tick)
        # the client's deadlines are seconds of a real network; here, at most what a client
        # waits before it gives up (a command then runs again)
        ticks = min(ticks, self.sim.config.client_give_up_ticks)
        call = SimCall(self.request_ids, op, shard, payload, target, self.sim.now + ticks)
        self.send(call)
        return call

    def send(self, call: SimCall, node: int | None = None) -> None:
        sim = self.sim
        if node is None:
            if call.target is not None:
                node = sim.address_index.get(call.target)
            else:  # one of the addresses the operator knows (``--cluster ADDRS``)
                known = sorted(sim.address_index.values())
                node = known[self.rng.randrange(len(known))]
        call.node, call.sent = node, sim.now
        if node is not None:
            sim.send(("client", self.index), ("node", node), CLIENT, self.identity,
                     wire.encode_request(call.request_id, call.op, call.payload))

    def pending_calls(self) -> list:
        return [c for c in (self.stage.core.calls if self.stage and self.stage.core else [])
                if c.outcome is None]

    def on_frame(self, frame: bytes) -> None:
        body = wire.decode(frame)
        calls = {c.request_id: c for c in self.pending_calls()}
        for request_id, status, value in body[1]:
            call = calls.get(request_id)
            if call is None or call.outcome is not None:
                continue
            if status == wire.STATUS_OK:
                call.outcome = ("ok", value)
            elif status == wire.STATUS_OK_FORWARDED:
                call.outcome = ("ok", value[0])
            elif status == wire.STATUS_ERROR:
                name, message = (value + [None, None])[:2] if isinstance(value, list) \
                    else (None, value)
                cls = InvalidArgument if name == "InvalidArgument" else KVError
                call.outcome = ("error", cls(f"server refused the request: {message}"))
            elif status == wire.STATUS_NOT_LEADER and type(value) is int \
                    and value != call.node and call.target is None:
                self.send(call, value)
            # else: retried at its next attempt

    # ------------------------------------------------------------------ the commands
    def idle(self) -> bool:
        return self.command is None

    def on_tick(self, may_start: bool) -> None:
        sim = self.sim
        for call in self.pending_calls():
            if sim.now >= call.deadline:
                call.outcome = ("error", Timeout(f"no answer to {call.op} within the deadline"))
            elif sim.now - call.sent >= sim.config.client_retry_ticks:
                self.send(call)
        if self.command is None:
            if may_start and sim.phase == "faults" and self.rng.random() < self.CHANGE_RATE:
                self.command = ("choose", None)
                self.stage = None
            else:
                return
        if sim.now < self.not_before:
            return
        if self.stage is None:
            self.stage = self.stage_of(self.command)
        stage = self.stage
        if stage.core is None:
            stage.core = SimCore(self)
        stage.core.position = 0
        # an operator's `kvstore --timeout 0.5 member ...`: a `member list` of a node that is
        # not there yet (a new one, before it joins) waits no longer
        members = Members(SimpleNamespace(_core=stage.core, timeout=0.5))
        result = None
        try:
            result = stage.run(members)
        except Pending:
            return
        except NotDeterministic as e:
            sim.fail(f"operator: {e}")
        except KVError as e:
            if self.command[0] == "remove" and isinstance(e, InvalidArgument) \
                    and str(e).startswith("no member named"):
                # a remove run again after a run that did it all, its answer lost: done
                sim.log(f"operator: {stage.what}: {e}")
            else:
                self.failed(stage, e)
                return
        self.finished(stage, result)

    def stage_of(self, command: tuple) -> Stage:
        kind, name = command
        if kind == "choose":
            return Stage("member list", lambda m: m.view())
        if kind == "add":
            return Stage(f"member add {name}", lambda m: m.add(name, client_address(name),
                                                               peer_address(name)))
        if kind == "join":
            return Stage(f"--join {name}", lambda m: _joining(m.view(), name))
        if kind == "promote":
            return Stage(f"member promote {name}", lambda m: m.promote(name))
        return Stage(f"member remove {name}", lambda m: m.remove(name))

    def failed(self, stage: Stage, e: KVError) -> None:
        sim = self.sim
        self.failures += 1
        sim.log(f"operator: {stage.what} failed: {e}")
        self.stage = None
        self.not_before = sim.now + self.BACKOFF_TICKS
        kind = self.command[0]
        # a view or a promotion is given up once the faults stop (nothing half done: a
        # learner stays a learner); an add (and its join) or a remove is finished
        if kind == "choose" or (kind == "promote" and sim.phase != "faults"):
            self.command = None

    def finished(self, stage: Stage, result) -> None:
        sim = self.sim
        kind, name = self.command
        self.stage = None
        if kind == "choose":
            self.command = self.choose(result)
            if self.command is not None:
                sim.log(f"operator: {self.command[0]} {self.command[1]}")
            return
        sim.log(f"operator: {stage.what} done")
        if kind == "add":
            self.command = ("join", name)
            return
        if kind == "join":
            sim.join_node(name, result)
        elif kind == "remove":
            sim.retire_node(name)
        self.done.append(kind)
        self.command = None

    def choose(self, view) -> tuple | None:
        """The next change, from ``member list``: promote a learner once it is caught up
        (it is a learner of some shard); else add a node (while under ``MAX_VOTERS``
        voters) or remove a voter (while over
        ``MIN_VOTERS``), sometimes shard 0's leader."""
        rng = self.rng
        members = view.members()
        learners = sorted(i for i in members
                          if any(sh.role(i) == LEARNER for sh in view.shards))
        if learners:
            index = learners[0]
            if all(sh.role(index) != LEARNER or sh.caught_up(index) for sh in view.shards):
                return ("promote", members[index].name)
            return None
        voters = set().union(*(sh.voters for sh in view.shards))
        may_add = len(voters) < MAX_VOTERS
        may_remove = len(voters) > MIN_VOTERS
        if may_add and (not may_remove or rng.random() < 0.5):
            self.joined += 1
            return ("add", f"j{self.joined}")
        if may_remove:
            leader = view.shards[0].leader
            if leader in voters and leader in members and rng.random() < 0.35:
                self.sim.log(f"operator: n{leader} leads shard 0; it goes")
                self.leaders_removed += 1
                return ("remove", members[leader].name)
            index = sorted(voters & set(members))[rng.randrange(len(voters & set(members)))]
            return ("remove", members[index].name)
        return None

    def summary(self) -> str:
        counts = {k: self.done.count(k) for k in ("join", "promote", "remove")}
        return (f"; members: {counts['join']} added, {counts['promote']} promoted, "
                f"{counts['remove']} removed ({self.leaders_removed} chosen as a leader), "
                f"{self.failures} commands run again")
