"""``kvstore.connect(addresses, timeout=...)``: the synchronous ``KV`` of a cluster.

``ClusterKV`` checks a call's arguments, builds its request and waits on the
engine (``kvstore.client.core.ClientCore``), which routes and retries it.
``scan`` asks every shard and merges; each shard's part is linearizable, the
whole is not one snapshot across shards. Its transactions are
``kvstore.client.txn.ClusterTxn``. ``status`` asks every node for its view and
names a node whose cluster shape differs from the others'.
"""

from __future__ import annotations

import os
from collections import Counter

from kvstore.api import KV
from kvstore.client import requests
from kvstore.client.cache import DEFAULT_BYTES, DEFAULT_STALENESS, MISS, UNCACHED, CoherentCache
from kvstore.client.watch import Watch
from kvstore.commands import incr_result
from kvstore.client.core import ClientCore
from kvstore.client.txn import ClusterTxn, lock_keys_for
from kvstore.errors import InvalidArgument, KVError, Unavailable
from kvstore.transport import wire

def parse_addresses(addresses) -> list:
    """``"tcp://a:1,tcp://b:2"`` or a list of them, as a checked list."""
    if isinstance(addresses, str):
        items = [a.strip() for a in addresses.split(",")]
    elif isinstance(addresses, (list, tuple)):
        items = list(addresses)
    else:
        raise InvalidArgument(f"addresses must be a str or a list of str, not "
                              f"{type(addresses).__name__}")
    out = []
    for a in items:
        if not isinstance(a, str) or not a.startswith("tcp://") or ":" not in a[6:]:
            raise InvalidArgument(f"a server address looks like tcp://127.0.0.1:7001, got {a!r}")
        if a not in out:
            out.append(a)
    if not out:
        raise InvalidArgument("no server address given")
    return out


def _check_timeout(timeout) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise InvalidArgument(f"timeout must be a number of seconds > 0, got {timeout!r}")
    return float(timeout)


