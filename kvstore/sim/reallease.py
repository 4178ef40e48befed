"""Lease holders in the real-node simulator: expiry checked against the clock's promise.

A lease client does what ``kvstore.client``'s ``Lease`` does over the wire, with
a client session like every writer: it grants a lease on its key's shard
(``LeaseGrant``), puts its key under it (``PutLease``), keeps it alive
(``LeaseKeepAlive``, every third of the TTL), and now and then revokes it
(``LeaseRevoke``) or dies: it stops keeping it alive and the shard's leader must
expire it (``LeaseExpire``, written by the node). Then it may start over with a
new lease. Its draws come from a stream of its own.

The holders also contend for one lock, as ``kvstore.recipes.Lock`` takes it: the
lock key created only if absent and held by the lease (``CasLease``), then read
with its revision: if it still holds the holder's value, that revision (the
acquiring write's) is the fencing token. A holder holds it from that read's answer
until it releases it (a compare-and-delete of its own value, or revoking its lease)
or until its lease's TTL after the last refresh it saw acknowledged was sent,
whichever is first (an acquisition whose read comes after that holds nothing).

Checks (``LeaseChecks``), after every step:

- **never early**: a lease whose last acknowledged refresh (grant or keep-alive)
  was *called* at time ``c`` never ends before ``c + ttl``: not on any node (its
  key, seen there, vanishes there only after that), and not in an answer (a
  keep-alive answered False, or a put answered ``NO_LEASE``, before that is a
  lease ended early). The node's deadlines run from when it applied the
  refresh, which is after the call, by its clock (the simulation's, shared);
- **the lock**: every acquisition's fencing token is above every earlier one, and
  none is acknowledged while another holder may still believe it holds the lock
  (its release not yet called, and its lease's TTL from its last acknowledged
  refresh not yet passed: the clock assumption);
- **not kept**: with no faults (the stable phase), the key of a dead holder is
  gone from its shard's leader at most ``ttl`` + one election timeout (and a
  few ticks to commit) after its last refresh was sent, or after the faults
  stopped if that is later (a leader elected in the faults may have granted a
  full TTL from its election: never early, at most that late).
"""

from __future__ import annotations

import random

from kvstore.commands import (NO_LEASE, cas, cas_lease, lease_grant, lease_keepalive, lease_revoke,
                              put_lease)
from kvstore.sim.endpoint import OneOpAtATime
from kvstore.transport import wire
from kvstore.transport.sockets import CLIENT

#: The lock the holders contend for (a key of its own, on one shard).
LOCK_KEY = b"lease-lock"

#: Ticks a commit and apply may take after the leader decides to expire, with no faults
#: (an Accept round trip, each way 0-1 tick, and the turns around it).
COMMIT_TICKS = 8


class LeaseFailure(Exception):
    """A lease check failed (reported as a simulation failure)."""


