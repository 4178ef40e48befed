"""pytest-benchmark cases: each kernel, compiled vs pure twin (and xxhash for hashing).

    pytest bench/test_bench_kernels.py --benchmark-enable --benchmark-group-by=group
"""

from __future__ import annotations

import importlib
import os
import random
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from kvstore._native import pure  # noqa: E402

IMPLS = {
    "native": {name: importlib.import_module(f"kvstore._native._{name}")
               for name in ("hashing", "logcodec", "quorum")},
    "pure": {"hashing": pure.hashing, "logcodec": pure.logcodec, "quorum": pure.quorum},
}
RNG = random.Random(3)
KEY = RNG.randbytes(16)
KEYS = [RNG.randbytes(16) for _ in range(1000)]
RECORDS = [(slot, 5 << 16 | 1, 1, RNG.randbytes(128)) for slot in range(1000)]
ENCODED = pure.logcodec.encode_batch(RECORDS)


@pytest.mark.benchmark(group="shard_of, one key")
@pytest.mark.parametrize("impl", ["native", "pure"])
def test_shard_of(benchmark, impl):
    benchmark(IMPLS[impl]["hashing"].shard_of, KEY, 16)


@pytest.mark.benchmark(group="shard_of, one key")
def test_xxhash_package(benchmark):
    import xxhash
    benchmark(xxhash.xxh64_intdigest, KEY)


@pytest.mark.benchmark(group="shard_of_many, 1000 keys")
@pytest.mark.parametrize("impl", ["native", "pure"])
def test_shard_of_many(benchmark, impl):
    benchmark(IMPLS[impl]["hashing"].shard_of_many, KEYS, 16)


@pytest.mark.benchmark(group="encode_batch, 1000 x 128 B")
@pytest.mark.parametrize("impl", ["native", "pure"])
def test_encode_batch(benchmark, impl):
    benchmark(IMPLS[impl]["logcodec"].encode_batch, RECORDS)


@pytest.mark.benchmark(group="decode_batch, 1000 x 128 B")
@pytest.mark.parametrize("impl", ["native", "pure"])
def test_decode_batch(benchmark, impl):
    assert benchmark(IMPLS[impl]["logcodec"].decode_batch, ENCODED) == RECORDS


@pytest.mark.benchmark(group="tally")
@pytest.mark.parametrize("nodes", [3, 5])
@pytest.mark.parametrize("impl", ["native", "pure"])
def test_tally(benchmark, impl, nodes):
    module = IMPLS[impl]["quorum"]

    def run():
        tally = module.QuorumTally(nodes, 1024)
        for first in range(0, 1024, 8):
            for node in range(nodes):
                tally.record(node, first, first + 7, 0)
        return tally.commit_index

    assert benchmark(run) == 1023


@pytest.mark.benchmark(group="tally_many")
@pytest.mark.parametrize("nodes", [3, 5])
@pytest.mark.parametrize("impl", ["native", "pure"])
def test_tally_many_single_slot_acks(benchmark, impl, nodes):
    module = IMPLS[impl]["quorum"]
    acks = [(node, slot, slot, 0) for slot in range(1024) for node in range(nodes)]
    assert benchmark(lambda: module.QuorumTally(nodes, 1024).record_many(acks)) == 1023
