"""xxHash64 and jump consistent hashing: outside vectors, and native == pure twin."""

from __future__ import annotations

import random

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore import sharding
from kernel_impls import HASHING, _hashing, pure

U64 = st.integers(min_value=0, max_value=2**64 - 1)


@pytest.mark.parametrize("impl", sorted(HASHING))
def test_xxh64_matches_the_reference_library_on_every_length(impl):
    xxh64 = HASHING[impl].xxh64
    rng = random.Random(64)
    for n in list(range(0, 300)) + [1000, 4096, 65_537]:
        data = rng.randbytes(n)
        seed = rng.getrandbits(64)
        assert xxh64(data) == xxhash.xxh64_intdigest(data), n
        assert xxh64(data, seed) == xxhash.xxh64_intdigest(data, seed), (n, seed)


def test_xxh64_known_values():
    # Published XXH64 values: empty input with seed 0, and "abc".
    assert _hashing.xxh64(b"") == 0xEF46DB3751D8E999
    assert _hashing.xxh64(b"abc") == 0x44BC2CF5AD770999


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), U64)
def test_xxh64_native_equals_pure(data, seed):
    assert _hashing.xxh64(data, seed) == pure.hashing.xxh64(data, seed)
    assert _hashing.xxh64(data, seed) == xxhash.xxh64_intdigest(data, seed)


def test_xxh64_accepts_any_buffer():
    data = b"kvstore buffers"
    for impl in HASHING.values():
        assert impl.xxh64(bytearray(data)) == impl.xxh64(memoryview(data)) == impl.xxh64(data)


@settings(max_examples=300, deadline=None)
@given(U64, st.integers(min_value=1, max_value=10_000))
def test_jump_hash_native_equals_pure_and_is_in_range(key, buckets):
    native = _hashing.jump_consistent_hash(key, buckets)
    assert native == pure.hashing.jump_consistent_hash(key, buckets)
    assert 0 <= native < buckets


def test_jump_hash_moves_only_keys_that_must_move():
    # Growing from n to n+1 buckets: a key either stays or moves to the new bucket.
    rng = random.Random(5)
    keys = [rng.getrandbits(64) for _ in range(5000)]
    for n in (1, 2, 3, 7, 16):
        moved = 0
        for key in keys:
            before = _hashing.jump_consistent_hash(key, n)
            after = _hashing.jump_consistent_hash(key, n + 1)
            assert after in (before, n)
            moved += after != before
        # about 1/(n+1) of the keys move
        assert abs(moved / len(keys) - 1 / (n + 1)) < 0.05


def test_jump_hash_rejects_no_buckets():
    for impl in HASHING.values():
        with pytest.raises(ValueError):
            impl.jump_consistent_hash(1, 0)
        with pytest.raises(ValueError):
            impl.shard_of(b"k", 0)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=64), max_size=50),
       st.integers(min_value=1, max_value=64))
def test_shard_of_and_batch_agree_across_implementations(keys, nshards):
    expected = [pure.hashing.jump_consistent_hash(xxhash.xxh64_intdigest(k), nshards)
                for k in keys]
    assert [_hashing.shard_of(k, nshards) for k in keys] == expected
    assert _hashing.shard_of_many(keys, nshards) == expected
    assert pure.hashing.shard_of_many(keys, nshards) == expected
    assert sharding.shard_of_many(keys, nshards) == expected


def test_shards_are_balanced_for_sequential_keys():
    counts = [0] * 8
    for i in range(40_000):
        counts[sharding.shard_of(b"user:%d" % i, 8)] += 1
    assert min(counts) > 4500 and max(counts) < 5500
