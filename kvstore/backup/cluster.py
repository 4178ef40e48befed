"""Back up a running cluster: one consistent cut across shards, streamed page by page.

Reading each shard at its own linearizable point is not enough: a cross-shard
transaction T decided at its coordinator shard A before A is read can have its
prepare at participant B after B was read (B's copy lacks T's writes, A's has
them), and a shard's copy can show T applied while another's was taken before
T's prepare. A shard's log orders T's steps on that shard, but nothing orders
two shards' read points against T. The backup therefore makes one.

The protocol
------------

1. **Fence** every shard: a ``BackupFence(id, until)`` entry in each shard's log
   (``kvstore.machine.fence``). From that slot on, the shard's state machine
   refuses every new TxnPrepare (votes no: the transaction aborts, its client
   retries), so its set of prepared transactions only shrinks; those in flight
   drain as their decisions are carried out (or their deadlines pass and the
   resolvers settle them).
2. **Open** a read point on one node (``OP_BACKUP_OPEN``,
   ``kvstore.node.backups``): between two loop turns, the node takes its
   overlay's generations and one LMDB read transaction together: per shard
   ``s``, exactly its state at its applied slot ``a_s``. It keeps the point
   only if, in that state, every shard holds this backup's fence and no
   prepared transaction; otherwise it answers "retry" and is asked again.
3. **Lift** the fences (``BackupUnfence`` on every shard), only after the
   point is open. Each answers whether its fence still held. If one had
   lapsed (a fence lapses by itself, ``kvstore.machine.fence``, so that a
   backup that died does not stop transactions for long), the cut is not
   proven: the point is dropped and the backup starts again with a new fence.
4. **Stream** every shard's data and lease rows from the point, page by page
   (bounded bytes per page, one page in memory at a time), while writes go on.

Why the cut is consistent
-------------------------

Let T be a cross-shard transaction that committed, with participants P. On
each p in P, T's TxnPrepare is applied at a slot ``prep_p`` and its writes at
the slot ``res_p > prep_p`` of its TxnResolve (COMMIT). On p, ``fence_p`` is the
fence's slot, ``a_p`` the point's applied slot (``a_p >= fence_p``: the state
at ``a_p`` holds the fence), and ``lift_p`` the slot of the backup's own
``BackupUnfence``. T is in p's copy iff ``res_p <= a_p``.

- T was prepared on p at a slot in ``(fence_p, lift_p)`` only if the fence had
  lapsed there, i.e. was removed before ``lift_p``; then ``BackupUnfence`` on p
  answered False and this point was thrown away. So in a kept backup, on every
  p, ``prep_p < fence_p`` or ``prep_p > lift_p``.
- If ``prep_p < fence_p`` for some p: the state at ``a_p`` holds no prepared
  transaction, and T's prepare at ``prep_p < a_p`` held one until ``res_p``, so
  ``res_p <= a_p``: T is in p's copy.
- If ``prep_q > lift_q`` for some q: ``lift_q`` was proposed after the point
  was open (step 3 follows step 2), so T's prepare on q, and T's decision
  (which needs q's vote), and every ``res_p`` (which needs the decision) were
  chosen after the point was open. At that moment every slot ``<= a_p`` of
  every p was already chosen and applied on the node holding the point (its
  state was at ``a_p``), and a chosen slot never changes value, so ``res_p >
  a_p``: T is in no copy.
- Both cases cannot hold at once for one T: if ``prep_p < fence_p`` and ``prep_q
  > lift_q``, then by the two points above ``res_p <= a_p`` and ``res_p > a_p``.

So a committed T is wholly in the backup or wholly absent, and an aborted one
wrote nothing anywhere. Single-shard writes and transactions are one entry of
one shard: each is in that shard's copy or not. Nothing here needs the node to
be a leader or up to date: any node's applied state works, and the backup still
holds every write acknowledged before it started (such a write was chosen before
the fence was proposed, so below ``fence_p <= a_p``). Clocks matter only for how
long a fence lasts when its backup dies (``until``: the node cuts it to at most
``FENCE_MS_MAX`` past its own clock), never for the cut.

What it costs: cross-shard transactions that prepare while the fences hold
(from the fence to the point's opening, normally a few milliseconds; up to a
prepared transaction's deadline, 5 s, if one was abandoned by its client) are
refused and retried by their clients; nothing else waits.

What the backup holds: per shard, its data rows (as stored, each with its
revision and checksum) and its lease rows. Client sessions and 2PC records are
the old cluster's bookkeeping; a restored store starts without them (no
transaction is prepared at the cut, so none is lost).
"""

from __future__ import annotations

import os
import time

from kvstore.backup.format import DATA, LEASES, BackupWriter, Header, now_iso
from kvstore.client.backup import BackupCalls
from kvstore.errors import KVError, Unavailable

