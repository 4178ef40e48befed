"""Scenario tests for the Multi-Paxos core, written as scripts over an in-memory network."""

from __future__ import annotations

import pathlib
import random
import re

import msgpack
import pytest

from kvstore._native import encode_record
from kvstore.paxos import (
    KIND_BATCH, Bugs, Config, Message, NotLeader, PersistedState, Replica, ballot_node, ballot_round,
    from_wire, make_ballot, to_wire,
)
from kvstore.paxos import messages as M
from kvstore.sim.network import Cluster


def test_ballots_order_like_round_then_node():
    assert make_ballot(1, 4) < make_ballot(2, 0) < make_ballot(2, 1)
    b = make_ballot(7, 3)
    assert (ballot_round(b), ballot_node(b)) == (7, 3)


def test_single_node_commits_alone():
    c = Cluster(1)
    c.campaign(0)
    assert c.leaders() == [0]
    c.propose(0, b"x", b"y")
    assert c.commands(0) == [b"x", b"y"]


def test_election_campaign_deliver_expect_leader():
    c = Cluster(3)
    c.campaign(1)
    assert c.leaders() == [1]
    assert [r.leader_hint for r in c.replicas] == [1, 1, 1]
    c.propose(1, b"a")
    c.tick(2)  # a heartbeat carries the commit point to the followers
    for i in range(3):
        assert c.commands(i) == [b"a"]


def test_election_by_timeout_elects_exactly_one_leader():
    c = Cluster(5, seed=3)
    for _ in range(100):
        c.tick()
        if c.leaders():
            break
    assert len(c.leaders()) == 1


def test_follower_refuses_proposals_with_leader_hint():
    c = Cluster(3)
    c.campaign(0)
    assert c.replicas[2].propose(b"x") is False
    assert c.replicas[2].leader_hint == 0


def test_replica_without_a_known_leader_refuses_reads():
    c = Cluster(3)
    with pytest.raises(NotLeader) as e:
        c.replicas[2].read("r1")
    assert e.value.leader_hint is None


def new_cluster_replica(node: int = 1, n: int = 3) -> Replica:
    """Node ``node`` of a new cluster: every other node reports it holds nothing, so it
    votes (a replica with no Paxos state votes only once it knows that much)."""
    r = Replica(Config(node=node, num_nodes=n, rng=random.Random(0)))
    assert r.recovering
    nonce = r.recovery.nonce
    for i in range(n):
        if i != node:
            r.step(Message(M.RECOVER_REPLY, node, i, context=nonce))
    assert [m.type for m in r.ready().messages] == [M.RECOVER] * (n - 1)
    assert not r.recovering
    return r


def test_a_replica_without_paxos_state_votes_only_once_it_knows_it_is_safe():
    r = Replica(Config(node=1, num_nodes=3, rng=random.Random(0)))
    nonce = r.recovery.nonce
    r.step(Message(M.PREPARE, 1, 0, ballot=make_ballot(1, 0)))
    assert [m.type for m in r.ready().messages] == [M.RECOVER, M.RECOVER]  # no Promise
    # Node 0 has voted (promise 3.0, slots up to 7): not a new cluster. Node 2 too.
    r.step(Message(M.RECOVER_REPLY, 1, 0, hint=make_ballot(3, 0), match_index=7, context=nonce))
    r.step(Message(M.RECOVER_REPLY, 1, 2, hint=make_ballot(2, 2), match_index=5, context=nonce))
    fence = [m for m in r.ready().messages if m.type == M.RECOVER]
    assert {m.ballot for m in fence} == {make_ballot(3, 0)}  # the highest promise reported
    assert r.recovering and r.recovery.phase == 2
    for i in (0, 2):
        r.step(Message(M.RECOVER_REPLY, 1, i, hint=make_ballot(3, 0), match_index=7,
                       context=fence[0].context))
    assert r.recovering and r.recovery.target == 7  # it must learn slots 0..7 first
    r.step(Message(M.HEARTBEAT, 1, 0, ballot=make_ballot(3, 0), commit_index=7))
    reply = [m for m in r.ready().messages if m.type == M.HEARTBEAT_REPLY]
    assert reply[0].reject and reply[0].hint == 0 and reply[0].match_index == -1  # no vote
    recs = tuple(encode_record(s, make_ballot(3, 0), KIND_BATCH, msgpack.packb([b"c%d" % s])) for s in range(8))
    r.step(Message(M.ACCEPT, 1, 0, ballot=make_ballot(3, 0), commit_index=7, records=recs))
    rd = r.ready()
    assert not r.recovering
    assert rd.promised == make_ballot(3, 0) and rd.commit_index == 7 and len(rd.committed) == 8


