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
import pathlib
import pstats
import random
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import figures  # noqa: E402  (bench/figures.py, beside this script)
from kvstore import _native  # noqa: E402
from kvstore.paxos.replica import Config, Replica  # noqa: E402


def make_group(batch: int, window: int, n: int = 3) -> list:
    rng = random.Random(1)
    reps = [Replica(Config(node=i, num_nodes=n, rng=rng, batch_commands_max=batch, pipeline_window=window,
                           entries_per_message_max=max(window, 1)))
            for i in range(n)]
    settle(reps)  # a new cluster: each finds that a majority holds no state, and votes
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


def use_kernels(which: str, wrap=None) -> None:
    """Point the core at the compiled kernels or at their pure-Python twins.

    ``wrap(name, kernel)`` may substitute each kernel (to record its calls).
    """
    from kvstore.paxos import replica
    if which == "pure" or _native.native is None:
        q, lc = _native.pure.quorum, _native.pure.logcodec
    else:
        q, lc = _native.native.quorum, _native.native.logcodec
    kernels = {"QuorumTally": q.QuorumTally, "PromiseTally": q.PromiseTally, "majority": q.majority,
               "encode_record": lc.encode_record, "decode_record": lc.decode_record}
    for name, kernel in kernels.items():
        setattr(replica, name, wrap(name, kernel) if wrap else kernel)


KERNEL_NAMES = ("QuorumTally", "PromiseTally", "encode_record", "decode_record")


def profile_share_pure(commands: int) -> dict:
    """Self time in the pure-Python kernel twins against everything else, from cProfile."""
    use_kernels("pure")
    prof = cProfile.Profile()
    prof.enable()
    _workload(commands)
    prof.disable()
    use_kernels("default")
    total = kernel = 0.0
    for (_filename, _line, name), (_cc, _nc, tt, _ct, _callers) in pstats.Stats(prof).stats.items():
        total += tt
        if _filename.endswith(("quorum_py.py", "logcodec_py.py", "hashing_py.py")):
            kernel += tt
    return {"kernels": "pure", "method": "cProfile self time", "kernel_seconds": round(kernel, 4),
            "total_seconds": round(total, 4), "kernel_share": round(kernel / total, 3) if total else 0.0}


class _RecordedObject:
    """Stands in for a tally object; logs every method call as (bound method, args)."""

    def __init__(self, calls: list, cls, args: tuple) -> None:
        self._calls = calls
        self._real = cls(*args)
        calls.append((self, cls, args))  # replay creates its own object here

    def __getattr__(self, name):
        attr = getattr(self._real, name)
        if not callable(attr):
            return attr
        calls = self._calls

        def call(*args):
            calls.append((self, name, args))
            return attr(*args)
        return call

    def __setattr__(self, name, value):
        if name.startswith("_"):
            object.__setattr__(self, name, value)
        else:
            setattr(self._real, name, value)


def profile_share_native(commands: int) -> dict:
    """Time in the compiled kernels against the whole run, by call-trace replay.

    Compiled Cython functions are invisible to cProfile (their time lands in
    their callers), so a first run records every kernel call with its arguments,
    a second (unrecorded) run measures the whole workload, and the recorded calls
    are then replayed straight into the compiled kernels, in order (the tallies
    are stateful), and timed. The workload is deterministic, so both runs make the
    same calls. The replay includes the Python call dispatch to each kernel, so
    the share is an upper bound.
    """
    if _native.native is None:
        return {}
    calls: list = []

    def wrap(name, kernel):
        if name in ("QuorumTally", "PromiseTally"):
            return lambda *args: _RecordedObject(calls, kernel, args)
        if name == "majority":
            return kernel

        def recorded(*args):
            calls.append((None, kernel, args))
            return kernel(*args)
        return recorded

    use_kernels("native", wrap)
    _workload(commands)
    use_kernels("native")
    t0 = time.perf_counter()
    _workload(commands)
    total = time.perf_counter() - t0
    use_kernels("default")
    # Each tally's state depends only on its own calls, so create them all fresh up
    # front, then bind the log to (callable, args) pairs so the timed loop is bare.
    objects = {id(who): what(*args) for who, what, args in calls
               if who is not None and not isinstance(what, str)}
    plan = [(what, args) if who is None else (getattr(objects[id(who)], what), args)
            for who, what, args in calls if who is None or isinstance(what, str)]
    t0 = time.perf_counter()
    for fn, args in plan:
        fn(*args)
    kernel = time.perf_counter() - t0
    return {"kernels": "native", "method": "recorded kernel calls replayed and timed",
            "kernel_calls": len(plan), "kernel_seconds": round(kernel, 4), "total_seconds": round(total, 4),
            "kernel_share": round(kernel / total, 3) if total else 0.0}


def _workload(commands: int) -> None:
    run(1, 32, commands // 4)
    run(16, 16, commands)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--commands", type=int, default=20000)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", default=figures.default_path("paxos_core"),
                   help="where to write the figures (default: %(default)s)")
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
    shares = [profile_share_pure(n // 2), profile_share_native(n // 2)]
    for impl, r in single.items():
        print(f"one command per entry (window 32, {impl} kernels): {r['entries_per_s']} entries/s")
    for share in filter(None, shares):
        print(f"time in the {share['kernels']} kernels ({share['method']}): {share['kernel_share']:.1%} "
              f"of {share['total_seconds']}s")
    out = {"implementation": _native.IMPLEMENTATION, "replicas": 3,
           "one_command_per_entry": single, "table": rows, "profile": [x for x in shares if x]}
    figures.write(out, a.json)


if __name__ == "__main__":
    main()
