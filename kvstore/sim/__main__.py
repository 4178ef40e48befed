"""``python -m kvstore.sim --seeds 1000 --nodes 5`` / ``--seed N --verbose`` to replay one.

``--real-node``: real ``kvstore.node.loop.Node`` objects over a simulated network and disk
(``kvstore/sim/realnode.py``); ``--bank``: transfers across shards over two-phase commit.

A sweep ends with the liveness figures of its runs, counted from the last heal: ticks
until one leader is followed by every node, elections and leader changes (median,
99th percentile, worst).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import fields

from kvstore.paxos.replica import Bugs
from kvstore.sim.bank import BankConfig, run_bank_seed
from kvstore.sim.bank_paxos import BankPaxosConfig, run_bank_paxos_seed
from kvstore.txn import TxnBugs
from kvstore.sim.cluster import RunResult, SimConfig, run
from kvstore.node.ports import NodeBugs
from kvstore.sim.realnode import RealNodeConfig
from kvstore.sim.realnode import run as real_node_run

BUG_NAMES = tuple(f.name for f in fields(Bugs))
TXN_BUG_NAMES = tuple(f.name for f in fields(TxnBugs))
NODE_BUG_NAMES = tuple(f.name for f in fields(NodeBugs))


class Progress:
    """One self-rewriting status line on a terminal's stderr: seeds done, rate, time left."""

    def __init__(self, total: int) -> None:
        self.total, self.done = total, 0
        self.start = self.shown = time.monotonic()

    def step(self, seed: int) -> None:
        self.done += 1
        now = time.monotonic()
        if now - self.shown < 0.25 and self.done < self.total:
            return
        self.shown = now
        rate = self.done / max(now - self.start, 1e-9)
        left = (self.total - self.done) / rate
        width = 30
        filled = width * self.done // self.total
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} seeds "
                         f"(last {seed}), {rate:,.0f}/s, {left:,.0f}s left ")
        sys.stderr.flush()

    def clear(self) -> None:
        sys.stderr.write("\r\033[K")
        sys.stderr.flush()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvstore.sim", description=__doc__)
    p.add_argument("--seeds", type=int, default=100, help="run seeds first..first+N-1")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--seed", type=int, default=None, help="run (replay) this one seed")
    p.add_argument("--nodes", type=int, default=3, choices=range(1, 8), metavar="1..7")
    p.add_argument("--ticks", type=int, default=SimConfig.ticks, help="ticks of the fault phase")
    p.add_argument("-v", "--verbose", action="store_true", help="print the whole trace as it runs")
    p.add_argument("--bug", action="append", default=[], choices=BUG_NAMES,
                   help="plant a bug (to see the checks fail)")
    p.add_argument("--byzantine", action=argparse.BooleanOptionalAction, default=None,
                   help="a byzantine-input sender fuzzing peer messages in every seed (or in none); "
                        "by default in a third of the seeds")
    p.add_argument("--bank", action="store_true",
                   help="bank transfers across shards over two-phase commit (kvstore/sim/bank.py)")
    p.add_argument("--paxos", action="store_true",
                   help="with --bank: each shard a real Paxos group of --nodes replicas (kvstore/sim/bank_paxos.py)")
    p.add_argument("--shards", type=int, default=None,
                   help="with --bank: shards (default 3); with --real-node: 1-3 (default: drawn per seed)")
    p.add_argument("--real-node", action="store_true",
                   help="real kvstore.node.loop.Node objects over a simulated network and disk "
                        "(kvstore/sim/realnode.py)")
    p.add_argument("--node-bug", action="append", default=[], choices=NODE_BUG_NAMES,
                   help="with --real-node: plant a bug in the node or its storage")
    p.add_argument("--locking-audit-trusts-votes", action="store_true",
                   help="with --bank --paxos: a locking audit trusts its votes, as kvstore.client.txn does today")
    p.add_argument("--txn-bug", action="append", default=[], choices=TXN_BUG_NAMES,
                   help="with --bank: plant a two-phase-commit bug")
    a = p.parse_args(argv)
    seeds = [a.seed] if a.seed is not None else range(a.first_seed, a.first_seed + a.seeds)
    if a.real_node:
        node_bugs = NodeBugs(**{name: True for name in a.node_bug})
        ticks = a.ticks if a.ticks != SimConfig.ticks else RealNodeConfig.ticks
        results = sweep(seeds, a.seed is not None, lambda s: real_node_run(RealNodeConfig(
            seed=s, nodes=a.nodes, shards=a.shards or 0, ticks=ticks, bugs=node_bugs,
            verbose=a.verbose)), "real-node seeds")
        if a.seed is None and any(r.ok for r in results):
            ok = sorted(r.settle_ticks for r in results if r.ok)
            print(f"ticks to settle after the faults stop, {len(ok)} runs: median "
                  f"{ok[len(ok) // 2]}, p99 {ok[min(len(ok) - 1, 99 * len(ok) // 100)]}, "
                  f"worst {ok[-1]}; histories the checker gave up on: "
                  f"{sum('NOT CHECKED' in r.text for r in results)}")
    elif a.bank and a.paxos:
        txn_bugs = TxnBugs(**{name: True for name in a.txn_bug})
        bugs = Bugs(**{name: True for name in a.bug})
        results = sweep(seeds, a.seed is not None, lambda s: RunResult(*run_bank_paxos_seed(
            BankPaxosConfig(seed=s, shards=a.shards or 3, nodes=a.nodes, bugs=txn_bugs, paxos_bugs=bugs,
                            ticks=a.ticks, locking_audit_trusts_votes=a.locking_audit_trusts_votes,
                            verbose=a.verbose))), "bank-paxos seeds")
    elif a.bank:
        txn_bugs = TxnBugs(**{name: True for name in a.txn_bug})
        results = sweep(seeds, a.seed is not None, lambda s: RunResult(*run_bank_seed(
            BankConfig(seed=s, shards=a.shards or 3, bugs=txn_bugs, verbose=a.verbose))), "bank seeds")
    else:
        bugs = Bugs(**{name: True for name in a.bug})
        results = sweep(seeds, a.seed is not None, lambda s: run(
            SimConfig(seed=s, nodes=a.nodes, ticks=a.ticks, bugs=bugs, verbose=a.verbose,
                      byzantine=a.byzantine)), "seeds")
        if a.seed is None and any(r.ok for r in results):
            print(liveness_table(results))
    return 0 if all(r.ok for r in results) else 1


