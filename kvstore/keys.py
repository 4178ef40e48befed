"""Checking and normalising keys and values at the public surface.

Everything a user passes goes through here before anything is written, so bad
input raises ``InvalidArgument`` and changes nothing.
"""

from __future__ import annotations

import sys

from kvstore.errors import InvalidArgument

#: LMDB's key limit (its default build); keys are stored as LMDB keys as they are.
MAX_KEY_SIZE = 511
#: Values up to 4 MiB: one log record carries a batch of them, and a cluster
#: sends it in one message, so a bound keeps a single write from stalling others.
MAX_VALUE_SIZE = 4 * 1024 * 1024
#: The keys and values one transaction may write, in all: 64 MiB. A transaction is
#: one log entry (and, in a cluster, one message); a put past this raises
#: ``InvalidArgument`` and leaves the transaction as it was.
MAX_TXN_SIZE = 64 * 1024 * 1024
#: The keys and values one transaction of a cluster (``kvstore.connect``) may write, in
#: all: 10 MiB. A cluster transaction travels as one request (a node takes frames up to
#: 16 MiB) and one replicated log entry (``MAX_COMMAND_BYTES``), so its bound is lower
#: than the embedded store's; a put past it raises ``InvalidArgument`` likewise.
MAX_CLUSTER_TXN_SIZE = 10 * 1024 * 1024
#: A node refuses (``InvalidArgument``) a write command larger than this, encoded: its
#: log entry (with one turn's other commands, ``kvstore.node.loop``) must fit, several to a
#: message, in a peer frame. A cluster transaction's reads and writes together must fit.
MAX_COMMAND_BYTES = 12 * 1024 * 1024


def _type_name(obj: object) -> str:
    return type(obj).__name__


def _as_bytes(obj: object, what: str, accepted: str = "bytes or str") -> bytes:
    """``obj`` as bytes: a str encoded as UTF-8, a bytearray or memoryview copied; anything
    else is an ``InvalidArgument`` naming ``what`` and the ``accepted`` types.

    Keys, values and scan bounds convert through this one function, so they agree on
    what a str or a buffer means. Plain ``bytes`` never get here: each check returns
    them on its own fast path, before any call.
    """
    if isinstance(obj, str):
        try:
            return obj.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate: not text UTF-8 can carry
            raise InvalidArgument(f"{what} is a str that is not valid Unicode ({e.reason} "
                                  f"at position {e.start}); pass bytes instead") from None
    if isinstance(obj, (bytearray, memoryview)):
        return bytes(obj)
    raise InvalidArgument(f"{what} must be {accepted}, not {_type_name(obj)}")


def check_key(key: object, what: str = "key") -> bytes:
    """``key`` as bytes, or ``InvalidArgument`` saying what is wrong with it."""
    if type(key) is bytes:
        n = len(key)
        if 0 < n <= MAX_KEY_SIZE:
            return key  # the fast path: most calls end here
    else:
        key = _as_bytes(key, what)
    if not key:
        raise InvalidArgument(f"{what} must not be empty")
    if len(key) > MAX_KEY_SIZE:
        raise InvalidArgument(
            f"{what} is {len(key)} bytes; the largest allowed is MAX_KEY_SIZE = {MAX_KEY_SIZE}")
    return key


def check_value(value: object, what: str = "value") -> bytes:
    """``value`` as bytes (empty allowed), or ``InvalidArgument``."""
    if type(value) is not bytes:
        value = _as_bytes(value, what)
    if len(value) > MAX_VALUE_SIZE:
        raise InvalidArgument(
            f"{what} is {len(value)} bytes; the largest allowed is "
            f"MAX_VALUE_SIZE = {MAX_VALUE_SIZE}")
    return value


def check_optional_value(value: object, what: str) -> bytes | None:
    """``None`` or a checked value (``cas`` arguments)."""
    return None if value is None else check_value(value, what)


def check_bound(bound: object, what: str) -> bytes | None:
    """A scan bound: ``None`` or bytes/str (may be empty, may exceed no limit but the key's)."""
    if bound is None:
        return None
    if isinstance(bound, bytes):
        return bytes(bound)  # (a subclass of bytes, as plain bytes)
    return _as_bytes(bound, what, "bytes, str or None")


def check_limit(limit: object) -> int | None:
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise InvalidArgument(f"limit must be an int or None, not {_type_name(limit)}")
    if limit < 0:
        raise InvalidArgument(f"limit must be >= 0, got {limit}")
    if limit >= sys.maxsize:
        return None  # more rows than any store holds: no limit
    return limit


def prefix_end(prefix: bytes) -> bytes | None:
    """The smallest key greater than every key starting with ``prefix`` (None: no bound)."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes([stripped[-1] + 1])


def scan_range(prefix: object, start: object, end: object) -> tuple[bytes, bytes | None]:
    """The ``[lo, hi)`` key range of a scan: the prefix's range narrowed by start and end."""
    prefix_b = check_bound(prefix, "prefix") or b""
    lo = prefix_b
    hi = prefix_end(prefix_b) if prefix_b else None
    start_b = check_bound(start, "start")
    end_b = check_bound(end, "end")
    if start_b is not None and start_b > lo:
        lo = start_b
    if end_b is not None and (hi is None or end_b < hi):
        hi = end_b
    return lo, hi


def check_scan(prefix: object, start: object, end: object,
               limit: object) -> tuple[bytes, bytes | None, int | None] | None:
    """A scan's checked ``(lo, hi, limit)`` (``scan_range``, ``check_limit``), or None
    when it can answer nothing (an empty range, or ``limit`` 0): then no engine is asked."""
    lo, hi = scan_range(prefix, start, end)
    limit = check_limit(limit)
    if (hi is not None and hi <= lo) or limit == 0:
        return None
    return lo, hi, limit
