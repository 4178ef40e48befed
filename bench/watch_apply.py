"""What collecting watch changes costs the state machine, and what the history costs.

Applies puts (16-byte keys, 128-byte values; half of them overwrite a key) through
``kvstore.machine.data.apply_command`` on an overlay view over an LMDB read
transaction, as a node's save and the embedded store's group commit do, once with
``changes=None`` and once collecting, then feeds the collected changes into a
``ShardHistory`` and matches a batch against 10,000 parked key polls. Best of
``--rounds`` runs, microseconds per command.

    python bench/watch_apply.py [--commands 100000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from kvstore.commands import OP_PUT  # noqa: E402
from kvstore.machine.data import apply_command  # noqa: E402
from kvstore.storage import Storage  # noqa: E402
from kvstore.storage.overlay import ShardView  # noqa: E402
from kvstore.watch import ParkedPoll, ParkedPolls, ShardHistory  # noqa: E402


def run(storage, commands: list, collect: bool) -> tuple:
    db = storage.shards[0].data
    txn = storage.begin_read()
    try:
        view = ShardView([{}], txn, db)
        changes = [] if collect else None
        started = time.perf_counter()
        for revision, command in enumerate(commands, 1):
            apply_command(view, db, revision, command, changes)
        return time.perf_counter() - started, changes
    finally:
        storage.end_read(txn)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--commands", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    n = args.commands
    commands = [(OP_PUT, b"key-%012d" % (i % (n // 2)), b"v" * 128) for i in range(n)]
    with tempfile.TemporaryDirectory() as d:
        storage = Storage(d, shards=1)
        try:
            plain = min(run(storage, commands, False)[0] for _ in range(args.rounds))
            best, changes = None, None
            for _ in range(args.rounds):
                t, c = run(storage, commands, True)
                if best is None or t < best:
                    best, changes = t, c
        finally:
            storage.close()
    history = ShardHistory(64 * 1024 * 1024)
    started = time.perf_counter()
    for i in range(0, len(changes), 64):  # 64 commands per entry
        history.add(i // 64 + 1, changes[i:i + 64])
    fed = time.perf_counter() - started
    parked = ParkedPolls(1, 100_000, 100_000, 1 << 30, 1 << 30)
    for i in range(10_000):
        key = b"key-%012d" % (i * 3)
        parked.park(ParkedPoll(i, i % 100, 0, key, key + b"\x00", 1, 1 << 20, False, 1e9))
    batch = [(history.head + 1, changes[:256])]
    started = time.perf_counter()
    due = parked.due(0, batch)
    matched = time.perf_counter() - started
    print(f"apply {n} puts: {plain / n * 1e6:.2f} us/command without collecting, "
          f"{best / n * 1e6:.2f} us collecting (+{(best / plain - 1) * 100:.0f}%)")
    print(f"history add: {fed / n * 1e6:.2f} us/change ({history.bytes >> 20} MiB held, "
          f"oldest {history.oldest})")
    print(f"a batch of 256 changes against 10,000 parked key polls: {matched * 1e3:.2f} ms "
          f"({len(due)} due)")


if __name__ == "__main__":
    main()
