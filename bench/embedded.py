"""The embedded store beside the durable embedded stores a Python user could pick instead.

16-byte keys, 128-byte values, every peer durable (each acknowledged put on disk):

- raw LMDB: a write transaction committed with sync per put, a read transaction per get;
- sqlite3: WAL journal, ``synchronous=FULL``, a connection per thread, one autocommit
  ``INSERT OR REPLACE`` per put;
- LevelDB (``plyvel``, ``sync=True``) and RocksDB (``rocksdict``, ``WriteOptions.sync``)
  when installed (``pip install -e '.[bench]'``).

Durable puts at each writer-thread count and random gets over ``--keys`` keys
run slice by slice, one engine after the other, for ``--rounds`` rounds; each
engine keeps its best slice (a noisy neighbour only ever slows a slice down),
so the disk's mood hits all alike. Each put's latency is recorded: the p99 of
kvstore's is taken while its checkpoints run (their count is reported).

fsync-family calls per acknowledged put are counted for each engine under
``strace -f -c -e trace=fsync,fdatasync,msync,sync_file_range`` in a child
process (a run of 0 puts is subtracted: opening and closing), so nobody's
figure is a non-durable one.

    python bench/embedded.py            # full run (a few minutes)
    python bench/embedded.py --quick    # smoke run

Goals (issue 12): 1 thread >= 1.0x sqlite3 and >= 1.5x raw LMDB; 8 and 16
threads >= 1.0x LevelDB; get >= 0.7x raw LMDB.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time

import lmdb

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import kvstore  # noqa: E402
from kvstore.embedded.demo import ops_per_second  # noqa: E402
import figures  # noqa: E402  (bench/figures.py, beside this script)

KEY_SIZE = 16
VALUE_SIZE = 128
SYNC_CALLS = "fsync,fdatasync,msync,sync_file_range"


def key(i: int) -> bytes:
    return b"key-%012d" % i


# -- the engines ------------------------------------------------------------------------------

class Engine:
    """One store: ``put`` durable, ``get``, ``load`` (bulk, for the read set)."""

    name = "?"
    note = ""

    def put(self, k: bytes, v: bytes) -> None:
        raise NotImplementedError

    def get(self, k: bytes):
        raise NotImplementedError

    def load(self, items: list) -> None:
        for k, v in items:
            self.put(k, v)

    def close(self) -> None:
        pass


class KvstoreEngine(Engine):
    name = "kvstore"
    note = "log append + fdatasync per group commit, LMDB checkpointed off the write path"

    def __init__(self, path: str, shards: int = 1) -> None:
        self.db = kvstore.open(path, shards=shards)
        self.put = self.db.put
        self.get = self.db.get

    def load(self, items: list) -> None:
        for first in range(0, len(items), 5000):
            chunk = items[first:first + 5000]
            self.db.run_transaction(lambda txn: [txn.put(k, v) for k, v in chunk])
        self.db.checkpoint()  # the read set in LMDB, as after any quiet moment

    def checkpoints(self) -> int:
        return self.db.status()["log"]["checkpoints"]

    def close(self) -> None:
        self.db.close()


class QuietKvstoreEngine(KvstoreEngine):
    """kvstore with its checkpoints held off: the same puts, for the p99 they cost."""

    name = "kvstore, no checkpoints"

    def __init__(self, path: str, shards: int = 1) -> None:
        super().__init__(path, shards)
        checkpointer = self.db._checkpointer
        checkpointer.interval = checkpointer.trigger_bytes = 1 << 62
        self.db._overlay.wake_bytes = 1 << 62


class LmdbEngine(Engine):
    name = "raw LMDB"
    note = "a write txn committed with sync per put; a read txn per get"

    def __init__(self, path: str) -> None:
        self.env = lmdb.open(path, map_size=1 << 32, sync=True, metasync=True, readahead=False)
        env = self.env

        def put(k: bytes, v: bytes) -> None:
            with env.begin(write=True) as txn:
                txn.put(k, v)

        def get(k: bytes):
            with env.begin() as txn:
                return txn.get(k)

        self.put, self.get = put, get

    def load(self, items: list) -> None:
        with self.env.begin(write=True) as txn:
            for k, v in items:
                txn.put(k, v)

    def close(self) -> None:
        self.env.close()


class SqliteEngine(Engine):
    name = "sqlite3"
    note = "WAL, synchronous=FULL, a connection per thread, one autocommit per put"

    def __init__(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        self.file = os.path.join(path, "db.sqlite")
        self.local = threading.local()
        self.connections: list = []
        self._lock = threading.Lock()
        self.conn().execute("CREATE TABLE IF NOT EXISTS kv (k BLOB PRIMARY KEY, v BLOB) "
                            "WITHOUT ROWID")

    def conn(self) -> sqlite3.Connection:
        c = getattr(self.local, "c", None)
        if c is None:
            c = sqlite3.connect(self.file, isolation_level=None, check_same_thread=False,
                                timeout=600)
            c.execute("PRAGMA journal_mode=WAL")
            c.execute("PRAGMA synchronous=FULL")
            self.local.c = c
            with self._lock:
                self.connections.append(c)
        return c

    def put(self, k: bytes, v: bytes) -> None:
        self.conn().execute("INSERT OR REPLACE INTO kv VALUES (?, ?)", (k, v))

    def get(self, k: bytes):
        row = self.conn().execute("SELECT v FROM kv WHERE k = ?", (k,)).fetchone()
        return None if row is None else row[0]

    def load(self, items: list) -> None:
        c = self.conn()
        c.execute("BEGIN")
        c.executemany("INSERT OR REPLACE INTO kv VALUES (?, ?)", items)
        c.execute("COMMIT")

    def close(self) -> None:
        for c in self.connections:
            c.close()


class LevelDBEngine(Engine):
    name = "LevelDB"
    note = "plyvel, put(sync=True)"

    def __init__(self, path: str) -> None:
        import plyvel
        self.db = plyvel.DB(path, create_if_missing=True)
        db = self.db
        self.put = lambda k, v: db.put(k, v, sync=True)
        self.get = db.get

    def load(self, items: list) -> None:
        with self.db.write_batch(sync=True) as batch:
            for k, v in items:
                batch.put(k, v)

    def close(self) -> None:
        self.db.close()


class RocksDBEngine(Engine):
    name = "RocksDB"
    note = "rocksdict (raw mode), WriteOptions.sync = True"

    def __init__(self, path: str) -> None:
        from rocksdict import Options, Rdict, WriteOptions
        self.db = Rdict(path, Options(raw_mode=True))
        sync = WriteOptions()
        sync.sync = True
        db = self.db
        self.put = lambda k, v: db.put(k, v, sync)
        self.get = db.get

    def load(self, items: list) -> None:
        from rocksdict import WriteBatch
        batch = WriteBatch(raw_mode=True)
        for k, v in items:
            batch.put(k, v)
        self.db.write(batch)
        self.db.flush()

    def close(self) -> None:
        self.db.close()


def available_engines() -> dict:
    """Engine classes by name; LevelDB and RocksDB only when their package is installed."""
    engines = {"kvstore": KvstoreEngine, "raw LMDB": LmdbEngine, "sqlite3": SqliteEngine}
    for name, cls, module in (("LevelDB", LevelDBEngine, "plyvel"),
                              ("RocksDB", RocksDBEngine, "rocksdict")):
        try:
            __import__(module)
        except ImportError:
            print(f"  {name}: not installed (pip install {module}); left out", file=sys.stderr)
            continue
        engines[name] = cls
    return engines


# -- measuring --------------------------------------------------------------------------------

def put_slice(put, threads: int, n_per_thread: int, sequence, value: bytes,
              latencies: list) -> float:
    """ops/s of ``put(key, value)`` from ``threads`` threads started together; each
    put's latency appended to ``latencies`` (seconds)."""
    clock = time.perf_counter

    def work(_t: int) -> None:
        mine = []
        for _ in range(n_per_thread):
            k = key(next(sequence))  # next() on a count is atomic under the GIL
            t0 = clock()
            put(k, value)
            mine.append(clock() - t0)
        latencies.extend(mine)

    return ops_per_second(work, threads, n_per_thread)


