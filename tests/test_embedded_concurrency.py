"""Threads racing on one embedded store: serializable transactions, atomic cas, group commit."""

from __future__ import annotations

import random
import threading

import pytest

import kvstore.errors as kvstore_errors
from kvstore import TransactionConflict

ACCOUNTS = [b"acct/%02d" % i for i in range(10)]
INITIAL = 1000


def run_threads(targets):
    errors = []

    def wrap(fn):
        def run():
            try:
                fn()
            except BaseException as e:  # reported by the test, not lost in a thread
                errors.append(e)
        return run

    threads = [threading.Thread(target=wrap(fn)) for fn in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
        assert not t.is_alive(), "a thread hung"
    assert errors == [], errors


def total(rows) -> int:
    return sum(int(v) for _, v in rows)


def test_transfers_conserve_the_sum(store, shards):
    db = store(shards=shards)
    for a in ACCOUNTS:
        db.put(a, str(INITIAL).encode())
    n_writers, transfers = 8, 60
    barrier = threading.Barrier(n_writers + 2)
    writers_done = threading.Event()
    committed = []
    sums_seen = []

    def writer(seed):
        rng = random.Random(seed)
        barrier.wait()
        for _ in range(transfers):
            src, dst = rng.sample(ACCOUNTS, 2)
            amount = rng.randint(1, 50)

            def transfer(txn):
                a, b = int(txn.get(src)), int(txn.get(dst))
                txn.put(src, str(a - amount).encode())
                txn.put(dst, str(b + amount).encode())
                return amount

            committed.append(db.run_transaction(transfer, retries=1000))

    def reader_by_scan():
        barrier.wait()
        while not writers_done.is_set():
            with db.transaction() as txn:
                sums_seen.append(total(txn.scan(b"acct/")))

    def reader_by_get():
        barrier.wait()
        while not writers_done.is_set():
            sums_seen.append(db.run_transaction(
                lambda txn: sum(int(txn.get(a)) for a in ACCOUNTS)))

    def writers():
        inner = [lambda s=s: writer(s) for s in range(n_writers)]
        run_threads(inner)
        writers_done.set()

    try:
        run_threads([writers, reader_by_scan, reader_by_get])
    finally:
        writers_done.set()
    assert len(committed) == n_writers * transfers
    assert sums_seen and set(sums_seen) == {INITIAL * len(ACCOUNTS)}
    assert total(db.scan(b"acct/")) == INITIAL * len(ACCOUNTS)
    db = store.reopen(db)
    assert total(db.scan(b"acct/")) == INITIAL * len(ACCOUNTS)


def test_lost_update_is_impossible(store, shards):
    """Read-modify-write increments through transactions never lose an increment."""
    db = store(shards=shards)
    db.put(b"n", b"0")
    n_threads, per_thread = 6, 40
    barrier = threading.Barrier(n_threads)
    conflicts = []

    def incr(txn):
        txn.put(b"n", str(int(txn.get(b"n")) + 1).encode())

    def worker():
        barrier.wait()
        for _ in range(per_thread):
            while True:
                try:
                    with db.transaction() as txn:
                        incr(txn)
                    break
                except TransactionConflict:
                    conflicts.append(1)

    run_threads([worker] * n_threads)
    assert db.get(b"n") == str(n_threads * per_thread).encode()


def test_write_skew_is_prevented(store, shards):
    """Two doctors on call: each goes off call only if the other is on. Serializable
    isolation forbids both going off; snapshot isolation would allow it."""
    db = store(shards=shards)
    for round_ in range(30):
        db.put(b"alice", b"on")
        db.put(b"bob", b"on")
        barrier = threading.Barrier(2)

        def go_off(me, other):
            def fn(txn):
                others = txn.get(other)
                barrier.wait()  # both have read before either commits
                if others == b"on":
                    txn.put(me, b"off")
            try:
                db.run_transaction(fn, retries=0)
            except TransactionConflict:
                pass

        def off(me, other):
            return lambda: go_off(me, other)

        try:
            run_threads([off(b"alice", b"bob"), off(b"bob", b"alice")])
        except threading.BrokenBarrierError:
            pytest.fail("barrier broken")
        assert (db.get(b"alice"), db.get(b"bob")) != (b"off", b"off"), round_


def test_concurrent_cas_increments_end_at_exact_count(store, shards):
    db = store(shards=shards)
    n_threads, per_thread = 8, 50
    barrier = threading.Barrier(n_threads)

    def worker():
        barrier.wait()
        done = 0
        while done < per_thread:
            current = db.get(b"counter")
            new = str(int(current or b"0") + 1).encode()
            if db.cas(b"counter", current, new):
                done += 1

    run_threads([worker] * n_threads)
    assert db.get(b"counter") == str(n_threads * per_thread).encode()


def test_group_commit_batches_concurrent_puts(store):
    db = store()
    n_threads, per_thread = 8, 100
    start = db.status()["shards"][0]["commit_index"]
    barrier = threading.Barrier(n_threads)

    def worker(i):
        barrier.wait()
        for j in range(per_thread):
            db.put(b"t%d/%03d" % (i, j), b"%d" % j)

    run_threads([lambda i=i: worker(i) for i in range(n_threads)])
    slots = db.status()["shards"][0]["commit_index"] - start
    puts = n_threads * per_thread
    assert len(db.scan(b"t")) == puts
    assert 0 < slots < puts, f"{slots} log slots for {puts} puts: no batching"


def test_concurrent_mixed_operations_across_shards_stay_consistent(store):
    """Threads each own a key range and run every kind of write; at the end each thread's
    own record of what it wrote matches the store."""
    db = store(shards=3)
    n_threads = 6
    barrier = threading.Barrier(n_threads)
    models = [dict() for _ in range(n_threads)]

    def worker(i):
        rng = random.Random(i)
        model = models[i]
        barrier.wait()
        for step in range(80):
            key = b"w%d/%d" % (i, rng.randrange(8))
            op = rng.randrange(4)
            if op == 0:
                value = b"%d" % step
                db.put(key, value)
                model[key] = value
            elif op == 1:
                assert db.delete(key) == (key in model)
                model.pop(key, None)
            elif op == 2:
                assert db.cas(key, model.get(key), b"c%d" % step)
                model[key] = b"c%d" % step
            else:
                with db.transaction() as txn:
                    assert dict(txn.scan(b"w%d/" % i)) == model
                    txn.put(key, b"t%d" % step)
                model[key] = b"t%d" % step

    run_threads([lambda i=i: worker(i) for i in range(n_threads)])
    for i in range(n_threads):
        assert dict(db.scan(b"w%d/" % i)) == models[i]


def test_close_while_threads_write(store):
    """Writers racing close() each end with a KVError (never another error or a hang),
    and every write acknowledged before the close is there after reopening."""
    db = store(shards=3)
    n_threads = 4
    barrier = threading.Barrier(n_threads + 1)
    acknowledged = [[] for _ in range(n_threads)]
    endings = []

    def worker(i):
        barrier.wait()
        n = 0
        while True:
            try:
                if i % 2:
                    db.put(b"w%d/%05d" % (i, n), b"v")
                else:
                    with db.transaction() as txn:
                        txn.get(b"w1/00000")
                        txn.put(b"w%d/%05d" % (i, n), b"v")
            except TransactionConflict:
                continue
            except kvstore_errors.KVError as e:
                endings.append(e)
                return
            acknowledged[i].append(n)
            n += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    barrier.wait()
    while sum(map(len, acknowledged)) < 200 and not endings:  # let them get going
        db.get(b"w1/00000")
    db.close()
    for t in threads:
        t.join(60)
        assert not t.is_alive(), "a writer hung on close"
    assert len(endings) == n_threads
    db = store(db.path)
    for i, indexes in enumerate(acknowledged):
        for n in indexes:
            assert db.get(b"w%d/%05d" % (i, n)) == b"v"


@pytest.mark.parametrize("how", ["get", "scan", "transaction"])
def test_a_write_is_not_read_before_it_is_durable(store, how):
    """A write is durable once the log's fdatasync returns. Stretch that moment (the
    record is written, its fdatasync held back): a reader must not see it, as a power
    cut could still take it back; it sees it once the fdatasync returned."""
    db = store()
    db.put(b"k", b"old")
    files = db._wal._files
    fdatasync = files.fdatasync
    syncing, release = threading.Event(), threading.Event()

    def slow_fdatasync(fd):
        syncing.set()
        assert release.wait(30)
        fdatasync(fd)

    files.fdatasync = slow_fdatasync
    read = {
        "get": lambda: db.get(b"k"),
        "scan": lambda: dict(db.scan(prefix=b"k"))[b"k"],
        "transaction": lambda: db.run_transaction(lambda t: t.get(b"k")),
    }[how]
    writer = threading.Thread(target=db.put, args=(b"k", b"new"))
    writer.start()
    try:
        assert syncing.wait(30)
        assert read() == b"old", "a reader saw a write that was not yet durable"
    finally:
        files.fdatasync = fdatasync
        release.set()
        writer.join(30)
    assert read() == b"new"
