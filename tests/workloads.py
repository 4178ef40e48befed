"""Client workloads for the real-process cluster tests, with what each must guarantee.

- ``BankWorkload``: transfers between accounts spread over the shards (most cross
  shards: two-phase commit) and audits that read every account in one transaction.
  Every audit that committed must see the conserved total; after everything, every
  acknowledged transfer is present, none is half-applied, none that nobody
  attempted is recorded (each transfer writes a record of itself in its transaction).
- ``RegisterWorkload``: get / put / cas / delete on a few keys; the history goes
  to the project's linearizability checker (``kvstore.sim.linearizability``), the
  final reads after a restart included, so an acknowledged write that was lost
  shows as a history no order explains.

- ``WatchWorkload``: a watcher of the register keys from revision 1, through
  everything the cluster goes through. Per shard the revisions it is given never go
  back; every acknowledged register write (each value is unique) reaches it exactly
  once, none twice.
- ``LeaseWorkload``: holders that take a lease, put keys under it, keep it alive a
  while, then die (their connection closed: no keep-alive from then on). A
  linearizable reader checks each key: never gone before the last keep-alive sent +
  TTL, never still there once TTL + one election timeout (+ slack) passed after the
  holder died.

All run in threads against a ``connect(timeout)`` factory (``LocalCluster.client``),
stop on ``stop()``, bounded; a failure that is not part of the contract
(``Unavailable`` is: the outcome is unknown) is collected, never raised in a thread.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter

import msgpack

import kvstore
from kvstore.sharding import shard_of
from kvstore.sim.linearizability import Operation, check_history

ACCOUNTS = [b"acct%02d" % i for i in range(9)]
INITIAL = 100


def stop_threads(stop_event: threading.Event, threads: list, join_seconds: float, what: str,
                 failures: list) -> None:
    """Tell a workload's ``threads`` to stop and join them within ``join_seconds`` in all;
    those still running then are a failure of the workload (``what`` names them)."""
    stop_event.set()
    deadline = time.monotonic() + join_seconds
    for t in threads:
        t.join(max(0.1, deadline - time.monotonic()))
    stuck = [t.name for t in threads if t.is_alive()]
    if stuck:
        failures.append(f"{what} still running {join_seconds} s after stop: {stuck}")


def wait_for(predicate, timeout: float, what: str, progress=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout} s ({progress()})")
        time.sleep(0.02)  # counting the workers' progress: polled, not awaited


class BankWorkload:
    """Cross-shard transfers and audits (the workload of ``test_cluster_bank``)."""

    def __init__(self, connect, transfer_threads: int = 3, auditors: int = 1,
                 client_timeout: float = 10.0) -> None:
        self.connect = connect
        self.client_timeout = client_timeout
        self.acked: list = []  # (record key, from, to, amount) of every transfer acknowledged
        self.unknown: list = []  # record keys of transfers whose outcome is unknown (Unavailable)
        self.audits: list = []  # totals seen by committed audits
        self.failures: list = []
        self.stop_event = threading.Event()
        self.threads = [threading.Thread(target=self._transfers, args=(w,), daemon=True)
                        for w in range(transfer_threads)]
        self.threads += [threading.Thread(target=self._auditor, daemon=True)
                         for _ in range(auditors)]

    @property
    def total(self) -> int:
        return INITIAL * len(ACCOUNTS)

    def setup(self, client) -> None:
        for a in ACCOUNTS:
            client.put(a, b"%d" % INITIAL)

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def stop(self, join_seconds: float = 60.0) -> None:
        stop_threads(self.stop_event, self.threads, join_seconds, "bank threads", self.failures)

    def progress(self) -> str:
        return (f"{len(self.acked)} transfers acknowledged, {len(self.unknown)} unknown, "
                f"{len(self.audits)} audits")

    def _transfers(self, w: int) -> None:
        rnd = random.Random(w)
        with self.connect(timeout=self.client_timeout) as c:
            i = 0
            while not self.stop_event.is_set():
                a, b = rnd.sample(ACCOUNTS, 2)
                amount = rnd.randint(1, 5)
                record = b"xfer/%d/%d" % (w, i)
                i += 1

                def move(t):
                    t.put(a, b"%d" % (int(t.get(a)) - amount))
                    t.put(b, b"%d" % (int(t.get(b)) + amount))
                    t.put(record, msgpack.packb([a, b, amount]))

                try:
                    c.run_transaction(move, retries=50)
                except kvstore.TransactionConflict:
                    continue  # nothing applied
                except kvstore.Unavailable:
                    self.unknown.append(record)
                    continue
                except BaseException as e:  # pragma: no cover - reported by problems()
                    self.failures.append(repr(e))
                    return
                self.acked.append((record, a, b, amount))

    def _auditor(self) -> None:
        with self.connect(timeout=self.client_timeout) as c:
            while not self.stop_event.is_set():
                try:
                    self.audits.append(c.run_transaction(
                        lambda t: sum(int(t.get(a)) for a in ACCOUNTS), retries=50))
                except (kvstore.TransactionConflict, kvstore.Unavailable):
                    continue
                except BaseException as e:  # pragma: no cover - reported by problems()
                    self.failures.append(repr(e))
                    return

    def problems(self) -> list:
        """What went wrong while it ran: unexpected errors, an audit that saw another total."""
        out = [f"a bank client failed: {f}" for f in self.failures]
        if not self.audits:
            out.append("no audit committed")
        elif set(self.audits) != {self.total}:
            out.append(f"an audit saw money created or lost: {sorted(set(self.audits))}")
        return out

    def final_problems(self, client) -> list:
        """Read back through ``client`` after everything (a restart): what does not hold."""
        balances = {a: int(client.get(a)) for a in ACCOUNTS}
        present = {k: msgpack.unpackb(v) for k, v in client.scan(b"xfer/")}
        out = []
        if sum(balances.values()) != self.total:
            out.append(f"the balances add up to {sum(balances.values())}, not {self.total}")
        lost = [r for r, *_ in self.acked if r not in present]
        if lost:
            out.append(f"{len(lost)} acknowledged transfers lost, e.g. {lost[:3]}")
        known = {r for r, *_ in self.acked} | set(self.unknown)
        if not set(present) <= known:
            out.append("a transfer nobody attempted is recorded")
        expected = {a: INITIAL for a in ACCOUNTS}
        for a, b, amount in present.values():
            expected[a] -= amount
            expected[b] += amount
        if balances != expected:
            out.append("a transfer is half-applied")
        return out


class RegisterWorkload:
    """Single-key operations whose history is checked for linearizability."""

    KINDS = ("get", "get", "put", "cas", "delete")

    def __init__(self, connect, keys: list, nshards: int, clients: int = 4,
                 client_timeout: float = 3.0, seed: int = 0) -> None:
        self.connect = connect
        self.keys = list(keys)
        self.nshards = nshards
        self.client_timeout = client_timeout
        self.seed = seed
        self.history: list = []
        self.failures: list = []
        self.writes_acked: Counter = Counter()  # shard -> acknowledged writes
        self._lock = threading.Lock()
        self._ids = iter(range(10_000_000))
        self.stop_event = threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(seed * 100 + n,), daemon=True)
                        for n in range(clients)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def stop(self, join_seconds: float = 30.0) -> None:
        stop_threads(self.stop_event, self.threads, join_seconds, "register threads",
                     self.failures)

    def shard(self, key: bytes) -> int:
        return shard_of(key, self.nshards)

    def _client(self, seed: int) -> None:
        rng = random.Random(seed)
        with self.connect(timeout=self.client_timeout) as c:
            cid = next(self._ids)
            n = 0
            while not self.stop_event.is_set():
                key = self.keys[rng.randrange(len(self.keys))]
                kind = self.KINDS[rng.randrange(len(self.KINDS))]
                n += 1
                value = b"%d-%d" % (seed, n)
                args = {"get": (), "put": (value,), "delete": (),
                        "cas": (rng.choice([None, b"%d-%d" % (seed, n - 1)]), value)}[kind]
                call = time.monotonic_ns()
                try:
                    if kind == "get":
                        result = c.get(key)
                    elif kind == "put":
                        result = c.put(key, value)
                    elif kind == "delete":
                        result = c.delete(key)
                    else:
                        result = c.cas(key, *args)
                    ret = time.monotonic_ns()
                except kvstore.Unavailable:
                    result, ret = None, None  # unknown outcome: open forever
                except BaseException as e:  # pragma: no cover - reported by check()
                    self.failures.append(f"{kind} {key!r}: {e!r}")
                    return
                with self._lock:
                    self.history.append(Operation(cid, key, kind, args, call, ret, result))
                    if ret is not None and kind != "get":
                        self.writes_acked[self.shard(key)] += 1
                if ret is None:
                    cid = next(self._ids)  # a client has one op in flight: continue as another

    def final_reads(self, client) -> None:
        """Read every key through ``client`` (after a restart): they join the history."""
        for key in self.keys:
            call = time.monotonic_ns()
            value = client.get(key)
            with self._lock:
                self.history.append(Operation(next(self._ids), key, "get", (), call,
                                              time.monotonic_ns(), value))

    def check(self):
        """The checker's result on the history (``.ok``, ``.key``, ``.explanation``)."""
        return check_history(self.history)


