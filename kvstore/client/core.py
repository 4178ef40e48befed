"""``kvstore.connect(addresses, timeout=...)``: a client of running ``kvstore-server`` nodes.

One ``ClientCore`` per connection owns the ZeroMQ sockets (a DEALER per node)
and one I/O thread; callers on any thread hand it calls and wait on a
``concurrent.futures.Future``, so many calls are in flight on one connection
(the asyncio client, ``kvstore.client.aio``, awaits the same futures). The I/O thread:

- routes each call by shard (``kvstore.sharding.shard_of``) to the node it
  believes leads that shard, learns leaders from answers and follows a
  ``NOT_LEADER`` reply's hint at once;
- retries a call on its own timer (``ATTEMPT_SECONDS`` without an answer: the
  next node) until the call's deadline, then fails it with ``Timeout`` if some
  node answered meanwhile, ``Unavailable`` if none did (API.md section 2; the
  outcome of a write is then unknown);
- numbers writes ``(client_id, seq)`` once, so every retry of one write is
  the same command: the replicated session table (``replica_storage``)
  applies it once and answers retries with the first result. Each write
  carries the client's floor (its lowest write still in flight): the node
  forgets the results below it, and ignores a late duplicate below it.

Reads (``get``, ``scan``) are linearizable by read index, and spread over the
nodes: a read's first attempt goes to a node picked at random (among those not
known to be down), leader or follower. The shard's leader confirms its
leadership with a quorum round (batched across reads) and its read index is its
commit point then; a follower asks the leader for that index (``ReadIndex``)
and answers once its own state covers it. A follower that cannot (no leader
known, the leader changed, no answer in time) answers ``NOT_LEADER`` and the
retry goes to the leader. A read served by a follower teaches nothing about
leaders; only writes and redirects do. ``scan`` asks every shard and merges; each
shard's part is linearizable, the whole is not one snapshot across shards.
A transaction inside one shard is one log entry whose reads are validated at
apply. One across shards runs two-phase commit (``two_phase_commit``; the
entries and their rules are in ``kvstore.txn`` and ``kvstore.machine.twopc``):
this client is its coordinator (it prepares, then asks the coordinator shard's
leader for the decision, which that node records and carries out), the shards'
logs hold every step, and a node's resolver finishes it if this client goes
away. Every reply is checked before it is acted on (``_check_result``): an
endpoint that is not a kvstore node yields ``Unavailable`` saying so. A plain write that meets a
prepared transaction's lock is answered ``LOCKED`` (nothing applied) and
retried here as a new write after a short backoff, until its deadline.
"""

from __future__ import annotations

import heapq
import itertools
import os
import random
import threading
import time
from collections import deque
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

import zmq

from kvstore.api import KV, Txn
from kvstore.commands import LOCKED, OP_2PC, OP_PUT, OP_TXN, cas, delete, put, two_pc
from kvstore.errors import InvalidArgument, KVError, Timeout, TransactionConflict, Unavailable
from kvstore.txn import ABORT, COMMIT, LOCK_ONLY, TXN_ID_BYTES, Coordinator, TxnPrepare
from kvstore.txn.coordinator import DECIDING
from kvstore.keys import (MAX_CLUSTER_TXN_SIZE, MAX_COMMAND_BYTES, check_key, check_limit,
                          check_optional_value, check_value, scan_range)
from kvstore.txnbuffer import WriteBuffer, entry_bytes
from kvstore.sharding import shard_of
from kvstore.transport import wire

#: Seconds without an answer before a call is sent to another node.
ATTEMPT_SECONDS = 1.0
#: Seconds a node that left an attempt unanswered gets no reads' first attempts.
SILENT_SECONDS = 5.0
#: Pause before retrying after "no leader known" or "retry" (the cluster is electing).
RETRY_BACKOFF_SECONDS = 0.02
#: Pause before asking again for a key a prepared transaction holds (its decision is
#: usually a round trip away: the resolve entries are already on their way).
LOCKED_BACKOFF_SECONDS = 0.002
#: The I/O thread wakes at least this often to run timers.
POLL_MAX_SECONDS = 0.05
HWM_MESSAGES = 100_000
_client_counter = itertools.count()
#: Operations whose first attempt goes to any node, not only the shard's leader.
_SPREAD_OPS = (wire.OP_GET, wire.OP_SCAN)
#: Operations only a shard's leader carries out: a direct answer names the leader.
_LEADER_OPS = (wire.OP_WRITE, wire.OP_DECIDE)
#: Requests to one node go in one frame up to about this many bytes.
FRAME_TARGET_BYTES = 4 * 1024 * 1024


def _approx_bytes(obj, depth: int = 0) -> int:
    """About how many bytes ``obj`` (a request's args) encodes to."""
    if type(obj) is bytes:
        return len(obj) + 5
    if isinstance(obj, (list, tuple)) and depth < 6:  # commands are NamedTuples
        return 5 + sum(_approx_bytes(x, depth + 1) for x in obj)
    return 9


def parse_addresses(addresses) -> list:
    """``"tcp://a:1,tcp://b:2"`` or a list of them, as a checked list."""
    if isinstance(addresses, str):
        items = [a.strip() for a in addresses.split(",")]
    elif isinstance(addresses, (list, tuple)):
        items = list(addresses)
    else:
        raise InvalidArgument(f"addresses must be a str or a list of str, not "
                              f"{type(addresses).__name__}")
    out = []
    for a in items:
        if not isinstance(a, str) or not a.startswith("tcp://") or ":" not in a[6:]:
            raise InvalidArgument(f"a server address looks like tcp://127.0.0.1:7001, got {a!r}")
        if a not in out:
            out.append(a)
    if not out:
        raise InvalidArgument("no server address given")
    return out


def _check_timeout(timeout) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise InvalidArgument(f"timeout must be a number of seconds > 0, got {timeout!r}")
    return float(timeout)


class AuthenticationFailed(Unavailable):
    """A node refused this client's CurveZMQ handshake (no key, or a key it does not allow)."""


_HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                     zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


