"""The counter service of examples/counter, as shipped: its errors as HTTP statuses (Flask's
test client), and served by gunicorn (a real WSGI server, its config as shipped) under
8 load threads, embedded and on a 3-node cluster whose leader is SIGKILLed partway.

The count is exact: every POST answered 200 is counted once (the counts it answered are
all different, and the final count is at least their number), and a POST answered 503
(``Unavailable``: outcome unknown) is counted at most once (the final count is at most
the 200s plus the 503s); a 409 (a transaction that lost to concurrent ones until its
deadline) is not counted. No other status, no connection error.

Every wait is bounded; gunicorn and the cluster are stopped at teardown.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
import threading

import pytest

import kvstore
from kvstore.server.local import LocalCluster
from conftest import REPO_ROOT, child_env

EXAMPLE = os.path.join(REPO_ROOT, "examples", "counter")
sys.path.insert(0, EXAMPLE)

from compare import serve  # noqa: E402  (examples/counter, not a package)
from load import CounterWatcher, Load  # noqa: E402

pytestmark = pytest.mark.timeout(180)

THREADS = 8


def _counter_app():
    spec = importlib.util.spec_from_file_location("counter_app", os.path.join(EXAMPLE, "app.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Refusing:
    """A counter whose every call raises ``error``."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def add_one(self, key: bytes) -> int:
        raise self.error

    read = add_one


@pytest.mark.parametrize("error, status", [
    (kvstore.Unavailable("no quorum"), 503), (kvstore.Timeout("deadline"), 503),
    (kvstore.TransactionConflict("lost"), 409), (kvstore.InvalidArgument("not a count"), 400),
    (kvstore.StorageError("disk full"), 500), (kvstore.KVError("closed"), 500)])
def test_kvstore_errors_are_http_statuses_with_their_class_named(error, status):
    client = _counter_app().create_app(Refusing(error)).test_client()
    for response in (client.post("/counters/c"), client.get("/counters/c")):
        assert response.status_code == status
        assert response.json["error"] == type(error).__name__
        assert response.json["message"] == str(error)
        assert (response.json.get("outcome") == "unknown") == (status == 503)
        assert ("Retry-After" in response.headers) == (status == 503)


