"""The client's I/O engine: ``ClientCore``, one per connection.

It owns the ZeroMQ sockets (a DEALER per node) and one I/O thread; callers on
any thread hand it calls and wait on a ``concurrent.futures.Future``, so many
calls are in flight on one connection (the synchronous ``KV``,
``kvstore.client.kv``, waits on them; the asyncio client, ``kvstore.client.aio``,
awaits the same futures). The I/O thread:

- routes each call by shard (``kvstore.sharding.shard_of``) to the node it
  believes leads that shard, learns leaders from answers and follows a
  ``NOT_LEADER`` reply's hint at once;
- retries a call on its own timer (``ATTEMPT_SECONDS`` without an answer: the
  next node) until the call's deadline, then fails it with ``Timeout`` if some
  node answered meanwhile, ``Unavailable`` if none did (API.md section 2; the
  outcome of a write is then unknown);
- numbers writes ``(client_id, seq)`` once, so every retry of one write is
  the same command: the replicated session table (``kvstore.machine.replica``)
  applies it once and answers retries with the first result. Each write
  carries the client's floor (its lowest write still in flight): the node
  forgets the results below it, and ignores a late duplicate below it, never
  answering it. So a seq is drawn only by the I/O thread, as the write enters
  flight (``_admit``): every seq drawn later is above every floor already sent.
  (Drawn by the caller thread, a seq could reach the I/O thread after a higher
  one whose floor had passed it, and that write waited unanswered until its
  deadline: ``Unavailable`` on a healthy cluster when threads share a client.)

Reads (``get``, ``scan``) are linearizable by read index. While few calls are in
flight on the connection (``SPREAD_FROM_IN_FLIGHT``), a read's first attempt goes
to its shard's leader, when known (one request at a time, that is the shortest
way); under load reads spread over the nodes: a read's first attempt goes to a
node picked at random (among those not known to be down), leader or follower. The shard's leader confirms its
leadership with a quorum round (batched across reads) and its read index is its
commit point then; a follower asks the leader for that index (``ReadIndex``)
and answers once its own state covers it. A follower that cannot (no leader
known, the leader changed, no answer in time) answers ``NOT_LEADER`` and the
retry goes to the leader. A read served by a follower teaches nothing about
leaders; only writes and redirects do.

One call at a time, a blocking call skips the I/O thread (``kvstore.client.direct``).

A client created before ``os.fork()`` works in the child: the child's first
call (``submit``, which sees the pid change) starts the child's own context,
sockets and I/O thread under a new client id and leaves the parent's
untouched (``_start_in_child``); an ``os.register_at_fork`` hook renews the
locks another parent thread may have held at the fork.

Every reply is checked before it is acted on (``kvstore.client.replies``): an
endpoint that is not a kvstore node yields ``Unavailable`` saying so. A plain
write that meets a prepared transaction's lock is answered ``LOCKED`` (nothing
applied) and retried here as a new write after a short backoff, until its
deadline.
"""

from __future__ import annotations

import heapq
import itertools
import os
import random
import threading
import time
import weakref
from collections import deque
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from concurrent.futures import TimeoutError as FutureTimeout

import zmq

