"""Watch, the pure part: the per-shard history of applied changes and parked polls.

- ``history``: ``ShardHistory``, a ring of the last changes of one shard, bounded in
  bytes, answering ``since(from_revision, lo, hi, max_bytes)``;
- ``parked``: ``ParkedPolls``, the long polls a node holds until a matching revision is
  applied or their wait ends, matched once per applied batch.

No sockets, threads, files or clocks: the node (``kvstore.node``) and the embedded
store (``kvstore.embedded``) feed them durable, applied changes and the time.
"""

from kvstore.watch.history import COMPACTED, DELETE, PUT, ShardHistory
from kvstore.watch.parked import ParkedPoll, ParkedPolls

__all__ = ["ShardHistory", "COMPACTED", "PUT", "DELETE", "ParkedPoll", "ParkedPolls"]
