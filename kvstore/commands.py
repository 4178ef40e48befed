"""The command vocabulary: what a write asks the state machine to do, built, checked and
decoded here and nowhere else.

A command is a small typed record, one class per operation. Each is a
``NamedTuple`` whose first field is its op code, so its msgpack encoding is the
list that the wire and the logs have always carried (old data directories and
nodes of the previous version read and write the same bytes); only the
in-memory form is typed. Build them with the constructors (``put``, ``delete``,
``cas``, ``incr``, ``txn``, ``txn_writes``, ``two_pc``), never as bare lists.

- ``Put(OP_PUT, key, value)``                 -> None
- ``Delete(OP_DELETE, key)``                  -> bool, the key existed
- ``Cas(OP_CAS, key, expected, new)``         -> bool, swapped (None: absent / delete)
- ``Incr(OP_INCR, key, delta)``               -> int, the new value (``incremented``: the
  value format, its bounds and the two refusals, ``NOT_INTEGER`` and ``OVERFLOW``)
- ``Txn(OP_TXN, reads, ranges, writes)``      -> bool, committed (False: conflict)
    reads  = [(key, revision)]                   revision 0 = read as absent
    ranges = [(lo, hi, [(key, revision)])]       hi None = unbounded; the rows seen
    writes = [(key, value or None)]              None deletes
- ``TxnWrites(OP_TXN_WRITES, writes)``        -> True: the part of a transaction already
  validated across shards (its decision was commit; the embedded store's)
- ``TwoPC(OP_2PC, raw, entry)``               -> a cluster's two-phase-commit step:
  ``raw`` a ``kvstore.txn.records`` encoding, ``entry`` the same decoded (TxnPrepare ->
  vote, TxnDecision -> recorded outcome, TxnResolve -> changed); applied by
  ``kvstore.machine.twopc``. On the wire it is ``[OP_2PC, raw]`` (``TwoPC.wire``). A
  client sends only TxnPrepare; decisions and resolves are written by the nodes.
- Leases (``kvstore.machine.leases``; ids 1..2**63-1, ttls 1 ms..365 days, checked
  where decoded): ``LeaseGrant(op, id, ttl_ms)`` -> True, ``LeaseKeepAlive(op, id)`` ->
  bool, ``LeaseRevoke(op, id)`` -> keys deleted or False, ``PutLease(op, key, value, id)``
  -> None or ``NO_LEASE``, ``PutTTL(op, key, value, ttl_ms)`` -> None, ``LeaseExpire(op,
  id, refreshed_revision)`` -> keys deleted or False (a shard leader's; never a client's),
  ``CasLease(op, key, expected, new, id)`` -> bool or ``NO_LEASE`` (a cas whose new value
  lives with the lease: the lock recipe's "create if absent, held by my lease").
- ``BackupFence(op, fence_id, until_ms)`` -> True, ``BackupUnfence(op, fence_id)`` ->
  bool (this fence held and is lifted now): a cluster backup's cut
  (``kvstore.machine.fence``, ``kvstore.backup.cluster``).

A cluster node logs each client write inside its session (``ClientCommand``:
client id, seq, floor, command; ``kvstore.machine.replica`` applies it at most
once per ``(client, seq)``). A write is decoded once where it enters a node: a
client's request by ``client_command`` (the node's intake), a peer's record by
``decode_logged_command`` (checked before it is accepted, ``Node._on_paxos``, or
when a restart replays it); the typed record travels from there to apply
(``DecodedCommands``). Everything that decodes here raises ``ValueError``
(``InvalidArgument`` is one) for input it refuses, and changes nothing.

Results that are not values (``Result``) are here too: a client tells ``LOCKED``
apart without importing the server's state machine.

Never pickle: log payloads come back from disk and, in a cluster, from peers.

Long module: the vocabulary is one list, every command's record, constructor and
decoding side by side, so that an op is added (and reviewed) in one place.
"""

from __future__ import annotations

import enum
from typing import NamedTuple, Union

import msgpack

from kvstore.errors import CorruptRecord, InvalidArgument, KVError
from kvstore.keys import check_key, check_value
from kvstore.txn import TxnDecision, TxnPrepare, TxnResolve
from kvstore.txn import decode as decode_2pc
from kvstore.txn import encode as encode_2pc

