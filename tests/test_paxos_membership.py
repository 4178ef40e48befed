"""Membership changes in the Paxos core (``kvstore.paxos.membership``, "Membership" in
``kvstore.paxos.replica``), as scripts over the in-memory network, and a randomized run
of changes under crashes, wipes, cuts and message loss that checks that no two replicas
ever apply different values at one slot."""

from __future__ import annotations

import random

import pytest

from kvstore.paxos import NotLeader
from kvstore.paxos import messages as M
from kvstore.paxos.ballot import ballot_epoch, make_ballot
from kvstore.paxos.interface import KIND_CONFIG, Membership
from kvstore.paxos.membership import (check_change, decode_membership, encode_membership, unwrap_snapshot,
                                      wrap_snapshot)
from kvstore.sim.network import Cluster
from kvstore.sim.oracle import Oracle


def leader_of(c: Cluster, max_ticks: int = 400) -> int:
    for _ in range(max_ticks):
        ls = [i for i in c.leaders() if c.replicas[i] is not None and not c.replicas[i].removed]
        if len(ls) == 1 and c.replicas[ls[0]]._own_noop_committed():
            return ls[0]
        c.tick()
    raise AssertionError("no leader")


def change(c: Cluster, voters, learners=()) -> int:
    """Make the change through the current leader and wait until it commits there."""
    lead = leader_of(c)
    r = c.replicas[lead]
    epoch = r.membership.epoch
    r.propose_membership(voters, learners)
    c.deliver()
    for _ in range(200):
        if any(x is not None and x.membership.epoch > epoch for x in c.replicas):
            return lead
        c.tick()
    raise AssertionError("the change did not commit")


def write(c: Cluster, *values: bytes) -> None:
    lead = leader_of(c)
    c.propose(lead, *values)
    for _ in range(50):
        if all(v in c.commands(lead) for v in values):
            return
        c.tick()
    raise AssertionError(f"{values} not committed")


def sequences_agree(c: Cluster) -> None:
    """No two replicas applied different values at one slot."""
    seen: dict = {}
    for i in range(c.n):
        for e in c.applied[i]:
            v = (e.kind, tuple(e.commands), e.membership)
            assert seen.setdefault(e.slot, v) == v, f"slot {e.slot}: {seen[e.slot]} vs {v} at n{i}"


def test_a_learner_joins_catches_up_is_promoted_then_the_leader_is_removed():
    c = Cluster(3, seed=1, nodes=4)
    write(c, b"a", b"b")
    m0 = c.replicas[leader_of(c)].membership
    assert (m0.epoch, m0.voters, m0.learners) == (0, (0, 1, 2), ())
    change(c, (0, 1, 2), (3,))
    c.join(3, c.replicas[leader_of(c)].membership)
    write(c, b"c")
    c.tick(20)
    assert c.commands(3)[-3:] == [b"a", b"b", b"c"]  # the learner holds the log
    assert not c.replicas[3].is_voter and c.replicas[3].role == "follower"
    change(c, (0, 1, 2, 3))
    write(c, b"d")
    assert c.replicas[3].is_voter and c.replicas[3].membership.epoch == 2
    old = leader_of(c)
    change(c, tuple(v for v in (0, 1, 2, 3) if v != old))
    new = leader_of(c)
    assert new != old and c.replicas[old].removed and not c.replicas[old].is_leader
    write(c, b"e")
    c.tick(5)  # followers learn the commit point from the next heartbeat
    for i in (0, 1, 2, 3):
        if i != old:
            assert c.commands(i)[-1] == b"e"
    sequences_agree(c)


def test_each_node_reports_every_epoch_it_enters_once():
    c = Cluster(3, seed=2, nodes=4)
    change(c, (0, 1, 2), (3,))
    c.tick(5)
    assert [m.epoch for m in c.memberships[1]] == [1]
    entry = [e for e in c.applied[1] if e.kind == KIND_CONFIG]
    assert len(entry) == 1 and entry[0].membership.learners == (3,)
    assert entry[0].membership.start == entry[0].slot + 1


