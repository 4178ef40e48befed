"""Snapshot transfer between Paxos replicas: a part of ``Replica`` (``kvstore.paxos.replica``
mixes it in). A leader sends a follower too far behind for its log the application's
snapshot in chunks, a window in flight past what the receiver acknowledged, resent
with backoff while nothing moves (``_SnapshotOut``); the receiver assembles the chunks
of one sender's one transfer in order (``_SnapshotIn``), checks the whole with
``Config.snapshot_ok`` and installs it through ``Ready.snapshot``. Pure: no I/O.
"""

from __future__ import annotations

from kvstore.paxos import messages as M
from kvstore.paxos.interface import FOLLOWER, LEADER, Snapshot
from kvstore.paxos.membership import unwrap_snapshot, wrap_snapshot
from kvstore.paxos.messages import Message


class _SnapshotOut:
    """A snapshot transfer to one receiver: a window of chunks in flight past ``acked``."""

    __slots__ = ("index", "data", "ballot", "acked", "sent", "progress_tick", "retry_tick", "backoff")

    def __init__(self, index: int, data: bytes, ballot: int, tick: int) -> None:
        self.index = index
        self.data = data
        self.ballot = ballot
        self.acked = 0  # bytes the receiver holds
        self.sent = 0  # bytes sent (acked <= sent)
        self.progress_tick = tick  # when ``acked`` last moved (or the transfer began)
        self.retry_tick = tick  # when the window was last (re)sent from ``acked``
        self.backoff = 1  # the resend interval's multiplier: doubles while nothing moves


class _SnapshotIn:
    """A snapshot transfer being received: the bytes held in order, a few chunks past them."""

    __slots__ = ("key", "buf", "ahead")

    def __init__(self, key: tuple) -> None:
        self.key = key  # (sender, index, size): chunks of one sender's one transfer only
        self.buf = bytearray()
        self.ahead: dict = {}  # offset -> chunk, received out of order (at most a window)