def test_promise_is_persisted_in_the_same_ready_as_its_announcement():
    """Rule 1: the Ready that carries a Promise also carries the promise to persist."""
    r = new_cluster_replica()
    r.step(Message(M.PREPARE, 1, 0, ballot=make_ballot(1, 0)))
    rd = r.ready()
    assert rd.promised == make_ballot(1, 0)
    assert [m.type for m in rd.messages] == [M.PROMISE]


def test_acceptance_is_persisted_in_the_same_ready_as_its_announcement():
    r = new_cluster_replica()
    b = make_ballot(1, 0)
    rec = encode_record(0, b, KIND_BATCH, msgpack.packb([b"x"]))
    r.step(Message(M.ACCEPT, 1, 0, ballot=b, records=(rec,)))
    rd = r.ready()
    assert rd.records == [rec]
    assert [(m.type, m.match_index) for m in rd.messages] == [(M.ACCEPTED, 0)]


def test_never_accepts_below_the_promise():
    r = new_cluster_replica()
    r.step(Message(M.PREPARE, 1, 2, ballot=make_ballot(2, 2)))
    r.ready()
    low = make_ballot(1, 0)
    r.step(Message(M.ACCEPT, 1, 0, ballot=low, records=(encode_record(0, low, 0, b""),)))
    rd = r.ready()
    assert rd.records == []
    assert rd.messages[0].reject and rd.messages[0].hint == make_ballot(2, 2)


def _state_with(slot_ballot_value) -> PersistedState:
    recs = [encode_record(s, b, KIND_BATCH, msgpack.packb([v])) for s, b, v in slot_ballot_value]
    promised = max((b for _, b, _ in slot_ballot_value), default=0)
    return PersistedState(promised=promised, records=recs)


@pytest.mark.parametrize("bugs,expected", [(Bugs(), b"B"), (Bugs(repropose_lowest=True), b"A")])
def test_new_leader_reproposes_highest_ballot_value(bugs, expected):
    """Rule 3. Node 0 accepted A at ballot 1.0, node 2 accepted B at ballot 2.1 in slot 0;
    cut 0-1, node 0 campaigns with promises {0, 2}, and must re-propose B."""
    c = Cluster(3, bugs=bugs)
    c.records[0] = {0: encode_record(0, make_ballot(1, 0), KIND_BATCH, msgpack.packb([b"A"]))}
    c.records[2] = {0: encode_record(0, make_ballot(2, 1), KIND_BATCH, msgpack.packb([b"B"]))}
    c.disks[0].promised = make_ballot(1, 0)
    c.disks[2].promised = make_ballot(2, 1)
    for i in (0, 2):
        c.restart(i)
    c.cut(0, 1)  # the promises are 0's own and 2's
    c.campaign(0)  # pre-vote at round 1 is refused, and teaches 0 the rounds in use
    assert c.leaders() == []
    c.campaign(0)
    assert c.leaders() == [0]
    assert ballot_round(c.replicas[0].ballot) == 3  # above every ballot it heard of
    c.heal()
    c.tick(2)
    for i in range(3):
        assert c.commands(i)[:1] == [expected]


def test_new_leader_fills_holes_with_noops_then_its_own_noop():
    c = Cluster(3)
    c.records[1] = {2: encode_record(2, make_ballot(1, 1), KIND_BATCH, msgpack.packb([b"late"]))}
    c.disks[1].promised = make_ballot(1, 1)
    c.restart(1)
    c.campaign(0)
    c.campaign(0)
    c.tick(2)
    kinds = [(e.slot, e.commands) for e in c.applied[0]]
    assert kinds == [(0, []), (1, []), (2, [b"late"]), (3, [])]