def test_the_core_refuses_what_it_cannot_do():
    c = Cluster(3, seed=3, nodes=5)
    lead = leader_of(c)
    follower = next(i for i in range(3) if i != lead)
    with pytest.raises(NotLeader):
        c.replicas[follower].propose_membership((0, 1, 2), (3,))
    r = c.replicas[lead]
    with pytest.raises(ValueError, match="one voter at a time"):
        r.propose_membership((0, 1, 2, 3, 4), ())
    with pytest.raises(ValueError, match="both vote and learn"):
        r.propose_membership((0, 1, 2), (2,))
    with pytest.raises(ValueError, match="at least one voter"):
        r.propose_membership((), ())
    r.propose_membership((0, 1, 2), (3,))
    with pytest.raises(ValueError, match="already in progress"):
        r.propose_membership((0, 1, 2), (4,))


def test_a_change_that_leaves_the_new_voters_no_majority_that_answers_is_refused():
    """With one follower down, removing the other would leave the leader and the dead
    node: the change would commit and the new epoch elect no one. Refused, naming who
    answers; removing the dead one is fine. A voter still recovering counts as not
    answering (sim: --members --nodes 5 --seed 424)."""
    c = Cluster(3, seed=14)
    lead = leader_of(c)
    up, down = [i for i in range(3) if i != lead]
    c.crash(down)
    c.tick(c.config.get("election_timeout_ticks", 10) + 2)  # its last answer grows old
    r = c.replicas[lead]
    with pytest.raises(ValueError, match="no majority that votes"):
        r.propose_membership((lead, down), ())
    assert r.pending_config is None
    change(c, (lead, up))
    write(c, b"two voters")

    c = Cluster(5, seed=15)
    lead = leader_of(c)
    a, b, x, y = [i for i in range(5) if i != lead]
    for i in (a, b):  # lose their disks: they recover, and do not vote meanwhile
        c.wipe(i)
        c.restart(i)
        c.cut(i, y)  # y's report never reaches them: they stay recovering, yet answer the leader
    c.tick(12)
    assert c.replicas[a].recovering and c.replicas[b].recovering
    with pytest.raises(ValueError, match="no majority that votes"):
        c.replicas[lead].propose_membership(tuple(v for v in range(5) if v != x), ())


def test_commands_proposed_after_a_change_wait_for_the_next_epoch_and_are_never_applied_in_the_old():
    c = Cluster(3, seed=4, nodes=4)
    lead = leader_of(c)
    r = c.replicas[lead]
    r.propose_membership((0, 1, 2), (3,))
    r.ready()  # the change takes its slot (nothing delivered yet)
    assert r.config_slot is not None
    assert r.propose(b"late")  # queued behind the change
    c.deliver()
    c.tick(5)
    cfg_slot = next(e.slot for e in c.applied[lead] if e.kind == KIND_CONFIG)
    after = [e for e in c.applied[lead] if e.slot > cfg_slot]
    assert all(ballot_epoch(e.ballot) == 1 for e in after)  # nothing after it in epoch 0
    assert b"late" in c.dropped[lead]  # handed back to its client (who retries)
    sequences_agree(c)


def test_a_replica_that_moved_on_refuses_the_old_epochs_leader():
    c = Cluster(3, seed=5, nodes=4)
    change(c, (0, 1, 2), (3,))
    c.tick(3)
    r = c.replicas[1]
    assert r.membership.epoch == 1 and ballot_epoch(r.promised) >= 1
    stale = make_ballot(50, 2)  # a high round, but of epoch 0
    r.step(M.Message(M.ACCEPT, 1, 2, ballot=stale, commit_index=-1))
    rd = r.ready()
    assert [m.reject for m in rd.messages if m.type == M.ACCEPTED] == [True]


def test_a_restart_comes_back_in_the_epoch_its_disk_holds():
    c = Cluster(3, seed=6, nodes=4)
    change(c, (0, 1, 2), (3,))
    c.join(3, c.replicas[leader_of(c)].membership)
    change(c, (0, 1, 2, 3))
    write(c, b"x")
    c.tick(20)  # node 3 catches up (heartbeat replies move the leader back to what it lacks)
    for i in range(4):
        c.crash(i)
    for i in range(4):
        c.restart(i)
        assert c.replicas[i].membership.epoch == 2 and c.replicas[i].voters == (0, 1, 2, 3)
    write(c, b"y")
    sequences_agree(c)


def test_a_learner_far_behind_gets_a_snapshot_that_carries_the_membership():
    c = Cluster(3, seed=7, nodes=4, log_retain_slots=2)
    change(c, (0, 1, 2), (3,))
    for k in range(12):
        write(c, b"v%d" % k)
    for i in range(3):
        r = c.replicas[i]
        r.compact(r.applied_index, b"state")
    c.join(3, c.replicas[leader_of(c)].membership)
    c.tick(30)
    snaps = c.snapshots[3]
    assert snaps and snaps[-1].membership.epoch == 1 and snaps[-1].membership.learners == (3,)
    write(c, b"after")
    c.tick(5)
    assert c.commands(3)[-1] == b"after"