def main_thread_slice(put, n: int, sequence, value: bytes, latencies: list) -> float:
    """``put_slice`` of one writer that is this (the main) thread, as a script's one writer
    is: kvstore's main thread hands its commits to a helper thread
    (``kvstore.embedded.groupcommit``), which a worker thread's puts do not."""
    clock = time.perf_counter
    mine = []
    t0 = clock()
    for _ in range(n):
        k = key(next(sequence))
        t1 = clock()
        put(k, value)
        mine.append(clock() - t1)
    elapsed = clock() - t0
    latencies.extend(mine)
    return n / elapsed


def put_threads(put, threads: int, n_per_thread: int, base: int, value: bytes) -> float:
    """ops/s of ``put(key, value)`` from ``threads`` threads sharing one key sequence
    from ``base`` (for bench/group_commit.py)."""
    return put_slice(put, threads, n_per_thread, itertools.count(base), value, [])


@contextlib.contextmanager
def side_by_side(parent: str | None, shards: int = 1):
    """A fresh kvstore and a fresh raw LMDB environment in one temporary directory.

    Yields ``(db, env, raw_put)``: ``raw_put(key, value)`` is raw LMDB's durable
    put. Both are closed and the directory removed on the way out.
    """
    tmp = tempfile.mkdtemp(prefix="kvstore-bench-", dir=parent)
    try:
        ours = KvstoreEngine(os.path.join(tmp, "kv"), shards)
        raw = LmdbEngine(os.path.join(tmp, "raw"))
        try:
            yield ours.db, raw.env, raw.put
        finally:
            ours.close()
            raw.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def percentile(values: list, p: float) -> float:
    """The ``p`` th percentile (0 to 100): ``figures.percentile``'s rank."""
    return figures.percentile(values, p / 100)


