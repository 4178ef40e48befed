"""Backup and restore (``kvstore.backup``): consistent cuts under concurrent cross-shard
transfers, on the embedded store and on a real 3-node cluster; restores that are exact
or refused whole; the fence's state machine; the CLI.

The bank (``tests/workloads.py``): every transfer moves money between two accounts
on (mostly) different shards and writes a record of itself in the same transaction.
A consistent cut then holds every account, the exact total, and balances that are
exactly what the transfer records present in it say: a transfer half in the backup
(one shard's part) would show as a balance that its records do not explain.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading

import msgpack
import pytest

import kvstore
import kvstore.backup as backups
from kvstore.backup.format import BackupReader
from kvstore.errors import CorruptRecord, InvalidArgument, StorageError
from kvstore.sharding import shard_of
from test_cluster import cluster  # noqa: F401  (fixture)
from workloads import ACCOUNTS, INITIAL, BankWorkload, wait_for

pytestmark = pytest.mark.timeout(120)


def bank_problems(db, acked_before: list, attempted) -> list:
    """What a restored bank's copy gets wrong: a missing account, money created or
    lost, a balance its transfer records do not explain (a half-applied transfer), a
    record nobody wrote (``attempted(record)`` False), or a transfer acknowledged before
    the backup began missing."""
    balances = {a: db.get(a) for a in ACCOUNTS}
    missing = [a for a, v in balances.items() if v is None]
    if missing:
        return [f"accounts missing: {missing}"]
    balances = {a: int(v) for a, v in balances.items()}
    present = {k: msgpack.unpackb(v) for k, v in db.scan(b"xfer/")}
    out = []
    if sum(balances.values()) != INITIAL * len(ACCOUNTS):
        out.append(f"the balances add up to {sum(balances.values())}")
    expected = {a: INITIAL for a in ACCOUNTS}
    for a, b, amount in present.values():
        expected[a] -= amount
        expected[b] += amount
    if balances != expected:
        out.append("a transfer is half in the backup")
    if not all(attempted(record) for record in present):
        out.append("a transfer nobody attempted is in the backup")
    lost = [r for r in acked_before if r not in present]
    if lost:
        out.append(f"{len(lost)} transfers acknowledged before the backup are missing")
    return out


class EmbeddedBank:
    """Transfer threads on an embedded store (``BankWorkload``'s transfers, in-process)."""

    def __init__(self, db, threads: int = 3) -> None:
        self.db = db
        self.acked: list = []
        self.attempted: set = set()
        self.failures: list = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(w,), daemon=True)
                        for w in range(threads)]
        for a in ACCOUNTS:
            db.put(a, b"%d" % INITIAL)

    def _run(self, w: int) -> None:
        rnd = random.Random(w)
        i = 0
        while not self.stop.is_set():
            a, b = rnd.sample(ACCOUNTS, 2)
            amount, record = rnd.randint(1, 5), b"xfer/%d/%d" % (w, i)
            i += 1
            self.attempted.add(record)

            def move(t):
                t.put(a, b"%d" % (int(t.get(a)) - amount))
                t.put(b, b"%d" % (int(t.get(b)) + amount))
                t.put(record, msgpack.packb([a, b, amount]))

            try:
                self.db.run_transaction(move, retries=100)
            except kvstore.TransactionConflict:
                continue
            except BaseException as e:  # reported by the test
                self.failures.append(repr(e))
                return
            self.acked.append(record)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(10)
        assert not self.failures, self.failures


@pytest.fixture
def bank_store(tmp_path):
    db = kvstore.open(str(tmp_path / "bank"), shards=3)
    assert len({shard_of(a, 3) for a in ACCOUNTS}) == 3
    yield db
    db.close()


def test_embedded_backup_during_transfers_restores_an_exact_bank(bank_store, tmp_path):
    """Backups of an open 3-shard store while threads transfer (each backup one cut)."""
    db = bank_store
    taken = []
    with EmbeddedBank(db) as bank:
        for i in range(10):
            n = len(bank.acked)
            wait_for(lambda: len(bank.acked) >= n + 20, 20, "transfers did not flow")
            taken.append((tmp_path / f"bank{i}.kvb", list(bank.acked)))
            summary = backups.backup(db, taken[-1][0])
    assert summary["shards"] == 3
    for i, (path, acked_before) in enumerate(taken):
        backups.restore(path, tmp_path / f"restored{i}")
        with kvstore.open(str(tmp_path / f"restored{i}")) as copy:
            problems = bank_problems(copy, acked_before, bank.attempted.__contains__)
            assert not problems, (path.name, problems)
    with kvstore.open(str(tmp_path / "restored0")) as copy:
        # the copy is a store of its own: new writes get revisions above the cut's
        shard = shard_of(ACCOUNTS[0], 3)
        cut = backups.verify(taken[0][0])["revisions"][shard]
        with copy.transaction() as t:
            t.put(ACCOUNTS[0], t.get(ACCOUNTS[0]))
        assert copy.status()["shards"][shard]["commit_index"] == cut + 1