def test_leader_stickiness_against_a_rejoining_node():
    """Cut 2 off, let it time out many times, heal: it must not depose the healthy leader 0."""
    c = Cluster(3, seed=1)
    c.campaign(0)
    ballot = c.replicas[0].ballot
    c.isolate(2)
    c.tick(60)  # 2 campaigns in vain; 0 and 1 keep heartbeating
    assert c.leaders() == [0]
    c.heal()
    c.campaign(2)
    c.tick(30)
    assert c.leaders() == [0]
    assert c.replicas[0].ballot == ballot
    assert c.replicas[2].leader_hint == 0


def test_leader_stickiness_without_pre_vote_still_refuses_prepare():
    c = Cluster(3, pre_vote=False)
    c.campaign(0)
    c.isolate(2)
    c.tick(40, nodes=[2])
    c.heal()
    c.campaign(2)
    assert c.leaders() == [0]


def test_partitioned_leader_steps_down_and_majority_elects_a_new_one():
    c = Cluster(3, seed=2)
    c.campaign(0)
    c.isolate(0)
    c.tick(80)
    assert not c.replicas[0].is_leader  # check quorum
    assert len(c.leaders()) == 1 and c.leaders()[0] != 0
    c.heal()
    c.tick(10)
    new = c.leaders()[0]
    assert all(r.leader_hint == new for r in c.replicas)


def test_catch_up_of_a_lagging_follower_from_entries():
    c = Cluster(3)
    c.campaign(0)
    c.isolate(2)
    c.propose(0, *[b"c%d" % i for i in range(20)])
    c.heal()
    c.tick(10)
    assert c.commands(2) == c.commands(0) == [b"c%d" % i for i in range(20)]


def test_catch_up_via_snapshot_when_log_is_compacted():
    c = Cluster(3, log_retain_slots=2, batch_commands_max=1)
    c.campaign(0)
    c.isolate(2)
    c.propose(0, *[b"c%d" % i for i in range(10)])
    leader = c.replicas[0]
    assert leader.applied_index == 10
    leader.compact(10, b"STATE@10")  # the application saved its state through slot 10
    c.process()
    assert min(c.records[0]) == 9  # two entries retained below the snapshot point
    c.heal()
    c.tick(15)
    assert [s.data for s in c.snapshots[2]] == [b"STATE@10"]
    assert c.replicas[2].commit_index >= 10
    c.propose(0, b"after")
    c.tick(2)
    assert c.commands(2)[-1:] == [b"after"]


def test_a_large_snapshot_crosses_a_lossy_reordering_network_in_a_window_of_chunks():
    """Flow control: at most a window of chunks in flight, acknowledged by offset and resent
    from the last acknowledged one. A burst of every chunk, resent whole each election
    timeout, never completes here: reordered chunks are dropped by the receiver."""
    c = Cluster(3, log_retain_slots=0, batch_commands_max=1, snapshot_chunk_bytes=16,
                snapshot_window_chunks=4)
    c.campaign(0)
    c.isolate(2)
    c.propose(0, *[b"c%d" % i for i in range(10)])
    state = bytes(range(256)) * 8  # 128 chunks
    c.replicas[0].compact(10, state)
    c.process()
    c.heal()
    rng = random.Random(7)
    most_in_flight = 0
    for _ in range(400):
        for r in c.replicas:
            r.tick()
        c.process()
        chunks = [m for m in c.inbox if m.type == M.SNAPSHOT]
        most_in_flight = max(most_in_flight, len(chunks))
        rng.shuffle(c.inbox)  # reordered, and one message in ten lost
        c.inbox = [m for m in c.inbox if rng.random() >= 0.1]
        batch, c.inbox = c.inbox, []
        for m in batch:
            c.replicas[m.to].step(m)
        if c.snapshots[2]:
            break
    assert [s.data for s in c.snapshots[2]] == [state]
    assert most_in_flight <= 4
    sent = sum(1 for m in c.sent if m.type == M.SNAPSHOT)
    assert sent < 4 * 128, sent  # resent from the acknowledged offset, not from the start


