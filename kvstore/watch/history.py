"""One shard's recent changes, kept in memory and bounded in bytes, for watchers to read.

A ``ShardHistory`` holds ``(revision, [(key, value or None, prev or None), ...])`` for
every applied revision that changed a key, oldest first, up to ``max_bytes`` (the
oldest revisions are dropped first; the newest revision is always kept, so a single
entry larger than the bound is still delivered). It is filled only with durable,
applied entries, in revision order (``add``), and told when an applied entry changed
nothing (``advance``), so ``head`` is the last revision it covers.

Invariant: every change of the shard with ``oldest <= revision <= head`` is held here.
``since`` answers from it: whole revisions, ascending, only keys in ``[lo, hi)``, at
least one matching revision if there is one even past ``max_bytes``, and ``through``:
every matching change with ``revision <= through`` is in the answer or before
``from_revision``. ``from_revision < oldest`` is ``COMPACTED``.

Reading a revision costs a bisect to find the start, then a walk over the revisions
after it, bounded by ``scan_revisions_max`` per call (a sparse prefix's poll reports
progress through the revisions walked, never walks the whole ring in one call).
"""

from __future__ import annotations

from bisect import bisect_left

#: Wire codes of an event's type (``kvstore.transport.wire`` OP_WATCH).
PUT = 0
DELETE = 1
#: What ``since`` returns for a revision older than the history kept.
COMPACTED = None
#: Bytes counted per change besides its key and values (the tuple, three bytes objects'
#: headers, its list slot), and per revision (its list, ints and slots): measured with
#: tracemalloc, so that ``max_bytes`` bounds the memory the history really holds.
CHANGE_OVERHEAD_BYTES = 176
REVISION_OVERHEAD_BYTES = 160
#: Revisions walked by one ``since`` at most.
SCAN_REVISIONS_MAX = 20_000


def change_bytes(changes: list) -> int:
    """What ``changes`` cost in the history's bound (an estimate of their memory)."""
    return sum(len(k) + len(v or b"") + len(p or b"") + CHANGE_OVERHEAD_BYTES
               for k, v, p in changes)


class ShardHistory:
    """The recent changes of one shard (the module docstring)."""

    def __init__(self, max_bytes: int, next_revision: int = 1,
                 scan_revisions_max: int = SCAN_REVISIONS_MAX) -> None:
        """Empty, covering nothing before ``next_revision`` (the first revision it will
        be given: ``oldest``)."""
        if type(max_bytes) is not int or max_bytes < 0:
            raise ValueError(f"a watch history's size is an int >= 0 (bytes), not {max_bytes!r}")
        self.max_bytes = max_bytes
        self.scan_revisions_max = scan_revisions_max
        self.reset(next_revision)

    def reset(self, next_revision: int) -> None:
        """Forget everything (a snapshot replaced the state, or a restart): the history
        starts again at ``next_revision``."""
        self._revisions: list = []  # ascending; live from self._start on
        self._changes: list = []
        self._sizes: list = []
        self._start = 0
        self.bytes = 0
        #: The oldest revision this history can answer from.
        self.oldest = next_revision
        #: The last revision it covers (every change up to it is held, or was dropped).
        self.head = next_revision - 1

    def __len__(self) -> int:
        return len(self._revisions) - self._start

    def add(self, revision: int, changes: list) -> None:
        """The durable, applied ``changes`` of ``revision`` (above ``head``)."""
        if revision <= self.head:
            raise ValueError(f"revision {revision} is not above the history's head {self.head}")
        if changes:
            size = change_bytes(changes) + REVISION_OVERHEAD_BYTES
            self._revisions.append(revision)
            self._changes.append(changes)
            self._sizes.append(size)
            self.bytes += size
        self.head = revision
        self._trim()

    def advance(self, revision: int) -> None:
        """Revisions up to ``revision`` were applied and changed nothing more."""
        if revision > self.head:
            self.head = revision

    def _trim(self) -> None:
        start, last = self._start, len(self._revisions) - 1
        while self.bytes > self.max_bytes and start < last:
            self.bytes -= self._sizes[start]
            self.oldest = self._revisions[start] + 1
            self._changes[start] = None
            start += 1
        if start > 1024 and start * 2 > len(self._revisions):
            del self._revisions[:start], self._changes[:start], self._sizes[:start]
            start = 0
        self._start = start

    def since(self, from_revision: int, lo: bytes, hi: bytes | None, max_bytes: int,
              prev: bool = False):
        """``(events, through)`` for a poll from ``from_revision`` of keys in ``[lo, hi)``
        (``hi`` None: unbounded), or ``COMPACTED`` if ``from_revision < oldest``.

        ``events``: ``[[revision, [[type, key, value, prev], ...]], ...]`` (the wire's
        shape; ``prev`` None unless asked), whole revisions, ascending, stopping once
        ``max_bytes`` is reached (at least one revision). ``through``: as the module
        docstring says (``head`` when the answer reached it)."""
        if from_revision < self.oldest:
            return COMPACTED
        revisions = self._revisions
        i = bisect_left(revisions, from_revision, self._start)
        end = len(revisions)
        if end - i > self.scan_revisions_max:
            end = i + self.scan_revisions_max
            through = revisions[end - 1]
        else:
            through = self.head
        events: list = []
        size = 0
        changes_at, sizes = self._changes, self._sizes
        for j in range(i, end):
            matched = [[PUT if v is not None else DELETE, k, v, p if prev else None]
                       for k, v, p in changes_at[j] if lo <= k and (hi is None or k < hi)]
            if matched:
                events.append([revisions[j], matched])
                size += sizes[j] if len(matched) == len(changes_at[j]) else change_bytes(
                    [(k, v, p) for _t, k, v, p in matched])
                if size >= max_bytes:
                    through = revisions[j]
                    break
        return events, max(through, from_revision - 1)

    def matches(self, from_revision: int, lo: bytes, hi: bytes | None) -> bool:
        """Whether ``since`` would return an event now (cheap: stops at the first)."""
        if from_revision < self.oldest:
            return True  # the answer is "compacted"
        revisions = self._revisions
        for j in range(bisect_left(revisions, from_revision, self._start), len(revisions)):
            for k, _v, _p in self._changes[j]:
                if lo <= k and (hi is None or k < hi):
                    return True
        return False
