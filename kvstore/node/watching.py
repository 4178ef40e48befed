"""Watch on a node: the history of every shard, and the long polls of ``OP_WATCH``.

Part of ``Node`` (``kvstore.node.loop`` mixes it in and owns the order of side
effects). Every node keeps a ``ShardHistory`` per shard (``kvstore.watch``), fed in
the loop's answer step with the changes its save just applied (``feed_history``):
only once ``ReplicaStorage.save`` returned, so a watcher never sees a change that a
crash could take back from this node. ``OP_WATCH`` is answered by any node from its
own history, never forwarded:

- ``args = [shard, lo, hi, from_revision, max_bytes, wait_ms, prev]``, checked as any
  request (hostile input is input: ``check_watch_args``);
- the answer is ``[events, oldest, through, current]`` (``kvstore.transport.wire``,
  docs/watch.md); ``events`` None when ``from_revision`` is below this node's history;
- nothing to answer yet: the poll is parked (``kvstore.watch.ParkedPolls``: a cursor,
  never a buffer) until a batch of applied revisions matches it (checked once per
  batch) or ``wait_ms`` (capped at ``MAX_WATCH_WAIT_MS``) passes: then ``events = []``
  and ``through`` = the applied revision, a progress report. Parked polls are bounded
  per connection and in total, in count and bytes; over a bound the poll is answered
  ``STATUS_RETRY`` with the reason.

Memory: the histories (``[watch] history_bytes`` for all shards of the node), the
parked polls (``MAX_PARKED_TOTAL_BYTES``), and the answers in flight, which go through
the client socket's reply budget like reads (``reply_room``/``charge``). A client that
never polls again costs nothing after its last poll's deadline.
"""

from __future__ import annotations

from kvstore.keys import MAX_KEY_SIZE
from kvstore.transport import wire
from kvstore.watch import COMPACTED, ParkedPoll, ParkedPolls, ShardHistory

#: The longest a node parks a poll, whatever ``wait_ms`` asked.
MAX_WATCH_WAIT_MS = 10_000
#: The most event bytes one answer carries (a single revision larger goes whole).
MAX_WATCH_REPLY_BYTES = 4 * 1024 * 1024
#: Parked polls of one client connection at most, and their bytes.
MAX_PARKED_PER_CONNECTION = 1024
MAX_PARKED_CONNECTION_BYTES = 2 * 1024 * 1024
#: Parked polls of the node at most, and their bytes.
MAX_PARKED_TOTAL = 50_000
MAX_PARKED_TOTAL_BYTES = 64 * 1024 * 1024
#: ``[watch] history_bytes``: the histories of all shards of a node together.
DEFAULT_HISTORY_BYTES = 64 * 1024 * 1024
#: Revisions are ``slot + 1`` below 2**63.
REVISION_MAX = (1 << 63) - 1


def check_watch_args(args, nshards: int) -> tuple:
    """``(shard, lo, hi, from_revision, max_bytes, wait_ms, prev)`` of an OP_WATCH
    request, checked and capped; ValueError (the client's InvalidArgument) otherwise."""
    if type(args) is not list or len(args) != 7:
        raise ValueError("watch takes [shard, lo, hi, from_revision, max_bytes, wait_ms, prev]")
    shard, lo, hi, from_revision, max_bytes, wait_ms, prev = args
    if type(shard) is not int or not 0 <= shard < nshards:
        raise ValueError(f"no shard {shard!r} (this cluster has {nshards})"[:200])
    if type(lo) is not bytes or len(lo) > MAX_KEY_SIZE + 1:
        raise ValueError(f"a watch's lo is bytes of at most {MAX_KEY_SIZE + 1}")
    if hi is not None and (type(hi) is not bytes or len(hi) > MAX_KEY_SIZE + 1):
        raise ValueError(f"a watch's hi is None or bytes of at most {MAX_KEY_SIZE + 1}")
    if type(from_revision) is not int or not 1 <= from_revision <= REVISION_MAX:
        raise ValueError("a watch's from_revision is an int >= 1")
    if type(max_bytes) is not int or max_bytes < 1:
        raise ValueError("a watch's max_bytes is an int >= 1")
    if type(wait_ms) is not int or wait_ms < 0:
        raise ValueError("a watch's wait_ms is an int >= 0")
    if type(prev) is not bool:
        raise ValueError("a watch's prev is a bool")
    return (shard, lo, hi, from_revision, min(max_bytes, MAX_WATCH_REPLY_BYTES),
            min(wait_ms, MAX_WATCH_WAIT_MS), prev)


