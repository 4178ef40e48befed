"""The order of a node's side effects in one drive round (``kvstore.node.loop``, 3.): a
follower sends its Accepted once the log append is durable, before it applies the entries
that round committed; a leader with clients waiting keeps one save and answers from it.

Driven by the simulator of real nodes on a fault-free network, with each node's save,
peer sends and client replies noted in order."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import replace

from kvstore.paxos import messages as M
from kvstore.paxos.replica import LEADER
from kvstore.sim.realnode import RealNodeConfig, Simulation
from kvstore.transport import wire

QUIET = RealNodeConfig(seed=7, nodes=3, shards=1, swarm=False, drop_rate=0.0,
                       duplicate_rate=0.0, delay_max_ticks=0, partition_rate=0.0,
                       crash_rate=0.0, pause_rate=0.0, checkpoint_rate=0.0, byzantine=False,
                       watchers=0, lease_clients=0, ticks=300)


def _noted_run(config: RealNodeConfig) -> dict:
    """Per node index: its events, ``("turn",)``, ``("save", has_records, has_committed,
    writes waiting)``,
    ``("send", message types)``, ``("reply",)``, over a fault-free run."""
    root = tempfile.mkdtemp(prefix="kvstore-drive-")
    events: dict = {}
    sim = Simulation(config, root)
    try:
        hooked: set = set()
        for _ in range(config.ticks):
            for sn in sim.nodes:
                node = sn.node
                if node is not None and id(node) not in hooked:
                    hooked.add(id(node))
                    _hook(node, events.setdefault(sn.index, []))
            sim.step()
    finally:
        sim.close()
        shutil.rmtree(root, ignore_errors=True)
    return events


def _hook(node, log: list) -> None:
    turn, save = node.turn, node.storage.save
    send_peer, reply = node.sockets.send_peer, node.sockets.reply

    def noted_turn(*args):
        log.append(("turn",))
        return turn(*args)

    def noted_save(writes, applied=None):
        log.append(("save", any(w.records for w in writes), any(w.committed for w in writes),
                    bool(node.waiting_writes)))
        return save(writes, applied)

    def noted_send(peer, frame):
        body = wire.decode(frame)
        log.append(("send", tuple(m.type for _s, m in body[2]) if body[0] == wire.PAXOS
                    else ()))
        return send_peer(peer, frame)

    def noted_reply(identity, items):
        log.append(("reply",))
        return reply(identity, items)

    node.turn, node.storage.save = noted_turn, noted_save
    for replica in node.replicas:  # a drive round starts with the replicas' ready()
        ready = replica.ready

        def noted_ready(ready=ready):
            if not log or log[-1] != ("round",):
                log.append(("round",))
            return ready()
        replica.ready = noted_ready
    node.sockets.send_peer, node.sockets.reply = noted_send, noted_reply


def _turns(log: list, start: str = "turn") -> list:
    """``log`` cut into turns (or drive rounds: ``start="round"``)."""
    out: list = []
    for e in log:
        if e[0] == start:
            out.append([])
        elif out and e[0] not in ("turn", "round"):
            out[-1].append(e)
    return out


def test_a_follower_sends_its_accepted_before_applying_what_the_round_committed():
    events = _noted_run(QUIET)
    split = combined = 0
    for index, log in events.items():
        for turn in _turns(log):
            saves = [i for i, e in enumerate(turn) if e[0] == "save"]
            accepted = [i for i, e in enumerate(turn) if e[0] == "send" and M.ACCEPTED in e[1]]
            if not accepted or not saves:
                continue
            first = turn[saves[0]]
            if first[1] and first[2]:
                combined += 1  # records and committed entries in one save, then the Accepted
            if first[1] and not first[2] and len(saves) > 1 and turn[saves[1]][2]:
                # the records' save, the Accepted, then the apply of the committed entries
                assert saves[0] < accepted[0] < saves[1], turn
                split += 1
    assert split > 10, "no follower round applied its committed entries after the send"
    assert combined == 0


def test_a_follower_answers_a_heartbeat_before_applying_what_it_committed():
    events = _noted_run(QUIET)
    before = 0
    for log in events.values():
        for turn in _turns(log, "round"):
            replies = [i for i, e in enumerate(turn) if e[0] == "send" and M.HEARTBEAT_REPLY in e[1]]
            applies = [i for i, e in enumerate(turn) if e[0] == "save" and e[2] and not e[1]
                       and not e[3]]
            appends = [e for e in turn if e[0] == "save" and e[1]]
            if replies and applies and not appends:  # nothing to append: the reply goes first
                assert replies[0] < applies[0], turn
                before += 1
    assert before > 10, "no HeartbeatReply went out before its round's apply"


def test_a_leader_with_writes_waiting_answers_from_one_save():
    events = _noted_run(QUIET)
    answered = 0
    for log in events.values():
        for turn in _turns(log):
            saves = [turn[i] for i, e in enumerate(turn) if e[0] == "save"]
            for first, second in zip(saves, saves[1:]):
                # never split while clients wait here: their answers come from the save
                assert not (first[3] and first[1] and not first[2] and second[2]), turn
            if any(s[2] and s[3] for s in saves) and any(e[0] == "reply" for e in turn):
                answered += 1
    assert answered > 10
