"""``kvstore.open(path, node_id="n1", cluster="cluster.toml")``: a replica of a cluster
running inside this process.

It is the same ``kvstore.node.loop.Node`` that ``kvstore-server`` runs (same loop,
same storage format, same sockets: the other nodes see an ordinary peer), on a
daemon thread of this process, and the ``KV`` it returns is a client of the
cluster whose first address is this node: requests go over loopback to the
local node, which answers reads for the shards it leads and points the client
at the leaders of the others, exactly as for a remote node. ``close()`` stops
the node (it finishes its loop turn) and releases the data directory.
"""

from __future__ import annotations

import os
import threading

from kvstore.client import ClusterKV
from kvstore.errors import InvalidArgument, KVError


class EmbeddedReplicaKV(ClusterKV):
    """The ``KV`` interface of a cluster, with one of its nodes running in this process."""

    def __init__(self, node, thread: threading.Thread, addresses: list, timeout: float) -> None:
        self._node = node
        self._thread = thread
        self.path = node.config.data_dir
        try:
            super().__init__(addresses, timeout, keys=node.config.curve_keys)
        except BaseException:
            self._stop_node()
            raise

    def _stop_node(self) -> None:
        self._node.stop()
        self._thread.join(30)
        if self._thread.is_alive():
            raise KVError(f"the embedded node {self._node.name} did not stop within 30 s")

    def status(self) -> dict:
        st = super().status()
        st["mode"] = "embedded replica"
        st["local_node"] = self._node.name
        st["path"] = self.path
        return st

    def close(self) -> None:
        if self._thread.is_alive() or not self._core._closed:
            try:
                super().close()
            finally:
                self._stop_node()

    def __repr__(self) -> str:
        return f"<kvstore.EmbeddedReplicaKV {self._node.name} {self.path!r}>"


def open_replica(path, node_id: str, cluster, timeout: float = 5.0) -> EmbeddedReplicaKV:
    """Start node ``node_id`` of the cluster described by the file ``cluster`` on ``path``."""
    from kvstore.node.loop import Node
    from kvstore.node.config import load_node_config
    if not isinstance(node_id, str) or not node_id:
        raise InvalidArgument(f"node_id must be a node name from the cluster file, got {node_id!r}")
    if not isinstance(cluster, (str, os.PathLike)):
        raise InvalidArgument("cluster must be the path of a cluster.toml file")
    config = load_node_config(os.fspath(cluster), node_id, os.fspath(path))
    node = Node(config)
    thread = threading.Thread(target=node.run, name=f"kvstore-node-{node_id}", daemon=True)
    thread.start()
    own = config.addresses[node_id]
    others = [config.addresses[n] for n in config.names if n != node_id]
    return EmbeddedReplicaKV(node, thread, [own] + others, timeout)
