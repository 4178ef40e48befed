"""``kvstore-server --init-from DIR --config cluster.toml --id n1 [--data NEW]``: an embedded
store's directory (``kvstore.open(DIR)``) becomes node n1's data directory, the first and
only member of a new cluster; the others join later as learners (``kvstore member add``).
It makes the directory and exits; ``kvstore-server`` without ``--init-from`` then runs it.

Why it can: an embedded store and a node keep the same directory (``kvstore.storage``:
per shard LMDB tables ``log``, ``meta``, ``data``, ``txn``, and the write-ahead log in
``wal/``) and apply the same state machine (``kvstore.machine``): a key's stored value
(revision, checksum, value) and the leases (``txn`` table) mean the same in both, and a
key lands in the same shard (``kvstore.sharding.shard_of``; a one-shard store puts
everything in shard 0, as jump hashing does). What differs is the meta table and the log:
the store keeps its applied slot (``META_APPLIED``) and bare commands in its log; a node
keeps its Paxos hard state (``META_PAXOS``: promise, commit, applied, compacted) and
client-session commands in its log. So the conversion is: the store's state exactly as
it is, the store's log left behind (every entry of it is in the state first), and a hard
state that says "everything up to here is applied and compacted".

Decisions, and why:

- **A copy, not a conversion in place.** LMDB copies the store's environment itself
  (``Environment.copy`` with compaction: a consistent snapshot, free pages dropped, at
  disk speed; no data passes through a client) into the new directory, and only the copy
  is rewritten. The embedded directory is never changed beyond what its own recovery
  does, so a failed or regretted conversion leaves the user's store as it was (and a
  fallback while the cluster is new); in place, a crash between rewriting the meta tables
  and the log would leave the only copy of the data as neither. The price is the disk
  space and the time of one sequential copy (a figure is in docs/operations.md).
- **The store must be closed.** It is locked with a ``flock`` on its directory by the
  process that has it open (``kvstore.storage.environment``); if another process holds
  it, the conversion is refused, naming that process: a copy of a store that is being
  written would miss the writes that follow. While copying, this process holds that
  lock itself, so no one opens the store meanwhile.
- **A store not closed cleanly is recovered first**, by the store's own open and close
  (``kvstore.embedded``): the replay of its log into the state, then a checkpoint that
  leaves LMDB holding every write the log held (a clean close records that:
  ``META_LOG_CLOSED``). The copy is taken only once LMDB says so, under the lock;
  otherwise refused. One recovery code, not a second one here.
- **The target must be empty** (or absent): a non-empty one is refused, listing what is
  in it, since it may be another node's state.
- **Stage, then one rename.** Everything is built in ``NEW/.init-from/`` (inside the
  target, so on its file system even when the target is a mounted volume, where a
  rename of the directory itself would fail), synced, and the last step renames the
  finished ``data.mdb`` into ``NEW``. A process killed at any point before leaves no
  ``NEW/data.mdb``: ``kvstore-server`` finds no node there (it would start an empty one,
  as on any empty directory), and a later ``--init-from`` removes the leftover and starts
  over. The target directory is ``flock``-ed for the whole run, so two runs, or a node
  starting on it, cannot interleave. A refusal leaves nothing behind (a target directory
  this run created is removed). (``kvstore.storage.staging``: a backup's restore makes
  its store the same way.)
- **A one-member cluster only.** ``cluster.toml`` must list n1 alone; the others join
  with ``kvstore member add NAME --address A`` once n1 runs, as learners that receive a
  snapshot. Starting three nodes of which two have empty disks would be unsafe: a node
  with no Paxos state is either new or one that lost its disk (``kvstore.paxos.replica``,
  "Wiped nodes"), and two empty nodes out of three are a majority that holds no state,
  which that rule takes for a new cluster: they would elect a leader that knows nothing
  of n1's data.
- **The shard count is the store's**: a ``cluster.toml`` whose ``shards`` differs is
  refused naming both numbers (keys would land in other shards than their data).

The node's first state, per shard, with ``A`` the store's applied slot: hard state
``[promise 0, commit A-1, applied A-1, compacted A-1]``, an empty log table, log
position 0 (a new, empty ``wal/``). Why those numbers:

- **Revisions continue.** The store writes slot ``s`` at revision ``s`` (its slots start
  at 1); a node writes slot ``s`` at revision ``s + 1`` (its slots start at 0). So the
  store's slot ``A`` is the node's slot ``A - 1``, and the node's next write gets a
  revision above every revision in the store, as leases' refresh points and anonymous
  lease ids (derived from revisions) need. An empty shard (``A = 0``) is exactly a new
  node's shard (``NO_HARD_STATE``).
- **Nothing applied twice, nothing lost.** Compacted through the applied point, with no
  log records: the replica starts from the state as a snapshot at ``A - 1``
  (``WalReplicaStorage.load``), applies nothing at or below it, and serves that snapshot
  to a learner that joins later. ``check_recovered`` accepts it (no slot between the
  compaction and the commit point is missing).
- **Promise 0** is a new node's promise. A replica with promise 0 among several voters
  recovers as a wiped node before it votes; the only voter of its cluster (``Replica``:
  recovery needs more than one voter) votes at once, elects itself, and fills its first
  slot with a no-op of its ballot: a new cluster, whose state starts at a snapshot. The
  directory holds no membership: the node bootstraps it from ``cluster.toml`` (n1 alone).
- **Leases and TTLs** are rows of the ``txn`` table, copied with it; the node starts
  each lease's clock with a full ttl at its start, as the store does at each open.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import msgpack

from kvstore.errors import InvalidArgument, KVError
from kvstore.machine.replica import META_PAXOS, HardState
from kvstore.storage import Storage
from kvstore.storage.environment import (META_APPLIED, META_COMMIT, META_LOG_CLOSED,
                                         META_LOG_FIRST, META_LOG_POSITION, check_path,
                                         pack_u64, translate)
from kvstore.storage.staging import (DirectoryBusy, DirectoryLock, remove_tree,
                                     stage_and_install)
from kvstore.storage.wal import WAL_DIR, WriteAheadLog

#: Where the new directory is built, inside the target (``NEW/.init-from/``).
STAGING_DIR = ".init-from"
#: The store's meta entries a node does not read (its checkpoints write its own).
_EMBEDDED_META = (META_APPLIED, META_COMMIT, META_LOG_CLOSED, META_LOG_FIRST)


@dataclass(frozen=True)
class InitResult:
    """What ``init_from`` made: the node's directory and what it holds."""

    data_dir: str
    shards: int
    keys: int
    bytes: int
    seconds: float