class _Call:
    __slots__ = ("request_id", "op", "shard", "payload", "deadline", "future", "target",
                 "retry_at", "resend", "reached", "is_write", "sent_to")

    def __init__(self, request_id, op, shard, payload, deadline, target=None) -> None:
        self.request_id = request_id
        self.op = op
        self.shard = shard
        self.payload = payload  # the op's args, or for writes the command
        self.deadline = deadline
        self.future: Future = Future()
        self.target = target  # an address, or None: route by shard
        self.retry_at = 0.0
        self.resend = False
        self.reached = False
        self.is_write = op == wire.OP_WRITE
        self.sent_to = None  # the address of the last attempt


class ClientCore:
    """Sockets, routing and retries of one connection; thread-safe ``submit``."""

    def __init__(self, addresses: list, timeout: float, keys=None) -> None:
        self.seeds = addresses
        self.timeout = timeout
        self.keys = keys  # transport.security.CurveKeys, or None
        self.client_id = os.urandom(16)
        self.nodes: list = list(addresses)  # addresses by node index, once known
        self.nshards = 0
        self.leaders: dict = {}  # shard -> node index
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._queue: deque = deque()
        self._closed = False
        self.context = zmq.Context()
        name = f"inproc://kvstore-client-{os.getpid()}-{next(_client_counter)}"
        self._wake_in = self.context.socket(zmq.PAIR)
        self._wake_in.bind(name)
        self._wake_out = self.context.socket(zmq.PAIR)
        self._wake_out.connect(name)
        self._sockets: dict = {}  # address -> DEALER (I/O thread only)
        self._monitors: dict = {}  # monitor socket -> address
        self._down: set = set()  # addresses whose connection dropped and has not come back
        self._connected: set = set()  # addresses connected now (reads spread over these)
        self._silent: dict = {}  # address -> until when reads avoid it (an attempt timed out)
        self._refusals: dict = {}  # address -> AuthenticationFailed (it refused our handshake)
        self._aliens: dict = {}  # address -> what it sent that no kvstore node sends
        self.dropped_replies = 0  # frames and replies dropped as malformed
        self._by_socket: dict = {}
        self._inflight: dict = {}  # request_id -> _Call
        self._timers: list = []  # (time, request_id)
        self._out: dict = {}  # address -> [(request_id, op, args)] to send this turn
        # heap of (seq, write call) in flight, for the floor: calls reach the I/O thread in
        # any order of their seqs (several caller threads submit at once)
        self._writes_inflight: list = []
        self._rotation = random.randrange(1 << 16)
        self._thread = threading.Thread(target=self._run, name="kvstore-client-io", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ caller side
    def submit(self, op: str, shard, payload, timeout: float | None = None,
               target: str | None = None) -> Future:
        deadline = time.monotonic() + (timeout or self.timeout)
        call = _Call(next(self._ids), op, shard, payload, deadline, target)
        with self._lock:
            if self._closed:
                raise KVError("this connection is closed")
            self._queue.append(call)
            if len(self._queue) == 1:  # the I/O thread takes the whole queue per wake-up
                self._wake_out.send(b"", zmq.NOBLOCK)
        return call.future

    def wait(self, future: Future):
        try:
            return future.result(self.timeout + 5.0)
        except FutureTimeout:  # the I/O thread enforces deadlines; this is a backstop
            raise Timeout(f"no answer within {self.timeout:.1f} s") from None

    def call(self, op: str, shard, payload, timeout=None, target=None):
        return self.wait(self.submit(op, shard, payload, timeout, target))

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._wake_out.send(b"", zmq.NOBLOCK)
        self._thread.join(10)
        self._wake_out.close(0)
        if not self._thread.is_alive():
            self.context.term()  # every socket is closed by now: term() does not block

    # ------------------------------------------------------------------ the I/O thread
    def _socket(self, address: str):
        s = self._sockets.get(address)
        if s is None:
            s = self.context.socket(zmq.DEALER)
            if self.keys is not None:
                self.keys.make_client(s)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SNDHWM, HWM_MESSAGES)
            s.setsockopt(zmq.RCVHWM, HWM_MESSAGES)
            s.setsockopt(zmq.RECONNECT_IVL, 50)
            s.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
            s.setsockopt(zmq.MAXMSGSIZE, wire.MAX_PEER_FRAME_BYTES)
            # A node that dies (SIGKILL, crash) closes its TCP connection: the monitor
            # says so at once, and what was in flight there is sent elsewhere. It also
            # reports a refused CurveZMQ handshake. Attached before connect(), so that
            # it sees the first attempt too.
            events = zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECTED
            for e in _HANDSHAKE_FAILED:
                events |= e
            monitor = s.get_monitor_socket(events)
            self._monitors[monitor] = address
            self._poller.register(monitor, zmq.POLLIN)
            s.connect(address)
            self._sockets[address] = s
            self._by_socket[s] = address
            self._poller.register(s, zmq.POLLIN)
        return s

    def _on_monitor(self, monitor) -> None:
        from zmq.utils.monitor import recv_monitor_message
        address = self._monitors[monitor]
        lost = False
        while True:
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                break
            if event["event"] in _HANDSHAKE_FAILED:
                self._refused(address, event["event"])
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                lost = True
                self._down.add(address)
                self._connected.discard(address)
            elif event["event"] == zmq.EVENT_CONNECTED:
                lost = False
                self._down.discard(address)
                self._connected.add(address)
        if not lost:
            return
        if address in self.nodes:
            gone = self.nodes.index(address)
            for shard in [sh for sh, i in self.leaders.items() if i == gone]:
                del self.leaders[shard]
        for call in list(self._inflight.values()):
            if call.sent_to == address and not call.future.done() and call.target is None:
                self._send(call)  # elsewhere: the leader cache no longer names it

    def _run(self) -> None:
        self._poller = zmq.Poller()
        self._poller.register(self._wake_in, zmq.POLLIN)
        try:
            while True:
                now = time.monotonic()
                wait = POLL_MAX_SECONDS
                if self._timers:
                    wait = min(wait, max(0.0, self._timers[0][0] - now))
                events = dict(self._poller.poll(int(wait * 1000) + 1 if wait > 0 else 0))
                if self._wake_in in events:
                    while True:
                        try:
                            self._wake_in.recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                with self._lock:
                    closed = self._closed
                    calls = list(self._queue)
                    self._queue.clear()
                if closed:
                    break
                for call in calls:
                    self._inflight[call.request_id] = call
                    if call.is_write:
                        heapq.heappush(self._writes_inflight, (call.request_id, call))
                    self._send(call)
                for s in events:
                    if s in self._monitors:
                        self._on_monitor(s)
                    elif s is not self._wake_in:
                        self._receive(s)
                self._run_timers()
                self._flush()
        finally:
            err = KVError("this connection is closed")
            for call in self._inflight.values():
                if not call.future.done():
                    call.future.set_exception(err)
            with self._lock:
                for call in self._queue:
                    call.future.set_exception(err)
            for s in self._sockets.values():
                try:
                    s.disable_monitor()
                except zmq.ZMQError:
                    pass
                s.close(0)
            for m in self._monitors:
                m.close(0)
            self._wake_in.close(0)

    def _pick(self, call: _Call) -> str:
        if call.target is not None:
            return call.target
        if call.op in _SPREAD_OPS and call.sent_to is None and len(self.nodes) > 1:
            # A read's first attempt: any node serves it (followers through the read index),
            # among those connected now and not silent on an attempt lately.
            if len(self._sockets) < len(self.nodes):
                for a in self.nodes:
                    self._socket(a)  # start connecting to every node, once
            now = time.monotonic()
            up = [a for a in self.nodes if a in self._connected and self._silent.get(a, 0.0) <= now]
            if up:
                return up[random.randrange(len(up))]
        leader = self.leaders.get(call.shard)
        if leader is not None and leader < len(self.nodes):
            return self.nodes[leader]
        for _ in range(len(self.nodes)):  # the next node not known to be down
            self._rotation += 1
            address = self.nodes[self._rotation % len(self.nodes)]
            if address not in self._down:
                return address
        return address

    def _send(self, call: _Call, address: str | None = None) -> None:
        now = time.monotonic()
        if now >= call.deadline:
            self._fail(call)
            return
        address = address or self._pick(call)
        call.sent_to = address
        if call.is_write:
            writes = self._writes_inflight  # the lowest seq on top; answered ones leave it
            while writes and writes[0][1].future.done():
                heapq.heappop(writes)
            floor = writes[0][0] if writes else call.request_id
            args = [call.shard, self.client_id, call.request_id, floor, call.payload]
        else:
            args = call.payload
        out = self._out.get(address)
        if out is None:
            self._out[address] = [(call.request_id, call.op, args)]
        else:
            out.append((call.request_id, call.op, args))
        call.resend = False
        call.retry_at = min(now + ATTEMPT_SECONDS, call.deadline)
        heapq.heappush(self._timers, (call.retry_at, call.request_id))

    def _flush(self) -> None:
        """Send what this turn queued: one frame per node (many requests, one send),
        cut where it would pass ``FRAME_TARGET_BYTES`` (a node refuses a request
        frame over ``wire.MAX_REQUEST_FRAME_BYTES``)."""
        out, self._out = self._out, {}
        for address, requests in out.items():
            sock = self._socket(address)
            batch, size = [], 0
            for r in requests:
                n = _approx_bytes(r[2])
                if batch and size + n > FRAME_TARGET_BYTES:
                    self._send_frame(sock, batch)
                    batch, size = [], 0
                batch.append(r)
                size += n
            if batch:
                self._send_frame(sock, batch)

    @staticmethod
    def _send_frame(sock, requests: list) -> None:
        frame = (wire.encode_request(*requests[0]) if len(requests) == 1
                 else wire.encode_requests(requests))
        try:
            sock.send(frame, zmq.NOBLOCK)
        except zmq.Again:
            pass  # a full queue: the attempt timers move these calls on

    def _run_timers(self) -> None:
        now = time.monotonic()
        timers = self._timers
        while timers and timers[0][0] <= now:
            at, rid = heapq.heappop(timers)
            call = self._inflight.get(rid)
            if call is None or call.future.done() or at != call.retry_at:
                continue
            if now >= call.deadline:
                self._fail(call)
                continue
            if not call.resend and call.shard is not None:
                # No answer in time: forget the leader we believed in; the next node is asked.
                self.leaders.pop(call.shard, None)
            if not call.resend and call.sent_to is not None:
                self._silent[call.sent_to] = now + SILENT_SECONDS  # a stalled node, maybe
            self._send(call)

    def _refused(self, address: str, event: int) -> None:
        """``address`` refused our handshake: fail what waits on it, saying why."""
        if self.keys is None:
            why = ("the server requires CurveZMQ keys: pass keys=DIR to kvstore.connect() "
                   "or set KVSTORE_KEYS (`kvstore keygen DIR` writes them)")
        else:
            why = (f"the server refused the CurveZMQ handshake: its clients/ must hold this "
                   f"client's {self.keys.directory}/{self.keys.name}.key (a revoked key is "
                   f"refused), and server.key must be the cluster's")
        err = AuthenticationFailed(f"authentication failed at {address}: {why}")
        self._refusals[address] = err
        self._down.add(address)
        everyone = all(a in self._refusals for a in self.nodes)
        for rid, call in list(self._inflight.items()):
            if call.sent_to != address or call.future.done():
                continue
            if call.target is not None or everyone:
                del self._inflight[rid]
                call.future.set_exception(err)
            else:
                if call.shard is not None and self.leaders.get(call.shard) is not None \
                        and self.nodes[self.leaders[call.shard]] == address:
                    del self.leaders[call.shard]
                self._send(call)  # another node may let us in

    def _fail(self, call: _Call) -> None:
        self._inflight.pop(call.request_id, None)
        if call.future.done():
            return
        if not call.reached and self._refusals:
            err = next(iter(self._refusals.values()))
        elif not call.reached and self._aliens:
            address, what = next(iter(self._aliens.items()))
            err = Unavailable(f"{address} is not a kvstore node: it sent {what}; no kvstore "
                              f"node answered within {self.timeout:.1f} s")
        elif call.reached:
            err = Timeout(f"the cluster did not complete the request within its deadline "
                          f"({self.timeout:.1f} s); the outcome of a write is unknown")
        else:
            err = Unavailable(f"no server answered within {self.timeout:.1f} s "
                              f"(asked {call.sent_to or 'none'}; cluster {', '.join(self.nodes)})")
        call.future.set_exception(err)

    def _receive(self, sock) -> None:
        address = self._by_socket[sock]
        for _ in range(10_000):
            try:
                frame = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                body = wire.decode(frame)
            except wire.FrameError as e:
                self._alien(address, f"a frame that is not kvstore's wire format ({e})")
                continue
            if body[0] == wire.REPLIES:
                for rid, status, value in body[1]:
                    self._on_reply(address, rid, status, value)
            elif body[0] == wire.REPLY:
                self._on_reply(address, body[1], body[2], body[3])
            else:
                self._alien(address, f"a frame of kind {body[0]}, not a reply")

    def _alien(self, address: str, what: str) -> None:
        """``address`` sent something no kvstore node sends: dropped, counted, and named
        in the error of a call that no node answers (``_fail``)."""
        self.dropped_replies += 1
        self._aliens[address] = what[:200]

    def _on_reply(self, address: str, rid: int, status: int, value) -> None:
        self._silent.pop(address, None)
        call = self._inflight.get(rid)
        if call is None or call.future.done():
            return
        call.reached = True
        if status == wire.STATUS_OK or status == wire.STATUS_OK_FORWARDED:
            leader = address if status == wire.STATUS_OK else None
            if status == wire.STATUS_OK_FORWARDED:  # the node we asked forwarded it to the leader
                if type(value) is not list or len(value) != 2:
                    self._malformed(call, address, "a forwarded answer that is not [result, leader]")
                    return
                value, index = value
                if type(index) is int and 0 <= index < len(self.nodes):
                    leader = self.nodes[index]
            if value == LOCKED and call.is_write:
                del self._inflight[rid]
                self._retry_as_new_write(call)
                return
            try:
                value = _check_result(call, value)
            except MalformedReply as e:
                self._malformed(call, address, str(e))
                return
            del self._inflight[rid]
            if call.op == wire.OP_HELLO:
                self._learn(value)
            elif call.shard is not None and leader in self.nodes and (
                    status == wire.STATUS_OK_FORWARDED or call.op in _LEADER_OPS):
                self.leaders[call.shard] = self.nodes.index(leader)  # only a leader does these
            call.future.set_result(value)
        elif status == wire.STATUS_ERROR:
            del self._inflight[rid]
            name, message = (value + [None, None])[:2] if isinstance(value, list) else (None, value)
            cls = InvalidArgument if name == "InvalidArgument" else KVError
            call.future.set_exception(cls(f"server refused the request: {message}"))
        elif status == wire.STATUS_NOT_LEADER:
            hint = value if type(value) is int and 0 <= value < len(self.nodes) else None
            if hint is not None and self.nodes[hint] != address:
                self.leaders[call.shard] = hint
                self._send(call, self.nodes[hint])
            else:
                self.leaders.pop(call.shard, None)
                self._retry_later(call)
        else:  # STATUS_RETRY
            self._retry_later(call, LOCKED_BACKOFF_SECONDS if value == LOCKED else
                              RETRY_BACKOFF_SECONDS)

    def _malformed(self, call: _Call, address: str, why: str) -> None:
        """A reply of the wrong shape: the call fails with ``Unavailable`` (the outcome
        of a write is unknown), never with an exception of another class."""
        self._inflight.pop(call.request_id, None)
        self.dropped_replies += 1
        call.future.set_exception(Unavailable(
            f"{address} answered {call.op!r} with {why}: it is not a kvstore node, or not one "
            f"of this version"))

    def _retry_as_new_write(self, call: _Call) -> None:
        """A write that met a prepared transaction's lock applied nothing; it is sent
        again after a backoff as a NEW write (the session table keeps the first answer
        of a seq). The old call stays in the floor heap until the shared future is
        done, so the floor never passes a seq still in flight."""
        retry = _Call(next(self._ids), call.op, call.shard, call.payload, call.deadline)
        retry.future = call.future
        retry.reached = True
        self._inflight[retry.request_id] = retry
        heapq.heappush(self._writes_inflight, (retry.request_id, retry))
        self._retry_later(retry, LOCKED_BACKOFF_SECONDS)

    def _retry_later(self, call: _Call, backoff: float = RETRY_BACKOFF_SECONDS) -> None:
        call.resend = True
        call.retry_at = min(time.monotonic() + backoff * (0.5 + random.random()), call.deadline)
        heapq.heappush(self._timers, (call.retry_at, call.request_id))

    def _learn(self, hello: dict) -> None:
        """The topology a node's (checked) hello answer gives."""
        self.nodes = [n["address"] for n in hello["nodes"]]
        self.nshards = hello["nshards"]
        self.leaders.update({s: sh["leader_index"] for s, sh in enumerate(hello["shards"])
                             if sh["leader_index"] is not None})