def test_the_sqlite3_variant_counts_every_post_once_from_threads(tmp_path):
    """The comparison's sqlite3 service is a fair one: exact under 8 threads too."""
    module = _counter_app()
    app = module.create_app(module.SqliteCounter(str(tmp_path / "counter.sqlite3")))
    counts: list = []

    def post(n: int) -> None:
        client = app.test_client()
        counts.extend(client.post("/counters/c").json["count"] for _ in range(n))

    pool = [threading.Thread(target=post, args=(20,)) for _ in range(THREADS)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(60)
    assert sorted(counts) == list(range(1, THREADS * 20 + 1))
    assert app.test_client().get("/counters/c").json["count"] == THREADS * 20


def _settings(**kv) -> dict:
    return {"COUNTER_THREADS": "4", **{f"COUNTER_{k.upper()}": v for k, v in kv.items()}}


def _counts(load: Load) -> list:
    """The counts the POSTs answered 200 with, in no particular order."""
    return [count for answers in load.answers for status, count in answers if status == 200]


def _read(url: str, counter: str) -> int:
    get = Load(url, 1, 1, method="GET", counter=counter)
    get.run()
    [[(status, count)]] = get.answers
    assert status == 200, status
    return count


@pytest.mark.parametrize("method", ["incr", "transaction"])
def test_embedded_counter_under_gunicorn_counts_every_post_once(tmp_path, method):
    posts = 25
    settings = _settings(store="embedded", method=method, dir=str(tmp_path / "kv"))
    with serve(settings, str(tmp_path / "gunicorn.log"), env=child_env()) as url:
        load = Load(url, THREADS, posts, counter="hits")
        result = load.run()
        final = _read(url, "hits")
    assert result["statuses"] == {"200": THREADS * posts}, result
    assert sorted(_counts(load)) == list(range(1, THREADS * posts + 1))
    assert final == THREADS * posts


@pytest.mark.parametrize("method", ["incr", "transaction"])
def test_cluster_counter_under_gunicorn_is_exact_through_a_leader_kill(tmp_path, method):
    """2 gunicorn workers x 4 threads over a 3-node cluster; the shard's leader is
    SIGKILLed once a third of the POSTs are answered, and POSTs must be answered 200
    again after it, on every load thread's connection."""
    posts = 40
    total = THREADS * posts
    lc = LocalCluster(str(tmp_path / "cluster"), 3, 1, env=child_env())
    try:
        lc.start_all()
        leader = lc.wait_ready(timeout=60)["shards"][0]["leader"]
        # a 1 s deadline per call (5 s by default): the POSTs caught on the dead leader
        # answer 503 while the test runs, and the unknowns are accounted for
        settings = _settings(store="cluster", method=method, workers="2", timeout="1",
                             cluster=",".join(lc.address_list))
        watcher_db = kvstore.connect(lc.address_list, timeout=10)
        # attached before the load, through the leader's death: checks every event
        watcher = CounterWatcher(watcher_db, "hits")
        with serve(settings, str(tmp_path / "gunicorn.log"), env=child_env()) as url:
            load = Load(url, THREADS, posts, counter="hits")
            a_third = load.milestone(total // 3)
            outcome: dict = {}
            runner = threading.Thread(target=lambda: outcome.update(load.run()))
            runner.start()
            try:
                assert a_third.wait(60), f"the POSTs did not flow: {load.done} answered"
                assert load.done < total, "every POST was answered before the kill"
                lc.kill(leader, signal.SIGKILL)
                answered_before_kill = [len(answers) for answers in load.answers]
            finally:
                runner.join(120)
            assert not runner.is_alive(), "the load did not finish"
            final_through_service = _read(url, "hits")
        statuses = outcome["statuses"]
        # 409: a transaction that lost to concurrent ones until its deadline, not applied
        assert set(statuses) <= {"200", "503", "409"}, (statuses, load.error_messages[:3])
        acked, unknown = statuses.get("200", 0), statuses.get("503", 0)
        counts = _counts(load)
        assert len(set(counts)) == len(counts) == acked  # no count answered twice
        after_kill = sum(status == 200 for answers, before in zip(load.answers,
                                                                   answered_before_kill)
                         for status, _ in answers[before:])
        assert after_kill > 0, "no POST was answered 200 after the leader's death"
        # every worker's client found the new leader: each load thread's last POST counted
        assert [answers[-1][0] for answers in load.answers] == [200] * THREADS
        with lc.client(timeout=10, names=[n for n in lc.names if n != leader]) as c:
            final = int(c.get(b"counter/hits"))
        assert final == final_through_service
        assert max(counts) <= final
        assert acked <= final <= acked + unknown, (acked, unknown, final)
        # the watcher saw every applied increment once, in order: 1, 2, ..., final
        assert watcher.finish(counts, final) == []
        assert watcher.values == list(range(1, final + 1))
        watcher_db.close()
    finally:
        lc.close()


class _Event:
    def __init__(self, value, type="put") -> None:
        self.type, self.key, self.value = type, b"counter/c", value


def _watcher_seeing(initial: int, values: list) -> CounterWatcher:
    """A ``CounterWatcher`` as if it had taken ``values`` (bytes or None) after reading
    ``initial``: its check alone, no cluster."""
    watcher = CounterWatcher.__new__(CounterWatcher)
    watcher.initial, watcher.values, watcher.wrong = initial, [], []
    for value in values:
        watcher._take(_Event(value, "delete" if value is None else "put"))
    return watcher


@pytest.mark.parametrize("values, acked, final, complaint", [
    ([b"3", b"4", b"4", b"5"], [3, 4, 5], 5, "4 delivered after 4"),  # twice
    ([b"3", b"5"], [3, 5], 5, "5 delivered after 3"),  # a gap
    ([b"3", b"4"], [3, 4, 5], 5, "acknowledged counts never delivered"),
    ([b"3", b"4"], [3, 4], 5, "last count delivered is 4, the final read 5"),
    ([b"3", None, b"4"], [3, 4], 4, "is no count"),
])
def test_the_counter_watcher_names_each_way_a_stream_can_be_wrong(values, acked, final,
                                                                  complaint):
    assert _watcher_seeing(2, [b"3", b"4", b"5"]).problems([3, 4, 5], 5) == []
    problems = _watcher_seeing(2, values).problems(acked, final)
    assert any(complaint in p for p in problems), problems
