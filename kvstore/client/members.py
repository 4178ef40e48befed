"""``kvstore member list | add | remove | promote``: the cluster's members, changed through
consensus (docs/operations.md, "Membership").

Each shard has its own membership (an epoch, its voters and learners, and the members'
names and addresses), changed by a log entry its leader proposes (``OP_MEMBER``
"change"); every shard is changed in turn, in shard order, one voter at a time. A change
names the epoch it starts from, so two operators racing cannot overwrite each other's
change: the second is told the membership moved and looks again. A change a shard
already shows is not made twice, so a command that failed half-way (a leader lost, a
timeout) is finished by running it again.

What ``list`` reports comes from every member (``OP_MEMBER`` "list"): per shard the
answer of its leader (its epoch is the newest), with how far the leader knows each
member holds the log. A member is caught up when, in every shard, the leader knows it
holds the log through the change that began the shard's epoch, and to within
``CAUGHT_UP_SLOTS`` of the commit point.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvstore.errors import InvalidArgument, KVError, PermissionDenied, Unavailable
from kvstore.transport import wire
from kvstore.transport.members import (MAX_NODES, NAME, Member, decode_info, encode_info,
                                       is_tcp_address)
from kvstore.transport.sockets import derived_peer_address

#: A member this many slots behind its leader's commit point (or closer) is caught up
#: (the node's own "catching up" threshold: ``kvstore.node.status.CATCHING_UP_SLOTS``).
CAUGHT_UP_SLOTS = 100
#: Seconds one shard's change may take, at most (a leader election included).
CHANGE_TIMEOUT = 30.0
VOTER = "voter"
LEARNER = "learner"


@dataclass
class ShardMembership:
    shard: int
    epoch: int
    start: int
    voters: tuple
    learners: tuple
    members: dict  # index -> Member
    info: bytes  # the members as the shard's membership carries them (encoded)
    leader: int | None
    commit_index: int
    match: dict | None  # index -> slot, from the leader's answer (None: no leader answered)

    def role(self, index: int) -> str | None:
        return VOTER if index in self.voters else LEARNER if index in self.learners else None

    def caught_up(self, index: int) -> bool | None:
        """Whether the leader knows ``index`` holds the log through this epoch's change at
        least, and to within ``CAUGHT_UP_SLOTS`` of its commit point (None: no leader)."""
        if self.match is None:
            return None
        return self.match.get(index, -1) >= max(self.start - 1, self.commit_index - CAUGHT_UP_SLOTS)


@dataclass
class MemberView:
    """The cluster's members as ``member list`` shows them."""

    cluster: str
    shards: list  # ShardMembership per shard
    unreachable: list = field(default_factory=list)  # members that did not answer

    def members(self) -> dict:
        """index -> Member over every shard (the newest epoch naming it wins)."""
        out, epochs = {}, {}
        for sh in self.shards:
            for i, m in sh.members.items():
                if sh.epoch >= epochs.get(i, -1):
                    out[i], epochs[i] = m, sh.epoch
        return out

    def index_of(self, name: str) -> int | None:
        return next((i for i, m in self.members().items() if m.name == name), None)

    def rows(self) -> list:
        """``[name, index, address, peer address, role, epochs, caught up]`` per member."""
        rows = []
        for i, m in sorted(self.members().items()):
            roles = {sh.role(i) for sh in self.shards}
            role = roles.pop() if len(roles) == 1 else "mixed: " + ",".join(
                f"{sh.shard}={sh.role(i) or '-'}" for sh in self.shards)
            ups = [sh.caught_up(i) for sh in self.shards]
            up = "?" if None in ups else "yes" if all(ups) else "no"
            epochs = sorted({sh.epoch for sh in self.shards})
            rows.append([m.name, i, m.address, m.peer_address, role or "-",
                         ",".join(map(str, epochs)), up])
        return rows

    def as_dict(self) -> dict:
        return {"cluster": self.cluster, "unreachable": self.unreachable,
                "members": [dict(zip(("name", "index", "address", "peer_address", "role",
                                      "epochs", "caught_up"), row)) for row in self.rows()],
                "shards": [{"shard": sh.shard, "epoch": sh.epoch, "voters": list(sh.voters),
                            "learners": list(sh.learners), "leader": sh.leader,
                            "commit_index": sh.commit_index} for sh in self.shards]}


def _checked_view(value) -> dict:
    """A node's ``member list`` answer, checked in every part read here."""
    ok = type(value) is dict and type(value.get("cluster")) is str and \
        type(value.get("shards")) is list and value["shards"]
    for sh in value.get("shards", []) if ok else ():
        ok = ok and type(sh) is dict and all(type(sh.get(k)) is int for k in
                                             ("shard", "epoch", "start", "commit_index")) \
            and all(type(sh.get(k)) is list and all(type(i) is int and 0 <= i < MAX_NODES
                                                   for i in sh[k]) for k in ("voters", "learners")) \
            and type(sh.get("info")) is bytes and type(sh.get("role")) is str
        if ok and "match" in sh:
            ok = type(sh["match"]) is list and all(
                type(p) is list and len(p) == 2 and type(p[0]) is int and type(p[1]) is int
                for p in sh["match"])
    if not ok:
        raise KVError("a node answered `member list` with something this client cannot read: "
                      "is it a kvstore node of this version?")
    return value


