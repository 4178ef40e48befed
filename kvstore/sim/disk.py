"""An in-memory twin of the write-ahead log's file system (``kvstore.storage.wal.OsFiles``)
that loses, at a power loss, every write not fdatasync'd and may tear the last one.

Used by the log's tests (``tests/test_wal.py``), the embedded store's recovery
tests, and the simulator of real nodes (``kvstore.sim.realnode``), which keeps
each node's log in one of these and its LMDB files on a real (tmpfs) directory:
LMDB is only ever committed synced, so its files as they are at a crash are
what a power loss leaves.
"""

from __future__ import annotations

import errno
import os
import random

SECTOR = 512


class PowerLoss(Exception):
    """Raised by the twin where the machine loses power; the log object is then dead."""


class _File:
    def __init__(self, size: int) -> None:
        self.data = bytearray(size)  # what a read sees (the page cache)
        self.durable = b""  # what survives a power loss
        self.linked = False  # its directory entry survives a power loss


class FaultyFiles:
    """In-memory twin of ``wal.OsFiles``.

    At ``power_loss`` every file goes back to what was last fdatasync'd (a file
    whose directory was never synced vanishes), then the last write not synced
    may be torn: ``prefix`` keeps its first ``keep`` bytes, ``junk`` fills the
    rest with random bytes, ``sectors`` keeps a random subset of its 512-byte
    sectors (a disk that reorders). Unlinks are durable at once.
    """

    def __init__(self, seed: int = 0) -> None:
        self.files: dict[str, _File] = {}
        self.handles: dict[int, _File] = {}
        self.next_handle = 3
        self.last_write: tuple[_File, int, bytes] | None = None
        self.crash_at_sync = False
        #: the power goes at the fdatasync (or directory sync) after this many more
        #: succeed (None: never); the simulator of real nodes arms it for one turn
        self.crash_after_syncs: int | None = None
        self.disk_full = False
        self.fail: dict[str, OSError] = {}
        self.calls: dict[str, int] = {}
        self.rng = random.Random(seed)

    def _call(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        if name in self.fail:
            raise self.fail.pop(name)

    def listdir(self, path):
        self._call("listdir")
        return [os.path.basename(p) for p in self.files if os.path.dirname(p) == path]

    def makedirs(self, path):
        self._call("makedirs")

    def create(self, path, size):
        self._call("create")
        if path in self.files:
            raise FileExistsError(errno.EEXIST, "exists", path)
        if self.disk_full:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        self.files[path] = _File(size)
        return self.open(path)

    def open(self, path):
        self._call("open")
        if path not in self.files:
            raise FileNotFoundError(errno.ENOENT, "no such file", path)
        handle = self.next_handle
        self.next_handle += 1
        self.handles[handle] = self.files[path]
        return handle

    def read_all(self, handle):
        self._call("read_all")
        return bytes(self.handles[handle].data)

    def pwrite(self, handle, data, offset):
        self._call("pwrite")
        f = self.handles[handle]
        data = bytes(data)
        if offset + len(data) > len(f.data):
            f.data.extend(bytes(offset + len(data) - len(f.data)))
        f.data[offset:offset + len(data)] = data
        self.last_write = (f, offset, data)

    def fdatasync(self, handle):
        self._call("fdatasync")
        self._sync_point()
        f = self.handles[handle]
        f.durable = bytes(f.data)
        if self.last_write is not None and self.last_write[0] is f:
            self.last_write = None

    def fsync(self, handle):
        self.fdatasync(handle)

    def close(self, handle):
        self._call("close")
        del self.handles[handle]

    def unlink(self, path):
        self._call("unlink")
        if path not in self.files:
            raise FileNotFoundError(errno.ENOENT, "no such file", path)
        del self.files[path]

    def fsync_dir(self, path):
        self._call("fsync_dir")
        self._sync_point()
        for p, f in self.files.items():
            if os.path.dirname(p) == path:
                f.linked = True

    def _sync_point(self) -> None:
        if self.crash_at_sync:
            raise PowerLoss()
        if self.crash_after_syncs is not None:
            if self.crash_after_syncs <= 0:
                self.crash_after_syncs = None
                raise PowerLoss()
            self.crash_after_syncs -= 1

    def unsynced_write_size(self) -> int:
        return 0 if self.last_write is None else len(self.last_write[2])

    def power_loss(self, keep: int = 0, mode: str = "prefix") -> None:
        torn = self.last_write
        for path, f in list(self.files.items()):
            if not f.linked:
                del self.files[path]
            else:
                f.data = bytearray(f.durable)
        if torn is not None and any(f is torn[0] for f in self.files.values()):
            f, offset, data = torn
            if mode == "prefix":
                survived = data[:keep]
            elif mode == "junk":
                survived = data[:keep] + self.rng.randbytes(len(data) - keep)
            else:  # sectors
                survived = bytearray(f.data[offset:offset + len(data)].ljust(len(data), b"\0"))
                for s in range(0, len(data), SECTOR):
                    if self.rng.random() < 0.5:
                        survived[s:s + SECTOR] = data[s:s + SECTOR]
                survived = bytes(survived)
            if offset + len(survived) > len(f.data):
                f.data.extend(bytes(offset + len(survived) - len(f.data)))
            f.data[offset:offset + len(survived)] = survived
        self.handles.clear()
        self.last_write = None
        self.crash_at_sync = False
        self.crash_after_syncs = None