OP_PUT = 1
OP_DELETE = 2
OP_CAS = 3
OP_TXN = 4
OP_TXN_WRITES = 5
OP_2PC = 6
OP_INCR = 7
OP_LEASE_GRANT = 8
OP_LEASE_KEEPALIVE = 9
OP_LEASE_REVOKE = 10
OP_PUT_LEASE = 11
OP_PUT_TTL = 12
OP_LEASE_EXPIRE = 13
OP_CAS_LEASE = 14
OP_BACKUP_FENCE = 15
OP_BACKUP_UNFENCE = 16
#: The backup fence commands (``kvstore.machine.fence`` applies them).
FENCE_OPS = frozenset((OP_BACKUP_FENCE, OP_BACKUP_UNFENCE))
#: A backup fence's id: random bytes of this length.
FENCE_ID_BYTES = 16
#: The lease commands (``kvstore.machine.leases`` applies them).
LEASE_OPS = frozenset((OP_LEASE_GRANT, OP_LEASE_KEEPALIVE, OP_LEASE_REVOKE, OP_PUT_LEASE,
                       OP_PUT_TTL, OP_LEASE_EXPIRE, OP_CAS_LEASE))

#: A lease's time to live, in ms: 1 ms .. 365 days (a longer one is no lease; a forged
#: one is refused where it enters, never logged).
TTL_MS_MIN = 1
TTL_MS_MAX = 365 * 24 * 3600 * 1000
#: A lease id a client chooses is in 1 .. LEASE_ID_MAX (random 63 bits); the ids from
#: LEASE_ID_MAX + 1 on are the anonymous leases of ``PutTTL`` (made by the state machine).
LEASE_ID_MAX = (1 << 63) - 1
#: Any lease id a log entry may name (a node's LeaseExpire may name an anonymous lease).
LEASE_ID_ANY_MAX = (1 << 64) - 1

#: Log record kinds (the ``kind`` byte of a record header).
KIND_NOOP = 0
KIND_COMMANDS = 1

#: Client ids in a logged command are at most this long.
CLIENT_ID_MAX_BYTES = 64


class Result(str, enum.Enum):
    """Results of a write that are not its value. A ``str`` enum: ``LOCKED`` crosses the
    wire and sits in session tables as the string ``"locked"``, which compares equal."""

    #: A plain write that met a prepared transaction's lock: nothing applied, retry it.
    LOCKED = "locked"
    #: A command ``(client, seq)`` below its session's floor: already answered, ignored.
    STALE = "stale"
    #: A chosen value that could not be applied (``kvstore.machine.replica``): a no-op.
    POISONED = "poisoned"
    #: An incr of a key whose value is not a decimal integer in 64 bits: nothing applied.
    NOT_INTEGER = "not_integer"
    #: An incr whose result would leave the signed 64-bit range: nothing applied.
    OVERFLOW = "overflow"
    #: A put with a lease this shard does not know (never granted, revoked or expired):
    #: nothing applied (the client raises ``kvstore.LeaseExpired``).
    NO_LEASE = "no_lease"

    __str__ = str.__str__  # "locked" in messages and logs, as it reads on the wire
    __format__ = str.__format__


LOCKED = Result.LOCKED
STALE = Result.STALE
POISONED = Result.POISONED
NOT_INTEGER = Result.NOT_INTEGER
OVERFLOW = Result.OVERFLOW
NO_LEASE = Result.NO_LEASE


# ------------------------------------------------------------------ the commands
class Put(NamedTuple):
    op: int
    key: bytes
    value: bytes

    def keys(self) -> list:
        return [self.key]

    def check_sizes(self) -> None:
        check_key(self.key)
        check_value(self.value)


class Delete(NamedTuple):
    op: int
    key: bytes

    def keys(self) -> list:
        return [self.key]

    def check_sizes(self) -> None:
        check_key(self.key)


class Cas(NamedTuple):
    op: int
    key: bytes
    expected: bytes | None
    new: bytes | None

    def keys(self) -> list:
        return [self.key]

    def check_sizes(self) -> None:
        check_key(self.key)
        for v in (self.expected, self.new):
            if v is not None:
                check_value(v)


class Incr(NamedTuple):
    op: int
    key: bytes
    delta: int

    def keys(self) -> list:
        return [self.key]

    def check_sizes(self) -> None:
        check_key(self.key)


