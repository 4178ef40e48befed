"""The node's Prometheus metrics: a collector over the view its loop publishes.

``NodeCollector`` turns the last view (``kvstore.node.stats.view``, a copy the loop
hands over every 100 ms) into metric families when Prometheus scrapes: nothing is
computed for metrics in the loop beyond its counts. Names follow Prometheus' practice:
the ``kvstore_`` prefix, base units (seconds, bytes), ``_total`` on counters, labels for
what varies (``op``, ``outcome``, ``shard``, ``reason``). The dashboard in
``deploy/grafana/`` and docs/operations.md use these names; a test scrapes a real node
and checks that every name the dashboard uses is served.
"""

from __future__ import annotations

from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily, InfoMetricFamily)

from kvstore.ops.health import node_problems

#: Shard roles (``kvstore.paxos.interface``), one series each per shard (1: the current).
ROLES = ("leader", "follower", "candidate", "pre-candidate")
#: Shard states (``Node.status()``): "catching up" is exported as ``catching_up``.
STATES = ("ok", "catching up", "recovering")
#: Why a node drops a frame (``Node._drop`` and ``NodeSockets``): exported from 0, so a
#: dashboard's rate() has a series before the first drop. Others appear as they happen.
DROP_REASONS = ("malformed", "invalid", "unexpected", "peer_frame_from_client",
                "client_frame_from_peer", "bad_envelope", "many_parts", "revoked_client",
                "not_a_peer", "peer_shape_differs", "peer_unreachable", "reply_slow_client",
                "reply_node_full", "reply_gone", "reply_full", "reply_too_big",
                "peer_unknown", "unknown_peer")
#: The resolver's counters (``kvstore.node.resolver``) and the action label they get.
RESOLVER_ACTIONS = {"txn_settlements_started": "settlement_started", "txn_settled": "settled",
                    "txn_decide_requests": "decide"}


def _histogram(name: str, doc: str, labels: list, rows) -> HistogramMetricFamily:
    """``rows``: ``(label values, (bounds, counts, sum))``; counts per bucket, made
    cumulative here as the exposition wants."""
    family = HistogramMetricFamily(name, doc, labels=labels)
    for values, (bounds, counts, total) in rows:
        running, buckets = 0, []
        for bound, n in zip(list(bounds) + ["+Inf"], counts):
            running += n
            buckets.append((str(bound) if bound != "+Inf" else bound, running))
        family.add_metric(values, buckets, total)
    return family


class NodeCollector:
    """A ``prometheus_client`` collector; ``source()`` returns the last published view
    (or None before the first: then only ``kvstore_up 0`` is served)."""

    def __init__(self, source, now) -> None:
        self._source = source
        self._now = now  # the monotonic clock the view's "at" is on

    def describe(self):
        return []  # computed at scrape time: no fixed description to register

    def collect(self):
        v = self._source()
        up = GaugeMetricFamily("kvstore_up", "1 once the node's loop has published its state")
        up.add_metric([], 0 if v is None else 1)
        yield up
        if v is None:
            return
        yield from _node(v, self._now())
        yield from _requests(v)
        yield from _storage(v)
        yield from _shards(v["status"])
        yield from _txns(v)
        yield from _drops(v["status"]["counters"])


def _node(v: dict, now: float):
    st = v["status"]
    info = InfoMetricFamily("kvstore_node", "This node: its name and the cluster's shape")
    info.add_metric([], {"node": st["node"], "nodes": str(len(st["nodes"])),
                         "shards": str(st["nshards"])})
    yield info
    ready = GaugeMetricFamily("kvstore_ready", "1 when this node is in a quorum and caught "
                              "up in every shard (what /readyz answers 200 on)")
    ready.add_metric([], 0 if node_problems(st) else 1)
    yield ready
    age = GaugeMetricFamily("kvstore_loop_publish_age_seconds",
                            "Seconds since the node's loop last published its state "
                            "(every 0.1 s while it turns)")
    age.add_metric([], max(0.0, now - v["at"]))
    yield age
    clients = GaugeMetricFamily("kvstore_client_sessions",
                                "Clients (connections) that sent a request in the last 10 s")
    clients.add_metric([], v["clients"])
    yield clients
    waiting = GaugeMetricFamily("kvstore_waiting_requests",
                                "Requests waiting here for their answer", labels=["kind"])
    for kind, n in v["waiting"].items():
        waiting.add_metric([kind], n)
    yield waiting


def _requests(v: dict):
    from kvstore.node.stats import OPS, OUTCOMES
    total = CounterMetricFamily("kvstore_requests", "Client requests answered (or forwarded "
                                "to the leader) by this node, by op and outcome",
                                labels=["op", "outcome"])
    counts = v["requests"]
    for op in OPS:
        for outcome in OUTCOMES.values():
            total.add_metric([op, outcome], counts.get((op, outcome), 0))
    yield total
    yield _histogram("kvstore_request_duration_seconds",
                     "Seconds from a request's arrival to its answer, answered or forwarded "
                     "successfully", ["op"], [([op], h) for op, h in v["latency"].items()])


def _storage(v: dict):
    if v["fsync"] is not None:
        yield _histogram("kvstore_wal_fsync_duration_seconds",
                         "Seconds per fdatasync of the write-ahead log (one per loop turn "
                         "that persists)", [], [([], v["fsync"])])
    if v["checkpoint"] is not None:
        yield _histogram("kvstore_checkpoint_duration_seconds",
                         "Seconds per checkpoint of the write-ahead log's overlay into LMDB",
                         [], [([], v["checkpoint"])])
    if v["log_bytes"] is not None:
        held = GaugeMetricFamily("kvstore_wal_bytes",
                                 "Bytes the write-ahead log holds (not yet checkpointed away)")
        held.add_metric([], v["log_bytes"])
        yield held
        appended = CounterMetricFamily("kvstore_wal_appended_bytes",
                                       "Bytes appended to the write-ahead log since start")
        appended.add_metric([], v["log_appended_bytes"])
        yield appended