class Watching:
    """Watch on a node, a part of ``Node`` (the module docstring)."""

    def _init_watching(self, history_bytes: int) -> None:
        per_shard = history_bytes // self.nshards
        self.histories = [ShardHistory(per_shard, r.applied_index + 2) for r in self.replicas]
        self.parked = ParkedPolls(self.nshards, MAX_PARKED_TOTAL, MAX_PARKED_PER_CONNECTION,
                                  MAX_PARKED_TOTAL_BYTES, MAX_PARKED_CONNECTION_BYTES)

    def _on_watch(self, identity, request_id: int, args) -> None:
        shard, lo, hi, from_revision, max_bytes, wait_ms, prev = check_watch_args(args, self.nshards)
        history = self.histories[shard]
        answer = history.since(from_revision, lo, hi, max_bytes, prev)
        if answer is COMPACTED or answer[0] or wait_ms == 0 or answer[1] < history.head:
            self._answer_watch(identity, request_id, shard, answer)
            return
        poll = ParkedPoll(next(self._tokens), identity, shard, lo, hi, answer[1] + 1, max_bytes,
                          prev, self.clock.monotonic() + wait_ms / 1000, (identity, request_id))
        why = self.parked.park(poll)
        if why is not None:
            self.counters["watch_refused"] += 1
            self._reply(identity, request_id, wire.STATUS_RETRY, why)

    def _answer_watch(self, identity, request_id: int, shard: int, answer) -> None:
        """Reply ``answer`` (``ShardHistory.since``'s) as the wire's ``[events, oldest,
        through, current]``, within the client's reply budget (as reads are)."""
        history = self.histories[shard]
        if type(identity) is bytes:
            if not self.sockets.reply_room(identity):
                return  # a client that does not read its replies: cut off (counted)
            if answer is not COMPACTED and answer[0]:
                self.sockets.charge(identity, sum(
                    24 + sum(len(k) + len(v or b"") + len(p or b"") + 16 for _t, k, v, p in changes)
                    for _rev, changes in answer[0]))
        current = self.replicas[shard].up_to_date()
        if answer is COMPACTED:
            value = [None, history.oldest, history.head, current]
        else:
            through = history.head if self.bugs.watch_through_head else answer[1]
            value = [answer[0], history.oldest, through, current]
        self._reply(identity, request_id, wire.STATUS_OK, value)

    def _answer_poll(self, poll: ParkedPoll, from_revision: int) -> None:
        answer = self.histories[poll.shard].since(from_revision, poll.lo, poll.hi,
                                                  poll.max_bytes, poll.prev)
        self._answer_watch(*poll.reply_to, poll.shard, answer)

    def _feed_history(self, writes: list) -> None:
        """The answer step (``Node._drive`` c.): the changes the save that just returned
        applied, now durable, go into the histories; the parked polls they match are
        answered. A snapshot installed on a shard starts its history again after it."""
        for w in writes:
            history = self.histories[w.shard]
            if w.snapshot is not None and not self.bugs.watch_history_kept_over_snapshot:
                history.reset(w.snapshot.index + 2)
                for poll in self.parked.of_shard(w.shard):
                    if poll.from_revision < history.oldest:  # the snapshot skipped its changes
                        self.parked.remove(poll.token)
                        self._answer_poll(poll, poll.from_revision)
            batch = w.changes
            if batch:
                for revision, changes in batch:
                    if revision > history.head:  # (never otherwise: entries apply in order)
                        history.add(revision, changes)
            if w.applied_index is not None:
                history.advance(w.applied_index + 1)
            if batch and self.parked:
                for poll in self.parked.due(w.shard, batch):
                    self._answer_poll(poll, poll.first_new)

    def _expire_watches(self, now: float) -> None:
        """Polls whose wait passed: a progress report (nothing matched up to ``head``)."""
        for poll in self.parked.expired(now):
            history = self.histories[poll.shard]
            self._answer_watch(*poll.reply_to, poll.shard,
                               ([], max(history.head, poll.from_revision - 1)))

    def _release_watches(self) -> None:
        """The node stops: every parked poll gets its progress report now."""
        self._expire_watches(float("inf"))
