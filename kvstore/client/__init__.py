"""The cluster client: ``kvstore.connect`` and ``kvstore.aio.connect``.

Its rooms, along the seams of the work:

- ``core``: the I/O engine (``ClientCore``: one thread, a DEALER per node,
  routing, retries, deadlines), and ``replies``: what a node may answer;
- ``kv``: the synchronous ``KV`` (``ClusterKV``) and its status view;
- ``txn``: transactions (``ClusterTxn``) and their two-phase-commit plans, the
  logic of a transaction in one place, driven by sync and asyncio I/O;
- ``aio``: the asyncio face over the same engine, requests and plans.

The client speaks only the wire protocol (``kvstore.transport.wire``) and the
command vocabulary (``kvstore.commands``): it never imports the node, the state
machine or the storage engine.
"""

from kvstore.client.core import AuthenticationFailed, ClientCore
from kvstore.client.kv import ClusterKV, connect
from kvstore.client.txn import LOCKING_AFTER_CONFLICTS, ClusterTxn

__all__ = ["AuthenticationFailed", "ClientCore", "ClusterKV", "ClusterTxn",
           "LOCKING_AFTER_CONFLICTS", "connect"]