class Txn(NamedTuple):
    op: int
    reads: list
    ranges: list
    writes: list

    def keys(self) -> list:
        return ([k for k, _ in self.reads] + [k for k, _ in self.writes]
                + [k for g in self.ranges for k, _ in g[2]])

    def check_sizes(self) -> None:
        for key, _revision in self.reads:
            check_key(key)
        _check_writes(self.writes)


class TxnWrites(NamedTuple):
    op: int
    writes: list

    def keys(self) -> list:
        return [k for k, _ in self.writes]

    def check_sizes(self) -> None:
        _check_writes(self.writes)


class TwoPC(NamedTuple):
    op: int
    raw: bytes
    entry: TxnPrepare | TxnDecision | TxnResolve

    def wire(self) -> tuple:
        """What travels and is logged: ``[OP_2PC, raw]``."""
        return (self.op, self.raw)

    def keys(self) -> list:
        """The keys a TxnPrepare reads or writes; a decision or a resolve has none."""
        entry = self.entry
        if isinstance(entry, TxnPrepare):
            return [k for k, _ in entry.reads] + [k for k, _ in entry.writes]
        return []

    def check_sizes(self) -> None:
        entry = self.entry
        if isinstance(entry, TxnPrepare):
            _check_writes(entry.writes)
            for key, _revision in entry.reads:
                check_key(key)


class LeaseGrant(NamedTuple):
    """Grant (or re-grant: a refresh with this ttl) lease ``lease_id`` on a shard -> True."""

    op: int
    lease_id: int
    ttl_ms: int


class LeaseKeepAlive(NamedTuple):
    """Refresh lease ``lease_id`` -> True, or False if the shard does not know it."""

    op: int
    lease_id: int


class LeaseRevoke(NamedTuple):
    """End lease ``lease_id`` now, deleting its keys -> their number, or False if unknown."""

    op: int
    lease_id: int


class PutLease(NamedTuple):
    """A put whose key lives as long as lease ``lease_id`` -> None, or ``NO_LEASE``."""

    op: int
    key: bytes
    value: bytes
    lease_id: int


class PutTTL(NamedTuple):
    """A put whose key lives ``ttl_ms`` (an anonymous lease of its own, no keep-alive)."""

    op: int
    key: bytes
    value: bytes
    ttl_ms: int


class CasLease(NamedTuple):
    """A cas whose new value lives as long as lease ``lease_id`` -> bool (swapped), or
    ``NO_LEASE`` (the lease is gone: nothing compared, nothing written). ``new`` None
    deletes (the lease is then only checked). The lock recipe's "create only if absent,
    held by my lease" in one command (``kvstore.recipes``)."""

    op: int
    key: bytes
    expected: bytes | None
    new: bytes | None
    lease_id: int

    def keys(self) -> list:
        return [self.key]

    def check_sizes(self) -> None:
        check_key(self.key)
        for v in (self.expected, self.new):
            if v is not None:
                check_value(v)


class LeaseExpire(NamedTuple):
    """Written by the shard leader (never a client): end lease ``lease_id`` unless it was
    refreshed since ``refreshed_revision`` -> the number of keys deleted, or False."""

    op: int
    lease_id: int
    refreshed_revision: int


class BackupFence(NamedTuple):
    """While it holds, the shard refuses new cross-shard prepares (``kvstore.machine.fence``);
    ``until_ms``: the wall-clock ms (the node's, bounded where it enters) after which it
    lapses on its own -> True."""

    op: int
    fence_id: bytes
    until_ms: int


class BackupUnfence(NamedTuple):
    """Lift fence ``fence_id`` -> True if it still held (it is lifted now), else False."""

    op: int
    fence_id: bytes


def _no_keys(self) -> list:
    return []


def _no_sizes(self) -> None:
    pass


for _lease_command in (LeaseGrant, LeaseKeepAlive, LeaseRevoke, LeaseExpire, BackupFence,
                       BackupUnfence):
    _lease_command.keys, _lease_command.check_sizes = _no_keys, _no_sizes
for _lease_command in (PutLease, PutTTL):  # a put's key and value, with a lease
    _lease_command.keys, _lease_command.check_sizes = Put.keys, Put.check_sizes

Command = Union[Put, Delete, Cas, Incr, Txn, TxnWrites, TwoPC, LeaseGrant, LeaseKeepAlive,
                LeaseRevoke, PutLease, PutTTL, LeaseExpire, CasLease, BackupFence, BackupUnfence]


def _check_writes(writes) -> None:
    for key, value in writes:
        check_key(key)
        if value is not None:
            check_value(value)