class WatchWorkload:
    """A watcher of ``prefix`` from revision 1 (``kvstore.connect``'s ``watch``), checked
    against the register writes that were acknowledged (``check``)."""

    def __init__(self, connect, prefix: bytes, client_timeout: float = 5.0) -> None:
        self.connect = connect
        self.prefix = prefix
        self.client_timeout = client_timeout
        self.failures: list = []
        self.seen: Counter = Counter()  # (key, value) of each put delivered -> times
        self.events = 0
        self.position: dict = {}
        self.last_revision: dict = {}  # shard -> revision of the last event delivered
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _watch(self) -> None:
        try:
            with self.connect(timeout=self.client_timeout) as c, \
                    c.watch(prefix=self.prefix, start_revision=1) as w:
                while not self.stop_event.is_set():
                    event = w.get(timeout=0.2)
                    self.position = dict(w.position)
                    if event is None:
                        continue
                    self.events += 1
                    last = self.last_revision.get(event.shard, 0)
                    if event.revision < last:
                        self.failures.append(f"shard {event.shard}: revision {event.revision} "
                                             f"after {last}")
                    self.last_revision[event.shard] = event.revision
                    if event.type == "put":
                        self.seen[(event.key, event.value)] += 1
        except BaseException as e:  # reported by check()
            self.failures.append(f"the watch ended: {e!r}")

    def caught_up(self, commits: list) -> bool:
        """Whether the watch has asked past every shard's commit point (revision = slot + 1)."""
        return all(self.position.get(s, 0) > commit + 1 for s, commit in enumerate(commits))

    def stop(self, join_seconds: float = 10.0) -> None:
        stop_threads(self.stop_event, [self.thread], join_seconds, "the watcher", self.failures)

    def check(self, history: list) -> list:
        """Problems: every acknowledged put or successful cas of the register history
        delivered exactly once; no value twice."""
        problems = list(self.failures)
        for op in history:
            if op.ret is None or op.kind not in ("put", "cas"):
                continue
            if op.kind == "cas" and (op.result is not True or op.args[1] is None):
                continue
            value = op.args[0] if op.kind == "put" else op.args[1]
            times = self.seen.get((op.key, value), 0)
            if times != 1:
                problems.append(f"the acknowledged write of {value!r} to {op.key!r} was "
                                f"delivered {times} times")
        problems += [f"{kv!r} delivered {n} times" for kv, n in self.seen.items() if n > 1]
        return problems[:20]