class LeaseClient(OneOpAtATime):
    """One holder of one lease at a time, on one key of its own."""

    def __init__(self, sim, index: int, rng: random.Random) -> None:
        self.sim = sim
        self.index = index
        self.identity = b"lease-client-%d" % index
        self.client_id = b"sim-lease-%d" % index
        self.rng = rng
        self.key = b"lease-key-%d" % index
        self.shard = sim.shard_of(self.key)
        self.seq = 0
        self.request_ids = 0
        self.target = rng.randrange(len(sim.nodes))
        self.op: dict | None = None
        self.lease: dict | None = None
        self.generation = 0
        # a multiple of 8 ticks: the TTL in milliseconds is then exact (a tick is 1/64 s)
        self.ttl_ticks = rng.choice((32, 48, 80))
        self.ttl_ms = self.ttl_ticks * 1000 // 64
        self.last_sent = -10**9  # the last time any refresh of the current lease was sent
        self.expired = 0
        self.revoked = 0
        self.lock: dict | None = None  # {"token", "value", "released"}: held (it believes)
        self.locks = 0

    # -- one operation at a time, as ``realnode.SimClient`` ---------------------------------

    def start(self, kind: str, command, shard: int | None = None) -> None:
        self.seq += 1
        args = [self.shard if shard is None else shard, self.client_id, self.seq, self.seq,
                list(command)]
        self.op = {"kind": kind, "args": args, "call": self.sim.now, "sent": None,
                   "request_id": None, "wire_op": wire.OP_WRITE}
        self.send()

    def read_lock(self, lock_value: bytes) -> None:
        """Read the lock key with its revision (after a ``CasLease`` that took it)."""
        args = [self.sim.shard_of(LOCK_KEY), LOCK_KEY, True]
        self.op = {"kind": "lockread", "args": args, "call": self.sim.now, "sent": None,
                   "request_id": None, "wire_op": wire.OP_GET, "lock_value": lock_value}
        self.send()

    def send(self) -> None:
        op = self.op
        if op["request_id"] is None:
            self.request_ids += 1
            op["request_id"] = self.request_ids
        op["sent"] = self.sim.now
        if op["kind"] in ("grant", "keepalive"):
            self.last_sent = self.sim.now
        frame = wire.encode_request(op["request_id"], op["wire_op"], op["args"])
        self.sim.send(("client", self.index), ("node", self.target), CLIENT, self.identity, frame)

    def refused(self, value) -> None:
        raise LeaseFailure(f"lease client {self.index}: a valid request refused: {value}")

    def retarget(self) -> None:
        self.target = self.rng.randrange(len(self.sim.nodes))

    def on_tick(self, may_start: bool) -> None:
        sim, c = self.sim, self.sim.config
        op = self.op
        if op is not None:
            if sim.now - op["call"] > c.client_give_up_ticks and sim.phase == "faults":
                self.op = None  # given up: applied or not, the checks only trust answers
                if op["kind"] in ("grant", "revoke"):
                    self.lease = None  # start over with a lease of its own
            elif sim.now - op["sent"] >= c.client_retry_ticks:
                self.target = self.rng.randrange(len(self.sim.nodes))
                self.send()
            return
        if not may_start:
            return
        lease = self.lease
        if lease is None:
            if self.rng.random() < 0.2:
                self.generation += 1
                self.lease = {"id": self.rng.randrange(1, 1 << 63), "refreshed": None,
                              "attached": False, "dead_at": None, "value": None}
                self.last_sent = sim.now
                self.start("grant", lease_grant(self.lease["id"], self.ttl_ms))
        elif lease["dead_at"] is not None:
            if self.sim.leases.gone_everywhere(self):
                self.lease = self.lock = None  # expired as it should: start over
        elif lease["refreshed"] is None:
            pass  # its grant was given up: wait for the lease to be dropped
        elif not lease["attached"]:
            lease["value"] = b"%d.%d.%d" % (self.index, self.generation, sim.now)
            self.start("put", put_lease(self.key, lease["value"], lease["id"]))
        elif self.rng.random() < 0.01:
            lease["dead_at"] = sim.now  # the holder dies: no keep-alive from now on
        elif self.lock is None and self.rng.random() < 0.05:
            lock_value = b"%d.%d.%d" % (self.index, self.generation, sim.now)
            self.start("lock", cas_lease(LOCK_KEY, None, lock_value, lease["id"]),
                       sim.shard_of(LOCK_KEY))
            self.op["lock_value"] = lock_value
        elif self.lock is not None and self.rng.random() < 0.03:
            self.lock["released"] = sim.now  # from the call on, it no longer uses the lock
            self.start("unlock", cas(LOCK_KEY, self.lock["value"], None), sim.shard_of(LOCK_KEY))
            sim.log(f"lease client {self.index}: dies holding lease {lease['id']:x}")
        elif self.rng.random() < 0.005:
            if self.lock is not None:
                self.lock["released"] = sim.now  # revoking its lease gives the lock up
            self.start("revoke", lease_revoke(lease["id"]))
        elif sim.now - lease["refreshed"] >= self.ttl_ticks // 3:
            self.start("keepalive", lease_keepalive(lease["id"]))

    def finish(self, result) -> None:
        op, self.op = self.op, None
        sim, lease, kind = self.sim, self.lease, op["kind"]
        sim.log(f"lease client {self.index}: {kind} -> {result!r}")
        if kind == "unlock":
            self.lock = None
            return
        if lease is None:
            return
        if kind == "lock":
            if result is True:
                self.read_lock(op["lock_value"])
            return
        if kind == "lockread":
            value, token = result
            if value == op["lock_value"] and lease["refreshed"] is not None and \
                    sim.now < lease["refreshed"] + self.ttl_ticks:
                self.sim.leases.acquired(self, token)
                self.lock = {"token": token, "value": op["lock_value"], "released": None}
                self.locks += 1
            return
        if kind == "grant":
            lease["refreshed"] = op["call"]
        elif kind == "keepalive" and result is True:
            lease["refreshed"] = op["call"]
        elif (kind == "keepalive" and result is False) or (kind == "put" and result == NO_LEASE):
            self.sim.leases.ended_in_answer(self, kind)
            self.expired += 1
            self.lease = None
            self.lock = None  # its lease is gone, so is the lock (it knows now)
        elif kind == "put":
            lease["attached"] = True
        elif kind == "revoke":
            self.revoked += 1
            self.lease = self.lock = None