def put(key: bytes, value: bytes) -> Put:
    return Put(OP_PUT, key, value)


def delete(key: bytes) -> Delete:
    return Delete(OP_DELETE, key)


def cas(key: bytes, expected: bytes | None, new: bytes | None) -> Cas:
    return Cas(OP_CAS, key, expected, new)


def incr(key: bytes, delta: int) -> Incr:
    return Incr(OP_INCR, key, delta)


def txn(reads: list, ranges: list, writes: list) -> Txn:
    return Txn(OP_TXN, reads, ranges, writes)


def txn_writes(writes: list) -> TxnWrites:
    return TxnWrites(OP_TXN_WRITES, writes)


def two_pc(entry: TxnPrepare | TxnDecision | TxnResolve) -> TwoPC:
    return TwoPC(OP_2PC, encode_2pc(entry), entry)


def check_lease_id(lease_id) -> int:
    """A lease id as a client names it (an int, not a bool, in 1..``LEASE_ID_MAX``);
    ``InvalidArgument`` otherwise."""
    if isinstance(lease_id, bool) or not isinstance(lease_id, int):
        raise InvalidArgument(f"a lease id is an int, not {type(lease_id).__name__}")
    if not 1 <= lease_id <= LEASE_ID_MAX:
        raise InvalidArgument(f"a lease id is in 1..{LEASE_ID_MAX} (63 bits), got {lease_id}")
    return int(lease_id)


def check_ttl(ttl) -> int:
    """A time to live in seconds (int or float) as the API takes it, in ms; between
    ``TTL_MS_MIN`` (1 ms) and ``TTL_MS_MAX`` (365 days); ``InvalidArgument`` otherwise."""
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)):
        raise InvalidArgument(f"a ttl is a number of seconds, not {type(ttl).__name__}")
    if not TTL_MS_MIN / 1000 <= ttl <= TTL_MS_MAX / 1000:  # False for nan
        raise InvalidArgument(f"a ttl is between {TTL_MS_MIN / 1000} s and "
                              f"{TTL_MS_MAX // 1000} s (365 days), got {ttl!r}")
    return max(TTL_MS_MIN, round(ttl * 1000))


def lease_grant(lease_id: int, ttl_ms: int) -> LeaseGrant:
    return LeaseGrant(OP_LEASE_GRANT, lease_id, ttl_ms)


def lease_keepalive(lease_id: int) -> LeaseKeepAlive:
    return LeaseKeepAlive(OP_LEASE_KEEPALIVE, lease_id)


def lease_revoke(lease_id: int) -> LeaseRevoke:
    return LeaseRevoke(OP_LEASE_REVOKE, lease_id)


def put_lease(key: bytes, value: bytes, lease_id: int) -> PutLease:
    return PutLease(OP_PUT_LEASE, key, value, lease_id)


def put_ttl(key: bytes, value: bytes, ttl_ms: int) -> PutTTL:
    return PutTTL(OP_PUT_TTL, key, value, ttl_ms)


def cas_lease(key: bytes, expected: bytes | None, new: bytes | None,
              lease_id: int) -> CasLease:
    return CasLease(OP_CAS_LEASE, key, expected, new, lease_id)


def lease_expire(lease_id: int, refreshed_revision: int) -> LeaseExpire:
    return LeaseExpire(OP_LEASE_EXPIRE, lease_id, refreshed_revision)


def backup_fence(fence_id: bytes, until_ms: int) -> BackupFence:
    return BackupFence(OP_BACKUP_FENCE, fence_id, until_ms)


def backup_unfence(fence_id: bytes) -> BackupUnfence:
    return BackupUnfence(OP_BACKUP_UNFENCE, fence_id)


def command_wire(command):
    """``command`` as msgpack carries it (every command is its own wire form but TwoPC)."""
    return command.wire() if type(command) is TwoPC else command


# ------------------------------------------------------------------ incr
#: An incr's delta, and every value it reads or writes, is a signed 64-bit integer (as
#: Redis's INCRBY: a result past it is refused, never wrapped nor widened).
INCR_MIN = -(1 << 63)
INCR_MAX = (1 << 63) - 1
#: The longest stored value an incr reads as an integer: ``-9223372036854775808``.
COUNTER_BYTES_MAX = 20


def is_int64(number) -> bool:
    """Whether ``number`` is an int (not a bool) in the signed 64-bit range: an incr's
    delta as a command carries it, and its result."""
    return type(number) is int and INCR_MIN <= number <= INCR_MAX


