"""Operating a node: what it tells its operator (issue 23, items 4 and 5).

- ``histogram``: ``Histogram``, a single-writer latency histogram the node's loop, its
  write-ahead log and its checkpoint thread fill with one bucket add per observation
  (no lock, no ``prometheus_client`` on the hot path);
- ``health``: the readiness rules, pure: a cluster's (``quorum_problems``, what
  ``kvstore status`` exits 3 on and the gateway's ``/readyz`` answers) and one node's
  (``node_problems``, its own ``/readyz``);
- ``metrics``: the Prometheus collector over the snapshot the node's loop publishes;
- ``http``: the node's HTTP port (``kvstore-server --metrics``): ``/metrics``,
  ``/healthz``, ``/readyz``, served by a thread that only reads that snapshot.

``prometheus_client`` is imported by ``metrics`` and ``http`` only (the ``metrics`` extra).
"""
