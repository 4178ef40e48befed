"""The bank workload of the real-node simulator (``python -m kvstore.sim --bank``).

Clients move money between accounts spread over the shards and audit the total,
each as a transaction of ``kvstore.client`` itself: a ``ClusterTxn`` whose plans
(``get_plan``, ``commit_plan``: linearizable reads with revisions, then one
``OP_TXN`` entry on one shard or two-phase commit across shards, TxnPrepare to
each participant shard's leader, then ``OP_DECIDE`` to the coordinator shard's)
this module drives over the simulated network, as ``run_plan`` drives them over
ZeroMQ. A transfer that conflicts is retried as ``run_transaction`` retries
it: after ``LOCKING_AFTER_CONFLICTS`` losses it locks its keys first
(``locking_read``). Only the I/O is the simulator's (``BankClient``: sessions,
floors, redirects, ``LOCKED`` retried as a new write, resends, giving up as
``Unavailable`` in the fault phase); the transaction logic is the client's.

The client's two sources of entropy, a transaction id (``os.urandom``) and its
deadline (``time.time()``), are taken from the seed's generator and the
simulated clock while a plan steps (``client_entropy``), so that a seed replays
exactly.

Checks (``Ledger``):

- after every step where a read returns: no read sees a value a transfer wrote
  whose abort was recorded (a dirty read);
- every audit that commits saw the conserved total (its reads are validated at
  commit, so they are one cut);
- at the end, once quiet: the accounts hold the total; and every transfer was
  applied atomically and durably: each value a transfer wrote is tagged with
  it, every writer reads what it overwrites, so a transfer's write is *seen*
  (read by someone, or the final value) iff it was applied. A committed
  transfer's writes are all seen; an aborted one's none; one whose outcome the
  client does not know (it gave up), all or none.
"""

from __future__ import annotations

import contextlib
import types

from kvstore.client import txn as client_module
from kvstore.client.txn import ClusterTxn, Detached, lock_keys_for
from kvstore.commands import LOCKED
from kvstore.errors import KVError, TransactionConflict, Unavailable
from kvstore.sharding import shard_of
from kvstore.transport import wire
from kvstore.transport.sockets import CLIENT

INITIAL_BALANCE = 100
#: a transfer that conflicts is tried this many times in all (``run_transaction``'s retries)
ATTEMPTS = 4
LOCKED_BACKOFF_TICKS = 1


def account(i: int) -> bytes:
    return b"acct-%d" % i


def encode_balance(balance: int, tag: int) -> bytes:
    return b"%d:%d" % (balance, tag)


def decode_balance(value: bytes | None) -> tuple:
    """(balance, tag of the transfer that wrote it; 0: the initial balance)."""
    if value is None:
        return INITIAL_BALANCE, 0
    balance, tag = value.split(b":")
    return int(balance), int(tag)


class _Topology:
    """What a ``ClusterTxn`` asks of its ``ClusterKV``: the shard of a key."""

    def __init__(self, nshards: int) -> None:
        self.nshards = nshards

    def _shard(self, key: bytes) -> int:
        return 0 if self.nshards == 1 else shard_of(key, self.nshards)

    def _core_check(self) -> None:
        pass


@contextlib.contextmanager
def client_entropy(sim):
    """The client module's transaction ids and deadlines from the seed and the simulated
    clock, for the duration of one step of a plan (the simulation has no threads)."""
    saved_os, saved_deadline = client_module.os, client_module._deadline_ms
    client_module.os = types.SimpleNamespace(urandom=sim.rng.randbytes)
    client_module._deadline_ms = lambda: int(
        (sim.clock.time() + client_module.TXN_DEADLINE_SECONDS) * 1000)
    try:
        yield
    finally:
        client_module.os, client_module._deadline_ms = saved_os, saved_deadline


