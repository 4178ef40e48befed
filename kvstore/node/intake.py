"""Request intake: what a node does with a client's request (or a peer's forward of one)
until it is answered. Part of ``Node`` (``kvstore.node.loop``, which mixes it in and owns
the order of side effects); nothing here touches a socket, the disk or the clock except
through the node's ports.

A request is checked and decoded here, once: a write by ``kvstore.commands.client_command``
(its typed command then waits in ``Node._decoded`` for apply), a read's arguments by
``_on_read``. A malformed one is answered ``InvalidArgument`` and changes nothing; one
for a shard another node leads is forwarded there (``_not_leader``); a write is queued
for its shard's replica, handed over bounded in bytes (``_feed_proposals``), and
answered once its command is applied (``_answer_writes``, called by the driver loop in
its "answer" step), a read once its read index is applied (``_serve_reads``).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvstore.commands import LOCKED, STALE, BackupFence, LeaseExpire, TwoPC, client_command, command_wire, encode_client_command, session_of
from kvstore.keys import MAX_CLUSTER_TXN_SIZE, MAX_COMMAND_BYTES, check_key
from kvstore.machine.fence import bound_fence
from kvstore.machine.twopc import bound_client_2pc
from kvstore.node.stats import OP_INDEX
from kvstore.paxos.replica import NotLeader
from kvstore.sharding import shard_of
from kvstore.transport import wire
from kvstore.txn import TxnPrepare

#: A backup's read point requests (``kvstore.node.backups``).
BACKUP_OPS = (wire.OP_BACKUP_OPEN, wire.OP_BACKUP_PAGE, wire.OP_BACKUP_CLOSE)
#: Requests a node keeps waiting at most; beyond, new ones are told to retry.
WAITING_MAX = 100_000
#: A waiting write or read older than this is forgotten (its client has long retried).
WAITING_EXPIRE_SECONDS = 60.0
#: Bytes of client commands handed to one replica per loop turn at most (~ one entry).
PROPOSE_BYTES_PER_TURN = 4 * 1024 * 1024
#: Bytes of commands a leader keeps proposed but uncommitted per shard at most: a new
#: leader's Promises carry them all, and must fit a 64 MiB frame.
UNCOMMITTED_BYTES_MAX = 24 * 1024 * 1024


@dataclass(slots=True)
class WaitingWrite:
    """A client write proposed here, answered once its command is applied (or failed)."""

    identity: object  # a client's routing id, ("peer", index) or ("self", token)
    request_id: int
    shard: int
    since: float  # monotonic; forgotten after WAITING_EXPIRE_SECONDS
    want_revision: bool = False  # answer [result, revision] (OP_WRITE's sixth argument)


@dataclass(slots=True)
class WaitingRead:
    """A read waiting for its read index to be applied here."""

    identity: object
    request_id: int
    shard: int
    since: float
    op: str  # wire.OP_GET or wire.OP_SCAN
    args: list  # as the request carried them, checked


@dataclass(slots=True)
class Forwarded:
    """A request forwarded to the shard's leader: whom to give its answer."""

    identity: object
    request_id: int
    since: float
    to: int  # the peer it was forwarded to: only its answer counts
    op: str  # counted (``NodeStats``) when its answer comes back