class Members:
    """The membership commands over a cluster client (``kvstore.connect``)."""

    def __init__(self, db) -> None:
        core = getattr(db, "_core", None)
        if core is None:
            raise InvalidArgument("member commands act on a cluster: pass --cluster ADDRS")
        self.core = core
        self.timeout = db.timeout

    def _list_at(self, target: str | None) -> dict:
        return _checked_view(self.core.call(wire.OP_MEMBER, None, ["list"],
                                            timeout=min(self.timeout, 3.0), target=target))

    def view(self) -> MemberView:
        """Every member asked; per shard, the leader's answer (else the newest epoch's)."""
        first = self._list_at(None)
        answers = [first]
        addresses = {m.address for sh in first["shards"] for m in decode_info(sh["info"]).values()}
        futures = {a: self.core.submit(wire.OP_MEMBER, None, ["list"],
                                       timeout=min(self.timeout, 3.0), target=a)
                   for a in sorted(addresses)}
        unreachable = []
        for address, future in futures.items():
            try:
                answers.append(_checked_view(self.core.wait(future)))
            except KVError:
                unreachable.append(address)
        shards = []
        for s in range(len(first["shards"])):
            mine = [a["shards"][s] for a in answers
                    if a["cluster"] == first["cluster"] and len(a["shards"]) > s]
            best = max(mine, key=lambda sh: (sh["epoch"], sh["role"] == "leader"))
            leader = next((sh for sh in mine if sh["role"] == "leader"
                           and sh["epoch"] == best["epoch"]), None)
            match = None if leader is None else {i: v for i, v in leader.get("match", [])}
            shards.append(ShardMembership(
                s, best["epoch"], best["start"], tuple(best["voters"]), tuple(best["learners"]),
                decode_info(best["info"]), best["info"],
                None if leader is None else leader["leader_index"],
                (leader or best)["commit_index"], match))
        return MemberView(first["cluster"], shards, unreachable)

    # ------------------------------------------------------------------ changes
    def add(self, name: str, address: str, peer_address: str | None = None, progress=None) -> int:
        """Add ``name`` as a learner of every shard; its index."""
        if not NAME.match(name or ""):
            raise InvalidArgument(f"a member's name is 1-64 letters, digits, '_', '.' or '-', "
                                  f"not {name!r}")
        if not is_tcp_address(address):
            raise InvalidArgument(f"--address must look like tcp://HOST:PORT, got {address!r}")
        if peer_address is None:
            peer_address = derived_peer_address(address)
        elif not is_tcp_address(peer_address):
            raise InvalidArgument(f"--peer-address must look like tcp://HOST:PORT, got "
                                  f"{peer_address!r}")
        member = Member(name, address, peer_address)
        view = self.view()
        index = view.index_of(name)
        if index is None:
            taken = set(view.members())
            for sh in view.shards:
                taken |= set(sh.voters) | set(sh.learners)
            free = [i for i in range(MAX_NODES) if i not in taken]
            if not free:
                raise InvalidArgument(f"the cluster has {MAX_NODES} members, the most it can have")
            # above every index in use while there is one: a client that knew a removed
            # node by its index finds no other node there (kvstore.client.topology)
            index = max(taken) + 1 if max(taken) + 1 < MAX_NODES else free[0]
        elif view.members()[index] != member:
            raise InvalidArgument(f"{name} is a member already, as {view.members()[index]}: "
                                  f"remove it first to change its addresses")

        def change(sh: ShardMembership):
            if sh.role(index) is not None:
                if sh.members.get(index) != member:  # a node removed, as a lagging node saw it
                    raise Unavailable(f"add {name}: shard {sh.shard} still shows index {index} "
                                      f"as another member; run the command again")
                return None
            return sh.voters, sh.learners + (index,), {**sh.members, index: member}
        self._each_shard(change, f"add {name}", progress)
        return index

    def promote(self, name: str, progress=None) -> None:
        """Make the learner ``name`` a voter of every shard, once it is caught up in all."""
        view = self.view()
        index = self._index(view, name)
        for sh in view.shards:
            if sh.role(index) == LEARNER and not sh.caught_up(index):
                where = ("no leader answered" if sh.match is None else
                         f"it holds the log to slot {sh.match.get(index, -1)}, the leader "
                         f"commits {sh.commit_index}")
                raise Unavailable(f"{name} is not caught up in shard {sh.shard} ({where}): "
                                  f"wait until `kvstore member list` says it is, then promote it")

        def change(sh: ShardMembership):
            if sh.role(index) == VOTER:
                return None
            if sh.role(index) is None:
                raise InvalidArgument(f"{name} is no member of shard {sh.shard}: add it first")
            return (tuple(sorted(sh.voters + (index,))),
                    tuple(i for i in sh.learners if i != index), sh.members)
        self._each_shard(change, f"promote {name}", progress)

    def remove(self, name: str, progress=None) -> None:
        """Remove ``name`` (a voter, the leader included, or a learner) from every shard."""
        index = self._index(self.view(), name)

        def change(sh: ShardMembership):
            if sh.role(index) is None:
                return None
            return (tuple(i for i in sh.voters if i != index),
                    tuple(i for i in sh.learners if i != index),
                    {i: m for i, m in sh.members.items() if i != index})
        self._each_shard(change, f"remove {name}", progress)

    @staticmethod
    def _index(view: MemberView, name: str) -> int:
        index = view.index_of(name)
        if index is None:
            raise InvalidArgument(f"no member named {name} (members: "
                                  f"{', '.join(m.name for m in view.members().values())})")
        return index

    def _each_shard(self, change, what: str, progress) -> None:
        """Make ``change`` in every shard, in shard order: ``change(shard's membership)``
        gives the next ``(voters, learners, members)``, or None if the shard shows it."""
        view = self.view()
        for sh in view.shards:
            nxt = change(sh)
            if nxt is None:
                continue
            voters, learners, members = nxt
            args = ["change", sh.shard, sh.epoch, sorted(voters), sorted(learners),
                    encode_info(members)]
            try:
                self.core.call(wire.OP_MEMBER, sh.shard, args, timeout=CHANGE_TIMEOUT)
            except InvalidArgument as e:
                raise InvalidArgument(f"{what}: shard {sh.shard}: {e}".replace(
                    "server refused the request: ", "")) from None
            except PermissionDenied as e:  # nothing changed: a retry would not either
                raise PermissionDenied(f"{what}: {e}".replace(
                    "server refused the request: ", "")) from None
            except KVError as e:
                raise Unavailable(f"{what}: shard {sh.shard} did not confirm the change ({e}); "
                                  f"run the command again: it finishes what is not done") from None
            if progress is not None:
                progress(sh.shard)


