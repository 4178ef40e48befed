"""Lease expiry: the leader's clock decides, the log carries it out. Part of ``Node``
(``kvstore.node.loop`` mixes it in), like the 2PC resolver.

Every node (followers too) records, for each lease whose grant or keep-alive it
applies, ``deadline = its monotonic clock (the clock port) at apply + ttl``
(``_note_leases``, after each save). Only a shard's leader acts: once a deadline
has passed it writes ``LeaseExpire(id, refreshed_revision)`` as its own write
(``_expire_leases``, every tick), which the state machine applies only if the
lease was not refreshed since that revision (``kvstore.machine.leases``): a
keep-alive that won the race keeps the lease, and every replica deletes the same
keys at the same slot.

Why never early: a holder's keep-alive is applied after it was sent, on every
node, so every node's deadline is at least the holder's send time + ttl (clocks
running at the same rate: the assumption docs/leases.md states). A node that
becomes leader acts on its own deadlines, which are no earlier. After a restart
a node knows no apply times: every lease gets a full ttl from the restart.

Why not late: the leader checks its deadlines every tick; a new leader, elected
within an election timeout of the old one's death, already holds deadlines for
every lease it applied and proposes what is due at once. So a dead holder's keys
vanish within ttl + one election timeout (+ a tick and a commit).
"""

from __future__ import annotations

import heapq
import logging

from kvstore.commands import LOCKED, lease_expire

log = logging.getLogger("kvstore.node")

#: An expiry proposed but not applied after this long (a lost proposal, a leader
#: change, a lock held by a prepared transaction) is proposed again.
LEASE_RETRY_SECONDS = 0.5


class LeaseExpiry:
    """The leader's lease expiry, a part of ``Node`` (the module docstring)."""

    def _init_leases(self) -> None:
        now = self.clock.monotonic()
        #: per shard: lease id -> (deadline, refreshed_revision)
        self._lease_deadlines: list = [{} for _ in range(self.nshards)]
        self._lease_heap: list = []  # (deadline, shard, lease id, revision); lazily stale
        #: per shard: lease id -> revision, deadlines passed (the leader expires these)
        self._leases_due: list = [{} for _ in range(self.nshards)]
        self._expiring: dict = {}  # (shard, lease id) -> monotonic time proposed
        for shard in range(self.nshards):
            self._reload_leases(shard, now)

    def _reload_leases(self, shard: int, now: float) -> None:
        """Every lease of ``shard`` from its state, each given a full ttl from ``now`` (a
        start, or a snapshot installed: no apply time is known)."""
        self._lease_deadlines[shard].clear()
        self._leases_due[shard].clear()
        for lease_id, ttl_ms, revision in self.storage.leases(shard):
            self._set_deadline(shard, lease_id, now + ttl_ms / 1000, revision)

    def _set_deadline(self, shard: int, lease_id: int, deadline: float, revision: int) -> None:
        self._lease_deadlines[shard][lease_id] = (deadline, revision)
        self._leases_due[shard].pop(lease_id, None)
        self._expiring.pop((shard, lease_id), None)
        heapq.heappush(self._lease_heap, (deadline, shard, lease_id, revision))

    def _note_leases(self, writes: list) -> None:
        """After a save: the deadlines of the leases its entries granted or refreshed
        (from this node's clock, now), and forget those that ended."""
        now = None
        for w in writes:
            if w.snapshot is not None:
                self._reload_leases(w.shard, self.clock.monotonic())
            for lease_id, ttl_ms, revision in w.lease_events:
                if now is None:
                    now = self.clock.monotonic()
                if ttl_ms is None:  # revoked or expired
                    self._lease_deadlines[w.shard].pop(lease_id, None)
                    self._leases_due[w.shard].pop(lease_id, None)
                    self._expiring.pop((w.shard, lease_id), None)
                else:
                    ttl = ttl_ms / (2000 if self.bugs.lease_deadline_half_ttl else 1000)
                    self._set_deadline(w.shard, lease_id, now + ttl, revision)

    def _expire_leases(self, now: float) -> None:
        """Move the leases whose deadline passed to the due list; on the shards this node
        leads, propose a LeaseExpire for each due one (again after
        ``LEASE_RETRY_SECONDS`` if it was not applied)."""
        heap, deadlines = self._lease_heap, self._lease_deadlines
        while heap and heap[0][0] <= now:
            deadline, shard, lease_id, revision = heapq.heappop(heap)
            if deadlines[shard].get(lease_id) == (deadline, revision):  # else stale
                self._leases_due[shard][lease_id] = revision
        for shard, due in enumerate(self._leases_due):
            if not due or not self.replicas[shard].is_leader:
                continue
            for lease_id, revision in due.items():
                since = self._expiring.get((shard, lease_id))
                if since is not None and now - since < LEASE_RETRY_SECONDS:
                    continue
                self._expiring[(shard, lease_id)] = now
                self.counters["lease_expiries_proposed"] += 1
                self._own_write(shard, lease_expire(lease_id, revision),
                                lambda result, s=shard, i=lease_id: self._expired(s, i, result),
                                lambda _status, _value: None)

    def _expired(self, shard: int, lease_id: int, result) -> None:
        """A LeaseExpire was applied: ``result`` is the keys deleted, False if the lease
        was refreshed meanwhile or gone (``_note_leases`` already knows), ``LOCKED``
        while a prepared transaction holds one of its keys (tried again later)."""
        if result == LOCKED:
            return
        self._expiring.pop((shard, lease_id), None)
        if type(result) is int:
            self.counters["leases_expired"] += 1
            log.info("shard %d: lease %d expired (%d key(s) deleted)", shard, lease_id, result,
                     extra={"event": "lease_expired", "node": self.name, "shard": shard,
                            "lease": lease_id, "keys": result})
