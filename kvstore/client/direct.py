"""The direct path of the client's engine: one call at a time, no I/O thread.

One call at a time, a blocking call skips the I/O thread (``_call_direct``): when
nothing else is in flight or queued on the connection, the caller's own thread
sends its put or get to the shard's known leader on a socket of its own and polls
for the answer there: two thread wake-ups fewer (the hand-over to the I/O thread
and the future's back), about 0.1 ms of a 1 ms get here. Only the plain answer is
taken there; anything else (a redirect, a retry, a lock, no answer within
``DIRECT_ATTEMPT_SECONDS``) hands the same call (the same write seq: the same
command) to the I/O thread, which carries it on as usual. One direct call at a
time per connection: while it is in flight the I/O thread's floors stay at or
below its seq, and other threads' calls take the I/O thread.

A part of ``kvstore.client.core.ClientCore`` (a mixin: it shares the engine's lock,
its queue, its write seqs and its leader map): ``ClientCore.call`` claims the
direct path (``_claim_direct``) and carries the call out here (``_call_direct``);
``kvstore.client.aio.AsyncKV`` uses the same pieces from its event loop.
"""

from __future__ import annotations

import os
import threading
import time

import zmq

from kvstore.client.replies import MalformedReply, check_result
from kvstore.commands import LOCKED
from kvstore.errors import KVError
from kvstore.transport import wire

#: Operations a blocking call may carry out on its own thread (``ClientCore._call_direct``).
DIRECT_OPS = (wire.OP_WRITE, wire.OP_GET)
#: Seconds a direct call waits for its answer before the I/O thread takes it over.
DIRECT_ATTEMPT_SECONDS = 0.2
#: ``ClientCore._direct_outcome``: the I/O thread carries the same call on ...
DIRECT_HAND_OVER = object()
#: ... or: a write met a lock (applied nothing): asked again as a new write.
DIRECT_NEW_WRITE = object()


