"""``kvstore-server --config cluster.toml --id n1 [--data DIR] [--log-format text|json]``.

One cluster node as its own process (docs/operations.md). The code lives
in the package, not in the top-level ``deploy/`` directory, so that the
``kvstore-server`` console script exists after a plain ``pip install .``;
``deploy/`` holds what a deployment needs around it (an example config, a
systemd unit, a container image, compose and Kubernetes files, a Grafana dashboard).

- SIGTERM or SIGINT: the node finishes its loop turn (persists, sends and
  answers what is decided), closes its sockets and its storage, exit 0.
- SIGHUP: the same, logged as SIGHUP. A node reloads nothing by signal (client
  keys are reread every 2 s on their own, the cluster's shape is fixed at start),
  so a hang-up means what it says: the terminal or session went away, and a node
  must not go on without a place for its logs, nor die without a word.
- A bad config, a port it cannot listen on (named) or an unusable data directory
  (its persisted state fails the recovery check included): one line on stderr,
  exit 2.
- The disk refuses a write while the node runs (full, read-only, failing): the
  node stops at once, before it sends or answers anything that write was to
  make durable, and exits 4 with one line naming the path. Restarted once the
  disk has room, it recovers from the log and rejoins.
- Logs go to stderr, as text or one JSON object per line (``--log-format
  json``): start, stop, elections and leader changes per shard, dropped frames.
- ``[nodes.NAME] gateway = "127.0.0.1:8080"`` (or ``--gateway ADDR``): the node also
  serves the HTTP/JSON gateway there, as a child process (``kvstore.gateway.serve``)
  with its own interpreter, so HTTP work never slows the node's loop; it reaches the
  node through the node's client address, stops with the node, and exits by itself if
  the node dies.
- ``--init-from DIR``: make the node's data directory from an embedded store's
  directory (a one-member cluster), print one line and exit; the node then starts as
  usual (``kvstore.server.initfrom``).
- ``[nodes.NAME] metrics = "127.0.0.1:9100"`` (or ``--metrics ADDR``): the node also
  serves Prometheus ``/metrics``, ``/healthz`` and ``/readyz`` there, from a thread that
  reads only what the loop publishes every 0.1 s (``kvstore.ops.http``). The address is
  bound before the node starts: a bad or taken one is the one-line refusal (exit 2).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import signal
import sys
import time
from typing import Sequence

import zmq

from kvstore.errors import InvalidArgument, StorageError

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_STORAGE = 4

_STANDARD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (``ts``, seconds since the epoch, and ``time``, the
    same in ISO 8601 UTC to the millisecond, for log shippers), level, logger, message,
    and the record's extras."""

    def format(self, record: logging.LogRecord) -> str:
        iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        out = {"ts": round(record.created, 6), "time": f"{iso}.{int(record.msecs):03d}Z",
               "level": record.levelname.lower(),
               "logger": record.name, "msg": record.getMessage()}
        for k, v in vars(record).items():
            if k not in _STANDARD_ATTRS and not k.startswith("_"):
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(fmt: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        formatter = logging.Formatter("%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s",
                                      "%Y-%m-%dT%H:%M:%S")
        formatter.converter = time.gmtime
        handler.setFormatter(formatter)
    root = logging.getLogger("kvstore")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvstore-server",
                                description="Run one node of a kvstore cluster.")
    p.add_argument("--config", metavar="FILE",
                   help="cluster.toml (bootstraps a new cluster), or a file with join = ADDRS "
                        "(and [tuning], [security]) for a member added at run time")
    p.add_argument("--id", "--node", dest="id", required=True, metavar="NAME",
                   help="this node's name")
    p.add_argument("--join", metavar="ADDRS",
                   help="join the running cluster at these client addresses (comma-separated) "
                        "as the member NAME added with `kvstore member add`; no --config")
    p.add_argument("--keys", metavar="DIR",
                   help="with --join, for a cluster with [security] curve: the `kvstore "
                        "keygen` directory (node and client keys)")
    p.add_argument("--data", metavar="DIR", help="data directory (overrides the config's)")
    p.add_argument("--gateway", metavar="HOST:PORT",
                   help="also serve the HTTP/JSON gateway here (overrides the config's "
                        "[nodes.NAME] gateway)")
    p.add_argument("--metrics", metavar="HOST:PORT",
                   help="serve Prometheus /metrics, /healthz and /readyz here (overrides the "
                        "config's [nodes.NAME] metrics; needs the metrics extra)")
    p.add_argument("--init-from", metavar="DIR",
                   help="make this node's data directory from the embedded store at DIR "
                        "(a one-member cluster; the others join with `kvstore member add`), "
                        "then exit (docs/operations.md)")
    p.add_argument("--log-format", choices=("text", "json"), default="text")
    p.add_argument("--log-level", default="INFO",
                   choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return p


def _fail(message: str, code: int = EXIT_CONFIG) -> int:
    print(f"kvstore-server: {message}", file=sys.stderr)
    return code


#: Allocations between young-generation collections in a node process (CPython's default 700).
GC_YOUNG_THRESHOLD = 50_000


def tune_garbage_collector() -> None:
    """A node's process collects garbage less often: every write lives from intake to apply
    as a few small tracked objects (typed commands, waiting requests), so at CPython's
    default thresholds the collector runs every few hundred writes and costs ~7% of a
    write's CPU (bench/write_path.py). What the process loaded at start (modules, config)
    is frozen out of every collection; a node makes no reference cycles on its hot path,
    so the young generation is still collected long before it holds much. Only the
    ``kvstore-server`` process does this: an embedded replica leaves its host's
    collector alone."""
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 20)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.init_from is not None:
        if not args.config:
            return _fail("--init-from needs --config cluster.toml (listing this node alone)")
        from kvstore.server import initfrom
        return initfrom.run(args)
    from kvstore.node.loop import Node
    from kvstore.node.config import load_node_config
    from kvstore.node.waiter import SERVER_BUSY_POLL_US
    try:
        if bool(args.join) == bool(args.config):
            raise InvalidArgument("pass --config cluster.toml (a node of a new or running "
                                  "cluster) or --join ADDRS (a member added at run time)")
        from kvstore.node.config import join_settings
        joining = join_settings(args.config) if args.config else None  # a join file
        if args.join or joining:
            from kvstore.server.join import join_config
            addresses, settings = (args.join, {"curve_keys": args.keys}) if args.join else joining
            keys = settings.pop("curve_keys")
            config = join_config(addresses, args.id, args.data, keys=keys, **settings)
            args.config = None  # no [nodes] table: no gateway or metrics settings there
        else:
            config = load_node_config(args.config, args.id, args.data)
        gateway_listen = _gateway_listen(args)
        metrics = _metrics_server(args)
    except InvalidArgument as e:
        return _fail(str(e))
    if config.busy_poll_us is None:  # a server of its own: awake between close messages
        config.busy_poll_us = SERVER_BUSY_POLL_US
    setup_logging(args.log_format, args.log_level)
    try:
        node = Node(config)
    except (StorageError, InvalidArgument) as e:
        _stop_metrics(metrics)
        return _fail(_naming(config.data_dir, e))
    except zmq.ZMQError as e:
        _stop_metrics(metrics)
        return _fail(_bind_failure(config, e))
    if metrics is not None:
        node.publish = metrics.publish
        metrics.start()
    keys = node.sockets.keys
    if keys is not None and keys.allowed_admins is None:
        logging.getLogger("kvstore.server").warning(
            "the Curve key directory %s has no admins/: every allowed client key may change "
            "the membership (kvstore member add/promote/remove); list the operators' keys "
            "in %s to keep the others to data", keys.directory, keys.admins,
            extra={"event": "no_admins", "node": config.name})

    def on_signal(signum, _frame) -> None:
        logging.getLogger("kvstore.server").info(
            "%s: stopping", signal.Signals(signum).name,
            extra={"event": "signal", "node": config.name})
        node.stop()

    signal.signal(signal.SIGHUP, on_signal)  # a hang-up stops it too, logged: not a silent death
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    gateway = None
    if gateway_listen:
        from kvstore.gateway.serve import spawn
        gateway = spawn(config.addresses[config.name], gateway_listen)
    tune_garbage_collector()
    profile_dir = os.environ.get("KVSTORE_SERVER_PROFILE")
    try:
        if profile_dir:  # where the time goes: a cProfile dump per node at exit
            import cProfile
            profiler = cProfile.Profile()
            try:
                profiler.runcall(node.run)
            finally:
                profiler.dump_stats(os.path.join(profile_dir, f"{config.name}.prof"))
        else:
            node.run()
    except StorageError as e:
        # The loop ended inside a save (node.run closed what it could): what the save
        # held was neither sent nor answered. One line, no traceback.
        return _fail(f"stopped: storage error: {_naming(config.data_dir, e)}", EXIT_STORAGE)
    finally:
        if gateway is not None:
            from kvstore.gateway.serve import stop
            stop(gateway)
        _stop_metrics(metrics)
    return EXIT_OK


