"""``kvstore-server --init-from DIR``: an embedded store's directory becomes node 1 of a new
one-member cluster (kvstore/server/initfrom.py; docs/operations.md, "From one process to a
cluster"). Real processes: the conversion and the node run as ``python -m kvstore.server``."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

import kvstore
from kvstore.machine.data import revision_of
from kvstore.node.storage import WalReplicaStorage
from kvstore.server.initfrom import STAGING_DIR
from kvstore.server.local import LocalCluster
from kvstore.sharding import shard_of
from kvstore.storage import Storage
from kvstore.storage.environment import DATA_FILE

from conftest import PYTHON, child_env

SHARDS = 3


def fill(path: str, shards: int = SHARDS) -> dict:
    """An embedded store at ``path`` with keys in every shard, a deleted key, a counter, a
    transaction across shards, a leased key and TTL keys; what ``scan`` should return."""
    with kvstore.open(path, shards=shards) as db:
        for i in range(60):
            db.put(b"k%03d" % i, b"v%d" % i)
        db.delete(b"k007")
        db.incr(b"counter", 41)
        with db.transaction() as txn:  # keys of several shards, one commit
            for name in (b"acct-a", b"acct-b", b"acct-c", b"acct-d"):
                txn.put(name, b"100")
        lease = db.lease(120)
        db.put(b"leased", b"L", lease=lease)
        lease_id = lease.id
        del lease  # no longer kept alive from here: its ttl is ample
        db.put(b"ttl-long", b"T", ttl=120)
        db.put(b"ttl-short", b"S", ttl=1)
        assert len({shard_of(k, shards) for k in (b"acct-a", b"acct-b", b"acct-c",
                                                   b"acct-d")}) > 1
        expected = dict(db.scan())
    assert expected[b"ttl-short"] == b"S"
    expected["lease-id"] = lease_id
    return expected


def rows(path: str) -> dict:
    """Every shard's stored rows (revision, checksum, value), read from the directory."""
    storage = Storage(path, create=False)
    try:
        return storage.read(lambda txn: {
            s: {bytes(k): bytes(v) for k, v in txn.cursor(t.data)}
            for s, t in enumerate(storage.shards)})
    finally:
        storage.close()


def init_from(source: str, config: str, *extra: str, name: str = "n1") -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "kvstore.server", "--init-from", source, "--config",
                           config, "--id", name, *extra], capture_output=True, text=True,
                          env=child_env(), timeout=60)


def refused(r: subprocess.CompletedProcess, *words: str) -> str:
    """Assert ``r`` is a refusal: exit 2, one line on stderr naming ``words``, no traceback."""
    assert r.returncode == 2, (r.stdout, r.stderr)
    line = r.stderr.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line, line
    for word in words:
        assert word in line, line
    return line


@pytest.fixture
def cluster(tmp_path):
    c = LocalCluster(str(tmp_path / "cluster"), nodes=1, shards=SHARDS)
    yield c
    c.close()


def test_an_embedded_store_becomes_a_one_node_cluster_serving_every_key(tmp_path, cluster):
    source = str(tmp_path / "store")
    expected = fill(source)
    lease_id = expected.pop("lease-id")
    before = rows(source)
    node_dir = os.path.join(cluster.directory, "n1")

    r = init_from(source, cluster.config_path)
    assert r.returncode == 0, r.stderr
    assert f"made node n1's data directory {node_dir}" in r.stdout
    assert sorted(os.listdir(node_dir)) == [DATA_FILE]  # the staging directory is gone
    assert rows(node_dir) == before  # values and revisions, byte for byte
    assert rows(source) == before  # the store itself is not changed

    cluster.start("n1")
    cluster.wait_ready()
    with cluster.client(timeout=10) as c:
        deadline = time.monotonic() + 10
        while c.get(b"ttl-short") is not None:  # its ttl runs again from the node's start
            assert time.monotonic() < deadline, "a TTL key of the store never expired"
            time.sleep(0.05)
        del expected[b"ttl-short"]
        assert dict(c.scan()) == expected
        assert c.incr(b"counter") == 42  # applied once: not replayed, not lost
        c.put(b"leased-2", b"L2", lease=lease_id)  # the store's lease is the node's
        c.put(b"fresh", b"new")
    assert cluster.stop_all() == {"n1": 0}

    # New writes get revisions above every revision the store gave in their shard.
    after = rows(node_dir)
    for key in (b"fresh", b"counter"):
        shard = shard_of(key, SHARDS)
        assert revision_of(after[shard][key]) > max(revision_of(v) for v in before[shard].values())

    cluster.start("n1")  # restarted on the directory the conversion made
    cluster.wait_ready()
    with cluster.client(timeout=10) as c:
        assert c.get(b"fresh") == b"new" and c.get(b"counter") == b"42"
        assert c.get(b"k001") == b"v1" and c.get(b"k007") is None
        assert [c.get(k) for k in (b"acct-a", b"acct-b", b"acct-c", b"acct-d")] == [b"100"] * 4
        c.put(b"after-restart", b"yes")
        assert c.get(b"after-restart") == b"yes"
    assert cluster.stop_all() == {"n1": 0}


