"""A store whose files were truncated, bit-flipped, shared through fork() or unlocked
(issue 11 #2, #5, #6, #7, #8, #15).

Whatever happened to the files, the answer is the right data or a StorageError naming
the path: never a crash by signal, a bare third-party exception, or wrong data where a
checksum could tell. Cases that could kill the process run in a child process.
"""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess

import lmdb
import pytest

import kvstore
from conftest import PYTHON, child_env
from kvstore import StorageError
from kvstore._native import pack_value

PAGE = 4096
VALUES = {b"key/%03d" % i: (b"value-%03d-" % i) * (1 + i % 9) for i in range(80)}
VALUES.update({b"big/%d" % i: bytes([65 + i]) * 9000 for i in range(2)})  # overflow pages


def used_bytes(data_file: str) -> int:
    """The bytes of data.mdb LMDB uses, from its newest meta page."""
    with open(data_file, "rb") as f:
        head = f.read(2 * PAGE)
    metas = [struct.unpack_from("<QQ", head, off + 136) for off in (0, PAGE)]
    last_page, _txn = max(metas, key=lambda m: m[1])
    return (last_page + 1) * PAGE


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> bytes:
    """The used bytes of data.mdb of a closed store holding VALUES."""
    path = str(tmp_path_factory.mktemp("pristine") / "kv")
    with kvstore.open(path) as db, db.transaction() as txn:
        for key, value in VALUES.items():
            txn.put(key, value)
    data_file = os.path.join(path, "data.mdb")
    with open(data_file, "rb") as f:
        return f.read(used_bytes(data_file))


def store_from(directory, data: bytes) -> str:
    """A store directory whose data.mdb is ``data`` (no lock files: as after a clean close)."""
    directory.mkdir()
    (directory / "data.mdb").write_bytes(data)
    return str(directory)


CHILD = r"""
import json, sys
import kvstore
expected = {bytes.fromhex(k): bytes.fromhex(v) for k, v in json.loads(sys.argv[1]).items()}
write = sys.argv[2] == "write"
for path in sys.argv[3:]:
    outcome = "ok"
    try:
        with kvstore.open(path) as db:
            for key, value in expected.items():
                got = db.get(key)
                if got is not None and got != value:
                    outcome = f"WRONG get {key!r}"
            for key, value in db.scan():
                if expected.get(key) != value:
                    outcome = f"WRONG scan {key!r}"
            db.verify()
            if write:
                db.put(b"new", b"x")
                assert db.get(b"new") == b"x"
    except kvstore.StorageError as e:
        outcome = "StorageError: " + str(e)
    except BaseException as e:
        outcome = f"BAD {type(e).__module__}.{type(e).__name__}: {e}"
    print(json.dumps([path, outcome]), flush=True)
"""


def run_cases(paths: list[str], timeout: float = 120, write: bool = True) -> dict:
    """Open, read, check (and write) each store in a child; {path: outcome}. A signal fails."""
    expected = json.dumps({k.hex(): v.hex() for k, v in VALUES.items()})
    proc = subprocess.run([PYTHON, "-c", CHILD, expected, "write" if write else "read",
                           *paths], capture_output=True,
                          env=child_env(), timeout=timeout)
    done = dict(json.loads(line) for line in proc.stdout.decode().splitlines())
    assert proc.returncode == 0, (f"child died (signal {-proc.returncode}) after "
                                  f"{len(done)} of {len(paths)} cases: "
                                  f"{proc.stderr.decode()[-2000:]}")
    return done


# -- truncation (#2) ------------------------------------------------------------------------


def test_a_truncated_data_file_is_a_storage_error_naming_it_never_sigbus(tmp_path, pristine):
    cuts = {"8k": 8192, "12k": 12288, "half": len(pristine) // 2,
            "all-but-last-page": len(pristine) - PAGE, "one-byte-short": len(pristine) - 1,
            "one-page": PAGE, "empty": 0}
    paths = {name: store_from(tmp_path / name, pristine[:cut]) for name, cut in cuts.items()}
    outcomes = run_cases(list(paths.values()))
    for name, path in paths.items():
        outcome = outcomes[path]
        assert outcome.startswith("StorageError"), (name, outcome)
        assert path in outcome, (name, outcome)
    whole = store_from(tmp_path / "whole", pristine)
    assert run_cases([whole])[whole] == "ok"


