"""The LMDB environment of one data directory.

Layout (DESIGN.md, "Storage layout"): for each shard ``i`` four named tables,

- ``s{i}.log``   slot (8-byte big-endian) -> checksummed log record
- ``s{i}.meta``  ``applied`` / ``commit`` / ``promise`` -> 8-byte big-endian int
- ``s{i}.data``  key -> 8-byte revision + value
- ``s{i}.txn``   transaction records (prepared parts, decisions)

and one ``kvstore`` table with the directory's format (version, shard count).

Three things here exist so users never see them: the map grows on demand
(LMDB's ``MapFullError`` is retried after doubling the map), a second process
opening the directory is refused by name (a ``flock`` on ``kvstore.lock``,
which holds the owner's pid), and every LMDB or OS error is translated at one
choke point (``translate``) into a ``StorageError`` naming the path.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import threading
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

import lmdb
import msgpack

from kvstore.errors import InvalidArgument, StorageError

FORMAT_VERSION = 1
LOCK_FILE = "kvstore.lock"
TABLES_PER_SHARD = 4
MAX_SHARDS = 256
DEFAULT_MAP_SIZE = 1 << 30
#: How long growing the map may wait for open read snapshots to finish.
GROW_WAIT_SECONDS = 60.0

META_APPLIED = b"applied"
META_COMMIT = b"commit"
META_PROMISE = b"promise"
META_LOG_FIRST = b"log_first"

_U64 = struct.Struct(">Q")
T = TypeVar("T")


def pack_u64(value: int) -> bytes:
    return _U64.pack(value)


def unpack_u64(raw: bytes | None, default: int = 0) -> int:
    return default if raw is None else _U64.unpack(raw)[0]


@dataclass(frozen=True)
class ShardTables:
    """The four LMDB tables of one shard."""

    log: object
    meta: object
    data: object
    txns: object


#: Free space below which an I/O error is taken for a full disk.
FULL_DISK_SLACK_BYTES = 64 * 1024


def _filesystem_full(path: str) -> bool:
    """LMDB reports a short write (the disk filled mid-commit) as EIO, not ENOSPC."""
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < FULL_DISK_SLACK_BYTES


def translate(e: BaseException, path: str, doing: str) -> StorageError:
    """The one place where LMDB and OS errors become ``StorageError``."""
    code = getattr(e, "errno", None) or getattr(e, "code", None)
    text = str(e).lower()
    if (code == errno.ENOSPC or "no space left" in text
            or ((code == errno.EIO or "input/output error" in text) and _filesystem_full(path))):
        msg = f"disk full while {doing} in {path}: free some space and retry"
    elif code in (errno.EROFS, errno.EACCES, errno.EPERM) or isinstance(e, lmdb.ReadonlyError):
        msg = f"cannot write {path} while {doing}: the directory is read-only or not permitted"
    elif isinstance(e, (lmdb.CorruptedError, lmdb.InvalidError, lmdb.PageNotFoundError,
                        lmdb.BadChecksumError, lmdb.PanicError)):
        msg = (f"the data in {path} is corrupt or not a kvstore directory ({e}); "
               f"restore it from a replica or a backup")
    elif isinstance(e, (lmdb.VersionMismatchError, lmdb.IncompatibleError)):
        msg = f"{path} was written by an incompatible LMDB version ({e})"
    elif isinstance(e, lmdb.ReadersFullError):
        msg = f"too many concurrent readers on {path} ({e})"
    else:
        msg = f"storage error while {doing} in {path}: {e}"
    err = StorageError(msg, path)
    err.__cause__ = e
    return err


class Storage:
    """One data directory: lock, LMDB environment, per-shard tables.

    Thread-safe for readers; writes must be serialised by the caller (the
    group committer does this: LMDB allows one write transaction at a time).
    Read transactions go through ``begin_read``/``end_read`` so that the map
    can be grown safely: LMDB remaps on growth, which is only safe when this
    process holds no read transaction.
    """

    def __init__(self, path: str, shards: int | None = None, map_size: int | None = None,
                 sync: bool = True) -> None:
        if shards is not None and (isinstance(shards, bool) or not isinstance(shards, int)
                                   or not 1 <= shards <= MAX_SHARDS):
            raise InvalidArgument(f"shards must be an int in 1..{MAX_SHARDS}, got {shards!r}")
        self.path = os.path.abspath(os.fspath(path))
        self._lock_fd = -1
        self._env = None
        self._active_readers: list[None] = []
        self._growing = False
        self._grown = threading.Event()
        self._grown.set()
        # Set while a write transaction commits (see _commit): readers that see
        # its snapshot wait for the commit, and so for its fsync, to finish.
        self.committing = False
        self._committing_id = 0
        self._committed = threading.Condition(threading.Lock())
        self._prepare_directory()
        self._lock_directory()
        try:
            self._open_env(map_size or DEFAULT_MAP_SIZE, sync, shards or 1)
            self.nshards = self._load_format(shards)
            if self.nshards > (shards or 1):
                # LMDB's begin() costs grow with max_dbs, so the environment is
                # opened for exactly the tables it has: reopen for more shards.
                self._env.close()
                self._open_env(map_size or DEFAULT_MAP_SIZE, sync, self.nshards)
                self._format_db = self._open_table(b"kvstore")
            self.shards = [self._open_shard(i) for i in range(self.nshards)]
        except BaseException:
            self.close()
            raise

    # -- opening --------------------------------------------------------------------------

    def _prepare_directory(self) -> None:
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise StorageError(f"{self.path} is not a directory; kvstore.open() needs a "
                               f"directory (it is created if missing)", self.path)
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as e:
            raise translate(e, self.path, "creating the data directory") from e
        if not os.path.isdir(self.path):
            raise StorageError(f"{self.path} is not a directory", self.path)

    def _lock_directory(self) -> None:
        lock_path = os.path.join(self.path, LOCK_FILE)
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise translate(e, self.path, "opening the lock file") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                who = ("this process" if holder == str(os.getpid())
                       else f"process {holder}")
                raise StorageError(
                    f"{self.path} is already in use by {who} (lock file {lock_path}); "
                    f"close that store first, or use kvstore.connect() to share it",
                    self.path) from None
            raise translate(e, self.path, "locking the data directory") from e
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _open_env(self, map_size: int, sync: bool, nshards: int) -> None:
        data_file = os.path.join(self.path, "data.mdb")
        if os.path.exists(data_file):
            map_size = max(map_size, os.path.getsize(data_file) * 2)
        try:
            self._env = lmdb.open(
                self.path, map_size=map_size, subdir=True, max_dbs=TABLES_PER_SHARD * nshards + 1,
                max_readers=256, sync=sync, metasync=sync, readahead=False, lock=True)
        except (lmdb.Error, OSError) as e:
            raise translate(e, self.path, "opening the LMDB environment") from e
        self.map_size = self._env.info()["map_size"]

    def _load_format(self, shards: int | None) -> int:
        self._format_db = self._open_table(b"kvstore")
        with self._env.begin(db=self._format_db) as txn:
            raw = txn.get(b"format")
        if raw is None:
            nshards = shards or 1
            fmt = {"version": FORMAT_VERSION, "shards": nshards}
            self.write(lambda txn: txn.put(b"format", msgpack.packb(fmt), db=self._format_db))
            return nshards
        try:
            fmt = msgpack.unpackb(raw)
            version, nshards = fmt["version"], fmt["shards"]
        except Exception as e:
            raise StorageError(f"the format record in {self.path} is corrupt ({e})",
                               self.path) from e
        if version != FORMAT_VERSION:
            raise StorageError(
                f"{self.path} has data format {version}; this kvstore reads format "
                f"{FORMAT_VERSION}", self.path)
        if shards is not None and shards != nshards:
            raise InvalidArgument(
                f"{self.path} was created with {nshards} shard(s), not {shards}; "
                f"omit shards= or pass {nshards}")
        return nshards

    def _open_table(self, name: bytes):
        try:
            return self._env.open_db(name)
        except lmdb.MapFullError:
            self._grow()
            return self._open_table(name)
        except (lmdb.Error, OSError) as e:
            raise translate(e, self.path, f"opening table {name.decode()}") from e

    def _open_shard(self, i: int) -> ShardTables:
        return ShardTables(*(self._open_table(f"s{i}.{t}".encode())
                             for t in ("log", "meta", "data", "txn")))

    # -- reading ------------------------------------------------------------------------

    def begin_read(self):
        """A read-only LMDB transaction; pair every call with ``end_read(txn)``."""
        active = self._active_readers
        while True:
            active.append(None)
            if not self._growing:
                break
            active.pop()
            self._grown.wait()
        try:
            txn = self._env.begin()
            if self.committing:
                self.await_durable(txn)
            return txn
        except BaseException as e:
            active.pop()
            if isinstance(e, (lmdb.Error, OSError)):
                raise translate(e, self.path, "starting a read") from e
            raise

    def await_durable(self, txn) -> None:
        """Return once the snapshot ``txn`` reads is on disk.

        LMDB makes a commit visible when it writes the meta page, and with
        ``metasync`` that write is flushed only afterwards: a reader may see a
        commit some 100 us before it is durable. A value read in that window
        and lost to a power cut would be a read of a write that never happened,
        so a reader whose snapshot is the commit in flight waits for it. When
        no commit is in flight (most reads) the caller skips this call.
        """
        if txn.id() < self._committing_id:
            return
        with self._committed:
            while self.committing and txn.id() >= self._committing_id:
                self._committed.wait()

    def end_read(self, txn) -> None:
        try:
            txn.abort()
        finally:
            self._active_readers.pop()

    def read(self, fn: Callable[..., T]) -> T:
        """``fn(txn)`` inside a read transaction."""
        txn = self.begin_read()
        try:
            return fn(txn)
        except lmdb.Error as e:
            raise translate(e, self.path, "reading") from e
        finally:
            self.end_read(txn)

    # -- writing ------------------------------------------------------------------------

    def write(self, fn: Callable[..., T]) -> T:
        """``fn(txn)`` in one write transaction, committed (and fsync'd) before returning.

        ``fn`` may run more than once: a full map aborts the attempt, the map
        is doubled, and ``fn`` runs again on a fresh transaction.
        """
        while True:
            txn = None
            try:
                txn = self._env.begin(write=True)
                result = fn(txn)
                self._commit(txn)
                return result
            except lmdb.MapFullError:
                self._grow(txn)
            except (lmdb.Error, OSError) as e:
                self._abort_write(txn)
                raise translate(e, self.path, "writing") from e
            except BaseException:
                self._abort_write(txn)
                raise

    def _commit(self, txn) -> None:
        """Commit ``txn``, fsync'd; readers of its snapshot wait until it is durable."""
        self._committing_id = txn.id()
        self.committing = True
        try:
            txn.commit()
        finally:
            self._commit_finished()

    def _commit_finished(self) -> None:
        with self._committed:
            self.committing = False
            self._committed.notify_all()

    def _pause_readers(self) -> bool:
        """Hold new reads back and wait for open ones to end; False if they did not in time.

        Pair with ``_resume_readers``.
        """
        self._grown.clear()
        self._growing = True
        deadline = time.monotonic() + GROW_WAIT_SECONDS
        while self._active_readers:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.0002)
        return True

    def _resume_readers(self) -> None:
        self._growing = False
        self._grown.set()

    def _abort_write(self, txn) -> None:
        """Abort a write transaction with this process's readers paused.

        py-lmdb (3.x) aborts a write transaction only at a moment when no other
        thread is inside an LMDB call, so readers that keep reading starve it
        (seconds to minutes with two busy readers). Commits do not wait.
        """
        if txn is None:
            return
        # Holding new reads back is enough: the abort then waits only for the
        # LMDB calls already in flight (open snapshots need not end).
        self._grown.clear()
        self._growing = True
        try:
            txn.abort()
        finally:
            self._resume_readers()

    def _grow(self, txn=None) -> None:
        """Abort ``txn`` (which hit the map's end) and double the map, once no read
        transaction of this process is open."""
        try:
            drained = self._pause_readers()
            if txn is not None:
                txn.abort()
            if not drained:
                raise StorageError(
                    f"cannot grow the map of {self.path}: a read transaction has been "
                    f"open for over {GROW_WAIT_SECONDS:.0f} s", self.path)
            new_size = self.map_size * 2
            try:
                self._env.set_mapsize(new_size)
            except (lmdb.Error, OSError) as e:
                raise translate(e, self.path, "growing the map") from e
            self.map_size = new_size
        finally:
            self._resume_readers()

    # -- meta helpers ---------------------------------------------------------------------

    def meta_int(self, txn, shard: int, name: bytes, default: int = 0) -> int:
        return unpack_u64(txn.get(name, db=self.shards[shard].meta), default)

    def disk_usage(self) -> int:
        try:
            return os.path.getsize(os.path.join(self.path, "data.mdb"))
        except OSError:
            return 0

    # -- closing ------------------------------------------------------------------------

    def close(self) -> None:
        env, self._env = self._env, None
        if env is not None:
            env.close()
        if self._lock_fd >= 0:
            try:
                os.ftruncate(self._lock_fd, 0)
            except OSError:
                pass
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1

    @property
    def env(self):
        return self._env
