"""The embedded store, ``kvstore.open(dir)``: one replica in this process.

- ``store``: ``EmbeddedKV`` and its transactions, recovery and ``verify``;
- ``groupcommit``: concurrent writers sharing one append and one fdatasync;
- ``replica``: ``kvstore.open(dir, node_id=..., cluster=...)``, a cluster node run
  on a thread of this process with a client of the cluster;
- ``demo``: ``kvstore demo``.
"""
