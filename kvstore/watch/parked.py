"""Long polls a node holds until a matching revision is applied or their wait ends.

A parked poll is a cursor (shard, key range, the next revision it wants, a deadline),
never a buffer: what it will be answered is read from the shard's ``ShardHistory``
when it is due. A poll is parked only after the history had nothing for it, and every
parked poll of a shard is checked against each batch of revisions the shard applies,
so a poll still parked after a batch matched nothing up to the history's head: it is
answered from the first revision of the batch that matched it (``first_new``), which
the history still holds even when the revisions it waited through were dropped since.

Matching costs O(keys changed in the batch) for key watches (a dict from key to its
polls) plus O(range polls x log keys changed) for range and prefix watches (a bisect
into the batch's sorted keys), once per applied batch, not per event. Deadlines are
a heap (``expired``), rebuilt from the live polls when the entries of polls answered
early outnumber them (so it stays within a constant factor of the parked count). Bounds (count and bytes, per owner and in total) are checked
by ``park``, which says why it refused.
"""

from __future__ import annotations

import heapq
from bisect import bisect_left
from dataclasses import dataclass

#: Bytes counted per parked poll besides its key range (the poll and its index entries).
POLL_OVERHEAD_BYTES = 400


@dataclass(slots=True, eq=False)
class ParkedPoll:
    """One parked long poll (the module docstring); ``reply_to`` is the owner's business."""

    token: int
    owner: object  # whose bounds it counts against (a client connection)
    shard: int
    lo: bytes
    hi: bytes | None
    from_revision: int  # the next revision it wants; nothing matched below it
    max_bytes: int
    prev: bool
    deadline: float
    reply_to: object = None
    first_new: int = 0  # set when due: nothing matched before this revision

    @property
    def is_key(self) -> bool:
        return self.hi is not None and len(self.hi) == len(self.lo) + 1 and \
            self.hi == self.lo + b"\x00"

    @property
    def bytes(self) -> int:
        return len(self.lo) + len(self.hi or b"") + POLL_OVERHEAD_BYTES