def check_delta(delta) -> int:
    """An incr's ``delta`` argument as the API takes it (an int, not a bool, in signed 64
    bits); ``InvalidArgument`` otherwise."""
    if isinstance(delta, bool) or not isinstance(delta, int):
        raise InvalidArgument(f"incr's delta must be an int, not {type(delta).__name__}")
    if not INCR_MIN <= delta <= INCR_MAX:
        raise InvalidArgument(f"incr's delta must be a signed 64-bit integer "
                              f"({INCR_MIN}..{INCR_MAX}), got {delta}")
    return int(delta)  # an int subclass (an IntEnum, say) travels as a plain int


def counter_value(value: bytes | None) -> int | None:
    """The integer a stored value holds for incr (absent: 0), or None if it holds none.

    The format: ASCII decimal digits with an optional ``+`` or ``-`` sign, at most
    ``COUNTER_BYTES_MAX`` bytes in all, within the signed 64-bit range (``b"42"``,
    ``b"-7"``, ``b"+007"``; not ``b""``, ``b" 1"``, ``b"1.0"``, ``b"1_000"``, ``b"0x10"``).
    Checked byte by byte before ``int()`` sees it, so what Python's ``int()`` would
    also take (spaces, underscores, non-ASCII digits) is refused, and no value's length
    costs anything."""
    if value is None:
        return 0
    if not 0 < len(value) <= COUNTER_BYTES_MAX:
        return None
    digits = value[1:] if value[:1] in (b"+", b"-") else value
    if not digits.isdigit():  # bytes.isdigit: ASCII 0-9 only, False for b""
        return None
    number = int(value)
    return number if INCR_MIN <= number <= INCR_MAX else None


def incremented(current: bytes | None, delta) -> int | Result:
    """What an incr of ``delta`` makes of the value ``current`` (None: absent): the new
    value, written back as its canonical decimal (``b"%d"``); or ``NOT_INTEGER`` when
    ``current`` is not a counter (``counter_value``), ``OVERFLOW`` when the sum would leave
    the signed 64-bit range. A refusal changes nothing. Total: a delta that is no int64
    (refused where a command is decoded, so never logged) is an ``OVERFLOW``, not a crash."""
    number = counter_value(current)
    if number is None:
        return NOT_INTEGER
    if not is_int64(delta):
        return OVERFLOW
    total = number + delta
    return total if INCR_MIN <= total <= INCR_MAX else OVERFLOW


def incr_result(command: Incr, result) -> int:
    """The caller's answer to ``command`` from its applied result, the same on every
    engine: the new value, or ``InvalidArgument`` for a refusal (nothing was changed)."""
    if type(result) is int:
        return result
    shown = command.key[:64] + (b"..." if len(command.key) > 64 else b"")
    if result == NOT_INTEGER:
        raise InvalidArgument(
            f"incr: the value of key {shown!r} is not a decimal integer in signed 64 bits "
            f"(ASCII digits, an optional sign, at most {COUNTER_BYTES_MAX} bytes); nothing "
            f"was changed")
    if result == OVERFLOW:
        raise InvalidArgument(
            f"incr: adding {command.delta} to key {shown!r} would leave the signed 64-bit "
            f"range ({INCR_MIN}..{INCR_MAX}); nothing was changed")
    raise KVError(f"incr: an answer that is no incr result: {result!r}"[:200])


# ------------------------------------------------------------------ decoding
def _is_bytes(v) -> bool:
    return type(v) is bytes


def _is_pair(r) -> bool:
    """``[key, revision]`` as a read or a scanned row carries it."""
    return type(r) is list and len(r) == 2 and type(r[0]) is bytes and type(r[1]) is int and r[1] >= 0


_new = tuple.__new__  # a NamedTuple from a checked list, without its __new__'s call


