"""The error classes of the public contract (docs/api.md, "Errors").

Every failure a user can see is one of these. Internals translate third-party
errors (lmdb, zmq, msgpack) at one choke point with ``raise ... from e`` so the
message says what happened and, where it can, how to fix it.
"""

from __future__ import annotations


class KVError(Exception):
    """Base of every kvstore error."""


class InvalidArgument(KVError, ValueError):
    """Wrong type, empty or oversized key, oversized value, malformed config, misuse."""


class TransactionConflict(KVError):
    """A transaction lost to a concurrent one; nothing of it was applied."""


class Unavailable(KVError):
    """No quorum or no reachable server. The outcome of a write that raised it is unknown."""


class Timeout(Unavailable):
    """The call's deadline passed. The outcome of a write that raised it is unknown."""


class StorageError(KVError):
    """The disk refused: full, read-only, corrupt, or the directory is held by another process."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class CorruptRecord(StorageError):
    """A log record failed validation (truncated, torn, bit-flipped, wrong version).

    ``slot`` and ``offset`` locate the bad record where they are known.
    """

    def __init__(self, message: str, slot: int | None = None, offset: int | None = None,
                 path: str | None = None) -> None:
        super().__init__(message, path)
        self.slot = slot
        self.offset = offset


class Compacted(KVError):
    """A watch asked for revisions older than the history kept (``docs/watch.md``).

    ``oldest``: the oldest revision still available (an int), or a dict shard -> oldest
    revision where it is known per shard. Re-read the data, then watch from there.
    """

    def __init__(self, message: str, oldest=None) -> None:
        super().__init__(message)
        self.oldest = oldest


class LeaseExpired(KVError):
    """The lease is gone (it expired, or was revoked): its keys were deleted. A put with
    it applied nothing; a keep-alive cannot bring it back (make a new lease)."""


class PermissionDenied(KVError):
    """The cluster refused an administrative request (``kvstore member add``, ``promote``,
    ``remove``) from a client key that is not listed in the key directory's ``admins/``;
    nothing was changed."""


__all__ = [
    "KVError",
    "InvalidArgument",
    "TransactionConflict",
    "Unavailable",
    "Timeout",
    "StorageError",
    "CorruptRecord",
    "Compacted",
    "LeaseExpired",
    "PermissionDenied",
]