def test_membership_codecs_refuse_what_is_not_one():
    m = check_change(Membership(0, 0, (0, 1, 2)), (0, 1, 2, 3), (5,), b"info")
    payload = encode_membership(m)
    assert decode_membership(payload, 41) == Membership(1, 42, (0, 1, 2, 3), (5,), b"info")
    for bad in (b"", b"\xc1", encode_membership(Membership(0, 0, (0,))),
                encode_membership(Membership(1, 0, (3, 1))), encode_membership(Membership(1, 0, (64,)))):
        with pytest.raises(ValueError):
            decode_membership(bad, 0)
    blob = wrap_snapshot(Membership(2, 5, (0, 1), (2,), b"i"), b"data")
    assert unwrap_snapshot(blob, 9) == (Membership(2, 5, (0, 1), (2,), b"i"), b"data")
    with pytest.raises(ValueError):
        unwrap_snapshot(blob, 2)  # an epoch starting after the snapshot's index
    for cut in range(5, len(blob) - 4):
        try:
            unwrap_snapshot(blob[:cut], 9)
        except ValueError:
            pass
    assert unwrap_snapshot(b"plain", 3) == (None, b"plain")  # epoch 0's, as before


def _fuzz(seed: int, steps: int = 260) -> Cluster:
    """Random membership changes (add a learner, promote it, remove a voter: one at a time)
    under crashes, restarts, cuts and lost messages; the oracle (``kvstore.sim.oracle``,
    epoch-aware) checks every step, agreement is checked after every tick."""
    rng = random.Random(seed)
    c = Cluster(3, seed=seed, nodes=6, oracle=Oracle(6, voters=3))
    lossy_deliver = c.deliver

    def deliver(max_rounds: int = 1000) -> None:
        for _ in range(max_rounds):
            c.process()
            if not c.inbox:
                return
            batch, c.inbox = c.inbox, []
            rng.shuffle(batch)
            for m in batch:
                r = c.replicas[m.to]
                if r is not None and (m.frm, m.to) not in c.cut_links and rng.random() > 0.05:
                    r.step(m)
                    c.oracle.check(m.to, r)
        raise AssertionError("messages did not settle")

    c.deliver = deliver
    values = 0
    for _ in range(steps):
        x = rng.random()
        up = [i for i in range(c.n) if c.replicas[i] is not None]
        if x < 0.05 and len(up) > 1:
            c.crash(rng.choice(up))
        elif x < 0.12:
            down = [i for i in range(c.n) if c.replicas[i] is None and (c.disks[i].promised or c.records[i])]
            if down:
                c.restart(rng.choice(down))
        elif x < 0.16:
            a, b = rng.sample(range(c.n), 2)
            c.cut(a, b)
        elif x < 0.22:
            c.heal()
        elif x < 0.32:
            leads = [i for i in c.leaders() if not c.replicas[i].removed]
            if leads:
                r = c.replicas[leads[0]]
                m = r.membership
                outside = [i for i in range(c.n) if i not in m.members]
                try:
                    if m.learners and rng.random() < 0.6:
                        lr = rng.choice(m.learners)
                        r.propose_membership(m.voters + (lr,), tuple(x for x in m.learners if x != lr))
                    elif len(m.voters) > 2 and rng.random() < 0.5:
                        gone = rng.choice(m.voters)
                        r.propose_membership(tuple(v for v in m.voters if v != gone), m.learners)
                    elif outside:
                        new = rng.choice(outside)
                        r.propose_membership(m.voters, m.learners + (new,))
                        c.join(new, m) if c.replicas[new] is None else None
                except ValueError:
                    pass
        else:
            leads = [i for i in c.leaders() if not c.replicas[i].removed]
            if leads:
                values += 1
                c.replicas[leads[0]].propose(b"v%d" % values)
        c.tick()
        sequences_agree(c)
    c.heal()
    c.tick(100)
    sequences_agree(c)
    return c