class ClusterKV(KV):
    """``kvstore.connect(...)``: the ``KV`` interface over a running cluster; thread-safe."""

    def __init__(self, addresses, timeout: float = 5.0, keys=None, cache=None,
                 cache_staleness: float = DEFAULT_STALENESS,
                 cache_bytes: int = DEFAULT_BYTES, one_round_commit: bool = True) -> None:
        self._addresses = parse_addresses(addresses)
        #: cross-shard transactions commit in one round (``kvstore.client.txn``)
        self.one_round_commit = bool(one_round_commit)
        self.timeout = _check_timeout(timeout)
        keys = keys if keys is not None else os.environ.get("KVSTORE_KEYS") or None
        if keys is not None:
            from kvstore.transport.security import CurveKeys
            keys = CurveKeys(os.fspath(keys), "client")
        self._core = ClientCore(self._addresses, self.timeout, keys)
        try:
            futures = [self._core.submit(wire.OP_HELLO, None, [], target=a) for a in self._addresses]
            self._hello = self._first_answer(futures)
            self.nshards = self._core.nshards
            self._cache = None
            if cache is not None and cache is not False:
                self._cache = CoherentCache(self._core, self.nshards, cache, cache_staleness,
                                            cache_bytes)
                self._cache.wait_started(self.timeout)  # else it fills once it knows
        except BaseException:
            self._core.close()
            raise

    def _first_answer(self, futures: list):
        """The first successful answer among ``futures``; the last error if none."""
        error = None
        pending = list(futures)
        while pending:
            for f in list(pending):
                if f.done():
                    pending.remove(f)
                    if f.exception() is None:
                        return f.result()
                    error = f.exception()
            if pending:
                from concurrent.futures import FIRST_COMPLETED, wait
                wait(pending, timeout=self.timeout + 5.0, return_when=FIRST_COMPLETED)
        raise error

    def _shard(self, key: bytes) -> int:
        return requests.shard_for(self.nshards, key)

    # -- KV (the requests are built in ``kvstore.client.requests``) -------------------------
    def get(self, key):
        request = requests.get(self.nshards, key)
        if self._cache is None:
            return self._core.call(*request)
        cached = self._cache.lookup(request[2][1])
        if cached is UNCACHED:
            return self._core.call(*request)
        if type(cached) is not tuple or cached[0] is not MISS:
            return cached
        ticket = cached[1]
        try:
            value, revision = self._core.call(*requests.get_with_revision(request))
        except BaseException:
            self._cache.abandon(ticket)
            raise
        self._cache.fill(ticket, value, revision)
        return value

    def watch(self, key=None, prefix=None, start_revision=None, *,
              prev_value: bool = False) -> Watch:
        """Every change of ``key`` or under ``prefix`` (everything if neither) from
        ``start_revision`` (None: from now; an int; or a ``Watch.position``), exactly
        once and in order per shard, across failovers (``kvstore.client.watch``)."""
        self._core_check()
        return Watch(self._core, self.nshards, key, prefix, start_revision, prev_value)

    def cache_stats(self) -> dict:
        """The coherent cache's counters (``kvstore.client.cache``); empty without one."""
        return {} if self._cache is None else self._cache.stats()

    def put(self, key, value, lease=None, ttl=None) -> None:
        request = requests.put(self.nshards, key, value, lease, ttl)
        requests.put_result(request, self._core.call(*request))

    def _all_shards(self, batch: list) -> list:
        futures = [self._core.submit(*r) for r in batch]
        return [self._core.wait(f) for f in futures]

    def _lease_grant(self, lease_id: int, ttl_ms: int) -> None:
        self._all_shards(requests.lease_grant(self.nshards, lease_id, ttl_ms))

    def _lease_keepalive(self, lease_id: int) -> bool:
        return all(self._all_shards(requests.lease_keepalive(self.nshards, lease_id)))

    def _lease_revoke(self, lease_id: int) -> int:
        return requests.revoked_count(self._all_shards(requests.lease_revoke(self.nshards,
                                                                              lease_id)))

    def delete(self, key) -> bool:
        return bool(self._core.call(*requests.delete(self.nshards, key)))

    def cas(self, key, expected, new, *, lease=None) -> bool:
        request = requests.cas(self.nshards, key, expected, new, lease)
        return requests.cas_result(request, self._core.call(*request))

    def incr(self, key, delta=1) -> int:
        request = requests.incr(self.nshards, key, delta)
        return incr_result(request[2], self._core.call(*request))

    def scan(self, prefix=b"", start=None, end=None, limit=None):
        batch, limit = requests.scan(self.nshards, prefix, start, end, limit)
        futures = [self._core.submit(*r) for r in batch]
        return requests.merge_scan([self._core.wait(f) for f in futures], limit)

    def transaction(self) -> "ClusterTxn":
        self._core_check()
        return ClusterTxn(self)

    def _attempt_transaction(self, previous, attempt: int) -> "ClusterTxn":
        return ClusterTxn(self, lock_keys_for(previous, attempt))

    def _run_transaction_timeout(self) -> float:
        """``run_transaction`` retries for this client's timeout by default."""
        return self.timeout

    def _core_check(self) -> None:
        if self._core._closed:
            raise KVError("this connection is closed")

    def status(self) -> dict:
        """Every node's view: ``{"nodes": [...], "shards": [...]}`` (API.md section 1)."""
        core = self._core
        while True:
            try:
                down = set(core._down)  # known down (their connection dropped): not asked
                break
            except RuntimeError:  # the I/O thread changed it meanwhile
                continue
        futures = [(a, None if a in down else
                    core.submit(wire.OP_STATUS, None, [], timeout=min(self.timeout, 2.0), target=a))
                   for a in core.nodes]
        views = {}
        for address, f in futures:
            try:
                views[address] = None if f is None else core.wait(f)
            except Unavailable:
                views[address] = None
        known = {n.get("address"): n.get("id") for n in (self._hello or {}).get("nodes", [])}
        nodes, names, problems = [], {}, []
        reference = _common_shape(views.values(), (self.nshards, _members(self._hello)))
        clusters = Counter(v.get("cluster") for v in views.values() if isinstance(v, dict))
        cluster = (self._hello or {}).get("cluster")  # the most reported, the hello's on a tie
        if clusters and clusters.get(cluster, 0) < max(clusters.values()):
            cluster = clusters.most_common(1)[0][0]
        nshards = reference[0] if reference[0] is not None else self.nshards
        for address, v in list(views.items()):
            if v is None:
                nodes.append({"id": known.get(address), "address": address, "state": "down",
                              "role": ""})
                continue
            mismatch = _shape_mismatch(v, reference, cluster)
            if mismatch:
                name = v.get("node") if isinstance(v, dict) else None
                problems.append(f"{name or 'the node'} at {address} {mismatch}: its cluster.toml "
                                f"differs from the others' and its peers refuse it")
                nodes.append({"id": name, "address": address, "state": "mismatch", "role": ""})
                views[address] = None
                continue
            names[address] = v["node"]
            roles = sorted({s["role"] for s in v["shards"]})
            leads = [s["shard"] for s in v["shards"] if s["role"] == "leader"]
            nodes.append({"id": v["node"], "address": address, "state": "up",
                          "role": f"leader of {leads}" if leads else ",".join(roles)})
        shards = []
        for s in range(nshards):
            leader, commit, replicas, states, voters = None, -1, {}, {}, None
            for address, v in views.items():
                if v is None:
                    continue
                sv = v["shards"][s]
                replicas[v["node"]] = sv["applied_index"]
                states[v["node"]] = sv.get("state", "ok")
                commit = max(commit, sv["commit_index"])
                if sv["role"] == "leader":
                    leader = v["node"]
                if sv.get("voters") and (voters is None or sv["role"] == "leader"):
                    voters = sv["voters"]  # the leader's word, else any node's
            shards.append({"shard": s, "leader": leader, "commit_index": commit,
                           "applied_index": replicas.get(leader) if leader else None,
                           "replicas": replicas, "states": states})
            if voters is not None:
                shards[-1]["voters"] = voters
        out = {"mode": "cluster", "nodes": nodes, "shards": shards}
        if problems:
            out["problems"] = problems
        return out

    def close(self) -> None:
        if self._cache is not None:
            self._cache.close()
        self._core.close()

    def __repr__(self) -> str:
        return f"<kvstore.ClusterKV {','.join(self._addresses)} shards={self.nshards}>"


