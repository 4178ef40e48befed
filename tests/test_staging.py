"""A store staged inside a directory and installed last (kvstore/storage/staging.py): the
step restore and --init-from share. Their own tests cover their refusals; these, what
the shared step leaves after a failure at each stage."""

from __future__ import annotations

import os

import pytest

import kvstore
from kvstore.errors import StorageError
from kvstore.storage import Storage, staging
from kvstore.storage.environment import DATA_FILE


def build_store(staging_dir: str) -> int:
    storage = Storage(staging_dir, shards=1)
    storage.close()
    return 7


@pytest.mark.parametrize("existing", [False, True])
def test_a_store_is_installed_whole_and_the_staging_directory_is_gone(tmp_path, existing):
    target = str(tmp_path / "t")
    if existing:
        os.mkdir(target)
    assert staging.stage_and_install(target, ".staging", build_store, "the target") == 7
    assert os.listdir(target) == [DATA_FILE]
    with kvstore.open(target) as db:
        db.put(b"k", b"v")


@pytest.mark.parametrize("existing", [False, True])
def test_an_interrupted_build_leaves_the_target_as_it_was(tmp_path, existing):
    target = str(tmp_path / "t")
    if existing:
        os.mkdir(target)

    def interrupted(staging_dir):
        build_store(staging_dir)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        staging.stage_and_install(target, ".staging", interrupted, "the target")
    assert (os.listdir(target) == []) if existing else not os.path.exists(target)


def test_a_failure_after_the_data_file_moved_in_takes_it_out_again(tmp_path, monkeypatch):
    """The directory's sync after the rename fails: no data.mdb stays (all or nothing)."""
    target = str(tmp_path / "t")
    os.mkdir(target)

    def failing_sync(path):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(staging, "fsync_directory", failing_sync)
    with pytest.raises(StorageError, match="moving the new data file into place"):
        staging.stage_and_install(target, ".staging", build_store, "the target")
    assert os.listdir(target) == []


def test_a_target_held_by_an_open_store_is_refused_and_kept(tmp_path):
    target = str(tmp_path / "t")
    os.mkdir(target)
    with staging.DirectoryLock(target, "the target"):  # as a store open on it holds
        with pytest.raises(staging.DirectoryBusy) as busy:
            staging.stage_and_install(target, ".staging", build_store, "the target")
    assert busy.value.holder in ("this process", "another process")
    assert os.listdir(target) == []
