"""Membership changes in the simulation of real nodes (``python -m kvstore.sim --members``,
``kvstore/sim/realmembers.py``): an operator adds, promotes and removes members through
``kvstore.client.members`` while the faults strike; clean seeds pass every check, a core
that counts a learner's acceptance as a vote is caught, and the membership checks fail
where they must."""

from __future__ import annotations

import os
import re
from types import SimpleNamespace

import pytest

from kvstore.node.ports import NodeBugs
from kvstore.paxos.ballot import make_ballot
from kvstore.paxos.ballot import EPOCH_SHIFT
from kvstore.paxos.interface import Bugs, Membership
from kvstore.sim import realmembers
from kvstore.sim.realnode import RealNodeConfig, Simulation, SimulationFailure, run

#: Seeds a planted bug must be caught within.
BUG_SEEDS = 12


def _counts(text: str) -> dict:
    m = re.search(r"members: (\d+) added, (\d+) promoted, (\d+) removed \((\d+) chosen as a "
                  r"leader\)", text)
    assert m, text
    return dict(zip(("added", "promoted", "removed", "leaders"), map(int, m.groups())))


@pytest.mark.parametrize("nodes, seeds", [(3, (29, 34)), (5, (1, 5, 12))])
def test_membership_changes_under_faults_pass_every_check(nodes, seeds):
    """Linearizable histories, the oracles, agreement, and the members' own checks, with
    nodes added, promoted and removed (a leader among them: the 5-node seeds) amid crashes
    and partitions."""
    total = dict.fromkeys(("added", "promoted", "removed", "leaders"), 0)
    for seed in seeds:
        result = run(RealNodeConfig(seed=seed, nodes=nodes, membership_changes=True))
        assert result.ok, result.text
        for k, v in _counts(result.text).items():
            total[k] += v
    if nodes == 3:  # (a leader is removed in some 3-node seeds too, not in these two)
        total.pop("leaders")
    assert all(total.values()), total


def test_a_learner_counted_as_a_voter_is_caught_and_only_by_membership_changes():
    """``Bugs.learner_votes``: the leader counts a learner's acceptance towards a commit.
    The membership runs catch it (a slot applied that no majority of voters accepted);
    the same seeds without membership changes have no learner, and pass."""
    bugs = NodeBugs(paxos=Bugs(learner_votes=True))
    for seed in range(BUG_SEEDS):
        result = run(RealNodeConfig(seed=seed, nodes=3, membership_changes=True, bugs=bugs))
        if result.ok:
            continue
        first = result.text.splitlines()[0]
        assert any(s in first for s in ("commit:", "chosen value lost", "agreement")), first
        assert (f"python -m kvstore.sim --members --seed {seed} --nodes 3 --ticks 500 "
                f"--bug learner_votes --verbose") in result.text
        assert run(RealNodeConfig(seed=seed, nodes=3, bugs=bugs)).ok
        return
    pytest.fail(f"learner_votes was not caught in {BUG_SEEDS} membership seeds")


def test_a_membership_seed_replays_exactly():
    config = RealNodeConfig(seed=7, nodes=3, membership_changes=True, trace_lines=400)
    bugs = NodeBugs(paxos=Bugs(learner_votes=True))
    first, again = (run(RealNodeConfig(**{**config.__dict__, "bugs": bugs})) for _ in range(2))
    strip = lambda text: re.sub(r"/\S*/kvstore-sim-\w+", "DIR", text)  # noqa: E731
    assert strip(first.text) == strip(again.text)
    assert run(config).text == run(config).text


def _epoch_ballot(epoch: int, node: int) -> int:
    return make_ballot((epoch << EPOCH_SHIFT) | 1, node)


def test_only_a_voter_of_a_ballots_epoch_may_campaign():
    """``check_campaign``: a learner, or a node the change removed, campaigning at a ballot
    of an epoch it does not vote in, fails the run; a voter's campaign, or one of an epoch
    whose voters are not known yet, passes."""
    sim = SimpleNamespace(oracles=[SimpleNamespace(voters={0: frozenset({0, 1, 2}),
                                                           1: frozenset({0, 1, 3})})])
    Simulation.check_campaign(sim, 3, 0, _epoch_ballot(1, 3))
    Simulation.check_campaign(sim, 2, 0, _epoch_ballot(0, 2))
    Simulation.check_campaign(sim, 2, 0, _epoch_ballot(2, 2))  # epoch 2: not chosen yet
    with pytest.raises(SimulationFailure, match="n2 campaigned .* epoch 1's voters are"):
        Simulation.check_campaign(sim, 2, 0, _epoch_ballot(1, 2))
    with pytest.raises(SimulationFailure, match="n3 campaigned"):
        Simulation.check_campaign(sim, 3, 0, _epoch_ballot(0, 3))