class LeaseWorkload:
    """Lease holders that die, and a linearizable reader that times their keys' end."""

    def __init__(self, connect, ttl: float, late_slack: float, holders: int = 2,
                 client_timeout: float = 3.0, seed: int = 0) -> None:
        self.connect = connect
        self.ttl = ttl
        self.late_slack = late_slack  # one election timeout, and the machine's slack
        self.client_timeout = client_timeout
        self.failures: list = []
        self.leases = 0
        self.expired_after: list = []  # seconds from the holder's death to the first absence
        self.stop_event = threading.Event()
        self.threads = [threading.Thread(target=self._holder, args=(seed * 100 + n, n),
                                         daemon=True) for n in range(holders)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def stop(self, join_seconds: float = 30.0) -> None:
        stop_threads(self.stop_event, self.threads, join_seconds, "lease holders",
                     self.failures)

    def _holder(self, seed: int, n: int) -> None:
        rng = random.Random(seed)
        try:
            with self.connect(timeout=self.client_timeout) as reader:
                generation = 0
                while not self.stop_event.is_set():
                    generation += 1
                    self._one_lease(reader, rng, b"lease%d-%d-" % (n, generation))
        except BaseException as e:  # reported by problems()
            self.failures.append(f"lease holder {n}: {e!r}")

    def _one_lease(self, reader, rng: random.Random, prefix: bytes) -> None:
        keys = [prefix + b"%d" % i for i in range(3)]  # over the shards
        holder = self.connect(timeout=self.client_timeout)
        # ``last_ok``: when the last refresh that was acknowledged (the grant, a keep-alive)
        # was sent: the lease's end is at least a TTL after it was applied, so after this
        last_ok = time.monotonic()
        try:
            lease = holder.lease(self.ttl)
            for key in keys:
                holder.put(key, key, lease=lease)
            alive_until = time.monotonic() + rng.uniform(0.2, 2.0)
            while time.monotonic() < alive_until and not self.stop_event.is_set():
                time.sleep(self.ttl / 4)  # the holder's own keep-alive schedule
                sent = time.monotonic()
                try:
                    lease.keepalive()
                    last_ok = sent
                except kvstore.Unavailable:
                    pass  # it may or may not have been applied: the bound keeps the last one
        except kvstore.LeaseExpired:
            if time.monotonic() < last_ok + self.ttl:
                self.failures.append(f"a keep-alive or put found the lease of {prefix!r} gone "
                                     f"{last_ok + self.ttl - time.monotonic():.3f} s before "
                                     f"its TTL from the last acknowledged keep-alive")
            holder.close()
            return
        except kvstore.Unavailable:
            holder.close()
            return  # a lease the cut cluster could not grant or fill: nothing to time
        holder.close()  # the holder dies: its keep-alive timer stops with the connection
        died = time.monotonic()
        self.leases += 1
        self._time_the_end(reader, keys, last_ok, died)

    def _time_the_end(self, reader, keys: list, last_ok: float, died: float) -> None:
        """Read the keys until gone: none absent before ``last_ok + ttl``; none present
        in a read begun after ``died + ttl + late_slack``."""
        late = died + self.ttl + self.late_slack
        pending = set(keys)
        while pending:
            if time.monotonic() > late + 30:
                self.failures.append(f"{sorted(pending)!r}: no read answered for 30 s")
                return
            for key in sorted(pending):
                call = time.monotonic()
                try:
                    value = reader.get(key)
                except kvstore.Unavailable:
                    continue
                ret = time.monotonic()
                if value is None:
                    if ret < last_ok + self.ttl:
                        self.failures.append(
                            f"{key!r} gone {last_ok + self.ttl - ret:.3f} s before its "
                            f"lease's TTL from the last acknowledged keep-alive")
                    self.expired_after.append(round(ret - died - self.ttl, 3))
                    pending.discard(key)
                elif call > late:
                    self.failures.append(f"{key!r} still readable {call - died:.3f} s after "
                                         f"its holder died (TTL {self.ttl} s + "
                                         f"{self.late_slack} s)")
                    pending.discard(key)
            if pending:
                time.sleep(0.02)  # reading again: the end is timed by the reads

    def problems(self) -> list:
        return self.failures[:20]