def test_a_store_not_closed_cleanly_is_recovered_before_it_is_copied(tmp_path):
    source = str(tmp_path / "store")
    child = ("import kvstore, os, signal\n"
             f"db = kvstore.open({source!r}, shards={SHARDS})\n"
             "for i in range(200):\n"
             "    db.put(b'k%d' % i, b'v%d' % i)\n"
             "os.kill(os.getpid(), signal.SIGKILL)\n")  # acknowledged, in the log only
    r = subprocess.run([PYTHON, "-c", child], env=child_env(), timeout=60)
    assert r.returncode == -signal.SIGKILL
    config = tmp_path / "cluster.toml"
    config.write_text(f'shards = {SHARDS}\n[nodes.n1]\naddress = "tcp://127.0.0.1:1"\n')
    node_dir = str(tmp_path / "n1")

    r = init_from(source, str(config), "--data", node_dir)
    assert r.returncode == 0, r.stderr
    assert "200 keys" in r.stdout
    storage = WalReplicaStorage(node_dir, SHARDS)  # the node's own recovery, in this process
    try:
        for i in range(200):
            key = b"k%d" % i
            assert storage.get(shard_of(key, SHARDS), key)[0] == b"v%d" % i
    finally:
        storage.close()


def test_a_store_whose_log_outruns_its_checkpoint_when_copied_is_refused(tmp_path):
    """The copy is taken only when LMDB holds the whole log. Were the store recovered and
    then opened and written by another process before the copy (simulated: the recovery
    step skipped on a store killed with writes in its log only), its copy would miss
    acknowledged writes: refused, and nothing left behind."""
    source = str(tmp_path / "store")
    child = ("import kvstore, os, signal\n"
             f"db = kvstore.open({source!r}, shards={SHARDS})\n"
             "db.put(b'k', b'v')\n"
             "os.kill(os.getpid(), signal.SIGKILL)\n")
    assert subprocess.run([PYTHON, "-c", child], env=child_env(),
                          timeout=60).returncode == -signal.SIGKILL
    node_dir = str(tmp_path / "n1")
    skip_recovery = ("import sys\nfrom kvstore.server import initfrom, main\n"
                     "initfrom._recover_store = lambda source: None\n"
                     "sys.exit(main.main(sys.argv[1:]))\n")
    r = subprocess.run([PYTHON, "-c", skip_recovery, "--init-from", source, "--config",
                        write_config(tmp_path), "--id", "n1", "--data", node_dir],
                       capture_output=True, text=True, env=child_env(), timeout=60)
    refused(r, "opened by another process", "run --init-from again")
    assert not os.path.exists(node_dir)


def write_config(tmp_path, shards: int = SHARDS, nodes=("n1",)) -> str:
    path = tmp_path / "cluster.toml"
    path.write_text(f"shards = {shards}\n" + "".join(
        f'[nodes.{n}]\naddress = "tcp://127.0.0.1:{7101 + i}"\n' for i, n in enumerate(nodes)))
    return str(path)


@pytest.fixture
def small_store(tmp_path):
    source = str(tmp_path / "store")
    with kvstore.open(source, shards=SHARDS) as db:
        db.put(b"k", b"v")
    return source


def test_a_config_of_several_nodes_is_refused_naming_member_add(tmp_path, small_store):
    config = write_config(tmp_path, nodes=("n1", "n2", "n3"))
    node_dir = str(tmp_path / "n1")
    line = refused(init_from(small_store, config, "--data", node_dir),
                   "one-member cluster", "n1, n2, n3", "kvstore member add")
    assert "n2, n3" in line
    assert not os.path.exists(node_dir)