class DirectPath:
    """The direct path's methods and state, mixed into ``ClientCore``."""

    def _start_direct(self) -> None:
        """This process's direct sockets (one per node, made on first use) and state:
        ``_direct_active`` (under the lock): a caller uses the direct sockets now;
        ``_direct_call``: a direct write whose seq bounds the floors the I/O thread sends,
        until that thread admits it (``ClientCore._admit``)."""
        self._direct_sockets: dict = {}
        self._direct_active = False
        self._direct_call = None
        self._direct_free = threading.Event()
        self._direct_free.set()

    def _claim_direct(self, op: str, shard, payload, timeout) -> "object | None":
        """A call this thread may carry out itself, or None: only when the connection is
        idle (nothing queued, nothing in flight, no direct call), the shard's leader is
        known and connected, and no cache wants revisions."""
        with self._lock:
            if (self._closed or self._direct_active or self._queue or self._inflight
                    or self._pid != os.getpid() or self.revision_hook is not None):
                return None
            leader = self.leaders.get(shard)
            if leader is None or leader >= len(self.nodes):
                return None
            address = self.nodes[leader]
            if address not in self._connected or address in self._down:
                return None
            call = self._new_call(op, shard, payload, time.monotonic() + (timeout or self.timeout))
            call.sent_to = address
            if call.is_write:  # drawn under the lock, as the I/O thread's (``_admit``)
                call.seq = next(self._seqs)
                self._direct_call = call
            self._direct_active = True
            self._direct_free.clear()
            self.direct_calls += 1
        return call

    def _claim_direct_batch(self, batch, timeout) -> "list | None":
        """Claim the direct path for every call of ``batch`` (``[(op, shard, payload)]``: a
        transaction's prepares, one per shard, sent at once), all or none: as
        ``_claim_direct``, for each call's shard. The lowest write seq bounds the I/O
        thread's floors while the batch is out (``_direct_call``)."""
        with self._lock:
            if (self._closed or self._direct_active or self._queue or self._inflight
                    or self._pid != os.getpid() or self.revision_hook is not None):
                return None
            addresses = []
            for op, shard, _payload in batch:
                leader = self.leaders.get(shard)
                if op not in DIRECT_OPS or leader is None or leader >= len(self.nodes):
                    return None
                address = self.nodes[leader]
                if address not in self._connected or address in self._down:
                    return None
                addresses.append(address)
            deadline = time.monotonic() + (timeout or self.timeout)
            calls = []
            for (op, shard, payload), address in zip(batch, addresses):
                call = self._new_call(op, shard, payload, deadline)
                call.sent_to = address
                if call.is_write:
                    call.seq = next(self._seqs)
                    if self._direct_call is None:
                        self._direct_call = call  # the first drawn: the lowest seq
                calls.append(call)
            self._direct_active = True
            self._direct_free.clear()
            self.direct_calls += len(calls)
        return calls

    def _direct_send_batch(self, calls) -> list:
        """Send a claimed batch; each call's socket, or None where it could not be sent.
        Every write's floor is the batch's lowest seq (all of them are in flight)."""
        floor = min((c.seq for c in calls if c.is_write), default=None)
        return [self._direct_send(c, floor) for c in calls]

    def _direct_take_batch(self, sock, address: str, by_id: dict, replies: dict) -> None:
        """Move the replies waiting on ``sock`` to calls of the batch (``by_id``: request
        id -> call) into ``replies``; others (earlier calls handed over) are skipped."""
        for r, status, value in self._replies(sock, address, 1 << 30):
            if r in by_id:
                replies[r] = (status, value)

    def _direct_release_batch(self, calls, handed: set) -> None:
        """The direct path is free again; ``handed``: request ids the I/O thread took on."""
        with self._lock:
            self._direct_active = False
            if self._direct_call in calls:
                # a write handed over bounds the floors until the I/O thread admits it
                waiting = [c for c in calls if c.is_write and c.request_id in handed
                           and c.request_id not in self._inflight]
                self._direct_call = min(waiting, key=lambda c: c.seq, default=None)
            self._direct_free.set()

    def call_batch(self, batch) -> list:
        """Every call of ``batch`` (``[(op, shard, payload)]``) at once, from this thread:
        their results, or the ``KVError`` each raised. On the direct path when it is free
        (``_claim_direct_batch``: a transaction's prepares skip the I/O thread), else
        through the I/O thread."""
        calls = self._claim_direct_batch(batch, None)
        if calls is None:
            futures = [self.submit(op, shard, payload) for op, shard, payload in batch]
            return [_settled(lambda f=f: self.wait(f)) for f in futures]
        handed: set = set()
        try:
            socks = self._direct_send_batch(calls)
            replies = self._direct_poll_batch(calls, socks)
            out, later = [], {}  # later: index -> the future the I/O thread answers
            for call, sock in zip(calls, socks):
                outcome = _settled(lambda c=call, s=sock: self._direct_outcome(
                    c, replies.get(c.request_id) if s is not None else None))
                if outcome is DIRECT_NEW_WRITE:
                    later[len(out)] = self.submit(call.op, call.shard, call.payload,
                                                  max(0.001, call.deadline - time.monotonic()))
                elif outcome is DIRECT_HAND_OVER:
                    if self._hand_over(call):
                        handed.add(call.request_id)
                    later[len(out)] = call.future
                out.append(outcome)
            for i, future in later.items():
                out[i] = _settled(lambda f=future: self.wait(f))
            return out
        finally:
            self._direct_release_batch(calls, handed)

    def _direct_poll_batch(self, calls, socks) -> dict:
        """Request id -> ``(status, value)`` of the replies to ``calls`` on their direct
        sockets, as they come, until all are in or ``DIRECT_ATTEMPT_SECONDS`` pass."""
        by_id = {c.request_id: c for c, s in zip(calls, socks) if s is not None}
        watched = {s: c.sent_to for c, s in zip(calls, socks) if s is not None}
        poller = zmq.Poller()
        for sock in watched:
            poller.register(sock, zmq.POLLIN)
        replies: dict = {}
        end = min(time.monotonic() + DIRECT_ATTEMPT_SECONDS, min(c.deadline for c in calls))
        while len(replies) < len(by_id):
            left = end - time.monotonic()
            if left <= 0:
                break
            for sock, _event in poller.poll(int(left * 1000) + 1):
                self._direct_take_batch(sock, watched[sock], by_id, replies)
        return replies

    def _call_direct(self, call):
        """Send ``call`` from this thread and poll for its answer; a plain answer is
        returned (or its error raised), anything else hands the call to the I/O thread."""
        handed = False
        try:
            sock = self._direct_send(call)
            reply = None
            if sock is not None:
                end = min(time.monotonic() + DIRECT_ATTEMPT_SECONDS, call.deadline)
                while reply is None:
                    left = end - time.monotonic()
                    if left <= 0 or not sock.poll(int(left * 1000) + 1):
                        break
                    reply = self._direct_take(sock, call)
            outcome = self._direct_outcome(call, reply)
            if outcome is DIRECT_NEW_WRITE:
                return self.wait(self.submit(call.op, call.shard, call.payload,
                                             max(0.001, call.deadline - time.monotonic())))
            if outcome is DIRECT_HAND_OVER:
                handed = self._hand_over(call)
                return self.wait(call.future)
            return outcome
        finally:
            self._direct_release(call, handed)

    def _direct_send(self, call, floor: int | None = None):
        """Send a claimed direct call on its socket: the socket, or None if it could not.
        ``floor``: the lowest seq in flight (a batch's), if not this write's own."""
        sock = self._direct_socket(call.sent_to)
        if call.is_write:  # nothing else in flight: the floor is this write's seq
            args = [call.shard, self.client_id, call.seq, call.seq if floor is None else floor,
                    call.payload]
        else:
            args = call.payload
        try:
            sock.send(wire.encode_request(call.request_id, call.op, args), zmq.NOBLOCK)
        except zmq.ZMQError:
            return None
        return sock

    def _direct_take(self, sock, call):
        """``(status, value)`` of ``call``'s reply among the frames waiting on ``sock``
        (without blocking), or None. Replies to earlier direct calls handed over since
        are skipped."""
        rid = call.request_id
        for r, status, value in self._replies(sock, call.sent_to, 1 << 30):  # (``ConnectionEvents``)
            if r == rid:
                return status, value
        return None

    def _direct_outcome(self, call, reply):
        """What a direct call's ``reply`` (None: none in time) comes to: its result (or
        its error raised), ``DIRECT_NEW_WRITE`` (a write that met a lock: it applied
        nothing, ask again as a new write) or ``DIRECT_HAND_OVER`` (the I/O thread
        carries the same call on: a redirect, a retry, no answer)."""
        if reply is None:
            return DIRECT_HAND_OVER
        status, value = reply
        call.reached = True
        if status == wire.STATUS_OK:
            if value == LOCKED and call.is_write:
                return DIRECT_NEW_WRITE
            try:
                return check_result(call, value)
            except MalformedReply as e:
                self.dropped_replies += 1
                raise self._malformed_error(call, call.sent_to, str(e)) from None
        if status == wire.STATUS_ERROR:
            raise self._refusal_error(value)
        return DIRECT_HAND_OVER

    def _direct_release(self, call, handed: bool) -> None:
        """The direct path is free again (``handed``: the I/O thread took ``call`` on)."""
        with self._lock:
            self._direct_active = False
            if not handed and self._direct_call is call:
                self._direct_call = None
            self._direct_free.set()

    def _hand_over(self, call) -> bool:
        """Queue a direct call for the I/O thread, its seq kept (``_admit``)."""
        with self._lock:
            if self._closed:
                call.future.set_exception(KVError("this connection is closed"))
                return False
            self._queue.append(call)
            if len(self._queue) == 1:
                self._wake_out.send(b"", zmq.NOBLOCK)
            self.direct_handed_over += 1
        return True

    def _direct_socket(self, address: str):
        """The direct path's DEALER to ``address`` (one per node, made on first use)."""
        s = self._direct_sockets.get(address)
        if s is None:
            s = self._dealer()  # (``ClientCore._dealer``)
            s.connect(address)
            self._direct_sockets[address] = s
        return s


def _settled(fn):
    """``fn()``, or the ``KVError`` it raised (a batch answers each call's own)."""
    try:
        return fn()
    except KVError as e:
        return e
