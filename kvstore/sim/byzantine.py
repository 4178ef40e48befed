"""A byzantine-input sender for the simulator: an extra endpoint that speaks the peer
protocol with fuzzed fields (issue 18).

Its messages reach a node through the node's own decode path: the frame is made
with ``wire.encode_paxos`` and read back with ``wire.decode`` (the range checks of
every field and record), then ``wire.check_paxos_message`` (sender, addressee, every
command one the state machine applies), then the replica's own guards. It sends
only what no honest replica could send, each message out of range or out of line
with its sender, its type or the receiver's state at the moment it arrives (it is
delivered at once): ballots near 2**64, negative or past the round cap, rounds far
above any in use, slots and commit points past any log, match indexes past what the
leader proposed, records with a valid checksum whose payload is not a command batch
(or holds commands the machine cannot apply), snapshots from a node that is not the
leader of the ballot the receiver promised (holding a valid, empty state: only the
sender rule stands in the way), chosen values above the commit point they are sent
with (or sent to a leader by a member of its own epoch), snapshots from that leader
whose state does not decode or whose chunks do not add up, messages claiming another sender than the
frame's, a node outside the cluster, or the receiver itself.

A message an honest replica could have sent (a well-formed Accept from the leader at
its ballot) is not fuzzing but impersonation: telling the two apart is the
transport's authentication (peers on their own port, Curve keys), not validation's.

The oracle's checks must keep passing with it on; ``Bugs.unchecked_peer_input``
hands its messages to the replica unchecked (and turns the replica's guards off),
and ``Bugs.snapshot_from_anyone`` drops the snapshot sender rule, to show they
would be caught.
"""

from __future__ import annotations

import random

import msgpack

from kvstore._native import encode_record
from kvstore.paxos import messages as M
from kvstore.paxos.ballot import BALLOT_MAX, ROUND_MAX, ballot_node, make_ballot
from kvstore.paxos.batch import encode_batch
from kvstore.paxos.messages import Message
from kvstore.paxos.replica import KIND_BATCH, KIND_NOOP, LEADER, ROUND_JUMP_MAX, SLOT_SPAN_MAX
from kvstore.sim.kv import KV, encode_command

U64_MAX = (1 << 64) - 1
I64_MIN = -(1 << 63)


def _state(r) -> tuple:
    """What a message could change in a replica, its outputs included. Not the snapshot
    transfer under way, nor its acknowledgements: a chunk claiming the leader of the
    promised ballot starts or extends one (and a bad one is refused whole, at its last
    chunk), and is acknowledged by offset (what the receiver holds); it costs the leader
    a retransmission."""
    told = sum(1 for m in r._out_messages if m.type != M.SNAPSHOT_ACK)
    return (r.promised, r.max_round, r.role, r.leader, r.commit_index, r.applied_index, r.snapshot_index,
            r.log_start, len(r.log), max(r.log, default=-1), told, len(r._out_records))