class MalformedReply(ValueError):
    """A reply no kvstore node sends (``_check_result``): the call fails as ``Unavailable``."""


def _optional_bytes(v) -> bool:
    return v is None or type(v) is bytes


def _check_status(value) -> dict:
    """A node's hello or status answer, checked in every part the client reads."""
    if type(value) is not dict:
        raise MalformedReply("a status that is not a map")
    nodes, shards, nshards = value.get("nodes"), value.get("shards"), value.get("nshards")
    if type(value.get("node")) is not str or type(nodes) is not list or not nodes or not all(
            type(n) is dict and type(n.get("id")) is str and type(n.get("address")) is str
            and n["address"].startswith("tcp://") for n in nodes):
        raise MalformedReply("a status that names no nodes")
    if (type(nshards) is not int or not 0 < nshards <= 1 << 16 or type(shards) is not list
            or len(shards) != nshards):
        raise MalformedReply("a status without its shards")
    for sh in shards:
        leader = sh.get("leader_index") if type(sh) is dict else None
        if not (type(sh) is dict and type(sh.get("role")) is str
                and type(sh.get("commit_index")) is int and type(sh.get("applied_index")) is int
                and (leader is None or (type(leader) is int and 0 <= leader < len(nodes)))):
            raise MalformedReply("a status with a malformed shard")
    return value


