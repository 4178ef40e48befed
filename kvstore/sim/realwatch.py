"""Watchers in the real-node simulator: the watch stream checked through every fault.

A watcher does what ``kvstore.client``'s watch does over the wire: it long-polls
``OP_WATCH`` (``kvstore.transport.wire``) for every shard over the whole key
range, one poll per shard in flight, each to a node it picks (it moves now and
then on its own, and whenever a node is silent, refuses or has compacted the
revision it asks for), resuming from its position (``through + 1`` of the last
answer). Nodes crash, restart, lose their disks, install snapshots and get cut
off under it, exactly as for the register clients. Its draws come from a random
stream of its own, so adding watchers moves none of the seed's other draws.

Checks (``WatchChecks``), after every answer and at the end:

- **in order, once**: per watcher and shard, the revisions delivered strictly
  increase and none is below the position asked; a value the register clients
  wrote (each is unique) never reaches one watcher twice;
- **agreement**: whichever node answers, the events of a revision are the same
  (the first delivery of a revision, by any node to any watcher, is the
  reference every later one must equal);
- **from the log**: every event is the write of a command in the batch chosen
  at that slot (noted as each node's save applies it: ``note_entry``);
- **the bank's**: an account's event is a committed write (``Ledger.read``: one of a
  transfer whose abort was recorded is a dirty read), and counts as seen for the
  ledger's atomicity checks;
- **complete**: every write a register client saw acknowledged, and every write of
  a transfer that committed, reaches every
  watcher that covered its shard without a gap (a gap: every node had
  compacted the revision asked for; the watcher then moves to the oldest one
  any node still has, and that shard is no longer checked for completeness);
- **live**: once the faults stop, every watcher reaches every shard's applied
  point within the settle bound.
"""

from __future__ import annotations

import random

from kvstore.commands import Cas, Put, decode_logged_command
from kvstore.paxos.replica import KIND_BATCH
from kvstore.transport import wire
from kvstore.transport.sockets import CLIENT

#: Event types on the wire (``OP_WATCH``'s reply).
PUT, DELETE = 0, 1


class WatchFailure(Exception):
    """A watch check failed (the simulator reports it as a ``SimulationFailure``)."""


class Watcher:
    """One watcher of every shard, over the whole key range."""

    def __init__(self, sim, index: int, rng: random.Random) -> None:
        self.sim = sim
        self.index = index  # its place in ``sim.endpoints`` (replies find it there)
        self.identity = b"watcher-%d" % index
        self.rng = rng
        self.op = None  # never an operation the settle phase waits for
        n = sim.config.shards
        self.position = [1] * n  # per shard: the next revision to deliver
        self.polls: list = [None] * n  # per shard: {request_id, target, sent, wait_ticks}
        self.compacted: list = [set() for _ in range(n)]  # nodes that said "compacted" here
        self.gapped = [False] * n
        self.seen_values: list = [set() for _ in range(n)]
        self.request_ids = 0
        self.delivered = 0
        self.wait_ms = rng.choice((0, 30, 150))
        self.max_bytes = rng.choice((64, 1024, 1 << 20))

    # -- polling ---------------------------------------------------------------------------

    def poll(self, shard: int, target: int | None = None) -> None:
        sim = self.sim
        if target is None:
            target = self.rng.randrange(len(sim.nodes))
        self.request_ids += 1
        wait_ticks = int(self.wait_ms / 1000 / sim.clock_tick) + 1
        self.polls[shard] = {"request_id": self.request_ids, "target": target,
                             "sent": sim.now, "wait_ticks": wait_ticks}
        args = [shard, b"", None, self.position[shard], self.max_bytes, self.wait_ms, False]
        frame = wire.encode_request(self.request_ids, wire.OP_WATCH, args)
        sim.send(("client", self.index), ("node", target), CLIENT, self.identity, frame)

    def on_tick(self, may_start: bool) -> None:
        sim = self.sim
        for shard, poll in enumerate(self.polls):
            if poll is None:
                self.poll(shard)
            elif sim.now - poll["sent"] > poll["wait_ticks"] + sim.config.client_retry_ticks:
                self.poll(shard)  # silent (down, cut off, the frame lost): another node

    def on_frame(self, frame: bytes) -> None:
        body = wire.decode(frame)
        for request_id, status, value in body[1]:
            shard = next((s for s, p in enumerate(self.polls)
                          if p is not None and p["request_id"] == request_id), None)
            if shard is None:
                continue  # an answer to a poll already given up
            target = self.polls[shard]["target"]
            self.polls[shard] = None
            if status == wire.STATUS_OK:
                self.on_answer(shard, target, value)
            elif status == wire.STATUS_ERROR:
                raise WatchFailure(f"watcher {self.index}: a valid watch refused: {value}")
            # else (retry): the next tick polls another node

    def on_answer(self, shard: int, target: int, value) -> None:
        events, oldest, through, _current = value
        checks = self.sim.watch_checks
        if events is None:  # compacted on that node: ask the others first
            self.compacted[shard].add(target)
            live = {n.index for n in self.sim.nodes if n.up}
            if live <= self.compacted[shard]:
                self.gapped[shard] = True
                self.position[shard] = max(self.position[shard], oldest)
                self.compacted[shard].clear()
                self.sim.log(f"watcher {self.index}: shard {shard} compacted on every node; "
                             f"resumes at {self.position[shard]}")
            others = [i for i in range(len(self.sim.nodes)) if i not in self.compacted[shard]]
            self.poll(shard, self.rng.choice(others) if others else None)
            return
        self.compacted[shard].clear()
        position = self.position[shard]
        for revision, changes in events:
            if revision < position:
                raise WatchFailure(f"watcher {self.index}: shard {shard} revision {revision} "
                                   f"delivered again (or out of order): position {position}")
            checks.agree(shard, revision, changes, target)
            for change in changes:
                self.deliver(shard, revision, change)
            position = revision + 1
        if through + 1 < position:
            raise WatchFailure(f"watcher {self.index}: shard {shard}: an answer through "
                               f"{through} carries revision {position - 1}")
        self.position[shard] = through + 1
        if self.rng.random() < 0.8:  # stay on that node, mostly
            self.poll(shard, target)

    def deliver(self, shard: int, revision: int, change) -> None:
        kind, key, value, _prev = change
        self.delivered += 1
        if kind != PUT or value is None:
            return
        ledger = self.sim.ledger
        if ledger is not None and key in ledger.keys:
            ledger.read(key, value)  # a committed write: an aborted transfer's is a dirty one
        elif not self.sim.is_register_value(key, value):
            return
        seen = self.seen_values[shard]  # register values, and the bank's (balance:tag)
        if (key, value) in seen:
            raise WatchFailure(f"watcher {self.index}: the write of {value!r} to {key!r} "
                               f"delivered twice (again at revision {revision})")
        seen.add((key, value))

    def caught_up(self) -> bool:
        for shard, position in enumerate(self.position):
            applied = max(n.node.replicas[shard].applied_index for n in self.sim.nodes if n.up)
            if position < applied + 2:  # revision = slot + 1; position is the next one
                return False
        return True


