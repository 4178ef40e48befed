"""A tiny in-memory network of replicas for scenario tests (etcd raft's ``network``).

Messages are delivered only when the test says ``deliver()``; ``cut``, ``isolate``,
``crash`` and ``restart`` shape what gets through. The driver contract is the
real one: persist (here: into a ``PersistedState`` per node), then send, then apply.

Memberships: ``Cluster(n, nodes=N)`` has room for N nodes of which the first n form the
bootstrap membership; the others start with ``join(i)`` (an empty disk, told the current
membership, as a node started with ``--join`` is). Each node keeps the membership as of
its applied point (``Entry.membership``, ``Snapshot.membership``) on its "disk", as the
real node keeps it in the shard's state.
"""

from __future__ import annotations

import random

from kvstore.paxos.replica import Config, PersistedState, Replica


class Cluster:
    def __init__(self, n: int, seed: int = 0, nodes: int | None = None, oracle=None, **config) -> None:
        """``oracle``: a ``kvstore.sim.oracle.Oracle`` told what every node persists, sends,
        applies, and how it restarts (its checks run after every step), or None."""
        self.oracle = oracle
        self.bootstrap = n
        self.n = n = max(n, nodes or n)
        self.rng = random.Random(seed)
        self.config = config
        self.disks = [PersistedState() for _ in range(n)]
        self.records: list = [dict() for _ in range(n)]  # slot -> record, per node
        self.replicas: list = [None] * n
        self.applied: list = [[] for _ in range(n)]  # Entry lists
        self.reads: list = [[] for _ in range(n)]
        self.snapshots: list = [[] for _ in range(n)]
        self.dropped: list = [[] for _ in range(n)]
        self.dropped_reads: list = [[] for _ in range(n)]
        self.memberships: list = [[] for _ in range(n)]  # Ready.membership, in order
        self.inbox: list = []
        self.cut_links: set = set()
        self.sent: list = []  # every message sent, for assertions
        for i in range(self.bootstrap):
            self.restart(i)
        self.deliver()  # a new cluster: its nodes find a majority holds no state, and vote

    # ------------------------------------------------------------------ topology
    def cut(self, a: int, b: int) -> None:
        self.cut_links |= {(a, b), (b, a)}

    def isolate(self, i: int) -> None:
        for j in range(self.n):
            if j != i:
                self.cut(i, j)

    def heal(self) -> None:
        self.cut_links = set()

    def crash(self, i: int) -> None:
        self.replicas[i] = None
        self.inbox = [m for m in self.inbox if m.to != i]

    def restart(self, i: int) -> Replica:
        d = self.disks[i]
        d.records = [self.records[i][s] for s in sorted(self.records[i])]
        cfg = Config(node=i, num_nodes=self.bootstrap, rng=self.rng, **self.config)
        self.replicas[i] = Replica(cfg, PersistedState(d.promised, d.commit_index, list(d.records),
                                                       d.snapshot_index, d.snapshot_data,
                                                       membership=d.membership))
        self.applied[i] = []
        self._restarted(i)
        return self.replicas[i]

    def _restarted(self, i: int) -> None:
        if self.oracle is not None:
            r = self.replicas[i]
            self.oracle.recovered(i, r.log, r.commit_index)
            self.oracle.restarted(i, r)

    def join(self, i: int, membership) -> Replica:
        """Start node ``i`` with an empty disk, told ``membership`` (the cluster's current one,
        in which it is a learner) as its bootstrap."""
        self.disks[i] = PersistedState(membership=membership)  # as ``--join`` keeps it
        self.records[i] = {}
        cfg = Config(node=i, num_nodes=self.bootstrap, rng=self.rng, membership=membership, **self.config)
        self.replicas[i] = Replica(cfg, PersistedState())
        self.applied[i] = []
        if self.oracle is not None:
            self.oracle.wiped(i)
        self._restarted(i)
        return self.replicas[i]

    def wipe(self, i: int) -> None:
        """Node ``i`` loses its disk (it restarts empty with ``restart``)."""
        self.crash(i)
        self.disks[i] = PersistedState()
        self.records[i] = {}
        if self.oracle is not None:
            self.oracle.wiped(i)

    # ------------------------------------------------------------------ driving
    def process(self) -> None:
        """Carry out every pending Ready: persist, then send, then apply."""
        for i, r in enumerate(self.replicas):
            while r is not None and r.has_ready():
                rd = r.ready()
                d = self.disks[i]
                if rd.promised is not None:
                    d.promised, d.commit_index = rd.promised, rd.commit_index
                for rec in rd.records:
                    self.records[i][int.from_bytes(rec[8:16], "little")] = rec
                if rd.snapshot is not None:
                    d.snapshot_index, d.snapshot_data = rd.snapshot.index, rd.snapshot.data
                    if rd.snapshot.membership is not None:
                        d.membership = rd.snapshot.membership
                    self.snapshots[i].append(rd.snapshot)
                if rd.compacted_through is not None:
                    for s in [s for s in self.records[i] if s <= rd.compacted_through]:
                        del self.records[i][s]
                o = self.oracle
                if o is not None:
                    o.synced(i, r, d.commit_index, rd.records)
                    for e in rd.committed:
                        held = r.log.get(e.slot)
                        if held is not None:
                            o.applied(i, e.slot, held[1], held[2])
                for m in rd.messages:
                    if o is not None:
                        o.sent(i, m)
                    self.sent.append(m)
                    if (m.frm, m.to) not in self.cut_links and self.replicas[m.to] is not None:
                        self.inbox.append(m)
                self.applied[i].extend(rd.committed)
                for e in rd.committed:  # (re-applied after a restart: never back to an older one)
                    if e.membership is not None and (d.membership is None
                                                     or e.membership.epoch > d.membership.epoch):
                        d.membership = e.membership
                if rd.membership is not None:
                    self.memberships[i].append(rd.membership)
                self.reads[i].extend(rd.reads)
                self.dropped[i].extend(rd.dropped_commands)
                self.dropped_reads[i].extend(rd.dropped_reads)
                r.advance(rd)

    def deliver(self, max_rounds: int = 1000) -> None:
        """Deliver messages until none are left (including those they cause)."""
        for _ in range(max_rounds):
            self.process()
            if not self.inbox:
                return
            batch, self.inbox = self.inbox, []
            for m in batch:
                r = self.replicas[m.to]
                if r is not None and (m.frm, m.to) not in self.cut_links:
                    r.step(m)
                    if self.oracle is not None:
                        self.oracle.check(m.to, r)
        raise AssertionError("messages did not settle")

    def tick(self, ticks: int = 1, nodes=None) -> None:
        for _ in range(ticks):
            for i in (range(self.n) if nodes is None else nodes):
                if self.replicas[i] is not None:
                    self.replicas[i].tick()
            self.deliver()

    def campaign(self, i: int) -> None:
        self.replicas[i].campaign()
        self.deliver()

    def propose(self, i: int, *commands: bytes) -> None:
        for c in commands:
            assert self.replicas[i].propose(c), f"n{i} refused a proposal"
        self.deliver()

    def leaders(self) -> list:
        return [i for i, r in enumerate(self.replicas) if r is not None and r.is_leader]

    def commands(self, i: int) -> list:
        """Commands node ``i`` applied since it (re)started, in order."""
        return [c for e in self.applied[i] for c in e.commands]
