"""A full disk is a StorageError naming the path; nothing acknowledged is lost; the store
keeps working once writes fit again. A write that fits the log's preallocated segment
succeeds on a full disk: it is durable there (the checkpoint into LMDB waits for space).

The disk is a real 2 MiB tmpfs mounted for the test (CI runs as root on a
machine of the project's kind, where this is allowed).
"""

from __future__ import annotations

import subprocess

import pytest

import kvstore


@pytest.fixture
def small_disk(tmp_path):
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
                   check=True, capture_output=True)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_full_disk_is_a_storage_error_and_loses_nothing(small_disk):
    path = str(small_disk / "kv")
    db = kvstore.open(path, map_size=1 << 20)
    acknowledged = []
    with pytest.raises(kvstore.StorageError) as info:
        for i in range(10_000):
            db.put(b"k%05d" % i, b"x" * 10_000)
            acknowledged.append(b"k%05d" % i)
    assert "disk full" in str(info.value) and path in str(info.value)
    assert info.value.path == path
    assert len(acknowledged) > 10
    # A write that does not fit fails the same way and changes nothing ...
    before = db.status()["shards"][0]["commit_index"]
    with pytest.raises(kvstore.StorageError):
        db.put(b"big", b"y" * 1_000_000)
    assert db.status()["shards"][0]["commit_index"] == before
    assert db.get(b"big") is None
    # ... while one that fits still succeeds, and every acknowledged write is there.
    db.put(b"small", b"ok")
    db.close()
    with kvstore.open(path) as db:
        assert db.get(b"small") == b"ok"
        for key in acknowledged:
            assert db.get(key) == b"x" * 10_000


def fill(directory, leave_bytes: int) -> str:
    """Fill the filesystem of ``directory`` until about ``leave_bytes`` are free."""
    import os

    filler = os.path.join(str(directory), "filler")
    st = os.statvfs(str(directory))
    free = st.f_bavail * st.f_frsize
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free - leave_bytes))
        try:
            while True:  # the last pages, one at a time, down to what must stay free
                st = os.statvfs(str(directory))
                if st.f_bavail * st.f_frsize <= leave_bytes:
                    break
                f.write(b"\0" * 4096)
                f.flush()
        except OSError:
            pass
    return filler


OPEN_FULL = r"""
import json, os, sys
import kvstore
path = sys.argv[1]
fds = len(os.listdir("/proc/self/fd"))
out = {}
with kvstore.open(path) as db:
    out["get"] = db.get(b"k").decode()
    out["scan"] = len(db.scan())
    try:
        db.put(b"k2", b"y" * 100_000)  # may fit the log's preallocated segment: then durable
        out["put"] = "ok"
    except kvstore.StorageError as e:
        out["put"] = str(e)
    try:
        db.put(b"k3", b"z" * 3_000_000)  # larger than any segment the full disk can hold
        out["big_put"] = "ok"
    except kvstore.StorageError as e:
        out["big_put"] = str(e)
    out["big_get"] = None if db.get(b"k3") is None else "present"
out["fds_leaked"] = len(os.listdir("/proc/self/fd")) - fds
sys.stdout.write(json.dumps(out) + "\n")
sys.stdout.flush()
sys.stdin.readline()  # the test frees space meanwhile
with kvstore.open(path) as db:  # the same process opens it again
    db.put(b"k3", b"after")
    out["after"] = db.get(b"k3").decode()
print(json.dumps(out), flush=True)
"""


def test_an_existing_store_opens_and_reads_on_a_full_disk(small_disk):
    """Issue 11 #3: open failed with a bare ENOSPC writing the pid, and leaked its lock."""
    import json
    import os

    from conftest import PYTHON, child_env

    path = str(small_disk / "kv")
    with kvstore.open(path) as db:
        db.put(b"k", b"v")
    filler = fill(small_disk, 0)
    proc = subprocess.Popen([PYTHON, "-c", OPEN_FULL, path], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env())
    try:
        first = proc.stdout.readline()
        assert first, proc.stderr.read().decode()
        out = json.loads(first)
        assert out["get"] == "v" and out["scan"] == 1
        assert out["put"] == "ok" or ("disk full" in out["put"] and path in out["put"])
        assert "disk full" in out["big_put"] and path in out["big_put"]
        assert out["big_get"] is None  # the refused write changed nothing
        assert out["fds_leaked"] == 0
        cli = subprocess.run([PYTHON, "-m", "kvstore.cli", "get", "k", "--data", path],
                             capture_output=True, env=child_env(), timeout=60)
        assert cli.returncode == 0 and cli.stdout == b"v\n", cli.stderr.decode()
        cli = subprocess.run([PYTHON, "-m", "kvstore.cli", "put", "k", "w" * 100_000,
                              "--data", path], capture_output=True, env=child_env(), timeout=60)
        # Durable in the log's preallocated segment, or refused as a full disk: never a crash.
        assert cli.returncode == 0 or (cli.returncode == 4 and b"disk full" in cli.stderr), \
            cli.stderr.decode()
        assert b"Traceback" not in cli.stderr
        put_ok = cli.returncode == 0
        os.unlink(filler)
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        assert json.loads(proc.stdout.readline())["after"] == "after"
        assert proc.wait(30) == 0
        with kvstore.open(path) as db:  # every acknowledged write is there
            assert db.get(b"k") == (b"w" * 100_000 if put_ok else b"v")
            assert db.get(b"k2") == (b"y" * 100_000 if out["put"] == "ok" else None)
            assert db.get(b"k3") == b"after"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            stream.close()


CREATE_FULL = r"""
import os, sys
import kvstore
path = sys.argv[1]
try:
    kvstore.open(path)
    print("opened")
except kvstore.StorageError as e:
    print("StorageError", e)
print(sorted(os.listdir(path)) if os.path.isdir(path) else "no directory", flush=True)
"""


@pytest.mark.parametrize("free_bytes", [0, 4096, 12288, 28672])
def test_creating_a_store_with_almost_no_space_is_a_storage_error(small_disk, free_bytes):
    """Issue 11 #4: LMDB's lock file, sized sparse and mapped, died of SIGBUS on first use."""
    import os

    from conftest import PYTHON, child_env

    path = str(small_disk / "kv")
    filler = fill(small_disk, free_bytes)
    proc = subprocess.run([PYTHON, "-c", CREATE_FULL, path], capture_output=True,
                          env=child_env(), timeout=60)
    assert proc.returncode == 0, (proc.returncode, proc.stderr.decode())
    lines = proc.stdout.decode().splitlines()
    assert lines[0].startswith("StorageError") and "disk full" in lines[0], lines
    assert path in lines[0]
    assert "data.mdb" not in lines[1]  # a store that could not be created leaves no data file
    os.unlink(filler)
    with kvstore.open(path) as db:  # with space again, the same directory works
        db.put(b"k", b"v")
        assert db.get(b"k") == b"v"
