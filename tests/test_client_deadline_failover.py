"""A client whose deadline is no longer than one attempt (``timeout <= ATTEMPT_SECONDS``)
fails over when its leader dies.

Found by the counter example (examples/counter, COUNTER_TIMEOUT=1): every call of such a
client went to the dead leader until its deadline, and the leader it believed in was
forgotten only when an attempt timed out before the call's deadline, which never happens
when the two coincide, so every later call went there too: all of them failed, for as
long as the client lived.
"""

from __future__ import annotations

import signal
import time

import pytest

import kvstore
from kvstore.client.core import ATTEMPT_SECONDS
from kvstore.server.local import LocalCluster
from conftest import child_env

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("made", ["before the kill", "after the kill"])
def test_a_client_with_a_one_attempt_deadline_fails_over_from_a_dead_leader(tmp_path, made):
    """The client learns the leader from its hello (``kvstore.connect``), made just before
    the leader's death (no call yet: no connection to the leader to see it drop) or
    just after (the survivors still name it): a gunicorn worker whose client is made
    on its first request meets both."""
    lc = LocalCluster(str(tmp_path / "c"), 3, 1, env=child_env())
    c = None
    try:
        lc.start_all()
        leader = lc.wait_ready()["shards"][0]["leader"]
        if made == "before the kill":
            c = lc.client(timeout=ATTEMPT_SECONDS)
        lc.kill(leader, signal.SIGKILL)
        if made == "after the kill":
            c = lc.client(timeout=ATTEMPT_SECONDS)
        failed = 0
        deadline = time.monotonic() + 30  # a new leader is elected in a few seconds
        while time.monotonic() < deadline:
            try:
                value = c.incr(b"k")
                break
            except kvstore.Unavailable:  # outcome unknown: at most one more
                failed += 1
        else:
            pytest.fail(f"every call failed for 30 s after the leader's death ({failed})")
        assert 1 <= value <= 1 + failed
    finally:
        if c is not None:
            c.close()
        lc.close()
