"""A lease holder in the simulation of real nodes (``realnode.py``, ``--leases``): it grants
a lease on every shard, attaches a key to it, keeps it alive every ttl / 3 through the
faults, and dies at a tick its own random stream draws. ``LeaseCheck`` watches every
node's saves (the lease's grants, refreshes and its end, as each node applies them) and
checks the expiry guarantee (docs/leases.md) under the seed's faults:

- never early: the lease ends on a shard (any node applies its LeaseExpire) no earlier
  than ttl after the first send of every grant or keep-alive the holder saw acknowledged
  by that shard
  (a node's deadline is its apply time + ttl, and it applied the command after it was
  sent; every node reads the same simulated clock);
- not late: it has ended by the end of the run, and no later than ttl after the last
  refresh any node applied or the last (re)start of any node, or once the cluster
  settled after the faults, whichever is latest, + an election timeout + the leader's
  retry period (``LEASE_RETRY_SECONDS``) + a few ticks;
- every replica deletes the key: it is absent from every node's state at the end.

Its requests go straight into the network queue from its own random stream, as the
read prober's do, and it is off by default: the seeds without it run as before.
"""

from __future__ import annotations

import heapq
import random

from kvstore import commands
from kvstore.node.leases import LEASE_RETRY_SECONDS
from kvstore.sharding import shard_of
from kvstore.transport import wire
from kvstore.transport.sockets import CLIENT

#: The holder's key (not one of the register clients' KEYS: its deletion is no client op).
LEASED_KEY = b"leased"
LEASE_ID = 4242


