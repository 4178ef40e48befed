"""``Histogram``: a latency histogram one thread fills and another reads.

The node's loop observes a request's latency with one ``bisect`` and two adds; the
Prometheus exposition (``kvstore.ops.metrics``) reads a copy the loop publishes
(``snapshot``), so neither side takes a lock. Buckets are upper bounds in seconds, as
Prometheus expects (``le``); the last count is the +Inf bucket.
"""

from __future__ import annotations

from bisect import bisect_left

#: A client request, from intake to answer on this node: sub-millisecond (a read the
#: leader serves from memory) to seconds (a write behind an election).
REQUEST_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0, 10.0)
#: One ``fdatasync`` of the write-ahead log: ~50 us on a fast SSD to 100 ms on a slow disk.
FSYNC_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                 0.1, 0.25, 1.0)
#: One checkpoint of the overlay into LMDB (a synced LMDB commit of many pages).
CHECKPOINT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                      10.0)


class Histogram:
    """Counts per bucket (``counts[i]``: observations <= ``bounds[i]``, exclusive of the
    buckets before; ``counts[-1]``: above every bound) and their sum. One writer."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def snapshot(self) -> tuple:
        """``(bounds, counts, sum)``: a copy, safe to hand to another thread."""
        return self.bounds, list(self.counts), self.sum