def test_a_wiped_follower_gets_the_log_again_from_a_leader_that_did_not_change():
    """The leader's view of a follower drops when the follower says it holds less (it lost its
    disk): it resends from there. (It kept the old match and sent nothing, for minutes.)"""
    c = Cluster(3, batch_commands_max=1)
    c.campaign(0)
    c.propose(0, *[b"c%d" % i for i in range(5)])
    c.tick(3)
    assert c.replicas[0].progress[2].match == 5  # its no-op and the five commands
    c.crash(2)
    c.disks[2], c.records[2] = PersistedState(), {}  # a replaced disk
    c.restart(2)
    c.tick(30)
    r = c.replicas[2]
    assert not r.recovering and r.promised > 0
    assert c.commands(2) == [b"c%d" % i for i in range(5)]
    c.crash(1)  # the wiped node now counts in a majority
    c.propose(0, b"after")
    c.tick(3)
    assert c.commands(0)[-1] == c.commands(2)[-1] == b"after"


def test_a_promise_counts_only_for_the_campaign_it_answers():
    c = Cluster(3, pre_vote=False)
    r = c.replicas[2]
    r.campaign()
    c.process()
    c.inbox = []
    r.step(Message(M.PROMISE, 2, 1, ballot=r.ballot, commit_index=-1, context=r.campaign_context + 1))
    r.step(Message(M.PROMISE, 2, 0, ballot=r.ballot, commit_index=-1, context=r.campaign_context - 1))
    assert not r.is_leader  # answers to a Prepare of another incarnation with this ballot
    r.step(Message(M.PROMISE, 2, 1, ballot=r.ballot, commit_index=-1, context=r.campaign_context))
    assert r.is_leader


def test_read_index_needs_a_quorum_round_and_batches_reads():
    c = Cluster(3)
    c.campaign(0)
    c.tick(2)
    leader = c.replicas[0]
    c.isolate(0)
    leader.read("r1")
    leader.read("r2")
    c.deliver()
    assert c.reads[0] == []  # no quorum heard: not served
    c.heal()
    c.tick(2)  # the next heartbeat round confirms both
    assert c.reads[0] == ["r1", "r2"]
    heartbeats = [m for m in c.sent if m.type == M.HEARTBEAT and m.context > 0]
    assert {m.context for m in heartbeats} == {1}  # one confirmation round for both reads


def test_read_is_served_only_after_applying_the_read_index():
    c = Cluster(3)
    c.campaign(0)
    c.propose(0, b"w")
    c.replicas[0].read("r")
    c.deliver()
    assert c.reads[0] == ["r"]
    assert c.commands(0) == [b"w"]


def test_new_leader_serves_no_read_before_its_own_noop_commits():
    c = Cluster(3)
    c.cut(0, 1)
    c.cut(0, 2)
    r0 = c.replicas[0]
    r0.campaign()
    r0._campaign_real()  # skip pre-vote to hold the race still
    c.heal()
    # Deliver only promises, not the Accepted replies: leader without a committed own no-op.
    c.process()
    for m in list(c.inbox):
        c.replicas[m.to].step(m)
    c.inbox = []
    c.process()
    for m in [m for m in c.inbox if m.type == M.PROMISE]:
        c.replicas[m.to].step(m)
    c.inbox = [m for m in c.inbox if m.type != M.PROMISE]
    assert r0.is_leader and r0.commit_index < r0.own_first_slot
    r0.read("early")
    c.process()
    assert c.reads[0] == []
    c.deliver()
    c.tick(2)
    assert c.reads[0] == ["early"]


def test_recovery_from_persisted_state_keeps_committed_entries():
    c = Cluster(3)
    c.campaign(0)
    c.propose(0, b"x", b"y")
    c.tick(2)
    for i in range(3):
        c.crash(i)
    for i in range(3):
        c.restart(i)
    assert all(r.promised == c.disks[0].promised for r in c.replicas)
    c.campaign(1)
    c.propose(1, b"z")
    c.tick(2)
    for i in range(3):
        assert c.commands(i) == [b"x", b"y", b"z"]  # replayed from the persisted log, then z


