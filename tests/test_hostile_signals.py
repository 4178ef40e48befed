"""Signals in the middle of writes (issue 11 #1).

A Ctrl-C, or a SIGALRM handler that raises, lands in the main thread between
any two of its bytecodes. The store must stay usable, the exception must reach
only the thread it interrupted, and an interrupted write is applied wholly or
not at all. Run in a child process, so a hang is a timeout here, not a stuck
test run.
"""

from __future__ import annotations

import json
import subprocess

from conftest import PYTHON, child_env

CHILD = r"""
import json, signal, sys, threading, time
import kvstore

path = sys.argv[1]
db = kvstore.open(path, shards=int(sys.argv[2]))
armed = [False]

def on_alarm(signum, frame):
    if armed[0]:
        armed[0] = False  # one interrupt per arming: the except below always runs whole
        raise KeyboardInterrupt

signal.signal(signal.SIGALRM, on_alarm)
stop = threading.Event()
acked = [0, 0, 0]
errors = []

def writer(i):
    n = 0
    try:
        while not stop.is_set():
            db.put(b"w%d/%06d" % (i, n), b"x" * 100)
            n += 1
            acked[i] = n
    except BaseException as e:  # the test fails on any of these
        errors.append(f"writer {i}: {e!r}")

threads = [threading.Thread(target=writer, args=(i,)) for i in range(3)]
for t in threads:
    t.start()

def both(n):
    def fn(txn):
        txn.put(b"a/%06d" % n, b"1")
        txn.put(b"b/%06d" % n, b"2")
    return fn

signal.setitimer(signal.ITIMER_REAL, 0.0003, 0.0003)
main_acked, interrupted, n = [], 0, 0
deadline = time.monotonic() + float(sys.argv[3])
while time.monotonic() < deadline:
    try:
        armed[0] = True
        if n % 2:
            db.run_transaction(both(n))
        else:
            db.put(b"a/%06d" % n, b"1")
            db.put(b"b/%06d" % n, b"2")
        armed[0] = False
        main_acked.append(n)
    except KeyboardInterrupt:
        interrupted += 1
    n += 1
signal.setitimer(signal.ITIMER_REAL, 0)
armed[0] = False
stop.set()
for t in threads:
    t.join(30)
hung = [t.name for t in threads if t.is_alive()]
db.put(b"after", b"still usable")
assert db.get(b"after") == b"still usable"
db.close()
print(json.dumps({"acked": acked, "errors": errors, "hung": hung, "main_acked": main_acked,
                  "attempts": n, "interrupted": interrupted}), flush=True)
"""


def run_child(path: str, shards: int, seconds: float) -> dict:
    proc = subprocess.run([PYTHON, "-c", CHILD, path, str(shards), str(seconds)],
                          capture_output=True, env=child_env(), timeout=90)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    return json.loads(proc.stdout.decode().splitlines()[-1])


def test_interrupts_in_the_main_thread_reach_it_alone_and_never_wedge_the_store(tmp_path, store):
    path = str(tmp_path / "kv")
    result = run_child(path, 1, 1.5)
    assert result["errors"] == [] and result["hung"] == []
    assert result["interrupted"] > 10, result  # the signals did land mid-write
    assert all(n > 0 for n in result["acked"])
    db = store(path)
    for i, count in enumerate(result["acked"]):
        assert len(db.scan(b"w%d/" % i)) >= count  # every acknowledged put is there
        assert db.get(b"w%d/%06d" % (i, count - 1)) == b"x" * 100
    for n in result["main_acked"]:
        assert db.get(b"a/%06d" % n) == b"1" and db.get(b"b/%06d" % n) == b"2"
    a_keys = {k[2:] for k, _ in db.scan(b"a/")}
    b_keys = {k[2:] for k, _ in db.scan(b"b/")}
    # An interrupted transaction is applied wholly or not at all (odd attempts were one).
    odd = lambda keys: {k for k in keys if int(k) % 2}  # noqa: E731
    assert odd(a_keys) == odd(b_keys)
    assert db.get(b"after") == b"still usable"


