"""A node's ZeroMQ sockets: a ROUTER for clients, a ROUTER for peers, one DEALER per peer.

Clients are not nodes. Each node binds two addresses:

- the **client ROUTER** (``[nodes.NAME] address``): clients send requests and
  get replies on it. It carries only REQUEST/REQUESTS in and REPLIES out
  (``Node._receive`` drops anything else, counted by reason);
- the **peer ROUTER** (``peer_address``; by default the client port + 10000 on
  the same host, Redis Cluster's bus-port convention): other nodes' DEALERs
  send their Paxos batches and forwarded requests there, nothing else is read
  from it. Every peer DEALER presents a routing id that names its sender, the
  cluster's shape (shard count and identity, not its members: they change at
  run time) and the sender's peer address (``peer_identity``): a frame from a
  connection without one, or from a node of another shape, is dropped before
  it is decoded (``NodeSockets.refusals`` says why, once per peer). Links to
  peers come and go with the membership (``add_peer``, ``remove_peer``).

The client ROUTER lives in a ZeroMQ context of its own, so libzmq decodes
what clients send on another I/O thread than the peers' traffic: a client's
message of a million parts (a second of libzmq's work) delays no heartbeat.

With Curve (``transport/security.py``) each ROUTER has its own ZAP domain and
allow-list: node keys for the peer ROUTER, client keys for the client ROUTER,
so a client key cannot even complete the handshake on the peer port.

libzmq reconnects every DEALER on its own (``RECONNECT_IVL``..``RECONNECT_IVL_MAX``);
``IMMEDIATE`` keeps nothing queued for a peer that is down (Paxos retransmits on
its own timers). Every send is non-blocking: a full queue or an unreachable
peer drops the message and counts it; the protocol never assumes delivery.

Memory, in bytes, per client connection and per node
----------------------------------------------------

libzmq's high-water marks count messages, not bytes, so the bound is built
from small per-connection HWMs, size caps, and our own accounting of large
replies:

- **Inbound, per client connection**: a frame over ``MAX_REQUEST_FRAME_BYTES``
  (16 MiB, ``MAXMSGSIZE``; peers may send 64 MiB) drops the connection before
  it is buffered; at most ``CLIENT_RCVHWM`` (4) messages wait in its pipe, plus
  the one being decoded: (4 + 1) x 16 MiB = 80 MiB at most per connection. A
  turn reads at most ``RECV_BYTES_PER_TURN`` (64 MiB) from a socket, so the
  node's own copies of inbound frames are bounded the same way.
- **Many-part messages**: a client message is ``[identity, frame]``. One with
  more parts is dropped part by part, ``DRAIN_PARTS_PER_TURN`` (4,000) parts
  per loop turn, never materialised as a list: 2,000,000 empty parts cost
  ~1.5 us each, a few ms per turn over 500 turns, and the loop keeps ticking,
  persisting and serving its peers meanwhile; only this node's client socket
  waits for the drain (seconds for a million parts). libzmq itself holds a
  multi-part message whole before it hands over its first part (64 bytes per
  part: a 4 MB message of 2,000,000 parts holds 128 MB until drained; libzmq
  has no limit on the number of parts, so this is the one inbound cost that
  grows with the message rather than with a frame).
- **Outbound, per client connection**: a reply frame is at most
  ``REPLY_FRAME_BYTES_MAX`` (32 MiB: a bigger single answer, a scan of a huge
  range, is refused with an ``InvalidArgument`` the client raises, naming the
  way out: a limit or a narrower range); batches of replies are cut into frames
  of ``REPLY_FRAME_TARGET_BYTES`` (1 MiB). Frames under ``TRACK_BYTES_MIN``
  (16 KiB) are copied into libzmq and bounded by ``CLIENT_SNDHWM`` (16)
  messages: 16 x 16 KiB = 256 KiB. Larger frames are sent zero-copy and tracked
  until libzmq is done with them (``zmq.MessageTracker``): a client's tracked
  bytes stay under ``CLIENT_QUEUED_BYTES_MAX`` (32 MiB). A reply that would
  pass it is dropped and counted (``dropped_reply_slow_client``): a client that
  does not read its replies is cut off at about 32 MiB + 256 KiB queued, where
  the unbounded HWM of 10,000 messages once let 300 unread 4 MiB scans take
  1.9 GB. The node checks that budget before it copies an answer out of the
  store (``reply_room``, counting answers computed in the same turn:
  ``charge``), so 300 reads served in one turn cost the budget plus one answer,
  not 300 answers: the transient peak of a turn is those answers (<= 32 MiB +
  one) and their encoded frames beside them (as much again, each encoded once,
  ``wire.encode_replies_frames``). Measured: RSS +67 MiB for 300 unread 4 MiB
  scans (``tests/test_hostile_clients.py`` holds it under 96 MiB).
- **Per node**: tracked reply bytes for all clients together stay under
  ``NODE_QUEUED_BYTES_MAX`` (256 MiB; beyond, ``dropped_reply_node_full``);
  untracked ones add 256 KiB per open client connection, and connections are
  bounded by the process's file descriptors (RLIMIT_NOFILE; 1,024 by default:
  256 MiB). Peers are never cut off by this accounting: nothing for a peer goes
  through the client ROUTER.
"""

