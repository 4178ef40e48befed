"""Where the recipes keep their state: the key layout, in one place.

Every recipe key starts with ``_kvstore/`` so that a user's scans of their own
prefixes never meet them:

- a lock:       ``_kvstore/lock/NAME``          value: the holder's random id
- an election:  ``_kvstore/election/NAME``      value: the candidate's random id + its value
- a queue:      ``_kvstore/queue/NAME/i/ID``    an item (value: the item)
                ``_kvstore/queue/NAME/c/ID``    the claim of item ID (value: the consumer's id),
                                                held by the consumer's lease
                ``_kvstore/queue/NAME/r/ID[/N]`` a consumer's registration on each shard
                                                (value: its id), held by its lease

A lock or an election is one key, so one shard: its revisions (the fencing
tokens) are that shard's and strictly increase. A queue's keys all live on ONE
shard, its home (the shard of ``_kvstore/queue/NAME/``): each item's id is drawn
until both its item key and its claim key hash there (``shard_id``), so the
revisions of the puts, one shard's log order, are a total order of the items.
"""

from __future__ import annotations

import os

from kvstore.keys import check_key
from kvstore.sharding import shard_of

ROOT = b"_kvstore/"
#: Bytes of a random id (as hex: twice as many characters).
ID_BYTES = 8
#: Characters of a holder id at the start of an election's value.
HOLDER_CHARS = 2 * ID_BYTES
#: Tries to draw an id whose keys land on the home shard: each try succeeds with
#: probability 1/nshards**2, so this many fail together with probability < 1e-9 for
#: 16 shards (a bound on a loop, not a figure anyone should reach).
ID_TRIES_MAX = 100_000


def name_bytes(name) -> bytes:
    """A recipe's name as bytes (a str is UTF-8), checked to fit in a key."""
    return check_key(name, "a recipe's name")


def lock_key(name) -> bytes:
    return check_key(ROOT + b"lock/" + name_bytes(name), "a lock's name")


def election_key(name) -> bytes:
    return check_key(ROOT + b"election/" + name_bytes(name), "an election's name")


def new_holder() -> bytes:
    """A random id for one acquisition, candidacy or consumer: what its key's value is."""
    return os.urandom(ID_BYTES).hex().encode()


def shard_for(key: bytes, nshards: int) -> int:
    return 0 if nshards == 1 else shard_of(key, nshards)


class QueueKeys:
    """The keys of queue ``name`` on a store of ``nshards`` shards."""

    def __init__(self, name, nshards: int) -> None:
        self.base = check_key(ROOT + b"queue/" + name_bytes(name) + b"/", "a queue's name")
        check_key(self.base + b"i/" + b"0" * 2 * ID_BYTES, "a queue's name")
        self.nshards = nshards
        self.home = shard_for(self.base, nshards)

    def item(self, item_id: bytes) -> bytes:
        return self.base + b"i/" + item_id

    def claim(self, item_id: bytes) -> bytes:
        return self.base + b"c/" + item_id

    def consumer(self, consumer_id: bytes) -> bytes:
        return self.base + b"r/" + consumer_id

    def anchor(self, consumer_id: bytes, shard: int) -> bytes:
        """The consumer's registration key on ``shard``: ``r/ID`` on the home shard,
        ``r/ID/N`` (the first N that hashes there) on the others."""
        if shard == self.home:
            return self.consumer(consumer_id)
        for n in range(ID_TRIES_MAX):
            key = self.consumer(consumer_id) + b"/%d" % n
            if shard_for(key, self.nshards) == shard:
                return key
        raise RuntimeError("no registration key found on the shard")  # pragma: no cover

    def parse(self, key: bytes) -> tuple[bytes, bytes] | None:
        """``(kind, id)`` of one of this queue's keys (kind ``b"i"``, ``b"c"`` or ``b"r"``)."""
        if not key.startswith(self.base) or key[len(self.base) + 1:len(self.base) + 2] != b"/":
            return None
        return key[len(self.base):len(self.base) + 1], key[len(self.base) + 2:]

    def _home(self, *keys: bytes) -> bool:
        return all(shard_for(k, self.nshards) == self.home for k in keys)

    def new_item_id(self) -> bytes:
        """A random item id whose item key and claim key both live on the home shard."""
        for _ in range(ID_TRIES_MAX):
            item_id = new_holder()
            if self._home(self.item(item_id), self.claim(item_id)):
                return item_id
        raise RuntimeError("no item id found on the queue's shard")  # pragma: no cover

    def new_consumer_id(self) -> bytes:
        """A random consumer id whose registration key lives on the home shard."""
        for _ in range(ID_TRIES_MAX):
            consumer_id = new_holder()
            if self._home(self.consumer(consumer_id)):
                return consumer_id
        raise RuntimeError("no consumer id found on the queue's shard")  # pragma: no cover