def _all_back_elect(c: Cluster, seed: int) -> None:
    """Liveness after the faults: every node that ever ran starts again (a wiped one
    empty), the network heals, and a member of the latest epoch must lead and commit a
    value. Before ``Chosen`` (a node behind a change learns it from any member), 211 of
    300 fuzz seeds ended with no leader here."""
    for i in range(c.n):
        d = c.disks[i]
        if c.replicas[i] is None and (i < c.bootstrap or d.membership is not None or d.promised or c.records[i]):
            c.restart(i)
    c.heal()
    for _ in range(600):
        c.tick()
        ls = [i for i in c.leaders() if not c.replicas[i].removed and c.replicas[i]._own_noop_committed()]
        if ls:
            c.propose(ls[0], b"after the faults")
            c.tick(20)
            assert b"after the faults" in c.commands(ls[0]), f"seed {seed}: the leader did not commit"
            sequences_agree(c)
            return
    where = [(i, r.membership.epoch, r.role, r.recovering) for i, r in enumerate(c.replicas) if r is not None]
    raise AssertionError(f"seed {seed}: no leader 600 ticks after every node restarted: {where}")


@pytest.mark.parametrize("seed", range(40))
def test_random_membership_changes_under_faults_never_split_a_slot_and_elect_again(seed):
    _all_back_elect(_fuzz(seed), seed)


def test_a_peer_record_of_a_membership_change_is_checked_at_the_wire():
    from kvstore._native import encode_record
    from kvstore.transport import wire
    good = encode_record(5, make_ballot(1, 1), KIND_CONFIG, encode_membership(Membership(1, 0, (0, 1))))
    wire._check_record(good)
    for payload in (b"junk", encode_membership(Membership(1, 0, ()))):
        with pytest.raises(wire.FrameError, match="slot 5"):
            wire._check_record(encode_record(5, make_ballot(1, 1), KIND_CONFIG, payload))


def test_a_ballot_of_an_epoch_not_reached_is_learned_from_but_never_promised():
    """A replica behind by some membership changes learns them from the later epoch's
    leader; but it promises no ballot of an epoch it does not know, so a forged one (a
    round 2**33 up: epoch 8) cannot silence it: it still campaigns in its own epoch."""
    c = Cluster(3, seed=8)
    lead = leader_of(c)
    r = c.replicas[(lead + 1) % 3]
    promised = r.promised
    forged = make_ballot((8 << 30) | 5, lead)
    for t in (M.HEARTBEAT, M.ACCEPT, M.PREPARE, M.PRE_VOTE):
        r.step(M.Message(t, r.id, lead, ballot=forged, commit_index=-1))
    rd = r.ready()
    assert r.promised == promised and ballot_epoch(r.max_round << 16) == 0
    assert all(m.reject for m in rd.messages)
    c.crash(lead)
    for _ in range(200):
        if any(x is not None and x.is_leader for x in c.replicas):
            break
        c.tick()
    assert any(x is not None and x.is_leader for x in c.replicas)


def test_a_voter_that_missed_two_changes_catches_up_from_the_new_leader():
    c = Cluster(3, seed=9, nodes=5)
    lag = next(i for i in range(3) if i != leader_of(c))
    c.isolate(lag)
    change(c, tuple(v for v in range(3)), (3,))
    c.join(3, c.replicas[leader_of(c)].membership)
    c.tick(10)
    change(c, (0, 1, 2, 3))
    write(c, b"while away")
    assert c.replicas[lag].membership.epoch == 0
    c.heal()
    c.tick(40)
    r = c.replicas[lag]
    assert r.membership.epoch == 2 and b"while away" in c.commands(lag)
    sequences_agree(c)


def test_two_wiped_voters_that_missed_a_removal_learn_it_from_followers_and_recover_in_the_new_epoch():
    """Two voters lose their disks after a change they missed (they start in the bootstrap
    epoch); the node the change removed is gone for good. The new epoch needs one of them
    to elect a leader, and they waited for a report from every voter of the old epoch,
    the removed one included: no leader ever again (real-node sim: --members --nodes 5
    --seed 6). Any member that sees them behind now sends the chosen values they lack
    (``Chosen``), they move to the new epoch and recover among its voters."""
    c = Cluster(5, seed=11)
    lead = leader_of(c)
    a, b, removed, other = [i for i in range(5) if i != lead]
    c.isolate(a)
    c.isolate(b)
    for x in (lead, removed, other):  # the three still talk to each other
        for y in (lead, removed, other):
            c.cut_links.discard((x, y))
    change(c, tuple(v for v in range(5) if v != removed))
    c.tick(5)  # the others learn it is chosen
    assert c.replicas[other].membership.epoch == 1
    c.crash(removed)
    for i in (a, b):
        c.wipe(i)
        c.restart(i)
    assert c.replicas[a].recovering and c.replicas[a].membership.epoch == 0
    c.heal()
    c.cut(removed, lead)  # (it is down anyway)
    new = leader_of(c, max_ticks=600)
    assert c.replicas[new].membership.epoch == 1
    write(c, b"after")
    c.tick(5)
    for i in (a, b):
        r = c.replicas[i]
        assert not r.recovering and r.membership.epoch == 1 and r.is_voter
        assert b"after" in c.commands(i)
    sequences_agree(c)


