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

    def _direct_send(self, call):
        """Send a claimed direct call on its socket: the socket, or None if it could not."""
        sock = self._direct_socket(call.sent_to)
        if call.is_write:  # nothing else in flight: the floor is this write's seq
            args = [call.shard, self.client_id, call.seq, call.seq, call.payload]
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
