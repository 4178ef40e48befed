"""Ballots: ints ``round << 16 | node``, totally ordered like ``(round, node)``.

Ballot 0 (round 0, node 0) is "nothing promised yet"; real ballots start at round 1.
"""

from __future__ import annotations

NODE_BITS = 16
NODE_MASK = (1 << NODE_BITS) - 1


def make_ballot(round: int, node: int) -> int:
    if round < 0 or not (0 <= node <= NODE_MASK):
        raise ValueError(f"bad ballot round={round} node={node}")
    return (round << NODE_BITS) | node


def ballot_round(b: int) -> int:
    return b >> NODE_BITS


def ballot_node(b: int) -> int:
    return b & NODE_MASK


def format_ballot(b: int) -> str:
    return f"{ballot_round(b)}.{ballot_node(b)}"
