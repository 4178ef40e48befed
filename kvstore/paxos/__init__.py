"""Multi-Paxos for one shard, as a pure state machine (see ``replica.py``).

``replica`` (the core protocol), ``reads``, ``snapshots``, ``recovery`` (rooms of
``Replica``), ``interface`` (``Config``, ``Ready``, ``Entry``... what a driver sees),
``messages``, ``ballot``, ``batch``.
"""

from kvstore.paxos.ballot import ballot_node, ballot_round, make_ballot
from kvstore.paxos.messages import Message, from_wire, to_wire
from kvstore.paxos.replica import (
    KIND_BATCH, KIND_NOOP, Bugs, Config, Entry, NotLeader, PersistedState, Ready, Replica, Snapshot,
)

__all__ = ["make_ballot", "ballot_round", "ballot_node", "Message", "to_wire", "from_wire",
           "Replica", "Config", "Bugs", "Ready", "Entry", "Snapshot", "PersistedState", "NotLeader",
           "KIND_NOOP", "KIND_BATCH"]
