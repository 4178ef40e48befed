"""What a node counts for its operator, and the view of it its loop publishes.

The loop (one thread) owns ``NodeStats`` and adds to it where a request is answered,
a leader changes or a snapshot moves: an integer add, or a ``Histogram.observe``
(a ``bisect`` and two adds), never a lock. Every ``PUBLISH_EVERY_SECONDS`` the loop
rolls the window of active clients (``NodeStats.roll``) and builds ``view(node, now)`` (copies: plain lists, ints, the node's status) and hands
it to ``Node.publish`` if set (``kvstore-server --metrics``: ``kvstore.ops.http``),
whose thread reads only that. A node without ``--metrics`` counts the same and
publishes nothing.
"""

from __future__ import annotations

from kvstore.ops.histogram import REQUEST_BUCKETS, Histogram
from kvstore.transport import wire

#: How often the loop publishes its view (``Node.publish``).
PUBLISH_EVERY_SECONDS = 0.1
#: A client counts as active for this long after its last request.
CLIENT_WINDOW_SECONDS = 10.0

#: Request kinds, as counted (``hello`` counts as ``status``; anything else as ``other``).
OPS = (wire.OP_GET, wire.OP_SCAN, wire.OP_WRITE, wire.OP_DECIDE, wire.OP_WATCH, wire.OP_STATUS,
       "other")
OP_INDEX = {op: i for i, op in enumerate(OPS)} | {wire.OP_HELLO: OPS.index(wire.OP_STATUS)}
OTHER = OPS.index("other")
#: Outcomes, indexed by the reply's ``wire.STATUS_*`` code.
OUTCOMES = {wire.STATUS_OK: "ok", wire.STATUS_NOT_LEADER: "not_leader",
            wire.STATUS_ERROR: "error", wire.STATUS_RETRY: "retry",
            wire.STATUS_OK_FORWARDED: "forwarded"}
#: Requests whose latency is measured (those answered through a wait: reads, writes).
TIMED_OPS = (wire.OP_GET, wire.OP_SCAN, wire.OP_WRITE)


class NodeStats:
    """The loop's counts (the module docstring). Lists indexed by ``OP_INDEX`` and
    status code, or by shard."""

    def __init__(self, nshards: int) -> None:
        self.requests = [[0] * len(OUTCOMES) for _ in OPS]
        self.latency = {op: Histogram(REQUEST_BUCKETS) for op in TIMED_OPS}
        self.leader_changes = [0] * nshards
        self.snapshots_installed = [0] * nshards
        self.snapshots_taken = [0] * nshards
        self.txn_prepares = 0
        self.txn_decisions = {"commit": 0, "abort": 0}
        self.clients: set = set()  # routing ids seen in the current window
        self.clients_before = 0  # how many the last full window saw
        self.window_ends = 0.0

    def count(self, op: str, status: int) -> None:
        """One request answered (or forwarded) with ``status``."""
        self.requests[OP_INDEX.get(op, OTHER)][status] += 1

    def roll(self, now: float) -> None:
        """Start a new window of active clients once the current one is over (the loop
        calls it every ``PUBLISH_EVERY_SECONDS``, published or not: the set stays bounded
        by the clients of one window)."""
        if now >= self.window_ends:
            self.clients_before, self.clients = len(self.clients), set()
            self.window_ends = now + CLIENT_WINDOW_SECONDS


def view(node, now: float) -> dict:
    """What the loop publishes: a copy of everything an operator reads, taken in the loop
    thread (so consistent with one turn) and never touched again by it."""
    st = node.stats
    status = node.status()
    for s, shard in enumerate(status["shards"]):
        r = node.replicas[s]
        shard["snapshots_sent"] = r.snapshots_sent
        shard["snapshots_installed"] = st.snapshots_installed[s]
        shard["snapshots_taken"] = st.snapshots_taken[s]
        shard["leader_changes"] = st.leader_changes[s]
    storage = node.storage
    wal = getattr(storage, "wal", None)
    checkpointer = getattr(storage, "checkpointer", None)
    return {
        "at": now,
        "status": status,
        "requests": {(op, OUTCOMES[code]): n for op, row in zip(OPS, st.requests)
                     for code, n in enumerate(row) if n},
        "latency": {op: h.snapshot() for op, h in st.latency.items()},
        "txn_prepares": st.txn_prepares,
        "txn_decisions": dict(st.txn_decisions),
        "clients": max(st.clients_before, len(st.clients)),
        "waiting": {"writes": len(node.waiting_writes), "reads": len(node.waiting_reads),
                    "forwarded": len(node._forwarded)},
        "fsync": wal.sync_latency.snapshot() if wal is not None else None,
        "log_bytes": wal.size_bytes() if wal is not None else None,
        "log_appended_bytes": wal.appended_bytes if wal is not None else None,
        "checkpoint": (checkpointer.latency.snapshot() if checkpointer is not None else None),
    }
