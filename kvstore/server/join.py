"""``kvstore-server --join ADDRS --node NAME --data DIR``: a node that joins a running cluster.

The operator has added it first (``kvstore member add NAME --address A``: a learner of
every shard). It asks the cluster (any of ``ADDRS``) who the members are
(``kvstore.client.members``), finds itself there, and starts with each shard's
membership as the cluster holds it and the cluster's identity; it has no cluster.toml.
An empty directory then receives the log, or a snapshot, from each shard's leader. The
same command restarts it later (its directory keeps its index: ``cluster-id``).
"""

from __future__ import annotations

import os

from kvstore.errors import InvalidArgument, KVError
from kvstore.node.loop import NodeConfig
from kvstore.paxos.replica import Membership


def join_config(addresses: str, name: str, data_dir: str | None, timeout: float = 5.0,
                keys: str | None = None, **settings) -> NodeConfig:
    """The ``NodeConfig`` of member ``name`` of the cluster at ``addresses``; ``keys``: the
    ``kvstore keygen`` directory of a cluster with CurveZMQ (asked with its client key,
    joined with its node key); ``settings``: other ``NodeConfig`` fields (a join file's
    ``[tuning]`` and ``[watch]``: ``kvstore.node.config.join_settings``)."""
    import kvstore
    from kvstore.client.members import Members
    if not data_dir:
        raise InvalidArgument("--join needs --data DIR (an empty directory for a new member)")
    try:
        if keys is not None:
            from kvstore.transport.security import CurveKeys
            CurveKeys(keys, "node")  # every key file there and readable, or one clear error
        with kvstore.connect(addresses, timeout=timeout, keys=keys) as db:
            view = Members(db).view()
    except InvalidArgument:
        raise
    except KVError as e:
        raise InvalidArgument(f"--join {addresses}: cannot reach the cluster: {e}") from None
    if view.index_of(name) is None:
        raise InvalidArgument(f"{name} is no member of the cluster at {addresses}: add it first "
                              f"(`kvstore member add {name} --address tcp://HOST:PORT`)")
    return config_from_view(view, name, data_dir, keys, **settings)


def config_from_view(view, name: str, data_dir: str, keys: str | None = None,
                     **settings) -> NodeConfig:
    """The ``NodeConfig`` of member ``name`` (one ``view`` names) joining: its index, the
    cluster's identity and each shard's membership as the cluster holds them (also what
    the simulator's joining nodes start with, ``kvstore.sim.realmembers``)."""
    index = view.index_of(name)
    me = view.members()[index]
    return NodeConfig(
        name=name, names=[name], addresses={name: me.address},
        peer_addresses={name: me.peer_address}, shards=len(view.shards),
        data_dir=os.path.abspath(data_dir), cluster_id=bytes.fromhex(view.cluster),
        curve_keys=keys, **settings,
        node_index=index,
        memberships=[Membership(sh.epoch, sh.start, sh.voters, sh.learners, sh.info)
                     for sh in view.shards])