def test_interrupts_with_three_shards(tmp_path):
    result = run_child(str(tmp_path / "kv"), 3, 1.0)
    assert result["errors"] == [] and result["hung"] == []
    assert result["interrupted"] > 5


# Python runs a signal handler at a function's entry, after a C call returns, or in a
# blocking wait (and at a loop's back edge); an exception from it appears there. A
# profile function sees those points ("call", "c_return", "c_call" of a blocking call):
# raising KeyboardInterrupt from it at the n-th interrupts the main thread's write there.
INTERRUPTING = r"""
import faulthandler, inspect, json, os, sys, threading, time
faulthandler.dump_traceback_later(80, exit=True)  # a wedge: its stacks, then exit
import kvstore

BLOCKING = {"lock.acquire", "RLock.acquire", "SimpleQueue.get", "sleep"}
# A generator's "call" is also its close() (never a handler's point there): left out.
RESUMED = inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR


def interrupting_at(n):
    seen = [0]

    def profile(frame, event, arg):
        if (event == "call" and not frame.f_code.co_flags & RESUMED) or event == "c_return" or (
                event == "c_call" and getattr(arg, "__qualname__", "") in BLOCKING):
            seen[0] += 1
            if seen[0] == n:
                sys.setprofile(None)
                raise KeyboardInterrupt
    sys.setprofile(profile)
    return seen
"""

SWEEP = INTERRUPTING + r"""
db = kvstore.open(sys.argv[1])
db.put(b"k", b"v")
db.checkpoint()  # "k" in LMDB: a read takes an LMDB snapshot


def in_another_thread(fn, seconds=10.0):  # False: fn did not return in time (a wedge)
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    t.join(seconds)
    return not t.is_alive()


current = {}


def nothing(n):
    return None


def write(n):
    db.put(b"p/%d" % n, b"v")


def transaction(n):
    def both(txn):
        txn.put(b"a/%d" % n, b"1")
        txn.put(b"b/%d" % n, b"2")
    db.run_transaction(both)


def commit_in_flight(n):  # as while a checkpoint commits: a reader of it waits (await_durable)
    storage = db._storage
    storage._committing_id, storage.committing = 0, True

    def finish():
        storage.committing = False
        storage._commit_finished()
    timer = threading.Timer(0.002, finish)
    timer.start()
    return lambda: (timer.join(), finish())


def read(n):
    db.scan(b"k")


def watching(n):  # a watch, and another thread about to write what it waits for
    w = current["watch"] = db.watch(prefix=b"w/")
    writer = threading.Timer(0.002, db.put, (b"w/%d" % n, b"v"))
    writer.start()
    return lambda: (writer.join(), w.close())


def watch(n):
    current["watch"].get(timeout=10)


def stop_helper(n):  # this write starts the main thread's helper
    db._committer.stop()


# (case, set-up (uninterrupted; returns its clean-up or None), the interrupted call)
CASES = [("put, helper to start", stop_helper, write),
         ("transaction, helper to start", stop_helper, transaction),
         ("put, helper running", nothing, write),
         ("transaction, helper running", nothing, transaction),
         ("read during a commit", commit_in_flight, read),
         ("watch", watching, watch)]
report = {}
for case, set_up, action in CASES:
    interrupted, wrong = 0, []
    for n in range(1, 10000):
        clean_up = set_up(n)
        seen = interrupting_at(n)
        try:
            action(n)
            if seen[0] >= n:
                wrong.append(f"point {n}: the interrupt was swallowed")
        except KeyboardInterrupt:
            interrupted += 1
        except BaseException as e:
            wrong.append(f"point {n}: {e!r}")
        finally:
            sys.setprofile(None)
        if clean_up is not None and not in_another_thread(clean_up):
            wrong.append(f"point {n}: the case's clean-up hangs (a commit's or a watch's)")
        elif not in_another_thread(lambda: (db.put(b"other", b"%d" % n), db.checkpoint())):
            wrong.append(f"point {n}: a write and a checkpoint in another thread hang")
        if wrong and "hang" in wrong[-1]:  # wedged: report it, without waiting on the store
            report[case] = {"points": n, "interrupted": interrupted, "wrong": wrong}
            report["helpers left"] = 0
            print(json.dumps(report), flush=True)
            os._exit(0)
        db.put(b"after", b"%d" % n)  # still usable from the main thread too
        assert db.scan(b"after") == [(b"after", b"%d" % n)]
        a, b = db.get(b"a/%d" % n), db.get(b"b/%d" % n)
        if (a is None) != (b is None):
            wrong.append(f"point {n}: a transaction half applied")
        if seen[0] < n:  # this action ran whole without reaching point n: all swept
            break
    report[case] = {"points": n - 1, "interrupted": interrupted, "wrong": wrong}
db.close()
deadline = time.monotonic() + 20
left = [t for t in threading.enumerate() if t.name == "kvstore-commit"]
while left and time.monotonic() < deadline:  # helpers end once idle; none is stuck
    time.sleep(0.05)
    left = [t for t in threading.enumerate() if t.name == "kvstore-commit"]
report["helpers left"] = len(left)
print(json.dumps(report), flush=True)
"""


