"""A node's ZeroMQ sockets: one ROUTER for everyone, one DEALER link per peer.

- The ROUTER binds the node's one address. Clients send it requests and get
  replies on it; peers send it their Paxos batches. ``ROUTER_MANDATORY`` makes
  a reply to a vanished client an error we count instead of a silent drop
  (zeromq/libzmq#2037), bounded high-water marks keep memory bounded, and
  ``MAXMSGSIZE`` makes libzmq refuse an oversized message before it is
  buffered whole.
- Each peer gets a DEALER connected to its ROUTER. libzmq reconnects it on its
  own (``RECONNECT_IVL``..``RECONNECT_IVL_MAX``). ``IMMEDIATE`` keeps nothing
  queued for a peer that is down: Paxos retransmits on its own timers and a
  burst of stale messages on reconnect only costs work.
- Every send is non-blocking: a full queue or an unreachable peer drops the
  message and counts it; the protocol never assumes delivery.

Nothing here interprets a frame beyond its envelope; ``wire.decode`` does.
"""

from __future__ import annotations

from collections import Counter

import zmq

from kvstore.transport.wire import MAX_PEER_FRAME_BYTES

HWM_MESSAGES = 10_000
RECONNECT_IVL_MS = 50
RECONNECT_IVL_MAX_MS = 1000
HANDSHAKE_IVL_MS = 2000
#: At most this many frames are read per ``recv_many`` call: the loop must get back
#: to ticking and persisting under any load.
RECV_BATCH_MAX = 4096


class NodeSockets:
    """The ROUTER of one node and its DEALER links to peers (by peer index)."""

    def __init__(self, bind_address: str, peers: dict, *, max_frame_bytes: int = MAX_PEER_FRAME_BYTES,
                 context: zmq.Context | None = None, keys=None) -> None:
        self.context = context or zmq.Context()
        self._own_context = context is None
        self.counters: Counter = Counter()
        self.router = None
        self.peers: dict = {}
        self._auth = None
        if keys is not None:  # CurveZMQ (transport/security.py): before any socket binds
            from kvstore.transport.security import start_authenticator
            self._auth = start_authenticator(self.context, keys)
        self.router = self.context.socket(zmq.ROUTER)
        r = self.router
        if keys is not None:
            keys.make_server(r)
        r.setsockopt(zmq.ROUTER_MANDATORY, 1)
        r.setsockopt(zmq.LINGER, 0)
        r.setsockopt(zmq.SNDHWM, HWM_MESSAGES)
        r.setsockopt(zmq.RCVHWM, HWM_MESSAGES)
        r.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes)
        r.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_IVL_MS)
        try:
            r.bind(bind_address)
        except zmq.ZMQError:
            self.close()
            raise
        for index, address in peers.items():
            d = self.context.socket(zmq.DEALER)
            if keys is not None:
                keys.make_client(d)
            d.setsockopt(zmq.LINGER, 0)
            d.setsockopt(zmq.IMMEDIATE, 1)
            d.setsockopt(zmq.SNDHWM, HWM_MESSAGES)
            d.setsockopt(zmq.RCVHWM, 16)  # peers never answer on this link
            d.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
            d.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
            d.connect(address)
            self.peers[index] = d

    def recv_many(self, limit: int = RECV_BATCH_MAX) -> list:
        """Up to ``limit`` ``(identity, frame)`` pairs waiting on the ROUTER, without blocking.

        A message that is not exactly [identity, one frame] is dropped and counted.
        """
        out = []
        recv = self.router.recv_multipart
        for _ in range(limit):
            try:
                parts = recv(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                break
            if len(parts) != 2:
                self.counters["dropped_bad_envelope"] += 1
                continue
            out.append((parts[0], parts[1]))
        return out

    def send_peer(self, index: int, frame: bytes) -> bool:
        try:
            self.peers[index].send(frame, zmq.NOBLOCK)
            self.counters["sent_peer_frames"] += 1
            return True
        except zmq.Again:  # the peer is down (IMMEDIATE) or its queue is full
            self.counters["dropped_peer_unreachable"] += 1
            return False

    def reply(self, identity: bytes, frame: bytes) -> bool:
        try:
            self.router.send_multipart((identity, frame), zmq.NOBLOCK)
            return True
        except zmq.ZMQError as e:  # EHOSTUNREACH: the client left; EAGAIN: its queue is full
            self.counters["dropped_reply_" + ("gone" if e.errno == zmq.EHOSTUNREACH else "full")] += 1
            return False

    def close(self) -> None:
        for d in getattr(self, "peers", {}).values():
            d.close(0)
        self.peers = {}
        if self.router is not None:
            self.router.close(0)
            self.router = None
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._own_context:
            self.context.term()