from kvstore.client.replies import MalformedReply, check_result, split_revision
from kvstore.client.connections import HANDSHAKE_FAILED, ConnectionEvents
from kvstore.client.connections import AuthenticationFailed  # noqa: F401 (kvstore.client's)
from kvstore.client.direct import DIRECT_ATTEMPT_SECONDS, DIRECT_OPS, DirectPath
from kvstore.client.topology import relearn
from kvstore.errors import InvalidArgument, KVError, PermissionDenied, Timeout, Unavailable
from kvstore.commands import LOCKED
from kvstore.transport import wire

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
#: Seconds ``close`` waits for calls under way but parked watch polls (a one-round decide sent
#: after its answer: lost, its locks would hold until a resolver recovers it).
CLOSE_DRAIN_SECONDS = 2.0
_client_counter = itertools.count()
#: Operations whose first attempt goes to any node, not only the shard's leader.
_SPREAD_OPS = (wire.OP_GET, wire.OP_SCAN)
#: Operations only a shard's leader carries out: a direct answer names the leader.
_LEADER_OPS = (wire.OP_WRITE, wire.OP_DECIDE)
#: A read's first attempt goes to its shard's leader while fewer calls than this are in
#: flight on the connection, else to any node. One read at a time, the leader answers
#: after one quorum round; a follower first asks the leader for its read index, two
#: hops more (a lone get 1.5 ms against 0.9 on this machine). Under load, spreading the
#: reads spreads their cost over the nodes.
SPREAD_FROM_IN_FLIGHT = 4
#: Requests to one node go in one frame up to about this many bytes.
FRAME_TARGET_BYTES = 4 * 1024 * 1024


def _approx_bytes(obj, depth: int = 0) -> int:
    """About how many bytes ``obj`` (a request's args) encodes to."""
    if type(obj) is bytes:
        return len(obj) + 5
    if isinstance(obj, (list, tuple)) and depth < 6:  # commands are NamedTuples
        return 5 + sum(_approx_bytes(x, depth + 1) for x in obj)
    return 9


#: Objects whose locks a fork renews in the child (``_renew_locks()``): a lock another
#: thread of the parent held at the fork would stay held for ever in the child.
_RENEW_AFTER_FORK: weakref.WeakSet = weakref.WeakSet()


def renew_locks_after_fork(obj) -> None:
    """Have ``obj._renew_locks()`` run in every child right after ``os.fork()``."""
    _RENEW_AFTER_FORK.add(obj)


def _after_fork_in_child() -> None:
    for obj in list(_RENEW_AFTER_FORK):
        obj._renew_locks()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _Call:
    __slots__ = ("request_id", "op", "shard", "payload", "deadline", "future", "target",
                 "retry_at", "resend", "reached", "is_write", "sent_to", "seq", "attempt",
                 "want_revision")

    def __init__(self, request_id, op, shard, payload, deadline, target=None,
                 attempt=ATTEMPT_SECONDS) -> None:
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
        self.seq = 0  # a write's session seq: drawn by the I/O thread (``ClientCore._admit``)
        self.attempt = attempt  # seconds an attempt waits for its answer (a long poll: longer)
        self.want_revision = False  # a write sent asking for its revision (``revision_hook``)


