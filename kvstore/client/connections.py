"""What the engine's connections tell it: the replies waiting on a socket (and frames no
node sends), a node's connection dropped or came back, or a node refused the CurveZMQ
handshake (``ConnectionEvents``, a part of ``kvstore.client.core.ClientCore``: the
sockets and socket monitors its I/O thread reads; the direct path reads replies too).

A node that dies (SIGKILL, crash) closes its TCP connection: the monitor says so at
once, and what was in flight there is sent elsewhere; a node that refuses our key
fails what waits on it with ``AuthenticationFailed``, saying what to do.
"""

from __future__ import annotations

import zmq

from kvstore.errors import Unavailable
from kvstore.transport import wire


class AuthenticationFailed(Unavailable):
    """A node refused this client's CurveZMQ handshake (no key, or a key it does not allow)."""


HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                     zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


class ConnectionEvents:
    """The sockets' replies and the monitors' events (mixed into ``ClientCore``)."""

    def _replies(self, sock, address: str, frames_max: int):
        """``(request id, status, value)`` of every reply in the frames waiting on ``sock``
        (at most ``frames_max`` frames, without blocking); a frame no node sends is
        dropped and counted (``_alien``). The I/O thread's sockets and the direct path's."""
        for _ in range(frames_max):
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
                yield from body[1]
            elif body[0] == wire.REPLY:
                yield body[1], body[2], body[3]
            else:
                self._alien(address, f"a frame of kind {body[0]}, not a reply")

    def _alien(self, address: str, what: str) -> None:
        """``address`` sent something no kvstore node sends: dropped, counted, and named
        in the error of a call that no node answers (``_fail``)."""
        self.dropped_replies += 1
        self._aliens[address] = what[:200]

    def _on_monitor(self, monitor) -> None:
        from zmq.utils.monitor import recv_monitor_message
        address = self._monitors[monitor]
        lost = False
        while True:
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                break
            if event["event"] in HANDSHAKE_FAILED:
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
