"""A transaction's buffered writes, bounded in bytes: the one size check of every engine.

The embedded store's transaction (``kvstore.embedded.store.EmbeddedTxn``) and the
cluster's (``kvstore.client.core.ClusterTxn``, which the asyncio client drives too)
buffer their writes in a ``WriteBuffer``: a put or delete that would carry the
keys and values written past the engine's limit raises ``InvalidArgument`` and
leaves the transaction as it was. The limits differ because the entries do: an
embedded transaction is one local log entry (``MAX_TXN_SIZE``), a cluster one
travels as one request and one replicated log entry
(``MAX_CLUSTER_TXN_SIZE``, ``kvstore.keys``). ``entry_bytes`` estimates the
whole entry (what was read counts too) for the check at commit.
"""

from __future__ import annotations

from kvstore.errors import InvalidArgument


class WriteBuffer(dict):
    """``key -> value or None`` (None deletes), with ``size``: the bytes of the keys and
    values held. Invariant: ``size <= limit``."""

    def __init__(self, limit: int, limit_name: str) -> None:
        super().__init__()
        self.limit = limit
        self.limit_name = limit_name
        self.size = 0

    def size_with(self, key: bytes, value: bytes | None) -> int:
        """The size once ``value`` is written at ``key``; ``InvalidArgument`` past the limit."""
        old = self.get(key)
        size = self.size + len(value or b"") - len(old or b"") + (0 if key in self else len(key))
        if size > self.limit:
            what = "put" if value is not None else "delete"
            raise InvalidArgument(
                f"this {what} would make the transaction's writes {size} bytes; the largest "
                f"allowed is {self.limit_name} = {self.limit}: split it into smaller "
                f"transactions (the transaction is unchanged)")
        return size

    def write(self, key: bytes, value: bytes | None) -> None:
        """Buffer a put (``value``) or a delete (None), or raise and change nothing."""
        size = self.size_with(key, value)
        self[key] = value
        self.size = size


def entry_bytes(reads, ranges, writes) -> int:
    """About the bytes a transaction adds to a log entry: ``reads`` ``(key, revision)``,
    ``ranges`` ``(lo, hi, [(key, revision)])``, ``writes`` ``(key, value or None)``."""
    size = 0
    for key, _revision in reads:
        size += len(key) + 9
    for lo, hi, seen in ranges:
        size += len(lo) + len(hi or b"") + sum(len(k) + 9 for k, _ in seen)
    for key, value in writes:
        size += len(key) + len(value or b"") + 2
    return size
