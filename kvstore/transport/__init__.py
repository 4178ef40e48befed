"""ZeroMQ transport: the wire format (``wire``) and a node's sockets (``sockets``).

Only ``kvstore.node.loop``, the clients and the server touch these; the pure cores
(``paxos/``) never do.
"""

from kvstore.transport.wire import FrameError, decode, encode_paxos, encode_reply, encode_request

__all__ = ["FrameError", "decode", "encode_paxos", "encode_reply", "encode_request"]
