"""A backup's fence as a shard's replicated state: while it holds, no new cross-shard
transaction prepares on the shard, so its prepared set drains and stays empty.

The cut argument that uses it is in ``kvstore.backup.cluster``. Here is what a
shard's state machine does, on every replica alike (safety rule 4: in the same
write as everything else the entry changes)::

    FENCE_KEY -> fence id (16 bytes) + until (8 bytes, big-endian wall-clock ms)

in the shard's ``txns`` table. ``BackupFence`` sets it (a newer fence replaces an
older one), ``BackupUnfence`` removes it if it is still that fence's, and says
so (True) or not (False). A ``TxnPrepare`` that meets a fence votes no (the
transaction aborts and its client retries it), unless it is read-only (it
takes no locks and writes nothing), a duplicate of a prepare already held, or
a late copy of a transaction already finished here: those are answered as
``kvstore.machine.twopc`` always answers them.

No clock is read here. The fence lapses deterministically: a prepare whose
deadline (which the node that took it in cut to at most ``TXN_DEADLINE_MAX_MS``
past its own clock) is later than ``until + TXN_DEADLINE_MAX_MS`` was taken in
after ``until``: it removes the fence and prepares as usual. So a fence whose
backup client died stops refusing transactions some seconds after ``until``,
and a backup whose fence lapsed learns it from its own ``BackupUnfence``
(False) and is thrown away.

``prepared_any`` is the drain's test: the shard holds no prepared transaction.
"""

from __future__ import annotations

from kvstore.commands import OP_BACKUP_FENCE, BackupFence, BackupUnfence
from kvstore.machine.twopc import TXN_DEADLINE_MAX_MS, TXN_PREPARED, participant
from kvstore.txn import ABORT, LOCK_ONLY, TxnPrepare

FENCE_KEY = b"\x00backup.fence"
#: The longest a fence may hold, in the node's wall-clock ms past the moment it enters
#: (``bound_fence``): a backup must open its read point within this.
FENCE_MS_MAX = 30_000


def bound_fence(command: BackupFence, now_ms: int) -> BackupFence:
    """A client's fence as the node proposes it: its end cut to ``now_ms + FENCE_MS_MAX``."""
    until = min(command.until_ms, now_ms + FENCE_MS_MAX)
    return command if until == command.until_ms else command._replace(until_ms=until)


def fence_of(txn, tables) -> tuple[bytes, int] | None:
    """``(fence id, until_ms)`` of the fence this shard holds, or None."""
    raw = txn.get(FENCE_KEY, db=tables.txns)
    if raw is None:
        return None
    raw = bytes(raw)
    return raw[:16], int.from_bytes(raw[16:24], "big")


def apply_fence(txn, tables, command: BackupFence | BackupUnfence) -> bool:
    """Apply a ``BackupFence`` (True) or a ``BackupUnfence`` (True if it lifted its fence)."""
    if command.op == OP_BACKUP_FENCE:
        txn.put(FENCE_KEY, command.fence_id + command.until_ms.to_bytes(8, "big"),
                db=tables.txns)
        return True
    held = fence_of(txn, tables)
    if held is None or held[0] != command.fence_id:
        return False
    txn.delete(FENCE_KEY, db=tables.txns)
    return True


def fenced_vote(txn, tables, entry):
    """The vote of a 2PC ``entry`` that the shard's fence refuses (``False``, or
    ``[False, []]`` for a prepare with locking reads), or None: apply it as usual
    (no fence, not a new prepare, or the fence lapsed: then it is removed here)."""
    if type(entry) is not TxnPrepare or entry.read_only:
        return None
    held = fence_of(txn, tables)
    if held is None:
        return None
    if entry.deadline > held[1] + TXN_DEADLINE_MAX_MS:
        txn.delete(FENCE_KEY, db=tables.txns)  # lapsed: its backup is thrown away
        return None
    state = participant(txn, tables)
    if entry.txn_id in state.finished:
        return None  # a late copy: answered from what was carried out
    prepared = state.prepared.get(entry.txn_id)
    if prepared is not None:
        if prepared.writes or not entry.writes:
            return None  # a duplicate: nothing new is prepared
        return _no(entry)  # a locking read's writes: it keeps its locks until its ABORT
    state.finished[entry.txn_id] = ABORT  # a later copy must not prepare it after all
    return _no(entry)


def _no(entry: TxnPrepare):
    return [False, []] if any(r == LOCK_ONLY for _k, r in entry.reads) else False


def prepared_any(txn, tables) -> bool:
    """Whether the shard holds a prepared (undecided here) cross-shard transaction."""
    cursor = txn.cursor(tables.txns)
    try:
        if not cursor.set_range(TXN_PREPARED):
            return False
        for key, _raw in cursor.iternext():
            return bytes(key).startswith(TXN_PREPARED)
        return False
    finally:
        cursor.close()


__all__ = ["FENCE_KEY", "FENCE_MS_MAX", "bound_fence", "fence_of", "apply_fence", "fenced_vote",
           "prepared_any"]