WRITER = """
import sys, kvstore, msgpack, random
db = kvstore.open(sys.argv[1], shards=3)
accounts = [b"acct%02d" % i for i in range(9)]
for a in accounts:
    db.put(a, b"100")
db.checkpoint()
print("ready", flush=True)
rnd, i = random.Random(1), 0
while True:
    a, b = rnd.sample(accounts, 2)
    record = b"xfer/0/%d" % i
    i += 1
    def move(t):
        t.put(a, b"%d" % (int(t.get(a)) - 1))
        t.put(b, b"%d" % (int(t.get(b)) + 1))
        t.put(record, msgpack.packb([a, b, 1]))
    db.run_transaction(move)
    if i % 50 == 0:
        print(i, flush=True)
"""


def test_directory_backup_while_another_process_writes(tmp_path):
    """``kvstore backup --data DIR`` of a store a running process owns and writes."""
    data = tmp_path / "owned"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(data)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        for _ in range(6):  # transfers are being written (and checkpointed) now
            assert proc.stdout.readline()
        result = subprocess.run([sys.executable, "-m", "kvstore.cli", "backup", "--data",
                                 str(data), str(tmp_path / "owned.kvb")],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert proc.poll() is None  # the owner went on
    finally:
        proc.kill()
        proc.wait()
    backups.restore(tmp_path / "owned.kvb", tmp_path / "restored")
    with kvstore.open(str(tmp_path / "restored")) as copy:
        problems = bank_problems(copy, [], lambda record: record.startswith(b"xfer/0/"))
        assert not problems, problems


def test_cluster_backup_during_cross_shard_transfers(cluster, tmp_path):  # noqa: F811
    """Backups of a 3-node, 3-shard cluster while transfers cross shards: the CLI's, then
    more through the API (a cut that split a transfer shows in one of them: without
    the drain of prepared transactions, about one backup in fifteen splits one)."""
    lc = cluster(shards=3, directory=tmp_path / "c")
    lc.start_all()
    lc.wait_ready()
    bank = BankWorkload(lc.client, transfer_threads=3, auditors=0)
    with lc.client(timeout=10) as c:
        bank.setup(c)
        c.put(b"ttl-key", b"lives an hour", ttl=3600)  # lease state goes with the backup
    bank.start()
    taken = []  # (file, transfers acknowledged before the backup began)
    try:
        wait_for(lambda: len(bank.acked) >= 60, 30, "transfers did not flow", bank.progress)
        taken.append((tmp_path / "cli.kvb", [r for r, *_ in bank.acked]))
        result = subprocess.run(
            [sys.executable, "-m", "kvstore.cli", "backup", "--cluster",
             ",".join(lc.address_list), str(taken[0][0])],
            capture_output=True, text=True, timeout=60, env=lc_env())
        assert result.returncode == 0, result.stderr
        with lc.client(timeout=10) as c:
            for i in range(12):
                n = len(bank.acked)
                wait_for(lambda: len(bank.acked) >= n + 3, 30, "transfers stopped",
                         bank.progress)
                taken.append((tmp_path / f"api{i}.kvb", [r for r, *_ in bank.acked]))
                backups.backup(c, taken[-1][0])
            refused_backup_requests(c, lc.address_list[0])
        with pytest.raises(InvalidArgument, match="--cluster"):  # a running node's directory
            backups.backup(os.path.join(lc.directory, "n1"), tmp_path / "node.kvb")
    finally:
        bank.stop()
    with lc.client(timeout=10) as c:
        abandoned_prepare_drains(c, tmp_path)
        read_point_node_dies(lc, c, tmp_path)
    assert not bank.failures, bank.failures
    attempted = _all_records(bank)
    for i, (path, acked_before) in enumerate(taken):
        info = backups.verify(path)
        assert info["shards"] == 3 and info["source"]["kind"] == "cluster"
        backups.restore(path, tmp_path / f"restored{i}")
        with kvstore.open(str(tmp_path / f"restored{i}")) as copy:
            problems = bank_problems(copy, acked_before, attempted)
            assert not problems, (path.name, problems)
            assert copy.get(b"ttl-key") == b"lives an hour"
    restored_into_a_new_cluster(tmp_path / "restored0", tmp_path, taken[0][1], attempted)


def restored_into_a_new_cluster(restored, tmp_path, acked_before: list, attempted) -> None:
    """The restored directory seeds node 1 of a new cluster (``kvstore-server --init-from``),
    which serves the backup's bank exactly."""
    from kvstore.server.local import LocalCluster
    with LocalCluster(str(tmp_path / "new"), nodes=1, shards=3, env=lc_env()) as new:
        made = subprocess.run([sys.executable, "-m", "kvstore.server", "--init-from",
                               str(restored), "--config", new.config_path, "--id", "n1"],
                              capture_output=True, text=True, env=lc_env(), timeout=60)
        assert made.returncode == 0, made.stderr
        new.start("n1")
        new.wait_ready()
        with new.client(timeout=10) as c:
            problems = bank_problems(c, acked_before, attempted)
            assert not problems, problems
            assert c.get(b"ttl-key") == b"lives an hour"


def abandoned_prepare_drains(c, tmp_path) -> None:
    """A transaction prepared on two shards by a client that then went away: the backup
    waits for the resolvers to abort it (its deadline, 1.5 s) instead of cutting through
    it, and the restored copy has none of its writes."""
    import time
    from kvstore.commands import two_pc
    from kvstore.transport import wire
    from kvstore.txn import TxnPrepare
    keys = {shard_of(k, 3): k for k in (b"orphan%d" % i for i in range(40))}
    txn_id = os.urandom(16)
    deadline = int(time.time() * 1000) + 1500
    for shard in (0, 1):
        prepare = TxnPrepare(txn_id, 0, (0, 1), (), ((keys[shard], b"half"),), deadline)
        assert c._core.call(wire.OP_WRITE, shard, two_pc(prepare).wire()) is True
    backups.backup(c, tmp_path / "drained.kvb")
    assert time.time() * 1000 >= deadline  # nobody decides it: only its deadline ends it
    backups.restore(tmp_path / "drained.kvb", tmp_path / "drained")
    with kvstore.open(str(tmp_path / "drained")) as copy:
        assert copy.get(keys[0]) is None and copy.get(keys[1]) is None
    c.put(keys[0], b"free")  # its locks are gone


def read_point_node_dies(lc, c, tmp_path, monkeypatch=None) -> None:
    """The node streaming the backup is SIGKILLed after its first page: the backup fails
    (Unavailable), leaves no file, and the next one is taken from another node."""
    import signal
    from kvstore.client.backup import BackupCalls
    from kvstore.errors import Unavailable
    pages = []
    real_page = BackupCalls.page

    def page_then_kill(self, address, *args):
        if not pages:
            lc.kill(lc.names[lc.address_list.index(address)], signal.SIGKILL)
        pages.append(address)
        return real_page(self, address, *args)

    BackupCalls.page = page_then_kill
    try:
        with pytest.raises(Unavailable):
            backups.backup(c, tmp_path / "died.kvb", timeout=2)
    finally:
        BackupCalls.page = real_page
    assert not os.path.exists(tmp_path / "died.kvb")
    assert not os.path.exists(str(tmp_path / "died.kvb") + ".tmp")
    summary = backups.backup(c, tmp_path / "after.kvb")
    assert summary["node"] != pages[0]


def refused_backup_requests(c, address: str) -> None:
    """Malformed backup requests are refused with InvalidArgument, and change nothing."""
    from kvstore.transport import wire
    core = c._core
    for op, args in [(wire.OP_BACKUP_OPEN, [b"short"]), (wire.OP_BACKUP_OPEN, []),
                     (wire.OP_BACKUP_PAGE, [b"no such session", 0, 0, None, 100]),
                     (wire.OP_BACKUP_PAGE, [b"x", 99, 0, None, 100]),
                     (wire.OP_BACKUP_PAGE, [b"x", 0, 7, None, 100]),
                     (wire.OP_BACKUP_PAGE, [b"x", 0, 0, 5, 100]),
                     (wire.OP_BACKUP_PAGE, [b"x", 0, 0, None, -1]),
                     (wire.OP_BACKUP_CLOSE, [1])]:
        with pytest.raises(InvalidArgument):
            core.call(op, None, args, 5, target=address)
    assert core.call(wire.OP_BACKUP_CLOSE, None, [b"unknown"], 5, target=address) is False


def _all_records(bank: BankWorkload):
    """Whether a record key is one a transfer thread may have attempted (conflicted ones
    included): ``xfer/W/I`` with W a transfer thread."""
    threads = {b"%d" % w for w in range(len(bank.threads))}
    return lambda record: record.split(b"/")[1] in threads


def lc_env() -> dict:
    from conftest import child_env
    return child_env()


# -- refusals -------------------------------------------------------------------------------

@pytest.fixture
def small_backup(tmp_path):
    with kvstore.open(str(tmp_path / "src"), shards=2) as db:
        for i in range(300):
            db.put(b"key%03d" % i, os.urandom(50))
        db.put(b"leased", b"v", ttl=3600)
        backups.backup(db, tmp_path / "b.kvb")
        expected = db.scan()
    return tmp_path / "b.kvb", expected


def test_restore_is_exact(small_backup, tmp_path):
    path, expected = small_backup
    backups.restore(path, tmp_path / "r")
    with kvstore.open(str(tmp_path / "r")) as copy:
        assert copy.scan() == expected
        assert copy.get(b"leased") == b"v"  # its lease came back with it


@pytest.mark.parametrize("cut", ["truncated", "flipped", "no trailer"])
def test_a_damaged_backup_is_refused_and_leaves_nothing(small_backup, tmp_path, cut):
    path, _ = small_backup
    data = bytearray(path.read_bytes())
    if cut == "truncated":
        data = data[:len(data) // 2]
    elif cut == "flipped":
        data[random.Random(7).randrange(len(data))] ^= 0x10
    else:
        data = data[:-20]
    bad = tmp_path / "bad.kvb"
    bad.write_bytes(bytes(data))
    before = set(os.listdir(tmp_path))
    with pytest.raises(CorruptRecord, match="corrupt or incomplete"):
        backups.restore(bad, tmp_path / "r")
    assert set(os.listdir(tmp_path)) == before  # no directory, no staging left


def test_every_flipped_byte_is_refused(tmp_path):
    with kvstore.open(str(tmp_path / "src"), shards=2) as db:
        db.put(b"a", b"1")
        db.put(b"b", b"2")
        backups.backup(db, tmp_path / "b.kvb")
    data = (tmp_path / "b.kvb").read_bytes()
    for i in range(len(data)):
        flipped = bytearray(data)
        flipped[i] ^= 0x01
        (tmp_path / "x.kvb").write_bytes(bytes(flipped))
        with pytest.raises(CorruptRecord):
            backups.verify(tmp_path / "x.kvb")


def test_restore_into_an_existing_empty_directory(small_backup, tmp_path):
    """As into a mounted volume's root: the store appears inside it, nothing else."""
    path, expected = small_backup
    (tmp_path / "volume").mkdir()
    backups.restore(path, tmp_path / "volume")
    assert "data.mdb" in os.listdir(tmp_path / "volume")
    assert ".restoring" not in os.listdir(tmp_path / "volume")
    with kvstore.open(str(tmp_path / "volume")) as copy:
        assert copy.scan() == expected
    (tmp_path / "empty").mkdir()
    bad = tmp_path / "bad.kvb"
    bad.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(CorruptRecord):
        backups.restore(bad, tmp_path / "empty")
    assert os.listdir(tmp_path / "empty") == []  # empty again


def test_restore_refuses_a_non_empty_directory(small_backup, tmp_path):
    path, _ = small_backup
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "something").write_text("x")
    with pytest.raises(InvalidArgument, match="not empty"):
        backups.restore(path, tmp_path / "busy")
    assert os.listdir(tmp_path / "busy") == ["something"]


def test_restore_refuses_a_directory_another_run_holds(small_backup, tmp_path):
    """Its lock is held (another restore, a store being opened on it): refused, kept."""
    from kvstore.storage.staging import DirectoryLock
    path, _ = small_backup
    (tmp_path / "held").mkdir()
    with DirectoryLock(str(tmp_path / "held"), "a directory"):
        with pytest.raises(InvalidArgument, match="is in use by another process"):
            backups.restore(path, tmp_path / "held")
    assert os.listdir(tmp_path / "held") == []


def test_a_wrong_shard_count_is_refused(tmp_path):
    """A header that says fewer shards than the rows name: refused, nothing restored."""
    from kvstore.backup.format import BackupWriter, Header
    header = Header(shards=2, source={"kind": "test"}, revisions=[10, 10])
    with BackupWriter(tmp_path / "b.kvb", header) as w:
        w.add(0, 0, [])
        w.finish()
    data = bytearray((tmp_path / "b.kvb").read_bytes())
    # rewrite it as a 1-shard header with rows of shard 1: build by hand
    header1 = Header(shards=1, source={"kind": "test"}, revisions=[10])
    from kvstore.backup.format import MAGIC, ROWS, HEADER, TRAILER, encode_frame, encode_map, \
        encode_rows
    from kvstore import _native
    raw = _native.pack_value(b"k", 1, b"v")
    body = MAGIC + encode_frame(HEADER, header1.encode()) + encode_frame(
        ROWS, encode_rows(1, 0, [(b"k", raw)]))
    trailer = {"rows": [[0, 0]], "frames": 1, "bytes": len(body), "crc32c": _native.crc32c(body)}
    (tmp_path / "w.kvb").write_bytes(body + encode_frame(TRAILER, encode_map(trailer)))
    del data
    with pytest.raises(CorruptRecord, match="shard"):
        backups.restore(tmp_path / "w.kvb", tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_cli_restore_errors_are_one_line_and_exit_like_other_errors(small_backup, tmp_path):
    path, _ = small_backup
    bad = tmp_path / "bad.kvb"
    bad.write_bytes(path.read_bytes()[:100])
    result = subprocess.run([sys.executable, "-m", "kvstore.cli", "restore", str(bad), "--data",
                             str(tmp_path / "r")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 4
    assert result.stderr.count("\n") == 1 and "truncated" in result.stderr
    assert not (tmp_path / "r").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    result = subprocess.run([sys.executable, "-m", "kvstore.cli", "restore", str(path), "--data",
                             str(tmp_path / "full")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "not empty" in result.stderr


def test_backup_writes_tmp_then_renames(small_backup, tmp_path):
    path, _ = small_backup
    assert not os.path.exists(str(path) + ".tmp")
    with BackupReader(path) as r:
        assert r.header.shards == 2 and r.header.source["kind"] == "embedded"


def test_a_value_corrupt_in_the_store_fails_the_backup_not_the_restore(tmp_path):
    """A value whose checksum fails on the source's disk stops the backup (CorruptRecord,
    naming it), instead of writing a backup that no restore would take."""
    from kvstore import _native
    from kvstore.storage import Storage
    with kvstore.open(str(tmp_path / "src")) as db:
        db.put(b"good", b"1")
    storage = Storage(str(tmp_path / "src"))
    bad = bytearray(_native.pack_value(b"bad", 1, b"value"))
    bad[-1] ^= 1
    storage.write(lambda txn: txn.put(b"bad", bytes(bad), db=storage.shards[0].data))
    storage.close()
    with kvstore.open(str(tmp_path / "src")) as db:
        with pytest.raises(CorruptRecord, match="fails its checksum"):
            backups.backup(db, tmp_path / "b.kvb")
    assert not os.path.exists(tmp_path / "b.kvb") and not os.path.exists(tmp_path / "b.kvb.tmp")


class FakeCalls:
    """``BackupCalls`` whose fences always lapse before they are lifted."""

    nshards = 2
    addresses = ["tcp://a"]

    def addresses_to_try(self) -> list:
        return self.addresses

    def __init__(self) -> None:
        self.closed = 0
        self.fences: list = []

    def fence_all(self, fence_id, until_ms, timeout) -> None:
        self.fences.append(fence_id)

    def open(self, address, fence_id, timeout):
        return b"session", [1, 1]

    def unfence_all(self, fence_id, timeout) -> list:
        return [True, False]

    def close(self, address, session_id, timeout) -> bool:
        self.closed += 1
        return True


def test_a_backup_whose_fence_lapsed_is_thrown_away_and_tried_again(monkeypatch, tmp_path):
    from kvstore.backup import cluster as cluster_backup
    from kvstore.errors import Unavailable
    fake = FakeCalls()
    monkeypatch.setattr(cluster_backup, "BackupCalls", lambda kv: fake)
    with pytest.raises(Unavailable, match="lapsed"):
        cluster_backup.backup_client(None, tmp_path / "x.kvb")
    assert len(set(fake.fences)) == cluster_backup.ATTEMPTS  # a new fence each time
    assert fake.closed == cluster_backup.ATTEMPTS  # every read point closed
    assert not os.listdir(tmp_path)
