"""The cluster client: ``kvstore.connect`` and ``kvstore.aio.connect``.

``core`` holds the I/O engine (one thread, a DEALER per node, routing, retries,
deadlines), the synchronous ``KV`` and its transactions; ``aio`` the asyncio
face over the same engine. The client speaks only the wire protocol
(``kvstore.transport.wire``): it never imports the node, the state machine or
the storage engine.
"""
