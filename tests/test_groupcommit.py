"""Unit tests of GroupCommitter with a fake commit function."""

from __future__ import annotations

import threading

import pytest

from kvstore.embedded.groupcommit import MAX_BATCH, GroupCommitter, Request


class FakeCommit:
    """Records each batch; answers each request with its payload doubled.

    ``gate`` (if set) blocks the first commit until released, so tests can
    pile up requests behind a leader deterministically.
    """

    def __init__(self) -> None:
        self.batches: list[list] = []
        self.active = 0
        self.max_active = 0
        self.lock = threading.Lock()
        self.fail_payloads: set = set()
        self.entered = threading.Event()
        self.gate: threading.Event | None = None
        self._gate_used = False

    def __call__(self, batch) -> None:
        with self.lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            self.entered.set()
            if self.gate is not None and not self._gate_used:
                self._gate_used = True
                assert self.gate.wait(10)
            payloads = [r.payload for r in batch]
            self.batches.append(payloads)
            if self.fail_payloads & set(payloads):
                raise OSError("disk on fire")
            for r in batch:
                r.result = r.payload * 2
        finally:
            with self.lock:
                self.active -= 1


def run_threads(n, target):
    errors = []

    def wrap(i):
        try:
            target(i)
        except BaseException as e:  # surfaced to the test below
            errors.append(e)

    threads = [threading.Thread(target=wrap, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
        assert not t.is_alive(), "a submitter hung"
    return errors


def wait_queued(gc: GroupCommitter, n: int) -> None:
    """Until ``n`` requests wait in the queue (a condition, polled on the committer's lock)."""
    for _ in range(1_000_000):
        with gc._lock:
            if len(gc._queue) >= n:
                return
        threading.Event().wait(0.0005)
    raise AssertionError(f"{n} requests never queued")


def test_lone_writer_commits_alone_and_gets_its_result():
    fake = FakeCommit()
    gc = GroupCommitter(fake)
    assert gc.submit(Request(21)) == 42
    assert gc.submit(Request(5)) == 10
    assert fake.batches == [[21], [5]]
    assert gc.commits == 2


def test_requests_queued_behind_a_leader_share_one_commit():
    fake = FakeCommit()
    fake.gate = threading.Event()
    gc = GroupCommitter(fake)
    results = {}
    leader = threading.Thread(target=lambda: results.__setitem__(0, gc.submit(Request(0))))
    leader.start()
    assert fake.entered.wait(10)  # the leader is inside the (blocked) commit
    errors_box = []

    def follower(i):
        results[i] = gc.submit(Request(i))

    followers = [threading.Thread(target=lambda i=i: errors_box.append(follower(i)))
                 for i in range(1, 8)]
    for t in followers:
        t.start()
    wait_queued(gc, 7)
    fake.gate.set()
    leader.join(10)
    for t in followers:
        t.join(10)
    assert results == {i: 2 * i for i in range(8)}
    assert fake.batches[0] == [0]
    assert sorted(fake.batches[1]) == list(range(1, 8))  # the seven queued: one commit
    assert len(fake.batches) == 2 and gc.commits == 2


def test_concurrent_submitters_all_answered_never_overlapping():
    fake = FakeCommit()
    gc = GroupCommitter(fake)
    n_threads, per_thread = 8, 200
    barrier = threading.Barrier(n_threads)
    results = {}

    def worker(i):
        barrier.wait()
        for j in range(per_thread):
            payload = i * per_thread + j
            results[payload] = gc.submit(Request(payload))

    assert run_threads(n_threads, worker) == []
    total = n_threads * per_thread
    assert results == {p: 2 * p for p in range(total)}
    committed = sorted(p for batch in fake.batches for p in batch)
    assert committed == list(range(total))  # each request committed exactly once
    assert fake.max_active == 1  # commits are serialised
    assert gc.commits == len(fake.batches)
    assert all(len(b) <= MAX_BATCH for b in fake.batches)


def test_error_reaches_every_request_of_its_batch_and_next_batch_works():
    fake = FakeCommit()
    fake.gate = threading.Event()
    fake.fail_payloads = {3}
    gc = GroupCommitter(fake)
    outcomes = {}

    def submit(i):
        try:
            outcomes[i] = ("ok", gc.submit(Request(i)))
        except OSError as e:
            outcomes[i] = ("error", e)

    leader = threading.Thread(target=submit, args=(0,))
    leader.start()
    assert fake.entered.wait(10)
    followers = [threading.Thread(target=submit, args=(i,)) for i in range(1, 6)]
    for t in followers:
        t.start()
    wait_queued(gc, 5)
    fake.gate.set()
    for t in [leader, *followers]:
        t.join(10)
        assert not t.is_alive()
    assert outcomes[0] == ("ok", 0)
    failed_batch = fake.batches[1]
    assert 3 in failed_batch and sorted(failed_batch) == [1, 2, 3, 4, 5]
    errors = [outcomes[i][1] for i in failed_batch]
    assert all(kind == "error" for kind, _ in (outcomes[i] for i in failed_batch))
    assert all(e is errors[0] and "disk on fire" in str(e) for e in errors)
    # the committer is not wedged: the next batch commits normally
    assert gc.submit(Request(7)) == 14
    assert gc.commits == 3


def test_request_answered_by_the_commit_function_keeps_its_own_error():
    def commit(batch):
        for r in batch:
            if r.payload == "bad":
                r.error = ValueError("only this one")
            else:
                r.result = "fine"

    gc = GroupCommitter(commit)
    with pytest.raises(ValueError, match="only this one"):
        gc.submit(Request("bad"))
    assert gc.submit(Request("good")) == "fine"


def test_base_exception_in_commit_does_not_wedge():
    calls = []

    def commit(batch):
        calls.append(len(batch))
        if len(calls) == 1:
            raise KeyboardInterrupt
        for r in batch:
            r.result = "ok"

    gc = GroupCommitter(commit)
    with pytest.raises(KeyboardInterrupt):
        gc.submit(Request(1))
    assert gc.submit(Request(2)) == "ok"


class GatedCommit:
    """A commit that notes ``(its thread's name, the batch's payloads sorted)`` in
    ``threads`` and answers each request with its payload; a batch whose first payload is
    in ``gated`` sets ``entered[payload]`` and waits for ``release[payload]``."""

    def __init__(self, gated=(0,)) -> None:
        self.threads: list = []
        self.entered = {p: threading.Event() for p in gated}
        self.release = {p: threading.Event() for p in gated}

    def __call__(self, batch) -> None:
        self.threads.append((threading.current_thread().name,
                             sorted(r.payload for r in batch)))
        first = batch[0].payload
        if first in self.entered:
            self.entered[first].set()
            assert self.release[first].wait(10)
        for r in batch:
            r.result = r.payload


def test_leadership_hands_off_to_a_queued_request():
    """A leader that led ``lead_rounds`` batches answers its last and hands leadership
    to a request queued meanwhile; that request's own thread commits the next batch."""
    commit = GatedCommit(gated=("first",))
    gc = GroupCommitter(commit, lead_rounds=1)
    results = {}
    first = threading.Thread(name="T-first", target=lambda: results.__setitem__(
        "first", gc.submit(Request("first"))))
    second = threading.Thread(name="T-second", target=lambda: results.__setitem__(
        "second", gc.submit(Request("second"))))
    first.start()
    assert commit.entered["first"].wait(10)
    second.start()
    wait_queued(gc, 1)
    commit.release["first"].set()
    first.join(10)
    second.join(10)
    assert results == {"first": "first", "second": "second"}
    assert commit.threads == [("T-first", ["first"]), ("T-second", ["second"])]
    assert gc._busy is False and gc._queue == []
    assert gc.submit(Request("third")) == "third"


def test_batches_are_bounded_by_max_batch(monkeypatch):
    import kvstore.embedded.groupcommit as groupcommit
    monkeypatch.setattr(groupcommit, "MAX_BATCH", 4)
    fake = FakeCommit()
    fake.gate = threading.Event()
    gc = GroupCommitter(fake)
    results = {}
    leader = threading.Thread(target=lambda: results.__setitem__(0, gc.submit(Request(0))))
    leader.start()
    assert fake.entered.wait(10)
    followers = [threading.Thread(target=lambda i=i: results.__setitem__(i, gc.submit(Request(i))))
                 for i in range(1, 11)]
    for t in followers:
        t.start()
    wait_queued(gc, 10)
    fake.gate.set()
    for t in [leader, *followers]:
        t.join(10)
        assert not t.is_alive()
    assert results == {i: 2 * i for i in range(11)}
    assert max(len(b) for b in fake.batches) <= 4
    assert sorted(p for b in fake.batches for p in b) == list(range(11))


def test_a_leader_commits_what_queued_meanwhile_before_it_returns():
    """The batch queued behind a leader's commit is committed by the same thread, with no
    hand-off (a thread wake-up and a GIL switch) in between, and every writer answered."""
    commit = GatedCommit()
    gc = GroupCommitter(commit, lead_rounds=2)
    first = threading.Thread(name="T-first", target=gc.submit, args=(Request(0),))
    first.start()
    assert commit.entered[0].wait(10)
    followers = [threading.Thread(target=gc.submit, args=(Request(i),)) for i in range(1, 4)]
    for t in followers:
        t.start()
    wait_queued(gc, 3)
    commit.release[0].set()
    for t in [first, *followers]:
        t.join(10)
        assert not t.is_alive()
    assert commit.threads == [("T-first", [0]), ("T-first", [1, 2, 3])]
    assert gc._busy is False and gc._queue == []


def test_a_leader_hands_off_after_lead_rounds_batches():
    """Its own caller waits for at most ``lead_rounds`` batches: then the first request
    still queued leads, in its own thread."""
    commit = GatedCommit(gated=(0, 1))
    entered, release = commit.entered, commit.release
    gc = GroupCommitter(commit, lead_rounds=2)
    threads = {0: threading.Thread(name="T0", target=gc.submit, args=(Request(0),))}
    threads[0].start()
    assert entered[0].wait(10)
    threads[1] = threading.Thread(name="T1", target=gc.submit, args=(Request(1),))
    threads[1].start()
    wait_queued(gc, 1)
    release[0].set()
    assert entered[1].wait(10)  # T0 commits the second batch too
    threads[2] = threading.Thread(name="T2", target=gc.submit, args=(Request(2),))
    threads[2].start()
    wait_queued(gc, 1)
    release[1].set()
    for t in threads.values():
        t.join(10)
        assert not t.is_alive()
    assert commit.threads == [("T0", [0]), ("T0", [1]), ("T2", [2])]


def test_batches_are_bounded_in_bytes_and_a_large_request_commits_alone():
    """Issue 11 #9: one oversized request must not make its neighbours' commit fail."""
    fake = FakeCommit()
    fake.gate = threading.Event()
    gc = GroupCommitter(fake, max_batch_bytes=100)
    results = {}
    leader = threading.Thread(target=lambda: results.__setitem__(0, gc.submit(Request(0, 10))))
    leader.start()
    assert fake.entered.wait(10)
    sizes = {1: 60, 2: 60, 3: 500, 4: 10, 5: 30}
    followers = []
    for i, size in sizes.items():  # queued in this order
        t = threading.Thread(target=lambda i=i, size=size: results.__setitem__(
            i, gc.submit(Request(i, size))))
        t.start()
        followers.append(t)
        wait_queued(gc, i)
    fake.gate.set()
    for t in [leader, *followers]:
        t.join(10)
        assert not t.is_alive()
    assert results == {i: 2 * i for i in range(6)}
    assert fake.batches == [[0], [1], [2], [3], [4, 5]]  # every batch <= 100 bytes but 3's


def test_the_main_thread_never_leads_a_batch():
    """Issue 11 #1: signal handlers run in the main thread; it must not commit for others."""
    committers = []
    gc = GroupCommitter(lambda batch: committers.append(threading.current_thread()))
    assert threading.current_thread() is threading.main_thread()
    gc.submit(Request(1))
    gc.submit(Request(2))
    assert len(committers) == 2
    assert all(t is not threading.main_thread() for t in committers)
    gc.stop()


def test_a_leader_that_fails_to_take_the_next_batch_passes_the_lead_on():
    """An error between two batches (a MemoryError while taking the next) reaches the
    leader's caller; the request it had taken off the queue still commits, in its own
    thread, instead of waiting for ever."""
    commit = GatedCommit()
    gc = GroupCommitter(commit, lead_rounds=4)
    take = gc._take
    calls = []

    def failing_take(batch):
        calls.append(len(calls))
        if len(calls) == 2:  # the leader's second batch
            raise MemoryError
        return take(batch)

    gc._take = failing_take
    outcomes = {}

    def submit(i):
        try:
            outcomes[i] = gc.submit(Request(i))
        except MemoryError as e:
            outcomes[i] = e

    first = threading.Thread(name="T0", target=submit, args=(0,), daemon=True)
    first.start()
    assert commit.entered[0].wait(10)
    second = threading.Thread(name="T1", target=submit, args=(1,), daemon=True)
    second.start()
    wait_queued(gc, 1)
    commit.release[0].set()
    for t in (first, second):
        t.join(10)
        assert not t.is_alive(), "a submitter hung"
    assert isinstance(outcomes[0], MemoryError) and outcomes[1] == 1
    assert commit.threads == [("T0", [0]), ("T1", [1])]
    assert gc._busy is False and gc._queue == []