def init_from(source: str, config) -> InitResult:
    """Make node ``config.name``'s data directory ``config.data_dir`` from the embedded
    store at ``source`` (module docstring). ``InvalidArgument`` for a refusal (nothing
    is left behind), ``StorageError`` if a disk refuses."""
    started = time.monotonic()
    _check_one_member(config)
    source = check_path(source)
    target = config.data_dir
    _check_distinct(source, target)
    _check_target_empty(target)
    _check_not_in_use(source)
    _check_is_store(source, config.shards)

    def build(staging: str) -> tuple[int, int]:
        _check_target_empty(target)  # again, now that no one else can fill it
        remove_tree(staging, "removing a partial --init-from directory")  # a killed run's
        _recover_store(source)
        return _stage(source, staging, config.shards)

    try:
        keys, size = stage_and_install(target, STAGING_DIR, build, "the node's data directory")
    except DirectoryBusy as e:
        raise InvalidArgument(f"the node's data directory {target} is in use by {e.holder} "
                              f"(a node, or another --init-from)") from None
    return InitResult(target, config.shards, keys, size, time.monotonic() - started)


# -- the checks (each a refusal that changes nothing) ------------------------------------------

def _check_one_member(config) -> None:
    if len(config.names) == 1:
        return
    others = [n for n in config.names if n != config.name]
    raise InvalidArgument(
        f"--init-from makes a one-member cluster, but the config lists {len(config.names)} "
        f"nodes ({', '.join(config.names)}): list only {config.name}, start it, then add "
        f"{', '.join(others)} one at a time with `kvstore member add NAME --address A` (they "
        f"join as learners and receive {config.name}'s data); nodes started with empty disks "
        f"beside it would elect a leader that knows nothing of it")


def _check_distinct(source: str, target: str) -> None:
    src, dst = os.path.realpath(source), os.path.realpath(target)
    if dst == src or dst.startswith(src + os.sep):
        raise InvalidArgument(
            f"the node's data directory {target} must be a new directory outside the "
            f"embedded store {source} (the store is copied, not converted in place); pass --data NEW")


def _check_target_empty(target: str) -> None:
    if not os.path.lexists(target):
        return
    if not os.path.isdir(target):
        raise InvalidArgument(f"the node's data directory {target} exists and is not a "
                              f"directory")
    try:
        entries = sorted(n for n in os.listdir(target) if n != STAGING_DIR)
    except OSError as e:
        raise translate(e, target, "listing the node's data directory") from e
    if entries:
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise InvalidArgument(
            f"the node's data directory {target} is not empty ({shown}): --init-from writes "
            f"only into an empty or new directory; pass --data NEW, or empty it if nothing "
            f"there is needed")


def _check_not_in_use(source: str) -> None:
    """Refuse a store another process has open (its ``flock``), naming that process."""
    if not os.path.isdir(source):
        raise InvalidArgument(f"no embedded store at {source} (no such directory)")
    try:
        with DirectoryLock(source, f"the embedded store {source}"):
            pass
    except DirectoryBusy as e:
        raise InvalidArgument(
            f"the embedded store {source} is open in {e.holder}: close it there (stop the "
            f"program using it), then run --init-from again; a store being written cannot "
            f"be copied whole") from None