def test_batching_and_pipelining_many_commands_per_entry():
    c = Cluster(3, batch_commands_max=8, pipeline_window=4)
    c.campaign(0)
    r = c.replicas[0]
    for i in range(100):
        r.propose(b"%d" % i)
    c.deliver()
    c.tick(2)
    assert c.commands(1) == [b"%d" % i for i in range(100)]
    sizes = [len(e.commands) for e in c.applied[1] if e.commands]
    assert max(sizes) == 8
    assert max(len(m.records) for m in c.sent if m.type == M.ACCEPT) > 1  # many entries per message


def test_proposals_dropped_when_leadership_is_lost():
    c = Cluster(3)
    c.campaign(0)
    r = c.replicas[0]
    r.propose(b"lost")  # still queued (not yet a log entry) when a higher ballot arrives
    r.step(Message(M.ACCEPT, 0, 1, ballot=make_ballot(9, 1)))
    rd = r.ready()
    assert rd.dropped_commands == [b"lost"]


def test_messages_round_trip_through_msgpack():
    m = Message(M.PROMISE, 2, 1, ballot=make_ballot(3, 1), commit_index=5,
                records=(encode_record(6, 7, 1, b"p"),), reject=False, hint=4)
    wire = msgpack.packb(to_wire(m), use_bin_type=True)
    assert from_wire(msgpack.unpackb(wire, raw=False)) == m
    with pytest.raises(ValueError):
        from_wire([99] + to_wire(m)[1:])


def test_a_message_is_made_with_its_fields_in_order_and_defaults_and_stays_frozen():
    # Message writes its own __init__ (speed): it must take exactly the dataclass's fields.
    import dataclasses
    import inspect

    params = list(inspect.signature(Message.__init__).parameters.values())[1:]
    assert [(p.name, p.default) for p in params] == [
        (f.name, inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default)
        for f in dataclasses.fields(Message)]
    m = Message(M.ACCEPT, 1, 0, make_ballot(2, 0), 3, 4, (b"r",), True, 5, 6, 7, 8, 9, b"d", True)
    assert [getattr(m, f.name) for f in dataclasses.fields(Message)] == [
        M.ACCEPT, 1, 0, make_ballot(2, 0), 3, 4, (b"r",), True, 5, 6, 7, 8, 9, b"d", True]
    assert m == Message(**{f.name: getattr(m, f.name) for f in dataclasses.fields(Message)})
    assert dataclasses.replace(m, to=2).to == 2 and m.to == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.to = 2


def test_core_is_pure():
    root = pathlib.Path(__file__).resolve().parent.parent / "kvstore" / "paxos"
    # Indented imports count too: one under ``if TYPE_CHECKING:`` is still a dependency.
    banned = re.compile(r"^\s*(import|from)\s+(random|socket|zmq|lmdb|os|time|threading|asyncio|pickle)\b",
                        re.M)
    for path in sorted(root.glob("*.py")):
        assert not banned.search(path.read_text()), f"{path.name} imports I/O, a clock or global randomness"


# ---------------------------------------------------------------------- follower reads (ReadIndex)
def _step_only(c, keep):
    """Deliver the inbox messages ``keep`` accepts (once); hold the rest back in the inbox."""
    take = [m for m in c.inbox if keep(m)]
    c.inbox = [m for m in c.inbox if not keep(m)]
    for m in take:
        c.replicas[m.to].step(m)
    c.process()


def test_follower_read_asks_the_leader_once_for_a_batch_and_is_served_after_apply():
    c = Cluster(3)
    c.campaign(0)
    c.propose(0, b"w")
    c.tick(2)
    f = c.replicas[2]
    f.read("r1")
    f.read("r2")
    c.deliver()
    assert c.reads[2] == ["r1", "r2"]
    asks = [m for m in c.sent if m.type == M.READ_INDEX]
    assert [(m.frm, m.to) for m in asks] == [(2, 0)]  # one request carries both reads
    replies = [m for m in c.sent if m.type == M.READ_INDEX_REPLY]
    assert len(replies) == 1 and not replies[0].reject
    assert f.applied_index >= replies[0].commit_index
    assert c.commands(2) == [b"w"]


