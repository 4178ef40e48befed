"""One replay of the write-ahead log, for the embedded store and a cluster node alike.

Both engines write the same records (``kvstore.storage.wal``): a shard's
entries (``KIND_ENTRY``: slot, ballot, entry kind and payload, one checksum),
its promises (``KIND_PROMISE``, a node's only) and commit points
(``KIND_COMMIT_POINT``: ``(shard, slot)`` pairs, ``commit_point``). After a
restart ``replay`` reads the log kept after the checkpoint and gives, per
shard, what it adds: the highest promise, the highest commit point and the
entries by slot, a later record for a slot replacing an earlier one (a slot
is written again after a torn append, or accepted again at a higher ballot).

A torn append is handled here, once for both engines. The log itself cuts a
torn tail (``WriteAheadLog.open``); what stays are whole records of an append
the crash cut short, never acknowledged. Each append puts a shard's commit
point after its entries and a node's promise last, so such an append can
leave entries whose commit point or promise was lost: an entry above its
shard's commit point accepted at a ballot the promise does not cover is one
of those, and is dropped (the entry it replaced, from an earlier, durable
append, stands again). The embedded store makes no promise (its ``promised``
stays -1): an entry of it above the commit point is always one whose commit
point was torn off, so it is never chosen. At or below the commit point an
entry is a chosen value, whatever its ballot.

What each engine then does with the result is its own: the embedded store
applies each shard's entries up to its commit point
(``kvstore.embedded.recovery``); a node rebuilds the Paxos records of the
entries, checks the whole state (``check_recovered``) and hands it to its
replicas (``kvstore.node.storage``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Iterable, NamedTuple

from kvstore.errors import CorruptRecord
from kvstore.storage.wal import KIND_COMMIT_POINT, KIND_ENTRY, KIND_PROMISE, Record

_PAIR = struct.Struct("<HQ")  # (shard, slot) in a commit point's payload


class LogEntry(NamedTuple):
    """A shard's log entry as the log holds it (``kind`` is the entry's own kind)."""
    slot: int
    ballot: int
    kind: int
    payload: bytes


def entry_record(shard: int, entry: LogEntry) -> Record:
    """The log record of ``entry``: its fields in the record's header and prefix."""
    return Record(KIND_ENTRY, shard, entry.slot, entry.ballot, entry.payload, entry.kind)


def commit_point(chosen: list[tuple[int, int]]) -> Record:
    """The record that chooses ``(shard, slot)`` pairs: the first in the header, any others
    in the payload (a node writes one per shard, the embedded store one per append)."""
    (shard, slot), rest = chosen[0], chosen[1:]
    return Record(KIND_COMMIT_POINT, shard, slot, 0,
                  b"".join(_PAIR.pack(s, n) for s, n in rest))


def commit_pairs(record: Record) -> list[tuple[int, int]]:
    """Inverse of ``commit_point``."""
    payload = record.payload
    if len(payload) % _PAIR.size:
        raise CorruptRecord(f"a commit point of {len(payload)} payload bytes")
    return [(record.shard, record.slot)] + [_PAIR.unpack_from(payload, i)
                                            for i in range(0, len(payload), _PAIR.size)]


@dataclass(slots=True)
class ShardLog:
    """What the log adds to one shard's checkpointed state (``replay``)."""
    promised: int = -1  # the highest promise, or -1
    commit: int = -1  # the highest chosen slot, or -1
    entries: dict = field(default_factory=dict)  # slot -> LogEntry, the one that stands


def replay(records: Iterable[tuple[int, int, Record]], shards: int,
           base: list[tuple[int, int]] | None = None) -> list[ShardLog]:
    """Per shard, the promise, commit point and entries of ``records``
    (``WriteAheadLog.replay_groups``), torn acceptances dropped (module docstring).

    ``base``: per shard, the checkpoint's ``(promised, commit)``, which the log's
    only raise. A record of a shard past ``shards`` is ``CorruptRecord``.
    """
    logs = [ShardLog() if base is None else ShardLog(*base[s]) for s in range(shards)]
    replaced: list[dict] = [{} for _ in range(shards)]  # slot -> the entry a later one replaced
    for position, _group, r in records:
        kind = r.kind
        if kind == KIND_ENTRY:
            log = _shard_log(logs, r.shard, position)
            entries = log.entries
            old = entries.get(r.slot)
            if old is not None:
                replaced[r.shard][r.slot] = old
            entries[r.slot] = LogEntry(r.slot, r.ballot, r.tag, r.payload)
        elif kind == KIND_PROMISE:
            log = _shard_log(logs, r.shard, position)
            if r.ballot > log.promised:
                log.promised = r.ballot
        elif kind == KIND_COMMIT_POINT:
            for shard, slot in commit_pairs(r):
                log = _shard_log(logs, shard, position)
                if slot > log.commit:
                    log.commit = slot
    for log, earlier in zip(logs, replaced):
        _drop_torn(log, earlier)
    return logs


def _shard_log(logs: list, shard: int, position: int) -> ShardLog:
    if not 0 <= shard < len(logs):
        raise CorruptRecord(f"a log record of shard {shard} at position {position}; this "
                            f"directory has {len(logs)} shard(s)", offset=position)
    return logs[shard]


def _drop_torn(log: ShardLog, replaced: dict) -> None:
    """Drop the entries of a torn append (module docstring); what they replaced stands."""
    promised, commit, entries = log.promised, log.commit, log.entries
    for slot in [s for s, e in entries.items() if s > commit and e.ballot > promised]:
        earlier = replaced.get(slot)
        if earlier is not None and earlier.ballot <= promised:
            entries[slot] = earlier
        else:
            del entries[slot]


__all__ = ["LogEntry", "ShardLog", "replay", "entry_record", "commit_point", "commit_pairs"]