class SnapshotTransfer:
    """Snapshot transfer, a part of ``Replica`` (the module docstring)."""

    def _send_snapshot(self, to: int, ballot: int) -> None:
        if self.snapshot_index < 0 or self.snapshot_membership is None:
            return  # none, or one from before this epoch (whose voters we no longer know)
        out = self.snapshots_out.get(to)
        if out is not None and out.index == self.snapshot_index:
            return  # under way: its own timer resends
        data = wrap_snapshot(self.snapshot_membership, self.snapshot_data)
        self.snapshots_out[to] = _SnapshotOut(self.snapshot_index, data, ballot, self.ticks)
        self.snapshots_sent += 1
        self._pump_snapshot(to)

    def _pump_snapshot(self, to: int) -> None:
        """Send the chunks of the window past what was sent already."""
        out = self.snapshots_out[to]
        size = len(out.data)
        if size == 0:
            self._send(Message(M.SNAPSHOT, to, self.id, ballot=out.ballot, snapshot_index=out.index,
                               offset=0, size=0, data=b"", done=True))
            return
        step = max(1, self.config.snapshot_chunk_bytes)
        end = min(size, out.acked + self.config.snapshot_window_chunks * step)
        while out.sent < end:
            chunk = out.data[out.sent:out.sent + step]
            self._send(Message(M.SNAPSHOT, to, self.id, ballot=out.ballot, snapshot_index=out.index,
                               offset=out.sent, size=size, data=chunk, done=out.sent + len(chunk) >= size))
            out.sent += len(chunk)

    def _on_snapshot_ack(self, m: Message) -> None:
        out = self.snapshots_out.get(m.frm)
        if out is None or out.index != m.snapshot_index or m.size != len(out.data):
            return
        if m.offset >= len(out.data):
            del self.snapshots_out[m.frm]  # received whole (or not needed any more)
            return
        if m.offset > out.acked:
            out.acked = m.offset
            out.sent = max(out.sent, m.offset)
            out.progress_tick = out.retry_tick = self.ticks
            out.backoff = 1
        elif m.offset == 0 and out.acked > 0:
            out.acked = out.sent = 0  # the receiver holds none of it (it restarted): again
        else:
            return  # a duplicate or a late ack: the timer deals with a lost chunk
        self._pump_snapshot(m.frm)

    def _tick_snapshots(self) -> None:
        cfg = self.config
        for to, out in list(self.snapshots_out.items()):
            if self.ticks - out.progress_tick >= 10 * cfg.election_timeout_ticks or out.index != self.snapshot_index:
                del self.snapshots_out[to]
                continue
            wait = min(cfg.snapshot_resend_ticks * out.backoff, 2 * cfg.election_timeout_ticks)
            if self.ticks - out.retry_tick >= wait:
                out.retry_tick = self.ticks
                out.backoff = min(out.backoff * 2, 64)
                out.sent = out.acked  # go back N: from the last acknowledged offset
                self._pump_snapshot(to)

    def _ack_snapshot(self, m: Message, held: int) -> None:
        self._send(Message(M.SNAPSHOT_ACK, m.frm, self.id, ballot=m.ballot, snapshot_index=m.snapshot_index,
                           offset=held, size=m.size))

    def _on_snapshot(self, m: Message) -> None:
        # A snapshot holds only chosen values, so it is safe to install at any point above
        # the commit point, but only from a replica that holds them: the leader of the
        # ballot followed (``_ignored``), its content checked (``snapshot_ok``) before it
        # replaces anything. Any other sender, a stale ballot or a forged chunk is ignored.
        if self.role == LEADER or m.snapshot_index < 0 or m.size < 0:
            return  # a leader's tally counts from its own commit point; it never jumps
        stale = m.snapshot_index <= self.commit_index and not self.bugs.snapshot_backwards
        if stale:
            self._ack_snapshot(m, m.size)  # nothing more of it is needed here
            return
        key = (m.frm, m.snapshot_index, m.size)
        sin = self.snapshot_inbound
        # Chunks are joined only from one sender's one transfer: two nodes' snapshots of the
        # same index need not be the same bytes, and a late chunk of an older transfer must not
        # be spliced into a newer one.
        if sin is None or sin.key != key:
            if m.offset != 0:
                self._ack_snapshot(m, 0)  # not the transfer held here: from the start, please
                return
            sin = self.snapshot_inbound = _SnapshotIn(key)
        window = self.config.snapshot_window_chunks * max(1, self.config.snapshot_chunk_bytes)
        held = len(sin.buf)
        if m.offset == held:
            sin.buf.extend(m.data)
            while len(sin.buf) in sin.ahead:
                sin.buf.extend(sin.ahead.pop(len(sin.buf)))
        elif held < m.offset < held + window and m.data and len(sin.ahead) < self.config.snapshot_window_chunks:
            sin.ahead[m.offset] = m.data
        if len(sin.buf) > m.size:
            self.snapshot_inbound = None  # inconsistent chunks: drop the transfer
            return
        self._ack_snapshot(m, len(sin.buf))
        if len(sin.buf) != m.size:
            return
        self.snapshot_inbound = None
        try:
            membership, data = unwrap_snapshot(bytes(sin.buf), m.snapshot_index)
        except ValueError as e:
            self._log_event(f"snapshot through {m.snapshot_index} from {m.frm}: {e}; ignored")
            return
        if membership is None:  # a bare snapshot: epoch 0's (``wrap_snapshot``)
            if self.membership.epoch != 0:
                self._log_event(f"snapshot through {m.snapshot_index} from {m.frm} is of epoch 0; ignored")
                return
            membership = self.membership
        if membership.epoch < self.membership.epoch:
            self._log_event(f"snapshot through {m.snapshot_index} from {m.frm} is of an ended epoch; ignored")
            return
        check = self.config.snapshot_ok
        if check is not None and not self.bugs.unchecked_peer_input and not check(data):
            self._log_event(f"snapshot through {m.snapshot_index} from {m.frm} does not decode; ignored")
            return
        index = m.snapshot_index
        self._log_event(f"installing snapshot through {index}")
        self.snapshot_source = None
        self.snapshot_index = index
        self.snapshot_data = data
        for s in [s for s in self.log if s <= index]:
            del self.log[s]
        self.log_start = index + 1
        self.commit_index = index
        self.applied_index = index
        self._hard_dirty = True
        self._out_snapshot = Snapshot(index, data, membership)
        self.snapshot_membership = membership
        self._out_records = {s: r for s, r in self._out_records.items() if s > index}
        self._deferred_records = {s: r for s, r in self._deferred_records.items() if s > index}
        if membership.epoch > self.membership.epoch:
            leader = self.leader
            self._enter_membership(membership)
            self.leader = leader  # the sender still leads the epoch whose ballot we follow
        if self.role == FOLLOWER and self.leader == m.frm:
            if self.recovery is not None:
                self._send_progress(M.ACCEPTED, m.frm, m.ballot, 0)
            else:
                b = self.promised
                self._send(Message(M.ACCEPTED, m.frm, self.id, ballot=b, match_index=self._match(b),
                                   commit_index=self.commit_index))
