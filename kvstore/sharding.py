"""Key -> shard.

xxHash64 of the key, then jump consistent hashing onto ``nshards`` buckets.
Jump hashing needs no ring or table and, when shards are added, moves only
the keys that must move (1/n of them), which is what a later resharding
wants; xxHash64 spreads even sequential keys evenly. Both run in the compiled
kernel (``_ext/hashing.pyx``) when it is built.
"""

from __future__ import annotations

from kvstore import _native


#: ``shard_of(key: bytes, nshards: int) -> int``: the shard in ``[0, nshards)`` that owns
#: ``key``. Bound straight to the kernel: it is called on every read and write, and a
#: Python wrapper would double its cost.
shard_of = _native.shard_of

#: ``shard_of_many(keys, nshards) -> list[int]``: ``shard_of`` for each key in one call.
shard_of_many = _native.shard_of_many
