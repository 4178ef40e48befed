"""The counter service: a Flask app whose POST adds one to a stored count and whose GET
reads it, on kvstore (embedded or a cluster) or, for comparison, on sqlite3.

    POST /counters/<name>   -> 200 {"name": ..., "count": <the count after this POST>}
    GET  /counters/<name>   -> 200 {"name": ..., "count": <the count, 0 if never counted>}
    GET  /healthz           -> 200 once the store answers a read, else 503

Configured by environment variables, read when the app is created:

    COUNTER_STORE    embedded | cluster | sqlite            (default: embedded)
    COUNTER_DIR      embedded: the store's directory        (default: ./counter-data)
    COUNTER_CLUSTER  cluster: "tcp://h:p,tcp://h:p,..."     (or KVSTORE_CLUSTER)
    COUNTER_METHOD   incr | transaction                     (default: incr)
    COUNTER_SQLITE   sqlite: the database file              (default: ./counter.sqlite3)
    COUNTER_TIMEOUT  cluster: each call's deadline, seconds (default: 5)

``incr`` is one command in kvstore's state machine: never a conflict, exact under any
concurrency. ``transaction`` is the read-modify-write a user writes without it
(``run_transaction``: get, then put the value plus one), retried on conflict until
the deadline: kept so the two can be compared (README, "The counter service").

Errors become HTTP statuses with a JSON body naming kvstore's error class
(``STATUS_OF``). 503 means the outcome is unknown: the store did not answer in
time, and the increment may or may not have been applied (a client retrying a POST
on 503 may count twice; one that does not may count once too few). 409 means a
transaction kept losing to concurrent ones until its deadline: nothing was applied.

The store is created lazily, once per process, on the first request
(``Counter.store``): under a pre-forking server (gunicorn.conf.py says why) each
worker makes its own after the fork.
"""

from __future__ import annotations

import os
import sqlite3
import threading

from flask import Flask, jsonify

import kvstore
from kvstore.errors import (InvalidArgument, KVError, StorageError, TransactionConflict,
                            Unavailable)

#: kvstore's error classes as HTTP statuses, most specific first (``Timeout`` is an
#: ``Unavailable``). An error not listed (a bug, a closed store) is a 500.
STATUS_OF = (
    (Unavailable, 503),  # no quorum or no answer in time: the outcome is unknown
    (TransactionConflict, 409),  # lost to concurrent transactions until the deadline
    (InvalidArgument, 400),  # a bad counter name, or a stored value that is not a count
    (StorageError, 500),  # the disk refused
    (KVError, 500),
)

METHODS = ("incr", "transaction")


def http_status(error: KVError) -> int:
    """The HTTP status that reports ``error``."""
    return next(status for cls, status in STATUS_OF if isinstance(error, cls))


def _count(key: bytes, value: bytes | None) -> int:
    """The count a stored value holds (absent: 0), as ``incr`` reads it."""
    try:
        return 0 if value is None else int(value)
    except ValueError:
        raise InvalidArgument(f"{key!r} holds {value[:40]!r}, not a count") from None


class KvstoreCounter:
    """Counts in kvstore: the embedded store in ``path`` or the cluster at ``addresses``,
    by ``incr`` or by a transaction. The store is made on first use in each process."""

    def __init__(self, *, method: str, path: str | None = None,
                 addresses: str | None = None, timeout: float = 5.0) -> None:
        if method not in METHODS:
            raise ValueError(f"COUNTER_METHOD must be one of {', '.join(METHODS)}, not {method!r}")
        if (path is None) == (addresses is None):
            raise ValueError("give the embedded store's directory or the cluster's addresses")
        self.method, self.path, self.addresses, self.timeout = method, path, addresses, timeout
        self._lock = threading.Lock()
        self._store = None
        self._pid = None

    def store(self) -> kvstore.KV:
        """This process's store, made on first use: a store inherited from a parent
        process (made before a fork) is not used, a new one is made instead."""
        with self._lock:
            if self._store is None or self._pid != os.getpid():
                if self.path is not None:
                    self._store = kvstore.open(self.path)
                else:
                    self._store = kvstore.connect(self.addresses, timeout=self.timeout)
                self._pid = os.getpid()
            return self._store

    def add_one(self, key: bytes) -> int:
        if self.method == "incr":
            return self.store().incr(key)

        def read_and_write(txn) -> int:
            count = _count(key, txn.get(key)) + 1
            txn.put(key, b"%d" % count)
            return count

        return self.store().run_transaction(read_and_write)

    def read(self, key: bytes) -> int:
        return _count(key, self.store().get(key))

    def close(self) -> None:
        with self._lock:
            if self._store is not None and self._pid == os.getpid():
                self._store.close()
            self._store = None


