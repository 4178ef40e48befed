"""The LMDB environment of one data directory.

Layout (DESIGN.md, "Storage layout"): for each shard ``i`` four named tables,

- ``s{i}.log``   slot (8-byte big-endian) -> checksummed log record
- ``s{i}.meta``  ``applied`` / ``commit`` / ``promise`` -> 8-byte big-endian int
- ``s{i}.data``  key -> 8-byte revision + CRC32C + value (``kvstore.machine.data``)
- ``s{i}.txn``   transaction records (prepared parts, decisions)

and one ``kvstore`` table with the directory's format (version, shard count).
A new directory gets all of them, and the format record, in one commit, so a
directory either holds a whole store or none; an existing store's tables are
only ever opened, never created (a missing one means corruption).

What this layer does so that users never meet LMDB's sharp edges:

- the map is a large sparse one sized up front (``DEFAULT_MAP_SIZE``, a
  reservation of address space, not of disk), so it never has to grow while
  readers are open; growth on ``MapFullError`` remains as a fallback;
- ``data.mdb`` is checked against the size its meta pages claim before it is
  mapped (a truncated file would otherwise kill the process with SIGBUS on
  the first read past its end), and LMDB's lock file is allocated on disk
  before LMDB maps it (a full disk would otherwise SIGBUS on the first
  reader-table write);
- one process owns the directory: a ``flock`` on the directory itself (which
  cannot be unlinked from under the store as a lock file can);
  ``kvstore.lock`` only records the owner's pid for the message a second
  process gets, best effort (a full disk must not stop an open);
- every LMDB, OS, struct or msgpack error is translated at one choke point
  (``translate``) into a ``StorageError`` naming the path.

Long module: 800 lines on purpose. ``Storage`` is one object's life, and its parts
share one protocol: the checks at open decide the map's size, map growth pauses
the readers that ``begin_read``/``end_read`` count and the writer that
``write`` holds, and a fork's child must find all of it closed. Split by topic,
each file would reach into the others' state. (Issue 20 left it whole.)
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Callable, TypeVar

import lmdb
import msgpack

from kvstore.errors import CorruptRecord, InvalidArgument, StorageError
from kvstore.storage.pages import PageError, check_tree
from kvstore.storage.wakeups import Wakeups

#: 2: stored values carry a CRC32C (``kvstore._native.pack_value``).
FORMAT_VERSION = 2
LOCK_FILE = "kvstore.lock"
DATA_FILE = "data.mdb"
LMDB_LOCK_FILE = "lock.mdb"
TABLES_PER_SHARD = 4
MAX_SHARDS = 256
MAX_READERS = 256
#: The map reserved up front: 1 TiB of address space (never of disk: the file
#: grows page by page as LMDB writes it). Sized so the map never grows in
#: practice, as growing it needs every read transaction of the process closed.
DEFAULT_MAP_SIZE = (1 << 40) if sys.maxsize > 2**32 else (1 << 30)
#: The least map reserved when the address space is too small for DEFAULT_MAP_SIZE.
MIN_MAP_SIZE = 64 << 20
#: The largest map_size accepted (64 TiB: half of x86-64's user address space).
MAX_MAP_SIZE = (1 << 46) if sys.maxsize > 2**32 else (1 << 31)
#: ``data.mdb`` is kept at least this far past the last page LMDB uses, as a sparse
#: hole (no disk). A length field flipped on disk makes LMDB or py-lmdb read past a
#: page: up to 64 KiB (key sizes, node offsets), or a value's whole claimed size (py-lmdb
#: touches every page of a value it returns). A read past the end of a mapped file is
#: a SIGBUS that kills the process; inside the hole it reads zeros. The page check at
#: open (``OPEN_CHECK_PAGES``) refuses a store whose nodes claim more than their pages
#: hold, so in a checked store no read leaves the file; the hole covers what is left.
DATA_SLACK_MIN_BYTES = 24 << 20
DATA_SLACK_BYTES = 32 << 20
#: Pages of data.mdb's B-trees checked at open (``pages.check_tree``: all of a store
#: up to 8 MiB; at most ~40 ms for a larger one); ``kvstore check`` checks every page.
OPEN_CHECK_PAGES = 2048
#: How long growing the map may wait for open read snapshots to finish.
GROW_WAIT_SECONDS = 60.0

META_APPLIED = b"applied"
META_COMMIT = b"commit"
META_PROMISE = b"promise"
META_LOG_FIRST = b"log_first"
#: The log position (``kvstore.storage.wal``) a shard's checkpointed state covers.
META_LOG_POSITION = b"log_position"
#: The log position of the checkpoint a clean close made (0: the last one was not).
META_LOG_CLOSED = b"log_closed"

_U64 = struct.Struct(">Q")
T = TypeVar("T")

# LMDB's meta page (lmdb.h / mdb.c, 64-bit): a 16-byte page header, then MDB_meta.
_LMDB_MAGIC = 0xBEEFC0DE
_META_MAGIC = struct.Struct("<II")        # mm_magic, mm_version at 16
_META_PAGE_SIZE = struct.Struct("<I")     # mm_dbs[FREE_DBI].md_pad holds the page size, at 40
_META_LAST_TXN = struct.Struct("<QQ")     # mm_last_pg, mm_txnid at 136
_META_MIN_BYTES = 152
# LMDB's lock file: a 192-byte header plus one 64-byte slot per reader after the first.
_LMDB_LOCK_BYTES = 192 + 64 * (MAX_READERS - 1)

#: Errors of the libraries under us; each is translated by ``translate``.
THIRD_PARTY_ERRORS = (lmdb.Error, OSError, struct.error, msgpack.UnpackException,
                      msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, MemoryError)


def pack_u64(value: int) -> bytes:
    return _U64.pack(value)


def unpack_u64(raw: bytes | None, default: int = 0) -> int:
    if raw is None:
        return default
    if len(raw) != 8:
        raise CorruptRecord(f"a meta value of {len(raw)} bytes where 8 were expected")
    return _U64.unpack(raw)[0]


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


_CORRUPT_HINT = "restore it from a replica or a backup"


def translate(e: BaseException, path: str, doing: str) -> StorageError:
    """The one place where LMDB, OS, struct and msgpack errors become ``StorageError``.

    A ``KVError`` passes through (a ``CorruptRecord`` from a checksum gains the
    path if it has none).
    """
    if isinstance(e, CorruptRecord):
        if e.path is not None:
            return e
        err: StorageError = CorruptRecord(f"{e} in {path} while {doing}; {_CORRUPT_HINT}",
                                          slot=e.slot, offset=e.offset, path=path)
        err.__cause__ = e
        return err
    if isinstance(e, StorageError):
        return e
    code = getattr(e, "errno", None) or getattr(e, "code", None)
    text = str(e).lower()
    if (code == errno.ENOSPC or code == errno.EDQUOT or "no space left" in text
            or ((code == errno.EIO or "input/output error" in text) and _filesystem_full(path))):
        msg = f"disk full while {doing} in {path}: free some space and retry"
    elif code in (errno.EROFS, errno.EACCES, errno.EPERM) or isinstance(e, lmdb.ReadonlyError):
        msg = f"cannot write {path} while {doing}: the directory is read-only or not permitted"
    elif isinstance(e, (lmdb.CorruptedError, lmdb.InvalidError, lmdb.PageNotFoundError,
                        lmdb.BadChecksumError, lmdb.PanicError, lmdb.BadTxnError,
                        lmdb.BadValsizeError, lmdb.BadDbiError, lmdb.NotFoundError,
                        lmdb.IncompatibleError, struct.error, msgpack.UnpackException,
                        msgpack.ExtraData, msgpack.FormatError, msgpack.StackError)):
        msg = (f"the data in {path} is corrupt or not a kvstore directory "
               f"({type(e).__name__}: {e}) while {doing}; {_CORRUPT_HINT}")
    elif isinstance(e, lmdb.VersionMismatchError):
        msg = f"{path} was written by an incompatible LMDB version ({e})"
    elif isinstance(e, lmdb.ReadersFullError):
        msg = f"too many concurrent readers on {path} ({e})"
    elif isinstance(e, MemoryError):
        msg = (f"out of memory while {doing} in {path}: a length corrupt on disk can claim "
               f"up to 4 GiB; run kvstore check")
    elif isinstance(e, lmdb.MapFullError):
        msg = f"the map of {path} is full while {doing}; reopen it with a larger map_size"
    else:
        msg = f"storage error while {doing} in {path}: {type(e).__name__}: {e}"
    err = StorageError(msg, path)
    err.__cause__ = e
    return err


def check_path(path: object) -> str:
    """``path`` (str, bytes or os.PathLike) as an absolute str, or ``InvalidArgument``."""
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise InvalidArgument(f"path must be a str, bytes or os.PathLike, not "
                              f"{type(path).__name__}")
    try:
        text = os.fsdecode(os.fspath(path))
    except (TypeError, ValueError, UnicodeError) as e:
        raise InvalidArgument(f"path {path!r} is not usable: {e}") from None
    if not isinstance(text, str):
        raise InvalidArgument(f"path must be a str, bytes or os.PathLike, not "
                              f"{type(text).__name__}")
    if text == "":
        raise InvalidArgument("path must not be empty (use '.' for the current directory)")
    if "\0" in text:
        raise InvalidArgument(f"path {text!r} contains a NUL byte")
    return os.path.abspath(text)


def check_map_size(map_size: object) -> int | None:
    if map_size is None:
        return None
    if isinstance(map_size, bool) or not isinstance(map_size, int):
        raise InvalidArgument(f"map_size must be an int (bytes) or None, not "
                              f"{type(map_size).__name__}")
    if not 0 < map_size <= MAX_MAP_SIZE:
        raise InvalidArgument(f"map_size must be in 1..{MAX_MAP_SIZE} bytes, got {map_size}")
    return map_size


class Storage:
    """One data directory: lock, LMDB environment, per-shard tables.

    Thread-safe for readers; writes must be serialised by the caller (the
    group committer does this: LMDB allows one write transaction at a time).
    Read transactions go through ``begin_read``/``end_read`` so that the map
    can be grown safely: LMDB remaps on growth, which is only safe when this
    process holds no read transaction.

    ``create=False`` refuses a directory that holds no store (read-only
    commands must not create one at a mistyped path).
    """

    def __init__(self, path: str, shards: int | None = None, map_size: int | None = None,
                 sync: bool = True, create: bool = True) -> None:
        if shards is not None and (isinstance(shards, bool) or not isinstance(shards, int)
                                   or not 1 <= shards <= MAX_SHARDS):
            raise InvalidArgument(f"shards must be an int in 1..{MAX_SHARDS}, got {shards!r}")
        self.path = check_path(path)
        map_size = max(check_map_size(map_size) or 0, DEFAULT_MAP_SIZE)
        self.pid = os.getpid()
        self.forked = False  # set in a child process after fork() (see _after_fork_in_child)
        self._dir_fd = -1
        self._env = None
        self._data_end = 0  # data.mdb is at least this long (see DATA_SLACK_BYTES)
        self._page_size = 4096
        self._active_readers: list[None] = []
        self._growing = False
        self._grown = Wakeups()  # readers held back while _growing (not an Event: see wakeups)
        # Held by every write transaction and by close(): the environment is
        # never closed under a commit in flight.
        self._write_lock = threading.Lock()
        # Set while a write transaction commits (see _commit): readers that see
        # its snapshot wait for the commit, and so for its fsync, to finish.
        self.committing = False
        self._committing_id = 0
        self._committed = Wakeups()  # readers waiting for the commit in flight
        self._prepare_directory(create)
        self._lock_directory()
        created_data_file = False
        try:
            existing = self._check_data_file(create)
            created_data_file = not os.path.exists(os.path.join(self.path, DATA_FILE))
            self._prepare_lmdb_lock_file()
            if existing:
                self._ensure_slack(existing)
            self._open_env(map_size, sync, shards or 1)
            if existing:
                self.nshards = self._load_format(shards)
                if self.nshards > (shards or 1):
                    # LMDB's begin() costs grow with max_dbs, so the environment is
                    # opened for exactly the tables it has: reopen for more shards.
                    self._env.close()
                    self._open_env(map_size, sync, self.nshards)
                    self._format_db = self._open_table(b"kvstore")
                self.shards = [self._open_shard(i) for i in range(self.nshards)]
            else:
                self.nshards = shards or 1
                self._create_store()
            self._after_commit()
        except BaseException:
            self._close_files()
            if created_data_file:  # a store we failed to create leaves nothing behind
                for name in (DATA_FILE, LMDB_LOCK_FILE):
                    try:
                        os.unlink(os.path.join(self.path, name))
                    except OSError:
                        pass
            raise
        _open_storages.add(self)

    # -- opening --------------------------------------------------------------------------

    def _prepare_directory(self, create: bool) -> None:
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise StorageError(f"{self.path} is not a directory; kvstore.open() needs a "
                               f"directory (it is created if missing)", self.path)
        if not create:
            if not os.path.isdir(self.path):
                raise StorageError(f"no kvstore at {self.path}: the directory does not exist "
                                   f"(is the path right?)", self.path)
            if not os.path.lexists(os.path.join(self.path, DATA_FILE)):  # leave it untouched
                raise StorageError(f"no kvstore in {self.path} (no {DATA_FILE}; is the path "
                                   f"right?)", self.path)
            return
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as e:
            raise translate(e, self.path, "creating the data directory") from e
        if not os.path.isdir(self.path):
            raise StorageError(f"{self.path} is not a directory", self.path)

    def _lock_directory(self) -> None:
        """Take the directory's flock (one process per store); record our pid, best effort."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise translate(e, self.path, "opening the data directory") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                holder = self._lock_holder()
                who = ("this process" if holder == str(os.getpid())
                       else f"process {holder}" if holder else "another process")
                raise StorageError(
                    f"{self.path} is already in use by {who}; close that store first, or "
                    f"use kvstore.connect() to share it", self.path) from None
            raise translate(e, self.path, "locking the data directory") from e
        self._dir_fd = fd
        # A store dropped without close() releases the directory when collected.
        self._dir_fd_finalizer = weakref.finalize(self, os.close, fd)
        self._write_lock_file(f"{os.getpid()}\n".encode())

    def _lock_holder(self) -> str:
        try:
            with open(os.path.join(self.path, LOCK_FILE), "rb") as f:
                text = f.read(32).decode("ascii", "replace").strip()
        except OSError:
            return ""
        return text if text.isdigit() else ""

    def _write_lock_file(self, content: bytes) -> None:
        """``kvstore.lock`` says who holds the directory; only a message depends on it, so
        a full or read-only disk does not stop an open."""
        try:
            fd = os.open(os.path.join(self.path, LOCK_FILE), os.O_WRONLY | os.O_CREAT, 0o644)
        except OSError:
            return
        try:
            os.ftruncate(fd, 0)
            if content:
                os.pwrite(fd, content, 0)
        except OSError:
            pass
        finally:
            os.close(fd)

    def _open_regular_file(self, name: str, flags: int) -> tuple[int, int]:
        """``(fd, size)`` of the directory's file ``name``, opened with ``flags``; a
        ``StorageError`` if it is not a regular file.

        LMDB maps both of its files: a FIFO, a device or a directory planted under
        their names must be refused before that. ``O_NONBLOCK`` keeps a FIFO from
        hanging the open itself. ``OSError`` is the caller's to translate (a missing
        ``data.mdb`` means "no store yet"); the descriptor is closed on any failure.
        """
        path = os.path.join(self.path, name)
        fd = os.open(path, flags | os.O_CLOEXEC | os.O_NONBLOCK, 0o644)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise StorageError(f"{path} is not a regular file", self.path)
        except BaseException:
            os.close(fd)
            raise
        return fd, st.st_size

    def _check_data_file(self, create: bool) -> int:
        """The bytes of data.mdb in use (0: the directory holds no store yet); refuses a
        truncated or unreadable one.

        LMDB maps the file and reads pages by address: a page past the end of a
        truncated file is a SIGBUS, so the size the meta pages claim is checked
        here, before LMDB maps anything.
        """
        data_path = os.path.join(self.path, DATA_FILE)
        try:
            fd, size = self._open_regular_file(DATA_FILE, os.O_RDONLY)
        except FileNotFoundError:
            if not create:
                raise StorageError(f"no kvstore in {self.path} (no {DATA_FILE}; is the path "
                                   f"right?)", self.path) from None
            return 0
        except OSError as e:
            raise translate(e, self.path, f"opening {DATA_FILE}") from e
        try:
            head = os.pread(fd, 2 * 65536, 0)
        except OSError as e:
            raise translate(e, self.path, f"reading {DATA_FILE}") from e
        finally:
            os.close(fd)
        where = f"{data_path} ({size} bytes)"
        if size == 0:
            raise StorageError(
                f"{where} is empty: the store was truncated, or its creation was cut "
                f"short; if it held nothing, delete the directory and open it again", self.path)
        metas = []
        page_size = None
        for i in range(2):
            off = 0 if i == 0 else page_size
            if len(head) < off + _META_MIN_BYTES:
                raise StorageError(f"{where} is truncated: its second meta page is missing; "
                                   f"{_CORRUPT_HINT}", self.path)
            magic, _version = _META_MAGIC.unpack_from(head, off + 16)
            if magic != _LMDB_MAGIC:
                raise StorageError(f"{where} is not an LMDB data file or its meta page {i} is "
                                   f"corrupt; {_CORRUPT_HINT}", self.path)
            if i == 0:
                (page_size,) = _META_PAGE_SIZE.unpack_from(head, 40)
                if page_size < 512 or page_size > 65536 or page_size & (page_size - 1):
                    raise StorageError(f"{where} has a corrupt meta page (page size "
                                       f"{page_size}); {_CORRUPT_HINT}", self.path)
            metas.append(_META_LAST_TXN.unpack_from(head, off + 136))
        (last0, txn0), (last1, txn1) = metas
        # LMDB writes meta page (txn id & 1) at each commit, so the two hold consecutive
        # ids and the newer one's last page is not below the older one's. A flipped byte
        # in an id would make LMDB take the older meta: a silent rollback of commits.
        if (txn0 or txn1) and not (txn0 % 2 == 0 and txn1 % 2 == 1 and abs(txn0 - txn1) == 1
                                   and (last0 >= last1 if txn0 > txn1 else last1 >= last0)):
            raise StorageError(
                f"{where} has meta pages that disagree (transaction ids {txn0} and {txn1}, "
                f"last pages {last0} and {last1}); {_CORRUPT_HINT}", self.path)
        last_page, txn_id = max(metas, key=lambda m: m[1])
        if txn_id == 0:  # LMDB wrote its empty meta pages, nothing was ever committed
            if not create:
                raise StorageError(f"no kvstore in {self.path} (its {DATA_FILE} is empty)",
                                   self.path)
            return 0
        needed = (last_page + 1) * page_size
        if size < needed:
            raise StorageError(
                f"{where} is truncated: its meta page says it holds {needed} bytes; "
                f"{_CORRUPT_HINT}", self.path)
        self._page_size = page_size
        self._check_pages(head[:2 * page_size], OPEN_CHECK_PAGES)
        return needed

    def _check_pages(self, head: bytes, max_pages: int | None) -> int:
        """``pages.check_tree`` on data.mdb; a corrupt page is a ``StorageError``."""
        data_path = os.path.join(self.path, DATA_FILE)
        size = self._page_size
        try:
            return check_tree(data_path, size, [head[:size], head[size:2 * size]], max_pages)
        except PageError as e:
            raise StorageError(f"{data_path} is corrupt: {e}; {_CORRUPT_HINT}",
                               self.path) from None
        except OSError as e:
            raise translate(e, self.path, f"checking {DATA_FILE}") from e

    def check_pages(self) -> int:
        """Check every page of data.mdb's B-trees (``kvstore check``); pages checked."""
        with self._write_lock:  # no commit moves the meta pages meanwhile
            self.check_usable()
            try:
                with open(os.path.join(self.path, DATA_FILE), "rb") as f:
                    head = f.read(2 * self._page_size)
            except OSError as e:
                raise translate(e, self.path, f"reading {DATA_FILE}") from e
            return self._check_pages(head, None)

    def _ensure_slack(self, used_bytes: int) -> None:
        """Extend data.mdb (sparse) to DATA_SLACK_BYTES past ``used_bytes``; best effort."""
        want = used_bytes + DATA_SLACK_BYTES
        data_path = os.path.join(self.path, DATA_FILE)
        try:
            if os.path.getsize(data_path) < want:
                os.truncate(data_path, want)
            self._data_end = want
        except OSError:
            pass  # a read-only directory: reads past the end stay LMDB's own risk

    def _after_commit(self) -> None:
        """Keep the slack after data.mdb's last page (a commit may have used it up)."""
        try:
            info = self._env.info()
        except THIRD_PARTY_ERRORS:
            return  # best effort, as the slack itself
        used = (info["last_pgno"] + 1) * self._page_size
        if used + DATA_SLACK_MIN_BYTES > self._data_end:
            self._ensure_slack(used)

    def _prepare_lmdb_lock_file(self) -> None:
        """Allocate LMDB's lock file on disk before LMDB maps it.

        LMDB sizes it with ftruncate, which on a full disk (tmpfs) succeeds
        sparse; its first write through the map is then a SIGBUS.
        """
        try:
            fd, size = self._open_regular_file(LMDB_LOCK_FILE, os.O_RDWR | os.O_CREAT)
        except OSError as e:
            raise translate(e, self.path, f"opening {LMDB_LOCK_FILE}") from e
        try:
            os.posix_fallocate(fd, 0, max(size, _LMDB_LOCK_BYTES))
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise translate(e, self.path, f"allocating {LMDB_LOCK_FILE}") from e
        finally:
            os.close(fd)

    def _open_env(self, map_size: int, sync: bool, nshards: int) -> None:
        try:
            while True:
                try:
                    self._env = lmdb.open(
                        self.path, map_size=map_size, subdir=True,
                        max_dbs=TABLES_PER_SHARD * nshards + 1, max_readers=MAX_READERS,
                        sync=sync, metasync=sync, readahead=False, lock=True)
                    break
                except lmdb.MemoryError:
                    # The address space is limited (ulimit -v): reserve less, and let the
                    # map grow on demand (growing waits for open readers) past it.
                    if map_size <= MIN_MAP_SIZE:
                        raise
                    map_size = max(map_size // 4, MIN_MAP_SIZE)
            self.map_size = self._env.info()["map_size"]
            self._page_size = self._env.stat()["psize"]
        except THIRD_PARTY_ERRORS as e:
            raise translate(e, self.path, "opening the LMDB environment") from e

    def _create_store(self) -> None:
        """Every table and the format record of a new store, in one commit."""
        fmt = msgpack.packb({"version": FORMAT_VERSION, "shards": self.nshards})
        env = self._env
        names = [b"kvstore"] + [f"s{i}.{t}".encode() for i in range(self.nshards)
                                for t in ("log", "meta", "data", "txn")]

        def create(txn):
            handles = [env.open_db(name, txn=txn, create=True) for name in names]
            txn.put(b"format", fmt, db=handles[0])
            return handles

        with self._write_lock:
            handles = self._write_locked(create, "creating the store")
        self._format_db = handles[0]
        self.shards = [ShardTables(*handles[1 + 4 * i:5 + 4 * i]) for i in range(self.nshards)]

    def _load_format(self, shards: int | None) -> int:
        self._format_db = self._open_table(b"kvstore")
        try:
            with self._env.begin(db=self._format_db, buffers=True) as txn:
                raw = txn.get(b"format")
                if raw is not None:
                    if len(raw) > 1024:  # a flipped length: do not read past the file
                        raise StorageError(f"the format record in {self.path} is corrupt "
                                           f"({len(raw)} bytes); {_CORRUPT_HINT}", self.path)
                    raw = bytes(raw)
        except THIRD_PARTY_ERRORS as e:
            raise translate(e, self.path, "reading the format record") from e
        if raw is None:
            raise StorageError(f"the format record of {self.path} is missing: the store is "
                               f"corrupt; {_CORRUPT_HINT}", self.path)
        try:
            fmt = msgpack.unpackb(raw)
            version, nshards = fmt["version"], fmt["shards"]
        except Exception as e:
            raise StorageError(f"the format record in {self.path} is corrupt ({e}); "
                               f"{_CORRUPT_HINT}", self.path) from e
        if version != FORMAT_VERSION:
            raise StorageError(
                f"{self.path} has data format {version!r}; this kvstore reads format "
                f"{FORMAT_VERSION}", self.path)
        if isinstance(nshards, bool) or not isinstance(nshards, int) \
                or not 1 <= nshards <= MAX_SHARDS:
            raise StorageError(f"the format record in {self.path} is corrupt (shards "
                               f"{nshards!r}); {_CORRUPT_HINT}", self.path)
        if shards is not None and shards != nshards:
            raise InvalidArgument(
                f"{self.path} was created with {nshards} shard(s), not {shards}; "
                f"omit shards= or pass {nshards}")
        return nshards

    def _open_table(self, name: bytes):
        """An existing table; a missing one means the store is corrupt (never created here)."""
        try:
            return self._env.open_db(name, create=False)
        except lmdb.NotFoundError:
            raise StorageError(
                f"{self.path} has no table {name.decode()}: the store is corrupt; "
                f"{_CORRUPT_HINT}", self.path) from None
        except THIRD_PARTY_ERRORS as e:
            raise translate(e, self.path, f"opening table {name.decode()}") from e

    def _open_shard(self, i: int) -> ShardTables:
        return ShardTables(*(self._open_table(f"s{i}.{t}".encode())
                             for t in ("log", "meta", "data", "txn")))

    def check_usable(self) -> None:
        """``StorageError`` if this store is closed or was inherited through fork()."""
        if self.forked:
            raise StorageError(
                f"the store at {self.path} was opened by process {self.pid}; this process "
                f"({os.getpid()}) inherited it through fork() and cannot use it: open it "
                f"again in this process once the parent has closed it", self.path)
        if self._env is None:
            raise StorageError(f"the store at {self.path} is closed", self.path)

    # -- reading ------------------------------------------------------------------------

    def begin_read(self, buffers: bool = False, durable: bool = True):
        """A read-only LMDB transaction; pair every call with ``end_read(txn)``.

        ``buffers=True``: its reads return buffers into the map, valid until the
        transaction ends, whose length can be checked before any byte is read.
        ``durable=False``: do not wait for a commit in flight to be on disk
        (``await_durable``): for a reader of a store whose every LMDB commit is
        a checkpoint of writes already durable in its log (the embedded store's
        group commit), a snapshot is durable as soon as LMDB shows it.
        """
        if self._env is None or self.forked:
            self.check_usable()
        active = self._active_readers
        while True:
            active.append(None)
            if not self._growing:
                break
            active.pop()
            self._grown.wait_for(lambda: not self._growing)
        try:
            txn = self._env.begin(buffers=buffers)
            if self.committing and durable:
                self.await_durable(txn)
            return txn
        except BaseException as e:
            active.pop()
            if isinstance(e, THIRD_PARTY_ERRORS):
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
        txn_id = txn.id()
        self._committed.wait_for(
            lambda: not self.committing or txn_id < self._committing_id)

    def end_read(self, txn) -> None:
        try:
            txn.abort()
        except THIRD_PARTY_ERRORS:
            pass  # ending a snapshot cannot lose anything; the environment may be closed
        finally:
            self._active_readers.pop()

    def read(self, fn: Callable[..., T], doing: str = "reading", buffers: bool = False) -> T:
        """``fn(txn)`` inside a read transaction; every error of the layers below translated."""
        return self.run_read(self.begin_read(buffers), fn, doing)

    def run_read(self, txn, fn: Callable[..., T], doing: str = "reading") -> T:
        """``fn(txn)`` for a ``txn`` from ``begin_read``, which it ends; errors translated.

        For a caller that must begin the transaction itself (under a lock of
        its own, as the embedded store's overlay snapshot does).
        """
        try:
            return fn(txn)
        except (CorruptRecord, *THIRD_PARTY_ERRORS) as e:  # any other error passes as it is
            raise translate(e, self.path, doing) from e
        finally:
            self.end_read(txn)

    # -- writing ------------------------------------------------------------------------

    def write(self, fn: Callable[..., T], buffers: bool = False) -> T:
        """``fn(txn)`` in one write transaction, committed (and fsync'd) before returning.

        ``fn`` may run more than once: a full map aborts the attempt, the map
        is doubled, and ``fn`` runs again on a fresh transaction.
        """
        with self._write_lock:
            self.check_usable()
            return self._write_locked(fn, "writing", buffers)

    def _write_locked(self, fn: Callable[..., T], doing: str, buffers: bool = False) -> T:
        while True:
            txn = None
            try:
                txn = self._env.begin(write=True, buffers=buffers)
                result = fn(txn)
                self._commit(txn)
                return result
            except lmdb.MapFullError:
                self._grow(txn)
            except BaseException as e:
                self._abort_write(txn)
                if isinstance(e, (CorruptRecord, *THIRD_PARTY_ERRORS)):  # as run_read does
                    raise translate(e, self.path, doing) from e
                raise

    def _commit(self, txn) -> None:
        """Commit ``txn``, fsync'd; readers of its snapshot wait until it is durable."""
        self._committing_id = txn.id()
        self.committing = True
        try:
            txn.commit()
        finally:
            self.committing = False  # first, and no call: no interrupt leaves it set
            self._commit_finished()
        self._after_commit()

    def _commit_finished(self) -> None:
        """Wake the readers waiting for the commit (they also look on their own)."""
        with self._committed.lock:
            self._committed.notify_all()

    def _pause_readers(self) -> bool:
        """Hold new reads back and wait for open ones to end; False if they did not in time.

        Pair with ``_resume_readers``.
        """
        self._growing = True
        deadline = time.monotonic() + GROW_WAIT_SECONDS
        while self._active_readers:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.0002)
        return True

    def _resume_readers(self) -> None:
        self._growing = False
        with self._grown.lock:
            self._grown.notify_all()

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
        self._growing = True
        try:
            txn.abort()
        except THIRD_PARTY_ERRORS:
            pass  # the transaction is gone either way
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
        """Bytes data.mdb takes on disk (its slack is a hole, not counted)."""
        try:
            st = os.stat(os.path.join(self.path, DATA_FILE))
        except OSError:
            return 0
        return min(st.st_size, st.st_blocks * 512)

    # -- closing ------------------------------------------------------------------------

    def close(self) -> None:
        """Close the environment (after any commit in flight) and release the directory."""
        if self.forked:
            # A child of fork(): the environment and the lock belong to the parent. Closing
            # LMDB here would touch the parent's lock table; only drop our references.
            self._env = None
            self._close_dir_fd()
            return
        with self._write_lock:
            self._close_files()

    def _close_files(self) -> None:
        env, self._env = self._env, None
        if env is not None:
            env.close()
        if self._dir_fd >= 0:
            self._write_lock_file(b"")
            self._close_dir_fd()

    def _close_dir_fd(self) -> None:
        """Close the directory's fd: releases the flock (after fork(), our copy)."""
        if self._dir_fd >= 0:
            self._dir_fd_finalizer.detach()  # closed here, not at collection
            fd, self._dir_fd = self._dir_fd, -1
            os.close(fd)  # no call since taking it: an interrupt cannot leave it open

    @property
    def env(self):
        return self._env


#: Every open ``Storage`` of this process, so a child of fork() can mark them unusable.
_open_storages: "weakref.WeakSet[Storage]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for storage in list(_open_storages):
        storage.forked = True


os.register_at_fork(after_in_child=_after_fork_in_child)