# ---------------------------------------------------------------------- the command line

def add_member_parser(sub, common) -> None:
    """``kvstore member ...`` in ``kvstore.cli``'s parser."""
    p = sub.add_parser("member", parents=[common], help="list, add, remove or promote members",
                       description="The cluster's members, changed through consensus, one "
                                   "shard at a time (docs/operations.md, \"Membership\"): add "
                                   "makes a learner, promote a caught-up learner a voter, "
                                   "remove takes any member out (the leader too). Run again, "
                                   "a change finishes what an interrupted one left.")
    p.add_argument("action", choices=("list", "add", "remove", "promote"))
    p.add_argument("name", metavar="NAME", nargs="?", help="the member (add, remove, promote)")
    p.add_argument("--address", metavar="tcp://HOST:PORT", help="add: where clients reach it")
    p.add_argument("--peer-address", metavar="tcp://HOST:PORT",
                   help="add: where its peers reach it (default: the client port + 10000)")
    p.add_argument("--json", action="store_true", help="list: print the members as JSON")
    p.set_defaults(fn=member_command)


def member_command(db, args) -> int:
    """``kvstore member list | add | remove | promote``: what it did on stdout, each shard
    done on stderr; errors raise (``kvstore.cli`` prints them and sets the exit code)."""
    import json
    import sys
    from kvstore.cli import format_table
    if (args.action == "list") == bool(args.name):
        raise InvalidArgument(f"member {args.action} " + ("takes no NAME" if args.name
                                                          else "needs a NAME"))
    members = Members(db)

    def done(shard: int) -> None:
        print(f"shard {shard}: done", file=sys.stderr)
    if args.action == "list":
        view = members.view()
        if args.json:
            print(json.dumps(view.as_dict(), indent=2))
        else:
            print(format_table(["member", "index", "address", "peer address", "role", "epoch",
                                "caught up"], view.rows()))
        for address in view.unreachable:
            print(f"kvstore: {address} did not answer", file=sys.stderr)
        return 0
    if args.action == "add":
        if not args.address:
            raise InvalidArgument("member add NAME needs --address tcp://HOST:PORT")
        index = members.add(args.name, args.address, args.peer_address, progress=done)
        print(f"{args.name} is a learner (node #{index}): start it with `kvstore-server --join "
              f"ADDRS --node {args.name} --data DIR`, then `kvstore member promote {args.name}`")
    elif args.action == "promote":
        members.promote(args.name, progress=done)
        print(f"{args.name} votes")
    else:
        members.remove(args.name, progress=done)
        print(f"{args.name} is no member any more: stop it (and wipe its data directory "
              f"before it joins again)")
    return 0