def _check_is_store(source: str, shards: int) -> None:
    """An embedded store's directory (not a node's), with the config's shard count."""
    storage = Storage(source, create=False)
    try:
        def read(txn):
            return any(txn.get(META_PAXOS, db=t.meta) is not None for t in storage.shards)
        is_node = storage.read(read, "reading the store's meta tables")
        nshards = storage.nshards
    finally:
        storage.close()
    if is_node:
        raise InvalidArgument(
            f"{source} is a cluster node's data directory, not an embedded store's: run "
            f"kvstore-server on it as it is")
    if nshards != shards:
        raise InvalidArgument(
            f"the embedded store {source} has {nshards} shard(s) but the config says shards "
            f"= {shards}: set shards = {nshards} in it (a key must stay in the shard that "
            f"holds it)")


# -- the work ---------------------------------------------------------------------------------

def _recover_store(source: str) -> None:
    """Open the store and close it: its own recovery replays its log into the state, and
    the clean close checkpoints all of it into LMDB (``META_LOG_CLOSED``)."""
    from kvstore.embedded.store import EmbeddedKV
    EmbeddedKV(source, create=False).close()


def _stage(source: str, staging: str, shards: int) -> tuple[int, int]:
    """Copy the store's LMDB into ``staging`` and rewrite the copy's meta as a node's;
    ``(keys, bytes)`` of the copy."""
    storage = Storage(source, create=False)  # its lock: no one opens the store meanwhile
    try:
        applied = storage.read(lambda txn: _checkpointed_applied(storage, txn, source),
                               "reading the store's applied points")
        try:
            os.mkdir(staging)
            storage.env.copy(staging, compact=True)
        except Exception as e:  # lmdb.Error or OSError
            raise translate(e, staging, "copying the store") from e
    finally:
        storage.close()
    node = Storage(staging, shards=shards, create=False)
    try:
        keys = node.write(lambda txn: _as_node(txn, node, applied))
        size = node.disk_usage()
    finally:
        node.close()
    return keys, size


def _checkpointed_applied(storage: Storage, txn, source: str) -> list[int]:
    """Per shard, the applied slot LMDB holds, once sure that LMDB holds all of the log
    (a clean close, and no record appended since: else refused)."""
    positions = {storage.meta_int(txn, s, META_LOG_POSITION) for s in range(storage.nshards)}
    closed = {storage.meta_int(txn, s, META_LOG_CLOSED) for s in range(storage.nshards)}
    wal = WriteAheadLog.open(os.path.join(source, WAL_DIR))
    try:
        end = wal.end
    finally:
        wal.close()
    if len(positions) != 1 or closed != positions or end != positions.pop():
        raise InvalidArgument(
            f"the embedded store {source} was opened by another process while --init-from "
            f"recovered it, and not closed since: close it there, then run --init-from again")
    return [storage.meta_int(txn, s, META_APPLIED) for s in range(storage.nshards)]


def _as_node(txn, storage: Storage, applied: list[int]) -> int:
    """Rewrite the copy's meta tables as a new node's (module docstring); keys held."""
    keys = 0
    for shard, t in enumerate(storage.shards):
        point = applied[shard] - 1  # the store's slot A is the node's slot A - 1
        txn.drop(t.log, delete=False)  # the store's (pre-log format) entries, all applied
        for name in _EMBEDDED_META:
            txn.delete(name, db=t.meta)
        txn.put(META_PAXOS, msgpack.packb(list(HardState(0, point, point, point))), db=t.meta)
        txn.put(META_LOG_POSITION, pack_u64(0), db=t.meta)  # a new node's empty log
        keys += txn.stat(t.data)["entries"]
    return keys


# -- kvstore-server --init-from ---------------------------------------------------------------

def run(args) -> int:
    """``kvstore-server --init-from DIR --config FILE --id NAME [--data NEW]``: exit 0 with
    one line on stdout, or one line on stderr and exit 2 (``kvstore.server.main``)."""
    from kvstore.node.config import load_node_config
    from kvstore.server.main import EXIT_CONFIG, EXIT_OK, _fail
    try:
        config = load_node_config(args.config, args.id, args.data)
        result = init_from(args.init_from, config)
    except KVError as e:
        return _fail(f"--init-from: {' '.join(str(e).split())}", EXIT_CONFIG)
    data = "" if args.data is None else f" --data {result.data_dir}"
    print(f"kvstore-server: made node {config.name}'s data directory {result.data_dir} from "
          f"the embedded store {os.path.abspath(args.init_from)} ({result.keys} keys in "
          f"{result.shards} shard(s), {result.bytes / 1e6:.1f} MB, {result.seconds:.1f} s); "
          f"start it with: kvstore-server --config {args.config} --id {config.name}{data}",
          file=sys.stdout)
    return EXIT_OK


__all__ = ["init_from", "InitResult", "run", "STAGING_DIR"]
