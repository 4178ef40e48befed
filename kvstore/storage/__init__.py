"""Storage: the write-ahead log and its one replay, the overlay, checkpoints, LMDB.

``wal`` is the log both engines write (one record format), ``replay`` reads it
back for both; ``overlay`` holds what the log has beyond the last checkpoint,
``checkpoint`` moves it into LMDB. ``Storage`` owns the LMDB environment, the
directory lock, map growth and the translation of LMDB errors into
``StorageError``; ``kvstore.machine.data`` applies commands to a shard's data
table inside a transaction handed to it.
"""

from kvstore.storage.environment import ShardTables, Storage

__all__ = ["Storage", "ShardTables"]
