"""A new store made inside a directory, all or nothing: staged beside, installed last.

Restoring a backup (``kvstore.backup.restore``) and turning an embedded store into a
node (``kvstore.server.initfrom``) both make a store in a directory that must end
up holding it whole or not at all. So both build it in a staging directory *inside*
the target (on the target's file system even when the target is a mounted volume,
whose root cannot be renamed over), then move ``data.mdb`` into the target as the
last step: a directory holds a store once it holds ``data.mdb`` (``kvstore.storage``),
so a process killed before that leaves none. The target is ``flock``-ed meanwhile
(the lock ``Storage`` takes on a data directory), so two runs, or a store opened on
it, cannot interleave. Any failure (a refusal, a full disk, Ctrl-C) removes what was
made: the staging directory, the ``data.mdb`` if it was moved, and the target if it
was created; a run killed outright leaves only the staging directory.

What the target must hold beforehand, and what is refused, is each caller's.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
from typing import Callable, TypeVar

from kvstore.storage.environment import DATA_FILE, LOCK_FILE, translate

T = TypeVar("T")


def stage_and_install(target: str, staging_name: str, build: Callable[[str], T],
                      what: str) -> T:
    """Make ``target`` (absent or empty: the caller checked) hold the store that
    ``build(staging)`` makes in ``target/staging_name``; what ``build`` returned.

    ``build`` runs with ``target`` locked; it may check ``target`` again there.
    ``what`` names ``target`` in errors ("the node's data directory").
    ``DirectoryBusy`` if another process (or open store) holds ``target``'s lock.
    """
    created = not os.path.lexists(target)
    try:
        os.makedirs(target, exist_ok=True)
    except OSError as e:
        raise translate(e, target, f"creating {what}") from e
    staging = os.path.join(target, staging_name)
    with DirectoryLock(target, what):
        built = False
        try:
            result = build(staging)
            built = True
            _install(staging, target)
            remove_tree(staging, "removing the staging directory")
        except BaseException:
            # data.mdb left the staging directory once built: this run moved it in
            moved = built and not os.path.exists(os.path.join(staging, DATA_FILE))
            _discard(staging, target, created, moved)
            raise
    return result


def _install(staging: str, target: str) -> None:
    """The one step that makes ``target`` hold the store: the finished ``data.mdb``,
    synced, moved into it; then the directory synced."""
    src, dst = os.path.join(staging, DATA_FILE), os.path.join(target, DATA_FILE)
    try:
        fsync_file(src)
        os.rename(src, dst)
        fsync_directory(target)
    except OSError as e:
        raise translate(e, target, "moving the new data file into place") from e


def _discard(staging: str, target: str, created: bool, moved: bool) -> None:
    """After a failure: remove what this run made (best effort: the failure is what the
    caller hears about)."""
    shutil.rmtree(staging, ignore_errors=True)
    if moved:
        try:
            os.unlink(os.path.join(target, DATA_FILE))
        except OSError:
            pass
    if created:
        shutil.rmtree(target, ignore_errors=True)


def remove_tree(path: str, doing: str) -> None:
    """Remove the directory ``path`` if there (a staging directory); ``doing`` names the
    step in an error."""
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise translate(e, path, doing) from e


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- a directory's lock -------------------------------------------------------------------------

class DirectoryBusy(Exception):
    """Another process, or a store open in this one, holds the directory's lock."""

    def __init__(self, holder: str) -> None:
        super().__init__(holder)
        self.holder = holder  # "process 1234", "this process" or "another process"


class DirectoryLock:
    """An exclusive ``flock`` on a directory (the one ``Storage`` takes on a data
    directory) held for a ``with`` block; ``DirectoryBusy`` naming the holder if taken."""

    def __init__(self, path: str, what: str) -> None:
        self.path = path
        self.what = what  # names the directory in errors
        self.fd = -1

    def __enter__(self) -> "DirectoryLock":
        try:
            self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise translate(e, self.path, f"opening {self.what}") from e
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(self.fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise DirectoryBusy(lock_holder(self.path)) from None
            raise translate(e, self.path, f"locking {self.what}") from e
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)


def lock_holder(path: str) -> str:
    """Who holds a directory's lock, as its ``kvstore.lock`` says (best effort)."""
    try:
        with open(os.path.join(path, LOCK_FILE), "rb") as f:
            text = f.read(32).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    if text == str(os.getpid()):
        return "this process"
    return f"process {text}" if text.isdigit() else "another process"


__all__ = ["stage_and_install", "remove_tree", "DirectoryLock", "DirectoryBusy",
           "lock_holder", "fsync_file", "fsync_directory"]
