"""Pins the public names of ``kvstore`` (shared/API.md sections 1-2)."""

from __future__ import annotations

import inspect

import pytest

import kvstore
import kvstore.errors

ERRORS = ["KVError", "InvalidArgument", "TransactionConflict", "Unavailable", "Timeout",
          "StorageError", "CorruptRecord"]


def test_public_names_exist():
    for name in ["open", "connect", "KV", "Txn", "MAX_KEY_SIZE", "MAX_VALUE_SIZE", *ERRORS]:
        assert hasattr(kvstore, name), name
        assert name in kvstore.__all__, name
    assert callable(kvstore.open) and callable(kvstore.connect)


def test_errors_are_reexported_from_kvstore_errors():
    for name in ERRORS:
        assert getattr(kvstore, name) is getattr(kvstore.errors, name)


def test_error_hierarchy():
    assert issubclass(kvstore.KVError, Exception)
    for name in ERRORS:
        assert issubclass(getattr(kvstore, name), kvstore.KVError), name
    assert issubclass(kvstore.InvalidArgument, ValueError)
    assert issubclass(kvstore.Timeout, kvstore.Unavailable)
    assert issubclass(kvstore.CorruptRecord, kvstore.StorageError)
    assert not issubclass(kvstore.TransactionConflict, kvstore.Unavailable)
    assert not issubclass(kvstore.StorageError, ValueError)


def test_storage_error_carries_the_path():
    err = kvstore.StorageError("disk full in /x", "/x")
    assert err.path == "/x" and "/x" in str(err)


def test_limits():
    assert isinstance(kvstore.MAX_KEY_SIZE, int) and kvstore.MAX_KEY_SIZE >= 511
    assert isinstance(kvstore.MAX_VALUE_SIZE, int) and kvstore.MAX_VALUE_SIZE >= 1024 * 1024


def test_kv_interface_methods():
    for name in ["get", "put", "delete", "cas", "scan", "transaction", "run_transaction",
                 "status", "close", "__enter__", "__exit__"]:
        assert callable(getattr(kvstore.KV, name, None)), name
    for name in ["get", "put", "delete", "scan"]:
        assert callable(getattr(kvstore.Txn, name, None)), name
    params = inspect.signature(kvstore.KV.scan).parameters
    assert list(params)[1:] == ["prefix", "start", "end", "limit"]
    assert params["prefix"].default == b"" and params["limit"].default is None
    assert inspect.signature(kvstore.KV.run_transaction).parameters["retries"].default == 10


def test_open_signature():
    params = inspect.signature(kvstore.open).parameters
    assert list(params)[0] == "path"
    for name in ["node_id", "cluster", "shards", "map_size"]:
        assert name in params, name


def test_open_returns_a_kv(tmp_path):
    with kvstore.open(str(tmp_path / "kv")) as db:
        assert isinstance(db, kvstore.KV)
        with db.transaction() as txn:
            assert isinstance(txn, kvstore.Txn)


def test_connect_without_servers_is_a_kverror():
    with pytest.raises(kvstore.KVError):
        kvstore.connect("tcp://127.0.0.1:1", timeout=0.5)
