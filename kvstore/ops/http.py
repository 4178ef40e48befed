"""The node's HTTP port (``kvstore-server --metrics HOST:PORT``): ``/metrics``,
``/healthz``, ``/readyz``.

A thread of its own serves it, reading only the view the node's loop publishes
(``Node.publish``, every 0.1 s): a scrape or a probe never takes a lock the loop
holds nor calls into the node, so it cannot slow or stall the loop, and a stalled
loop shows as a stale view.

- ``/healthz``: 200 while the loop turns (its last view is under
  ``LIVENESS_SECONDS`` old), else 503. What a liveness probe restarts on.
- ``/readyz``: 200 when this node is in a quorum and caught up in every shard
  (``kvstore.ops.health.node_problems``: it leads or follows a leader, votes, and is
  not far behind), else 503 with ``{"ready": false, "problems": [...]}``. What a
  readiness probe or a load balancer routes on.
- ``/metrics``: the Prometheus text format (``kvstore.ops.metrics``).

The address is bound when the server is made (``MetricsServer(listen)``), before the
node starts, so a bad or taken address is the node's one-line refusal (exit 2).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from kvstore.errors import InvalidArgument
from kvstore.ops.health import node_problems

#: /healthz answers 503 once the loop has published nothing for this long (it publishes
#: every 0.1 s while it turns; a long fsync stall or a hung disk shows here).
LIVENESS_SECONDS = 10.0


def check_installed() -> None:
    """InvalidArgument naming the extra to install when ``prometheus_client`` is missing."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise InvalidArgument("metrics need prometheus_client: pip install 'kvstore[metrics]'") \
            from None


def parse_listen(listen: str) -> tuple[str, int]:
    """``"127.0.0.1:9100"`` (or ``"[::1]:9100"``) as ``(host, port)``, or InvalidArgument."""
    from kvstore.gateway.serve import parse_listen as parse  # the gateway's rule: one rule
    try:
        return parse(listen)
    except InvalidArgument:
        raise InvalidArgument(f"a metrics address looks like 127.0.0.1:9100, got {listen!r}") \
            from None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class MetricsServer:
    """The HTTP port of one node (the module docstring). ``publish`` is the node's
    ``Node.publish``; ``start()`` serves in a daemon thread, ``stop()`` ends it."""

    def __init__(self, listen: str) -> None:
        check_installed()
        host, port = parse_listen(listen)
        server_class = _Server6 if ":" in host else _Server
        try:
            self.httpd = server_class((host, port), _handler(self))
        except OSError as e:
            raise InvalidArgument(f"cannot listen on {listen}: {e.strerror or e}") from None
        self.listen = listen
        self.view: dict | None = None
        from prometheus_client import CollectorRegistry
        from kvstore.ops.metrics import NodeCollector
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(NodeCollector(lambda: self.view, time.monotonic))
        self._thread: threading.Thread | None = None

    def publish(self, view: dict) -> None:
        """Called by the node's loop: one reference assignment, atomic for the reader."""
        self.view = view

    def start(self) -> None:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="kvstore-metrics",
                                        kwargs={"poll_interval": 0.5}, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(5)
        self.httpd.server_close()

    # -- the answers ------------------------------------------------------------------

    def health(self) -> tuple[int, dict]:
        view = self.view
        if view is None:
            return 503, {"alive": False, "reason": "the node's loop has not started"}
        age = time.monotonic() - view["at"]
        if age > LIVENESS_SECONDS:
            return 503, {"alive": False, "reason": f"the node's loop has not turned for "
                                                   f"{age:.1f} s"}
        return 200, {"alive": True, "node": view["status"]["node"]}

    def readiness(self) -> tuple[int, dict]:
        code, body = self.health()
        if code != 200:
            return 503, {"ready": False, "problems": [body["reason"]]}
        status = self.view["status"]
        problems = node_problems(status)
        if problems:
            return 503, {"ready": False, "node": status["node"], "problems": problems}
        return 200, {"ready": True, "node": status["node"], "shards": [
            {"shard": s["shard"], "role": s["role"], "leader": s["leader"]}
            for s in status["shards"]]}

    def metrics(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _handler(server: MetricsServer):
    class Handler(BaseHTTPRequestHandler):
        server_version = "kvstore-metrics"
        timeout = 10  # seconds a connection may take to send its request: no slow hold-ups

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                body, kind = server.metrics()
                self._send(200, body, kind)
            elif path in ("/healthz", "/readyz"):
                code, doc = server.health() if path == "/healthz" else server.readiness()
                self._send(code, json.dumps(doc).encode(), "application/json")
            else:
                self._send(404, b'{"error": "not found: /metrics, /healthz, /readyz"}',
                           "application/json")

        def _send(self, code: int, body: bytes, kind: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass  # a scrape every few seconds is not worth a log line

    return Handler
