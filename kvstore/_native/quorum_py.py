"""Pure-Python reference of the quorum-tally kernel (twin of ``_ext/quorum.pyx``).

Phase 2: for a window of in-flight slots above the commit index, a bitmask of
the nodes that accepted each slot at the current ballot. ``record`` adds a
node's acceptance of a run of slots and returns the commit index: the highest
slot such that it and every slot below it has a majority at one ballot.
Votes at any other ballot are ignored; the ring slides as the commit index
moves, without copying.

Phase 1: ``PromiseTally`` counts promises for one ballot.
Nodes are indexes 0..63.
"""

from __future__ import annotations

MAX_NODES = 64


def majority(num_nodes: int) -> int:
    """Votes needed among ``num_nodes``."""
    return num_nodes // 2 + 1


def _check_nodes(num_nodes: int) -> None:
    if not (1 <= num_nodes <= MAX_NODES):
        raise ValueError(f"num_nodes must be 1..{MAX_NODES}, got {num_nodes}")


class QuorumTally:
    """Per-slot acceptance votes for the slots in flight at one ballot.

    Invariant: every slot <= commit_index had a majority; slots in
    (commit_index, commit_index + window] have their votes in the ring.
    """

    def __init__(self, num_nodes: int, window: int = 4096, ballot: int = 0,
                 commit_index: int = -1) -> None:
        _check_nodes(num_nodes)
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.num_nodes = num_nodes
        self.window = window
        self.quorum = majority(num_nodes)
        self._votes = [0] * window
        self.ballot = ballot
        self.commit_index = commit_index

    def reset(self, ballot: int, commit_index: int) -> None:
        """Forget all votes; count afresh at ``ballot`` above ``commit_index``."""
        self._votes = [0] * self.window
        self.ballot = ballot
        self.commit_index = commit_index

    def record(self, node: int, first_slot: int, last_slot: int, ballot: int) -> int:
        """``node`` accepted slots ``first_slot..last_slot`` (inclusive) at ``ballot``."""
        if not (0 <= node < self.num_nodes):
            raise ValueError(f"node {node} out of range for {self.num_nodes} nodes")
        if ballot != self.ballot:
            return self.commit_index
        lo = max(first_slot, self.commit_index + 1)
        hi = min(last_slot, self.commit_index + self.window)
        bit = 1 << node
        window = self.window
        votes = self._votes
        for slot in range(lo, hi + 1):
            votes[slot % window] |= bit
        quorum = self.quorum
        while True:
            nxt = self.commit_index + 1
            i = nxt % window
            if bin(votes[i]).count("1") < quorum:
                break
            votes[i] = 0
            self.commit_index = nxt
        return self.commit_index

    def record_many(self, acks) -> int:
        """Record a sequence of ``(node, first_slot, last_slot, ballot)`` acknowledgements
        in one call (say, every Accepted drained from a socket in one poll), in order;
        returns the commit index. A bad node anywhere raises before any is counted.
        """
        acks = acks if type(acks) in (list, tuple) else list(acks)
        for ack in acks:
            if not (0 <= ack[0] < self.num_nodes):
                raise ValueError(f"node {ack[0]} out of range for {self.num_nodes} nodes")
        record = self.record
        for node, first_slot, last_slot, ballot in acks:
            record(node, first_slot, last_slot, ballot)
        return self.commit_index

    def votes(self, slot: int) -> int:
        """Bitmask of nodes that accepted ``slot`` at the current ballot (in window only)."""
        if slot <= self.commit_index or slot > self.commit_index + self.window:
            return 0
        return self._votes[slot % self.window]


class PromiseTally:
    """Promises (phase 1b) for one ballot; ``record`` says when a majority is in."""

    def __init__(self, num_nodes: int, ballot: int = 0) -> None:
        _check_nodes(num_nodes)
        self.num_nodes = num_nodes
        self.quorum = majority(num_nodes)
        self.ballot = ballot
        self.granted = 0

    def reset(self, ballot: int) -> None:
        self.ballot = ballot
        self.granted = 0

    def record(self, node: int, ballot: int) -> bool:
        """Count ``node``'s promise if it is for the current ballot; True once a majority."""
        if not (0 <= node < self.num_nodes):
            raise ValueError(f"node {node} out of range for {self.num_nodes} nodes")
        if ballot == self.ballot:
            self.granted |= 1 << node
        return bin(self.granted).count("1") >= self.quorum

    @property
    def has_majority(self) -> bool:
        return bin(self.granted).count("1") >= self.quorum
