"""Make the old-format (log format 1) directories of tests/data/wal-format-1.tar.gz, with
kvstore at commit 638f677 (before the log format 2): an embedded store and a node's storage,
each left as a SIGKILL would (writes in the log only, not checkpointed)."""
import os, sys
import msgpack
import kvstore
from kvstore._native import encode_record
from kvstore.commands import OP_PUT
from kvstore.paxos.replica import KIND_BATCH, Entry
from kvstore.machine.replica import ShardWrite, encode_client_command
from kvstore.node.storage import WalReplicaStorage

out = sys.argv[1]
db = kvstore.open(os.path.join(out, "embedded"), shards=2)
db._checkpointer.stop()
for i in range(5):
    db.put(b"k%d" % i, b"v%d" % i)
db._wal.close(); db._storage.close()   # a crash: nothing checkpointed

st = WalReplicaStorage(os.path.join(out, "node"), 2, checkpoint_seconds=3600)
B = 65536
for slot in range(3):
    cmd = encode_client_command(b"c", slot + 1, slot + 1, [OP_PUT, b"k%d" % slot, b"v"])
    rec = encode_record(slot, B, KIND_BATCH, msgpack.packb([cmd]))
    st.save([ShardWrite(1, promised=B, commit_index=slot, records=[rec],
                        committed=[Entry(slot, B, KIND_BATCH, [cmd])])])
st.checkpointer.stop(); st.wal.close(); st.storage.close()
