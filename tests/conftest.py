"""Shared fixtures for the embedded store's tests.

``store`` is a factory (pyzmq-fixture style): ``store()`` opens a new store in
a fresh directory under ``tmp_path``, ``store(path)`` opens (or reopens) a
given one; every store it made is closed at teardown, so a failing test never
leaks an LMDB environment or a directory lock into the next one.
"""

from __future__ import annotations

import itertools
import os
import sys

import pytest

import kvstore

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class StoreFactory:
    """Opens stores under one temporary directory and closes them all at the end."""

    def __init__(self, tmp_path) -> None:
        self.tmp_path = tmp_path
        self.opened: list = []
        self._names = itertools.count()

    def new_path(self) -> str:
        return str(self.tmp_path / f"kv{next(self._names)}")

    def __call__(self, path: str | None = None, **kwargs):
        db = kvstore.open(path if path is not None else self.new_path(), **kwargs)
        self.opened.append(db)
        return db

    def reopen(self, db, **kwargs):
        """Close ``db`` and open its directory again."""
        db.close()
        return self(db.path, **kwargs)

    def close_all(self) -> None:
        for db in reversed(self.opened):
            db.close()  # idempotent: closing a closed store is a no-op
        self.opened.clear()


@pytest.fixture
def store(tmp_path):
    factory = StoreFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.close_all()


@pytest.fixture(params=[1, 3], ids=["1shard", "3shards"])
def shards(request) -> int:
    return request.param


@pytest.fixture
def db(store, shards):
    """An open embedded store with 1 or 3 shards."""
    return store(shards=shards)


def child_env() -> dict:
    """The environment for a child Python process that imports this checkout's kvstore."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


PYTHON = sys.executable


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "chaos: the opt-in chaos run (set KVSTORE_CHAOS_SECONDS)")
    config.addinivalue_line("markers", "sweep: an opt-in long seed sweep (set KVSTORE_SWEEP_SEEDS)")


def pytest_collection_modifyitems(config, items) -> None:
    """The chaos run and the long sweeps are opt-in: without KVSTORE_CHAOS_SECONDS (or
    KVSTORE_SWEEP_SEEDS) they are deselected, not skipped."""
    for marker, variable in (("chaos", "KVSTORE_CHAOS_SECONDS"), ("sweep", "KVSTORE_SWEEP_SEEDS")):
        if float(os.environ.get(variable, "0")) > 0:
            continue
        opt_in = [item for item in items if item.get_closest_marker(marker) is not None]
        if opt_in:
            config.hook.pytest_deselected(items=opt_in)
            items[:] = [item for item in items if item.get_closest_marker(marker) is None]
