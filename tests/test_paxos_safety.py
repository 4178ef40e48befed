"""Safety regressions of the Paxos core, replayed message by message.

Each test scripts one schedule the simulator could produce (drops, duplicates,
delays, restarts) and checks agreement: no two replicas ever apply different
values at one slot. The first replays issue 10 step by step.
"""

from __future__ import annotations

import msgpack

from kvstore._native import encode_record
from kvstore.paxos import KIND_BATCH, Message, make_ballot
from kvstore.paxos import messages as M
from kvstore.sim.network import Cluster

A, B, C = 0, 1, 2


def take(c: Cluster, type_: str, frm: int, to: int) -> list:
    """Remove the in-flight messages of one type on one link and hand them to the test."""
    c.process()
    picked = [m for m in c.inbox if m.type == type_ and m.frm == frm and m.to == to]
    c.inbox = [m for m in c.inbox if m not in picked]
    return picked


def step(c: Cluster, m: Message) -> None:
    """Deliver one message now and carry out the Ready it causes (its replies stay in flight)."""
    c.replicas[m.to].step(m)
    c.process()


def uncut(c: Cluster, a: int, b: int) -> None:
    c.cut_links -= {(a, b), (b, a)}


class AgreementLog:
    """Everything each node applied, across restarts: slot -> (kind, commands)."""

    def __init__(self, c: Cluster) -> None:
        self.c = c
        self.by_slot: dict = {}
        self.seen = [0] * c.n

    def collect(self) -> None:
        for i in range(self.c.n):
            entries = self.c.applied[i]
            for e in entries[self.seen[i]:]:
                value = (e.kind, tuple(e.commands))
                first = self.by_slot.setdefault(e.slot, (i, value))
                assert first[1] == value, (f"agreement violated at slot {e.slot}: n{first[0]} applied "
                                           f"{first[1]}, n{i} applied {value}")
            self.seen[i] = len(entries)

    def forget_restarted(self, i: int) -> None:
        self.seen[i] = 0


def test_duplicated_prepare_after_snapshot_install_cannot_overwrite_chosen_slots():
    """Issue 10, step by step, on 3 nodes A, B, C (pre-vote off, no slots retained below a snapshot)."""
    c = Cluster(3, pre_vote=False, log_retain_slots=0, batch_commands_max=1)
    log = AgreementLog(c)

    # 1. A leads with B while C is cut off; cmd0-cmd11 are chosen at slots 1-12 (slot 0 is A's
    #    no-op); A compacts through 12. B's commit point is 11 (the last Accept carried 11).
    c.isolate(C)
    c.campaign(A)
    assert c.leaders() == [A]
    for i in range(12):
        c.propose(A, b"cmd%d" % i)
    assert c.replicas[A].commit_index == 12 and c.replicas[B].commit_index == 11
    log.collect()
    c.disks[A].snapshot_index, c.disks[A].snapshot_data = 12, b"STATE@12"  # saved durably first
    c.replicas[A].compact(12, b"STATE@12")
    c.process()
    assert c.records[A] == {}

    # 2. A restarts. B campaigns; A rejects it and sends B its snapshot through 12: delayed.
    c.crash(A)
    c.restart(A)
    log.forget_restarted(A)
    c.replicas[B].campaign()
    prepare_to_a = take(c, M.PREPARE, B, A)
    assert len(prepare_to_a) == 1
    step(c, prepare_to_a[0])
    delayed_snapshot = take(c, M.SNAPSHOT, A, B)
    assert delayed_snapshot and take(c, M.PROMISE, A, B)[0].reject
    assert c.replicas[B].commit_index == 11

    # 3. C reconnects to B (A's link to C stays down) and campaigns, until its ballot is high
    #    enough; its Prepare to B is duplicated; B's Promise to the first copy is dropped.
    uncut(c, B, C)
    for _ in range(5):
        c.replicas[C].campaign()
        prepare = take(c, M.PREPARE, C, B)
        assert len(prepare) == 1
        step(c, prepare[0])
        promise = take(c, M.PROMISE, B, C)
        if not promise[0].reject:
            break
        step(c, promise[0])  # a rejection: C learns the round in use and tries again
    assert not promise[0].reject and len(promise[0].records) == 13  # the dropped Promise
    duplicate = prepare[0]

    # 4. The delayed snapshot reaches B, promised to C's ballot: not from its leader, ignored
    #    (issue 10's B installed it, and lost the slots its first Promise had shown).
    for m in delayed_snapshot:
        step(c, m)
    assert c.replicas[B].commit_index == 11 and c.replicas[B].log_start == 0

    # 5. The duplicate Prepare reaches B. 6. C must not lead from a Promise that omits chosen
    #    slots; whatever C does next, it never applies anything but cmd0-cmd2 at slots 1-3.
    step(c, duplicate)
    answer = take(c, M.PROMISE, B, C)
    assert [m.reject for m in answer] == [False]  # B still holds slots 0-12 to show C
    assert len(answer[0].records) == 13
    step(c, answer[0])
    c.deliver()
    if c.replicas[C].is_leader:
        c.propose(C, b"new0", b"new1", b"new2")
    c.tick(3)
    log.collect()

    # Then heal everything, elect whoever times out first, write, and check again.
    c.heal()
    for _ in range(100):
        c.tick()
        if c.leaders():
            break
    leader = c.leaders()[0]
    c.propose(leader, b"after")
    c.tick(30)
    log.collect()
    for i in range(3):
        assert c.replicas[i].commit_index >= 14, f"n{i} did not catch up: {c.replicas[i].status()}"
    chosen = [log.by_slot[s][1] for s in sorted(log.by_slot)]
    commands = [cmd for _, cmds in chosen for cmd in cmds]
    assert commands[:12] == [b"cmd%d" % i for i in range(12)]
    assert b"after" in commands


