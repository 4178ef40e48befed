"""How the production loop waits (``kvstore.node.waiter``): awake for a moment while
messages come close together, asleep otherwise; ``[tuning] busy_poll_us`` sets the
moment, and a ``kvstore-server`` has it on unless its cluster file says 0."""

from __future__ import annotations

import threading
from collections import Counter

import pytest
import zmq

import kvstore
from conftest import ManualClock
from kvstore.errors import InvalidArgument
from kvstore.node.config import load_node_config
from kvstore.node.ports import SystemClock
from kvstore.node.waiter import SERVER_BUSY_POLL_US, LoopWaiter
from kvstore.server.local import LocalCluster


@pytest.fixture
def pair():
    ctx = zmq.Context()
    receiver = ctx.socket(zmq.PAIR)
    receiver.bind("inproc://waiter")
    sender = ctx.socket(zmq.PAIR)
    sender.connect("inproc://waiter")
    yield receiver, sender
    sender.close(0)
    receiver.close(0)
    ctx.term()


def send_when(event: threading.Event, sender) -> threading.Thread:
    """A thread that sends one frame once ``event`` is set."""
    def run():
        event.wait(5)
        sender.send(b"x")
    t = threading.Thread(target=run)
    t.start()
    return t


def test_a_message_close_after_the_last_is_caught_awake(pair):
    receiver, sender = pair
    counters: Counter = Counter()
    clock = SystemClock()
    waiter = LoopWaiter([receiver], clock, 5.0, counters)
    assert waiter.wait(clock.monotonic(), received=True) is False  # the first: not dense yet
    go = threading.Event()
    t = send_when(go, sender)
    go.set()  # sent while the waiter polls awake (the last receive was just now)
    assert waiter.wait(clock.monotonic() + 5.0, received=True) is True
    t.join()
    assert counters["busy_poll_hits"] == 1
    receiver.recv()


def test_without_traffic_or_with_busy_polling_off_the_loop_sleeps(pair):
    receiver, sender = pair
    clock = SystemClock()
    for busy, received in ((5.0, False), (0.0, True)):
        counters: Counter = Counter()
        waiter = LoopWaiter([receiver], clock, busy, counters)
        for _ in range(3):
            go = threading.Event()
            t = send_when(go, sender)
            go.set()
            assert waiter.wait(clock.monotonic() + 5.0, received=received) is True
            t.join()
            receiver.recv()
        assert counters["busy_poll_hits"] == 0, (busy, received)


def test_messages_a_window_apart_are_polled_for_and_two_only_while_spins_catch(pair):
    """A 2 ms window. Receives 1.5 ms apart: the loop polls awake. 3 ms apart: only if
    the last spin caught its message; after a spin that missed, not until a gap of one
    window again (a steady stream 3 ms apart would have every spin miss)."""
    receiver, sender = pair
    clock, counters = ManualClock(), Counter()
    waiter = LoopWaiter([receiver], clock, 0.002, counters)

    def receive_after(gap: float, message: bool) -> None:
        clock.now += gap
        if message:
            sender.send(b"x")  # inproc: in the pipe at once, so any poll finds it
        # until = now: a spin that finds nothing ends at once (the clock stands still)
        assert waiter.wait(clock.now, received=True) is message
        if message:
            receiver.recv()

    receive_after(0.0, False)     # the first: nothing before it, no spin
    receive_after(0.003, True)    # 3 ms, no spin has caught anything yet: no spin
    assert counters["busy_poll_hits"] == 0
    receive_after(0.0015, True)   # 1.5 ms: spins, and catches
    assert counters["busy_poll_hits"] == 1
    receive_after(0.003, True)    # 3 ms after a spin that caught: spins again
    assert counters["busy_poll_hits"] == 2
    receive_after(0.003, False)   # 3 ms: spins, and misses
    receive_after(0.003, True)    # 3 ms after a miss: no spin
    assert counters["busy_poll_hits"] == 2
    receive_after(0.001, True)    # one window or less: spins again
    assert counters["busy_poll_hits"] == 3


def test_busy_polling_never_runs_past_the_next_tick(pair):
    receiver, _sender = pair
    clock = SystemClock()
    waiter = LoopWaiter([receiver], clock, 30.0, Counter())
    waiter.wait(clock.monotonic(), received=True)
    start = clock.monotonic()
    assert waiter.wait(start + 0.01, received=True) is False  # the tick is due: back to turn
    assert clock.monotonic() - start < 10.0  # not the 30 s window


def write_config(tmp_path, tuning: str) -> str:
    path = tmp_path / "cluster.toml"
    path.write_text('[nodes.n1]\naddress = "tcp://127.0.0.1:7001"\n[tuning]\n' + tuning)
    return str(path)


def test_busy_poll_us_is_a_tuning_setting_zero_turning_it_off(tmp_path):
    def busy(tuning):
        return load_node_config(write_config(tmp_path, tuning), "n1",
                                data=str(tmp_path)).busy_poll_us
    assert busy("tick_ms = 10\n") is None  # unset: the process decides
    assert busy("busy_poll_us = 0\n") == 0
    assert busy("busy_poll_us = 500\n") == 500
    for bad in ("busy_poll_us = -1\n", "busy_poll_us = true\n", "busy_poll_us = 1.5\n"):
        with pytest.raises(InvalidArgument, match="busy_poll_us must be an integer >= 0"):
            busy(bad)


@pytest.mark.parametrize("tuning, polls", [(None, True), ({"busy_poll_us": 0}, False)])
def test_a_server_polls_awake_by_default_and_not_when_told(tmp_path, tuning, polls):
    """Real servers, one put after the other: the leader's status counts the waits a busy
    poll ended (the Accepted, the next request) unless ``busy_poll_us = 0``."""
    from test_hostile_clients import node_status
    assert SERVER_BUSY_POLL_US > 0
    with LocalCluster(str(tmp_path / "c"), 3, 1, tuning=tuning) as lc:
        lc.start_all()
        lc.wait_ready(timeout=60)
        with kvstore.connect(lc.address_list, timeout=30) as db:
            for i in range(300):
                db.put(b"k%d" % i, b"v")
            leader = db.status()["shards"][0]["leader"]
        hits = node_status(lc.addresses[leader], timeout=30)["counters"].get("busy_poll_hits", 0)
    assert (hits > 0) is polls, hits
