"""Micro-benchmark of a node's per-write path: N client writes through ``Node.turn()``.

Three ``Node`` objects in one process over an in-memory transport and a clock this
script moves (the simulator's ports, much simplified): every write goes through the
leader's intake, its proposal, the followers' check of the Accept, and every
replica's apply. The log's files are the simulator's in-memory twin
(``FaultyFiles``) with a sync that does nothing, so fsync costs nothing and the figure is the CPU the code costs.
Reports CPU seconds per 1,000 writes (best of ``--repeat`` runs).

    python bench/write_path.py --writes 20000 --repeat 3
    python bench/write_path.py --writes 3000 --batch 1 --turns-per-tick 10   # lone writes

CPU seconds drift with the machine's other load; instructions do not. For a figure to
compare two versions by, run it under ``valgrind --tool=callgrind`` with N and 2N writes
(``--repeat 1``) and divide the difference of the totals by N (issue 24: 2.03M -> 1.84M
instructions a lone write). Under valgrind LMDB cannot map its default 1 TiB: run it
from a script that first sets ``kvstore.storage.environment.DEFAULT_MAP_SIZE = 1 << 28``
and then calls ``main()``.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kvstore.node import Node, NodeConfig  # noqa: E402
from kvstore.node.storage import WalReplicaStorage  # noqa: E402
from kvstore.sim.disk import FaultyFiles  # noqa: E402
from kvstore.transport import wire  # noqa: E402
from kvstore.transport.sockets import CLIENT, PEER  # noqa: E402

try:  # the command vocabulary, where it exists
    from kvstore.commands import put as _put
except ImportError:  # before issue 20's commands
    from kvstore.commands import OP_PUT

    def _put(key, value):
        return [OP_PUT, key, value]

TICK = 0.01


class Files(FaultyFiles):
    """The in-memory log files, with a sync that costs nothing (the twin's copies the file)."""

    def fdatasync(self, handle) -> None:
        pass

    def fsync(self, handle) -> None:
        pass
logging.disable(logging.WARNING)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return 1.7e9 + self.now


class Net:
    def __init__(self, n: int) -> None:
        self.transports = [Transport(self, i) for i in range(n)]
        self.replies: list = []


class Transport:
    def __init__(self, net: Net, index: int) -> None:
        self.net, self.index = net, index
        self.inbox: list = []
        self.counters: dict = {}
        self.refusals: dict = {}

    def recv_many(self) -> list:
        frames, self.inbox = self.inbox, []
        return frames

    def peer_index(self, identity: bytes) -> int:
        return int(identity[len(b"node-"):])

    def send_peer(self, index: int, frame: bytes) -> bool:
        self.net.transports[index].inbox.append((PEER, b"node-%d" % self.index, frame))
        return True

    def reply(self, identity: bytes, items: list) -> None:
        self.net.replies.extend(items)

    def reply_room(self, identity: bytes) -> bool:
        return True

    def charge(self, identity: bytes, size: int) -> None:
        pass

    def reload_keys(self) -> None:
        pass

    def may_administer(self, identity: bytes) -> bool:
        return True

    def close(self) -> None:
        pass


def run(writes: int, batch: int, root: str, turns_per_tick: int = 1) -> float:
    n = 3
    names = [f"n{i}" for i in range(n)]
    clock, net = Clock(), Net(n)
    nodes = []
    for i in range(n):
        d = os.path.join(root, names[i])
        os.makedirs(d)
        cfg = NodeConfig(name=names[i], names=names, addresses={nm: f"sim://{nm}" for nm in names},
                         peer_addresses={nm: f"sim://{nm}-p" for nm in names}, shards=1,
                         data_dir=d, tick_seconds=TICK)
        storage = WalReplicaStorage(d, 1, files=Files(seed=i), checkpoint_thread=False)
        nodes.append(Node(cfg, storage, random.Random(i), transport=net.transports[i], clock=clock))

    advance = [TICK]

    def step() -> None:
        clock.now += advance[0]
        for node in nodes:
            node.turn(True)

    for _ in range(2000):  # elect node 0 (it campaigns for shard 0 by preference)
        step()
        if nodes[0].replicas[0].is_leader and nodes[0].replicas[0].status()["commit_index"] >= 0:
            break
    else:
        raise SystemExit("no leader")
    leader = net.transports[0]
    advance[0] = TICK / turns_per_tick  # a lone put's round is ~1 ms: ticks come every ~10
    seq = 0
    started = time.process_time()
    while seq < writes:
        items = []
        for _ in range(min(batch, writes - seq)):
            seq += 1
            items.append([seq, wire.OP_WRITE, [0, b"bench", seq, seq, _put(b"k%d" % (seq % 1000), b"v" * 100)]])
        leader.inbox.append((CLIENT, b"client", wire.encode_requests(items)))
        step()
    for _ in range(200):
        if len(net.replies) >= writes:
            break
        step()
    elapsed = time.process_time() - started
    for node in nodes:
        node.close()
    ok = sum(1 for _rid, status, _v in net.replies if status == wire.STATUS_OK)
    if ok != writes:
        raise SystemExit(f"{ok} of {writes} writes answered OK")
    return elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--writes", type=int, default=20000)
    p.add_argument("--batch", type=int, default=200, help="writes per client frame (one per turn)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--turns-per-tick", type=int, default=1,
                   help="turns between two ticks once a leader is elected (10: lone puts "
                        "of ~1 ms against a 10 ms tick)")
    a = p.parse_args()
    best = None
    for _ in range(a.repeat):
        with tempfile.TemporaryDirectory() as root:
            t = run(a.writes, a.batch, root, a.turns_per_tick)
        best = t if best is None else min(best, t)
    print(f"{a.writes} writes, {a.batch} per turn, 3 nodes: best {best:.3f} s CPU, "
          f"{best / a.writes * 1e6:.1f} us per write (all three nodes)")


if __name__ == "__main__":
    main()
