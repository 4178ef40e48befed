"""When a cluster, and one node of it, can serve: the readiness rules, in one place.

``quorum_problems`` judges a cluster's status (``kvstore.connect(...).status()``, every
node asked): ``kvstore status`` exits 3 on it and the gateway's ``/readyz`` answers 503
with it. ``node_problems`` judges one node's own view (``Node.status()``, published by its
loop): the node's ``/readyz`` (``kvstore.ops.http``). A node cannot count the voters of a
shard itself, but the Paxos core tells it the same thing: a leader steps down when a
majority has not answered it for an election timeout, and a follower that hears no
leader for an election timeout campaigns and forgets its leader. So "every shard has a
leader this node is part of" means "in a quorum", within an election timeout. Both rules
say "no leader" and "does not vote yet" in the same words. Pure: no I/O.
"""

from __future__ import annotations

#: A shard state (``Node.status()``) in which a node does not vote: a wiped node
#: relearning its promises (README, "A node that lost its disk").
RECOVERING = "recovering"
#: A shard state in which a node is far behind its leader (more than
#: ``kvstore.node.status.CATCHING_UP_SLOTS`` slots) or receiving a snapshot.
CATCHING_UP = "catching up"


def _no_leader(shard) -> str:
    return f"shard {shard} has no leader (an election may be under way)"


def quorum_problems(status: dict) -> list:
    """Each shard of a cluster that cannot serve now, as a sentence: fewer nodes that
    answer and vote (a recovering node does not vote yet) than a majority of the
    members (of the shard's voters where the status names them: learners do not vote),
    or no leader. Empty for an embedded store."""
    if status.get("mode") == "embedded":
        return []
    problems = []
    for shard in status.get("shards", []):
        states = shard.get("states") or {}
        named = shard.get("voters")
        members = len(named) if named else len(status.get("nodes", []))
        needed = members // 2 + 1
        voters = sorted(n for n, state in states.items() if state != RECOVERING
                        and (not named or n in named))
        if len(voters) < needed:
            problems.append(f"shard {shard.get('shard')} has no quorum: {len(voters)} of "
                            f"{members} nodes answer and vote ({', '.join(voters) or 'none'}), "
                            f"{needed} needed")
        elif shard.get("leader") is None:
            problems.append(_no_leader(shard.get("shard")))
    return problems


def node_problems(status: dict) -> list:
    """Each shard in which this node cannot serve now, as a sentence: it does not vote yet
    (recovering), it has no leader (it leads none and follows none: cut off from a
    majority, or an election under way), or it is catching up (applied point far behind
    the leader's commit point, or a snapshot coming in). Empty: ready."""
    problems = []
    for shard in status.get("shards", []):
        s, state = shard.get("shard"), shard.get("state")
        if state == RECOVERING:
            problems.append(f"shard {s}: this node does not vote yet (recovering its state "
                            f"from the peers)")
        elif shard.get("leader") is None:
            problems.append(_no_leader(s))
        elif state == CATCHING_UP:
            problems.append(f"shard {s}: this node is catching up (applied slot "
                            f"{shard.get('applied_index')}, {shard.get('behind', '?')} behind "
                            f"the leader's commit point)")
    return problems