def _check_result(call: _Call, value):
    """``value`` if it is what a node answers to ``call``; ``MalformedReply`` otherwise."""
    op = call.op
    if op == wire.OP_HELLO or op == wire.OP_STATUS:
        return _check_status(value)
    if op == wire.OP_GET:
        ok = ((type(value) is list and len(value) == 2 and _optional_bytes(value[0])
               and type(value[1]) is int) if call.payload[2] else _optional_bytes(value))
    elif op == wire.OP_SCAN:
        width = 3 if call.payload[4] else 2
        ok = type(value) is list and all(
            type(r) is list and len(r) == width and type(r[0]) is bytes and type(r[1]) is bytes
            and (width == 2 or type(r[2]) is int) for r in value)
    elif op == wire.OP_DECIDE:
        ok = type(value) is int and value in (COMMIT, ABORT)
    elif op == wire.OP_WRITE:
        kind = call.payload[0]
        if kind == OP_PUT:
            ok = value is None
        elif kind == OP_2PC:  # a vote, or with locking reads [vote, [[key, value, revision]]]
            ok = type(value) is bool or (
                type(value) is list and len(value) == 2 and type(value[0]) is bool
                and type(value[1]) is list and all(
                    type(r) is list and len(r) == 3 and type(r[0]) is bytes
                    and _optional_bytes(r[1]) and type(r[2]) is int for r in value[1]))
        else:
            ok = type(value) is bool
    else:
        ok = True
    if not ok:
        raise MalformedReply(f"a result of the wrong shape ({type(value).__name__})")
    return value


