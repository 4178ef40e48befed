"""The embedded store, ``kvstore.open(dir)``: one replica in this process.

- ``store``: ``EmbeddedKV``, its API and its transactions;
- ``commit``: the write path, a group applied, appended to the log, published;
- ``recovery``: opening, LMDB's checkpoint and the log replayed after it, and what an
  entry of the embedded store holds;
- ``verify``: ``EmbeddedKV.verify``, every checksum and the state against the log;
- ``groupcommit``: concurrent writers sharing one append and one fdatasync;
- ``replica``: ``kvstore.open(dir, node_id=..., cluster=...)``, a cluster node run
  on a thread of this process with a client of the cluster;
- ``demo``: ``kvstore demo``.
"""
