"""The ports of a node (``kvstore.node.loop.Node``): what it touches of the outside world.

A node runs on ZeroMQ sockets and the system clock in production
(``NodeSockets``, ``SystemClock``); the deterministic simulator
(``kvstore.sim.realnode``) gives it an in-memory transport and a clock it
moves itself, and the write-ahead log its in-memory file twin
(``kvstore.sim.disk.FaultyFiles``, the log's ``files`` port), so that the node
it proves is the node that runs.

``NodeBugs`` plants bugs in the node and its storage, for the simulator to
show that its checks find them; production never sets one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

from kvstore.paxos.replica import Bugs

class Clock(Protocol):
    """Time as a node reads it."""

    def monotonic(self) -> float:
        """Seconds, never going back: ticks, timeouts, expiries."""

    def time(self) -> float:
        """Wall-clock seconds since the epoch: transaction deadlines (shared with clients)."""


class SystemClock:
    """The machine's clocks."""

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()


class Transport(Protocol):
    """What a node uses of its sockets (``kvstore.transport.sockets.NodeSockets``).

    ``recv_many`` returns what waits, without blocking, as ``(source, identity,
    frame)``: ``source`` the socket it came on (``sockets.CLIENT`` or
    ``sockets.PEER``). Sends never block: a frame that cannot go is dropped and
    counted. ``reply_room``/``charge`` bound what a client that does not read its
    replies costs; ``refusals`` names peers refused for their cluster shape;
    ``may_administer`` says whether a client frame read this turn may change the
    membership (its key is an admin's).
    """

    counters: dict
    refusals: dict

    def recv_many(self) -> list: ...

    def peer_index(self, identity: bytes) -> int: ...

    def send_peer(self, index: int, frame: bytes) -> bool: ...

    def peer_address_of(self, identity: bytes) -> str | None: ...

    def add_peer(self, index: int, address: str) -> None: ...

    def remove_peer(self, index: int) -> None: ...

    def reply(self, identity: bytes, items: list) -> None: ...

    def reply_room(self, identity: bytes) -> bool: ...

    def charge(self, identity: bytes, size: int) -> None: ...

    def reload_keys(self) -> None: ...

    def may_administer(self, identity: bytes) -> bool: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class NodeBugs:
    """Bugs the simulator plants in the node and its storage (``--node-bug``)."""

    #: answer a write whose entry this very save makes durable before its fsync
    answer_before_fsync: bool = False
    #: append a save's commit points in an append (fsync) of their own, before its records
    commit_point_before_records: bool = False
    #: skip the fdatasync of an append that holds a promise
    skip_promise_fsync: bool = False
    #: at recovery, replay the log from past the checkpoint's position (its first append
    #: after the checkpoint is skipped), not from the first record kept
    replay_past_checkpoint: bool = False
    #: answer a watch poll "through" the history's head even when its answer stopped
    #: short of it (at ``max_bytes``): the revisions between are skipped
    watch_through_head: bool = False
    #: keep a shard's watch history across a snapshot installed on it (not start it
    #: again after the snapshot): a poll is answered across the revisions it skipped
    watch_history_kept_over_snapshot: bool = False
    #: note a lease's deadline half a ttl after the grant or keep-alive is applied (a
    #: slip of units), so a keep-alive a little late finds the lease expired early
    lease_deadline_half_ttl: bool = False
    #: bugs planted in the Paxos core of every replica (``kvstore.paxos.replica.Bugs``)
    paxos: Bugs = field(default_factory=Bugs)


NO_BUGS = NodeBugs()