class WatchChecks:
    """What every watcher's deliveries are checked against."""

    def __init__(self, sim) -> None:
        self.sim = sim
        self.reference: list = [{} for _ in range(sim.config.shards)]  # revision -> changes
        # per shard, slot -> the commands of the entry some node applied there (every node
        # applies the same: the agreement check); noted at each save, before a snapshot
        # can compact it away
        self.entries: list = [{} for _ in range(sim.config.shards)]

    def note_entry(self, shard: int, entry) -> None:
        if entry.kind == KIND_BATCH and entry.error is None:
            self.entries[shard].setdefault(entry.slot, entry.commands)

    def agree(self, shard: int, revision: int, changes: list, node: int) -> None:
        ref = self.reference[shard]
        first = ref.get(revision)
        if first is None:
            self.from_the_log(shard, revision, changes)
            ref[revision] = (changes, node)
        elif first[0] != changes:
            raise WatchFailure(f"agreement: shard {shard} revision {revision}: n{node} sent "
                               f"{changes!r}, n{first[1]} sent {first[0]!r}")

    def from_the_log(self, shard: int, revision: int, changes: list) -> None:
        commands = self.entries[shard].get(revision - 1)
        if commands is None:
            raise WatchFailure(f"shard {shard}: events at revision {revision}, but no node "
                               f"applied a batch at slot {revision - 1}")
        writes = set()
        for raw in commands:
            command = decode_logged_command(raw).command
            if type(command) is Put:
                writes.add((PUT, command.key, command.value))
            elif type(command) is Cas:
                writes.add((PUT, command.key, command.new) if command.new is not None
                           else (DELETE, command.key, None))
        for kind, key, value, _prev in changes:
            if not self.sim.is_register_key(key):
                continue  # bank and lease keys: written by transactions and expiry
            if (kind, key, value) not in writes:
                raise WatchFailure(f"shard {shard} revision {revision}: an event "
                                   f"{(kind, key, value)!r} no command of slot "
                                   f"{revision - 1} wrote")

    def check_complete(self, watchers: list) -> None:
        """Every write a register client saw acknowledged reached every watcher that has no
        gap on its shard."""
        for op in self.sim.history:
            if op.ret is None:
                continue  # given up: it may or may not have taken effect
            if op.kind == "put":
                value = op.args[0]
            elif op.kind == "cas" and op.result is True and op.args[1] is not None:
                value = op.args[1]
            else:
                continue
            self.must_have_reached(watchers, op.key, value, "acknowledged write")
        ledger = self.sim.ledger
        if ledger is not None:  # and every write of every transfer that committed
            for tag, writes in ledger.writes.items():
                if ledger.outcome.get(tag) == "committed":
                    for key, value in writes.items():
                        self.must_have_reached(watchers, key, value,
                                               f"committed transfer {tag}'s write")

    def must_have_reached(self, watchers: list, key: bytes, value: bytes, what: str) -> None:
        shard = self.sim.shard_of(key)
        for w in watchers:
            if not w.gapped[shard] and (key, value) not in w.seen_values[shard]:
                raise WatchFailure(f"watcher {w.index} never received the {what} of "
                                   f"{value!r} to {key!r} (shard {shard})")


__all__ = ["Watcher", "WatchChecks", "WatchFailure"]