def test_lagging_follower_waits_until_it_has_applied_the_read_index():
    c = Cluster(3)
    c.campaign(0)
    c.tick(2)
    c.cut(0, 2)
    c.propose(0, b"w")  # chosen by nodes 0 and 1; node 2 has not heard of it
    c.tick(2)
    leader, f = c.replicas[0], c.replicas[2]
    assert leader.commit_index > f.commit_index
    c.heal()
    f.read("r")
    c.process()
    _step_only(c, lambda m: m.type == M.READ_INDEX)
    # The confirmation round: only node 1's heartbeat reply gets through (a quorum with the leader).
    _step_only(c, lambda m: m.type == M.HEARTBEAT and m.to == 1)
    _step_only(c, lambda m: m.type == M.HEARTBEAT_REPLY and m.frm == 1)
    [reply] = [m for m in c.inbox if m.type == M.READ_INDEX_REPLY]
    assert reply.commit_index == leader.commit_index
    _step_only(c, lambda m: m.type == M.READ_INDEX_REPLY)
    assert f.applied_index < reply.commit_index
    assert c.reads[2] == []  # the answer is in, but the follower has not applied up to it
    c.deliver()  # the held heartbeat: node 2 asks for what it lacks, gets it, applies it
    assert c.reads[2] == ["r"]
    assert c.commands(2) == [b"w"]


def test_deposed_leaders_read_index_is_never_used():
    c = Cluster(3)
    c.campaign(0)
    c.tick(2)
    f = c.replicas[2]
    f.read("old")
    c.process()
    _step_only(c, lambda m: m.type == M.READ_INDEX)
    _step_only(c, lambda m: m.type == M.HEARTBEAT)
    _step_only(c, lambda m: m.type == M.HEARTBEAT_REPLY)
    held = [m for m in c.inbox if m.type == M.READ_INDEX_REPLY]
    assert len(held) == 1  # node 0 answered, but the answer is late
    c.inbox = []
    c.isolate(0)
    c.tick(10, nodes=[2])  # node 2 stops hearing node 0 ...
    c.replicas[1]._campaign_real()  # ... and node 1 takes over with node 2
    c.deliver()
    assert c.replicas[1].is_leader and f.leader_hint == 1
    assert c.dropped_reads[2] == ["old"]  # dropped: no answer in time, then a new leader
    c.propose(1, b"new")
    f.read("fresh")
    c.process()
    for m in held:  # the deposed leader's answer arrives now; it matches nothing
        f.step(m)
    c.process()
    assert c.reads[2] == []
    c.deliver()
    c.tick(2)
    assert c.reads[2] == ["fresh"]
    assert c.commands(2)[-1:] == [b"new"]


def test_follower_read_dropped_when_no_read_index_comes_within_an_election_timeout():
    c = Cluster(3, election_timeout_ticks=10)
    c.campaign(0)
    c.tick(2)
    c.cut(0, 2)
    f = c.replicas[2]
    f.read("r")
    c.process()  # the ReadIndex request leaves (and is lost)
    c.tick(9, nodes=[2])
    assert c.dropped_reads[2] == []
    c.tick(1, nodes=[2])
    assert c.reads[2] == [] and c.dropped_reads[2] == ["r"]


def test_a_leader_that_steps_down_drops_every_read_it_has_not_served():
    """Reads queued for the next round and those of the round in flight come back in
    ``dropped_reads`` (rule 6: none is served on a leadership that may have passed)."""
    c = Cluster(3, election_timeout_ticks=10)
    c.campaign(0)
    c.tick(2)
    leader = c.replicas[0]
    leader.read("in round")
    c.process()  # its confirmation round starts: the heartbeats are in the inbox
    leader.read("queued")  # waits for the next round
    c.inbox = []  # the round's heartbeats are lost
    c.isolate(0)
    c.tick(20, nodes=[0])  # no majority answers it: it steps down
    assert not leader.is_leader
    assert c.reads[0] == [] and sorted(c.dropped_reads[0]) == ["in round", "queued"]


def test_leader_answers_read_index_only_after_its_own_noop_and_a_quorum_round():
    c = Cluster(3)
    c.campaign(0)
    c.tick(2)
    c.isolate(0)
    c.replicas[0].step(Message(M.READ_INDEX, 0, 2, ballot=c.replicas[0].ballot, context=7))
    c.process()
    assert [m for m in c.inbox if m.type == M.READ_INDEX_REPLY] == []  # no quorum heard yet
    c.heal()
    c.tick(2)
    replies = [m for m in c.sent if m.type == M.READ_INDEX_REPLY]
    assert [(m.to, m.context, m.reject) for m in replies] == [(2, 7, False)]
    # A request for another ballot is refused at once.
    c.replicas[0].step(Message(M.READ_INDEX, 0, 2, ballot=c.replicas[0].ballot - 1, context=8))
    c.process()
    assert [m.reject for m in c.sent if m.type == M.READ_INDEX_REPLY and m.context == 8] == [True]


