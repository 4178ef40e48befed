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
membership the cluster was bootstrapped with (cluster.toml's nodes, sorted by name).
It is fixed for the cluster's life, while the members change, so a node keeps it
in its data directory (``CLUSTER_ID_FILE``); a node that joins later receives it
from the cluster.
"""

from __future__ import annotations

import hashlib
import logging
import os

import msgpack

from kvstore.errors import InvalidArgument, StorageError
from kvstore.transport.sockets import NodeSockets, peer_identity, shape_fingerprint
from kvstore.paxos.membership import check_membership
from kvstore.paxos.replica import Membership
from kvstore.transport import wire
from kvstore.transport.members import (MAX_INFO_BYTES, MAX_NODES, NAME, Member, decode_info,
                                       describe, encode_info)

log = logging.getLogger("kvstore.node")

#: A ``member change`` request waits this long for its change at most, then is told to
#: look again (``STATUS_RETRY``).
MEMBER_CHANGE_WAIT_SECONDS = 20.0

#: The cluster's identity in a node's data directory, with this node's index and name:
#: ``<16 hex digits> <index> <name>`` and a newline. A node's index never changes.
CLUSTER_ID_FILE = "cluster-id"
#: The membership each shard of a node started from (msgpack, per shard ``[epoch, start,
#: voters, learners, info]``): cluster.toml's epoch 0, or what the cluster told a node
#: that joined. A replica starts from it whenever its shard's state holds no membership
#: of its own (``PersistedState.membership``): cluster.toml counts at the first start only.
START_FILE = "start-memberships"


def bootstrap_info(config) -> bytes:
    """The ``info`` of epoch 0: cluster.toml's nodes, indexed in name order."""
    return encode_info({i: Member(nm, config.addresses[nm], config.peer_address(nm))
                        for i, nm in enumerate(config.names)})


def cluster_id(info: bytes) -> bytes:
    """The identity of a cluster bootstrapped with ``info`` (8 bytes)."""
    return hashlib.sha256(b"kvstore-cluster\0" + info).digest()[:8]


def read_identity(data_dir: str) -> tuple | None:
    """``(cluster_id, index, name)`` kept in ``data_dir``, or None if it keeps none (a new
    directory, or one written before membership changes existed)."""
    path = os.path.join(data_dir, CLUSTER_ID_FILE)
    try:
        with open(path, "rb") as f:
            fields = f.read(256).split()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise InvalidArgument(f"cannot read {path}: {e.strerror or e}") from None
    try:
        value, index, name = bytes.fromhex(fields[0].decode("ascii")), int(fields[1]), \
            fields[2].decode("ascii")
    except (IndexError, UnicodeDecodeError, ValueError):
        value, index, name = b"", -1, ""
    if len(value) != 8 or not 0 <= index < MAX_NODES or not NAME.match(name):
        raise InvalidArgument(f"{path} does not hold a cluster identity (16 hex digits, this "
                              f"node's index and name): wipe the directory and add the node "
                              f"to the cluster again")
    return value, index, name


def write_identity(data_dir: str, value: bytes, index: int, name: str) -> None:
    """Keep the cluster's identity and this node's index and name in ``data_dir``, durably."""
    _write_durably(os.path.join(data_dir, CLUSTER_ID_FILE), f"{value.hex()} {index} {name}\n".encode())


def write_starts(data_dir: str, memberships: list) -> None:
    """Keep the membership each shard started from in ``data_dir`` (``START_FILE``)."""
    _write_durably(os.path.join(data_dir, START_FILE), msgpack.packb(
        [[m.epoch, m.start, list(m.voters), list(m.learners), m.info] for m in memberships],
        use_bin_type=True))


def read_starts(data_dir: str, nshards: int) -> list | None:
    """The memberships the shards started from (``write_starts``), checked; None if the
    directory keeps none."""
    path = os.path.join(data_dir, START_FILE)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_NODES * MAX_INFO_BYTES)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise InvalidArgument(f"cannot read {path}: {e.strerror or e}") from None
    try:
        items = msgpack.unpackb(raw, raw=False)
        out = [Membership(e, s, tuple(v), tuple(ln), info) for e, s, v, ln, info in items]
        if len(out) != nshards:
            raise ValueError(f"{len(out)} shards, not {nshards}")
        for m in out:
            if type(m.epoch) is not int or type(m.start) is not int or type(m.info) is not bytes:
                raise ValueError("a field of the wrong type")
            check_membership(m)
            decode_info(m.info)
    except Exception as e:  # msgpack's classes, a bad shape, a membership that is not one
        raise InvalidArgument(f"{path} does not hold the shards' first memberships "
                              f"({type(e).__name__}: {e})"[:300] + ": wipe the directory and "
                              "add the node to the cluster again") from None
    return out