class ClientCore(ConnectionEvents, DirectPath):
    """Sockets, routing and retries of one connection; thread-safe ``submit``."""

    def __init__(self, addresses: list, timeout: float, keys=None) -> None:
        self.seeds = addresses
        self.timeout = timeout
        self.keys = keys  # transport.security.CurveKeys, or None
        self.client_id = os.urandom(16)
        self.nodes: list = list(addresses)  # addresses by node index, once known
        self.nshards = 0
        self.leaders: dict = {}  # shard -> node index
        self._ids = itertools.count(1)  # request ids: match replies to calls
        self._lock = threading.Lock()
        self._closed = False
        #: The coherent cache's ``hook(shard, revision)`` on the I/O thread: set, writes ask
        #: for their revision; None for a write of unknown revision (a 2PC decision, a timeout).
        self.revision_hook = None
        renew_locks_after_fork(self)
        self._start()

    def _start(self) -> None:
        """This process's part of the connection: a ZeroMQ context, its sockets and the
        I/O thread, and the state only they touch. Run at creation, and again in a
        child on its first call after ``os.fork()`` (``_start_in_child``)."""
        self._pid = os.getpid()
        self._seqs = itertools.count(1)  # write seqs: the I/O thread's alone, in admit order
        self._queue: deque = deque()
        self.context = zmq.Context()
        name = f"inproc://kvstore-client-{self._pid}-{next(_client_counter)}"
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
        self.direct_calls = 0  # calls carried out on the caller's thread (``_call_direct``)
        self.direct_handed_over = 0  # of which the I/O thread took over
        self._by_socket: dict = {}
        self._inflight: dict = {}  # request_id -> _Call
        self._timers: list = []  # (time, request_id)
        self._out: dict = {}  # address -> [(request_id, op, args)] to send this turn
        # heap of (seq, write call) in flight, for the floor (the lowest seq still unanswered)
        self._writes_inflight: list = []
        self._rotation = random.randrange(1 << 16)
        self._start_direct()
        self._thread = threading.Thread(target=self._run, name="kvstore-client-io", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ caller side
    def submit(self, op: str, shard, payload, timeout: float | None = None,
               target: str | None = None, attempt: float = ATTEMPT_SECONDS) -> Future:
        """Hand ``op`` to the I/O thread; ``attempt``: seconds one attempt waits for its
        answer before the next node is asked (a watch's long poll waits longer)."""
        deadline = time.monotonic() + (timeout or self.timeout)
        if op == wire.OP_DECIDE and self.revision_hook is not None:
            # A decision's participants change at revisions nobody tells: the cache forgets
            # their shards now, before the caller goes on. A one-round commit does not wait
            # for the decision's answer (whose arrival says it again), and the caller's next
            # get must not be served from before its own transaction.
            for participant in payload[3]:
                self.revision_hook(participant, None)
        with self._lock:
            if self._closed:
                raise KVError("this connection is closed")
            if self._pid != os.getpid():
                self._start_in_child()
            call = _Call(next(self._ids), op, shard, payload, deadline, target, attempt)
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
        if target is None and op in DIRECT_OPS:
            call = self._claim_direct(op, shard, payload, timeout)
            if call is not None:
                return self._call_direct(call)
        return self.wait(self.submit(op, shard, payload, timeout, target))

    def _new_call(self, op: str, shard, payload, deadline: float) -> "_Call":
        return _Call(next(self._ids), op, shard, payload, deadline)

    def _start_in_child(self) -> None:
        """The first call in a child after ``os.fork()`` (under ``self._lock``): start
        this process's own context, sockets and I/O thread, as a new session.

        The parent's are left untouched: a ZeroMQ context must not be used across a
        fork (pyzmq itself makes closing a parent's socket in a child a no-op), and
        the parent's I/O thread did not survive it, so a call handed to them would
        wait for ever. The calls the parent had in flight are the parent's: nobody in
        the child waits on them. A new client id, so that the child's writes are
        never taken for retries of the parent's (the two number their seqs alike);
        the topology learned is kept."""
        self.client_id = os.urandom(16)
        self._start()

    def _renew_locks(self) -> None:
        """In a child, right after ``os.fork()`` (``renew_locks_after_fork``)."""
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            pending = [c.future for c in (*self._queue, *self._inflight.values()) if c.op != wire.OP_WATCH] \
                if self._pid == os.getpid() else []
        if pending:
            wait_futures(pending, timeout=CLOSE_DRAIN_SECONDS)
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._pid != os.getpid():
                return  # a child that never used it: the sockets and thread are the parent's
            self._wake_out.send(b"", zmq.NOBLOCK)
        self._thread.join(10)
        self._wake_out.close(0)
        direct_idle = self._direct_free.wait(DIRECT_ATTEMPT_SECONDS + 5.0)
        if direct_idle:
            for s in self._direct_sockets.values():
                s.close(0)
        if not self._thread.is_alive() and direct_idle:
            self.context.term()  # every socket is closed by now: term() does not block

    # ------------------------------------------------------------------ the I/O thread
    def _dealer(self):
        """A DEALER to a node, as every socket of this client is made: Curve keys, no
        linger, quick reconnects, frames bounded in bytes (connect is the caller's)."""
        s = self.context.socket(zmq.DEALER)
        if self.keys is not None:
            self.keys.make_client(s)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RECONNECT_IVL, 50)
        s.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        s.setsockopt(zmq.MAXMSGSIZE, wire.MAX_PEER_FRAME_BYTES)
        return s

    def _socket(self, address: str):
        s = self._sockets.get(address)
        if s is None:
            s = self._dealer()
            s.setsockopt(zmq.SNDHWM, HWM_MESSAGES)
            s.setsockopt(zmq.RCVHWM, HWM_MESSAGES)
            # A node that dies (SIGKILL, crash) closes its TCP connection: the monitor
            # says so at once, and what was in flight there is sent elsewhere. It also
            # reports a refused CurveZMQ handshake. Attached before connect(), so that
            # it sees the first attempt too.
            events = zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECTED
            for e in HANDSHAKE_FAILED:
                events |= e
            monitor = s.get_monitor_socket(events)
            self._monitors[monitor] = address
            self._poller.register(monitor, zmq.POLLIN)
            s.connect(address)
            self._sockets[address] = s
            self._by_socket[s] = address
            self._poller.register(s, zmq.POLLIN)
        return s

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
                with self._lock:  # admitted under the lock: ``_claim_direct`` sees them
                    closed = self._closed
                    calls = list(self._queue)
                    self._queue.clear()
                    if not closed:
                        for call in calls:
                            self._admit(call)
                if closed:
                    break
                for call in calls:
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

    def _admit(self, call: _Call) -> None:
        """``call`` enters flight; a write draws its seq now, above every floor sent so far."""
        self._inflight[call.request_id] = call
        if call.is_write:
            if not call.seq:  # a direct call handed over keeps its own (``_hand_over``)
                call.seq = next(self._seqs)
            heapq.heappush(self._writes_inflight, (call.seq, call))
            if call is self._direct_call:  # the heap bounds the floor from now on
                self._direct_call = None

    def _pick(self, call: _Call) -> str:
        if call.target is not None:
            return call.target
        if call.op in _SPREAD_OPS and call.sent_to is None and len(self.nodes) > 1 and (
                len(self._inflight) >= SPREAD_FROM_IN_FLIGHT
                or self.leaders.get(call.shard) is None):
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
            floor = writes[0][0] if writes else call.seq
            direct = self._direct_call  # a direct write in flight: its seq bounds the floor
            if direct is not None and direct.seq < floor:
                floor = direct.seq
            args = [call.shard, self.client_id, call.seq, floor, call.payload]
            if self.revision_hook is not None:
                call.want_revision = True
                args.append(True)
        else:
            args = call.payload
        out = self._out.get(address)
        if out is None:
            self._out[address] = [(call.request_id, call.op, args)]
        else:
            out.append((call.request_id, call.op, args))
        call.resend = False
        call.retry_at = min(now + call.attempt, call.deadline)
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
            # No answer in time: forget the leader we believed in; the next node is asked.
            # Also when this was the call's last attempt (a deadline of one attempt,
            # timeout <= ATTEMPT_SECONDS): else every later call went to a dead leader.
            if not call.resend and call.shard is not None:
                self.leaders.pop(call.shard, None)
            if not call.resend and call.sent_to is not None:
                self._silent[call.sent_to] = now + SILENT_SECONDS  # a stalled node, maybe
            if now >= call.deadline:
                self._fail(call)
                continue
            self._send(call)

    def _fail(self, call: _Call) -> None:
        self._inflight.pop(call.request_id, None)
        if call.future.done():
            return
        if call.is_write and self.revision_hook is not None:
            self.revision_hook(call.shard, None)  # its outcome is unknown: so is its revision
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
        for rid, status, value in self._replies(sock, address, 10_000):
            self._on_reply(address, rid, status, value)

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
                elif type(index) is int:  # a member added since: ask again (topology.py)
                    relearn(self, address, _Call)
            if call.want_revision:
                try:
                    value, revision = split_revision(value)
                except MalformedReply as e:
                    self._malformed(call, address, str(e))
                    return
                if revision is not None and self.revision_hook is not None:
                    self.revision_hook(call.shard, revision)
            if value == LOCKED and call.is_write:
                del self._inflight[rid]
                self._retry_as_new_write(call)
                return
            try:
                value = check_result(call, value)
            except MalformedReply as e:
                self._malformed(call, address, str(e))
                return
            del self._inflight[rid]
            if call.op == wire.OP_HELLO:
                self._learn(value)
            elif call.op == wire.OP_WATCH and status == wire.STATUS_OK:
                self._learn_from_watch(call.shard, address, value[3])
            elif call.op == wire.OP_DECIDE and self.revision_hook is not None:
                for shard in call.payload[3]:  # a 2PC decision: its participants' revisions
                    self.revision_hook(shard, None)  # are unknown
            elif call.shard is not None and leader in self.nodes and (
                    status == wire.STATUS_OK_FORWARDED or call.op in _LEADER_OPS):
                self.leaders[call.shard] = self.nodes.index(leader)  # only a leader does these
            call.future.set_result(value)
        elif status == wire.STATUS_ERROR:
            del self._inflight[rid]
            call.future.set_exception(self._refusal_error(value))
        elif status == wire.STATUS_NOT_LEADER:
            hint = value if type(value) is int and 0 <= value < len(self.nodes) else None
            if hint is None and type(value) is int:
                relearn(self, address, _Call)
            if hint is not None and self.nodes[hint] != address:
                self.leaders[call.shard] = hint
                self._send(call, self.nodes[hint])
            else:
                self.leaders.pop(call.shard, None)
                self._retry_later(call)
        else:  # STATUS_RETRY
            self._retry_later(call, LOCKED_BACKOFF_SECONDS if value == LOCKED else
                              RETRY_BACKOFF_SECONDS)

    def _learn_from_watch(self, shard: int, address: str, current: bool) -> None:
        """Only a shard's leader answers a watch ``current``: polls go to it; a node
        believed to lead that answers not current no longer does: try another."""
        index = self.nodes.index(address) if address in self.nodes else None
        if current and index is not None:
            self.leaders[shard] = index
        elif index is not None and self.leaders.get(shard) == index:
            del self.leaders[shard]

    def _malformed(self, call: _Call, address: str, why: str) -> None:
        """A reply of the wrong shape: the call fails with ``Unavailable`` (the outcome
        of a write is unknown), never with an exception of another class."""
        self._inflight.pop(call.request_id, None)
        self.dropped_replies += 1
        if call.is_write and self.revision_hook is not None:
            self.revision_hook(call.shard, None)
        call.future.set_exception(self._malformed_error(call, address, why))

    @staticmethod
    def _malformed_error(call: _Call, address: str, why: str) -> Unavailable:
        return Unavailable(f"{address} answered {call.op!r} with {why}: it is not a kvstore "
                           f"node, or not one of this version")

    @staticmethod
    def _refusal_error(value) -> KVError:
        """The error of a ``STATUS_ERROR`` answer: ``[class name, message]``."""
        name, message = (value + [None, None])[:2] if isinstance(value, list) else (None, value)
        cls = {"InvalidArgument": InvalidArgument,
               "PermissionDenied": PermissionDenied}.get(name, KVError)
        return cls(f"server refused the request: {message}")

    def _retry_as_new_write(self, call: _Call) -> None:
        """A write that met a prepared transaction's lock applied nothing; it is sent
        again after a backoff as a NEW write (the session table keeps the first answer
        of a seq). The old call stays in the floor heap until the shared future is
        done, so the floor never passes a seq still in flight."""
        with self._lock:
            rid = next(self._ids)
        retry = _Call(rid, call.op, call.shard, call.payload, call.deadline)
        retry.future = call.future
        retry.reached = True
        self._admit(retry)
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