def decode_command(command) -> Command:
    """A command as msgpack decoded it (a list), checked and typed; ``ValueError`` if
    malformed (the sizes are ``check_sizes``'). Checked where it enters a node, so
    every replica applies only commands ``apply_command`` accepts (an error at apply
    would differ nowhere, but would waste a slot)."""
    if type(command) is not list or not command:
        raise ValueError("a command is a non-empty list")
    op, n = command[0], len(command)
    if op == OP_PUT and n == 3 and type(command[1]) is bytes and type(command[2]) is bytes:
        return _new(Put, command)
    if op == OP_DELETE and n == 2 and type(command[1]) is bytes:
        return _new(Delete, command)
    if (op == OP_CAS and n == 4 and type(command[1]) is bytes
            and (command[2] is None or type(command[2]) is bytes)
            and (command[3] is None or type(command[3]) is bytes)):
        return _new(Cas, command)
    if op == OP_INCR and n == 3 and type(command[1]) is bytes and is_int64(command[2]):
        return _new(Incr, command)
    if op == OP_TXN and n == 4:
        _, reads, ranges, writes = command
        if (type(reads) is list and all(_is_pair(r) for r in reads)
                and type(ranges) is list
                and all(type(g) is list and len(g) == 3 and _is_bytes(g[0])
                        and (g[1] is None or _is_bytes(g[1])) and type(g[2]) is list
                        and all(_is_pair(s) for s in g[2]) for g in ranges)
                and type(writes) is list
                and all(type(w) is list and len(w) == 2 and _is_bytes(w[0])
                        and (w[1] is None or _is_bytes(w[1])) for w in writes)):
            return _new(Txn, command)
    if op == OP_2PC and n == 2 and _is_bytes(command[1]):
        return TwoPC(OP_2PC, command[1], decode_2pc(command[1]))  # ValueError if malformed
    if op in LEASE_OPS:
        return _decode_lease_command(command)
    if op in FENCE_OPS:
        return _decode_fence_command(command)
    raise ValueError("malformed command")


def _decode_fence_command(command: list) -> Command:
    op, n = command[0], len(command)
    fence_id = command[1] if n > 1 else None
    if type(fence_id) is bytes and len(fence_id) == FENCE_ID_BYTES:
        if op == OP_BACKUP_FENCE and n == 3 and type(command[2]) is int \
                and 0 <= command[2] < 1 << 63:
            return _new(BackupFence, command)
        if op == OP_BACKUP_UNFENCE and n == 2:
            return _new(BackupUnfence, command)
    raise ValueError(f"malformed backup fence command (op {op}): a fence id is "
                     f"{FENCE_ID_BYTES} bytes, its end a wall-clock time in ms")


def _is_lease_id(v) -> bool:
    return type(v) is int and 1 <= v <= LEASE_ID_MAX


def _is_ttl_ms(v) -> bool:
    return type(v) is int and TTL_MS_MIN <= v <= TTL_MS_MAX


def _decode_lease_command(command: list) -> Command:
    """A lease command, range-checked: a forged id or ttl is a ``ValueError`` (the
    client's ``InvalidArgument``), never logged."""
    op, n = command[0], len(command)
    if op == OP_LEASE_GRANT and n == 3 and _is_lease_id(command[1]) and _is_ttl_ms(command[2]):
        return _new(LeaseGrant, command)
    if op == OP_LEASE_KEEPALIVE and n == 2 and _is_lease_id(command[1]):
        return _new(LeaseKeepAlive, command)
    if op == OP_LEASE_REVOKE and n == 2 and _is_lease_id(command[1]):
        return _new(LeaseRevoke, command)
    if (op == OP_PUT_LEASE and n == 4 and type(command[1]) is bytes
            and type(command[2]) is bytes and _is_lease_id(command[3])):
        return _new(PutLease, command)
    if (op == OP_PUT_TTL and n == 4 and type(command[1]) is bytes
            and type(command[2]) is bytes and _is_ttl_ms(command[3])):
        return _new(PutTTL, command)
    if (op == OP_CAS_LEASE and n == 5 and type(command[1]) is bytes
            and (command[2] is None or type(command[2]) is bytes)
            and (command[3] is None or type(command[3]) is bytes) and _is_lease_id(command[4])):
        return _new(CasLease, command)
    if (op == OP_LEASE_EXPIRE and n == 3 and type(command[1]) is int
            and 1 <= command[1] <= LEASE_ID_ANY_MAX and type(command[2]) is int
            and 0 <= command[2] < 1 << 64):
        return _new(LeaseExpire, command)
    raise ValueError(f"malformed lease command (op {op}): a lease id is in 1..{LEASE_ID_MAX}, "
                     f"a ttl in {TTL_MS_MIN}..{TTL_MS_MAX} ms")


class ClientCommand(NamedTuple):
    """A client's write as a node logs it: the command inside the client's session (a
    retry takes effect once; ``seq`` below ``floor`` were all answered)."""

    client_id: bytes
    seq: int
    floor: int
    command: Command


