"""Backup read points: a part of ``Node`` (``kvstore.node.loop`` mixes it in).

A cluster backup (``kvstore.backup.cluster``, where the cut is argued) fences
every shard, then asks ONE node to open a read point (``OP_BACKUP_OPEN``): the
node takes, between two loop turns (so every shard's state is exactly its
applied state, all published), its overlay's generations and one LMDB read
transaction together (``kvstore.storage.readpoint``), and keeps it only if
every shard's state there holds the backup's fence and no prepared
transaction; otherwise it answers RETRY (the fence has not reached this node's
replica of a shard yet, or prepared transactions are still draining) and the
client asks again. The backup then pages through every shard's data and lease
rows (``OP_BACKUP_PAGE``), bounded in bytes per page and charged to the
client's reply budget like any read, and closes the point
(``OP_BACKUP_CLOSE``). A point idle for ``IDLE_SECONDS`` is closed here (its
client went away), and at most ``SESSIONS_MAX`` are open at once: each pins
LMDB pages while it lives.

These requests are served by the node asked, never forwarded: the point is
this node's.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvstore.commands import FENCE_ID_BYTES
from kvstore.machine.fence import fence_of, prepared_any
from kvstore.machine.leases import LEASE_ROW_RANGES
from kvstore.node.storage import DATA, TXNS, WalReplicaStorage, _View, overlay_index
from kvstore.storage.environment import THIRD_PARTY_ERRORS, translate
from kvstore.storage.readpoint import ReadPoint
from kvstore.transport import wire

#: Read points open at once on a node at most.
SESSIONS_MAX = 2
#: A read point no page was asked of for this long is closed.
IDLE_SECONDS = 30.0
#: The most bytes of rows one page answers (a client may ask for fewer).
PAGE_BYTES_MAX = 4 * 1024 * 1024
#: What each table number of a page request reads: (overlay table, key ranges).
_TABLES = {0: (DATA, ((b"", None),)), 1: (TXNS, LEASE_ROW_RANGES)}


@dataclass
class BackupSession:
    point: ReadPoint
    last_used: float  # monotonic


class Backups:
    """Backup read points, a part of ``Node`` (the module docstring)."""

    def _init_backups(self) -> None:
        self._backup_sessions: dict = {}  # session id -> BackupSession

    def _on_backup(self, identity, request_id: int, op: str, args: list) -> None:
        """One backup request; ``ValueError`` for a malformed one (``_on_request``)."""
        if not isinstance(self.storage, WalReplicaStorage):
            raise ValueError("this node's storage cannot serve a backup")
        if op == wire.OP_BACKUP_OPEN:
            self._backup_open(identity, request_id, args)
        elif op == wire.OP_BACKUP_PAGE:
            self._backup_page(identity, request_id, args)
        else:
            if len(args) != 1 or type(args[0]) is not bytes:
                raise ValueError("backup_close takes [session id]")
            session = self._backup_sessions.pop(args[0], None)
            if session is not None:
                session.point.close()
            self._backup_reply(identity, request_id, op, wire.STATUS_OK, session is not None)

    def _backup_reply(self, identity, request_id: int, op: str, status: int, value) -> None:
        self.stats.count(op, status)
        self._reply(identity, request_id, status, value)

    def _backup_open(self, identity, request_id: int, args: list) -> None:
        if len(args) != 1 or type(args[0]) is not bytes or len(args[0]) != FENCE_ID_BYTES:
            raise ValueError(f"backup_open takes [fence id ({FENCE_ID_BYTES} bytes)]")
        fence_id = args[0]
        op = wire.OP_BACKUP_OPEN
        if len(self._backup_sessions) >= SESSIONS_MAX:
            self._backup_reply(identity, request_id, op, wire.STATUS_RETRY,
                               f"{SESSIONS_MAX} backups are running on this node")
            return
        storage = self.storage
        point = ReadPoint.capture(storage.storage, storage.overlay)
        try:
            waiting = self._backup_not_ready(point, fence_id)
        except BaseException:
            point.close()
            raise
        if waiting is not None:
            point.close()
            self._backup_reply(identity, request_id, op, wire.STATUS_RETRY, waiting)
            return
        session_id = self.rng.randbytes(16)
        self._backup_sessions[session_id] = BackupSession(point, self.clock.monotonic())
        revisions = [point.applied[overlay_index(s, DATA)] + 1 for s in range(self.nshards)]
        self._backup_reply(identity, request_id, op, wire.STATUS_OK, [session_id, revisions])

    def _backup_not_ready(self, point: ReadPoint, fence_id: bytes) -> str | None:
        """Why ``point`` is no cut for fence ``fence_id`` yet, or None: it is one."""
        for shard, tables in enumerate(self.storage.tables):
            view = _View({tables.txns: point.view(overlay_index(shard, TXNS), tables.txns)})
            held = fence_of(view, tables)
            if held is None or held[0] != fence_id:
                return f"shard {shard} of this node does not hold the backup's fence (yet)"
            if prepared_any(view, tables):
                return f"shard {shard} still holds prepared transactions (draining)"
        return None

    def _backup_page(self, identity, request_id: int, args: list) -> None:
        op = wire.OP_BACKUP_PAGE
        if len(args) != 5:
            raise ValueError("backup_page takes [session id, shard, table, after, max_bytes]")
        session_id, shard, table, after, max_bytes = args
        shard = self._shard_arg(shard)
        if type(table) is not int or table not in _TABLES:
            raise ValueError(f"backup_page's table is one of {sorted(_TABLES)}")
        if after is not None and type(after) is not bytes:
            raise ValueError("backup_page's after is a key (bytes) or None")
        if type(max_bytes) is not int or max_bytes < 1:
            raise ValueError("backup_page's max_bytes is an int >= 1")
        session = self._backup_sessions.get(session_id) if type(session_id) is bytes else None
        if session is None:
            raise ValueError("no such backup read point on this node (closed, or idle for "
                             f"over {IDLE_SECONDS:.0f} s): start the backup again")
        client = type(identity) is bytes
        if client and not self.sockets.reply_room(identity):
            self._backup_reply(identity, request_id, op, wire.STATUS_RETRY, "reply budget spent")
            return
        which, ranges = _TABLES[table]
        db = getattr(self.storage.tables[shard], "data" if which == DATA else "txns")
        try:
            rows, done = session.point.page(overlay_index(shard, which), db, after,
                                             min(max_bytes, PAGE_BYTES_MAX), ranges)
        except THIRD_PARTY_ERRORS as e:  # a page LMDB cannot read: this backup ends here
            del self._backup_sessions[session_id]
            session.point.close()
            error = translate(e, self.storage.path, "reading for a backup")
            self._backup_reply(identity, request_id, op, wire.STATUS_ERROR,
                               ["StorageError", str(error)[:500]])
            return
        session.last_used = self.clock.monotonic()
        if client:
            self.sockets.charge(identity, sum(len(k) + len(v) + 8 for k, v in rows))
        self._backup_reply(identity, request_id, op, wire.STATUS_OK,
                           [[[k, v] for k, v in rows], done])

    def _expire_backups(self, now: float) -> None:
        """Close the read points idle for ``IDLE_SECONDS`` (called on the tick step)."""
        for session_id, session in list(self._backup_sessions.items()):
            if now - session.last_used > IDLE_SECONDS:
                del self._backup_sessions[session_id]
                session.point.close()

    def _close_backups(self) -> None:
        sessions, self._backup_sessions = self._backup_sessions, {}
        for session in sessions.values():
            session.point.close()
