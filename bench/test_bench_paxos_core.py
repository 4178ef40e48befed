"""pytest-benchmark cases for the pure Paxos core: three replicas, no I/O.

Run with ``pytest bench/test_bench_paxos_core.py --benchmark-enable``. Each
round proposes one pipeline window of commands and settles the group until
quiet; compare groups by batch size (commands per entry) and window.
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import paxos_core  # noqa: E402

COMMAND = b"x" * 32


@pytest.mark.parametrize("batch,window", [(1, 1), (1, 32), (8, 32), (64, 32)])
def test_commit_one_window(benchmark, batch, window):
    replicas = paxos_core.make_group(batch, window)
    leader = replicas[0]

    def one_window():
        for _ in range(batch * window):
            leader.propose(COMMAND)
        return paxos_core.settle(replicas)

    applied = benchmark(one_window)
    assert applied == batch * window