from __future__ import annotations

import hashlib
from collections import Counter, deque

import zmq

from kvstore.transport import wire
from kvstore.transport.members import is_tcp_address
from kvstore.transport.wire import MAX_PEER_FRAME_BYTES, MAX_REQUEST_FRAME_BYTES

#: The derived peer port is the client port plus this (Redis Cluster's bus port).
PEER_PORT_OFFSET = 10000
#: ``ZMQ_EVENTS`` and ``POLLIN`` as plain ints: ``&`` on pyzmq's enum flags builds an
#: enum member each time (about 1 us; several per message on the receive path).
EVENTS, POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)
HWM_MESSAGES = 10_000
CLIENT_SNDHWM = 16
CLIENT_RCVHWM = 4
RECONNECT_IVL_MS = 50
RECONNECT_IVL_MAX_MS = 1000
HANDSHAKE_IVL_MS = 2000
#: At most this many frames are read per ``recv_many`` call: the loop must get back
#: to ticking and persisting under any load.
RECV_BATCH_MAX = 4096
#: At most this many bytes of frames are read from one socket per ``recv_many`` call.
RECV_BYTES_PER_TURN = 64 * 1024 * 1024
#: Parts of a many-part message dropped per ``recv_many`` call at most: a few ms.
DRAIN_PARTS_PER_TURN = 4_000
#: Reply frames at or above this size are sent zero-copy and tracked (bytes accounting).
TRACK_BYTES_MIN = 16 * 1024
REPLY_FRAME_TARGET_BYTES = 1024 * 1024
REPLY_FRAME_BYTES_MAX = 32 * 1024 * 1024
CLIENT_QUEUED_BYTES_MAX = 32 * 1024 * 1024
NODE_QUEUED_BYTES_MAX = 256 * 1024 * 1024

#: Where a frame came from (``recv_many``).
CLIENT = "client"
PEER = "peer"

_PEER_ID_PREFIX = b"kvpeer1:"


def derived_peer_address(client_address: str) -> str:
    """The peer address of a node that names none: same host, client port + 10000, or
    client port - 10000 where + would pass 65535 (a port the kernel hands out for
    port 0 is often that high; a config written from one must start as it is)."""
    host, _, port = client_address.rpartition(":")
    peer_port = int(port) + PEER_PORT_OFFSET
    if peer_port > 65535:
        peer_port = int(port) - PEER_PORT_OFFSET
    if not 0 < peer_port <= 65535:
        raise ValueError(f"no peer port can be derived from the client port {port}: "
                         f"set peer_address for this node")
    return f"{host}:{peer_port}"