def _learner_promoted_while_cut_off(seed: int, writes_after: int = 0, **config) -> Cluster:
    """Three voters and a learner (node 3) that misses its own promotion: it stays in
    epoch 1 while the others write ``writes_after`` values in epoch 2."""
    c = Cluster(3, seed=seed, nodes=4, **config)
    change(c, (0, 1, 2), (3,))
    c.join(3, c.replicas[leader_of(c)].membership)
    write(c, b"before")
    c.tick(10)
    assert b"before" in c.commands(3)
    c.isolate(3)
    change(c, (0, 1, 2, 3))
    for k in range(writes_after):
        write(c, b"v%d" % k)
    c.tick(5)
    assert c.replicas[3].membership.epoch == 1 and not c.replicas[3].is_voter
    return c


def _lose_a_voter_and_elect(c: Cluster) -> None:
    """The leader dies, the learner is heard again: epoch 2 needs its vote to elect."""
    c.crash(leader_of(c))
    c.heal()
    new = leader_of(c, max_ticks=600)
    assert c.replicas[new].membership.epoch == 2
    write(c, b"after")
    c.tick(5)
    assert c.replicas[3].is_voter and c.commands(3)[-1] == b"after"
    sequences_agree(c)


def test_a_learner_promoted_while_cut_off_learns_it_from_a_candidate_it_refuses():
    """A learner misses its own promotion; then a voter is lost, so the new epoch needs
    the learner's vote to elect anyone, and there is no leader it could learn the change
    from. It refused the candidates' votes and stayed behind for good (real-node sim:
    --members --nodes 3 --seed 9055). A refusal now says how far it holds the chosen
    values, and the candidate sends what it lacks (``Chosen``)."""
    _lose_a_voter_and_elect(_learner_promoted_while_cut_off(12))


def test_a_promoted_learner_behind_a_compaction_takes_a_snapshot_from_a_candidate():
    """As above, but the others compacted their logs past what the learner holds: the
    candidate it refuses offers its snapshot (``Chosen`` with a snapshot index) and the
    learner lets that sender's transfer in (real-node sim: --members --nodes 3 --seed 9139)."""
    c = _learner_promoted_while_cut_off(13, writes_after=8, log_retain_slots=2)
    for i in range(3):
        r = c.replicas[i]
        r.compact(r.applied_index, b"state")
    assert c.replicas[0].log_start > c.replicas[3].commit_index + 1
    _lose_a_voter_and_elect(c)
    assert c.snapshots[3]


def test_after_a_forged_later_epoch_the_leader_of_our_epoch_is_followed_again_for_reads():
    """A forged heartbeat of an unknown epoch (learned from, never promised) left the
    replica asking its follower reads of that ballot: no leader answered them, and the
    node's linearizable gets were refused until it restarted (test_cluster_hostile_peer)."""
    c = Cluster(3, seed=10)
    lead = leader_of(c)
    f = (lead + 1) % 3
    forger = (lead + 2) % 3
    c.replicas[f].step(M.Message(M.HEARTBEAT, f, forger, ballot=make_ballot((8 << 30) | 5, forger),
                                 commit_index=-1))
    c.tick(5)  # the real leader's heartbeats
    c.replicas[f].read(77)
    c.deliver()
    c.tick(3)
    assert 77 in c.reads[f]


@pytest.mark.sweep
@pytest.mark.timeout(0)  # an opt-in long run: thousands of seeds take minutes
def test_a_sweep_of_membership_changes_under_faults():
    """``KVSTORE_SWEEP_SEEDS`` seeds of the randomized run above, from seed 1000 on (the
    default suite runs 0-39): ``KVSTORE_SWEEP_SEEDS=2000 python -m pytest -m sweep
    tests/test_paxos_membership.py``."""
    import os
    for seed in range(1000, 1000 + int(os.environ["KVSTORE_SWEEP_SEEDS"])):
        _all_back_elect(_fuzz(seed), seed)