class LeaseHolder:
    """The simulated process holding a lease (the module docstring)."""

    def __init__(self, sim, index: int, tick: float) -> None:
        self.sim = sim
        self.index = index
        self.identity = b"lease-holder"
        self.client_id = b"sim-lease-holder"
        self.rng = random.Random(sim.config.seed * 3 + 7)
        c = sim.config
        self.ttl_ticks = self.rng.choice((16, 32, 64))
        self.ttl_ms = round(self.ttl_ticks * tick * 1000)
        self.dies_at = self.rng.randint(c.ticks // 5, c.ticks * 4 // 5)
        shards = list(range(c.shards))
        self.todo = ([commands.lease_grant(LEASE_ID, self.ttl_ms) for _ in shards]
                     + [commands.put_lease(LEASED_KEY, b"held", LEASE_ID)])
        self.todo_shards = shards + [shard_of(LEASED_KEY, c.shards)]
        self.seq = 0
        self.request_ids = 0
        self.op: dict | None = None
        self.next_keepalive = None
        #: per shard: the first send tick of every op acknowledged there
        self.acknowledged: dict = {s: [] for s in shards}
        self.gone = False  # the holder learned its lease was gone (or never put its key)

    def on_tick(self, may_start: bool) -> None:
        sim = self.sim
        if sim.now >= self.dies_at or self.gone:
            self.op = None  # dead: what it sent may still arrive and apply
            return
        if self.op is None:
            if not self.todo and sim.now >= self.next_keepalive:
                self.todo = [commands.lease_keepalive(LEASE_ID)
                             for _ in range(sim.config.shards)]
                self.todo_shards = list(range(sim.config.shards))
            if self.todo:
                self.seq += 1
                self.request_ids += 1
                shard = self.todo_shards.pop(0)
                command = self.todo.pop(0)
                self.op = {"id": self.request_ids, "first": sim.now, "sent": None,
                           "args": [shard, self.client_id, self.seq, self.seq, list(command)],
                           "kind": command[0], "target": self.rng.randrange(sim.config.nodes)}
                self.send()
        elif sim.now - self.op["sent"] >= sim.config.client_retry_ticks:
            self.op["target"] = self.rng.randrange(sim.config.nodes)
            self.send()

    def send(self) -> None:
        sim, op = self.sim, self.op
        op["sent"] = sim.now
        frame = wire.encode_request(op["id"], wire.OP_WRITE, op["args"])
        sim.sequence += 1
        heapq.heappush(sim.queue, (sim.now + 1 + self.rng.randint(0, 2), sim.sequence,
                                   ("node", op["target"]), CLIENT, self.identity, frame))

    def on_frame(self, frame: bytes) -> None:
        body = wire.decode(frame)
        for request_id, status, value in body[1]:
            op = self.op
            if op is None or request_id != op["id"]:
                continue
            if status == wire.STATUS_OK_FORWARDED:
                status, value = wire.STATUS_OK, value[0]
            if status == wire.STATUS_NOT_LEADER and type(value) is int:
                op["target"] = value
                self.send()
            elif status == wire.STATUS_OK:
                self.answered(op, value)
            # else: retried at the next retry tick

    def answered(self, op: dict, value) -> None:
        self.op = None
        sim = self.sim
        if value is True:  # a grant or a keep-alive: it refreshed the lease (a put does not)
            self.acknowledged[op["args"][0]].append(op["first"])
        elif not (op["kind"] == commands.OP_PUT_LEASE and value is None):  # it is gone
            self.gone = True
            sim.log(f"lease holder: lease gone ({op['kind']} -> {value!r})")
        if not self.todo:
            self.next_keepalive = sim.now + self.ttl_ticks // 3


class LeaseCheck:
    """What every node applied of the holder's lease, and the checks (module docstring)."""

    def __init__(self, sim, holder: LeaseHolder) -> None:
        self.sim = sim
        self.holder = holder
        #: per shard: tick of the last grant or keep-alive any node applied, and of the first
        #: apply of the lease's end
        self.last_refresh: dict = {}
        self.ended_at: dict = {}
        self.last_start = 0  # tick of the last (re)start of any node

    def started(self) -> None:
        self.last_start = self.sim.now

    def saved(self, writes: list) -> None:
        for w in writes:
            for lease_id, ttl_ms, _revision in w.lease_events:
                if lease_id != LEASE_ID:
                    continue
                if ttl_ms is not None:
                    self.last_refresh[w.shard] = self.sim.now
                elif w.shard not in self.ended_at:
                    self.ended_at[w.shard] = self.sim.now
                    self.check_not_early(w.shard)

    def check_not_early(self, shard: int) -> None:
        h, ended = self.holder, self.ended_at[shard]
        for first in h.acknowledged[shard]:
            if ended < first + h.ttl_ticks:
                self.sim.fail(f"lease {LEASE_ID} expired early on shard {shard}: at tick "
                              f"{ended}, a grant or keep-alive first sent at tick {first} "
                              f"was acknowledged (ttl {h.ttl_ticks} ticks)")
        self.sim.log(f"lease {LEASE_ID} ended on shard {shard} at tick {ended}")

    def check_end(self, settled_tick: int, tick: float) -> None:
        h, sim, c = self.holder, self.sim, self.sim.config
        retry = round(LEASE_RETRY_SECONDS / tick)
        for shard, refreshed in self.last_refresh.items():  # every shard that granted it
            ended = self.ended_at.get(shard)
            if ended is None:
                sim.fail(f"lease {LEASE_ID} (ttl {h.ttl_ticks} ticks) never expired on shard "
                         f"{shard}; its holder died at tick {h.dies_at}")
            bound = (max(refreshed + h.ttl_ticks, self.last_start + h.ttl_ticks, settled_tick)
                     + c.election_timeout_ticks + retry + 10)
            if ended > bound:
                sim.fail(f"lease {LEASE_ID} expired late on shard {shard}: at tick {ended}, "
                         f"bound {bound} (last refresh applied at {refreshed}, last node start "
                         f"at {self.last_start}, settled at {settled_tick}, ttl {h.ttl_ticks})")
        for node in sim.nodes:
            shard = shard_of(LEASED_KEY, c.shards)
            if node.node.storage.get(shard, LEASED_KEY)[0] is not None:
                sim.fail(f"n{node.index} still holds {LEASED_KEY!r} after its lease expired")
