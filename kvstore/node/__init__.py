"""One cluster node: the driver loop and what it reaches through its ports.

- ``loop``: ``Node``, the one driver loop that runs the shard replicas
  (``kvstore.paxos``), the 2PC resolver (``kvstore.txn``), request intake and
  the order of side effects, in production and in the simulator alike;
- ``intake``: a client's request checked, decoded once, queued or forwarded (``Node``'s
  ``Intake`` room); ``resolver``: the 2PC decide request and the settlement of
  abandoned transactions (its ``Resolver`` room);
- ``ports``: the clock, the transport and the planted bugs the simulator fills;
- ``storage``: ``WalReplicaStorage``, the node's durable state on the shared
  storage engine (``kvstore.storage``), applying through ``kvstore.machine``;
- ``config``: ``cluster.toml`` read and checked into a ``NodeConfig``.
"""

from kvstore.node.loop import Node, NodeConfig

__all__ = ["Node", "NodeConfig"]