#: A fence lapses this long after it was asked for, if its backup never lifts it.
FENCE_SECONDS = 15.0
#: How long the backup waits for a node to open its read point (the fence, then the
#: drain of prepared transactions), over all nodes tried.
OPEN_SECONDS = 10.0
#: Fences tried before giving up (one lapses only if opening took longer than it lasts).
ATTEMPTS = 3
#: Bytes of rows asked for per page.
PAGE_BYTES = 1024 * 1024


def backup_cluster(addresses, path: str | os.PathLike, *, timeout: float = 10.0,
                   page_bytes: int = PAGE_BYTES, keys=None) -> dict:
    """Back up the cluster at ``addresses`` (as ``kvstore.connect`` takes them) to the
    file ``path``, consistently across shards (the module docstring); returns a
    summary (``shards``, ``rows``, ``bytes``, ``node``, ``revisions``).

    Raises ``Unavailable`` if no node could open a read point, ``StorageError`` if
    the file cannot be written. On any error nothing is left at ``path`` (nor at
    ``path + ".tmp"``). ``keys``: as ``kvstore.connect`` takes them, for a cluster with
    ``[security]`` (default ``$KVSTORE_KEYS``)."""
    import kvstore
    with kvstore.connect(addresses, timeout=timeout, keys=keys) as kv:
        return backup_client(kv, path, timeout=timeout, page_bytes=page_bytes)


def backup_client(kv, path: str | os.PathLike, *, timeout: float = 10.0,
                  page_bytes: int = PAGE_BYTES) -> dict:
    """``backup_cluster`` through an open client ``kv`` (``kvstore.connect``'s)."""
    calls = BackupCalls(kv)
    for _attempt in range(ATTEMPTS):
        opened = _open_cut(calls, timeout)
        if opened is not None:
            return _stream(calls, opened, path, timeout, page_bytes)
    raise Unavailable(f"the backup's fence lapsed {ATTEMPTS} times before a node could open "
                      f"its read point (prepared transactions did not drain within "
                      f"{FENCE_SECONDS:.0f} s); try again")


def _open_cut(calls: BackupCalls, timeout: float):
    """Steps 1-3: ``(address, session id, revisions, fence id)`` of a read point that is a
    proven cut, or None (a fence lapsed: try again)."""
    fence_id = os.urandom(16)
    until_ms = int((time.time() + FENCE_SECONDS) * 1000)
    try:
        calls.fence_all(fence_id, until_ms, timeout)
        address, session_id, revisions = _open_somewhere(calls, fence_id)
    except BaseException:
        try:  # lift what was set; a fence left behind lapses by itself
            calls.unfence_all(fence_id, timeout)
        except KVError:
            pass
        raise
    held = calls.unfence_all(fence_id, timeout)
    if not all(held):
        _close_quietly(calls, address, session_id, timeout)
        return None
    return address, session_id, revisions, fence_id


def _open_somewhere(calls: BackupCalls, fence_id: bytes) -> tuple:
    """A read point on the first node (in the cluster's order, those known to be down
    last) that opens one in time."""
    addresses = calls.addresses_to_try()
    deadline = time.monotonic() + OPEN_SECONDS
    last: KVError | None = None
    for i, address in enumerate(addresses):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            session_id, revisions = calls.open(address, fence_id, left / (len(addresses) - i))
        except Unavailable as e:
            last = e
            continue
        if len(revisions) != calls.nshards:
            raise Unavailable(f"{address} opened a read point of {len(revisions)} shard(s), "
                              f"not {calls.nshards}")
        return address, session_id, revisions
    raise Unavailable(f"no node opened the backup's read point within {OPEN_SECONDS:.0f} s"
                      + (f" (last: {last})" if last else ""))


def _stream(calls: BackupCalls, opened: tuple, path, timeout: float, page_bytes: int) -> dict:
    """Step 4: every shard's rows from the read point into the file."""
    address, session_id, revisions, fence_id = opened
    header = Header(shards=calls.nshards,
                    source={"kind": "cluster", "addresses": calls.addresses, "node": address},
                    revisions=revisions, cut={"fence": fence_id.hex(), "node": address},
                    created=now_iso(), kvstore=_version())
    try:
        with BackupWriter(path, header) as writer:
            for shard in range(calls.nshards):
                for table in (DATA, LEASES):
                    after = None
                    while True:
                        rows, done = calls.page(address, session_id, shard, table, after,
                                                page_bytes, timeout)
                        writer.add(shard, table, rows, check=True)
                        if done:
                            break
                        if not rows:
                            raise Unavailable(f"{address} answered an empty page that is not "
                                              f"the last")
                        after = rows[-1][0]
            trailer = writer.finish()
    finally:
        _close_quietly(calls, address, session_id, timeout)
    return {"shards": calls.nshards, "rows": trailer["rows"], "bytes": trailer["bytes"],
            "node": address, "revisions": revisions, "path": writer.path}


def _close_quietly(calls: BackupCalls, address: str, session_id: bytes, timeout: float) -> None:
    try:
        calls.close(address, session_id, min(timeout, 2.0))
    except KVError:
        pass  # the node closes an idle read point on its own


def _version() -> str:
    from kvstore import __version__
    return __version__
