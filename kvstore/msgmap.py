"""A msgpack map from bytes someone else wrote (a file, a peer): bounded, then decoded,
then checked to be a map, each failure a ``ValueError`` naming what was wrong.

The backup format's header and trailer (``kvstore.backup.format``) and a membership's
member list (``kvstore.transport.members``) are read this way; the caller then checks
the map's entries.
"""

from __future__ import annotations

import msgpack


def decode_map(raw: bytes, limit: int, what: str, *, shape: str = "a map",
               strict_map_key: bool = True) -> dict:
    """``raw`` (at most ``limit`` bytes) decoded as a msgpack map; ``ValueError`` saying
    ``what`` is over the limit, does not decode, or is not ``shape``.

    ``strict_map_key``: keys are str or bytes only (False: any, such as ints)."""
    if len(raw) > limit:
        raise ValueError(f"{what} of {len(raw)} bytes is over {limit}")
    try:
        value = msgpack.unpackb(raw, raw=False, use_list=True, strict_map_key=strict_map_key)
    except Exception as e:  # msgpack raises several unrelated classes
        raise ValueError(f"{what} does not decode: {type(e).__name__}") from None
    if type(value) is not dict:
        raise ValueError(f"{what} is not {shape}")
    return value


__all__ = ["decode_map"]