def test_the_members_check_fails_a_disagreement_and_a_member_not_running():
    def node(index, membership):
        replica = SimpleNamespace(membership=membership)
        return SimpleNamespace(index=index, name=f"n{index}",
                               node=SimpleNamespace(replicas=[replica]))

    m1 = Membership(1, 10, (0, 1, 2), (), b"")
    m2 = Membership(2, 20, (0, 1, 2, 3), (), b"")
    sim = SimpleNamespace(config=SimpleNamespace(shards=1))
    sim.live = lambda: [node(0, m1), node(1, m1), node(2, m1)]
    Simulation.check_members(sim)
    sim.live = lambda: [node(0, m1), node(1, m2), node(2, m1)]
    with pytest.raises(SimulationFailure, match="members disagree"):
        Simulation.check_members(sim)
    sim.live = lambda: [node(0, m2), node(1, m2), node(2, m2)]
    with pytest.raises(SimulationFailure, match=r"the nodes running are \[0, 1, 2\]"):
        Simulation.check_members(sim)


def test_the_operators_command_must_ask_the_same_each_run():
    """A command is run again from its start at every tick (``SimCore``): its calls are
    answered from the first run's; one that asks something else is a simulator bug."""
    sent = []
    operator = SimpleNamespace(new_call=lambda *a: sent.append(a) or realmembers.SimCall(
        len(sent), a[0], a[1], a[2], a[4], 100))
    core = realmembers.SimCore(operator)
    with pytest.raises(realmembers.Pending):
        core.call("member", None, ["list"])
    core.calls[0].outcome = ("ok", {"x": 1})
    core.position = 0
    assert core.call("member", None, ["list"]) == {"x": 1}
    assert len(sent) == 1  # answered from the record: not sent again
    core.position = 0
    with pytest.raises(realmembers.NotDeterministic):
        core.call("member", 0, ["change"])


@pytest.mark.sweep
@pytest.mark.parametrize("nodes", [3, 4, 5])
def test_a_sweep_of_membership_changes_passes(nodes):
    """``KVSTORE_SWEEP_SEEDS`` membership seeds per cluster size (``python -m kvstore.sim
    --members --seeds N --nodes n`` is the same sweep with a progress line)."""
    for seed in range(int(os.environ.get("KVSTORE_SWEEP_SEEDS", "0"))):
        result = run(RealNodeConfig(seed=seed, nodes=nodes, membership_changes=True))
        assert result.ok, result.text



def test_an_add_is_not_taken_as_done_where_a_lagging_view_shows_the_index_as_a_removed_node():
    """Found by the 4-node sweep (seed 21, when ``member add`` still gave the lowest free
    index): n2 was removed and j1 given its index 2; when the add changed the shards, its
    view of shard 1 came from a node still at the epoch where index 2 was n2, so the add
    took shard 1 as done (the index had a role) and reported success: j1 ran, a member of
    no membership of shard 1. Indexes are reused once 63 is taken; the add must then look
    again until the shard shows the index as the new member."""
    from kvstore.client.members import MemberView, Members, ShardMembership
    from kvstore.errors import Unavailable
    from kvstore.transport.members import Member

    def member(name):
        return Member(name, f"tcp://{name}.x:7000", f"tcp://{name}.x:17000")

    def shard(s, members):
        return ShardMembership(s, 1, 10, tuple(sorted(members)), (), members, b"", 0, 20, {})

    keep = {0: member("n0"), 1: member("n1"), 63: member("n63")}
    fresh = MemberView("", [shard(0, keep), shard(1, keep)])
    stale = MemberView("", [shard(0, keep), shard(1, {**keep, 2: member("n2")})])
    views, calls = iter([fresh, stale]), []
    members = Members(SimpleNamespace(_core=SimpleNamespace(
        call=lambda *args, **kw: calls.append(args)), timeout=1.0))
    members.view = lambda: next(views)
    with pytest.raises(Unavailable, match="shard 1 still shows index 2 as another member"):
        members.add("j1", "tcp://j1.x:7000", "tcp://j1.x:17000")
    assert [c[1] for c in calls] == [0]  # shard 0 changed; shard 1 waits for a fresh view
