"""A full disk is a StorageError naming the path; nothing acknowledged is lost; the store
keeps working once writes fit again.

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
