"""A cluster backup inside the real-node simulator's bank runs: the cut under faults.

``BackupTaker`` runs ``kvstore.backup.cluster``'s protocol over the simulated network
while the bank's transfers cross shards and nodes crash, restart, lose their disks
and are cut apart: ``BackupFence`` on every shard, ``OP_BACKUP_OPEN`` on one node
(asked again while it answers RETRY), ``BackupUnfence`` on every shard, then every
shard's data rows page by page from that node. A backup whose fences did not all
still hold when lifted is thrown away, as the real client throws it away; one whose
node went away (a crash ends its read point) gives up.

The check, for every backup kept: the accounts in it hold the bank's total (a
transfer half in the cut moves money in or out of it), and every balance it shows
is recorded as read (``Ledger.read``: a value of a transfer whose abort was recorded
fails at once, and the end checks count it as applied, which it was). The wire (sessions,
redirects, resends) is ``BankClient``'s; calls to the read point's node stay on it.
"""

from __future__ import annotations

from kvstore import _native
from kvstore.commands import OP_BACKUP_FENCE, OP_BACKUP_UNFENCE
from kvstore.errors import KVError, Unavailable
from kvstore.sim.realbank import BankClient, _Call, decode_balance
from kvstore.transport import wire

#: How long a fence lasts if its backup never lifts it, in simulated seconds.
FENCE_SECONDS = 4.0
#: Ticks a backup waits for its read point (fence applied, prepared drained) at most.
OPEN_GIVE_UP_TICKS = 240
#: Bytes of rows per page (small: many pages, so faults land between them).
PAGE_BYTES = 64
#: Per tick, when idle: the chance that a backup starts.
START_RATE = 0.02


class BackupTaker(BankClient):
    """A process taking cluster backups, one at a time (the module docstring)."""

    def __init__(self, sim, index: int, ledger, rng) -> None:
        super().__init__(sim, index, ledger)
        self.identity = b"backup-%d" % index
        self.client_id = b"sim-backup-%d" % index
        self.rng = rng  # its own stream: the other clients' draws stay what they were
        self.plan = None
        self.kept = 0
        self.thrown_away = 0

    # -- the protocol ---------------------------------------------------------------------------

    def on_tick(self, may_start: bool) -> None:
        sim, c = self.sim, self.sim.config
        for call in list(self.calls.values()):
            if call.done or self.calls.get(call.request_id) is not call:
                continue
            limit = OPEN_GIVE_UP_TICKS if call.op == wire.OP_BACKUP_OPEN else c.client_give_up_ticks
            if sim.now - call.started > limit and (sim.phase == "faults"
                                                   or call.op != wire.OP_WRITE):
                self.answer(call, Unavailable("the simulated backup gave up"))
            elif call.retry_at is not None:
                if sim.now >= call.retry_at:
                    call.retry_at = None
                    self.send(call)
            elif call.sent is not None and sim.now - call.sent >= c.client_retry_ticks:
                if call.op == wire.OP_WRITE:
                    call.target = None  # a write may go to any node; the others stay on theirs
                self.send(call)
        if self.op is None and may_start and self.rng.random() < START_RATE:
            self.op = {"kind": "backup", "call": sim.now, "tag": None}
            self.plan = self.backup()
            self.advance(None)

    def backup(self):
        sim, n = self.sim, self.sim.config.shards
        fence_id = self.rng.randbytes(16)
        until_ms = int((sim.clock.time() + FENCE_SECONDS) * 1000)
        fenced = yield [self.write(s, [OP_BACKUP_FENCE, fence_id, until_ms]) for s in range(n)]
        node = self.rng.randrange(sim.config.nodes)
        opened = None
        if not any(isinstance(a, BaseException) for a in fenced):
            opened, = yield [self.at(node, wire.OP_BACKUP_OPEN, [fence_id])]
        lifted = yield [self.write(s, [OP_BACKUP_UNFENCE, fence_id]) for s in range(n)]
        if opened is None or isinstance(opened, BaseException):
            return "not opened"
        session, _revisions = opened
        if not all(a is True for a in lifted):
            yield [self.at(node, wire.OP_BACKUP_CLOSE, [session])]
            return "thrown away (a fence lapsed or was not lifted)"
        values = {}
        for shard in range(n):
            after, done = None, False
            while not done:
                page, = yield [self.at(node, wire.OP_BACKUP_PAGE,
                                       [session, shard, 0, after, PAGE_BYTES])]
                if isinstance(page, BaseException):
                    return "stream ended (its node went away)"
                rows, done = page
                for key, raw in rows:
                    if key.startswith(b"acct-"):
                        values[key] = _native.unpack_value(key, raw)
                after = rows[-1][0] if rows else after
        yield [self.at(node, wire.OP_BACKUP_CLOSE, [session])]
        self.check(values)
        return "kept"

    def check(self, values: dict) -> None:
        ledger = self.ledger
        for key in ledger.keys:
            ledger.read(key, values.get(key))
        total = sum(decode_balance(values.get(key))[0] for key in ledger.keys)
        if total != ledger.total:
            self.sim.fail(f"backup: the cut holds {total} in the accounts, not {ledger.total} "
                          f"(a transfer half in it): {dict(sorted(values.items()))}")

    def write(self, shard: int, command: list) -> _Call:
        return _Call(wire.OP_WRITE, shard, command, detached=False)

    def at(self, node: int, op: str, args: list) -> _Call:
        call = _Call(op, None, args, detached=False)
        call.target = node
        return call

    def advance(self, answers) -> None:
        try:
            batch = next(self.plan) if answers is None else self.plan.send(answers)
        except StopIteration as done:
            self.kept += done.value == "kept"
            self.thrown_away += done.value != "kept"
            self.sim.log(f"backup {self.index}: {done.value}")
            self.op = self.plan = None
            return
        self.batch = batch
        for call in batch:
            self.send(call)

    # -- BankClient's wire, with the plan above instead of transactions -------------------------

    def answer(self, call: _Call, value) -> None:
        call.done = True
        self.calls.pop(call.request_id, None)
        call.answer = value
        if self.batch and all(c.done for c in self.batch):
            self.advance([c.answer for c in self.batch])

    def on_reply(self, call: _Call, status: int, value) -> None:
        if call.op == wire.OP_WRITE:
            return super().on_reply(call, status, value)
        if status == wire.STATUS_OK:
            self.answer(call, value)
        elif status == wire.STATUS_RETRY:
            self.retry_later(call)  # the same node: the read point is its
        else:  # its read point is gone (the node restarted): this backup ends
            self.answer(call, KVError(f"{call.op} refused: {value!r}"[:200]))

    def retry_later(self, call: _Call) -> None:
        target = call.target
        super().retry_later(call)
        if call.op != wire.OP_WRITE:
            call.target = target
