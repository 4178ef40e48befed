"""LMDB storage: one environment per data directory, four tables per shard.

``Storage`` owns the environment, the directory lock, map growth and the
translation of LMDB errors into ``StorageError``; ``state`` applies commands to
a shard's data table inside a transaction handed to it.
"""

from kvstore.storage.environment import ShardTables, Storage

__all__ = ["Storage", "ShardTables"]
