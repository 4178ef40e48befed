"""Transactions on a 3-node cluster: one shard (one log entry) against two-phase commit.

A transfer reads two accounts and writes both. Inside one shard it is one log
entry whose reads are validated at apply (one consensus round); across two
shards it is two-phase commit coordinated by the client: in one round (the
default: the client is answered once every prepare is chosen; the decision and
the resolves follow), or in two (``one_round_commit=False``: the prepares in
parallel, then the decision in the coordinator shard's log; the resolves after
the answer).
The three kinds run interleaved in each of ``--rounds`` rounds on the same
cluster, and the ratios of the cross-shard p50s to the one-shard p50 of the
same round are printed at the end.
Each row runs on a fresh ``kvstore-server`` cluster with 2 and with 4 shards,
the load from this process through the asyncio client with 1 and 32
transactions in flight, over 10,000 accounts (little contention). The last
rows put 32 in flight on 8 hot accounts across shards. Each transfer is
``run_transaction`` (retried until it commits, taking its reads by locking
after two conflicts, as users get it); its latency counts every attempt, and
the abort rate is the share of attempts that lost to a concurrent one.

    python bench/txn.py            # full run, writes bench/results/txn.json
    python bench/txn.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import figures  # noqa: E402  (bench/figures.py, beside this script)

import kvstore  # noqa: E402
import kvstore.aio  # noqa: E402
from kvstore.server.local import LocalCluster  # noqa: E402
from kvstore.sharding import shard_of  # noqa: E402


def percentile(values: list, p: float) -> float:
    """The ``p`` th percentile (0 to 100): ``figures.percentile``'s rank."""
    return figures.percentile(values, p / 100)


def accounts_by_shard(nshards: int, per_shard: int) -> dict:
    out = {s: [] for s in range(nshards)}
    i = 0
    while any(len(v) < per_shard for v in out.values()):
        k = b"acct%012d" % i
        i += 1
        if len(out[shard_of(k, nshards)]) < per_shard:
            out[shard_of(k, nshards)].append(k)
    return out


def pairs(by_shard: dict, cross: bool, rnd: random.Random):
    """An endless stream of (from, to) account pairs, in one shard or in two."""
    shards = sorted(by_shard)
    while True:
        s = rnd.choice(shards)
        t = rnd.choice([x for x in shards if x != s]) if cross else s
        a, b = rnd.choice(by_shard[s]), rnd.choice(by_shard[t])
        if a != b:
            yield a, b


async def transfer_load(db, by_shard: dict, cross: bool, in_flight: int, seconds: float,
                        pause: float = 0.0) -> dict:
    latencies, attempts = [], 0
    deadline = time.perf_counter() + seconds

    async def worker(w: int) -> None:
        stream = pairs(by_shard, cross, random.Random(w))
        while time.perf_counter() < deadline:
            a, b = next(stream)

            async def move(t):
                nonlocal attempts
                attempts += 1
                x, y = await t.get(a), await t.get(b)
                await t.put(a, b"%d" % (int(x or 0) - 1))
                await t.put(b, b"%d" % (int(y or 0) + 1))

            t0 = time.perf_counter()
            await db.run_transaction(move, retries=1000)
            latencies.append(time.perf_counter() - t0)
            if pause:
                await asyncio.sleep(pause)  # a lone transfer: the last one's background is done

    start = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(in_flight)))
    elapsed = time.perf_counter() - start
    latencies.sort()
    return {"txns": len(latencies), "txns_per_s": round(len(latencies) / elapsed, 1),
            "p50_ms": round(percentile(latencies, 50) * 1e3, 2),
            "p99_ms": round(percentile(latencies, 99) * 1e3, 2),
            "abort_rate": round(1 - len(latencies) / attempts, 3) if attempts else 0.0}


async def lone_transfers(kinds: list, by_shard: dict, seconds: float) -> list:
    """One transfer at a time, the kinds (``[(db, cross)]``) taking turns transfer by
    transfer, with ``LONE_PAUSE`` after each: a row per kind, each measured under the same
    load as the others (the machine is shared: blocks of seconds drift apart)."""
    streams = [pairs(by_shard, cross, random.Random(i)) for i, (_db, cross) in enumerate(kinds)]
    latencies: list = [[] for _ in kinds]
    attempts = [0] * len(kinds)
    start = time.perf_counter()
    deadline = start + seconds * len(kinds)
    turn = 0
    while time.perf_counter() < deadline:
        for i in (turn + k for k in range(len(kinds))):  # who goes first rotates
            i %= len(kinds)
            db = kinds[i][0]
            a, b = next(streams[i])

            async def move(t, i=i):
                attempts[i] += 1
                x, y = await t.get(a), await t.get(b)
                await t.put(a, b"%d" % (int(x or 0) - 1))
                await t.put(b, b"%d" % (int(y or 0) + 1))

            t0 = time.perf_counter()
            await db.run_transaction(move, retries=1000)
            latencies[i].append(time.perf_counter() - t0)
            await asyncio.sleep(LONE_PAUSE)  # the last one's background is done
        turn += 1
    elapsed = time.perf_counter() - start
    rows = []
    for values, tried in zip(latencies, attempts):
        values.sort()
        rows.append({"txns": len(values), "txns_per_s": round(len(values) / elapsed, 1),
                     "p50_ms": round(percentile(values, 50) * 1e3, 2),
                     "p99_ms": round(percentile(values, 99) * 1e3, 2),
                     "abort_rate": round(1 - len(values) / tried, 3) if tried else 0.0})
    return rows


