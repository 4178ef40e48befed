"""The Cython kernels against their pure-Python twins and against the xxhash package.

16-byte keys for hashing, batches of 1000 records of 128 bytes for the codec,
3- and 5-node tallies. Prints a table (ops/s of each, the native/pure ratio
and the goal) and writes ``bench/results/kernels.json``.

    python bench/kernels.py            # about 20 s
    python bench/kernels.py --quick

Goals (issue 3): native >= 20x pure for hashing and the tally, >= 5x for
encode/decode; one ``shard_of`` call within 1.5x of one
``xxhash.xxh64_intdigest`` call (Python call overhead included).
"""

from __future__ import annotations

import argparse
import importlib
import os
import random
import sys
import timeit

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import figures  # noqa: E402  (bench/figures.py, beside this script)
from kvstore._native import pure  # noqa: E402

native = {name: importlib.import_module(f"kvstore._native._{name}")
          for name in ("hashing", "logcodec", "quorum")}


def per_second(fn, items_per_call: int, budget: float) -> float:
    """Items per second of ``fn()``, best of 3 runs sized to ``budget`` seconds."""
    number = 1
    while True:
        took = timeit.timeit(fn, number=number)
        if took > budget / 10 or number > 1 << 24:
            break
        number *= 4
    number = max(1, int(number * (budget / 3) / max(took, 1e-9)))
    best = min(timeit.repeat(fn, number=number, repeat=3))
    return items_per_call * number / best


def tally_workload(module, nodes: int, slots: int, run_length: int):
    """Every node acknowledging runs of ``run_length`` slots (one Accepted message each),
    as acknowledgements arrive for a pipelined window."""
    def run():
        tally = module.QuorumTally(nodes, 1024)
        record = tally.record
        for first in range(0, slots, run_length):
            for node in range(nodes):
                record(node, first, first + run_length - 1, 0)
    return run


def tally_many_workload(module, nodes: int, slots: int, run_length: int):
    """The same acknowledgements handed over in one ``record_many`` call (a poll's worth)."""
    acks = [(node, first, first + run_length - 1, 0)
            for first in range(0, slots, run_length) for node in range(nodes)]

    def run():
        module.QuorumTally(nodes, 1024).record_many(acks)
    return run


def run(budget: float) -> dict:
    import xxhash
    rng = random.Random(3)
    key = rng.randbytes(16)
    keys = [rng.randbytes(16) for _ in range(1000)]
    records = [(slot, 5 << 16 | 1, 1, rng.randbytes(128)) for slot in range(1000)]
    encoded = pure.logcodec.encode_batch(records)
    rows = []

    def row(name, fast, slow, unit, goal=None, baseline=None, note=""):
        rows.append({"name": name, "native": fast, "pure": slow, "ratio": fast / slow,
                     "unit": unit, "goal": goal, "baseline": baseline, "note": note})
        print(f"  {name}: native {fast:,.0f} {unit}, pure {slow:,.0f}", file=sys.stderr)

    h_native, h_pure = native["hashing"], pure.hashing
    xx = per_second(lambda: xxhash.xxh64_intdigest(key), 1, budget)
    one = per_second(lambda: h_native.shard_of(key, 16), 1, budget)
    row("shard_of, one 16-byte key", one, per_second(lambda: h_pure.shard_of(key, 16), 1,
                                                     budget), "keys/s", 20,
        {"name": "xxhash.xxh64_intdigest", "ops": xx, "ratio": xx / one, "goal": 1.5},
        f"one call takes {xx / one:.2f}x one xxhash.xxh64_intdigest call (goal <= 1.5x)")
    row("shard_of_many, 1000 keys", per_second(lambda: h_native.shard_of_many(keys, 16),
                                               1000, budget),
        per_second(lambda: h_pure.shard_of_many(keys, 16), 1000, budget), "keys/s", 20,
        {"name": "xxhash, 1000 calls", "ops": per_second(
            lambda: [xxhash.xxh64_intdigest(k) for k in keys], 1000, budget)})
    row("xxh64, 16-byte key", per_second(lambda: h_native.xxh64(key), 1, budget),
        per_second(lambda: h_pure.xxh64(key), 1, budget), "keys/s", 20,
        {"name": "xxhash.xxh64_intdigest", "ops": xx})

    c_native, c_pure = native["logcodec"], pure.logcodec
    row("encode_batch, 1000 x 128 B", per_second(lambda: c_native.encode_batch(records), 1000,
                                                 budget),
        per_second(lambda: c_pure.encode_batch(records), 1000, budget), "records/s", 5)
    row("decode_batch, 1000 x 128 B", per_second(lambda: c_native.decode_batch(encoded), 1000,
                                                 budget),
        per_second(lambda: c_pure.decode_batch(encoded), 1000, budget), "records/s", 5)
    payload = records[0][3]
    row("encode_record, one 128 B", per_second(lambda: c_native.encode_record(1, 2, 1, payload),
                                               1, budget),
        per_second(lambda: c_pure.encode_record(1, 2, 1, payload), 1, budget), "records/s", 5)

    for run_length in (1, 8, 64):
        for nodes in (3, 5):
            row(f"tally, {nodes} nodes, acks of {run_length} slot{'s' if run_length > 1 else ''}",
                per_second(tally_workload(native["quorum"], nodes, 1024, run_length), 1024,
                           budget),
                per_second(tally_workload(pure.quorum, nodes, 1024, run_length), 1024, budget),
                "slots/s", 20)
    for nodes in (3, 5):
        row(f"tally_many, {nodes} nodes, acks of 1 slot",
            per_second(tally_many_workload(native["quorum"], nodes, 1024, 1), 1024, budget),
            per_second(tally_many_workload(pure.quorum, nodes, 1024, 1), 1024, budget),
            "slots/s", 20)
    return {"rows": rows}


def print_table(results: dict) -> None:
    head = (f"{'kernel':38} {'native':>14} {'pure':>12} {'ratio':>8} {'goal':>6}  ok  "
            f"against a C library")
    print("\nkvstore kernels: compiled (Cython) vs pure-Python twin\n")
    print(head)
    print("-" * len(head))
    for r in results["rows"]:
        ok = "yes" if r["ratio"] >= r["goal"] else "NO"
        base = ""
        if r["baseline"]:
            b = r["baseline"]
            base = f"{b['name']}: {b['ops']:,.0f}/s"
        print(f"{r['name']:38} {r['native']:14,.0f} {r['pure']:12,.0f} {r['ratio']:7.1f}x "
              f"{'>=' + str(r['goal']) + 'x':>6}  {ok:3} {base}")
    for r in results["rows"]:
        if r["note"]:
            b = r["baseline"]
            ok = "yes" if b["ratio"] <= b["goal"] else "NO"
            print(f"\n{r['name']}: {r['note']} -> {ok}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", default=figures.default_path("kernels"),
                   help="where to write the figures (default: %(default)s)")
    args = p.parse_args(argv)
    return figures.report(run(0.3 if args.quick else 1.5), print_table, args.json)


if __name__ == "__main__":
    sys.exit(main())
