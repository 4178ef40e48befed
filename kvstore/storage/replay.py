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
leave entries whose commit point or promise was lost. An entry stands if a
promise made by the end of its own append covers its ballot, or if it is at
or below the shard's commit point (a chosen value, whatever its ballot).
Otherwise it is one of those, and is dropped: the entry it replaced, from an
earlier append, stands again. The promise is the one of its own append's end,
not the log's last: the whole records of a torn append stay in the log, and a
promise the node made in a later life (which never held them) must not bring
them back (seed 3755 of the real-node sweep: an acceptance at 4.2 torn from
its promise, dropped at the next restart, the node then promised 5.0 without
it and lost its next append; at the restart after that, the promise of 5.0
covered the old record, and a value the new leader had overwritten came back
as a vote for 4.2: two values chosen at one slot). The embedded store makes
no promise (its ``promised`` stays -1): an entry of it above the commit point
is always one whose commit point was torn off, so it is never chosen.

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
           base: list[tuple[int, int]] | None = None,
           base_position: int = 0) -> list[ShardLog]:
    """Per shard, the promise, commit point and entries of ``records``
    (``WriteAheadLog.replay_groups``), torn acceptances dropped (module docstring).

    ``base``: per shard, the checkpoint's ``(promised, commit)``, which the log's
    only raise. Its promise covers the appends from ``base_position`` (the checkpoint's
    log position) on: an append before it is judged by the promises the log shows up to
    its end, as when it was first replayed (a checkpoint made after a later promise does
    not vouch for records the node had already dropped; the checkpoint holds what the
    node held, and stands where the log says nothing). A record of a shard past
    ``shards`` is ``CorruptRecord``.
    """
    logs = [ShardLog() for _ in range(shards)]
    if base is not None:
        for log, (promised, commit) in zip(logs, base):
            log.commit = commit
            log.promised = promised if base_position <= 0 else -1
    # slot -> (position, entry) per shard: the last entry its append's promise covered,
    # and the last one it did not (standing only if the final commit point covers it)
    covered: list[dict] = [{} for _ in range(shards)]
    uncovered: list[dict] = [{} for _ in range(shards)]
    appended: list = []  # (shard, position, entry) of the append being read
    current = None
    pending_base = base is not None and base_position > 0
    for position, group, r in records:
        if group != current:
            _settle(appended, logs, covered, uncovered)
            current = group
            if pending_base and group >= base_position:
                _raise_promises(logs, base)
                pending_base = False
        kind = r.kind
        if kind == KIND_ENTRY:
            _shard_log(logs, r.shard, position)
            appended.append((r.shard, position, LogEntry(r.slot, r.ballot, r.tag, r.payload)))
        elif kind == KIND_PROMISE:
            log = _shard_log(logs, r.shard, position)
            if r.ballot > log.promised:
                log.promised = r.ballot
        elif kind == KIND_COMMIT_POINT:
            for shard, slot in commit_pairs(r):
                log = _shard_log(logs, shard, position)
                if slot > log.commit:
                    log.commit = slot
    _settle(appended, logs, covered, uncovered)
    if pending_base:
        _raise_promises(logs, base)
    for log, kept, rest in zip(logs, covered, uncovered):
        for slot, (position, entry) in rest.items():
            if slot <= log.commit and position > kept.get(slot, (-1,))[0]:
                kept[slot] = (position, entry)  # a chosen value: its ballot does not matter
        log.entries = {slot: entry for slot, (_position, entry) in sorted(kept.items())}
    return logs


def _raise_promises(logs: list, base: list) -> None:
    for log, (promised, _commit) in zip(logs, base):
        if promised > log.promised:
            log.promised = promised


def _settle(appended: list, logs: list, covered: list, uncovered: list) -> None:
    """Sort the entries of the append just read by the promise made by its end."""
    for shard, position, entry in appended:
        side = covered if entry.ballot <= logs[shard].promised else uncovered
        side[shard][entry.slot] = (position, entry)
    appended.clear()


def _shard_log(logs: list, shard: int, position: int) -> ShardLog:
    if not 0 <= shard < len(logs):
        raise CorruptRecord(f"a log record of shard {shard} at position {position}; this "
                            f"directory has {len(logs)} shard(s)", offset=position)
    return logs[shard]


__all__ = ["LogEntry", "ShardLog", "replay", "entry_record", "commit_point", "commit_pairs"]
