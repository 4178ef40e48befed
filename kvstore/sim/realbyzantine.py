"""The byzantine-input sender (``byzantine.py``) aimed at real nodes.

The same attacks, each on one shard's replica of an awake node, but delivered as a
frame on the node's peer port: the node's own ``_receive`` decodes it (the wire's
range checks), checks it (``wire.check_paxos_message``) and hands it to the
replica. The frame is delivered alone, at once, so that what it changed can be
told apart: every replica of the node must be as before (its state and its
outputs), and the oracle's checks must hold. With ``Bugs.unchecked_peer_input``
the frame skips the wire and the node's checks (the node is handed the decoded
message, and the planted bug turns its checks and the replica's guards off); with
``Bugs.snapshot_from_anyone`` a forged snapshot may be installed: then the
oracle's checks must catch what it does.
"""

from __future__ import annotations

from kvstore.sim.byzantine import Byzantine, _state
from kvstore.transport import wire
from kvstore.transport.sockets import PEER


class _Target:
    """What an attack reads of its target: the node's index and one shard's replica."""

    def __init__(self, index: int, replica) -> None:
        self.id = index
        self.replica = replica


class RealNodeByzantine(Byzantine):
    """The fuzzing endpoint of one real-node simulation (``realnode.Simulation``)."""

    def inject(self) -> None:
        sim, rng = self.sim, self.rng
        targets = [n for n in sim.nodes if n.up and n.paused_until <= sim.now]
        if not targets:
            return
        node = targets[rng.randrange(len(targets))]
        shard = rng.randrange(sim.config.shards)
        attack = self.attacks[rng.randrange(len(self.attacks))]
        made = attack(_Target(node.index, node.node.replicas[shard]))
        if made is None:
            return
        envelope, m = made
        self.sent += 1
        sim.log(f"byzantine {attack.__name__[8:]} -> n{node.index} shard {shard}: {m}")
        self.deliver_to(node, shard, envelope, m)

    def deliver_to(self, simnode, shard: int, envelope: int, m) -> None:
        sim, node = self.sim, simnode.node
        bugs = sim.config.bugs.paxos
        before = [_state(r) for r in node.replicas]
        if bugs.unchecked_peer_input:
            node._on_paxos(envelope, [(shard, m)])
        else:
            try:
                frame = wire.encode_paxos(envelope, [(shard, m)])
            except (wire.FrameError, ValueError, OverflowError):
                self.refused_at_decode += 1
                return
            dropped = _dropped(node)
            transport = simnode.transport
            waiting, transport.inbox = transport.inbox, [(PEER, b"node-%d" % envelope, frame)]
            node._receive()
            transport.inbox = waiting
            if _dropped(node) > dropped:
                self.refused_by_node += 1
        if [_state(r) for r in node.replicas] != before and not (
                bugs.unchecked_peer_input or bugs.snapshot_from_anyone):
            sim.fail(f"byzantine: n{simnode.index} acted on a fuzzed message: {m}")
        for s, r in enumerate(node.replicas):
            sim.oracles[s].check(simnode.index, r)


def _dropped(node) -> int:
    return sum(v for k, v in node.counters.items() if k.startswith("dropped_"))
