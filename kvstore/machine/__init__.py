"""The replicated state machine: what every engine applies, the same code everywhere.

- ``data``: a shard's key-value table: apply a command, read, scan, validate reads;
- ``twopc``: two-phase commit as a shard's state (prepared, locks, decisions);
- ``replica``: client sessions (exactly-once writes), the checks a logged command
  passes before it is applied, and applying a node's committed entries.

The embedded store and the nodes both apply through here, inside an LMDB (or
overlay) transaction handed to them: no commits, no files, no sockets.
"""
