"""Ballots: ints ``round << 16 | node``, totally ordered like ``(round, node)``.

Ballot 0 (round 0, node 0) is "nothing promised yet"; real ballots start at round 1.

Epochs. A round's top bits are the membership epoch it belongs to (``EPOCH_SHIFT``:
``round = epoch << 30 | r``), so every ballot of epoch e + 1 is above every ballot of
epoch e: a replica that moved to a new membership refuses the old one's leaders by the
usual "below my promise" rule (``kvstore.paxos.replica``, "Membership"). Epoch 0 is the
bootstrap membership, whose rounds are the plain rounds of before epochs existed, so a
directory written then reads the same now. 2**30 rounds in one epoch take a billion
campaigns; ``next_round`` refuses to cross into the next epoch rather than wrap.

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
#: A round's epoch is ``round >> EPOCH_SHIFT`` (see the module docstring).
EPOCH_SHIFT = 30
EPOCH_MAX = ROUND_MAX >> EPOCH_SHIFT
#: The highest ballot: round ``ROUND_MAX`` at the highest node index.
BALLOT_MAX = (ROUND_MAX << NODE_BITS) | NODE_MASK


def make_ballot(round: int, node: int) -> int:
    if not (0 <= round <= ROUND_MAX) or not (0 <= node <= NODE_MASK):
        raise ValueError(f"bad ballot round={round} node={node}")
    return (round << NODE_BITS) | node


def next_round(highest_seen: int, epoch: int = 0) -> int | None:
    """The round a new campaign of ``epoch`` takes (above ``highest_seen``), or None when
    there is none: past ``ROUND_MAX``, or ``highest_seen`` is of a later epoch, or the
    epoch's rounds are used up (never legitimately: the module docstring)."""
    first = epoch << EPOCH_SHIFT
    r = max(highest_seen + 1, first | 1)
    if r > ROUND_MAX or r >> EPOCH_SHIFT != epoch:
        return None
    return r


def epoch_of_round(round: int) -> int:
    return round >> EPOCH_SHIFT


def ballot_epoch(b: int) -> int:
    return (b >> NODE_BITS) >> EPOCH_SHIFT


def epoch_floor(epoch: int) -> int:
    """The lowest ballot of ``epoch`` (no node leads it): a hint that says "epoch moved on"."""
    return make_ballot(epoch << EPOCH_SHIFT, 0)


def ballot_round(b: int) -> int:
    return b >> NODE_BITS


def ballot_node(b: int) -> int:
    return b & NODE_MASK


def format_ballot(b: int) -> str:
    r = ballot_round(b)
    if r >> EPOCH_SHIFT:
        return f"e{r >> EPOCH_SHIFT}:{r & ((1 << EPOCH_SHIFT) - 1)}.{ballot_node(b)}"
    return f"{r}.{ballot_node(b)}"