def _members(view) -> tuple | None:
    try:
        return tuple(sorted((n["id"], n["address"]) for n in view["nodes"]))
    except (KeyError, TypeError):
        return None


def _shape(view) -> tuple:
    """``(shard count, members)`` a node's status reports; None where unreadable."""
    try:
        nshards = int(view["nshards"])
        if len(view["shards"]) != nshards:
            nshards = None
    except (KeyError, TypeError, ValueError):
        nshards = None
    return nshards, _members(view)


def _common_shape(views, fallback: tuple) -> tuple:
    """The shape most nodes report (on a tie, the one this client learned first)."""
    counts: dict = {}
    for v in views:
        if v is not None:
            shape = _shape(v)
            counts[shape] = counts.get(shape, 0) + 1
    if not counts:
        return fallback
    best = max(counts.values())
    return fallback if counts.get(fallback) == best else max(counts, key=counts.get)


def _shape_mismatch(view, reference: tuple, cluster: str | None = None) -> str | None:
    """How a node's status differs from the cluster's shape (shard count, and the cluster's
    identity where nodes report it), or None if it agrees. Not the members: a membership
    change reaches the nodes one by one, so they may list others for a while."""
    nshards, members = _shape(view)
    if nshards is None or members is None:
        return "answers with a status this client cannot read"
    if nshards != reference[0]:
        return f"reports {nshards} shard(s) where the cluster has {reference[0]}"
    if cluster is not None and view.get("cluster") not in (None, cluster):
        return "belongs to another cluster (another cluster.toml bootstrapped it)"
    return None


def connect(addresses, timeout: float = 5.0, keys=None, *, cache=None,
            cache_staleness: float = DEFAULT_STALENESS,
            cache_bytes: int = DEFAULT_BYTES, one_round_commit: bool = True) -> ClusterKV:
    """A client of the cluster at ``addresses`` (one is enough; it learns the others).

    ``keys``: a ``kvstore keygen`` directory for a cluster with ``[security]``
    (default: ``$KVSTORE_KEYS``). ``cache``: a prefix, a list of them, or True: gets
    of those keys are served from a coherent cache at most ``cache_staleness``
    seconds behind, never behind this client's writes (docs/cache.md).
    ``one_round_commit``: as ``kvstore.connect``'s (True: cross-shard transactions
    commit in one consensus round; False: in two, as earlier versions did)."""
    return ClusterKV(addresses, timeout, keys, cache, cache_staleness, cache_bytes,
                     one_round_commit)
