# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled twin of kvstore/_native/quorum_py.py: phase-2 and phase-1 vote tallies.

``QuorumTally`` keeps one 64-bit vote mask per in-flight slot in a ring of
``window`` entries indexed by ``slot % window``; the commit index advancing
clears the masks it passes, so the window slides without copying.
"""

from libc.stdint cimport uint64_t, int64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memset

DEF MAX_NODES_C = 64
MAX_NODES = 64


def majority(num_nodes):
    """Votes needed among ``num_nodes``."""
    return num_nodes // 2 + 1


cdef inline int popcount(uint64_t x) noexcept nogil:
    return __builtin_popcountll(x)


cdef extern from *:
    int __builtin_popcountll(unsigned long long) nogil


cdef void check_nodes(object num_nodes) except *:
    if not (1 <= num_nodes <= MAX_NODES_C):
        raise ValueError(f"num_nodes must be 1..{MAX_NODES_C}, got {num_nodes}")


cdef class QuorumTally:
    """Per-slot acceptance votes for the slots in flight at one ballot.

    Invariant: every slot <= commit_index had a majority; slots in
    (commit_index, commit_index + window] have their votes in the ring.
    """

    cdef uint64_t *_votes
    cdef readonly int num_nodes
    cdef readonly int64_t window
    cdef readonly int quorum
    cdef public int64_t ballot  # ballots are round << 16 | node: non-negative, < 2**63
    cdef int64_t _commit

    def __cinit__(self, num_nodes, window=4096, ballot=0, commit_index=-1):
        self._votes = NULL

    def __init__(self, num_nodes, window=4096, ballot=0, commit_index=-1):
        check_nodes(num_nodes)
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.num_nodes = num_nodes
        self.window = window
        self.quorum = num_nodes // 2 + 1
        self._votes = <uint64_t *>calloc(window, sizeof(uint64_t))
        if self._votes == NULL:
            raise MemoryError()
        self.ballot = ballot
        self._commit = commit_index

    def __dealloc__(self):
        free(self._votes)

    @property
    def commit_index(self):
        return self._commit

    @commit_index.setter
    def commit_index(self, value):
        self._commit = value

    def reset(self, ballot, commit_index):
        """Forget all votes; count afresh at ``ballot`` above ``commit_index``."""
        memset(self._votes, 0, self.window * sizeof(uint64_t))
        self.ballot = ballot
        self._commit = commit_index

    def record(self, int node, int64_t first_slot, int64_t last_slot, int64_t ballot):
        """``node`` accepted slots ``first_slot..last_slot`` (inclusive) at ``ballot``."""
        if node < 0 or node >= self.num_nodes:
            raise ValueError(f"node {node} out of range for {self.num_nodes} nodes")
        self._record(node, first_slot, last_slot, ballot)
        return self._commit

    def record_many(self, acks):
        """Record a sequence of ``(node, first_slot, last_slot, ballot)`` acknowledgements
        in one call (say, every Accepted drained from a socket in one poll), in order;
        returns the commit index. A bad node anywhere raises before any is counted.
        """
        cdef int node
        cdef int64_t first_slot, last_slot, ballot
        acks = acks if type(acks) is list or type(acks) is tuple else list(acks)
        for ack in acks:
            node = ack[0]
            if node < 0 or node >= self.num_nodes:
                raise ValueError(f"node {node} out of range for {self.num_nodes} nodes")
        for ack in acks:
            node, first_slot, last_slot, ballot = ack
            self._record(node, first_slot, last_slot, ballot)
        return self._commit

    cdef inline void _record(self, int node, int64_t first_slot, int64_t last_slot,
                             int64_t ballot) noexcept:
        if ballot != self.ballot:
            return
        cdef int64_t window = self.window
        cdef int64_t lo = first_slot if first_slot > self._commit + 1 else self._commit + 1
        cdef int64_t hi = last_slot if last_slot < self._commit + window else self._commit + window
        cdef uint64_t bit = (<uint64_t>1) << node
        cdef int64_t slot, i
        cdef uint64_t *votes = self._votes
        slot = lo
        while slot <= hi:
            votes[slot % window] |= bit
            slot += 1
        while True:
            i = (self._commit + 1) % window
            if popcount(votes[i]) < self.quorum:
                break
            votes[i] = 0
            self._commit += 1

    def votes(self, int64_t slot):
        """Bitmask of nodes that accepted ``slot`` at the current ballot (in window only)."""
        if slot <= self._commit or slot > self._commit + self.window:
            return 0
        return self._votes[slot % self.window]


cdef class PromiseTally:
    """Promises (phase 1b) for one ballot; ``record`` says when a majority is in."""

    cdef readonly int num_nodes
    cdef readonly int quorum
    cdef public int64_t ballot
    cdef uint64_t _granted

    def __init__(self, num_nodes, ballot=0):
        check_nodes(num_nodes)
        self.num_nodes = num_nodes
        self.quorum = num_nodes // 2 + 1
        self.ballot = ballot
        self._granted = 0

    @property
    def granted(self):
        return self._granted

    def reset(self, ballot):
        self.ballot = ballot
        self._granted = 0

    def record(self, int node, int64_t ballot):
        """Count ``node``'s promise if it is for the current ballot; True once a majority."""
        if node < 0 or node >= self.num_nodes:
            raise ValueError(f"node {node} out of range for {self.num_nodes} nodes")
        if ballot == self.ballot:
            self._granted |= (<uint64_t>1) << node
        return popcount(self._granted) >= self.quorum

    @property
    def has_majority(self):
        return popcount(self._granted) >= self.quorum