def count_sync_calls(engine: str, puts: int, threads: int, parent: str | None) -> float | None:
    """fsync-family calls per acknowledged put of ``engine``, counted by strace in a
    child process (a run of 0 puts subtracted); None without strace."""
    if shutil.which("strace") is None:
        return None

    def calls(n: int) -> int:
        out = tempfile.mktemp(prefix="kvstore-strace-", dir=parent)
        cmd = ["strace", "-f", "-c", "-o", out, "-e", f"trace={SYNC_CALLS}", sys.executable,
               os.path.abspath(__file__), "--probe", engine, "--probe-puts", str(n),
               "--probe-threads", str(threads)]
        if parent:
            cmd += ["--dir", parent]
        subprocess.run(cmd, check=True, capture_output=True, timeout=600)
        try:
            with open(out) as f:
                text = f.read()
        finally:
            os.unlink(out)
        return sum(strace_calls_column(line) for line in text.splitlines()
                   if line.split() and line.split()[-1] in SYNC_CALLS.split(","))


    base = calls(0)
    return (calls(puts) - base) / puts


def strace_calls_column(line: str) -> int:
    """The ``calls`` column of one row of ``strace -c`` (``% time seconds usecs/call
    calls [errors] syscall``)."""
    fields = line.split()
    return int(fields[3])