def _metrics_server(args):
    """The node's metrics and health server (``--metrics``, else the node's ``metrics``
    setting), bound now with the rest of the config checks, or None."""
    from kvstore.node.config import node_metrics
    listen = args.metrics or (args.config and node_metrics(args.config, args.id))
    if not listen:
        return None
    from kvstore.ops.http import MetricsServer
    try:
        return MetricsServer(listen)
    except InvalidArgument as e:
        source = "--metrics" if args.metrics else f"{args.config}: [nodes.{args.id}] metrics"
        raise InvalidArgument(f"{source}: {e}") from None


def _stop_metrics(metrics) -> None:
    if metrics is not None:
        metrics.stop()


def _gateway_listen(args) -> str | None:
    """Where to serve the gateway (``--gateway``, else the node's ``gateway`` setting),
    checked now with the rest of the config: a bad or taken address, or the gateway extra
    not installed, is the one-line refusal (exit 2), not a child that dies later."""
    from kvstore.node.config import node_gateway
    listen = args.gateway or (args.config and node_gateway(args.config, args.id))
    if listen:
        from kvstore.gateway.serve import check_can_listen, check_installed
        try:
            check_installed()
            check_can_listen(listen)
        except InvalidArgument as e:
            source = "--gateway" if args.gateway else f"{args.config}: [nodes.{args.id}] gateway"
            raise InvalidArgument(f"{source}: {e}") from None
    return listen


def _naming(data_dir: str, e: BaseException) -> str:
    """``e``'s message on one line, naming the data directory (once)."""
    message = " ".join(str(e).split())
    return message if data_dir in message else f"data directory {data_dir}: {message}"


def _bind_failure(config, e: BaseException) -> str:
    """Which of the node's two ports it could not listen on, and why, in one line."""
    from kvstore.server.local import port_in_use
    for role, address in (("clients", config.addresses[config.name]),
                          ("peers", config.peer_address(config.name))):
        why = port_in_use(address)
        if why is not None:
            return (f"cannot listen for {role} on {address} (port "
                    f"{address.rsplit(':', 1)[1]}): {why}")
    return (f"cannot listen on {config.addresses[config.name]} (clients) and "
            f"{config.peer_address(config.name)} (peers): {e}")


if __name__ == "__main__":
    sys.exit(main())
