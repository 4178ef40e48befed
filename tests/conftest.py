"""Shared fixtures for the embedded store's tests.

``store`` is a factory (pyzmq-fixture style): ``store()`` opens a new store in
a fresh directory under ``tmp_path``, ``store(path)`` opens (or reopens) a
given one; every store it made is closed at teardown, so a failing test never
leaks an LMDB environment or a directory lock into the next one.
"""

from __future__ import annotations

import itertools
import os
import re
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


@pytest.fixture
def three_nodes(tmp_path):
    """Three ``kvstore-server`` processes with one shard, ready: ``(LocalCluster, the
    index of shard 0's leader)``."""
    from kvstore.server.local import LocalCluster
    lc = LocalCluster(str(tmp_path / "c"), 3, 1, env=child_env())
    lc.start_all()
    st = lc.wait_ready()
    yield lc, st["shards"][0]["leader"]
    lc.close()


@pytest.fixture(params=[1, 3], ids=["1shard", "3shards"])
def shards(request) -> int:
    return request.param


@pytest.fixture
def db(store, shards):
    """An open embedded store with 1 or 3 shards."""
    return store(shards=shards)


class ManualClock:
    """A clock the test moves by setting ``now`` (``kvstore.node.ports.Clock``)."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return 1.7e9 + self.now


def child_env() -> dict:
    """The environment for a child Python process that imports this checkout's kvstore."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


PYTHON = sys.executable


def refused_start(tmp_path, data: str, shards: int) -> str:
    """Start ``kvstore-server`` on the node directory ``data`` and expect it refused at once:
    exit 2 with one line on stderr and no traceback; that line."""
    import subprocess
    config = tmp_path / "cluster.toml"
    config.write_text(f'shards = {shards}\n[nodes.n1]\naddress = "tcp://127.0.0.1:1"\n'
                      f'data = "{data}"\n')
    r = subprocess.run([PYTHON, "-m", "kvstore.server", "--config", str(config), "--id", "n1"],
                       capture_output=True, env=child_env(), timeout=60)
    err = r.stderr.decode()
    assert r.returncode == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def seed_chunks(count: int, per_test: int) -> list:
    """``range(count)`` cut into ranges of at most ``per_test`` seeds: a long seed sweep as
    several tests (parametrize with ``ids=seeds_id``), each far inside its timeout, and
    ``--durations`` shows which part grew, without dropping a seed."""
    return [range(start, min(start + per_test, count)) for start in range(0, count, per_test)]


def seeds_id(value):
    """A test id part for a range of seeds (``seeds0-49``); pytest's own for anything else."""
    return f"seeds{value.start}-{value.stop - 1}" if isinstance(value, range) else None


