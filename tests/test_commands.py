"""The command vocabulary (kvstore.commands): typed in memory, the same bytes as ever on the
wire and in the log, decoded once where a write enters a node."""

import msgpack
import pytest

from kvstore.commands import (LOCKED, OP_2PC, OP_CAS, OP_DELETE, OP_PUT, OP_TXN, Cas, ClientCommand,
                              DecodedCommands, Delete, Put, Txn, TwoPC, cas, client_command,
                              decode_logged_command, delete, encode_client_command, put, two_pc, txn)
from kvstore.errors import InvalidArgument
from kvstore.txn import TxnDecision, TxnPrepare
from kvstore.txn import encode as encode_2pc

PREPARE = TxnPrepare(b"t" * 16, 0, (0, 1), ((b"r", 3),), ((b"w", b"v"), (b"d", None)), 123, False)

# each typed command and the list the wire and the log have always carried for it
SHAPES = [
    (put(b"k", b"v"), [OP_PUT, b"k", b"v"]),
    (delete(b"k"), [OP_DELETE, b"k"]),
    (cas(b"k", None, b"new"), [OP_CAS, b"k", None, b"new"]),
    (txn([[b"a", 1]], [[b"lo", None, [[b"lo1", 2]]]], [[b"a", b"x"], [b"b", None]]),
     [OP_TXN, [[b"a", 1]], [[b"lo", None, [[b"lo1", 2]]]], [[b"a", b"x"], [b"b", None]]]),
    (two_pc(PREPARE), [OP_2PC, encode_2pc(PREPARE)]),
]


@pytest.mark.parametrize("typed,old", SHAPES, ids=lambda v: type(v).__name__)
def test_a_logged_command_is_the_bytes_it_always_was_and_decodes_typed(typed, old):
    raw = encode_client_command(b"client", 7, 5, typed)
    assert raw == msgpack.packb([b"client", 7, 5, old], use_bin_type=True)
    logged = decode_logged_command(raw)
    assert isinstance(logged, ClientCommand) and logged[:3] == (b"client", 7, 5)
    assert type(logged.command) is type(typed) and logged.command == typed


def test_a_2pc_command_carries_its_entry_decoded():
    logged = decode_logged_command(encode_client_command(b"c", 1, 1, two_pc(PREPARE)))
    assert type(logged.command) is TwoPC and logged.command.entry == PREPARE
    assert logged.command.keys() == [b"r", b"w", b"d"]
    assert two_pc(TxnDecision(b"t" * 16, 1)).keys() == []


def test_typed_commands_say_their_keys():
    assert put(b"k", b"v").keys() == delete(b"k").keys() == cas(b"k", None, None).keys() == [b"k"]
    assert SHAPES[3][0].keys() == [b"a", b"a", b"b", b"lo1"]
    assert (Put, Delete, Cas, Txn) == tuple(type(t) for t, _ in SHAPES[:4])


@pytest.mark.parametrize("args,why", [
    ([b"", 1, 1, [OP_PUT, b"k", b"v"]], "client id"),
    ([b"c", 1, 2, [OP_PUT, b"k", b"v"]], "sequence"),
    ([b"c", 1, 1, [OP_PUT, b"k"]], "malformed"),
    ([b"c", 1, 1, [99, b"k"]], "malformed"),
    ([b"c", 1, 1, [OP_TXN, [[b"a", -1]], [], []]], "malformed"),
    ([b"c", 1, 1, [OP_2PC, b"\x93junk"]], "2PC"),
])
def test_a_command_out_of_shape_is_refused_at_intake_and_in_a_log(args, why):
    with pytest.raises(ValueError, match=why):
        client_command(*args)
    with pytest.raises(ValueError, match=why):
        decode_logged_command(msgpack.packb(args, use_bin_type=True))


def test_sizes_are_checked_where_a_write_enters():
    with pytest.raises(InvalidArgument):
        client_command(b"c", 1, 1, [OP_PUT, b"k" * 600, b"v"])
    with pytest.raises(ValueError):
        decode_logged_command(encode_client_command(b"c", 1, 1, [OP_PUT, b"k" * 600, b"v"]))


def test_locked_crosses_the_wire_as_the_string_it_always_was():
    assert msgpack.packb(LOCKED) == msgpack.packb("locked")
    assert msgpack.unpackb(msgpack.packb(LOCKED)) == LOCKED and f"{LOCKED}" == "locked"


def test_decoded_commands_hand_over_what_intake_decoded_and_decode_what_they_miss():
    memo = DecodedCommands()
    raw = encode_client_command(b"c", 1, 1, put(b"k", b"v"))
    typed = client_command(b"c", 1, 1, [OP_PUT, b"k", b"v"])
    memo.add(raw, typed)
    assert memo.take(raw) is typed  # not decoded again
    assert len(memo) == 0
    again = memo.take(raw)  # a miss (a restart's replay): decoded and checked here
    assert again == typed and again is not typed
    with pytest.raises(ValueError):
        memo.take(b"\xc1")


def test_decoded_commands_are_bounded_in_bytes():
    class Small(DecodedCommands):
        BYTES_MAX = 100

    memo = Small()
    raws = [encode_client_command(b"c", i, i, put(b"k", b"v" * 20)) for i in range(1, 10)]
    for raw in raws:
        memo.add(raw, decode_logged_command(raw))
        assert len(memo) * len(raw) <= 100
    assert memo.take(raws[0]) == decode_logged_command(raws[0])  # forgotten, decoded again