def probe(args) -> int:
    """The child that strace watches: open an engine, ``--probe-puts`` puts, close."""
    engines = available_engines()
    tmp = tempfile.mkdtemp(prefix="kvstore-probe-", dir=args.dir)
    try:
        engine = engines[args.probe](os.path.join(tmp, "db"))
        value = bytes(VALUE_SIZE)
        if args.probe_puts:
            per_thread = max(1, args.probe_puts // args.probe_threads)
            put_slice(engine.put, args.probe_threads, per_thread, itertools.count(), value, [])
        engine.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def run(args) -> dict:
    value = random.Random(1).randbytes(VALUE_SIZE)
    engines = available_engines()
    names = list(engines)
    results: dict = {"config": {"key_size": KEY_SIZE, "value_size": VALUE_SIZE,
                                "shards": args.shards, "puts": args.puts, "keys": args.keys,
                                "gets": args.gets, "rounds": args.rounds,
                                "threads": list(args.threads),
                                "implementation": kvstore.status()["implementation"],
                                "engines": {n: engines[n].note for n in names}},
                     "rows": []}
    tmp = tempfile.mkdtemp(prefix="kvstore-bench-", dir=args.dir)
    try:
        opened = {}
        for n in names:
            path = os.path.join(tmp, n.replace(" ", "_"))
            opened[n] = (engines[n](path, args.shards) if n == "kvstore"
                         else engines[n](path))
        ours = opened["kvstore"]
        quiet = QuietKvstoreEngine(os.path.join(tmp, "kv-quiet"), args.shards)
        quiet_best = {t: 0.0 for t in args.threads}
        quiet_latencies: dict = {t: [] for t in args.threads}
        quiet_sequence = itertools.count()
        best = {(n, t): 0.0 for n in names for t in args.threads}
        latencies = {(n, t): [] for n in names for t in args.threads}
        main_best = {n: 0.0 for n in names}  # one writer that is the main thread
        main_latencies: dict = {n: [] for n in names}
        sequences = {n: itertools.count() for n in names}
        checkpoints_before = ours.checkpoints()
        put_seconds = 0.0
        phase_started = time.perf_counter()
        for r in range(args.rounds):
            for t in args.threads:
                per_thread = max(1, args.puts // t) if t > 1 else args.puts
                for n in names:  # slice by slice: every engine sees the same weather
                    lat: list = []
                    t0 = time.perf_counter()
                    ops = put_slice(opened[n].put, t, per_thread, sequences[n], value, lat)
                    if n == "kvstore":
                        put_seconds += time.perf_counter() - t0
                    best[n, t] = max(best[n, t], ops)
                    latencies[n, t].extend(lat)
                ops = put_slice(quiet.put, t, per_thread, quiet_sequence, value,
                                quiet_latencies[t])
                quiet_best[t] = max(quiet_best[t], ops)
                if t == 1:
                    for n in names:
                        ops = main_thread_slice(opened[n].put, args.puts, sequences[n], value,
                                                main_latencies[n])
                        main_best[n] = max(main_best[n], ops)
            print(f"  round {r + 1}: " + ", ".join(
                f"{n} {best[n, 1]:,.0f}/s" for n in names) + " (1 thread, best so far)",
                file=sys.stderr)
        checkpoints = ours.checkpoints() - checkpoints_before
        results["put_scaling"] = [
            {"threads": t, "kvstore_ops": best["kvstore", t],
             "raw_lmdb_ops": best["raw LMDB", t],
             "peers": {n: best[n, t] for n in names},
             "p50_ms": {n: percentile(latencies[n, t], 50) * 1e3 for n in names},
             "p99_ms": {n: percentile(latencies[n, t], 99) * 1e3 for n in names}}
            for t in args.threads]
        if 1 in args.threads:
            results["main_thread"] = {
                "peers": main_best,
                "p50_ms": {n: percentile(main_latencies[n], 50) * 1e3 for n in names},
                "p99_ms": {n: percentile(main_latencies[n], 99) * 1e3 for n in names}}
        results["without_checkpoints"] = [
            {"threads": t, "kvstore_ops": quiet_best[t],
             "p50_ms": percentile(quiet_latencies[t], 50) * 1e3,
             "p99_ms": percentile(quiet_latencies[t], 99) * 1e3} for t in args.threads]
        quiet.close()
        results["checkpoints_during_puts"] = checkpoints
        results["put_phase_seconds"] = time.perf_counter() - phase_started
        results["put_seconds_kvstore"] = put_seconds
        results["last_checkpoint_ms"] = ours.db._checkpointer.last_seconds * 1e3

        # The read set: --keys keys in every engine, then random gets, slice by slice.
        items = [(key(i), value) for i in range(args.keys)]
        for n in names:
            opened[n].load(items)
        rng = random.Random(7)
        keys = [key(rng.randrange(args.keys)) for _ in range(args.gets)]
        get_best = {n: 0.0 for n in names}
        for _ in range(args.rounds):
            for n in names:
                get = opened[n].get
                t0 = time.perf_counter()
                for k in keys:
                    get(k)
                get_best[n] = max(get_best[n], len(keys) / (time.perf_counter() - t0))
        results["gets"] = get_best

        def row(name, ops: dict, goal_against: list, note: str) -> None:
            raw = ops["raw LMDB"]
            results["rows"].append({
                "name": name, "kvstore_ops": ops["kvstore"], "raw_lmdb_ops": raw,
                "ratio": ops["kvstore"] / raw, "peers": ops,
                "goals": [{"against": g, "goal": x, "ratio": ops["kvstore"] / ops[g],
                           "met": ops["kvstore"] >= x * ops[g]}
                          for g, x in goal_against if g in ops],
                "note": note})

        for t in args.threads:
            goals = ([("sqlite3", 1.0), ("raw LMDB", 1.5)] if t == 1
                     else [("LevelDB", 1.0)] if t in (8, 16) else [])
            row(f"put, {t} thread{'s' if t > 1 else ''} (durable)",
                {n: best[n, t] for n in names}, goals, "best slice of each engine")
            if t == 1 and any(main_best.values()):
                row("put, 1 thread, the main thread", dict(main_best), goals,
                    "a script's one writer: kvstore's commits go through a helper thread")
        row(f"get, random over {args.keys:,} keys", get_best, [("raw LMDB", 0.7)],
            "raw LMDB: a read txn per get")

        # A prefix scan, kvstore against a cursor walk of raw LMDB.
        prefix = b"key-00000000"  # keys 0..9,999
        scans = max(10, args.gets // 20000)
        db, env = ours.db, opened["raw LMDB"].env

        def raw_scan() -> None:
            end = prefix[:-1] + bytes([prefix[-1] + 1])
            for _ in range(scans):
                with env.begin() as txn:
                    cur = txn.cursor()
                    out = []
                    if cur.set_range(prefix):
                        for k, v in cur:
                            if k >= end:
                                break
                            out.append((k, v))

        def our_scan() -> None:
            for _ in range(scans):
                db.scan(prefix)

        rows = len(db.scan(prefix))
        t_ours = t_raw = float("inf")
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            our_scan()
            t_ours = min(t_ours, time.perf_counter() - t0)
            t0 = time.perf_counter()
            raw_scan()
            t_raw = min(t_raw, time.perf_counter() - t0)
        row(f"prefix scan ({rows:,} rows), rows/s",
            {"kvstore": scans * rows / t_ours, "raw LMDB": scans * rows / t_raw}, [],
            "raw LMDB: cursor walk in one read txn")
        for engine in opened.values():
            engine.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    if not args.no_strace:
        sync = {}
        for n in names:
            sync[n] = {t: count_sync_calls(n, args.strace_puts, t, args.dir)
                       for t in args.strace_threads}
            print(f"  {n}: fsync-family calls per put {sync[n]}", file=sys.stderr)
        results["sync_calls_per_put"] = {n: {str(t): c for t, c in v.items()}
                                         for n, v in sync.items()}
    return results


def print_table(results: dict) -> None:
    cfg = results["config"]
    scaling = results["put_scaling"]
    names = list(scaling[0]["peers"])
    print(f"\nkvstore embedded beside its peers ({cfg['key_size']}-byte keys, "
          f"{cfg['value_size']}-byte values, {cfg['shards']} shard(s), best of "
          f"{cfg['rounds']} interleaved rounds, kernels: {cfg['implementation']})\n")
    head = f"{'operation':34}" + "".join(f"{n:>12}" for n in names) + "   goals (ratio)"
    print(head)
    print("-" * len(head))
    for r in results["rows"]:
        cells = "".join(f"{r['peers'][n]:12,.0f}" if n in r["peers"] else f"{'':>12}"
                        for n in names)
        goals = ", ".join(f">={g['goal']:g}x {g['against']}: {g['ratio']:.2f} "
                          f"{'yes' if g['met'] else 'NO'}" for g in r["goals"])
        ratio = "" if goals else f"ratio to raw LMDB {r['ratio']:.2f}"
        print(f"{r['name']:34}{cells}   {goals or ratio}")
    main = results.get("main_thread")
    if main:
        print("\none writer that is the main thread, p50 / p99 ms: " + ", ".join(
            f"{n} {main['p50_ms'][n]:.2f} / {main['p99_ms'][n]:.2f}" for n in names))
    print("\ndurable puts/s by writer threads (bench/plot.py draws it), and put latency "
          "p50 / p99 in ms\n")
    print(f"{'threads':>7}" + "".join(f"{n:>22}" for n in names))
    for p in scaling:
        print(f"{p['threads']:>7}" + "".join(
            f"{p['peers'][n]:>9,.0f} {p['p50_ms'][n]:5.2f}/{p['p99_ms'][n]:5.2f}"
            for n in names))
    print(f"\nkvstore checkpoints while the put rounds ran: "
          f"{results['checkpoints_during_puts']} in {results['put_phase_seconds']:.0f} s "
          f"({results['put_seconds_kvstore']:.1f} s of them kvstore's slices; the last took "
          f"{results['last_checkpoint_ms']:.1f} ms, off the write path). The same puts "
          f"on a second kvstore with checkpoints held off, interleaved:")
    for q, p in zip(results["without_checkpoints"], scaling):
        print(f"  {q['threads']:>2} thread(s): {q['kvstore_ops']:,.0f}/s, p50 "
              f"{q['p50_ms']:.2f} / p99 {q['p99_ms']:.2f} ms (with checkpoints: "
              f"{p['kvstore_ops']:,.0f}/s, {p['p50_ms']['kvstore']:.2f} / "
              f"{p['p99_ms']['kvstore']:.2f} ms)")
    sync = results.get("sync_calls_per_put")
    if sync:
        print(f"\nfsync-family calls per acknowledged put (strace -f -c -e trace={SYNC_CALLS}, "
              f"a run of 0 puts subtracted)\n")
        print(f"{'threads':>7}" + "".join(f"{n:>12}" for n in names))
        for t in next(iter(sync.values())):
            print(f"{t:>7}" + "".join(
                f"{sync[n][t]:12.3f}" if sync[n][t] is not None else f"{'n/a':>12}"
                for n in names))
    for n, note in cfg["engines"].items():
        print(f"  {n}: {note}")


def thread_counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 1,8,16, got {text!r}")
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"thread counts must be >= 1, got {text!r}")
    return counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small smoke run")
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--puts", type=int, default=2000, help="puts per slice (all threads)")
    p.add_argument("--keys", type=int, default=100_000, help="keys loaded for the get test")
    p.add_argument("--gets", type=int, default=200_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=thread_counts, default=(1, 8, 16),
                   help="writer thread counts (default: 1,8,16)")
    p.add_argument("--strace-puts", type=int, default=2000,
                   help="puts of each strace count (default: %(default)s)")
    p.add_argument("--strace-threads", type=thread_counts, default=(1, 8),
                   help="writer thread counts of the strace counts (default: 1,8)")
    p.add_argument("--no-strace", action="store_true", help="skip the fsync counts")
    p.add_argument("--dir", default=None, help="where to put the temporary stores")
    p.add_argument("--json", default=figures.default_path("embedded"),
                   help="where to write the figures (default: %(default)s)")
    p.add_argument("--probe", help=argparse.SUPPRESS)
    p.add_argument("--probe-puts", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--probe-threads", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.probe:
        return probe(args)
    if args.quick:
        args.puts, args.keys, args.gets, args.rounds, args.strace_puts = \
            200, 20_000, 20_000, 1, 100
        args.strace_threads = (1,)
    return figures.report(run(args), print_table, args.json)


if __name__ == "__main__":
    sys.exit(main())
