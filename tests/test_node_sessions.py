"""The replicated client session table: a retried write takes effect once, a late duplicate
below the client's floor never does; checked against a model over random histories."""

from __future__ import annotations

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore._native import encode_record
from kvstore.commands import OP_CAS, OP_PUT
from kvstore.paxos.replica import KIND_BATCH, Entry
from kvstore.commands import STALE, encode_client_command
from kvstore.machine.replica import ShardWrite
from kvstore.node.storage import WalReplicaStorage

# One step: a client sends (or re-sends) write ``seq``; ``floor`` is its lowest
# unanswered seq at that time, as the client computes it.
steps = st.lists(st.tuples(st.sampled_from([b"c1", b"c2"]), st.integers(1, 8),
                           st.sampled_from(["put", "cas"]), st.integers(0, 3),
                           st.integers(1, 4)),
                 min_size=1, max_size=40)


@settings(max_examples=60, deadline=None)
@given(steps)
def test_each_client_write_takes_effect_at_most_once(tmp_path_factory, history):
    store = WalReplicaStorage(str(tmp_path_factory.mktemp("s")), shards=1)
    try:
        floors: dict = {}  # the session floor the model expects per client
        first: dict = {}  # (client, seq) -> the result it got when it took effect
        effects = 0
        slot = 0
        for client, seq, kind, floor_back, batch in history:
            # the floor is at most the seq itself (a late duplicate carries the floor it
            # was sent with) and, for a new write, never goes down
            floor = min(max(floors.get(client, 0), seq - floor_back, 0), seq)
            value = b"%s-%d" % (client, seq)
            command = ([OP_PUT, b"k", value] if kind == "put" else [OP_CAS, b"k", None, value])
            raw = encode_client_command(client, seq, floor, command)
            cmds = [raw] * batch  # duplicates inside one entry too
            rec = encode_record(slot, 65536, KIND_BATCH, msgpack.packb(cmds))
            results = store.save([ShardWrite(0, commit_index=slot, records=[rec],
                                             committed=[Entry(slot, 65536, KIND_BATCH, cmds)])])
            session_floor = floors.get(client, 0)
            for _shard, _slot, key, result in results:
                assert key == (client, seq)
                if seq < session_floor:
                    assert result is STALE  # a late duplicate of an answered write: ignored
                elif key in first:
                    assert result == first[key]  # a retry: the first result, no new effect
                else:
                    first[key] = result
                    effects += 1
            if seq >= session_floor:
                floors[client] = max(session_floor, floor)
            slot += 1
        assert effects == len(first)
        # the state holds the value of the last write that took effect with a put or a
        # successful cas, never one of a duplicate
        value, revision = store.get(0, b"k")
        assert value is None or any(value == b"%s-%d" % k for k in first)
    finally:
        store.close()