class Byzantine:
    """The fuzzing state of one simulation (``realbyzantine.RealNodeByzantine`` sends what it makes)."""

    def __init__(self, sim, seed: int) -> None:
        self.sim = sim
        # Its own generator: the honest run of a seed is the same with it on or off,
        # as long as every message it sends is refused.
        self.rng = random.Random(f"byzantine-{seed}")
        self.sent = 0
        self.refused_at_decode = 0
        self.refused_by_node = 0
        self.attacks = [getattr(self, name) for name in sorted(dir(self)) if name.startswith("_attack_")]

    def summary(self) -> str:
        return (f"byzantine: {self.sent} sent, {self.refused_at_decode} refused at decode, "
                f"{self.refused_by_node} by the node's checks, the rest by the replica's guards")

    # ------------------------------------------------------------------ helpers
    def _other(self, node_id: int) -> int:
        """A cluster node other than ``node_id`` (itself in a one-node cluster)."""
        n = self.sim.config.nodes
        return node_id if n == 1 else (node_id + 1 + self.rng.randrange(n - 1)) % n

    def _huge(self) -> int:
        return self.rng.choice((U64_MAX, U64_MAX - self.rng.randrange(1 << 20), BALLOT_MAX + 1,
                                1 << 63, (ROUND_MAX + 1) << 16))

    def _negative(self) -> int:
        return self.rng.choice((-2, -3, -(1 << 20), I64_MIN))

    def _leader_view(self, node) -> tuple:
        """``(leader, ballot)`` as ``node`` sees them: the node of the ballot it follows (its
        promise; a recovering node's, the ballot of the leader it learns from), and that."""
        b = node.replica._followed_ballot()
        return ballot_node(b), b

    def _record(self, slot: int, ballot: int) -> bytes:
        """A record with a valid checksum whose payload is not what its kind says."""
        r = self.rng
        kind, payload = r.choice((
            (KIND_BATCH, b"\xc1"),
            (KIND_BATCH, msgpack.packb({"a": 1})),
            (KIND_BATCH, msgpack.packb([1, 2, 3])),
            (KIND_BATCH, encode_batch([b"\xc1"])),
            (KIND_BATCH, encode_batch([b"junk", b"more junk"])),
            (KIND_BATCH, encode_batch([encode_command(99, 1, "drop", b"a", ())])),
            (KIND_BATCH, encode_batch([encode_command(99, 1, "put", b"a", ())])),
            (KIND_NOOP, b"payload on a no-op"),
            (7, b""),
        ))
        return encode_record(max(slot, 0), ballot, kind, payload)

    # ------------------------------------------------------------------ attacks
    # Each returns ``(frame sender, message)`` for ``node``, or None if it does not apply.

    def _attack_huge_ballot(self, node):
        """Attack 1 of issue 18: a ballot near 2**64 (or just past the round cap)."""
        frm = self._other(node.id)
        t = self.rng.choice((M.HEARTBEAT, M.ACCEPT, M.PREPARE, M.PRE_VOTE, M.SNAPSHOT))
        m = Message(t, node.id, frm, ballot=self._huge() | frm, commit_index=node.replica.commit_index)
        return frm, m

    def _attack_negative_field(self, node):
        frm = self._other(node.id)
        field = self.rng.choice(("ballot", "commit_index", "match_index", "snapshot_index", "hint", "context"))
        m = Message(M.ACCEPTED, node.id, frm, **{field: self._negative()})
        return frm, m

    def _attack_round_far_above(self, node):
        """A ballot in range but far above any round in use (or a hint of one): a peer
        that took it would lock every honest ballot out, up to the round cap."""
        r = node.replica
        frm = self._other(node.id)
        far = min(ROUND_MAX, r.max_round + ROUND_JUMP_MAX + 1 + self.rng.randrange(1 << 20))
        if self.rng.random() < 0.5:
            m = Message(M.HEARTBEAT, node.id, frm, ballot=make_ballot(far, frm), commit_index=r.commit_index)
        else:
            m = Message(M.PROMISE, node.id, frm, ballot=r.ballot, reject=True, hint=make_ballot(far, frm))
        return frm, m

    def _attack_slot_past_any_log(self, node):
        r = node.replica
        leader, b = self._leader_view(node)
        if leader == node.id or b == 0:
            leader = self._other(node.id)
            b = make_ballot(r.max_round + 1, leader)
        if self.rng.random() < 0.5:
            slot = r.commit_index + SLOT_SPAN_MAX + 1 + self.rng.randrange(1 << 30)
            rec = encode_record(slot, b, KIND_NOOP, b"")
            return leader, Message(M.ACCEPT, node.id, leader, ballot=b, commit_index=r.commit_index, records=(rec,))
        field = self.rng.choice(("commit_index", "match_index", "snapshot_index"))
        return leader, Message(M.HEARTBEAT, node.id, leader, ballot=b, **{field: M.SLOT_MAX + 1 + self.rng.randrange(1 << 20)})

    def _attack_match_past_proposals(self, node):
        """To a leader: a follower 'accepted' slots it never proposed."""
        r = node.replica
        if r.role != LEADER:
            return None
        frm = self._other(node.id)
        if frm == node.id:
            return None
        m = Message(M.ACCEPTED, node.id, frm, ballot=r.ballot, commit_index=r.commit_index,
                    match_index=r.next_slot + self.rng.randrange(64))
        return frm, m

    def _attack_garbage_payload(self, node):
        """Attack 2 of issue 18: an Accept (or a Promise) whose records have a valid
        checksum and a payload that is not a batch of commands the machine applies."""
        r = node.replica
        leader, b = self._leader_view(node)
        if leader == node.id or b == 0 or self.rng.random() < 0.5:
            leader = self._other(node.id)
            if leader == node.id:
                return None
            b = make_ballot(r.max_round + 1 + self.rng.randrange(3), leader)
        slot = r.commit_index + 1 + self.rng.randrange(4)
        records = (self._record(slot, b),)
        if r.role == "candidate" and self.rng.random() < 0.5:
            return leader, Message(M.PROMISE, node.id, leader, ballot=r.ballot, commit_index=r.commit_index,
                                   records=records)
        return leader, Message(M.ACCEPT, node.id, leader, ballot=b, commit_index=r.commit_index + 1,
                               records=records)

    def _attack_chosen_out_of_line(self, node):
        """A ``Chosen`` no honest member sends: a record above the commit point it gives
        (only values at or below it are chosen), or, to a leader, chosen values from a
        member of its own epoch (a leader learns its epoch's values by its own rounds)."""
        r = node.replica
        frm = self._other(node.id)
        if frm == node.id:
            return None
        c = r.commit_index
        if r.role == LEADER and self.rng.random() < 0.5:
            rec = encode_record(c + 1, r.ballot, KIND_NOOP, b"")
            return frm, Message(M.CHOSEN, node.id, frm, ballot=r.promised, commit_index=c + 1, records=(rec,))
        rec = encode_record(c + 2 + self.rng.randrange(4), r.promised, KIND_NOOP, b"")
        return frm, Message(M.CHOSEN, node.id, frm, ballot=r.promised, commit_index=c + 1, records=(rec,))

    def _attack_snapshot_from_a_non_leader(self, node):
        """Attack 3 of issue 18: a valid (empty) state that would wipe the receiver, from
        a node that is not the leader of the ballot it promised."""
        r = node.replica
        leader, b = self._leader_view(node)
        sender = self._other(node.id)
        if sender == leader or sender == node.id:
            return None
        ballot = b if self.rng.random() < 0.5 else make_ballot(r.max_round + self.rng.randrange(3), sender)
        if (ballot == b and ballot_node(b) == sender) or (sender, ballot) == r.snapshot_source:
            return None  # (a member that offered its snapshot to a node behind is let in)
        data = KV().snapshot()
        index = r.commit_index + 1 + self.rng.randrange(8)
        return sender, Message(M.SNAPSHOT, node.id, sender, ballot=ballot, snapshot_index=index,
                               offset=0, size=len(data), data=data, done=True)

    def _attack_bad_snapshot_from_the_leader(self, node):
        """From the leader of the ballot promised: a state that does not decode, or chunks
        that do not add up."""
        r = node.replica
        leader, b = self._leader_view(node)
        if leader == node.id or b == 0:
            return None
        index = r.commit_index + 1 + self.rng.randrange(8)
        if self.rng.random() < 0.5:
            data = self.rng.choice((b"\xc1", b"not a state", msgpack.packb([[[1]], 2])))
            m = Message(M.SNAPSHOT, node.id, leader, ballot=b, snapshot_index=index, offset=0,
                        size=len(data), data=data, done=True)
        else:
            m = Message(M.SNAPSHOT, node.id, leader, ballot=b, snapshot_index=index,
                        offset=self.rng.randrange(1, 100), size=self.rng.randrange(0, 50), data=b"xyz",
                        done=self.rng.random() < 0.5)
        return leader, m

    def _attack_other_sender(self, node):
        """Messages claiming a sender the frame does not come from, one outside the
        cluster, or the receiver itself; or addressed to another node."""
        r = node.replica
        # "outside the cluster": past every index a node has, or a membership names (with
        # membership changes, a learner added that has not joined yet is a member)
        n = self.sim.indexes_in_use()
        leader, b = self._leader_view(node)
        how = self.rng.randrange(4)
        m = Message(M.HEARTBEAT, node.id, leader, ballot=b if b else make_ballot(1, leader),
                    commit_index=r.commit_index)
        if how == 0:  # the frame from someone else than the message says
            return (leader + 1 + self.rng.randrange(n + 2)) % (n + 3), m
        if how == 1:  # a node outside the cluster
            frm = n + self.rng.randrange(M.NODES_MAX - n) if n < M.NODES_MAX else 0
            return frm, Message(M.HEARTBEAT, node.id, frm, ballot=make_ballot(r.max_round + 1, frm))
        if how == 2:  # the receiver itself
            return node.id, Message(M.ACCEPTED, node.id, node.id, ballot=b)
        other = self._other(node.id)  # addressed to another node
        return leader, Message(M.HEARTBEAT, other if other != leader else n + 1, leader, ballot=b)

    def _attack_proposer_ballot_of_another(self, node):
        """A Prepare, Accept or Heartbeat whose ballot names another node than its sender."""
        r = node.replica
        frm = self._other(node.id)
        owner = (frm + 1 + self.rng.randrange(M.NODES_MAX - 1)) % M.NODES_MAX
        t = self.rng.choice((M.PREPARE, M.ACCEPT, M.HEARTBEAT, M.PRE_VOTE))
        return frm, Message(t, node.id, frm, ballot=make_ballot(r.max_round + 1, owner),
                            commit_index=r.commit_index)