def _check_session(client_id, seq, floor, where: str) -> None:
    """``ValueError`` unless ``(client_id, seq, floor)`` is a session a node logs."""
    if type(client_id) is not bytes or not 0 < len(client_id) <= CLIENT_ID_MAX_BYTES:
        raise ValueError("bad client id" + where)
    if type(seq) is not int or type(floor) is not int or not 0 <= floor <= seq < 1 << 64:
        raise ValueError("bad sequence numbers" + where)


def client_command(client_id: bytes, seq: int, floor: int, command: list,
                   where: str = "") -> ClientCommand:
    """A client's write as a request carries it (msgpack's lists), checked and typed
    (sizes included); ``ValueError`` if anything is out of shape (``where`` ends its
    message)."""
    _check_session(client_id, seq, floor, where)
    typed = decode_command(command)
    typed.check_sizes()
    return _new(ClientCommand, (client_id, seq, floor, typed))


def encode_client_command(client_id: bytes, seq: int, floor: int, command) -> bytes:
    """A client write as a log command: msgpack ``[client_id, seq, floor, command]``
    (``command`` typed, or a list as msgpack decoded it)."""
    return msgpack.packb((client_id, seq, floor, command_wire(command)), use_bin_type=True)


def decode_logged_command(raw) -> ClientCommand:
    """A log command (``encode_client_command``'s bytes) checked and typed, as
    ``apply_client_command`` takes it; ``ValueError`` for anything it could not apply:
    bytes that do not decode, a bad session, an unknown op or shape, a key or value
    over its size limit."""
    if type(raw) is not bytes:
        raise ValueError("a logged command is bytes")
    try:
        decoded = msgpack.unpackb(raw, raw=False, use_list=True)
    except Exception as e:  # msgpack raises several unrelated classes
        raise ValueError(f"undecodable command: {type(e).__name__}") from None
    if type(decoded) is not list or len(decoded) != 4:
        raise ValueError("a logged command is [client_id, seq, floor, command]")
    return client_command(*decoded, " in a logged command")


def session_of(raw: bytes) -> tuple:
    """``(client_id, seq)`` of a log command this node encoded (a dropped proposal)."""
    client_id, seq, _floor, _command = msgpack.unpackb(raw, raw=False, use_list=True)
    return client_id, seq


class DecodedCommands:
    """Log commands this node has decoded, by their bytes, until they are applied: a
    write is decoded once on each node (its intake, or the check of a peer's record),
    and apply takes the typed record from here. Bounded in bytes: past the bound it is
    emptied, and apply decodes what it does not find (the same bytes decode to the same
    command, so a stale entry is never wrong, only kept too long)."""

    BYTES_MAX = 64 * 1024 * 1024

    def __init__(self) -> None:
        self._typed: dict = {}
        self._bytes = 0

    def add(self, raw: bytes, command: ClientCommand) -> None:
        if self._bytes + len(raw) > self.BYTES_MAX:
            self._typed.clear()
            self._bytes = 0
        if raw not in self._typed:
            self._bytes += len(raw)
        self._typed[raw] = command

    def take(self, raw: bytes) -> ClientCommand:
        """The typed command for ``raw`` (forgotten here), decoding it if not known;
        ``ValueError`` as ``decode_logged_command``."""
        typed = self._typed.pop(raw, None)
        if typed is None:
            return decode_logged_command(raw)
        self._bytes -= len(raw)
        return typed

    def forget(self, raw: bytes) -> None:
        if self._typed.pop(raw, None) is not None:
            self._bytes -= len(raw)

    def __len__(self) -> int:
        return len(self._typed)


# ------------------------------------------------------------------ embedded log batches
def encode_commands(commands: list) -> bytes:
    """The payload of one embedded log entry holding ``commands``."""
    return msgpack.packb(commands, use_bin_type=True)


def decode_commands(payload: bytes, slot: int | None = None) -> list:
    """Inverse of ``encode_commands``; a payload that does not parse is a CorruptRecord."""
    try:
        commands = msgpack.unpackb(payload, raw=False, use_list=True)
    except Exception as e:  # msgpack raises several unrelated classes
        raise CorruptRecord(f"undecodable command batch in slot {slot}: {e}", slot=slot) from e
    if not isinstance(commands, list):
        raise CorruptRecord(f"command batch in slot {slot} is not a list", slot=slot)
    return commands
