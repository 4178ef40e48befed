"""The node's lease expiry (``kvstore.node.leases.LeaseExpiry``) on a clock the test moves:
deadlines noted at apply, only the leader proposes, never before the deadline, a new
leader acts on its own deadlines, a restart gives a full ttl, retries."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

from conftest import ManualClock
from kvstore.commands import LOCKED, LeaseExpire
from kvstore.node.leases import LEASE_RETRY_SECONDS, LeaseExpiry
from kvstore.node.ports import NO_BUGS


class FakeNode(LeaseExpiry):
    """What ``LeaseExpiry`` uses of ``Node``: a clock, the storage's leases, the replicas'
    roles, and ``_own_write`` (recorded here instead of proposed)."""

    def __init__(self, records=(), shards: int = 2, leader=(True, True)) -> None:
        self.clock = ManualClock()
        self.bugs = NO_BUGS
        self.nshards = shards
        self.name = "n1"
        self.counters = Counter()
        self.replicas = [SimpleNamespace(is_leader=leader[s]) for s in range(shards)]
        self.storage = SimpleNamespace(leases=lambda shard: list(records) if shard == 0 else [])
        self.proposed: list = []
        self._init_leases()

    def _own_write(self, shard, command, callback, on_failure=None) -> None:
        self.proposed.append((shard, command, callback))

    def applied(self, shard: int, *events) -> None:
        """A save whose entries granted/refreshed (id, ttl_ms, revision) or ended (id)."""
        self._note_leases([SimpleNamespace(shard=shard, snapshot=None, lease_events=[
            e if type(e) is tuple else (e, None, None) for e in events])])

    def at(self, now: float) -> list:
        self.clock.now = now
        self.proposed.clear()
        self._expire_leases(now)
        return [(s, c) for s, c, _ in self.proposed]


def test_the_leader_proposes_an_expiry_at_the_deadline_never_before():
    node = FakeNode()
    node.applied(0, (7, 1000, 5))  # granted at revision 5, applied at t = 100
    assert node.at(100.999) == []
    assert node.at(101.0) == [(0, LeaseExpire(13, 7, 5))]


def test_a_keepalive_moves_the_deadline_and_an_ended_lease_is_forgotten():
    node = FakeNode()
    node.applied(0, (7, 1000, 5))
    node.clock.now = 100.6
    node.applied(0, (7, 1000, 9))  # refreshed at revision 9
    assert node.at(101.2) == []
    assert node.at(101.6) == [(0, LeaseExpire(13, 7, 9))]
    node.applied(0, 7)  # the expiry (or a revoke) applied
    assert node.at(105) == []


def test_a_follower_never_proposes_and_acts_on_its_own_deadlines_once_leader():
    node = FakeNode(leader=(False, False))
    node.applied(1, (7, 1000, 5))
    assert node.at(101.5) == []  # due, but not the leader
    node.replicas[1].is_leader = True
    assert node.at(101.51) == [(1, LeaseExpire(13, 7, 5))]


def test_a_restart_gives_every_lease_a_full_ttl():
    node = FakeNode(records=[(7, 2000, 5), (8, 500, 6)])  # started at t = 100
    assert node.at(100.49) == []
    assert node.at(100.5) == [(0, LeaseExpire(13, 8, 6))]
    node.applied(0, 8)
    assert node.at(101.99) == []
    assert [c.lease_id for _s, c in node.at(102.0)] == [7]


def test_an_expiry_not_applied_is_proposed_again_and_a_locked_one_too():
    node = FakeNode()
    node.applied(0, (7, 1000, 5))
    assert len(node.at(101.0)) == 1
    assert node.at(101.0 + LEASE_RETRY_SECONDS / 2) == []  # in flight
    proposed = node.at(101.0 + LEASE_RETRY_SECONDS)  # lost: again
    assert proposed == [(0, LeaseExpire(13, 7, 5))]
    node.proposed[0][2](LOCKED)  # a prepared transaction holds a key: tried again later
    assert node.at(101.0 + 2 * LEASE_RETRY_SECONDS) == [(0, LeaseExpire(13, 7, 5))]
    node.proposed[0][2](1)
    node.applied(0, 7)
    assert node.at(110) == []
    assert node.counters["leases_expired"] == 1
