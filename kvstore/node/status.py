"""A node's status (``OP_STATUS``, ``kvstore status``): part of ``Node``
(``kvstore.node.loop`` mixes it in). What each shard replica says of itself, named
for people: roles, leaders, commit and applied points, and whether it is healthy."""

from __future__ import annotations

from kvstore.paxos.ballot import format_ballot

#: A replica this many slots behind the commit point its leader last told it is "catching up".
CATCHING_UP_SLOTS = 100


class NodeStatus:
    """``status()``: a part of ``Node`` (its replicas, names, counters and sockets)."""

    def status(self) -> dict:
        """Per shard: this replica's role, leader, commit and applied points, and ``state``:
        "recovering" (it restarted without its Paxos state and does not vote yet: README,
        "A node that lost its disk"), "catching up" (receiving a snapshot, or more than
        ``CATCHING_UP_SLOTS`` behind the commit point its leader told it) or "ok"; on the
        leader, ``followers``: how far it knows each node holds the log."""
        names = self._name_of
        shards = []
        for s, r in enumerate(self.replicas):
            hint = r.leader_hint
            st = r.status()
            state = ("recovering" if st["recovering"] else
                     "catching up" if st["receiving_snapshot"] or st["behind"] > CATCHING_UP_SLOTS
                     else "ok")
            shard = {"shard": s, "role": r.role,
                     "leader": None if hint is None else names(hint),
                     "leader_index": hint, "commit_index": r.commit_index,
                     "applied_index": r.applied_index, "ballot": format_ballot(r.promised),
                     "state": state, "recovery_phase": st["recovering"], "behind": st["behind"],
                     "voters": self._voter_names(r)}
            if "match" in st:
                shard["followers"] = {names(i): m for i, m in st["match"].items()}
            shards.append(shard)
        return {"node": self.name, "index": self.index, "cluster": self.cluster.hex(),
                "nodes": self._nodes_by_index(),
                "nshards": self.nshards, "shards": shards,
                "counters": dict(self.counters) | dict(self.sockets.counters)}
