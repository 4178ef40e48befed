"""A stale pre-vote grant lets a rejoining node depose a healthy leader (found by the
real-process partition tests, ``tests/test_cluster_partitions.py``, scenario one_way).

Fixed: a pre-vote reply echoes the attempt's nonce, and a pre-candidate counts only
grants to its current attempt (it starts a new one every election timeout).

The smallest reproduction, on the pure core over the in-memory network: node 2 leads
and is cut off; node 1, which has lost it too, grants node 2's pre-vote, but the grant
is held by the network (on real nodes: a TCP segment that the partition dropped and
TCP retransmits after the heal). Nodes 0 and 1 elect 0 at ballot 2.0. After the heal
the grant arrives: node 2, still a pre-candidate at the same round, counts it as a
majority and campaigns for real at ballot 2.2. Nodes 0 and 1 refuse its Prepare
(leader stickiness), but node 2 has promised itself 2.2, rejects leader 0's next
heartbeat with that hint, and leader 0 steps down (``_on_accepted``): a healthy leader
deposed by a rejoining node, which pre-vote exists to prevent.
"""

from __future__ import annotations

import pytest

from kvstore.paxos import ballot_round
from kvstore.paxos import messages as M
from kvstore.sim.network import Cluster


def _last(c: Cluster, kind: int, frm: int, to: int):
    return [m for m in c.sent if m.type == kind and m.frm == frm and m.to == to][-1]


def test_control_without_the_late_grant_the_healthy_leader_stays():
    """The same script without the held grant: the leader elected meanwhile stays."""
    c, lead, _grant = _partition_and_elect_with_a_held_grant()
    c.heal()
    c.tick(c.replicas[0].config.election_timeout_ticks)
    assert c.leaders() == [lead]


def test_a_pre_vote_grant_delivered_after_the_heal_does_not_depose_the_healthy_leader():
    c, lead, grant = _partition_and_elect_with_a_held_grant()
    c.heal()
    c.replicas[2].step(grant)  # held by the network through the partition
    c.deliver()
    c.tick(c.replicas[0].config.election_timeout_ticks)
    assert c.leaders() == [lead]


def _partition_and_elect_with_a_held_grant():
    """Leader 2 cut off; 1 grants 2's pre-vote (the grant held); 0 and 1 elect 0."""
    c = Cluster(3, seed=1)
    c.campaign(2)
    assert c.leaders() == [2]
    timeout = c.replicas[0].config.election_timeout_ticks
    c.isolate(2)
    for _ in range(3 * timeout):  # 1 loses the leader (0, not ticked, still follows 2)
        c.tick(1, nodes=[1])
        if c.replicas[1].leader is None:
            break
    assert c.replicas[1].leader is None
    for _ in range(4 * timeout):  # 2 steps down (check quorum) and pre-votes
        c.tick(1, nodes=[2])
        if c.replicas[2].role == "pre-candidate":
            break
    assert c.replicas[2].role == "pre-candidate"
    c.replicas[1].step(_last(c, M.PRE_VOTE, 2, 1))  # it reaches 1 (2's packets get out)
    c.deliver()
    grant = _last(c, M.PRE_VOTE_REPLY, 1, 2)  # the answer does not get back (yet)
    assert not grant.reject
    for _ in range(10 * timeout):  # 0 and 1 elect a leader among themselves; 2, cut off,
        c.tick(1)                    # tries again and again (each attempt its own nonce)
        if any(i != 2 for i in c.leaders()):
            break
    for _ in range(2 * timeout):  # at least one attempt of 2's after the one granted
        c.tick(1, nodes=[2])
    lead = next(i for i in c.leaders() if i != 2)
    assert ballot_round(c.replicas[lead].ballot) == ballot_round(grant.ballot)
    assert c.replicas[lead].ballot < grant.ballot  # 2.0 < 2.2: the ballot 2 will campaign at
    assert c.replicas[2].role == "pre-candidate"
    return c, lead, grant