# What the KVSTORE_PURE=1 run covers (`pytest -m pure`, as scripts/test.sh runs it): the
# tests of what the pure-Python twins of the kernels change. An entry is a whole file, or
# one test of a file ("file.py::name": a function, every parametrization of it, or a class).
# The native run runs everything; the pure run does not run every process-level test a
# second time, only a smoke test of the store, one node and a cluster.
PURE = (
    # the kernels themselves: vectors, native == pure, every corruption detected
    "test_hashing.py", "test_logcodec.py", "test_quorum.py", "test_native_selection.py",
    # what calls them on its hot path: the wire codec (records checked on receipt), the
    # write-ahead log and recovery over it, the Paxos core's tallies
    "test_transport.py", "test_wal.py", "test_replica_wal.py", "test_log_format.py",
    "test_paxos_core.py", "test_paxos_safety.py", "test_peer_input.py",
    # the real node under the simulator: the log codec and the tallies on every step
    "test_sim_realnode.py::test_clean_seeds_pass",
    "test_embedded_recovery.py::test_acknowledged_writes_survive_power_loss_and_a_torn_write_is_whole_or_absent",
    "test_embedded_recovery.py::test_a_torn_multi_shard_transaction_is_all_or_nothing",
    "test_embedded_recovery.py::test_an_entry_whose_commit_point_was_torn_off_is_never_applied",
    "test_embedded_recovery.py::test_replay_applies_nothing_twice_and_keeps_revisions",
    "test_embedded_recovery.py::test_a_log_that_lost_checkpointed_records_is_refused",
    "test_embedded_recovery.py::TestCrashMachine",
    # stored values' checksums
    "test_hostile_files.py::test_flipped_bytes_in_every_page_give_right_data_or_a_storage_error",
    "test_hostile_files.py::test_a_flipped_byte_in_a_value_is_caught_by_its_checksum",
    "test_hostile_files.py::test_check_compares_the_state_with_the_log",
    "test_hostile_files.py::test_a_log_key_that_disagrees_with_its_record_is_refused_at_open",
    # smoke: the whole embedded store's API, one node, a cluster of processes, 2PC
    "test_embedded_api.py",
    "test_incr.py::test_embedded_incr_adds_to_a_decimal_value_and_refuses_anything_else",
    "test_node.py::test_single_node_cluster_serves_the_kv_interface_and_survives_restart",
    "test_cluster.py::test_put_and_get_through_every_node",
    "test_cluster.py::test_sigkill_of_the_leader_under_writes_loses_no_acknowledged_write",
    "test_cluster_txn.py::test_a_cross_shard_transaction_commits_everywhere_or_nowhere",
)


def _pure_selection() -> dict:
    """PURE as {file name: set of test names, empty for the whole file}. A file or a name
    that does not exist (renamed, removed) is an error, so the pure run never shrinks
    silently."""
    selection: dict = {}
    for entry in PURE:
        name, _, test = entry.partition("::")
        path = os.path.join(REPO_ROOT, "tests", name)
        if not os.path.isfile(path):
            raise pytest.UsageError(f"tests/conftest.py PURE names {name}, which does not exist")
        if test:
            with open(path, encoding="utf-8") as f:
                if not re.search(rf"^(async def |def |class )?{re.escape(test)}\b", f.read(), re.M):
                    raise pytest.UsageError(
                        f"tests/conftest.py PURE names {entry}, which {name} does not define")
        selection.setdefault(name, set())
        if test:
            selection[name].add(test)
    return selection


def _is_pure(config, item) -> bool:
    tests = config.pure_selection.get(item.path.name)
    if tests is None:
        return False
    top = item.nodeid.split("::")[1].split("[")[0]  # the function or class, without params
    return not tests or top in tests


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "chaos: the opt-in chaos run (set KVSTORE_CHAOS_SECONDS)")
    config.addinivalue_line("markers", "sweep: an opt-in long seed sweep (set KVSTORE_SWEEP_SEEDS)")
    config.addinivalue_line(
        "markers", "pure: run again with KVSTORE_PURE=1 (applied from PURE in tests/conftest.py)")
    config.pure_selection = _pure_selection()


@pytest.hookimpl(tryfirst=True)  # before `-m pure` selects by the marker
def pytest_collection_modifyitems(config, items) -> None:
    """Marks the PURE tests `pure`. The chaos run and the long sweeps are opt-in: without
    KVSTORE_CHAOS_SECONDS (or KVSTORE_SWEEP_SEEDS) they are deselected, not skipped."""
    for item in items:
        if _is_pure(config, item):
            item.add_marker(pytest.mark.pure)
    for marker, variable in (("chaos", "KVSTORE_CHAOS_SECONDS"), ("sweep", "KVSTORE_SWEEP_SEEDS")):
        if float(os.environ.get(variable, "0")) > 0:
            continue
        opt_in = [item for item in items if item.get_closest_marker(marker) is not None]
        if opt_in:
            config.hook.pytest_deselected(items=opt_in)
            items[:] = [item for item in items if item.get_closest_marker(marker) is None]