class Ledger:
    """What the bank's clients did and saw, and the checks on it."""

    def __init__(self, sim, accounts: int) -> None:
        self.sim = sim
        self.keys = [account(i) for i in range(accounts)]
        self.total = INITIAL_BALANCE * accounts
        self.next_tag = 0
        self.writes: dict = {}  # tag -> {key: value} a transfer attempt writes
        self.outcome: dict = {}  # tag -> "committed" | "aborted" | "unknown"
        self.seen: set = set()  # (key, tag) some read returned
        self.audits = 0
        self.committed = 0

    def new_tag(self) -> int:
        self.next_tag += 1
        return self.next_tag

    def read(self, key: bytes, value) -> None:
        """A read returned ``value`` of ``key``: a dirty read fails at once."""
        if not key.startswith(b"acct-"):
            return
        _balance, tag = decode_balance(value)
        self.seen.add((key, tag))
        if self.outcome.get(tag) == "aborted":
            self.sim.fail(f"bank: a read of {key!r} returned {value!r}, written by transfer {tag} "
                          f"whose abort was recorded (a dirty read)")

    def audited(self, values: dict) -> None:
        total = sum(decode_balance(v)[0] for v in values.values())
        self.audits += 1
        if total != self.total:
            self.sim.fail(f"bank: an audit committed with the accounts holding {total}, not "
                          f"{self.total}: {dict(sorted(values.items()))}")

    def finished(self, tag: int, outcome: str) -> None:
        self.outcome[tag] = outcome
        self.committed += outcome == "committed"
        if outcome == "aborted":
            for key in self.writes[tag]:
                if (key, tag) in self.seen:
                    self.sim.fail(f"bank: transfer {tag} was aborted, yet its write of {key!r} "
                                  f"was read")

    def check_end(self, final: dict) -> None:
        """``final``: every account's value once the cluster is quiet."""
        for key, value in final.items():
            self.read(key, value)
        total = sum(decode_balance(v)[0] for v in final.values())
        if total != self.total:
            self.sim.fail(f"bank: the accounts hold {total} at the end, not {self.total}")
        for tag, writes in sorted(self.writes.items()):
            outcome = self.outcome.get(tag, "unknown")
            seen = [(key, tag) in self.seen for key in sorted(writes)]
            if outcome == "committed" and not all(seen):
                self.sim.fail(f"bank: committed transfer {tag}'s writes {sorted(writes)} were "
                              f"applied as {seen} (a lost or partial commit)")
            if outcome == "unknown" and any(seen) and not all(seen):
                self.sim.fail(f"bank: transfer {tag} (outcome unknown to its client) was applied "
                              f"in part: {dict(zip(sorted(writes), seen))}")


class _Call:
    __slots__ = ("op", "shard", "payload", "seq", "target", "sent", "request_id", "answer",
                 "done", "detached", "retry_at", "started")

    def __init__(self, op, shard, payload, detached: bool) -> None:
        self.op, self.shard, self.payload = op, shard, payload
        self.seq = None
        self.target = None
        self.sent = None
        self.request_id = None
        self.answer = None
        self.done = False
        self.detached = detached
        self.retry_at = None
        self.started = None