def sweep(seeds, replay: bool, run_one, what: str) -> list:
    """Run ``run_one(seed)`` over ``seeds`` with a progress line; stop at the first failure.

    A replay (one seed) prints its report whether it passed or not.
    """
    progress = Progress(len(seeds)) if not replay and sys.stderr.isatty() else None
    results: list = []
    for s in seeds:
        result = run_one(s)
        results.append(result)
        if progress is not None:
            progress.step(s)
        if not result.ok or replay:
            if progress is not None:
                progress.clear()
            print(result.text)
        if not result.ok:
            break
    if progress is not None:
        progress.clear()
    if not replay:
        failed = sum(not r.ok for r in results)
        print(f"{len(seeds) if failed == 0 else 'stopped after a failure;'} {what}, {failed} failed")
    return results


def liveness_table(results: list) -> str:
    """Median, p99 and worst of each liveness figure over the runs that passed."""
    ok = [r for r in results if r.ok]
    rows = [("ticks to one followed leader", [r.settle_ticks for r in ok]),
            ("elections after the heal", [r.elections for r in ok]),
            ("leader changes after the heal", [r.leader_changes for r in ok])]
    lines = [f"liveness after the last heal, {len(ok)} runs:   median    p99  worst"]
    for name, values in rows:
        values = sorted(values)
        p99 = values[min(len(values) - 1, (99 * len(values)) // 100)]
        lines.append(f"  {name:<34}{values[len(values) // 2]:>7}{p99:>7}{values[-1]:>7}")
    return "\n".join(lines)



if __name__ == "__main__":
    sys.exit(main())
