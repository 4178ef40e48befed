"""Issue 18, part B: what a peer sends is checked before it changes anything.

The replica's guards (``Replica._ignored``, the round cap, ``Config.snapshot_ok``),
a poisoned chosen value applied as a no-op (the core's ``ready`` and the node's
apply), and the node's checks of a peer's records (``wire.check_paxos_message``).
The wire format's range checks are property-tested in ``test_transport.py``, the
whole under fuzzing in the simulator (``test_sim.py``), the attacks against real
processes in ``test_cluster_hostile_peer.py``.
"""

from __future__ import annotations

import random

import msgpack
import pytest

from kvstore._native import encode_record
from kvstore.commands import OP_PUT
from kvstore.paxos import KIND_BATCH, KIND_NOOP, Config, Message, PersistedState, Replica, make_ballot
from kvstore.paxos import messages as M
from kvstore.paxos.ballot import BALLOT_MAX, ROUND_MAX
from kvstore.paxos.batch import encode_batch
from kvstore.paxos.replica import ROUND_JUMP_MAX, SLOT_SPAN_MAX
from kvstore.commands import POISONED, decode_logged_command, encode_client_command
from kvstore.machine.replica import ShardWrite, check_snapshot_data
from kvstore.node.storage import WalReplicaStorage
from kvstore.sim.network import Cluster
from kvstore.transport import wire

A, B, C = 0, 1, 2


def replica(node=B, n=3, persisted=None, **config) -> Replica:
    """A replica of a new cluster (with no Paxos state it votes only once every other node
    has reported holding nothing: ``replica.py``, "Wiped nodes"), or one on ``persisted``."""
    r = Replica(Config(node=node, num_nodes=n, rng=random.Random(0), **config), persisted)
    if r.recovering:
        nonce = r.recovery.nonce
        for i in range(n):
            if i != node:
                r.step(Message(M.RECOVER_REPLY, node, i, context=nonce))
        r.ready()
        assert not r.recovering
    return r


def follow(r: Replica, leader: int, round_: int = 1) -> int:
    """``r`` promises ``leader``'s ballot through a heartbeat; returns the ballot."""
    b = make_ballot(round_, leader)
    r.step(Message(M.HEARTBEAT, r.id, leader, ballot=b, commit_index=-1))
    r.ready()
    assert r.promised == b and r.leader == leader
    return b


def put(key: bytes, value: bytes, seq: int = 1) -> bytes:
    return encode_client_command(b"client", seq, 0, [OP_PUT, key, value])


# ---------------------------------------------------------------------- ballots
def test_a_campaign_at_the_round_cap_refuses_rather_than_overflow():
    """Issue 18, attack 1: a node that promised a ballot near the top made the next
    campaign's ballot overflow msgpack; past ROUND_MAX it refuses to campaign."""
    for pre_vote in (True, False):
        r = replica(persisted=PersistedState(promised=make_ballot(ROUND_MAX, A)), pre_vote=pre_vote)
        r.campaign()
        rd = r.ready()
        assert r.role == "follower" and not rd.messages
        for _ in range(200):
            r.tick()  # the election timer fires, and fires again: never an exception
        assert all(m.ballot <= BALLOT_MAX for m in r.ready().messages)


def test_every_ballot_a_replica_makes_fits_the_wire():
    r = replica(persisted=PersistedState(promised=make_ballot(ROUND_MAX - 1, A)), pre_vote=False)
    r.campaign()
    for m in r.ready().messages:
        wire.decode(wire.encode_paxos(B, [(0, m)]))  # no OverflowError, no FrameError


def test_a_ballot_far_above_any_round_in_use_is_ignored():
    r = replica()
    b = follow(r, A)
    far = make_ballot(1 + ROUND_JUMP_MAX + 1, C)
    r.step(Message(M.HEARTBEAT, B, C, ballot=far, commit_index=-1))
    r.step(Message(M.PREPARE, B, C, ballot=far, commit_index=-1))
    r.step(Message(M.ACCEPTED, B, C, ballot=b, reject=True, hint=far))
    rd = r.ready()
    assert r.promised == b and r.max_round == 1 and rd.promised is None and not rd.messages


# ---------------------------------------------------------------------- slots
def test_an_accept_of_a_slot_far_past_the_commit_point_is_ignored():
    r = replica()
    b = follow(r, A)
    rec = encode_record(SLOT_SPAN_MAX + 5, b, KIND_NOOP, b"")
    r.step(Message(M.ACCEPT, B, A, ballot=b, commit_index=-1, records=(rec,)))
    rd = r.ready()
    assert not r.log and not rd.records and not rd.messages


def test_a_leader_ignores_a_match_index_past_what_it_proposed():
    """A forged Accepted would have the leader count votes for slots never accepted."""
    c = Cluster(3)
    c.campaign(A)
    leader = c.replicas[A]
    c.isolate(B)
    c.isolate(C)
    assert leader.propose(b"x")
    c.process()
    c.inbox = []
    commit = leader.commit_index
    leader.step(Message(M.ACCEPTED, A, B, ballot=leader.ballot, commit_index=-1,
                        match_index=leader.next_slot + 3))
    assert leader.commit_index == commit
    assert leader.progress[B].match < leader.next_slot


# ---------------------------------------------------------------------- snapshots
def _chunk(to, frm, ballot, data, index=9):
    return Message(M.SNAPSHOT, to, frm, ballot=ballot, snapshot_index=index, offset=0, size=len(data),
                   data=data, done=True)