def test_the_cli_on_a_truncated_store_exits_4(tmp_path, pristine):
    path = store_from(tmp_path / "kv", pristine[:12288])
    for command in (["get", "key/001"], ["check"], ["scan"]):
        proc = subprocess.run([PYTHON, "-m", "kvstore.cli", *command, "--data", path],
                              capture_output=True, env=child_env(), timeout=60)
        assert proc.returncode == 4, (command, proc.returncode, proc.stderr.decode())
        assert b"truncated" in proc.stderr and path.encode() in proc.stderr
        assert b"Traceback" not in proc.stderr


# -- flipped bytes (#5, #7) -------------------------------------------------------------------


def test_flipped_bytes_in_every_page_give_right_data_or_a_storage_error(tmp_path, pristine):
    rng = random.Random(1105)
    paths = []
    for page in range(len(pristine) // PAGE):
        # the page header, then node headers and data at the ends of the page
        offsets = [0, 8, 10, 12, 14, 17, 20, 24] + [rng.randrange(16, PAGE) for _ in range(6)]
        for n, offset in enumerate(offsets):
            data = bytearray(pristine)
            data[page * PAGE + offset] ^= 1 << rng.randrange(8)
            paths.append(store_from(tmp_path / f"p{page}-{n}", bytes(data)))
    outcomes = run_cases(paths, timeout=240)  # and a write after the reads is read back
    bad = {p: o for p, o in outcomes.items() if not (o == "ok" or o.startswith("StorageError"))}
    assert bad == {}
    errors = [o for o in outcomes.values() if o.startswith("StorageError")]
    assert errors and all(str(tmp_path) in o for o in errors)


def test_a_flipped_byte_in_a_value_is_caught_by_its_checksum(tmp_path, pristine, store):
    for key, value in [(b"key/042", VALUES[b"key/042"]), (b"big/1", VALUES[b"big/1"])]:
        at = pristine.index(value)  # the value's bytes in a leaf or an overflow page
        data = bytearray(pristine)
        data[at + len(value) // 2] ^= 0x04
        path = store_from(tmp_path / key.decode().replace("/", "-"), bytes(data))
        db = store(path)
        with pytest.raises(StorageError) as info:
            db.get(key)
        assert "corrupt" in str(info.value) and path in str(info.value)
        assert info.value.path == path
        with pytest.raises(StorageError):
            db.scan()
        with pytest.raises(StorageError):
            with db.transaction() as txn:
                txn.get(key)
        with pytest.raises(StorageError, match="corrupt"):
            db.verify()
        assert db.get(b"key/001") == VALUES[b"key/001"]  # the rest is still served
        db.close()


def tamper(path: str, fn) -> None:
    """``fn(txn, data_table)`` on the closed store's LMDB environment, bypassing kvstore."""
    env = lmdb.open(path, max_dbs=8)
    try:
        data = env.open_db(b"s0.data", create=False)
        with env.begin(write=True) as txn:
            fn(txn, data)
    finally:
        env.close()


def test_check_compares_the_state_with_the_log(store):
    db = store()
    for i in range(20):
        db.put(b"k%02d" % i, b"v%02d" % i)
    db.cas(b"k03", b"v03", b"swapped")
    path = db.path
    db.close()
    with store(path) as db:
        assert db.verify()["keys_compared"] == 20
    revision = {}

    def rewrite(txn, data):  # a well-checksummed value the log never wrote
        raw = txn.get(b"k05", db=data)
        revision["k05"] = int.from_bytes(raw[:8], "big")
        txn.put(b"k05", pack_value(b"k05", revision["k05"], b"forged"), db=data)

    tamper(path, rewrite)
    db = store(path)
    assert db.get(b"k05") == b"forged"  # its checksum is right: only the log can tell
    with pytest.raises(StorageError, match="disagrees with its log on key b'k05'"):
        db.verify()
    db.close()
    tamper(path, lambda txn, data: txn.put(b"k05", pack_value(b"k05", revision["k05"], b"v05"),
                                           db=data))
    tamper(path, lambda txn, data: txn.delete(b"k07", db=data))  # a lost write
    db = store(path)
    with pytest.raises(StorageError, match="k07.*state lacks it"):
        db.verify()
    db.close()
    tamper(path, lambda txn, data: txn.put(b"k07", pack_value(b"k07", 1, b"v07"), db=data))
    db = store(path)  # a stale revision: the log wrote k07 later
    with pytest.raises(StorageError, match="k07"):
        db.verify()


# -- a corrupt main table (#6) ----------------------------------------------------------------


def test_a_corrupt_main_table_is_refused_and_nothing_is_created(tmp_path, pristine):
    newest = max((0, PAGE), key=lambda off: struct.unpack_from("<Q", pristine, off + 144)[0])
    root = struct.unpack_from("<Q", pristine, newest + 128)[0]  # mm_dbs[MAIN_DBI].md_root
    page = bytearray(pristine[root * PAGE:(root + 1) * PAGE])
    at = page.index(b"s0.data")
    page[at:at + 7] = b"s0.dat\x00"  # the data table's name: its lookup now fails
    data = pristine[:root * PAGE] + bytes(page) + pristine[(root + 1) * PAGE:]
    path = store_from(tmp_path / "kv", data)
    with pytest.raises(StorageError) as info:
        kvstore.open(path)
    assert path in str(info.value) and "corrupt" in str(info.value)
    with open(os.path.join(path, "data.mdb"), "rb") as f:
        assert f.read(len(data)) == data  # no table was created in the corrupt file
    proc = subprocess.run([PYTHON, "-m", "kvstore.cli", "check", "--data", path],
                          capture_output=True, env=child_env(), timeout=60)
    assert proc.returncode == 4 and b"Traceback" not in proc.stderr


# -- fork (#8) --------------------------------------------------------------------------------

FORK_CHILD = r"""
import json, os, sys
import kvstore
db = kvstore.open(sys.argv[1])
db.put(b"before", b"fork")
read_end, write_end = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(read_end)
    seen = []
    for call in (lambda: db.put(b"child", b"x"), lambda: db.get(b"before"),
                 lambda: db.scan(), lambda: db.transaction().__enter__().get(b"before"),
                 lambda: kvstore.open(sys.argv[1])):
        try:
            call()
            seen.append("no error")
        except kvstore.StorageError as e:
            seen.append(str(e))
        except BaseException as e:
            seen.append(f"BAD {e!r}")
    db.close()
    os.write(write_end, json.dumps(seen).encode())
    os._exit(0)
os.close(write_end)
child = json.loads(os.read(read_end, 65536).decode())
_, status = os.waitpid(pid, 0)
db.put(b"parent", b"y")
assert db.get(b"parent") == b"y" and db.get(b"child") is None
db.verify()
with open(os.path.join(sys.argv[1], "kvstore.lock")) as f:
    holder = f.read().strip()
db.close()
print(json.dumps({"child": child, "status": status, "holder": holder, "me": os.getpid()}))
"""


def test_a_forked_child_gets_a_clear_error_and_the_parent_goes_on(tmp_path):
    path = str(tmp_path / "kv")
    proc = subprocess.run([PYTHON, "-c", FORK_CHILD, path], capture_output=True,
                          env=child_env(), timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
    result = json.loads(proc.stdout)
    assert result["status"] == 0
    put, get, scan, txn, reopen = result["child"]
    for message in (put, get, scan, txn):
        assert "fork()" in message and path in message, message
    assert "in use by process" in reopen, reopen
    assert result["holder"] == str(result["me"])  # the child's close left the lock alone


# -- the directory lock (#15) -----------------------------------------------------------------

HOLDER = r"""
import sys, kvstore
db = kvstore.open(sys.argv[1])
db.put(b"k", b"holder")
print("open", flush=True)
sys.stdin.read()
db.put(b"k2", b"after")
db.close()
"""


@pytest.mark.parametrize("deleted", [["kvstore.lock"], ["kvstore.lock", "lock.mdb"]])
def test_deleting_the_lock_files_lets_no_second_process_in(tmp_path, deleted):
    path = str(tmp_path / "kv")
    holder = subprocess.Popen([PYTHON, "-c", HOLDER, path], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env())
    try:
        assert holder.stdout.readline() == b"open\n", holder.stderr.read().decode()
        for name in deleted:
            os.unlink(os.path.join(path, name))
        with pytest.raises(StorageError, match="in use"):
            kvstore.open(path)
        holder.stdin.close()
        assert holder.wait(30) == 0, holder.stderr.read().decode()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        holder.stdout.close()
        holder.stderr.close()
    with kvstore.open(path) as db:
        assert db.get(b"k") == b"holder" and db.get(b"k2") == b"after"


def test_a_log_key_that_disagrees_with_its_record_is_refused_at_open(store):
    """Issue 11 #5: a flipped byte in a log key moved the store's applied point silently.

    The ``log`` table is what a directory written before the write-ahead log
    holds (issue 12): its last slot is still that store's applied point."""
    from kvstore._native import encode_record
    from kvstore.commands import KIND_COMMANDS, OP_PUT, encode_commands

    db = store()
    path = db.path
    db.close()
    env = lmdb.open(path, max_dbs=8)
    try:
        log = env.open_db(b"s0.log", create=False)
        with env.begin(write=True) as txn:
            for slot, value in [(1, b"v"), (2, b"w")]:
                record = encode_record(slot, 0, KIND_COMMANDS,
                                       encode_commands([(OP_PUT, b"k", value)]))
                txn.put(slot.to_bytes(8, "big"), record, db=log)
            txn.put((1 << 56 | 2).to_bytes(8, "big"), record, db=log)  # its high byte flipped
            txn.delete((2).to_bytes(8, "big"), db=log)
    finally:
        env.close()
    with pytest.raises(StorageError, match="says slot 2") as info:
        kvstore.open(path)
    assert info.value.path == path


def test_the_page_check_accepts_every_healthy_store(tmp_path):
    """The structural check runs at every open: it must never refuse a store LMDB wrote."""
    from kvstore.storage.pages import check_tree

    rng = random.Random(4)
    path = str(tmp_path / "kv")
    data_file = os.path.join(path, "data.mdb")
    keys: list[bytes] = []
    for round_ in range(6):
        with kvstore.open(path, shards=3) as db:
            with db.transaction() as txn:
                for _ in range(1500):
                    key = b"k/%06d" % rng.randrange(100_000)
                    keys.append(key)
                    txn.put(key, bytes([round_]) * rng.choice([0, 9, 200, 3000, 9000]))
            with db.transaction() as txn:
                for key in rng.sample(keys, 600):
                    txn.delete(key)
            for _ in range(20):
                db.put(rng.choice(keys), b"v" * rng.randrange(5000))
            assert db.verify()["pages"] > 3
        with open(data_file, "rb") as f:
            head = f.read(2 * PAGE)
        assert check_tree(data_file, PAGE, [head[:PAGE], head[PAGE:]]) > 3


@pytest.mark.parametrize("name", ["data.mdb", "lock.mdb"])
@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_a_fifo_or_a_directory_in_place_of_a_file_is_a_storage_error(tmp_path, name, kind):
    path = tmp_path / "kv"
    path.mkdir()
    if kind == "fifo":
        os.mkfifo(path / name)
    else:
        (path / name).mkdir()
    proc = subprocess.run(  # a child: a FIFO could hang an open that reads it
        [PYTHON, "-c", "import sys, kvstore\ntry:\n    kvstore.open(sys.argv[1])\n"
         "except kvstore.StorageError as e:\n    print('StorageError', e)", str(path)],
        capture_output=True, env=child_env(), timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.startswith(b"StorageError") and name.encode() in proc.stdout


def test_a_flipped_transaction_id_in_a_meta_page_is_no_silent_rollback(tmp_path, pristine):
    """LMDB opens the meta page with the larger transaction id: raising the older one's
    would roll the store back to an older commit, its later writes silently gone."""
    txn_ids = [struct.unpack_from("<Q", pristine, off + 144)[0] for off in (0, PAGE)]
    older = (0, PAGE)[txn_ids.index(min(txn_ids))]
    data = bytearray(pristine)
    data[older + 144 + 6] ^= 0x01  # its id is now far above the newer one's
    path = store_from(tmp_path / "kv", bytes(data))
    with pytest.raises(StorageError, match="meta pages that disagree") as info:
        kvstore.open(path)
    assert info.value.path == path
