"""pytest-benchmark cases for the embedded store beside raw LMDB.

Run with ``pytest bench/test_bench_embedded.py --benchmark-enable``; compare
the ``kvstore`` and ``raw`` rows of each group (ratios, not absolute times).
"""

from __future__ import annotations

import itertools
import os
import random
import sys

import lmdb
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import kvstore  # noqa: E402

VALUE = random.Random(1).randbytes(128)
NKEYS = 20_000


def key(i: int) -> bytes:
    return b"key-%012d" % i


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    db = kvstore.open(str(root / "kv"))
    env = lmdb.open(str(root / "raw"), map_size=1 << 32)
    db.run_transaction(lambda txn: [txn.put(key(i), VALUE) for i in range(NKEYS)])
    with env.begin(write=True) as txn:
        for i in range(NKEYS):
            txn.put(key(i), VALUE)
    yield db, env
    db.close()
    env.close()


@pytest.mark.benchmark(group="get")
def test_get_kvstore(benchmark, stores):
    db, _ = stores
    keys = itertools.cycle([key(random.Random(2).randrange(NKEYS)) for _ in range(1000)])
    benchmark(lambda: db.get(next(keys)))


@pytest.mark.benchmark(group="get")
def test_get_raw_lmdb(benchmark, stores):
    _, env = stores
    keys = itertools.cycle([key(random.Random(2).randrange(NKEYS)) for _ in range(1000)])

    def get():
        with env.begin() as txn:
            return txn.get(next(keys))

    benchmark(get)


@pytest.mark.benchmark(group="put")
def test_put_kvstore(benchmark, stores):
    db, _ = stores
    counter = itertools.count(NKEYS)
    benchmark.pedantic(lambda: db.put(key(next(counter)), VALUE), rounds=300)


@pytest.mark.benchmark(group="put")
def test_put_raw_lmdb(benchmark, stores):
    _, env = stores
    counter = itertools.count(NKEYS)

    def put():
        with env.begin(write=True) as txn:
            txn.put(key(next(counter)), VALUE)

    benchmark.pedantic(put, rounds=300)