def test_a_snapshot_is_installed_only_from_the_leader_of_the_ballot_promised():
    """Issue 18, attack 3: a chunk holding an empty state 'from the leader' wiped a follower."""
    good = b"STATE"
    r = replica()
    b = follow(r, A)
    r.step(_chunk(B, C, b, good))  # from another node, at the promised ballot
    r.step(_chunk(B, C, make_ballot(1, C), good))  # from another node, at its own ballot
    r.step(_chunk(B, A, make_ballot(5, A), good))  # from the leader, at a ballot not promised
    r.step(_chunk(B, A, make_ballot(0, A), good))  # ... at ballot 0
    assert r.ready().snapshot is None and r.commit_index == -1
    r.step(_chunk(B, A, b, good))
    assert r.ready().snapshot.data == good and r.commit_index == 9


def test_a_snapshot_whose_state_does_not_decode_replaces_nothing():
    r = replica(snapshot_ok=check_snapshot_data)
    b = follow(r, A)
    for junk in (b"\xc1", msgpack.packb([[[1, 2]], []]), msgpack.packb({"a": 1}), b""):
        r.step(_chunk(B, A, b, junk))
        assert r.ready().snapshot is None and r.commit_index == -1
    state = msgpack.packb([[[b"k", b"raw"]], []])
    r.step(_chunk(B, A, b, state))
    assert r.ready().snapshot.data == state


# ---------------------------------------------------------------------- poisoned values
def test_a_poisoned_chosen_value_comes_out_of_ready_as_a_no_op():
    """Issue 18, attack 2: a chosen record whose payload is not a batch (0xc1) made
    ``ready()`` raise at every restart; it is a no-op that says why."""
    b = make_ballot(1, A)
    records = [encode_record(0, b, KIND_BATCH, encode_batch([b"ok0"])),
               encode_record(1, b, KIND_BATCH, b"\xc1"),
               encode_record(2, b, KIND_BATCH, msgpack.packb([1, 2])),
               encode_record(3, b, 9, b""),
               encode_record(4, b, KIND_BATCH, encode_batch([b"ok4"]))]
    r = replica(persisted=PersistedState(promised=b, commit_index=4, records=records))
    entries = r.ready().committed
    assert [e.slot for e in entries] == [0, 1, 2, 3, 4]
    assert [e.commands for e in entries] == [[b"ok0"], [], [], [], [b"ok4"]]
    assert [e.error is None for e in entries] == [True, False, False, False, True]
    assert all(e.kind == KIND_NOOP for e in entries[1:4])


def test_the_node_applies_a_poisoned_value_as_a_no_op_and_restarts_past_it(tmp_path):
    """A log holding chosen values the state code cannot apply (written before records
    were checked): applied as no-ops, reported POISONED, and a restart replays it the
    same way; the good commands around them are applied."""
    path = str(tmp_path / "n")
    b = make_ballot(1, A)
    bad = [b"\xc1", encode_client_command(b"c", 2, 0, [99, b"k"]),
           encode_client_command(b"c", 3, 0, [OP_PUT, b"k" * 600, b"v"]),
           msgpack.packb([b"c", 4, 0])]
    records = [encode_record(0, b, KIND_BATCH, encode_batch([put(b"a", b"1")] + bad + [put(b"b", b"2", 5)])),
               encode_record(1, b, KIND_BATCH, b"\xc1")]
    s = WalReplicaStorage(path, 1)
    s.save([ShardWrite(0, promised=b, commit_index=1, records=records)])
    s.close()
    for restart in range(2):
        s = WalReplicaStorage(path, 1)
        try:
            r = replica(persisted=s.load(0))
            results = s.save([ShardWrite(0, committed=r.ready().committed)])
            poisoned = [res for res in results if res[3] is POISONED]
            # the first start applies them; the second may again (an applied point needs no
            # fsync, the log replays): the same no-ops either way, never an exception
            assert len(poisoned) == 5 if restart == 0 else len(poisoned) in (0, 5)
            assert s.get(0, b"a")[0] == b"1" and s.get(0, b"b")[0] == b"2"
            assert s.get(0, b"k")[0] is None
        finally:
            s.close()


# ---------------------------------------------------------------------- the node's checks
def test_a_record_whose_commands_the_node_cannot_apply_is_refused():
    b = make_ballot(2, A)

    def accept(*commands):
        rec = encode_record(0, b, KIND_BATCH, encode_batch(list(commands)))
        m = Message(M.ACCEPT, B, A, ballot=b, commit_index=-1, records=(rec,))
        return wire.check_paxos_message(m, B, 3, decode_logged_command)

    assert accept(put(b"k", b"v")) is None
    assert "slot 0" in accept(put(b"k", b"v"), b"junk")
    assert accept(encode_client_command(b"c", 1, 0, [42, b"k"]))  # no such op
    assert accept(encode_client_command(b"c", 1, 0, [OP_PUT, b"k" * 512, b"v"]))  # key too long
    assert accept(encode_client_command(b"c", 1, 0, [OP_PUT, b"k", b"v" * (4 * 1024 * 1024 + 1)]))
    assert accept(encode_client_command(b"", 1, 0, [OP_PUT, b"k", b"v"]))  # no client id
    assert accept(encode_client_command(b"c", 1, 2, [OP_PUT, b"k", b"v"]))  # floor above seq


@pytest.mark.parametrize("frm,to", [(3, B), (A, 3), (B, B), (A, C)])
def test_a_message_from_or_to_a_node_outside_this_one_is_refused(frm, to):
    m = Message(M.HEARTBEAT, to, frm, ballot=make_ballot(1, frm))
    assert wire.check_paxos_message(m, B, 3, decode_logged_command) is not None
