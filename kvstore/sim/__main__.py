"""``python -m kvstore.sim --seeds 1000 --nodes 5`` / ``--seed N --verbose`` to replay one.

Real ``kvstore.node.Node`` objects, with the storage ``kvstore-server`` runs, over a
simulated network, clock and disk (``kvstore/sim/realnode.py``); ``--bank`` adds
clients that move money across shards with ``kvstore.client``'s transactions.
``--bank --model`` runs the model of two-phase commit over abstract shards
(``bank.py``), where the transaction core's planted bugs are found in a few seeds.

A sweep ends with the liveness figures of its runs, counted from the last heal (median,
99th percentile, worst).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import fields

from kvstore.paxos.replica import Bugs
from kvstore.sim.bank import BankConfig, run_bank_seed
from kvstore.txn import TxnBugs
from kvstore.node.ports import NodeBugs
from kvstore.sim.realnode import RealNodeConfig, RunResult
from kvstore.sim.realnode import run as real_node_run

BUG_NAMES = tuple(f.name for f in fields(Bugs))
TXN_BUG_NAMES = tuple(f.name for f in fields(TxnBugs))
NODE_BUG_NAMES = tuple(f.name for f in fields(NodeBugs) if f.name != "paxos")


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
    p.add_argument("--ticks", type=int, default=None, help="ticks of the fault phase")
    p.add_argument("-j", "--jobs", type=int, default=1,
                   help="real nodes: run seeds in this many processes (default 1)")
    p.add_argument("-v", "--verbose", action="store_true", help="print the whole trace as it runs")
    p.add_argument("--bug", action="append", default=[], choices=BUG_NAMES,
                   help="plant a bug (to see the checks fail)")
    p.add_argument("--byzantine", action=argparse.BooleanOptionalAction, default=None,
                   help="a byzantine-input sender fuzzing peer messages in every seed (or in none); "
                        "by default in a third of the seeds")
    p.add_argument("--bank", action="store_true",
                   help="bank clients too: transfers across shards over two-phase commit")
    p.add_argument("--members", action="store_true",
                   help="an operator adds, promotes and removes members during the faults "
                        "(kvstore/sim/realmembers.py; 3 nodes or more)")
    p.add_argument("--backups", type=int, default=None,
                   help="with --bank: cluster backups taken meanwhile (default: 0 or 1, drawn "
                        "per seed; kvstore/sim/realbackup.py)")
    p.add_argument("--model", action="store_true",
                   help="with --bank: abstract shards, not real nodes (kvstore/sim/bank.py)")
    p.add_argument("--shards", type=int, default=None,
                   help="1-3 (default: drawn per seed); with --model: default 3")
    p.add_argument("--real-node", action="store_true",
                   help="real nodes (the default; accepted for older replay lines)")
    p.add_argument("--node-bug", action="append", default=[], choices=NODE_BUG_NAMES,
                   help="plant a bug in the node or its storage")
    p.add_argument("--txn-bug", action="append", default=[], choices=TXN_BUG_NAMES,
                   help="with --bank --model: plant a two-phase-commit bug")
    a = p.parse_args(argv)
    seeds = [a.seed] if a.seed is not None else range(a.first_seed, a.first_seed + a.seeds)
    if a.model and not a.bank:
        p.error("--model goes with --bank (the model of two-phase commit over abstract shards)")
    if a.members and (a.model or a.nodes < 3):
        p.error("--members runs real nodes, 3 or more (the operator keeps 3 to 5 voters)")
    if a.txn_bug and not a.model:
        p.error("--txn-bug goes with --bank --model (on real nodes, tests/test_sim_realnode.py "
                "plants the participant's bugs)")
    if a.bank and a.model:
        txn_bugs = TxnBugs(**{name: True for name in a.txn_bug})
        results = sweep(seeds, a.seed is not None, lambda s: RunResult(*run_bank_seed(
            BankConfig(seed=s, shards=a.shards or 3, bugs=txn_bugs, verbose=a.verbose))), "bank seeds")
    else:
        node_bugs = NodeBugs(**{name: True for name in a.node_bug},
                             paxos=Bugs(**{name: True for name in a.bug}))
        ticks = a.ticks or RealNodeConfig.ticks
        results = sweep(seeds, a.seed is not None, real_node_run, "real-node seeds", a.jobs,
                        lambda s: RealNodeConfig(seed=s, nodes=a.nodes, shards=a.shards or 0,
                                                 ticks=ticks, bugs=node_bugs, bank=a.bank,
                                                 membership_changes=a.members,
                                                 byzantine=a.byzantine, backups=a.backups,
                                                 verbose=a.verbose))
        if a.seed is None and any(r.ok for r in results):
            ok = sorted(r.settle_ticks for r in results if r.ok)
            print(f"ticks to settle after the faults stop, {len(ok)} runs: median "
                  f"{ok[len(ok) // 2]}, p99 {ok[min(len(ok) - 1, 99 * len(ok) // 100)]}, "
                  f"worst {ok[-1]}; histories the checker gave up on: "
                  f"{sum('NOT CHECKED' in r.text for r in results)}")
    return 0 if all(r.ok for r in results) else 1


def sweep(seeds, replay: bool, run_one, what: str, jobs: int = 1, config_of=None) -> list:
    """Run ``run_one(seed)`` over ``seeds`` with a progress line; stop at the first failure.

    A replay (one seed) prints its report whether it passed or not. With ``jobs`` > 1,
    ``run_one`` takes ``config_of(seed)`` in that many processes (each seed is
    deterministic on its own); results are reported in seed order all the same.
    """
    progress = Progress(len(seeds)) if not replay and sys.stderr.isatty() else None
    results: list = []
    pool = None
    if jobs > 1 and not replay:
        import multiprocessing
        pool = multiprocessing.get_context("spawn").Pool(jobs)
        outcomes = pool.imap(run_one, [config_of(s) for s in seeds])
    else:
        outcomes = (run_one(s if config_of is None else config_of(s)) for s in seeds)
    try:
        results = _collect(seeds, outcomes, progress, replay)
    finally:
        if pool is not None:
            pool.terminate()
    if not replay:
        failed = sum(not r.ok for r in results)
        print(f"{len(seeds) if failed == 0 else 'stopped after a failure;'} {what}, {failed} failed")
    return results


def _collect(seeds, outcomes, progress, replay: bool) -> list:
    results: list = []
    for s, result in zip(seeds, outcomes):
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
    return results


if __name__ == "__main__":
    sys.exit(main())