class Intake:
    """Request intake, a part of ``Node`` (the module docstring)."""

    def _on_request(self, identity: bytes, request_id: int, op: str, args: list) -> None:
        if self._stopping:
            self.stats.count(op, wire.STATUS_RETRY)
            self._reply(identity, request_id, wire.STATUS_RETRY, "stopping")
            return
        try:
            if op == wire.OP_HELLO or op == wire.OP_STATUS:
                self.stats.count(op, wire.STATUS_OK)
                self._reply(identity, request_id, wire.STATUS_OK, self.status())
                return
            if op == wire.OP_WATCH:  # bounded on its own (kvstore.node.watching)
                self._on_watch(identity, request_id, args)
                return
            if op == wire.OP_MEMBER:  # a few at a time (kvstore.node.membership)
                self._on_member(identity, request_id, args)
                return
            if op in BACKUP_OPS:  # bounded on its own (kvstore.node.backups)
                self._on_backup(identity, request_id, op, args)
                return
            if len(self.waiting_writes) + len(self.waiting_reads) >= WAITING_MAX:
                self.stats.count(op, wire.STATUS_RETRY)
                self._reply(identity, request_id, wire.STATUS_RETRY, "overloaded")
                return
            if op == wire.OP_WRITE:
                self._on_write(identity, request_id, args)
            elif op == wire.OP_DECIDE:
                self._on_decide(identity, request_id, args)
            else:
                self._on_read(identity, request_id, op, args)
        except (ValueError, TypeError) as e:
            name = type(e).__name__ if type(e).__name__ == "InvalidArgument" else "InvalidArgument"
            self.stats.count(op, wire.STATUS_ERROR)
            self._reply(identity, request_id, wire.STATUS_ERROR, [name, str(e)[:500]])

    def _shard_arg(self, v) -> int:
        if type(v) is not int or not 0 <= v < self.nshards:
            raise ValueError(f"no shard {v!r} (this cluster has {self.nshards})")
        return v

    def _not_leader(self, identity, request_id: int, op: str, args: list, hint) -> None:
        """Not the shard's leader: forward a client's request to the leader this node
        knows (its answer comes back through here, naming the leader so the client goes
        straight there next time); a forwarded request is never forwarded again."""
        forwardable = type(identity) is bytes or identity[0] == "self"
        if forwardable and hint is not None and hint != self.index:
            forward_id = next(self._tokens)
            self._forwarded[forward_id] = Forwarded(identity, request_id, self.clock.monotonic(),
                                                    hint, op)
            self._forward_out[hint].append((forward_id, op, args))
            return
        self.stats.count(op, wire.STATUS_NOT_LEADER)
        self._reply(identity, request_id, wire.STATUS_NOT_LEADER, hint)

    def _on_forwarded(self, frm: int, replies: list) -> None:
        for forward_id, status, value in replies:
            w = self._forwarded.get(forward_id)
            if w is None or w.to != frm:
                continue  # not an answer to a request this incarnation sent that peer
            del self._forwarded[forward_id]
            if status == wire.STATUS_OK:
                self._timed(w.op, w.since)
                self.stats.count(w.op, wire.STATUS_OK_FORWARDED)
                self._reply(w.identity, w.request_id, wire.STATUS_OK_FORWARDED, [value, frm])
            else:
                self.stats.count(w.op, status)  # one of wire.STATUSES (wire.decode checked)
                self._reply(w.identity, w.request_id, status, value)

    def _timed(self, op: str, since: float) -> None:
        """A request answered after a wait (a forward): its latency observed."""
        latency = self.stats.latency.get(op)
        if latency is not None:
            latency.observe(self.clock.monotonic() - since)

    def _check_keys_in_shard(self, shard: int, keys) -> None:
        if self.nshards == 1:
            return
        for key in keys:
            if shard_of(key, self.nshards) != shard:
                raise ValueError(f"key {key[:40]!r} belongs to shard {shard_of(key, self.nshards)}, "
                                 f"not {shard}")

    def _on_write(self, identity: bytes, request_id: int, args: list) -> None:
        if len(args) == 6:
            want_revision = args[5]
            if type(want_revision) is not bool:
                raise ValueError("a write's want_revision is a bool")
        elif len(args) == 5:
            want_revision = False
        else:
            raise ValueError("write takes [shard, client_id, seq, floor, command(, want_revision)]")
        shard = self._shard_arg(args[0])
        write = client_command(*args[1:5])  # decoded, checked and typed: once, here
        command = write.command
        if type(command) is TwoPC:
            # a client's TxnPrepare bounded (its deadline cut to this node's clock + a cap);
            # a decision or a resolve only from this node's own writes, or a peer's
            # (forwarded after that peer checked it): never from a client
            bounded = bound_client_2pc(command, shard, self.nshards,
                                       int(self.clock.time() * 1000), _internal(identity))
            if bounded is not command:
                write = write._replace(command=bounded)
            if type(bounded.entry) is TxnPrepare:
                self.stats.txn_prepares += 1
        elif type(command) is BackupFence:  # it lapses by this node's clock at the latest
            write = write._replace(command=bound_fence(command, int(self.clock.time() * 1000)))
        elif type(command) is LeaseExpire and not _internal(identity):
            raise ValueError("a LeaseExpire is written by the shard leader only (revoke a "
                             "lease with LeaseRevoke)")
        self._check_keys_in_shard(shard, write.command.keys())
        r = self.replicas[shard]
        if not r.is_leader:
            self._not_leader(identity, request_id, wire.OP_WRITE,
                             _write_args(shard, write, want_revision), r.leader_hint)
            return
        raw = encode_client_command(*write)
        if len(raw) > MAX_COMMAND_BYTES:
            raise ValueError(f"a write command of {len(raw)} bytes is over the cluster's limit "
                             f"of {MAX_COMMAND_BYTES} (a transaction writes at most "
                             f"MAX_CLUSTER_TXN_SIZE = {MAX_CLUSTER_TXN_SIZE} bytes)")
        self._decoded.add(raw, write)
        self._proposals[shard].append((raw, identity, request_id, shard, write))
        self.waiting_writes[(write.client_id, write.seq)] = WaitingWrite(
            identity, request_id, shard, self.clock.monotonic(), want_revision)

    def _feed_proposals(self) -> None:
        """Hand queued writes to the replicas, bounded in bytes.

        The core cuts entries by command count only; a node bounds their bytes
        so that no entry, Accept or Promise outgrows a frame (``MAXMSGSIZE``,
        which a peer enforces by dropping the connection, so an oversized
        message would stall the shard for good): commands go to a replica only
        when its own queue is empty, at most ``PROPOSE_BYTES_PER_TURN`` per
        turn (one entry), a command larger than that in an entry of its own
        (at most ``MAX_COMMAND_BYTES``, checked at intake), and while less than
        ``UNCOMMITTED_BYTES_MAX`` it leads with are still uncommitted.
        """
        for shard, queue in enumerate(self._proposals):
            if not queue:
                continue
            r = self.replicas[shard]
            if not r.is_leader:
                while queue:
                    raw, identity, request_id, _shard, write = queue.popleft()
                    self._decoded.forget(raw)
                    w = self.waiting_writes.pop((write.client_id, write.seq), None)
                    self._not_leader(identity, request_id, wire.OP_WRITE,
                                     _write_args(shard, write, w is not None and w.want_revision),
                                     r.leader_hint)
                continue
            if r.pending_commands:
                continue
            fed = 0
            while queue and self._uncommitted_bytes[shard] < UNCOMMITTED_BYTES_MAX:
                if fed and fed + len(queue[0][0]) > PROPOSE_BYTES_PER_TURN:
                    break  # the next entry's
                raw = queue.popleft()[0]
                r.propose(raw)
                fed += len(raw)
                self._uncommitted_bytes[shard] += len(raw)

    def _on_read(self, identity: bytes, request_id: int, op: str, args: list) -> None:
        if op == wire.OP_GET:
            if len(args) != 3:
                raise ValueError("get takes [shard, key, with_revision]")
            check_key(args[1])
            if type(args[1]) is not bytes:
                raise ValueError("key must be bytes")
        elif op == wire.OP_SCAN:
            if len(args) != 5:
                raise ValueError("scan takes [shard, lo, hi, limit, with_revision]")
            lo, hi, limit = args[1], args[2], args[3]
            if type(lo) is not bytes or (hi is not None and type(hi) is not bytes):
                raise ValueError("scan bounds must be bytes")
            if limit is not None and (type(limit) is not int or limit < 0):
                raise ValueError("scan limit must be an int >= 0")
        else:
            raise ValueError(f"unknown op {op!r}")
        shard = self._shard_arg(args[0])
        if op == wire.OP_GET:
            self._check_keys_in_shard(shard, (args[1],))
        token = next(self._tokens)
        try:
            self.replicas[shard].read(token)
        except NotLeader as e:
            self._not_leader(identity, request_id, op, args, e.leader_hint)
            return
        self.waiting_reads[token] = WaitingRead(identity, request_id, shard, self.clock.monotonic(),
                                                op, args)

    def _answer_writes(self, results: list) -> None:
        waiting = self.waiting_writes
        if not waiting:
            return
        now = self.clock.monotonic()
        latency = self.stats.latency[wire.OP_WRITE]
        ok = self.stats.requests[OP_INDEX[wire.OP_WRITE]]
        for _shard, slot, key, result in results:
            w = waiting.pop(key, None)
            if w is not None and result is not STALE:
                # the revision of the entry answering: a retried duplicate's is a later slot
                # than its first application, whose effect the state at it contains
                self._reply(w.identity, w.request_id, wire.STATUS_OK,
                            [result, slot + 1] if w.want_revision else result)
                ok[wire.STATUS_OK] += 1
                latency.observe(now - w.since)

    def _serve_reads(self, tokens: list) -> None:
        now = self.clock.monotonic()
        stats = self.stats
        for token in tokens:
            w = self.waiting_reads.pop(token, None)
            if w is None:
                continue
            identity, request_id, shard, op, args = w.identity, w.request_id, w.shard, w.op, w.args
            client = type(identity) is bytes
            if client and not self.sockets.reply_room(identity):
                continue  # a client that does not read its replies: cut off (counted)
            if op == wire.OP_GET:
                found = self.storage.get(shard, args[1])
                if found is LOCKED:  # a prepared transaction writes it: its value may change
                    stats.count(op, wire.STATUS_RETRY)
                    self._reply(identity, request_id, wire.STATUS_RETRY, LOCKED)
                    continue
                result = [found[0], found[1]] if args[2] else found[0]
                size = len(found[0] or b"")
            else:
                rows = self.storage.scan(shard, args[1], args[2], args[3])
                if rows is LOCKED:
                    stats.count(op, wire.STATUS_RETRY)
                    self._reply(identity, request_id, wire.STATUS_RETRY, LOCKED)
                    continue
                result = ([[k, v, rev] for k, v, rev in rows] if args[4]
                          else [[k, v] for k, v, _rev in rows])
                size = sum(len(k) + len(v) + 16 for k, v, _rev in rows)
            if client:
                self.sockets.charge(identity, size)
            self._reply(identity, request_id, wire.STATUS_OK, result)
            stats.count(op, wire.STATUS_OK)
            stats.latency[op].observe(now - w.since)

    def _answer_dropped(self, shard: int, rd) -> None:
        hint = self.replicas[shard].leader_hint
        status = wire.STATUS_NOT_LEADER if hint != self.index else wire.STATUS_RETRY
        value = hint if status == wire.STATUS_NOT_LEADER else "dropped"
        for raw in rd.dropped_commands:
            self._decoded.forget(raw)
            w = self.waiting_writes.pop(session_of(raw), None)
            if w is not None:
                self.stats.count(wire.OP_WRITE, status)
                self._reply(w.identity, w.request_id, status, value)
        for token in rd.dropped_reads:
            w = self.waiting_reads.pop(token, None)
            if w is not None:
                self.stats.count(w.op, status)
                self._reply(w.identity, w.request_id, status, value)

    def _fail_waiting_writes(self, shard: int, hint) -> None:
        """This node stopped leading ``shard``: its clients should retry at the new leader
        (a command already in the log may still be chosen; the retry is then answered
        from the session table, not applied twice)."""
        for raw, *_rest in self._proposals[shard]:
            self._decoded.forget(raw)
        self._proposals[shard].clear()  # their waiting entries are answered just below
        for key, w in list(self.waiting_writes.items()):
            if w.shard == shard:
                del self.waiting_writes[key]
                self.stats.count(wire.OP_WRITE, wire.STATUS_NOT_LEADER)
                self._reply(w.identity, w.request_id, wire.STATUS_NOT_LEADER, hint)
        self._fail_member_waits(shard, "the leader changed while the membership change was "
                                       "proposed")

    def _expire_waiting(self, now: float) -> None:
        self._last_expiry = now
        self._fail_member_waits(None, "the membership change has not taken effect yet")
        cutoff = now - WAITING_EXPIRE_SECONDS
        for table in (self.waiting_writes, self.waiting_reads, self._forwarded):
            for key in [k for k, w in table.items() if w.since < cutoff]:
                del table[key]


def _internal(identity) -> bool:
    """A request of this node's own (``("self", token)``) or forwarded by a peer
    (``("peer", index)``, checked by that peer when its client sent it)."""
    return type(identity) is tuple


def _write_args(shard: int, write, want_revision: bool = False) -> list:
    """A write's request arguments, as a client sends them (forwarded to the leader)."""
    args = [shard, write.client_id, write.seq, write.floor, command_wire(write.command)]
    if want_revision:
        args.append(True)
    return args