def lock_keys_for(previous, attempt: int):
    """The keys ``run_transaction``'s next attempt locks at its first read, or None
    (optimistic): a cross-shard transaction that lost ``LOCKING_AFTER_CONFLICTS``
    times locks everything its attempts read or wrote so far."""
    if previous is None or attempt < LOCKING_AFTER_CONFLICTS or len(previous._shards) < 2:
        return None
    return previous.wanted | set(previous._writes) | (previous._lock_keys or set())


class ClusterKV(KV):
    """``kvstore.connect(...)``: the ``KV`` interface over a running cluster; thread-safe."""

    def __init__(self, addresses, timeout: float = 5.0, keys=None) -> None:
        self._addresses = parse_addresses(addresses)
        self.timeout = _check_timeout(timeout)
        keys = keys if keys is not None else os.environ.get("KVSTORE_KEYS") or None
        if keys is not None:
            from kvstore.transport.security import CurveKeys
            keys = CurveKeys(os.fspath(keys), "client")
        self._core = ClientCore(self._addresses, self.timeout, keys)
        try:
            futures = [self._core.submit(wire.OP_HELLO, None, [], target=a) for a in self._addresses]
            self._hello = self._first_answer(futures)
        except BaseException:
            self._core.close()
            raise
        self.nshards = self._core.nshards

    def _first_answer(self, futures: list):
        """The first successful answer among ``futures``; the last error if none."""
        error = None
        pending = list(futures)
        while pending:
            for f in list(pending):
                if f.done():
                    pending.remove(f)
                    if f.exception() is None:
                        return f.result()
                    error = f.exception()
            if pending:
                from concurrent.futures import FIRST_COMPLETED, wait
                wait(pending, timeout=self.timeout + 5.0, return_when=FIRST_COMPLETED)
        raise error

    # -- helpers --------------------------------------------------------------------------
    def _shard(self, key: bytes) -> int:
        return 0 if self.nshards == 1 else shard_of(key, self.nshards)

    def _write(self, key: bytes, command: list):
        return self._core.call(wire.OP_WRITE, self._shard(key), command)

    # -- KV ----------------------------------------------------------------------------------
    def get(self, key):
        key = check_key(key)
        shard = self._shard(key)
        return self._core.call(wire.OP_GET, shard, [shard, key, False])

    def put(self, key, value) -> None:
        key = check_key(key)
        self._write(key, put(key, check_value(value)))

    def delete(self, key) -> bool:
        key = check_key(key)
        return bool(self._write(key, delete(key)))

    def cas(self, key, expected, new) -> bool:
        key = check_key(key)
        return bool(self._write(key, cas(key, check_optional_value(expected, "expected"),
                                         check_optional_value(new, "new"))))

    def scan(self, prefix=b"", start=None, end=None, limit=None):
        lo, hi = scan_range(prefix, start, end)
        limit = check_limit(limit)
        if (hi is not None and hi <= lo) or limit == 0:
            return []
        futures = [self._core.submit(wire.OP_SCAN, s, [s, lo, hi, limit, False])
                   for s in range(self.nshards)]
        rows = []
        for f in futures:
            rows.extend((k, v) for k, v in self._core.wait(f))
        rows.sort()
        return rows if limit is None else rows[:limit]

    def transaction(self) -> "ClusterTxn":
        self._core_check()
        return ClusterTxn(self)

    def _attempt_transaction(self, previous, attempt: int) -> "ClusterTxn":
        return ClusterTxn(self, lock_keys_for(previous, attempt))

    def _core_check(self) -> None:
        if self._core._closed:
            raise KVError("this connection is closed")

    def status(self) -> dict:
        """Every node's view: ``{"nodes": [...], "shards": [...]}`` (API.md section 1)."""
        core = self._core
        while True:
            try:
                down = set(core._down)  # known down (their connection dropped): not asked
                break
            except RuntimeError:  # the I/O thread changed it meanwhile
                continue
        futures = [(a, None if a in down else
                    core.submit(wire.OP_STATUS, None, [], timeout=min(self.timeout, 2.0), target=a))
                   for a in core.nodes]
        views = {}
        for address, f in futures:
            try:
                views[address] = None if f is None else core.wait(f)
            except Unavailable:
                views[address] = None
        known = {n.get("address"): n.get("id") for n in (self._hello or {}).get("nodes", [])}
        nodes, names, problems = [], {}, []
        reference = _common_shape(views.values(), (self.nshards, _members(self._hello)))
        nshards = reference[0] if reference[0] is not None else self.nshards
        for address, v in list(views.items()):
            if v is None:
                nodes.append({"id": known.get(address), "address": address, "state": "down",
                              "role": ""})
                continue
            mismatch = _shape_mismatch(v, reference)
            if mismatch:
                name = v.get("node") if isinstance(v, dict) else None
                problems.append(f"{name or 'the node'} at {address} {mismatch}: its cluster.toml "
                                f"differs from the others' and its peers refuse it")
                nodes.append({"id": name, "address": address, "state": "mismatch", "role": ""})
                views[address] = None
                continue
            names[address] = v["node"]
            roles = sorted({s["role"] for s in v["shards"]})
            leads = [s["shard"] for s in v["shards"] if s["role"] == "leader"]
            nodes.append({"id": v["node"], "address": address, "state": "up",
                          "role": f"leader of {leads}" if leads else ",".join(roles)})
        shards = []
        for s in range(nshards):
            leader, commit, replicas, states = None, -1, {}, {}
            for address, v in views.items():
                if v is None:
                    continue
                sv = v["shards"][s]
                replicas[v["node"]] = sv["applied_index"]
                states[v["node"]] = sv.get("state", "ok")
                commit = max(commit, sv["commit_index"])
                if sv["role"] == "leader":
                    leader = v["node"]
            shards.append({"shard": s, "leader": leader, "commit_index": commit,
                           "applied_index": replicas.get(leader) if leader else None,
                           "replicas": replicas, "states": states})
        out = {"mode": "cluster", "nodes": nodes, "shards": shards}
        if problems:
            out["problems"] = problems
        return out

    def close(self) -> None:
        self._core.close()

    def __repr__(self) -> str:
        return f"<kvstore.ClusterKV {','.join(self._addresses)} shards={self.nshards}>"