def _write_durably(path: str, data: bytes) -> None:
    """``data`` in ``path``: written aside, synced, renamed, the directory synced."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(os.path.dirname(path), os.O_RDONLY)
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
        """``{index: Member}`` of cluster.toml's nodes, indexed in name order."""
        c = self.config
        return {i: Member(nm, c.addresses[nm], c.peer_address(nm)) for i, nm in enumerate(c.names)}

    def _identity(self, own_directory: bool) -> tuple:
        """``(index, cluster id)`` of this node, as its data directory keeps them, with the
        memberships its shards start from (``START_FILE``, ``self._starts``). A directory
        that keeps none (new, or older than membership changes) takes the index and the
        memberships a joining node was given, else its place in cluster.toml and
        cluster.toml's nodes (epoch 0), and keeps them. ``own_directory`` False (the
        simulator): the config's, nothing kept."""
        c = self.config
        self._starts = [self._fresh_start(s) for s in range(self.nshards)]
        if not own_directory:
            return c.index, b""
        kept = read_identity(c.data_dir)
        if kept is not None:
            value, index, name = kept
            if name != c.name:
                raise InvalidArgument(f"data directory {c.data_dir} is node {name}'s, not "
                                      f"{c.name}'s: start it as {name}, or wipe it")
            if (c.node_index is not None and c.node_index != index) or \
                    (c.cluster_id is not None and c.cluster_id != value):
                raise InvalidArgument(f"data directory {c.data_dir} holds node {name} of an "
                                      f"earlier membership (node #{index} of cluster "
                                      f"{value.hex()}); the cluster now has it as node "
                                      f"#{c.node_index} of {(c.cluster_id or b'').hex()}: "
                                      f"wipe the directory to join again")
            self._starts = read_starts(c.data_dir, self.nshards) or self._starts
            return index, value
        index = c.index
        value = c.cluster_id or cluster_id(bootstrap_info(c))
        try:  # the memberships first: a directory with an identity has them
            write_starts(c.data_dir, self._starts)
            write_identity(c.data_dir, value, index, c.name)
        except OSError as e:
            raise StorageError(f"cannot write the node's identity in {c.data_dir}: "
                               f"{e.strerror or e}", c.data_dir) from None
        return index, value

    def _start_membership(self, shard: int) -> Membership:
        """The membership a shard starts from when its state holds none (``_identity``)."""
        return self._starts[shard]

    def _fresh_start(self, shard: int) -> Membership:
        """A shard's first membership: the one the cluster told a joining node, else the
        bootstrap one (cluster.toml's nodes, epoch 0). A simulated node's addresses are no
        TCP ones: its ``info`` is empty."""
        c = self.config
        if c.memberships is not None:
            return c.memberships[shard]
        try:
            info = bootstrap_info(c)
        except ValueError:
            info = b""
        return Membership(0, 0, tuple(range(len(c.names))), (), info)

    def _current_members(self) -> dict:
        """``{index: Member}`` over every shard's current membership (``directory``); the
        bootstrap members where no membership carries them (the simulator's)."""
        return directory(r.membership for r in self.replicas) or self._bootstrap_members()

    def _check_members(self, checked: bool) -> None:
        """Refuse to start a node whose cluster.toml names other members than its data
        directory holds (those it started with, or those a change made since: the file
        counts at the first start only), or that is no member any more."""
        if not checked:
            return
        c = self.config
        named = self._bootstrap_members()
        if c.memberships is None and not same_members(named, self.members):
            raise InvalidArgument(disagreement("cluster.toml", named, self.members))
        if self.index not in self.members:
            raise InvalidArgument(f"node {self.name} is no member of the cluster any more (the "
                                  f"members are {describe(self.members)}): to bring it back, wipe "
                                  f"{c.data_dir} and add it again (`kvstore member add`)")

    def _open_sockets(self):
        """The node's ZeroMQ sockets: peers agree on the shard count and the cluster's
        identity, or refuse each other's frames; the members may change at run time."""
        keys = None
        if self.config.curve_keys:
            from kvstore.transport.security import CurveKeys
            keys = CurveKeys(self.config.curve_keys, "node")
        own = self.members[self.index]
        shape = shape_fingerprint(self.nshards, self.cluster)
        return NodeSockets(own.address, own.peer_address,
                           {i: m.peer_address for i, m in self.members.items() if i != self.index},
                           keys=keys, identity=peer_identity(self.index, self.nshards, shape,
                                                             own.peer_address))

    def _init_member_links(self) -> None:
        self._removed: set = set()  # indexes this node saw removed, not added again since
        self._provisional: dict = {}  # index -> peer address of a node no membership names yet
        #: ``member change`` requests waiting for their change:
        #: ``(identity, request_id, shard, epoch, since)``
        self._member_waits: list = []
        self._snapshots_due: set = set()  # shards to snapshot once their change is applied

    def _log_refused_peers(self) -> None:
        """One line per peer connection refused for its shape (``NodeSockets.refusals``)."""
        refusals = self.sockets.refusals
        if len(refusals) == len(self._refusals_logged):
            return
        for identity, why in refusals.items():
            if identity not in self._refusals_logged:
                self._refusals_logged.add(identity)
                log.error("refused a peer: %s; it takes no part in this cluster", why,
                          extra={"event": "peer_refused", "node": self.name, "why": why})

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
        the address of the lowest-indexed member, marked ``removed``: no leader has it, a
        client that spreads reads over the list only sends that node a little more, and
        nodes of the same members report the same list (``kvstore status`` compares them)."""
        members = self.members
        first = members[min(members)].address
        return [{"id": members[i].name, "address": members[i].address} if i in members
                else {"id": f"#{i}", "address": first, "removed": True}
                for i in range(max(members) + 1)]

    def _voter_names(self, replica) -> list:
        """The names of a shard's voters (``status()``: the quorum a cluster needs)."""
        return [self._name_of(i) for i in replica.membership.voters]

    # ------------------------------------------------------------------ changes
    def _on_membership(self, shard: int, m: Membership) -> None:
        """Shard ``shard`` moved to epoch ``m`` (its change is durable here): links to new
        members opened, to removed ones closed (once no shard names them), logged, and
        the ``member change`` requests waiting for it answered."""
        before, self.members = self.members, self._current_members()
        for index in before.keys() - self.members.keys() - {self.index}:
            self.sockets.remove_peer(index)
            self._removed.add(index)
        for index, member in self.members.items():
            if index != self.index:
                self.sockets.add_peer(index, member.peer_address)
                self._removed.discard(index)
                self._provisional.pop(index, None)
        names = decode_info(m.info)
        voters = [names[i].name if i in names else f"#{i}" for i in m.voters]
        learners = [names[i].name if i in names else f"#{i}" for i in m.learners]
        log.info("shard %d: membership epoch %d from slot %d: voters %s, learners %s%s", shard,
                 m.epoch, m.start, ", ".join(voters), ", ".join(learners) or "none",
                 "" if self.index in m.voters or self.index in m.learners else
                 "; this node is no member of the shard any more",
                 extra={"event": "membership", "node": self.name, "shard": shard,
                        "epoch": m.epoch, "voters": voters, "learners": learners})
        if self.replicas[shard].snapshot_index >= 0:
            self._snapshots_due.add(shard)
        waits, self._member_waits = self._member_waits, []
        for w in waits:
            if w[2] == shard and m.epoch >= w[3]:
                self._reply(w[0], w[1], wire.STATUS_OK, {"epoch": m.epoch})
            else:
                self._member_waits.append(w)

    def _snapshot_due(self, shard: int, replica) -> bool:
        """Whether to snapshot ``shard`` now: its log is compacted, and a change it applied
        since began an epoch its snapshot is older than. A replica sends no snapshot of an
        ended epoch, and one of this epoch's members that joined after it began (a
        learner just added) needs one: the log below the snapshot is gone."""
        if shard in self._snapshots_due and replica.applied_index >= replica.membership.start - 1:
            self._snapshots_due.discard(shard)
            return True
        return False

    def _on_member(self, identity, request_id: int, args: list) -> None:
        """``OP_MEMBER``: ``["list"]`` (any node: ``member_view``) or ``["change", shard,
        epoch, voters, learners, info]`` (the shard's leader proposes it; answered once
        it took effect, ``_on_membership``)."""
        if not args or args[0] not in ("list", "change"):
            raise ValueError("member takes [\"list\"] or [\"change\", shard, epoch, voters, "
                             "learners, info]")
        if args[0] == "list":
            self._reply(identity, request_id, wire.STATUS_OK, self.member_view())
            return
        if type(identity) is bytes and not self.sockets.may_administer(identity):
            # a client's key that is not an admin's (a forwarded change was checked by the
            # node its client asked; this node's own requests are its operator's)
            self.counters["refused_not_admin"] += 1
            self.stats.count(wire.OP_MEMBER, wire.STATUS_ERROR)
            self._reply(identity, request_id, wire.STATUS_ERROR, [
                "PermissionDenied", "changing the membership takes an admin key: this "
                "client's key is not listed in the key directory's admins/ (`kvstore keygen "
                "--client NAME --admin DIR` writes one)"])
            return
        if len(args) != 6:
            raise ValueError("member change takes [shard, epoch, voters, learners, info]")
        _change, shard, epoch, voters, learners, info = args
        shard = self._shard_arg(shard)
        r = self.replicas[shard]
        if not r.is_leader:
            self._not_leader(identity, request_id, wire.OP_MEMBER, args, r.leader_hint)
            return
        if type(epoch) is not int or type(info) is not bytes or not all(
                type(v) is list and all(type(i) is int for i in v) for v in (voters, learners)):
            raise ValueError("member change takes an epoch, voter and learner indexes, info bytes")
        m = r.membership
        if (list(m.voters), list(m.learners), m.info) == (sorted(voters), sorted(learners), info):
            self._reply(identity, request_id, wire.STATUS_OK, {"epoch": m.epoch})  # done already
            return
        if m.epoch != epoch:
            raise ValueError(f"shard {shard}'s membership changed meanwhile (it is at epoch "
                             f"{m.epoch}, not {epoch}): look again with `kvstore member list`")
        named = decode_info(info)
        if set(named) != set(voters) | set(learners):
            raise ValueError("a membership's info must name every voter and learner, no other")
        r.propose_membership(voters, learners, info)
        self._member_waits.append((identity, request_id, shard, epoch + 1,
                                   self.clock.monotonic()))

    def _fail_member_waits(self, shard: int | None, why: str) -> None:
        """``member change`` requests of ``shard`` (None: waiting too long, any shard) told
        to look again: their change may or may not take effect (a retry finds out)."""
        now = self.clock.monotonic()
        waits, self._member_waits = self._member_waits, []
        for w in waits:
            if w[2] == shard or (shard is None and now - w[4] > MEMBER_CHANGE_WAIT_SECONDS):
                self._reply(w[0], w[1], wire.STATUS_RETRY, why)
            else:
                self._member_waits.append(w)

    def member_view(self) -> dict:
        """``member list``'s answer from this node: the cluster's identity, and per shard
        its membership as this replica knows it (epoch, first slot, voters, learners,
        info) with its role, leader and commit point, and on the leader how far it knows
        each member holds the log (``match``: ``[[index, slot], ...]``)."""
        shards = []
        for s, r in enumerate(self.replicas):
            m = r.membership
            shard = {"shard": s, "epoch": m.epoch, "start": m.start, "voters": list(m.voters),
                     "learners": list(m.learners), "info": m.info, "role": r.role,
                     "leader_index": r.leader_hint, "commit_index": r.commit_index}
            st = r.status()
            if "match" in st:
                shard["match"] = sorted([i, v] for i, v in st["match"].items())
            shards.append(shard)
        return {"cluster": self.cluster.hex(), "node": self.name, "index": self.index,
                "nshards": self.nshards, "shards": shards}