class ParkedPolls:
    """Every parked poll of a node (the module docstring)."""

    def __init__(self, nshards: int, max_total: int, max_per_owner: int,
                 max_total_bytes: int, max_owner_bytes: int) -> None:
        self.max_total, self.max_per_owner = max_total, max_per_owner
        self.max_total_bytes, self.max_owner_bytes = max_total_bytes, max_owner_bytes
        self._polls: dict = {}  # token -> ParkedPoll
        self._by_key = [dict() for _ in range(nshards)]  # key -> {token: poll}
        self._ranges = [dict() for _ in range(nshards)]  # token -> poll
        self._owners: dict = {}  # owner -> [count, bytes]
        self._deadlines: list = []  # heap of (deadline, token); stale entries skipped
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._polls)

    def __contains__(self, token) -> bool:
        return token in self._polls

    def count(self, shard: int) -> int:
        return sum(len(v) for v in self._by_key[shard].values()) + len(self._ranges[shard])

    def owner_count(self, owner) -> int:
        return self._owners.get(owner, (0, 0))[0]

    def refusal(self, poll: ParkedPoll) -> str | None:
        """Why ``poll`` may not be parked now (a bound reached), or None."""
        used = self._owners.get(poll.owner, (0, 0))
        size = poll.bytes
        if used[0] >= self.max_per_owner:
            return f"too many parked watch polls on this connection (at most {self.max_per_owner})"
        if used[1] + size > self.max_owner_bytes:
            return f"parked watch polls of this connection over {self.max_owner_bytes} bytes"
        if len(self._polls) >= self.max_total:
            return f"too many parked watch polls on this node (at most {self.max_total})"
        if self.bytes + size > self.max_total_bytes:
            return f"parked watch polls over {self.max_total_bytes} bytes on this node"
        return None

    def park(self, poll: ParkedPoll) -> str | None:
        """Hold ``poll`` (its ``from_revision``: the history had nothing for it below);
        None, or why it was refused (nothing changed then)."""
        why = self.refusal(poll)
        if why is not None:
            return why
        self._polls[poll.token] = poll
        if poll.is_key:
            self._by_key[poll.shard].setdefault(poll.lo, {})[poll.token] = poll
        else:
            self._ranges[poll.shard][poll.token] = poll
        used = self._owners.setdefault(poll.owner, [0, 0])
        used[0] += 1
        used[1] += poll.bytes
        self.bytes += poll.bytes
        deadlines = self._deadlines
        if len(deadlines) > 2 * len(self._polls) + 1024:  # entries of polls answered early
            deadlines[:] = [(p.deadline, t) for t, p in self._polls.items() if t != poll.token]
            heapq.heapify(deadlines)
        heapq.heappush(deadlines, (poll.deadline, poll.token))
        return None

    def remove(self, token) -> ParkedPoll | None:
        poll = self._polls.pop(token, None)
        if poll is None:
            return None
        if poll.is_key:
            polls = self._by_key[poll.shard][poll.lo]
            del polls[token]
            if not polls:
                del self._by_key[poll.shard][poll.lo]
        else:
            del self._ranges[poll.shard][token]
        used = self._owners[poll.owner]
        used[0] -= 1
        used[1] -= poll.bytes
        if used[0] == 0:
            del self._owners[poll.owner]
        self.bytes -= poll.bytes
        if not self._polls:
            self._deadlines.clear()
        return poll

    def due(self, shard: int, batch: list) -> list:
        """The polls of ``shard`` that ``batch`` matches, removed: ``batch`` is the
        ``[(revision, [(key, value, prev), ...]), ...]`` just added to its history, in
        order. Each poll's ``first_new`` is the first revision to answer it from."""
        if not batch or not self._polls:
            return []
        by_key, ranges = self._by_key[shard], self._ranges[shard]
        if not by_key and not ranges:
            return []
        first = batch[0][0]
        last_change: dict = {}  # key -> the last revision of the batch that changed it
        for revision, changes in batch:
            for key, _v, _p in changes:
                last_change[key] = revision
        found: list = []
        if by_key:
            for key, revision in last_change.items():
                polls = by_key.get(key)
                if polls:
                    found.extend(p for p in polls.values() if p.from_revision <= revision)
        if ranges:
            keys = sorted(last_change)
            last = batch[-1][0]
            for p in ranges.values():
                if p.from_revision > last:
                    continue
                i = bisect_left(keys, p.lo)
                if i < len(keys) and (p.hi is None or keys[i] < p.hi):
                    if p.from_revision <= first or _matches_from(batch, p):
                        found.append(p)
        for p in found:
            self.remove(p.token)
            p.first_new = max(p.from_revision, first)
        return found

    def expired(self, now: float) -> list:
        """Polls whose deadline is at or before ``now``, removed."""
        heap, out = self._deadlines, []
        while heap and heap[0][0] <= now:
            _deadline, token = heapq.heappop(heap)
            poll = self._polls.get(token)
            if poll is not None and poll.deadline <= now:
                out.append(self.remove(token))
        return out

    def of_shard(self, shard: int) -> list:
        """Every poll parked on ``shard`` (not removed)."""
        return ([p for polls in self._by_key[shard].values() for p in polls.values()]
                + list(self._ranges[shard].values()))

    def of_owner(self, owner) -> list:
        """Every poll of ``owner`` (not removed; a walk over all polls: rare use)."""
        return [p for p in self._polls.values() if p.owner == owner]


def _matches_from(batch: list, poll: ParkedPoll) -> bool:
    """A change in ``[poll.lo, poll.hi)`` at a revision >= ``poll.from_revision``."""
    lo, hi = poll.lo, poll.hi
    for revision, changes in batch:
        if revision >= poll.from_revision:
            for key, _v, _p in changes:
                if lo <= key and (hi is None or key < hi):
                    return True
    return False