# ---------------------------------------------------------------------- lease reads (off by default)
def _read_rounds(c):
    return {m.context for m in c.sent if m.type == M.HEARTBEAT and m.context > 0}


def test_lease_reads_are_off_by_default_and_bounded_by_the_election_timeout():
    assert Config(node=0, num_nodes=3, rng=random.Random(0)).lease_read_ticks == 0
    with pytest.raises(ValueError):
        Replica(Config(node=0, num_nodes=3, rng=random.Random(0), election_timeout_ticks=10,
                       lease_read_ticks=9))


def _lease_cluster(**config):
    c = Cluster(3, election_timeout_ticks=10, lease_read_ticks=8, **config)
    for _ in range(200):
        c.tick()
        if c.leaders():
            break
    [leader] = c.leaders()
    c.tick(2)  # the new leader's no-op commits everywhere
    return c, leader, [i for i in range(3) if i != leader]


def test_leader_serves_a_lease_read_without_a_round_until_the_lease_ends():
    c, ld, _ = _lease_cluster(heartbeat_interval_ticks=100)
    leader = c.replicas[ld]
    leader.read("r0")  # this read runs a round; its quorum starts the lease
    c.deliver()
    assert c.reads[ld] == ["r0"]
    rounds = _read_rounds(c)
    c.tick(3, nodes=[ld])
    leader.read("lease")
    c.process()
    assert c.reads[ld] == ["r0", "lease"] and _read_rounds(c) == rounds  # no round for it
    c.tick(5, nodes=[ld])  # the lease (8 ticks from the round's start) is over
    leader.read("after")
    c.process()
    assert c.reads[ld] == ["r0", "lease"]  # needs a round now
    c.deliver()
    assert c.reads[ld] == ["r0", "lease", "after"] and len(_read_rounds(c)) == len(rounds) + 1


def test_a_clock_jump_voids_the_lease():
    c, ld, _ = _lease_cluster(heartbeat_interval_ticks=100)
    leader = c.replicas[ld]
    leader.read("r0")
    c.deliver()
    leader.clock_jumped()  # the driver stalled: it could not deliver the ticks that passed
    c.isolate(ld)
    leader.read("r1")
    c.deliver()
    assert c.reads[ld] == ["r0"]  # no lease, no quorum: not served


def test_with_leases_a_replica_promises_no_new_leader_soon_after_hearing_one_or_starting():
    c, ld, (f1, f2) = _lease_cluster()
    c.crash(f2)
    c.restart(f2)  # a restarted replica does not know whose lease it may have granted
    c.replicas[f1]._campaign_real()
    c.deliver()
    assert c.leaders() == [ld]  # f1 heard the leader just now; f2 has just started
    c.isolate(ld)
    for _ in range(200):  # an election timeout later the lease is surely over
        c.tick(1, nodes=[f1, f2])
        if any(c.replicas[i].is_leader for i in (f1, f2)):
            break
    assert any(c.replicas[i].is_leader for i in (f1, f2))


def test_a_round_in_flight_across_a_clock_jump_confirms_its_reads_but_starts_no_lease():
    """Found by the simulator (seed 545, 5 nodes): a round started before a pause and
    confirmed after it must not start a lease measured from its start on the old clock."""
    c, ld, _ = _lease_cluster(heartbeat_interval_ticks=100)
    leader = c.replicas[ld]
    leader.read("r0")
    c.process()  # the round's heartbeats are out
    leader.clock_jumped()  # ... and the leader sleeps through a pause before the replies come
    c.deliver()
    assert c.reads[ld] == ["r0"] and leader.lease_until < leader.ticks
    c.isolate(ld)
    leader.read("r1")
    c.deliver()
    assert c.reads[ld] == ["r0"]