def test_a_config_of_another_shard_count_is_refused_naming_both(tmp_path, small_store):
    node_dir = str(tmp_path / "n1")
    refused(init_from(small_store, write_config(tmp_path, shards=2), "--data", node_dir),
            f"has {SHARDS} shard(s)", "shards = 2")
    assert not os.path.exists(node_dir)


def test_a_target_that_is_not_empty_is_refused_and_left_as_it_was(tmp_path, small_store):
    node_dir = tmp_path / "n1"
    node_dir.mkdir()
    (node_dir / "notes.txt").write_text("mine")
    refused(init_from(small_store, write_config(tmp_path), "--data", str(node_dir)),
            "is not empty", "notes.txt")
    assert os.listdir(node_dir) == ["notes.txt"]


def test_a_target_inside_the_store_or_the_store_itself_is_refused(tmp_path, small_store):
    for node_dir in (small_store, os.path.join(small_store, "node")):
        refused(init_from(small_store, write_config(tmp_path), "--data", node_dir),
                "outside the embedded store")
    assert not os.path.exists(os.path.join(small_store, "node"))


def test_a_node_directory_or_no_store_at_all_is_refused(tmp_path):
    node = str(tmp_path / "node")
    WalReplicaStorage(node, SHARDS).close()  # a node's directory, as a node leaves it
    node_dir = str(tmp_path / "new")
    refused(init_from(node, write_config(tmp_path), "--data", node_dir),
            "is a cluster node's data directory")
    refused(init_from(str(tmp_path / "nowhere"), write_config(tmp_path), "--data", node_dir),
            "no embedded store at")
    assert not os.path.exists(node_dir) and not os.path.exists(tmp_path / "nowhere")


def test_a_store_open_in_another_process_is_refused_naming_it(tmp_path, small_store):
    holder = subprocess.Popen(
        [PYTHON, "-c", f"import kvstore, sys\ndb = kvstore.open({small_store!r})\n"
                       "print('open', flush=True)\nsys.stdin.read()\ndb.close()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=child_env())
    try:
        assert holder.stdout.readline() == "open\n"
        node_dir = str(tmp_path / "n1")
        refused(init_from(small_store, write_config(tmp_path), "--data", node_dir),
                f"is open in process {holder.pid}", "close it there")
        assert not os.path.exists(node_dir)
    finally:
        holder.communicate("", timeout=30)
    assert holder.returncode == 0


def test_kvstore_server_refuses_an_embedded_store_directory_naming_init_from(tmp_path,
                                                                          small_store):
    r = subprocess.run([PYTHON, "-m", "kvstore.server", "--config", write_config(tmp_path),
                        "--id", "n1", "--data", small_store], capture_output=True, text=True,
                       env=child_env(), timeout=60)
    refused(r, "is an embedded store's directory", "--init-from")


@pytest.mark.parametrize("step", ["initfrom._as_node", "staging._install"])
def test_a_conversion_killed_half_way_leaves_no_node_and_a_rerun_finishes_it(tmp_path, step):
    """SIGKILL after the copy (before its meta is a node's), and just before the rename:
    the target holds no data file, and ``--init-from`` again removes the leftover and
    makes the whole directory."""
    source = str(tmp_path / "store")
    expected = fill(source)
    expected.pop("lease-id")
    config = write_config(tmp_path)
    node_dir = str(tmp_path / "n1")
    child = ("import os, signal, sys\n"
             "from kvstore.server import initfrom, main\n"
             "from kvstore.storage import staging\n"
             f"def killed(*args):\n    os.kill(os.getpid(), signal.SIGKILL)\n"
             f"{step} = killed\n"
             "sys.exit(main.main(sys.argv[1:]))\n")
    r = subprocess.run([PYTHON, "-c", child, "--init-from", source, "--config", config,
                        "--id", "n1", "--data", node_dir], capture_output=True, text=True,
                       env=child_env(), timeout=60)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert os.listdir(node_dir) == [STAGING_DIR]
    assert not os.path.exists(os.path.join(node_dir, DATA_FILE))

    r = init_from(source, config, "--data", node_dir)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(node_dir)) == [DATA_FILE]
    storage = WalReplicaStorage(node_dir, SHARDS)
    try:
        got = {k: v for s in range(SHARDS) for k, v, _rev in storage.scan(s, b"", None, None)}
    finally:
        storage.close()
    assert got == expected
