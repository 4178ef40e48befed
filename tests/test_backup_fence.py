"""The backup fence as a shard's state (``kvstore.machine.fence``), through the state
machine's own entry point (``apply_client_command``), on a real LMDB table.

Each claim of the cut argument (``kvstore.backup.cluster``) that rests on the state
machine has a test: a fenced shard refuses new prepares (and remembers the refusal,
so a late copy cannot prepare after all), lets duplicates, late copies and read-only
prepares through, lapses only for a prepare taken in after its end (and then says so
to the backup's own unfence), and its drain test sees prepared transactions.
"""

from __future__ import annotations

import pytest

from kvstore.commands import (ClientCommand, backup_fence, backup_unfence, decode_command,
                              two_pc)
from kvstore.machine.fence import FENCE_MS_MAX, bound_fence, fence_of, prepared_any
from kvstore.machine.replica import SessionCache, apply_client_command
from kvstore.machine.twopc import TXN_DEADLINE_MAX_MS
from kvstore.storage import Storage
from kvstore.txn import ABORT, COMMIT, LOCK_ONLY, TxnPrepare, TxnResolve

FENCE = b"F" * 16
UNTIL = 1_000_000


class Shard:
    """One shard's tables and a client session, commands applied one slot each."""

    def __init__(self, path) -> None:
        self.storage = Storage(str(path), shards=1)
        self.tables = self.storage.shards[0]
        self.slot = 0
        self.seq = 0

    def apply(self, command):
        self.slot += 1
        self.seq += 1

        def write(txn):
            sessions = SessionCache(txn, self.tables.txns)
            _key, result = apply_client_command(txn, self.tables, self.slot,
                                                ClientCommand(b"c", self.seq, 0, command),
                                                sessions)
            sessions.flush()
            return result

        return self.storage.write(write)

    def read(self, fn):
        return self.storage.read(lambda txn: fn(txn, self.tables))


@pytest.fixture
def shard(tmp_path):
    s = Shard(tmp_path / "s")
    yield s
    s.storage.close()


def prepare(txn_id: bytes, deadline: int = UNTIL, reads=(), writes=((b"k", b"v"),),
            read_only: bool = False):
    return two_pc(TxnPrepare(txn_id * 16, 0, (0, 1), tuple(reads), tuple(writes), deadline,
                             read_only))


def test_a_fenced_shard_refuses_new_prepares_and_remembers_it(shard):
    assert shard.apply(backup_fence(FENCE, UNTIL)) is True
    assert shard.read(fence_of) == (FENCE, UNTIL)
    assert shard.apply(prepare(b"a")) is False
    assert not shard.read(prepared_any)
    assert shard.apply(backup_unfence(FENCE)) is True
    assert shard.read(fence_of) is None
    assert shard.apply(prepare(b"a")) is False  # a late copy of the refused one stays refused
    assert shard.apply(prepare(b"b")) is True  # a new transaction prepares again
    assert shard.read(prepared_any)


def test_a_locking_read_prepare_is_refused_in_its_shape(shard):
    shard.apply(backup_fence(FENCE, UNTIL))
    assert shard.apply(prepare(b"a", reads=((b"k", LOCK_ONLY),), writes=())) == [False, []]


def test_duplicates_late_copies_and_read_only_prepares_pass_a_fence(shard):
    assert shard.apply(prepare(b"a")) is True  # prepared before the fence
    shard.apply(backup_fence(FENCE, UNTIL))
    assert shard.apply(prepare(b"a")) is True  # its duplicate: nothing new held
    assert shard.apply(prepare(b"r", writes=(), read_only=True)) is True
    assert shard.read(prepared_any)
    resolve = two_pc(TxnResolve(b"a" * 16, COMMIT))
    shard.apply(resolve)  # the drain: its decision carried out
    assert not shard.read(prepared_any)
    assert shard.apply(prepare(b"a")) is True  # a late copy of a finished one: as before


def test_a_fence_lapses_only_for_a_prepare_taken_in_after_its_end(shard):
    shard.apply(backup_fence(FENCE, UNTIL))
    assert shard.apply(prepare(b"a", deadline=UNTIL + TXN_DEADLINE_MAX_MS)) is False
    assert shard.apply(prepare(b"b", deadline=UNTIL + TXN_DEADLINE_MAX_MS + 1)) is True
    assert shard.read(fence_of) is None
    assert shard.apply(backup_unfence(FENCE)) is False  # the backup learns its cut is void


def test_only_its_own_fence_is_lifted(shard):
    shard.apply(backup_fence(FENCE, UNTIL))
    assert shard.apply(backup_unfence(b"G" * 16)) is False
    assert shard.read(fence_of) == (FENCE, UNTIL)
    shard.apply(backup_fence(b"G" * 16, UNTIL))  # a newer backup's fence replaces it
    assert shard.apply(backup_unfence(FENCE)) is False


def test_a_fence_refuses_then_aborts_cleanly(shard):
    """A transaction refused by the fence leaves no lock: a later write of its key goes."""
    from kvstore.commands import put
    shard.apply(backup_fence(FENCE, UNTIL))
    shard.apply(prepare(b"a"))
    shard.apply(two_pc(TxnResolve(b"a" * 16, ABORT)))
    assert shard.apply(put(b"k", b"w")) is None


def test_the_node_bounds_a_fence_by_its_clock():
    far = backup_fence(FENCE, 1 << 62)
    assert bound_fence(far, 5000).until_ms == 5000 + FENCE_MS_MAX
    near = backup_fence(FENCE, 6000)
    assert bound_fence(near, 5000) is near


@pytest.mark.parametrize("wire", [
    [15, b"short", 1], [15, FENCE], [15, FENCE, -1], [15, FENCE, "1"], [16], [16, FENCE, 1],
    [16, b"x" * 17], [15, FENCE, 1 << 63],
])
def test_malformed_fence_commands_are_refused(wire):
    with pytest.raises(ValueError):
        decode_command(wire)


def test_fence_commands_decode_as_sent():
    assert decode_command([15, FENCE, 7]) == backup_fence(FENCE, 7)
    assert decode_command([16, FENCE]) == backup_unfence(FENCE)