#: "lone" rows: one transfer at a time with this pause after each (not counted in its
#: latency), so that the previous transfer's resolves are done: a transfer as an
#: occasional web request sees it; the three kinds take turns (``lone_transfers``). The
#: "1 in flight" rows run each kind back to back for ``--seconds``.
LONE_PAUSE = 0.02

CASES = (("one shard", False, False), ("cross-shard, 2 rounds", True, False),
         ("cross-shard, 1 round", True, True))


async def run_cluster_rows(addresses: list, nshards: int, in_flight: list, seconds: float,
                           hot: bool, rounds: int) -> list:
    rows = []
    async with await kvstore.aio.connect(addresses, timeout=30, one_round_commit=False) as two, \
            await kvstore.aio.connect(addresses, timeout=30, one_round_commit=True) as one:
        spread = accounts_by_shard(nshards, 10_000 // nshards)
        for r in range(rounds):
            lone = await lone_transfers([(one if one_round else two, cross)
                                         for _label, cross, one_round in CASES], spread, seconds)
            for (label, _cross, _one_round), row in zip(CASES, lone):
                row.update(shards=nshards, kind=label, in_flight="lone", accounts=10_000, round=r,
                           load=os.getloadavg()[0])
                rows.append(row)
                print_row(row)
            for n in in_flight:
                for label, cross, one_round in CASES:
                    row = await transfer_load(one if one_round else two, spread, cross, n, seconds)
                    row.update(shards=nshards, kind=label, in_flight=n, accounts=10_000, round=r,
                               load=os.getloadavg()[0])
                    rows.append(row)
                    print_row(row)
        if hot:
            by_shard = accounts_by_shard(nshards, max(1, 8 // nshards))
            for label, db in (("cross-shard, hot, 2 rounds", two), ("cross-shard, hot, 1 round", one)):
                row = await transfer_load(db, by_shard, True, max(in_flight), seconds)
                row.update(shards=nshards, kind=label, in_flight=max(in_flight),
                           accounts=sum(len(v) for v in by_shard.values()), round=0,
                           load=os.getloadavg()[0])
                rows.append(row)
                print_row(row)
    return rows


def print_ratios(rows: list) -> list:
    """Per shard count, load and round: each cross-shard p50 over the one-shard p50."""
    out = []
    base = {(r["shards"], r["in_flight"], r["round"]): r["p50_ms"] for r in rows
            if r["kind"] == "one shard"}
    for r in rows:
        key = (r["shards"], r["in_flight"], r["round"])
        if r["kind"].startswith("cross-shard, ") and "hot" not in r["kind"] and key in base:
            ratio = round(r["p50_ms"] / base[key], 2)
            out.append({"shards": key[0], "in_flight": key[1], "round": key[2],
                        "kind": r["kind"], "p50_over_one_shard": ratio})
            print(f"{key[0]} shards {key[1]:>4} in flight, round {key[2]}: {r['kind']:22} "
                  f"p50 {r['p50_ms']:.2f} ms = {ratio:.2f}x one shard ({base[key]:.2f} ms)")
    return out


def print_row(r: dict) -> None:
    print(f"{r['shards']} shards  {r['kind']:26} {r['in_flight']:>4} in flight "
          f"({r['accounts']:>6} accounts): {r['txns_per_s']:>8,.0f} txn/s  p50 {r['p50_ms']:7.2f} ms  "
          f"p99 {r['p99_ms']:7.2f} ms  aborts {r['abort_rate']:.1%}  (load {r.get('load', 0):.1f})",
          flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small smoke run")
    p.add_argument("--seconds", type=float, default=5.0, help="per row")
    p.add_argument("--shards", default="2,4")
    p.add_argument("--in-flight", default="1,32")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the three kinds")
    p.add_argument("--dir", default=None, help="where the clusters' data goes (default: a temp dir)")
    p.add_argument("--json", default=figures.default_path("txn"))
    args = p.parse_args(argv)
    seconds = 1.0 if args.quick else args.seconds
    shard_counts = [2] if args.quick else [int(x) for x in args.shards.split(",")]
    in_flight = [1, 4] if args.quick else [int(x) for x in args.in_flight.split(",")]
    base = args.dir or tempfile.mkdtemp(prefix="kvstore-bench-txn-")
    rows = []
    try:
        for nshards in shard_counts:
            directory = os.path.join(base, f"s{nshards}")
            shutil.rmtree(directory, ignore_errors=True)
            with LocalCluster(directory, 3, nshards) as lc:
                lc.start_all()
                lc.wait_ready(timeout=60)
                rows += asyncio.run(run_cluster_rows(lc.address_list, nshards, in_flight,
                                                     seconds, hot=True,
                                                     rounds=1 if args.quick else args.rounds))
    finally:
        if args.dir is None:
            shutil.rmtree(base, ignore_errors=True)
    ratios = print_ratios(rows)
    figures.write({"seconds_per_row": seconds, "nodes": 3, "load": os.getloadavg(),
                   "rows": rows, "ratios": ratios}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