def _members(view) -> tuple | None:
    try:
        return tuple(sorted((n["id"], n["address"]) for n in view["nodes"]))
    except (KeyError, TypeError):
        return None


def _shape(view) -> tuple:
    """``(shard count, members)`` a node's status reports; None where unreadable."""
    try:
        nshards = int(view["nshards"])
        if len(view["shards"]) != nshards:
            nshards = None
    except (KeyError, TypeError, ValueError):
        nshards = None
    return nshards, _members(view)


def _common_shape(views, fallback: tuple) -> tuple:
    """The shape most nodes report (on a tie, the one this client learned first)."""
    counts: dict = {}
    for v in views:
        if v is not None:
            shape = _shape(v)
            counts[shape] = counts.get(shape, 0) + 1
    if not counts:
        return fallback
    best = max(counts.values())
    return fallback if counts.get(fallback) == best else max(counts, key=counts.get)


def _shape_mismatch(view, reference: tuple) -> str | None:
    """How a node's status differs from the cluster's shape (shard count, members), or
    None if it agrees."""
    nshards, members = _shape(view)
    if nshards is None or members is None:
        return "answers with a status this client cannot read"
    if nshards != reference[0]:
        return f"reports {nshards} shard(s) where the cluster has {reference[0]}"
    if members != reference[1]:
        return "lists other members or addresses than the cluster"
    return None


#: A cross-shard transaction's prepared records carry this deadline (wall clock): past
#: it, the shard leaders' resolvers ask the coordinator shard to settle it (ABORT unless
#: decided). Only liveness rests on clocks: a resolver that acts early costs an abort.
TXN_DEADLINE_SECONDS = 2.0
#: ``run_transaction`` takes the reads of a cross-shard transaction by locking them once
#: it has lost this many attempts to concurrent writers (optimistic reads over several
#: shards can lose to a steady stream of writers for ever; locked ones cannot be changed).
LOCKING_AFTER_CONFLICTS = 2


def _conflict() -> TransactionConflict:
    return TransactionConflict(
        "a concurrent transaction changed or holds what this transaction read or writes; "
        "nothing of it was applied (run_transaction retries automatically)")


class Detached(list):
    """A plan's batch sent without waiting for the answers (the plan is sent ``None``s)."""


def _step(shard: int, entry: TxnPrepare) -> tuple:
    """A TxnPrepare as one write of a plan's batch: a command of ``shard``'s log."""
    return wire.OP_WRITE, shard, two_pc(entry).wire()


def _decide(shard: int, txn_id: bytes, outcome: int, participants) -> tuple:
    """Ask the leader of ``shard`` (the coordinator shard) to record ``outcome`` for
    ``txn_id`` (first recorded wins) and carry it out on ``participants``: one request
    of a plan's batch, answered with the recorded outcome. The node writes the
    TxnDecision and the TxnResolve entries; a client never does."""
    return wire.OP_DECIDE, shard, [shard, txn_id, outcome, list(participants)]


def _deadline_ms() -> int:
    return int((time.time() + TXN_DEADLINE_SECONDS) * 1000)


def _answer(answer):
    if isinstance(answer, BaseException):
        raise answer
    return answer


# A *plan* is a generator that yields batches ``[(op, shard, payload)]`` to send at once
# and is sent back, in order, each request's result or the ``KVError`` it raised; what it
# returns is the outcome. One plan serves the sync client (``run_plan``) and the asyncio
# one (``kvstore.client.aio``): a transaction's logic lives once, its I/O twice.

