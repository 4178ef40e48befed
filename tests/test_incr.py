"""``incr``: one command (``kvstore.commands.Incr``) that the state machine applies, the same
on the embedded store and on a node: its codec, its value rule, its refusals, its place in
the client session table and under a prepared transaction's lock, and the CLI's ``incr``
and ``cas`` on an embedded store. The cluster's side, over real servers, is in
``tests/test_cluster_incr.py``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kvstore
from kvstore._native import encode_record
from kvstore.commands import (COUNTER_BYTES_MAX, INCR_MAX, INCR_MIN, NOT_INTEGER, OP_INCR, OVERFLOW,
                              POISONED, STALE, ClientCommand, Incr, client_command, counter_value,
                              decode_logged_command, encode_client_command, incr, incr_result,
                              incremented)
from kvstore.machine.replica import ShardWrite
from kvstore.node.storage import WalReplicaStorage
from kvstore.paxos import KIND_BATCH, Message, make_ballot
from kvstore.paxos import messages as M
from kvstore.paxos.batch import encode_batch
from kvstore.paxos.replica import Entry
from kvstore.transport import wire

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
int64s = st.integers(INCR_MIN, INCR_MAX)
keys = st.binary(min_size=1, max_size=kvstore.MAX_KEY_SIZE)


# ---------------------------------------------------------------------- the command
@settings(max_examples=200, deadline=None)
@given(keys, int64s, st.binary(min_size=1, max_size=64), st.integers(1, 1 << 40))
def test_an_incr_round_trips_through_the_log_and_the_wire_typed(key, delta, client, seq):
    typed = incr(key, delta)
    raw = encode_client_command(client, seq, seq, typed)
    assert raw == msgpack.packb([client, seq, seq, [OP_INCR, key, delta]], use_bin_type=True)
    logged = decode_logged_command(raw)
    assert isinstance(logged, ClientCommand) and type(logged.command) is Incr
    assert logged.command == typed and logged.command.keys() == [key]
    # a request carries the same list; intake decodes it to the same command
    assert client_command(client, seq, seq, [OP_INCR, key, delta]).command == typed


@pytest.mark.parametrize("command,why", [
    ([OP_INCR, b"k"], "malformed"),
    ([OP_INCR, b"k", 1, 2], "malformed"),
    ([OP_INCR, "k", 1], "malformed"),            # a key is bytes
    ([OP_INCR, None, 1], "malformed"),
    ([OP_INCR, b"k", True], "malformed"),        # a bool is no delta
    ([OP_INCR, b"k", 1.5], "malformed"),
    ([OP_INCR, b"k", b"1"], "malformed"),
    ([OP_INCR, b"k", None], "malformed"),
    ([OP_INCR, b"k", 1 << 63], "malformed"),     # past int64 (msgpack carries up to 2**64-1)
    ([OP_INCR, b"k", (1 << 64) - 1], "malformed"),
    ([OP_INCR, b"", 1], "empty"),
    ([OP_INCR, b"k" * 512, 1], "MAX_KEY_SIZE"),
])
def test_a_malformed_incr_is_refused_at_intake_and_in_a_log(command, why):
    with pytest.raises(ValueError, match=why):
        client_command(b"c", 1, 1, command)
    with pytest.raises(ValueError, match=why):
        decode_logged_command(msgpack.packb([b"c", 1, 1, command], use_bin_type=True))


def test_a_peers_record_holding_a_malformed_incr_is_refused_before_it_is_accepted():
    a, b = 0, 1
    ballot = make_ballot(2, a)

    def accept(*commands):
        rec = encode_record(0, ballot, KIND_BATCH, encode_batch(list(commands)))
        m = Message(M.ACCEPT, b, a, ballot=ballot, commit_index=-1, records=(rec,))
        return wire.check_paxos_message(m, b, 3, decode_logged_command)

    assert accept(encode_client_command(b"c", 1, 1, incr(b"k", -3))) is None
    for delta in (True, 1 << 63, 2.5, b"1"):
        assert "slot 0" in accept(encode_client_command(b"c", 1, 1, [OP_INCR, b"k", delta]))


# ---------------------------------------------------------------------- the value rule
def _reference(value: bytes):
    """What ``counter_value`` must say, written the obvious way."""
    if not re.fullmatch(rb"[+-]?[0-9]+", value) or len(value) > COUNTER_BYTES_MAX:
        return None
    n = int(value.decode("ascii"))
    return n if INCR_MIN <= n <= INCR_MAX else None


values = st.one_of(
    st.binary(max_size=24),
    st.text(alphabet="0123456789+- _.x\u0663", max_size=24).map(lambda t: t.encode()),
    int64s.map(lambda n: b"%d" % n),
    st.integers(-(1 << 70), 1 << 70).map(lambda n: b"%d" % n))


@settings(max_examples=500, deadline=None)
@given(values)
def test_a_counter_is_ascii_decimal_with_an_optional_sign_in_64_bits(value):
    assert counter_value(value) == _reference(value)


def test_counter_examples():
    assert counter_value(None) == 0  # absent
    assert [counter_value(v) for v in (b"42", b"-7", b"+007", b"-0", b"9223372036854775807",
                                       b"-9223372036854775808")] == [42, -7, 7, 0, INCR_MAX, INCR_MIN]
    for bad in (b"", b" 1", b"1 ", b"1.0", b"1_000", b"0x10", b"+", b"-", b"--1", b"1e3",
                "\u0663".encode(), b"9223372036854775808", b"0" * 21, b"1" * 5000):
        assert counter_value(bad) is None, bad


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.none(), values),
       st.one_of(st.integers(-(1 << 80), 1 << 80), st.booleans(), st.floats(), st.binary(),
                 st.none()))
def test_incremented_is_total_and_exact(current, delta):
    """Whatever a log or a peer could hold, applying it never raises (a hostile delta
    included): the exact sum within int64, or a refusal that writes nothing."""
    result = incremented(current, delta)
    number = counter_value(current)
    if number is None:
        assert result is NOT_INTEGER
    elif type(delta) is not int or not INCR_MIN <= delta <= INCR_MAX:
        assert result is OVERFLOW
    elif INCR_MIN <= number + delta <= INCR_MAX:
        assert result == number + delta and type(result) is int
    else:
        assert result is OVERFLOW


def test_incr_result_is_the_callers_answer():
    command = incr(b"k", 5)
    assert incr_result(command, 12) == 12
    with pytest.raises(kvstore.InvalidArgument, match="not a decimal integer.*nothing was changed"):
        incr_result(command, NOT_INTEGER)
    with pytest.raises(kvstore.InvalidArgument, match="adding 5 .* 64-bit range"):
        incr_result(command, OVERFLOW)
    with pytest.raises(kvstore.KVError):
        incr_result(command, "locked")


# ---------------------------------------------------------------------- embedded
def test_embedded_incr_adds_to_a_decimal_value_and_refuses_anything_else(tmp_path):
    path = str(tmp_path / "kv")
    with kvstore.open(path, shards=3) as db:
        assert db.incr(b"n") == 1  # absent: 0
        assert db.incr("n", 41) == 42 and db.get(b"n") == b"42"  # str keys as for put
        assert db.incr(b"n", -50) == -8 and db.get(b"n") == b"-8"
        db.put(b"padded", b"+007")
        assert db.incr(b"padded", 0) == 7 and db.get(b"padded") == b"7"  # canonical form
        # a value that is no integer: InvalidArgument, nothing changed
        db.put(b"text", b"hello")
        with pytest.raises(kvstore.InvalidArgument, match="not a decimal integer"):
            db.incr(b"text")
        assert db.get(b"text") == b"hello"
        # past 64 bits, either way: refused, as Redis does
        db.put(b"big", b"%d" % INCR_MAX)
        with pytest.raises(kvstore.InvalidArgument, match="64-bit"):
            db.incr(b"big")
        db.put(b"small", b"%d" % INCR_MIN)
        with pytest.raises(kvstore.InvalidArgument, match="64-bit"):
            db.incr(b"small", -1)
        assert (db.get(b"big"), db.get(b"small")) == (b"%d" % INCR_MAX, b"%d" % INCR_MIN)
        assert db.incr(b"small", INCR_MAX) == -1
        # the delta is checked before anything is written
        for delta in (True, 1.0, "1", None, 1 << 63, INCR_MIN - 1):
            with pytest.raises(kvstore.InvalidArgument, match="delta"):
                db.incr(b"n", delta)
        for key in (b"", b"k" * (kvstore.MAX_KEY_SIZE + 1), 5):
            with pytest.raises(kvstore.InvalidArgument):
                db.incr(key)
        assert db.get(b"n") == b"-8"
    with kvstore.open(path) as db:  # replayed from the log as it was applied
        assert (db.get(b"n"), db.get(b"padded"), db.get(b"text")) == (b"-8", b"7", b"hello")
        assert db.verify()["keys_compared"] >= 5  # kvstore check knows the command


def test_embedded_incr_from_many_threads_is_exact(tmp_path):
    threads, each = 8, 200
    with kvstore.open(str(tmp_path / "kv")) as db:
        seen: list = []

        def work():
            mine = [db.incr(b"counter") for _ in range(each)]
            seen.extend(mine)

        workers = [threading.Thread(target=work) for _ in range(threads)]
        for t in workers:
            t.start()
        for t in workers:
            t.join(60)
        assert db.get(b"counter") == b"%d" % (threads * each)
        assert sorted(seen) == list(range(1, threads * each + 1))  # each answer once


# ---------------------------------------------------------------------- a node's state machine
def _save(store, slot: int, commands: list) -> list:
    rec = encode_record(slot, 65536, KIND_BATCH, msgpack.packb(commands))
    return store.save([ShardWrite(0, commit_index=slot, records=[rec],
                                  committed=[Entry(slot, 65536, KIND_BATCH, commands)])])


sends = st.lists(st.tuples(st.sampled_from([b"c1", b"c2"]), st.integers(1, 6),
                           st.integers(1, 3)), min_size=1, max_size=30)


@settings(max_examples=40, deadline=None)
@given(sends)
def test_an_incr_goes_through_the_client_session_and_takes_effect_once(tmp_path_factory, history):
    """A client's incr (seq), sent and re-sent as the client core does after a failover:
    the counter ends at the number of distinct writes, and a retry gets the first
    answer back with no second effect."""
    store = WalReplicaStorage(str(tmp_path_factory.mktemp("s")), shards=1)
    try:
        first: dict = {}
        for slot, (client, seq, copies) in enumerate(history):
            raw = encode_client_command(client, seq, 1, incr(b"n", 1))
            for _shard, _slot, key, result in _save(store, slot, [raw] * copies):
                assert key == (client, seq) and result is not STALE
                assert first.setdefault(key, result) == result
        assert sorted(first.values()) == list(range(1, len(first) + 1))
        assert store.get(0, b"n")[0] == b"%d" % len(first)
    finally:
        store.close()


def test_a_node_applies_a_hostile_incr_in_its_log_as_a_no_op(tmp_path):
    """A chosen value no node would have accepted (a log written before the checks, a
    broken peer) holding an incr with a hostile delta: applied as a no-op, the state
    unchanged, the next entries applied."""
    store = WalReplicaStorage(str(tmp_path / "s"), shards=1)
    try:
        ok = encode_client_command(b"c", 1, 1, incr(b"n", 2))
        assert _save(store, 0, [ok]) == [(0, 0, (b"c", 1), 2)]
        hostile = [msgpack.packb([b"c", seq, 1, [OP_INCR, b"n", delta]], use_bin_type=True)
                   for seq, delta in ((2, True), (3, (1 << 64) - 1), (4, 0.5), (5, [1]))]
        assert [r[3] for r in _save(store, 1, hostile)] == [POISONED] * 4
        assert store.get(0, b"n")[0] == b"2"
        assert _save(store, 2, [encode_client_command(b"c", 6, 1, incr(b"n", 3))])[0][3] == 5
    finally:
        store.close()


def test_an_incr_of_a_key_a_prepared_transaction_holds_is_answered_locked(tmp_path):
    """As put and cas: nothing applied, ``LOCKED`` (the client retries it as a new write)."""
    from kvstore.commands import LOCKED, two_pc
    from kvstore.txn import ABORT, TxnPrepare, TxnResolve
    store = WalReplicaStorage(str(tmp_path / "s"), shards=1)
    try:
        prepare = TxnPrepare(b"T" * 16, 0, (0,), (), ((b"n", b"5"),), 0)
        _save(store, 0, [encode_client_command(b"t", 1, 1, two_pc(prepare))])
        results = _save(store, 1, [encode_client_command(b"c", 1, 1, incr(b"n", 1))])
        assert results == [(0, 1, (b"c", 1), LOCKED)]
        _save(store, 2, [encode_client_command(b"t", 2, 2, two_pc(TxnResolve(b"T" * 16, ABORT)))])
        assert store.get(0, b"n") == (None, 0)  # the incr left nothing behind
        assert _save(store, 3, [encode_client_command(b"c", 2, 2, incr(b"n", 1))])[0][3] == 1
    finally:
        store.close()


# ---------------------------------------------------------------------- the CLI, embedded
def cli(*args: str, data: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("KVSTORE_CLUSTER", None)
    return subprocess.run([sys.executable, "-m", "kvstore.cli", *args, "--data", data],
                          capture_output=True, env=env, timeout=60)


def test_cli_incr_prints_the_new_value(tmp_path):
    data = str(tmp_path / "kv")
    assert cli("incr", "hits", data=data).stdout == b"1\n"
    assert cli("incr", "hits", "10", data=data).stdout == b"11\n"
    assert cli("incr", "hits", "-20", data=data).stdout == b"-9\n"  # a negative DELTA
    bad = cli("incr", "hits", "ten", data=data)
    assert bad.returncode == 2 and b"DELTA must be a decimal integer" in bad.stderr
    assert cli("put", "name", "ada", data=data).returncode == 0
    refused = cli("incr", "name", data=data)
    assert refused.returncode == 2 and b"not a decimal integer" in refused.stderr
    assert refused.stdout == b""
    assert cli("get", "hits", data=data).stdout == b"-9\n"


def test_cli_cas_swaps_only_from_the_expected_value(tmp_path):
    data = str(tmp_path / "kv")
    assert cli("cas", "lock", "--absent", "me", data=data).returncode == 0  # must be absent
    lost = cli("cas", "lock", "--absent", "you", data=data)
    assert lost.returncode == 1 and b"not swapped" in lost.stderr
    assert cli("cas", "lock", "me", "me2", data=data).stdout == b"OK\n"
    assert cli("cas", "lock", "me", "me3", data=data).returncode == 1
    assert cli("get", "lock", data=data).stdout == b"me2\n"
    assert cli("cas", "lock", "me2", "--delete", data=data).returncode == 0  # NEW: delete
    assert cli("get", "lock", data=data).returncode == 1
    wrong = cli("cas", "lock", "only-one", data=data)
    assert wrong.returncode == 2 and b"cas takes KEY EXPECTED NEW" in wrong.stderr
