"""The wire calls of a cluster backup, over a client's connection.

The protocol (fence every shard, open a read point on one node, lift the
fences, page the rows, close) and why it makes a consistent cut are in
``kvstore.backup.cluster``; these are its calls, each checked by
``kvstore.client.replies`` like every other answer.
"""

from __future__ import annotations

from kvstore.commands import backup_fence, backup_unfence
from kvstore.transport import wire


class BackupCalls:
    """A cluster backup's requests through ``kv`` (a ``kvstore.connect`` client)."""

    def __init__(self, kv) -> None:
        self._core = kv._core
        self.nshards: int = kv.nshards

    @property
    def addresses(self) -> list:
        """Every node's client address, by node index (as the cluster told it)."""
        return list(self._core.nodes)

    def addresses_to_try(self) -> list:
        """``addresses``, those whose connection is known to be down last (a snapshot
        of the I/O thread's view: a hint for the order, nothing more)."""
        down = self._core._down.copy()
        return sorted(self._core.nodes, key=lambda address: address in down)

    def fence_all(self, fence_id: bytes, until_ms: int, timeout: float) -> None:
        """Log ``BackupFence`` on every shard (in parallel); returns once each is applied."""
        futures = [self._core.submit(wire.OP_WRITE, shard, backup_fence(fence_id, until_ms),
                                     timeout) for shard in range(self.nshards)]
        for future in futures:
            self._core.wait(future)

    def unfence_all(self, fence_id: bytes, timeout: float) -> list:
        """Log ``BackupUnfence`` on every shard; per shard, whether its fence still held."""
        futures = [self._core.submit(wire.OP_WRITE, shard, backup_unfence(fence_id), timeout)
                   for shard in range(self.nshards)]
        return [self._core.wait(future) for future in futures]

    def open(self, address: str, fence_id: bytes, timeout: float) -> tuple[bytes, list]:
        """Open a read point on the node at ``address`` once it is a cut for the fence
        (the node answers RETRY until then; the client asks again until ``timeout``):
        ``(session id, [revision per shard])``."""
        session_id, revisions = self._core.call(wire.OP_BACKUP_OPEN, None, [fence_id], timeout,
                                                target=address)
        return session_id, revisions

    def page(self, address: str, session_id: bytes, shard: int, table: int,
             after: bytes | None, max_bytes: int, timeout: float) -> tuple[list, bool]:
        """Rows of ``shard``'s ``table`` past ``after``: ``([(key, value), ...], done)``."""
        rows, done = self._core.call(wire.OP_BACKUP_PAGE, None,
                                     [session_id, shard, table, after, max_bytes], timeout,
                                     target=address)
        return [(k, v) for k, v in rows], done

    def close(self, address: str, session_id: bytes, timeout: float) -> bool:
        """Close the read point (the node also closes an idle one on its own)."""
        return self._core.call(wire.OP_BACKUP_CLOSE, None, [session_id], timeout,
                               target=address)