class LeaseChecks:
    """The expiry checks, over every lease client, after every step."""

    def __init__(self, sim, clients: list) -> None:
        self.sim = sim
        self.clients = clients
        self.present: dict = {}  # (node index, incarnation, client index) -> value seen there
        self.last_token = 0  # the lock's last fencing token
        self.stable_since: int | None = None

    def acquired(self, client: LeaseClient, token: int) -> None:
        """``client`` was told it holds the lock, now, with ``token``."""
        now = self.sim.now
        if token <= self.last_token:
            raise LeaseFailure(f"lock: client {client.index} acquired it with fencing token "
                               f"{token}, not above the last one, {self.last_token}")
        self.last_token = token
        for other in self.clients:
            if other is client or other.lock is None:
                continue
            lease, released = other.lease, other.lock["released"]
            until = (lease["refreshed"] + other.ttl_ticks
                     if lease is not None and lease["refreshed"] is not None else -1)
            if released is not None:
                until = min(until, released)
            if until > now:
                raise LeaseFailure(
                    f"lock: client {client.index} acquired it (token {token}) at t{now} while "
                    f"client {other.index} holds it (token {other.lock['token']}) until "
                    f"t{until} by its lease")

    def ended_in_answer(self, client: LeaseClient, kind: str) -> None:
        lease = client.lease
        if lease["refreshed"] is not None and self.sim.now < lease["refreshed"] + client.ttl_ticks:
            raise LeaseFailure(
                f"lease {lease['id']:x} of client {client.index} ended early: a {kind} found "
                f"it gone at t{self.sim.now}, its last refresh was called at "
                f"t{lease['refreshed']} with a TTL of {client.ttl_ticks} ticks")

    def gone_everywhere(self, client: LeaseClient) -> bool:
        for node in self.sim.nodes:
            if node.up and self.value_on(node, client) is not None:
                return False
        return True

    def value_on(self, node, client: LeaseClient):
        got = node.node.storage.get(client.shard, client.key)
        return got[0] if type(got) is tuple else None

    def check_step(self) -> None:
        sim = self.sim
        if sim.phase == "stable" and self.stable_since is None:
            self.stable_since = sim.now
        for client in self.clients:
            lease = client.lease
            if lease is None or lease["value"] is None or lease["refreshed"] is None:
                continue
            if client.op is not None and client.op["kind"] == "revoke":
                continue
            for node in sim.nodes:
                if not node.up:
                    continue
                mark = (node.index, node.incarnation, client.index)
                value = self.value_on(node, client)
                if value == lease["value"]:
                    self.present[mark] = value
                elif self.present.get(mark) == lease["value"] and \
                        sim.now < lease["refreshed"] + client.ttl_ticks:
                    raise LeaseFailure(
                        f"lease {lease['id']:x} of client {client.index} ended early on "
                        f"n{node.index} at t{sim.now}: its last refresh was called at "
                        f"t{lease['refreshed']}, TTL {client.ttl_ticks} ticks")
            self.check_not_kept(client)

    def check_not_kept(self, client: LeaseClient) -> None:
        sim, lease = self.sim, client.lease
        if self.stable_since is None or lease["dead_at"] is None or not lease["attached"]:
            return
        c = sim.config
        bound = (max(client.last_sent, self.stable_since) + client.ttl_ticks
                 + c.election_timeout_ticks + COMMIT_TICKS)
        if sim.now <= bound:
            return
        leader = sim.leaders()[client.shard]
        if leader is None or self.value_on(sim.nodes[leader], client) != lease["value"]:
            return
        if any(client.client_id in item[5] for item in sim.queue):
            return  # a refresh of its is still on the way (sent in the faults, held long)
        raise LeaseFailure(
            f"lease {lease['id']:x} of client {client.index} outlived its TTL: its holder died "
            f"at t{lease['dead_at']}, its last refresh was sent at t{client.last_sent}, the "
            f"faults stopped at t{self.stable_since}; at t{sim.now} its key is still on the "
            f"leader n{leader} (TTL {client.ttl_ticks} + election "
            f"{c.election_timeout_ticks} + {COMMIT_TICKS} ticks)")

    def summary(self) -> str:
        return (f", leases: {sum(c.generation for c in self.clients)} granted, "
                f"{sum(c.locks for c in self.clients)} locks taken, "
                f"{sum(c.expired for c in self.clients)} found expired, "
                f"{sum(c.revoked for c in self.clients)} revoked")


__all__ = ["LeaseClient", "LeaseChecks", "LeaseFailure"]