def two_phase_commit(parts: dict, txn_id: bytes | None = None, coordinator_shard: int | None = None):
    """Plan: commit a transaction across shards (``parts``: shard -> ``(reads, writes)``).

    ``kvstore.txn.Coordinator`` says what to propose: every participant's
    TxnPrepare, then the decision, which the coordinator shard's leader records
    and carries out (``_decide``). It returns on commit and raises
    ``TransactionConflict`` on an abort; a failure before the decision is
    recorded is raised as it came (``Unavailable``: the outcome is unknown only
    if COMMIT was proposed). ``txn_id`` and ``coordinator_shard`` are a locking
    read's when its transaction writes: its prepares then add the writes to the
    locks it holds.
    """
    coordinator = Coordinator(txn_id or os.urandom(TXN_ID_BYTES),
                              min(parts) if coordinator_shard is None else coordinator_shard,
                              parts, _deadline_ms())
    error = None
    prepares = coordinator.proposals()
    answers = yield [_step(shard, entry) for shard, entry in prepares]
    for (shard, _entry), answer in zip(prepares, answers):
        if isinstance(answer, BaseException):
            error = error or answer
            answer = False  # no vote heard: this coordinator may only abort now
        coordinator.on_vote(shard, bool(answer))
    if coordinator.state == DECIDING:
        (shard, entry), = coordinator.proposals()
        (answer,) = yield [_decide(shard, entry.txn_id, entry.outcome, coordinator.participants)]
        # The outcome is recorded, and the node resolves it everywhere (two rounds, not
        # three). Until a resolve is applied, reads and writes of the keys it frees wait
        # (LOCKED), so nobody sees the gap; a lost resolve is done by the resolvers.
        coordinator.on_decision(_answer(answer))
    if coordinator.outcome == COMMIT:
        return
    raise error or _conflict()


def locking_read(keys_by_shard: dict):
    """Plan: lock ``keys_by_shard`` (shard -> keys) in every shard at once and read them.

    One TxnPrepare of locking reads per shard (``kvstore.txn.LOCK_ONLY``), in
    parallel; each answers the values as of its slot. The values are one
    consistent cut only if every lock was still held when the last was taken:
    a read-only transaction confirms it by recording COMMIT in the coordinator
    shard (``ClusterTxn._confirm_locked_reads``), one that writes by its own
    two-phase commit under the same transaction id.
    Returns ``(txn_id, shards, {key: (value, revision)})``; if a shard says no
    (a writer holds a key) or fails, what was locked is released and the
    conflict or error raised."""
    txn_id = os.urandom(TXN_ID_BYTES)
    shards = tuple(sorted(keys_by_shard))
    deadline = _deadline_ms()
    batch = [_step(shard, TxnPrepare(txn_id, shards[0], shards,
                                     tuple((k, LOCK_ONLY) for k in sorted(keys_by_shard[shard])),
                                     (), deadline))
             for shard in shards]
    answers = yield batch
    values, failure = {}, None
    for answer in answers:
        if isinstance(answer, BaseException) or not answer[0]:
            failure = failure or (answer if isinstance(answer, BaseException) else _conflict())
            continue
        for key, value, revision in answer[1]:
            values[key] = (value, revision)
    if failure is not None:
        yield from release_locks(txn_id, shards)
        raise failure
    return txn_id, shards, values


def release_locks(txn_id: bytes, shards) -> None:
    """Plan: free a locking read's locks, without waiting: ABORT is recorded in its
    coordinator shard (``shards[0]``) and carried out on every shard by that shard's
    leader (if the request is lost, the resolvers do it after the deadline)."""
    yield Detached([_decide(shards[0], txn_id, ABORT, shards)])


def run_plan(core: "ClientCore", plan):
    """Drive ``plan`` on the sync client: each batch sent at once, answers awaited."""
    try:
        batch = next(plan)
        while True:
            futures = [core.submit(op, shard, payload) for op, shard, payload in batch]
            if isinstance(batch, Detached):
                batch = plan.send([None] * len(futures))
                continue
            answers = []
            for f in futures:
                try:
                    answers.append(core.wait(f))
                except KVError as e:
                    answers.append(e)
            batch = plan.send(answers)
    except StopIteration as done:
        return done.value