class SqliteCounter:
    """The same service on sqlite3, for comparison: WAL mode, synchronous=FULL (every
    commit durable, as kvstore's are), one connection per thread (a sqlite3 connection
    must not cross threads or a fork), each increment one statement."""

    def __init__(self, path: str, busy_timeout_ms: int = 5000) -> None:
        self.path = path
        self.busy_timeout_ms = busy_timeout_ms
        self._local = threading.local()

    def _connection(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None or self._local.pid != os.getpid():
            conn = sqlite3.connect(self.path, isolation_level=None)  # autocommit statements
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("CREATE TABLE IF NOT EXISTS counters "
                         "(name BLOB PRIMARY KEY, n INTEGER NOT NULL)")
            self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    def add_one(self, key: bytes) -> int:
        try:
            (count,) = self._connection().execute(
                "INSERT INTO counters (name, n) VALUES (?, 1) "
                "ON CONFLICT (name) DO UPDATE SET n = n + 1 RETURNING n", (key,)).fetchone()
        except sqlite3.OperationalError as e:  # "database is locked" past busy_timeout
            raise Unavailable(f"sqlite3: {e}") from e
        return count

    def read(self, key: bytes) -> int:
        row = self._connection().execute("SELECT n FROM counters WHERE name = ?",
                                         (key,)).fetchone()
        return 0 if row is None else row[0]

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


def counter_from_environment(env=os.environ):
    """The counter the environment configures (the module docstring lists the variables)."""
    kind = env.get("COUNTER_STORE", "embedded")
    method = env.get("COUNTER_METHOD", "incr")
    if kind == "embedded":
        return KvstoreCounter(method=method, path=env.get("COUNTER_DIR", "counter-data"))
    if kind == "cluster":
        addresses = env.get("COUNTER_CLUSTER") or env.get("KVSTORE_CLUSTER")
        if not addresses:
            raise ValueError("COUNTER_STORE=cluster needs COUNTER_CLUSTER=tcp://h:p,...")
        return KvstoreCounter(method=method, addresses=addresses,
                              timeout=float(env.get("COUNTER_TIMEOUT", "5")))
    if kind == "sqlite":
        return SqliteCounter(env.get("COUNTER_SQLITE", "counter.sqlite3"))
    raise ValueError(f"COUNTER_STORE must be embedded, cluster or sqlite, not {kind!r}")


def create_app(counter=None) -> Flask:
    """The Flask app over ``counter`` (default: the one the environment configures)."""
    counter = counter if counter is not None else counter_from_environment()
    app = Flask(__name__)
    app.extensions["counter"] = counter

    @app.errorhandler(KVError)
    def kvstore_error(error: KVError):
        status = http_status(error)
        body = {"error": type(error).__name__, "message": str(error)}
        if status == 503:
            body["outcome"] = "unknown"
        response = jsonify(body)
        response.status_code = status
        if status == 503:
            response.headers["Retry-After"] = "1"
        return response

    @app.post("/counters/<name>")
    def increment(name: str):
        return jsonify(name=name, count=counter.add_one(b"counter/" + name.encode()))

    @app.get("/counters/<name>")
    def read(name: str):
        return jsonify(name=name, count=counter.read(b"counter/" + name.encode()))

    @app.get("/healthz")
    def healthz():
        counter.read(b"counter/healthz")  # a KVError here answers 503 or 500
        return jsonify(ok=True)

    return app


#: What a WSGI server serves (``gunicorn app:app``). Creating it opens nothing: the
#: store is made on the first request, in the process that serves it.
app = create_app()
