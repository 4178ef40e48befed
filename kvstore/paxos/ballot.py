"""Ballots: ints ``round << 16 | node``, totally ordered like ``(round, node)``.

Ballot 0 (round 0, node 0) is "nothing promised yet"; real ballots start at round 1.

Bounds. A ballot travels in msgpack (unsigned 64-bit at most) and in a log record's
header (``<Q``), and a candidate makes the next one as ``round + 1``. ``ROUND_MAX`` keeps
every ballot under 2**62, with ample headroom for that ``+ 1``: a ballot from a peer
whose round is above it is refused at decode (``messages.from_wire``), and a replica
whose highest round seen reaches it refuses to campaign (``next_round``) rather than
make a ballot the wire cannot carry. It is never reached legitimately: a round grows
by one per campaign (the highest seen, plus one), so reaching 2**46 rounds takes
7 * 10**13 campaigns; at one a millisecond (election timeouts are hundreds) that is
2,000 years.
"""

from __future__ import annotations

NODE_BITS = 16
NODE_MASK = (1 << NODE_BITS) - 1
#: The highest round a ballot may have (see the module docstring).
ROUND_MAX = (1 << 46) - 1
#: The highest ballot: round ``ROUND_MAX`` at the highest node index.
BALLOT_MAX = (ROUND_MAX << NODE_BITS) | NODE_MASK


def make_ballot(round: int, node: int) -> int:
    if not (0 <= round <= ROUND_MAX) or not (0 <= node <= NODE_MASK):
        raise ValueError(f"bad ballot round={round} node={node}")
    return (round << NODE_BITS) | node


def next_round(highest_seen: int) -> int | None:
    """The round a new campaign takes, or None when it would pass ``ROUND_MAX``."""
    return highest_seen + 1 if highest_seen < ROUND_MAX else None


def ballot_round(b: int) -> int:
    return b >> NODE_BITS


def ballot_node(b: int) -> int:
    return b & NODE_MASK


def format_ballot(b: int) -> str:
    return f"{ballot_round(b)}.{ballot_node(b)}"