def test_promise_that_omits_slots_below_the_promisers_commit_point_is_not_a_vote():
    """The candidate's side: a Promise whose commit point is above the candidate's but whose
    records do not cover the slots in between cannot prove what was chosen there."""
    c = Cluster(3, pre_vote=False)
    r = c.replicas[C]
    r.campaign()
    b = r.ballot
    c.process()
    c.inbox = []
    r.step(Message(M.PROMISE, C, B, ballot=b, commit_index=12, records=(), context=r.campaign_context))
    c.process()
    assert not r.is_leader
    # The same promiser with the records in between is a vote.
    recs = tuple(encode_record(s, make_ballot(1, A), KIND_BATCH, msgpack.packb([b"cmd%d" % s]))
                 for s in range(13))
    r.step(Message(M.PROMISE, C, B, ballot=b, commit_index=12, records=recs, context=r.campaign_context))
    c.process()
    assert r.is_leader
    assert r.commit_index == 12  # the chosen slots it was shown are committed at once


def test_snapshot_chunks_from_two_senders_are_never_spliced():
    """Two leaders in turn stream snapshots of the same index (their bytes may differ);
    chunks arrive interleaved, one is duplicated late, one claims the other's ballot:
    what is installed is the whole snapshot of the leader of the ballot promised."""
    c = Cluster(3, snapshot_chunk_bytes=4)
    r = c.replicas[C]
    ba, bb = make_ballot(1, A), make_ballot(2, B)
    first = [Message(M.SNAPSHOT, C, A, ballot=ba, snapshot_index=7, offset=o, size=8, data=d,
                     done=o == 4) for o, d in ((0, b"AAAA"), (4, b"aaaa"))]
    second = [Message(M.SNAPSHOT, C, B, ballot=bb, snapshot_index=7, offset=o, size=8, data=d,
                      done=o == 4) for o, d in ((0, b"BBBB"), (4, b"bbbb"))]
    forged = Message(M.SNAPSHOT, C, A, ballot=bb, snapshot_index=7, offset=4, size=8, data=b"XXXX",
                     done=True)
    r.step(Message(M.HEARTBEAT, C, A, ballot=ba, commit_index=-1))
    r.ready()
    r.step(first[0])
    assert r.ready().snapshot is None
    r.step(Message(M.HEARTBEAT, C, B, ballot=bb, commit_index=-1))  # C now follows B
    r.ready()
    for m in (second[0], first[1], first[0], forged):
        r.step(m)
        assert r.ready().snapshot is None  # A's chunks, at a ballot no longer promised, and
        # a chunk at B's ballot from A, are ignored
    r.step(second[1])
    rd = r.ready()
    assert rd.snapshot is not None and rd.snapshot.data == b"BBBBbbbb"
    assert r.commit_index == 7


def test_learning_a_chosen_slot_keeps_a_higher_ballot_acceptance_of_the_same_value():
    """A follower acknowledged slot 5 at ballot 10.1 (a re-proposal of the value chosen at 9.4);
    the 9.4 leader's record of it, sent as chosen, must not replace that acceptance."""
    r = Cluster(3).replicas[A]
    value = msgpack.packb([b"v"])
    high, low = make_ballot(10, B), make_ballot(9, C)
    r.step(Message(M.ACCEPT, A, B, ballot=high, commit_index=-1,
                   records=(encode_record(5, high, KIND_BATCH, value),)))
    r.ready()
    higher = make_ballot(11, C)
    r.step(Message(M.ACCEPT, A, C, ballot=higher, commit_index=6,
                   records=(encode_record(5, low, KIND_BATCH, value),)))
    rd = r.ready()
    assert r.log[5][0] == high and rd.records == []
    # A different value sent as chosen does replace what was only accepted.
    other = encode_record(5, low, KIND_BATCH, msgpack.packb([b"w"]))
    r.step(Message(M.ACCEPT, A, C, ballot=higher, commit_index=6, records=(other,)))
    assert r.ready().records == [other]