class BankClient:
    """A process running transfers and audits, one at a time, through ``ClusterTxn`` plans."""

    def __init__(self, sim, index: int, ledger: Ledger) -> None:
        self.sim = sim
        self.index = index
        self.ledger = ledger
        self.identity = b"bank-%d" % index
        self.client_id = b"sim-bank-%d" % index
        self.topology = _Topology(sim.config.shards)
        # most clients commit across shards in one round, some in two (as during an
        # upgrade): both kinds meet on the same keys and in the same resolvers
        self.topology.one_round_commit = sim.rng.random() < 0.75
        self.seq = 0
        self.request_ids = 0
        self.leaders: dict = {}  # shard -> the node believed to lead it
        self.calls: dict = {}  # request id -> _Call in flight
        self.batch: list = []  # the calls of the plan's current batch
        self.op = None  # the transaction in flight: a dict, or None
        self.final: dict | None = None

    # -- the workload ------------------------------------------------------------------------

    def on_tick(self, may_start: bool) -> None:
        sim, c = self.sim, self.sim.config
        for call in list(self.calls.values()):
            if call.done or self.calls.get(call.request_id) is not call:
                continue  # answered while this loop ran
            if sim.phase == "faults" and sim.now - call.started > c.client_give_up_ticks:
                self.answer(call, Unavailable("the simulated client gave up"))
            elif call.retry_at is not None:
                if sim.now >= call.retry_at:
                    call.retry_at = None
                    self.send(call)
            elif call.sent is not None and sim.now - call.sent >= c.client_retry_ticks:
                call.target = None
                self.send(call)
        if self.op is None and may_start and sim.rng.random() < 0.3:
            self.begin("audit" if sim.rng.random() < 0.25 else "transfer")

    def begin(self, kind: str, attempt: int = 0, previous=None) -> None:
        sim, ledger = self.sim, self.ledger
        txn = ClusterTxn(self.topology, lock_keys_for(previous, attempt))
        txn.__enter__()
        op = {"kind": kind, "txn": txn, "attempt": attempt, "call": sim.now, "tag": None}
        if kind == "transfer":
            a, b = sim.rng.sample(ledger.keys, 2)
            op["tag"] = ledger.new_tag()
            op["plan"] = self.transfer(txn, a, b, sim.rng.randint(1, 10), op["tag"])
        elif kind == "audit":
            op["plan"] = self.audit(txn)
        else:  # the final read of every account, once quiet
            op["plan"] = self.read_all(txn)
        self.op = op
        self.step(None)

    def transfer(self, txn: ClusterTxn, a: bytes, b: bytes, amount: int, tag: int):
        balance_a, _ = decode_balance((yield from txn.get_plan(a)))
        balance_b, _ = decode_balance((yield from txn.get_plan(b)))
        writes = {a: encode_balance(balance_a - amount, tag),
                  b: encode_balance(balance_b + amount, tag)}
        self.ledger.writes[tag] = writes
        for key, value in writes.items():
            txn.put(key, value)
        yield from txn.commit_plan()

    def audit(self, txn: ClusterTxn):
        values = {}
        for key in self.ledger.keys:
            values[key] = yield from txn.get_plan(key)
        yield from txn.commit_plan()
        return values

    def read_all(self, txn: ClusterTxn):
        values = {}
        for key in self.ledger.keys:
            values[key] = yield from txn.get_plan(key)
        return values

    def step(self, answers) -> None:
        """Hand ``answers`` to the plan; send the batch it yields, or finish."""
        op = self.op
        try:
            with client_entropy(self.sim):
                batch = next(op["plan"]) if answers is None else op["plan"].send(answers)
                while isinstance(batch, Detached):  # sent once, not awaited
                    for o, shard, payload in batch:
                        self.send(_Call(o, shard, payload, detached=True))
                    batch = op["plan"].send([None] * len(batch))
        except StopIteration as done:
            self.finish("committed", done.value)
            return
        except TransactionConflict:
            self.finish("aborted", None)
            return
        except KVError as e:
            self.finish("unknown", e)
            return
        self.batch = [_Call(o, shard, payload, detached=False) for o, shard, payload in batch]
        for call in self.batch:
            self.send(call)

    def finish(self, outcome: str, value) -> None:
        op, self.op = self.op, None
        sim, ledger, kind = self.sim, self.ledger, op["kind"]
        sim.log(f"bank {self.index}: {kind}{'' if op['tag'] is None else ' %d' % op['tag']} "
                f"(attempt {op['attempt']}) -> {outcome}")
        if kind == "transfer" and op["tag"] in ledger.writes:
            ledger.finished(op["tag"], outcome)
        elif kind == "audit" and outcome == "committed":
            ledger.audited(value)
        elif kind == "final":
            if outcome != "committed":
                sim.fail(f"bank: the final read of the accounts failed: {value!r}")
            self.final = value
            return
        if outcome == "aborted" and op["attempt"] + 1 < ATTEMPTS:
            self.begin(kind, op["attempt"] + 1, op["txn"])

    # -- the wire, as kvstore.client.ClientCore speaks it ---------------------------------------

    def floor(self) -> int:
        seqs = [c.seq for c in self.calls.values() if c.seq is not None]
        return min(seqs) if seqs else self.seq

    def send(self, call: _Call) -> None:
        sim = self.sim
        if call.op == wire.OP_WRITE and call.seq is None:
            self.seq += 1
            call.seq = self.seq
        if call.request_id is None:  # one id for all its attempts, as kvstore.client
            self.request_ids += 1
            call.request_id = self.request_ids
            self.calls[call.request_id] = call
        if call.target is None:
            leader = self.leaders.get(call.shard)
            call.target = leader if leader is not None and call.op != wire.OP_GET \
                else sim.rng.randrange(len(sim.nodes))
        call.sent = sim.now
        if call.started is None:
            call.started = sim.now
        if call.op == wire.OP_WRITE:
            args = [call.shard, self.client_id, call.seq, self.floor(), call.payload]
        else:
            args = call.payload
        frame = wire.encode_request(call.request_id, call.op, args)
        sim.send(("client", self.index), ("node", call.target), CLIENT, self.identity, frame)

    def on_frame(self, frame: bytes) -> None:
        for request_id, status, value in wire.decode(frame)[1]:
            call = self.calls.get(request_id)
            if call is None or call.done:
                continue  # an answer to an attempt already resent or given up
            self.on_reply(call, status, value)

    def on_reply(self, call: _Call, status: int, value) -> None:
        sim = self.sim
        if status in (wire.STATUS_OK, wire.STATUS_OK_FORWARDED):
            leader = call.target
            if status == wire.STATUS_OK_FORWARDED:
                value, leader = value
            if value == LOCKED and call.op == wire.OP_WRITE:
                call.seq = None  # a new write: the session keeps the first answer of a seq
                self.calls.pop(call.request_id, None)
                call.request_id = None
                self.retry_later(call)
                return
            if call.op != wire.OP_GET or status == wire.STATUS_OK_FORWARDED:
                self.leaders[call.shard] = leader
            self.answer(call, value)
        elif status == wire.STATUS_ERROR:
            sim.fail(f"bank {self.index}: a valid request refused: {call.op} {value!r}")
        elif status == wire.STATUS_NOT_LEADER and type(value) is int and value != call.target:
            self.leaders[call.shard] = call.target = value
            self.send(call)
        else:  # not the leader and no hint, or retry (a read of a LOCKED key, overloaded)
            self.leaders.pop(call.shard, None)
            call.target = None
            self.retry_later(call)

    def retry_later(self, call: _Call) -> None:
        call.sent = None
        call.retry_at = self.sim.now + LOCKED_BACKOFF_TICKS + self.sim.rng.randrange(3)
        if call.request_id is None:
            self.request_ids += 1
            call.request_id = self.request_ids
            self.calls[call.request_id] = call

    def answer(self, call: _Call, value) -> None:
        call.done = True
        self.calls.pop(call.request_id, None)
        if call.detached:
            return
        if not isinstance(value, BaseException):
            self.observe(call, value)
        call.answer = value
        if all(c.done for c in self.batch):
            self.step([c.answer for c in self.batch])

    def observe(self, call: _Call, value) -> None:
        """Note what a read showed of the accounts (a get, or a locking prepare's rows)."""
        if call.op == wire.OP_GET:
            self.ledger.read(call.payload[1], value[0])
        elif call.op == wire.OP_WRITE and type(value) is list:
            for key, found, _revision in value[1]:
                self.ledger.read(key, found)
