"""Throughput of the pure Multi-Paxos core: three replicas in one process, no I/O.

    python bench/paxos_core.py [--commands 20000] [--quick]

Prints a table of committed entries/s and commands/s by batch size and pipeline
window, and the share of time spent in the native kernels (quorum tally, record
codec) against the Python core from a cProfile run. Writes
``bench/results/paxos_core.json``.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pathlib
import pstats
import random
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kvstore import _native  # noqa: E402
from kvstore.paxos.replica import Config, Replica  # noqa: E402


def make_group(batch: int, window: int, n: int = 3) -> list:
    rng = random.Random(1)
    reps = [Replica(Config(node=i, num_nodes=n, rng=rng, batch_commands_max=batch, pipeline_window=window,
                           entries_per_message_max=max(window, 1)))
            for i in range(n)]
    reps[0].campaign()
    settle(reps)
    assert reps[0].is_leader
    return reps


def settle(reps: list) -> int:
    """Carry out Readies and deliver messages until quiet; returns commands applied on node 0."""
    applied = 0
    while True:
        msgs = []
        for r in reps:
            while r.has_ready():
                rd = r.ready()
                msgs.extend(rd.messages)  # persist is a no-op here: no I/O
                if r.id == 0:
                    for e in rd.committed:
                        applied += len(e.commands)
                r.advance(rd)
        if not msgs:
            return applied
        for m in msgs:
            reps[m.to].step(m)


def run(batch: int, window: int, commands: int) -> dict:
    reps = make_group(batch, window)
    leader = reps[0]
    cmd = b"x" * 32
    per_round = batch * window
    done = 0
    start_commit = leader.commit_index
    t0 = time.perf_counter()
    while done < commands:
        for _ in range(per_round):
            leader.propose(cmd)
        done += settle(reps)
    dt = time.perf_counter() - t0
    entries = leader.commit_index - start_commit
    return {"batch_commands": batch, "pipeline_window": window, "commands": done, "entries": entries,
            "seconds": round(dt, 4), "commands_per_s": round(done / dt), "entries_per_s": round(entries / dt)}


def use_kernels(which: str) -> None:
    """Point the core at the compiled kernels or at their pure-Python twins."""
    from kvstore.paxos import replica
    if which == "pure" or _native.native is None:
        q, lc = _native.pure.quorum, _native.pure.logcodec
    else:
        q, lc = _native.native.quorum, _native.native.logcodec
    replica.QuorumTally, replica.PromiseTally = q.QuorumTally, q.PromiseTally
    replica.encode_record, replica.decode_record = lc.encode_record, lc.decode_record


def profile_share(commands: int) -> dict:
    """Self time in the kernels against everything else, from cProfile.

    Compiled (Cython) functions are invisible to cProfile (their time lands in
    their Python callers), so the share is measured with the pure twins; the
    native speedup is in the throughput table.
    """
    use_kernels("pure")
    prof = cProfile.Profile()
    prof.enable()
    run(1, 32, commands // 4)
    run(16, 16, commands)
    prof.disable()
    stats = pstats.Stats(prof)
    total = 0.0
    kernel = 0.0
    for (filename, _line, name), (_cc, _nc, tt, _ct, _callers) in stats.stats.items():
        total += tt
        if "_native" in filename or "_native" in name or any(
                k in name for k in ("QuorumTally", "PromiseTally", "encode_record", "decode_record")):
            kernel += tt
    use_kernels("default")
    return {"kernels_profiled": "pure", "kernel_seconds": round(kernel, 4), "total_seconds": round(total, 4),
            "kernel_share": round(kernel / total, 3) if total else 0.0}


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--commands", type=int, default=20000)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    n = 2000 if a.quick else a.commands
    rows = []
    impls = ["pure"] + (["native"] if _native.native is not None else [])
    single = {}
    for impl in impls:
        use_kernels(impl)
        single[impl] = run(1, 32, n // 4)
        for batch in (1, 8, 64):
            for window in (1, 8, 32):
                r = run(batch, window, n if batch > 1 else n // 4)
                r["kernels"] = impl
                rows.append(r)
    use_kernels("default")
    print(f"{'kernels':>8} {'batch':>6} {'window':>7} {'commands':>9} {'entries':>8} {'cmd/s':>10} {'entries/s':>10}")
    for r in rows:
        print(f"{r['kernels']:>8} {r['batch_commands']:>6} {r['pipeline_window']:>7} {r['commands']:>9} "
              f"{r['entries']:>8} {r['commands_per_s']:>10} {r['entries_per_s']:>10}")
    share = profile_share(n // 2)
    for impl, r in single.items():
        print(f"one command per entry (window 32, {impl} kernels): {r['entries_per_s']} entries/s")
    print(f"time in the kernels (pure twins, cProfile): {share['kernel_share']:.1%} "
          f"of {share['total_seconds']}s profiled")
    out = {"implementation": _native.IMPLEMENTATION, "replicas": 3,
           "one_command_per_entry": single, "table": rows[1:], "profile": share}
    path = ROOT / "bench" / "results" / "paxos_core.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
