"""A fake cluster answering ``OP_WATCH`` (and linearizable gets) per docs of issue 22,
standing in for ``ClientCore`` in the client watch and cache unit tests.

Each fake node keeps its own per-shard history (``(revision, [(type, key, value,
prev)])``), its applied point and its oldest revision, so nodes can lag, be compacted
differently, die or stall. Polls the node cannot answer yet are parked until
``step()`` finds something or ``expire()`` ends their wait (a progress report).
Routing imitates the engine: a poll with no target goes to the leader, or to the
next node that is up; ``kill(node)`` and ``stall(node)`` + ``fail_over(node)`` move
a node's outstanding polls elsewhere, as the engine's monitor and attempt timer do.
The first answer to a call wins (a later one is dropped, as the engine drops it).
"""

from __future__ import annotations

from concurrent.futures import Future

from kvstore.client.replies import check_watch
from kvstore.client.watch import OP_WATCH
from kvstore.errors import Unavailable
from kvstore.transport import wire


class FakeNode:
    def __init__(self, address: str, nshards: int) -> None:
        self.address = address
        self.history = {s: [] for s in range(nshards)}  # [(rev, [[t, k, v, p]...])]
        self.applied = {s: 0 for s in range(nshards)}
        self.oldest = {s: 1 for s in range(nshards)}
        self.data = {s: {} for s in range(nshards)}  # key -> (value, revision)
        self.up = True
        self.stalled = False
        self.current = True

    def apply(self, shard: int, revision: int, changes: list) -> None:
        assert revision > self.applied[shard]
        self.history[shard].append((revision, changes))
        for t, k, v, _ in changes:
            if t == 0:
                self.data[shard][k] = (v, revision)
            else:
                self.data[shard].pop(k, None)
        self.applied[shard] = revision

    def compact(self, shard: int, oldest: int) -> None:
        self.oldest[shard] = oldest
        self.history[shard] = [h for h in self.history[shard] if h[0] >= oldest]

    def answer(self, args, expired: bool):
        """The reply to a poll, or None to keep it parked."""
        shard, lo, hi, frm, max_bytes, wait_ms, prev = args
        oldest, applied = self.oldest[shard], self.applied[shard]
        if frm < oldest:
            return [None, oldest, applied, self.current]
        out, size, through = [], 0, applied
        for rev, changes in self.history[shard]:
            if rev < frm:
                continue
            mine = [[t, k, v, p if prev else None] for t, k, v, p in changes
                    if k >= lo and (hi is None or k < hi)]
            if not mine:
                continue
            if out and size > max_bytes:
                through = out[-1][0]
                break
            out.append([rev, mine])
            size += sum(len(k) + len(v or b"") for _, k, v, _ in mine)
        if not out and wait_ms > 0 and not expired:
            return None
        return [out, oldest, through, self.current]


class FakeCore:
    """Enough of ``ClientCore`` for ``WatchPoller``: ``submit``, ``nodes``, ``timeout``."""

    def __init__(self, nnodes: int = 3, nshards: int = 1) -> None:
        self.nodes = [f"tcp://127.0.0.1:{7001 + i}" for i in range(nnodes)]
        self.fake = {a: FakeNode(a, nshards) for a in self.nodes}
        self.leader = self.nodes[0]
        self.timeout = 5.0
        self.nshards = nshards
        self.revision_hook = None
        self._closed = False
        self.pending: list = []  # [future, op, args, node address, target]
        self.polls: list = []  # every poll submitted: (args, target)
        self.statuses = 0  # OP_STATUS calls (a watch from now asks where the shards stand)
        self.leaders: dict = {}

    # -- ClientCore's surface --------------------------------------------------------------
    def submit(self, op, shard, payload, timeout=None, target=None, attempt=None) -> Future:
        f = Future()
        if op == wire.OP_STATUS:
            self.statuses += 1
        else:
            self.polls.append((list(payload), target))
        node = target if target is not None else self._route()
        self.pending.append([f, op, payload, node, target])
        self.step()
        return f

    def _route(self, avoid=None) -> str:
        if self.fake[self.leader].up and self.leader != avoid:
            return self.leader
        for a in self.nodes:
            if self.fake[a].up and a != avoid:
                return a
        return None

    # -- the test's levers --------------------------------------------------------------------
    def write(self, shard: int, changes: list, nodes=None) -> int:
        """Apply one revision on ``nodes`` (default: every node that is up)."""
        rev = max(n.applied[shard] for n in self.fake.values()) + 1
        for a in (nodes or [a for a in self.nodes if self.fake[a].up]):
            self.fake[a].apply(shard, rev, changes)
        self.step()
        return rev

    def catch_up(self, address: str) -> None:
        """``address`` applies what the most advanced node has."""
        node = self.fake[address]
        best = max(self.fake.values(), key=lambda n: sum(n.applied.values()))
        for s, hist in best.history.items():
            for rev, changes in hist:
                if rev > node.applied[s]:
                    node.apply(s, rev, changes)
        self.step()

    def step(self, expired=()) -> None:
        """Answer every outstanding call a node can answer now (and end the waits of
        the parked polls in ``expired``)."""
        progress = True
        while progress:
            progress = False
            for p in list(self.pending):
                f, op, args, node, _ = p
                if f.done():
                    self.pending.remove(p)
                    continue
                if node is None:
                    continue
                n = self.fake[node]
                if not n.up or n.stalled:
                    continue
                if op == OP_WATCH:
                    reply = n.answer(args, any(p is e for e in expired))
                    if reply is None:
                        continue
                    check_watch(args, reply)  # the fake answers only what a node may
                elif op == wire.OP_STATUS:  # a slot is a revision - 1
                    reply = {"shards": [{"commit_index": n.applied[s] - 1}
                                        for s in range(self.nshards)]}
                elif op == wire.OP_GET:
                    value, rev = n.data[args[0]].get(args[1], (None, 0))
                    reply = [value, rev] if args[2] else value
                else:
                    raise AssertionError(op)
                self.pending.remove(p)
                f.set_result(reply)
                progress = True

    def expire(self) -> None:
        """Every parked poll's wait ends: a progress report."""
        self.step(expired=list(self.pending))

    def kill(self, address: str) -> None:
        """The node dies: its polls go elsewhere (the engine's monitor sees it)."""
        self.fake[address].up = False
        self.fail_over(address)

    def fail_over(self, address: str) -> None:
        """The engine gives up on ``address`` (dead, or silent past an attempt):
        polls routed by shard go to another node; polls aimed at it fail."""
        for p in list(self.pending):
            if p[3] == address and not p[0].done():
                if p[4] is not None:
                    self.pending.remove(p)
                    p[0].set_exception(Unavailable(f"{address} did not answer"))
                else:
                    p[3] = self._route(avoid=address)
        self.step()

    def outstanding(self) -> int:
        return sum(1 for p in self.pending if not p[0].done())
