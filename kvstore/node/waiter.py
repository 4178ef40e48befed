"""How the production loop waits for its sockets: asleep in ``zmq_poll`` until the next
tick, or, while messages come close together, awake for a moment first.

Why busy polling. A message reaches the loop through libzmq's I/O thread, which
signals the socket's mailbox; a loop asleep in ``poll`` is then woken by the
kernel. On the 2-core VM this project is measured on, a wake-up costs tens of
microseconds (a pyzmq DEALER to ROUTER round trip inside one process takes 60-70
us, two of them), and a put one at a time wakes a loop three times on its critical
path (the leader for the request, a follower for the Accept, the leader for the
Accepted), a get twice. A loop that is already running when the message lands
reads it at once. Measured (3 nodes, the sync client, interleaved rounds, three
A/Bs): a lone put 1.01-1.13 ms asleep against 0.93-1.05 ms with a 2 ms window; a
lone get 0.64-0.70 against 0.53-0.62 ms; cross-shard transactions back
to back 10-25% faster in one pair of runs, within the noise in another; 256 in
flight unchanged (a busy node never sleeps anyway).

What it costs, and why it is bounded. After a turn that received something, the
loop polls without blocking for up to ``busy_poll_seconds`` (never past the next
tick), yielding its core between polls (``sched_yield``: any other runnable
thread goes first), if traffic is dense: the turn before that which received
something was at most one window earlier, or at most two and the last spin
caught its message (a transaction's requests come in bursts with such gaps
between them; a steady stream two windows apart would have every spin end in the
sleep it meant to save: one miss, and the loop stops trying until a gap of one
window). An idle cluster never spins (heartbeats are ticks apart: measured, 130
ms/s of CPU for three idle nodes against 122 without); a steady stream of a
message every window or sooner keeps a node polling, up to a core while it lasts
(with a 2 ms window: 500 messages a second and more), as Go's spinning scheduler
does for etcd (whose three members burn 1.2-1.4 ms of CPU per lone put here;
kvstore's 1.4 asleep, 1.6-1.9 polling). ``[tuning] busy_poll_us = 0`` turns it
off; an embedded replica (a node in a thread of the application, sharing its GIL)
has it off unless its cluster file asks.
"""

from __future__ import annotations

import os

import zmq

#: ``[tuning] busy_poll_us`` of a ``kvstore-server`` whose cluster file does not set it.
SERVER_BUSY_POLL_US = 2000


class LoopWaiter:
    """``wait(until, received)``: True once a socket has something to read, False at
    ``until`` (the clock's time of the next tick). ``received``: the turn just run read
    at least one frame. ``counters["busy_poll_hits"]``: the waits a busy poll ended (a
    wake-up saved; the node's status shows it)."""

    def __init__(self, sockets: list, clock, busy_poll_seconds: float, counters) -> None:
        self.poller = zmq.Poller()
        for sock in sockets:
            self.poller.register(sock, zmq.POLLIN)
        self.clock = clock
        self.busy = busy_poll_seconds
        self._last_received = float("-inf")
        self._last_spin_caught = False
        self.counters = counters

    def wait(self, until: float, received: bool) -> bool:
        now = self.clock.monotonic()
        if self.busy > 0 and received:
            gap, self._last_received = now - self._last_received, now
            if gap <= self.busy or (gap <= 2 * self.busy and self._last_spin_caught):
                self._last_spin_caught = self._spin(min(now + self.busy, until))
                if self._last_spin_caught:
                    self.counters["busy_poll_hits"] += 1
                    return True
        left = until - self.clock.monotonic()
        return bool(self.poller.poll(int(left * 1000) + 1 if left > 0 else 0))

    def _spin(self, end: float) -> bool:
        poll, monotonic = self.poller.poll, self.clock.monotonic
        while True:
            if poll(0):
                return True
            if monotonic() >= end:
                return False
            os.sched_yield()