def test_an_interrupt_at_any_point_of_a_main_thread_call_reaches_it_alone(tmp_path):
    """Every point where a signal handler can raise in the main thread's put or
    transaction (its helper thread to start, or running), a read that waits for a
    commit in flight, a watch's wait, one at a time: the call raises KeyboardInterrupt
    (not another error), a write is applied wholly or not at all, and the store stays
    usable from other threads and this one; no helper thread is left stuck. (A CI run
    once hung: an interrupt in the helper's ``Thread.start`` made a put raise
    RuntimeError; a Condition's lock left held wedged every writer.)"""
    proc = subprocess.run([PYTHON, "-c", SWEEP, str(tmp_path / "kv")],
                          capture_output=True, env=child_env(), timeout=90)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    report = json.loads(proc.stdout.decode().splitlines()[-1])
    helpers_left = report.pop("helpers left")
    for case, result in report.items():
        assert result["wrong"] == [], (case, result)
        assert result["points"] > 10 and result["interrupted"] == result["points"], (case, result)
    assert helpers_left == 0  # a helper stuck in Thread.start, say
    assert proc.stderr == b"", proc.stderr.decode()[-3000:]


CLOSE_SWEEP = INTERRUPTING + r"""
path, wrong = sys.argv[1], []
for n in range(1, 10000):
    db = kvstore.open(path)
    db.put(b"k%d" % n, b"v")
    seen = interrupting_at(n)
    try:
        db.close()
    except KeyboardInterrupt:
        pass
    except BaseException as e:
        wrong.append(f"point {n}: {e!r}")
    finally:
        sys.setprofile(None)
    try:
        db.close()  # finishes what the interrupted one left
        with kvstore.open(path) as again:  # the directory was released
            assert again.get(b"k%d" % n) == b"v"
    except BaseException as e:
        wrong.append(f"point {n}, then: {e!r}")
        break
    if seen[0] < n:
        break
print(json.dumps({"points": n - 1, "wrong": wrong}), flush=True)
"""


def test_a_close_interrupted_at_any_point_is_finished_by_the_next(tmp_path):
    """close() interrupted at each point where a signal handler can raise, then called
    again: it finishes (the directory is released: the store opens again in this
    process, its writes there). Before, the second close() returned at once and the
    directory stayed locked; or it hung on the lease reaper's Condition lock."""
    proc = subprocess.run([PYTHON, "-c", CLOSE_SWEEP, str(tmp_path / "kv")],
                          capture_output=True, env=child_env(), timeout=90)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    report = json.loads(proc.stdout.decode().splitlines()[-1])
    assert report["wrong"] == [] and report["points"] > 50, report