def shape_fingerprint(shards: int, cluster_id: bytes) -> bytes:
    """What two nodes must agree on to be peers: the shard count and the cluster's
    identity (``kvstore.node.membership.cluster_id``: fixed when the cluster was
    bootstrapped). Not the members: they change through consensus, at run time."""
    return hashlib.sha256(repr((shards, bytes(cluster_id))).encode()).digest()[:8]


def peer_identity(index: int, shards: int, fingerprint: bytes, peer_address: str = "") -> bytes:
    """The routing id a node's DEALERs present: prefix, sender index, shard count, shape,
    then the sender's own peer address: a node that does not know the sender yet (a
    member added in an epoch it has not reached) can answer it there."""
    return (_PEER_ID_PREFIX + index.to_bytes(2, "big") + shards.to_bytes(2, "big") + fingerprint
            + peer_address.encode())


#: Bytes of a peer routing id before the sender's address.
_PEER_ID_FIXED = len(_PEER_ID_PREFIX) + 2 + 2 + 8


class NodeSockets:
    """The two ROUTERs of one node and its DEALER links to peers (by peer index)."""

    def __init__(self, client_address: str, peer_address: str, peers: dict, *,
                 identity: bytes = b"", keys=None) -> None:
        # Two contexts, so two libzmq I/O threads: decoding what a client sends (a
        # message of a million parts takes libzmq itself a second) never delays a peer.
        self.context = zmq.Context()  # the peer ROUTER and the DEALERs to peers
        self.client_context = zmq.Context()  # the client ROUTER
        self.counters: Counter = Counter()
        self.client_router = self.peer_router = None
        self.peers: dict = {}  # index -> DEALER
        self._addresses: dict = {}  # index -> the address its DEALER connects to
        self._identity = identity
        self._auth = None
        self._client_auth = None
        self._keys = keys
        self._draining: set = set()  # ROUTERs in the middle of dropping a many-part message
        # client identity -> deque of (tracker, bytes) in send order (libzmq sends one
        # connection's messages in order, so they are done in order)
        self._tracked: dict = {}
        self._queued_bytes: dict = {}  # client identity -> tracked bytes libzmq still holds
        self.queued_bytes = 0
        self._pending: dict = {}  # client identity -> bytes of answers computed this turn
        self.pending_bytes = 0
        # client identities whose frames this turn's recv_many read were sent with an admin
        # key (``may_administer``): renewed each turn, so bounded by one turn's frames
        self._admin_senders: set = set()
        self.refusals: dict = {}  # peer routing id -> why its frames are dropped
        try:
            if keys is not None:  # CurveZMQ (transport/security.py): before any socket binds
                from kvstore.transport.security import start_authenticator
                self._auth = start_authenticator(self.context, keys, "peers")
                self._client_auth = start_authenticator(self.client_context, keys, "clients")
                keys.reload_admins(force=True)
            self.peer_router = self._router(self.context, peer_address, keys, "peers",
                                            HWM_MESSAGES, HWM_MESSAGES, MAX_PEER_FRAME_BYTES)
            self.peer_router.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted peer takes over
            self.client_router = self._router(self.client_context, client_address, keys,
                                              "clients", CLIENT_SNDHWM, CLIENT_RCVHWM,
                                              MAX_REQUEST_FRAME_BYTES)
            self.client_router.copy_threshold = TRACK_BYTES_MIN
        except zmq.ZMQError:
            self.close()
            raise
        for index, address in peers.items():
            self.add_peer(index, address)

    def add_peer(self, index: int, address: str) -> None:
        """A DEALER to node ``index`` at ``address`` (a member added at run time, or one
        that moved: the old link is closed); nothing if it is there already."""
        d = self.peers.get(index)
        if d is not None:
            if self._addresses.get(index) == address:
                return
            self.remove_peer(index)
        keys, identity = self._keys, self._identity
        d = self.context.socket(zmq.DEALER)
        if keys is not None:
            keys.make_client(d)
        if identity:
            d.setsockopt(zmq.ROUTING_ID, identity)
        d.setsockopt(zmq.LINGER, 0)
        d.setsockopt(zmq.IMMEDIATE, 1)
        d.setsockopt(zmq.SNDHWM, HWM_MESSAGES)
        d.setsockopt(zmq.RCVHWM, 16)  # peers never answer on this link
        d.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
        d.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
        d.connect(address)
        self.peers[index] = d
        self._addresses[index] = address

    def remove_peer(self, index: int) -> None:
        """Close the link to node ``index`` (a member removed); nothing if there is none."""
        d = self.peers.pop(index, None)
        self._addresses.pop(index, None)
        if d is not None:
            d.close(0)

    @staticmethod
    def _router(context, address: str, keys, domain: str, sndhwm: int, rcvhwm: int,
                max_frame_bytes: int):
        r = context.socket(zmq.ROUTER)
        if keys is not None:
            keys.make_server(r, domain)
        r.setsockopt(zmq.ROUTER_MANDATORY, 1)
        r.setsockopt(zmq.LINGER, 0)
        r.setsockopt(zmq.SNDHWM, sndhwm)
        r.setsockopt(zmq.RCVHWM, rcvhwm)
        r.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes)
        r.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_IVL_MS)
        try:
            r.bind(address)
        except zmq.ZMQError:
            r.close(0)
            raise
        return r

    # ------------------------------------------------------------------ receive
    def recv_many(self, limit: int = RECV_BATCH_MAX) -> list:
        """Up to ``limit`` ``(role, identity, frame)`` waiting on both ROUTERs, without
        blocking; ``role`` is ``PEER`` or ``CLIENT``, the socket it came in on.

        A message that is not exactly [identity, one frame] is dropped and
        counted; a peer frame from a connection that is not a peer of this
        cluster's shape is dropped before it is decoded.
        """
        out: list = []
        if self._admin_senders:
            self._admin_senders = set()
        self._recv_from(self.peer_router, PEER, limit, out)
        self._recv_from(self.client_router, CLIENT, limit, out)
        return out

    def _recv_from(self, sock, role: str, limit: int, out: list) -> None:
        if sock in self._draining and not self._drain(sock):
            return
        received = 0
        events = sock.getsockopt
        for _ in range(limit):
            # asked, not tried: a recv that finds nothing raises, and a raise costs more
            if not events(EVENTS) & POLLIN:
                return
            try:
                identity = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if not sock.getsockopt(zmq.RCVMORE):
                self.counters["dropped_bad_envelope"] += 1
                continue
            check_user = role == CLIENT and self._keys is not None
            frame = sock.recv(zmq.NOBLOCK, copy=not check_user)  # a message arrives whole
            if sock.getsockopt(zmq.RCVMORE):
                self.counters["dropped_many_parts"] += 1
                self._draining.add(sock)
                if not self._drain(sock):
                    return
                continue
            if role == PEER and self._identity and not self._is_peer(identity):
                continue
            if check_user:  # a client whose key was revoked since its handshake
                user = frame.get("User-Id")
                if user not in self._keys.allowed_clients:
                    self.counters["dropped_revoked_client"] += 1
                    continue
                if self._keys.is_admin(user):
                    self._admin_senders.add(identity)
                frame = frame.bytes
            out.append((role, identity, frame))
            received += len(frame)
            if received >= RECV_BYTES_PER_TURN:
                return

    def _drain(self, sock) -> bool:
        """Drop the rest of a many-part message, a bounded number of parts per call;
        True once it is gone (without building a list of its parts)."""
        recv, more = sock.recv, sock.getsockopt
        for _ in range(DRAIN_PARTS_PER_TURN):
            recv(zmq.NOBLOCK)
            if not more(zmq.RCVMORE):
                self._draining.discard(sock)
                return True
        return False

    def _is_peer(self, identity: bytes) -> bool:
        """A peer ROUTER frame's routing id: this cluster's prefix and shape, a sender,
        and (optionally) the sender's peer address."""
        own = self._identity
        fixed = _PEER_ID_FIXED
        if identity[:len(_PEER_ID_PREFIX)] == _PEER_ID_PREFIX and len(identity) >= fixed \
                and identity[len(_PEER_ID_PREFIX) + 2:fixed] == own[len(_PEER_ID_PREFIX) + 2:fixed]:
            return True
        self.counters["dropped_not_a_peer" if identity[:len(_PEER_ID_PREFIX)] != _PEER_ID_PREFIX
                      else "dropped_peer_shape_differs"] += 1
        if identity not in self.refusals and len(self.refusals) < 64:
            self.refusals[identity] = self._why_refused(identity)
        return False

    def _why_refused(self, identity: bytes) -> str:
        p = len(_PEER_ID_PREFIX)
        if identity[:p] != _PEER_ID_PREFIX or len(identity) < _PEER_ID_FIXED:
            return "a connection to the peer port that is not a kvstore node of this version"
        index = int.from_bytes(identity[p:p + 2], "big")
        shards = int.from_bytes(identity[p + 2:p + 4], "big")
        own_shards = int.from_bytes(self._identity[p + 2:p + 4], "big")
        if shards != own_shards:
            return (f"node #{index} has {shards} shard(s) and this node {own_shards}: "
                    f"their cluster.toml files differ")
        return (f"node #{index} belongs to another cluster (or its cluster.toml differs "
                f"from the one this cluster was bootstrapped with)")

    def peer_index(self, identity: bytes) -> int:
        """The sender index a peer's routing id names (checked by ``_is_peer``)."""
        p = len(_PEER_ID_PREFIX)
        return int.from_bytes(identity[p:p + 2], "big")

    def peer_address_of(self, identity: bytes) -> str | None:
        """The peer address a peer's routing id names (checked by ``_is_peer``), if any."""
        try:
            address = identity[_PEER_ID_FIXED:].decode()
        except UnicodeDecodeError:
            return None
        return address if is_tcp_address(address) else None

    # ------------------------------------------------------------------ send
    def send_peer(self, index: int, frame: bytes) -> bool:
        d = self.peers.get(index)
        if d is None:  # no address known for it (yet): Paxos retransmits
            self.counters["dropped_peer_unknown"] += 1
            return False
        try:
            d.send(frame, zmq.NOBLOCK)
            self.counters["sent_peer_frames"] += 1
            return True
        except zmq.Again:  # the peer is down (IMMEDIATE) or its queue is full
            self.counters["dropped_peer_unreachable"] += 1
            return False

    def reply(self, identity: bytes, items: list) -> None:
        """Send ``[(request_id, status, value)]`` to a client, in frames of bounded size."""
        self.pending_bytes -= self._pending.pop(identity, 0)
        for frame in wire.encode_replies_frames(items, REPLY_FRAME_TARGET_BYTES):
            if len(frame) > REPLY_FRAME_BYTES_MAX:  # one answer alone in its frame
                self.counters["refused_reply_too_big"] += 1
                request_id = wire.decode(frame, len(frame))[1][0][0]
                frame = wire.encode_replies([(request_id, wire.STATUS_ERROR, [
                    "InvalidArgument", f"the answer is {len(frame)} bytes, over the "
                    f"{REPLY_FRAME_BYTES_MAX} bytes a reply may carry: scan a narrower range "
                    f"or pass a limit"])])
            self._send_reply(identity, frame)

    def reply_room(self, identity: bytes) -> bool:
        """May the node compute another answer for this client (``Node._serve_reads``)?
        No once its replies queued in libzmq plus those computed this turn
        (``charge``) reach its budget, or all clients' reach the node's: the read is
        dropped (counted) before its value is even copied out of the store."""
        def spent() -> bool:
            return (self._queued_bytes.get(identity, 0) + self._pending.get(identity, 0)
                    >= CLIENT_QUEUED_BYTES_MAX
                    or self.queued_bytes + self.pending_bytes >= NODE_QUEUED_BYTES_MAX)
        if spent():
            self.reap()
            if spent():
                self.counters["dropped_reply_slow_client"] += 1
                return False
        return True

    def charge(self, identity: bytes, size: int) -> None:
        """``size`` bytes of answer computed for ``identity``, to be sent this turn."""
        self._pending[identity] = self._pending.get(identity, 0) + size
        self.pending_bytes += size

    def _send_reply(self, identity: bytes, frame: bytes) -> bool:
        size = len(frame)
        tracked = size >= TRACK_BYTES_MIN
        if tracked:
            if self._queued_bytes.get(identity, 0) + size > CLIENT_QUEUED_BYTES_MAX \
                    or self.queued_bytes + size > NODE_QUEUED_BYTES_MAX:
                self.reap()  # only when a budget seems spent: reaping walks every tracker
            if self._queued_bytes.get(identity, 0) + size > CLIENT_QUEUED_BYTES_MAX:
                self.counters["dropped_reply_slow_client"] += 1
                return False
            if self.queued_bytes + size > NODE_QUEUED_BYTES_MAX:
                self.counters["dropped_reply_node_full"] += 1
                return False
        try:
            tracker = self.client_router.send_multipart((identity, frame), zmq.NOBLOCK,
                                                        copy=not tracked, track=tracked)
        except zmq.ZMQError as e:  # EHOSTUNREACH: the client left; EAGAIN: its queue is full
            self.counters["dropped_reply_" + ("gone" if e.errno == zmq.EHOSTUNREACH else "full")] += 1
            return False
        if tracked and not tracker.done:
            queue = self._tracked.get(identity)
            if queue is None:
                queue = self._tracked[identity] = deque()
            queue.append((tracker, size))
            self._queued_bytes[identity] = self._queued_bytes.get(identity, 0) + size
            self.queued_bytes += size
        return True

    def reap(self) -> None:
        """Forget the tracked replies libzmq is done with (sent, or dropped with their
        client): the done ones at the head of each client's queue."""
        for identity in list(self._tracked):
            queue = self._tracked[identity]
            freed = 0
            while queue and queue[0][0].done:
                freed += queue.popleft()[1]
            if not freed:
                continue
            self.queued_bytes -= freed
            if queue:
                self._queued_bytes[identity] -= freed
            else:
                del self._queued_bytes[identity]
                del self._tracked[identity]

    def reload_keys(self) -> None:
        """Reload the client and admin allow-lists if they changed (a client added or
        revoked)."""
        if self._client_auth is not None:
            self._keys.reload_clients(self._client_auth)
            self._keys.reload_admins()

    @property
    def keys(self):
        """The node's ``security.CurveKeys``, or None without Curve."""
        return self._keys

    def may_administer(self, identity: bytes) -> bool:
        """May the client whose frame ``identity`` sent this turn change the membership?
        Without Curve every client may (as every client of etcd without auth may); with
        it, a frame signed by a key of ``admins/`` (``security.CurveKeys.is_admin``)."""
        return self._keys is None or identity in self._admin_senders

    def close(self) -> None:
        for d in getattr(self, "peers", {}).values():
            d.close(0)
        self.peers = {}
        for name in ("client_router", "peer_router"):
            sock = getattr(self, name, None)
            if sock is not None:
                sock.close(0)
                setattr(self, name, None)
        for name in ("_auth", "_client_auth"):
            auth = getattr(self, name, None)
            if auth is not None:
                auth.stop()
                setattr(self, name, None)
        for name in ("context", "client_context"):
            context = getattr(self, name, None)
            if context is not None:
                context.term()
                setattr(self, name, None)