class ClusterTxn(Txn):
    """A transaction: linearizable reads that record revisions, buffered writes, and at
    commit either one log entry (OP_TXN, one shard: the replicas validate its reads when
    they apply it) or two-phase commit across the shards it touched
    (``two_phase_commit``). A changed read: ``TransactionConflict``, nothing applied.

    With ``lock_keys`` (``run_transaction``, after conflicts) its first read locks
    and reads all of those keys at once (``locking_read``); its reads are then
    that consistent cut, and a read of another key is a conflict whose retry
    locks it too. Each operation is a plan (``*_plan``); this class drives them
    on the sync client, ``kvstore.aio.AsyncTxn`` on the event loop."""

    def __init__(self, kv: ClusterKV, lock_keys=None) -> None:
        self._kv = kv
        self._shards: set = set()
        self._reads: dict = {}  # key -> revision
        self._ranges: list = []
        self._writes = WriteBuffer(MAX_CLUSTER_TXN_SIZE, "MAX_CLUSTER_TXN_SIZE")
        self._state = "new"
        self._lock_keys = None if lock_keys is None else set(lock_keys)
        self._locked = None  # (txn id, shards, {key: (value, revision)}) while locks are held
        self.wanted: set = set()  # every key this transaction read (what to lock next time)

    def _run(self, plan):
        return run_plan(self._kv._core, plan)

    def __enter__(self) -> "ClusterTxn":
        if self._state != "new":
            raise InvalidArgument(f"this transaction is {self._state}; start a new one")
        self._state = "open"
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._state != "open":
            return
        if exc_type is not None:
            self.discard()
            return
        self.commit()

    def _check(self) -> None:
        if self._state == "new":
            raise InvalidArgument("use the transaction inside 'with db.transaction() as txn:'")
        if self._state != "open":
            raise InvalidArgument(f"this transaction is already {self._state}; start a new one")
        self._kv._core_check()

    def get(self, key):
        return self._run(self.get_plan(key))

    def get_plan(self, key):
        self._check()
        key = check_key(key)
        if key in self._writes:
            return self._writes[key]
        shard = self._kv._shard(key)
        self._shards.add(shard)
        self.wanted.add(key)
        if self._lock_keys is not None:
            if self._locked is None:
                keys = self._lock_keys | {key}
                by_shard: dict = {}
                for k in keys:
                    by_shard.setdefault(self._kv._shard(k), []).append(k)
                self._shards.update(by_shard)
                try:
                    self._locked = yield from locking_read(by_shard)
                except KVError:
                    self._state = "discarded"  # nothing held: locking_read freed it
                    raise
            found = self._locked[2].get(key)
            if found is None:  # outside what it locked: its retry locks this key too
                self._state = "discarded"
                yield from self.release_plan()
                raise _conflict()
            value, revision = found
        else:
            (answer,) = yield [(wire.OP_GET, shard, [shard, key, True])]
            value, revision = _answer(answer)
        self._reads.setdefault(key, revision)
        return value

    def put(self, key, value) -> None:
        self._check()
        key = check_key(key)
        value = check_value(value)
        self._writes.write(key, value)  # InvalidArgument past the limit, nothing changed
        self._shards.add(self._kv._shard(key))

    def delete(self, key) -> bool:
        return self._run(self.delete_plan(key))

    def delete_plan(self, key):
        self._check()
        key = check_key(key)
        self._writes.size_with(key, None)  # past the limit: raise before reading anything
        existed = (yield from self.get_plan(key)) is not None
        self._writes.write(key, None)
        return existed

    def scan(self, prefix=b"", start=None, end=None, limit=None):
        return self._run(self.scan_plan(prefix, start, end, limit))

    def scan_plan(self, prefix=b"", start=None, end=None, limit=None):
        self._check()
        lo, hi = scan_range(prefix, start, end)
        limit = check_limit(limit)
        if (hi is not None and hi <= lo) or limit == 0:
            return []
        if self._kv.nshards > 1:
            raise KVError(f"a scan inside a transaction reads every shard of this cluster "
                          f"({self._kv.nshards}), and cross-shard transactions validate keys, "
                          f"not ranges: read the keys with get(), or scan outside the "
                          f"transaction")
        self._shards.add(0)
        local = {k: v for k, v in self._writes.items() if k >= lo and (hi is None or k < hi)}
        fetch = None if limit is None else limit + sum(1 for v in local.values() if v is None)
        (answer,) = yield [(wire.OP_SCAN, 0, [0, lo, hi, fetch, True])]
        rows = _answer(answer)
        covered_hi = hi
        if fetch is not None and len(rows) == fetch:
            covered_hi = rows[-1][0] + b"\x00"
        self._ranges.append([lo, covered_hi, [[k, rev] for k, _v, rev in rows]])
        merged = {k: v for k, v, _rev in rows}
        merged.update(local)
        out = [(k, v) for k, v in sorted(merged.items())
               if v is not None and (covered_hi is None or k < covered_hi)]
        return out if limit is None else out[:limit]

    def commit(self) -> None:
        self._run(self.commit_plan())

    def commit_plan(self):
        self._check()
        size = entry_bytes(self._reads.items(), self._ranges, self._writes.items())
        if size > MAX_COMMAND_BYTES - 64 * 1024:
            self._state = "discarded"
            yield from self.release_plan()
            raise InvalidArgument(
                f"this transaction's log entry would be about {size} bytes (its writes and "
                f"the keys it read or scanned); a cluster takes {MAX_COMMAND_BYTES} at most: "
                f"split it into smaller transactions")
        self._state = "committed"
        try:
            locked = self._locked
            if locked is not None and not self._writes:
                yield from self._confirm_locked_reads(locked)
                return
            if not self._shards:
                return
            if len(self._shards) == 1 and locked is None:
                (shard,) = self._shards
                command = [OP_TXN, [[k, r] for k, r in self._reads.items()], self._ranges,
                           [[k, v] for k, v in self._writes.items()]]
                (ok,) = yield [(wire.OP_WRITE, shard, command)]
                if not _answer(ok):
                    raise _conflict()
                return
            parts = {shard: ([], []) for shard in self._shards}
            for key, revision in self._reads.items():
                parts[self._kv._shard(key)][0].append((key, revision))
            for key, value in self._writes.items():
                parts[self._kv._shard(key)][1].append((key, value))
            if locked is None:
                yield from two_phase_commit(parts)
            else:  # prepare its writes under the locks it holds: its reads cannot have moved
                self._locked = None
                yield from two_phase_commit(parts, locked[0], locked[1][0])
        except TransactionConflict:
            self._state = "discarded"
            raise

    def _confirm_locked_reads(self, locked):
        """Plan: trust a read-only locking read only once COMMIT is recorded for it in its
        coordinator shard. Every shard voting yes is not enough: a lock past its deadline
        may have been freed by its shard's resolver (which records ABORT first) before
        the last lock was taken, and a writer may have slipped in between (the bank
        simulator found it: ``--locking-audit-trusts-votes``). No resolver frees a lock
        before the decision is recorded, so a recorded COMMIT means every lock was still
        held then: the values were one cut at that moment."""
        self._locked = None
        txn_id, shards, _values = locked
        # the node that records it frees the locks everywhere (it wrote nothing)
        (answer,) = yield [_decide(shards[0], txn_id, COMMIT, shards)]
        if isinstance(answer, BaseException):  # unknown: the resolvers settle it
            raise answer
        if answer != COMMIT:
            raise _conflict()

    def release_plan(self):
        """Plan: free this transaction's locks of a locking read, if it holds any."""
        locked, self._locked = self._locked, None
        if locked is not None:
            yield from release_locks(locked[0], locked[1])

    def discard(self) -> None:
        if self._state in ("new", "open"):
            self._state = "discarded"
        if self._locked is not None:
            try:
                self._run(self.release_plan())
            except KVError:
                pass  # its resolvers free the locks after the deadline


def connect(addresses, timeout: float = 5.0, keys=None) -> ClusterKV:
    """A client of the cluster at ``addresses`` (one is enough; it learns the others).

    ``keys``: a ``kvstore keygen`` directory for a cluster with ``[security]``
    (default: ``$KVSTORE_KEYS``)."""
    return ClusterKV(addresses, timeout, keys)