def _shards(st: dict):
    labels = ["shard"]
    role = GaugeMetricFamily("kvstore_shard_role", "1 for this node's role in the shard",
                             labels=["shard", "role"])
    state = GaugeMetricFamily("kvstore_shard_state", "1 for this replica's state: ok, "
                              "catching_up (far behind or receiving a snapshot), recovering "
                              "(a wiped node that does not vote yet)", labels=["shard", "state"])
    leader = GaugeMetricFamily("kvstore_shard_is_leader", "1 if this node leads the shard",
                               labels=labels)
    has_leader = GaugeMetricFamily("kvstore_shard_has_leader",
                                   "1 if this node leads the shard or follows a leader",
                                   labels=labels)
    ballot = GaugeMetricFamily("kvstore_shard_ballot_round",
                               "The round of the highest ballot this replica promised (its term)",
                               labels=labels)
    commit = GaugeMetricFamily("kvstore_shard_commit_index",
                               "The highest slot this replica knows is chosen", labels=labels)
    applied = GaugeMetricFamily("kvstore_shard_applied_index",
                                "The highest slot applied to this replica's state", labels=labels)
    lag = GaugeMetricFamily("kvstore_shard_lag_slots", "Slots this replica's applied point is "
                            "behind the highest commit point its leader told it", labels=labels)
    changes = CounterMetricFamily("kvstore_shard_leader_changes",
                                  "Times this node saw the shard's leader change "
                                  "(the first leader it learns included)", labels=labels)
    sent = CounterMetricFamily("kvstore_shard_snapshots_sent",
                               "Snapshot transfers this node started to a lagging follower",
                               labels=labels)
    received = CounterMetricFamily("kvstore_shard_snapshots_received",
                                   "Snapshots from the leader installed here", labels=labels)
    taken = CounterMetricFamily("kvstore_shard_snapshots_taken",
                                "Snapshots of this replica's state taken (and the log "
                                "compacted below them)", labels=labels)
    for sh in st["shards"]:
        s = str(sh["shard"])
        for r in ROLES:
            role.add_metric([s, r], 1 if sh["role"] == r else 0)
        for name in STATES:
            state.add_metric([s, name.replace(" ", "_")], 1 if sh["state"] == name else 0)
        leader.add_metric([s], 1 if sh["role"] == "leader" else 0)
        has_leader.add_metric([s], 0 if sh["leader"] is None else 1)
        ballot.add_metric([s], int(sh["ballot"].split(".")[0]))
        commit.add_metric([s], sh["commit_index"])
        applied.add_metric([s], sh["applied_index"])
        lag.add_metric([s], sh["behind"])
        changes.add_metric([s], sh["leader_changes"])
        sent.add_metric([s], sh["snapshots_sent"])
        received.add_metric([s], sh["snapshots_installed"])
        taken.add_metric([s], sh["snapshots_taken"])
    yield from (role, state, leader, has_leader, ballot, commit, applied, lag, changes, sent,
                received, taken)


def _txns(v: dict):
    prepares = CounterMetricFamily("kvstore_txn_prepares",
                                   "Cross-shard transaction prepares this node took from "
                                   "clients as a shard's leader")
    prepares.add_metric([], v["txn_prepares"])
    yield prepares
    decisions = CounterMetricFamily("kvstore_txn_decisions",
                                    "Cross-shard transaction decisions this node recorded for "
                                    "a coordinator, by outcome", labels=["outcome"])
    for outcome in ("commit", "abort"):
        decisions.add_metric([outcome], v["txn_decisions"].get(outcome, 0))
    yield decisions
    counters = v["status"]["counters"]
    actions = CounterMetricFamily("kvstore_txn_resolver_actions",
                                  "The 2PC resolver's steps: decide requests taken, "
                                  "settlements of abandoned transactions started and finished",
                                  labels=["action"])
    for key, action in RESOLVER_ACTIONS.items():
        actions.add_metric([action], counters.get(key, 0))
    yield actions


def _drops(counters: dict):
    dropped = CounterMetricFamily("kvstore_frames_dropped",
                                  "Frames (or replies) this node dropped, by reason",
                                  labels=["reason"])
    seen = {k[len("dropped_"):]: n for k, n in counters.items() if k.startswith("dropped_")}
    seen["reply_too_big"] = counters.get("refused_reply_too_big", 0)
    for reason in sorted(set(DROP_REASONS) | set(seen)):
        dropped.add_metric([reason], seen.get(reason, 0))
    yield dropped
    poisoned = CounterMetricFamily("kvstore_poisoned_values",
                                   "Chosen log values this node could not apply (no-ops)")
    poisoned.add_metric([], counters.get("poisoned_values", 0))
    yield poisoned
    peer = CounterMetricFamily("kvstore_peer_frames_sent", "Frames sent to peers")
    peer.add_metric([], counters.get("sent_peer_frames", 0))
    yield peer
    busy = CounterMetricFamily("kvstore_busy_poll_hits",
                               "Loop waits a busy poll ended (a wake-up saved; [tuning] "
                               "busy_poll_us)")
    busy.add_metric([], counters.get("busy_poll_hits", 0))
    yield busy
