"""The node's side of membership changes: who the members are, where they listen, and
which cluster this node belongs to.

Each shard's replica knows its own membership (``Replica.membership``: voters,
learners and ``info``, the members' names and addresses as
``kvstore.transport.members`` encodes them). The node needs one view over all
shards (``directory``: index -> member), to route a message to a node index, name
a leader, answer ``member list``; a shard may be an epoch ahead of another
while a change goes through them one by one, so the newest epoch of each
shard wins for the members it names.

The cluster's identity (``cluster_id``) is what peers must share beyond the
shard count (``kvstore.transport.sockets.shape_fingerprint``): a digest of the
membership the cluster was bootstrapped with (cluster.toml's nodes in file order).
It is fixed for the cluster's life, while the members change, so a node keeps it
in its data directory (``CLUSTER_ID_FILE``); a node that joins later receives it
from the cluster.
"""

from __future__ import annotations

import hashlib
import logging
import os

from kvstore.errors import InvalidArgument
from kvstore.transport.sockets import NodeSockets, peer_identity, shape_fingerprint
from kvstore.transport.members import MAX_NODES, Member, decode_info, describe, encode_info

log = logging.getLogger("kvstore.node")

#: The cluster's identity in a node's data directory: 16 hex digits and a newline.
CLUSTER_ID_FILE = "cluster-id"


def bootstrap_info(config) -> bytes:
    """The ``info`` of epoch 0: cluster.toml's nodes, indexes in file order."""
    return encode_info({i: Member(nm, config.addresses[nm], config.peer_address(nm))
                        for i, nm in enumerate(config.names)})


def cluster_id(info: bytes) -> bytes:
    """The identity of a cluster bootstrapped with ``info`` (8 bytes)."""
    return hashlib.sha256(b"kvstore-cluster\0" + info).digest()[:8]


def read_cluster_id(data_dir: str) -> bytes | None:
    """The cluster identity kept in ``data_dir``, or None if it keeps none (a new
    directory, or one written before membership changes existed)."""
    path = os.path.join(data_dir, CLUSTER_ID_FILE)
    try:
        with open(path, "rb") as f:
            text = f.read(64).strip()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise InvalidArgument(f"cannot read {path}: {e.strerror or e}") from None
    try:
        value = bytes.fromhex(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        value = b""
    if len(value) != 8:
        raise InvalidArgument(f"{path} does not hold a cluster identity (16 hex digits): "
                              f"restore it from another node of the cluster")
    return value


def write_cluster_id(data_dir: str, value: bytes) -> None:
    """Keep ``value`` in ``data_dir``, durably (written aside, synced, renamed, the
    directory synced)."""
    path = os.path.join(data_dir, CLUSTER_ID_FILE)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(value.hex().encode() + b"\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(data_dir, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def directory(memberships) -> dict:
    """``{index: Member}`` over every shard's membership: for each index, the member as
    the shard with the newest epoch naming it says."""
    out: dict = {}
    epochs: dict = {}
    for m in memberships:
        members = decode_info(m.info)
        for index in (*m.voters, *m.learners):
            member = members.get(index)
            if member is not None and m.epoch >= epochs.get(index, -1):
                out[index] = member
                epochs[index] = m.epoch
    return out


def same_members(a: dict, b: dict) -> bool:
    """Whether two ``{index: Member}`` name the same nodes at the same addresses (the
    indexes aside: a config file lists names, the cluster numbers them)."""
    return sorted(a.values()) == sorted(b.values())


def disagreement(path_hint: str, config_members: dict, held: dict) -> str:
    """The one line refusing a cluster.toml that disagrees with the members held."""
    return (f"{path_hint} only bootstraps a new cluster; the members are now "
            f"{describe(held)} (the file names {describe(config_members)}): list the current "
            f"members in it (`kvstore member list`), or start the node with --join")


class MemberDirectory:
    """The members a node knows and its links to them, a part of ``Node`` (the room of
    ``kvstore.node.loop``'s docstring that membership changes live in)."""

    def _bootstrap_members(self) -> dict:
        """``{index: Member}`` of cluster.toml's nodes, indexes in file order."""
        c = self.config
        return {i: Member(nm, c.addresses[nm], c.peer_address(nm)) for i, nm in enumerate(c.names)}

    def _cluster_id(self) -> bytes:
        """The cluster's identity (``kvstore.node.membership``): kept in the data directory;
        a directory that keeps none (new, or older than membership changes) takes the
        one of cluster.toml's bootstrap membership, or the one a joining node was given."""
        c = self.config
        value = read_cluster_id(c.data_dir)
        if value is None:
            value = c.cluster_id or cluster_id(bootstrap_info(c))
            write_cluster_id(c.data_dir, value)
        return value

    def _open_sockets(self):
        """The node's ZeroMQ sockets: peers agree on the shard count and the cluster's
        identity, or refuse each other's frames; the members may change at run time."""
        keys = None
        if self.config.curve_keys:
            from kvstore.transport.security import CurveKeys
            keys = CurveKeys(self.config.curve_keys, "node")
        own = self.members[self.index]
        shape = shape_fingerprint(self.nshards, self._cluster_id())
        return NodeSockets(own.address, own.peer_address,
                           {i: m.peer_address for i, m in self.members.items() if i != self.index},
                           keys=keys, identity=peer_identity(self.index, self.nshards, shape,
                                                             own.peer_address))

    def _link_unknown_peer(self, frm: int, identity: bytes) -> bool:
        """A Paxos batch from node ``frm``, which no membership this node holds names (a
        member of an epoch it has not reached: it learns from it). Its sender passed the
        same checks as any peer's (the Curve handshake with a node key, when the cluster
        has keys; a routing id of this cluster's shape); it is taken only if it can be
        answered: its routing id names its peer address, and a link to it is opened (the
        membership, once it names ``frm``, replaces it). An index this node saw removed
        stays refused until a membership names it again."""
        address = self.sockets.peer_address_of(identity)
        if frm == self.index or not 0 <= frm < MAX_NODES or frm in self._removed \
                or address is None:
            self._drop("unknown_peer", f"a paxos batch from node #{frm}, which this node "
                       f"cannot answer (no member of any epoch it holds)")
            return False
        self.sockets.add_peer(frm, address)
        self._provisional[frm] = address
        log.info("node #%d, not a member this node knows yet, reached it from %s: linked",
                 frm, address, extra={"event": "peer_linked", "node": self.name, "peer": frm})
        return True

    def _name_of(self, index: int) -> str:
        member = self.members.get(index)
        return member.name if member is not None else f"#{index}"

    def _nodes_by_index(self) -> list:
        """``status()["nodes"]``: the members by Paxos index (a client maps a leader's index
        to its address with it). An index no member holds (a node removed) is filled with
        this node's address, marked ``removed``: no leader has it, and a client that
        spreads reads over the list only sends this node a little more."""
        members, own = self.members, self.members[self.index].address
        return [{"id": members[i].name, "address": members[i].address} if i in members
                else {"id": f"#{i}", "address": own, "removed": True}
                for i in range(max(members) + 1)]
