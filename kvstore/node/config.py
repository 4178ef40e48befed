"""``cluster.toml`` (docs/configuration.md): read, check, and turn into a ``NodeConfig``.

```toml
shards = 3                        # Paxos groups the key space is split into; default 1

[nodes.n1]
address = "tcp://127.0.0.1:7001"  # where clients connect
peer_address = "tcp://127.0.0.1:17001"  # optional: where peers connect (default: the
                                  # client port + 10000 on the same host)
data = "/var/lib/kvstore/n1"      # optional; --data overrides (relative: to this file)
gateway = "127.0.0.1:8080"        # optional: serve HTTP/JSON here too (docs/gateway.md);
                                  # --gateway overrides
metrics = "127.0.0.1:9100"        # optional: Prometheus /metrics, /healthz, /readyz here
                                  # (docs/operations.md); --metrics overrides

[watch]
history_bytes = 67108864          # optional: the watch history each node keeps, all shards
                                  # together (docs/watch.md); default 64 MiB
```

Clients and peers use separate ports (``kvstore.transport.sockets``): the
client port serves only client requests, the peer port only the peer protocol.

Every mistake is an ``InvalidArgument`` whose message names the file and the
field, so ``kvstore-server`` can print it as its one line before exiting 2.
"""

from __future__ import annotations

import os
import sys

from kvstore.errors import InvalidArgument
from kvstore.node.loop import NodeConfig
from kvstore.transport.members import NAME as _NAME
from kvstore.transport.members import is_tcp_address as _is_tcp_address
from kvstore.transport.sockets import derived_peer_address

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on older Pythons only
    import tomli as tomllib

MAX_SHARDS = 256


def read_toml(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise InvalidArgument(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise InvalidArgument(f"config file {path} is a directory") from None
    except OSError as e:
        raise InvalidArgument(f"cannot read config file {path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise InvalidArgument(f"{path} is not valid TOML: {e}") from None


def parse_cluster(doc: dict, path: str = "cluster.toml") -> tuple:
    """``(shards, {name: {"address", "peer_address", "data"}})`` from a parsed cluster.toml."""
    unknown = set(doc) - {"shards", "nodes", "security", "tuning", "watch"}
    if unknown:
        raise InvalidArgument(f"{path}: unknown setting(s) {', '.join(sorted(unknown))}")
    shards = doc.get("shards", 1)
    if isinstance(shards, bool) or not isinstance(shards, int) or not 1 <= shards <= MAX_SHARDS:
        raise InvalidArgument(f"{path}: shards must be an integer in 1..{MAX_SHARDS}, "
                              f"got {shards!r}")
    nodes = doc.get("nodes")
    if not isinstance(nodes, dict) or not nodes:
        raise InvalidArgument(f"{path}: no nodes; add a [nodes.NAME] table with an address "
                              f"for each node")
    out = {}
    seen = {}
    for name, table in nodes.items():
        if not _NAME.match(name):
            raise InvalidArgument(f"{path}: node name {name!r} must be 1-64 letters, digits, "
                                  f"'_', '.' or '-'")
        if not isinstance(table, dict):
            raise InvalidArgument(f"{path}: [nodes.{name}] must be a table")
        extra = set(table) - {"address", "peer_address", "data", "gateway", "metrics"}
        if extra:
            raise InvalidArgument(f"{path}: [nodes.{name}] has unknown setting(s) "
                                  f"{', '.join(sorted(extra))}")
        address = table.get("address")
        if not _is_tcp_address(address):
            raise InvalidArgument(f"{path}: [nodes.{name}] address must look like "
                                  f"\"tcp://127.0.0.1:7001\", got {address!r}")
        _claim_address(seen, address, name, path)
        peer_address = table.get("peer_address")
        if peer_address is None:
            try:
                peer_address = derived_peer_address(address)
            except ValueError as e:
                raise InvalidArgument(f"{path}: [nodes.{name}]: {e}") from None
        elif not _is_tcp_address(peer_address):
            raise InvalidArgument(f"{path}: [nodes.{name}] peer_address must look like "
                                  f"\"tcp://127.0.0.1:17001\", got {peer_address!r}")
        _claim_address(seen, peer_address, name, path, " (a peer address is the client port "
                       "+ 10000 unless peer_address is set)")
        data = table.get("data")
        if data is not None and (not isinstance(data, str) or not data):
            raise InvalidArgument(f"{path}: [nodes.{name}] data must be a directory path")
        gateway = table.get("gateway")
        if gateway is not None and (not isinstance(gateway, str) or not gateway):
            raise InvalidArgument(f"{path}: [nodes.{name}] gateway must look like "
                                  f"\"127.0.0.1:8080\", got {gateway!r}")
        metrics = table.get("metrics")
        if metrics is not None and (not isinstance(metrics, str) or not metrics):
            raise InvalidArgument(f"{path}: [nodes.{name}] metrics must look like "
                                  f"\"127.0.0.1:9100\", got {metrics!r}")
        out[name] = {"address": address, "peer_address": peer_address, "data": data,
                     "gateway": gateway, "metrics": metrics}
    return shards, out


def _claim_address(seen: dict, address: str, name: str, path: str, hint: str = "") -> None:
    """Record that node ``name`` listens on ``address`` (in ``seen``: address -> node);
    an ``InvalidArgument`` if another node, or this node's other port, has it already.
    Client and peer addresses share ``seen``: no two sockets of a cluster may bind one."""
    if address in seen:
        raise InvalidArgument(f"{path}: nodes {seen[address]} and {name} share the "
                              f"address {address}{hint}")
    seen[address] = name


def parse_security(doc: dict, path: str) -> str | None:
    """The Curve key directory of ``[security]`` (relative: to the config file), or None."""
    security = doc.get("security")
    if security is None:
        return None
    if not isinstance(security, dict):
        raise InvalidArgument(f"{path}: [security] must be a table")
    extra = set(security) - {"curve", "keys"}
    if extra:
        raise InvalidArgument(f"{path}: [security] has unknown setting(s) {', '.join(sorted(extra))}")
    curve = security.get("curve", False)
    if not isinstance(curve, bool):
        raise InvalidArgument(f"{path}: [security] curve must be true or false")
    if not curve:
        return None
    keys = security.get("keys")
    if not isinstance(keys, str) or not keys:
        raise InvalidArgument(f"{path}: [security] needs keys = \"DIR\" (written by `kvstore "
                              f"keygen DIR`)")
    if not os.path.isabs(keys):
        keys = os.path.join(os.path.dirname(os.path.abspath(path)), keys)
    from kvstore.transport.security import CurveKeys
    CurveKeys(keys, "node")  # every key file there and readable, or one clear error now
    return keys


#: ``[tuning]`` settings (all optional): timing and batching of every node.
TUNING = {"tick_ms": int, "election_timeout_ticks": int, "heartbeat_interval_ticks": int,
          "pipeline_window": int, "batch_commands_max": int, "snapshot_every_slots": int,
          "log_retain_slots": int, "lease_read_ticks": int, "snapshot_chunk_bytes": int,
          "busy_poll_us": int}
#: ``[tuning]`` settings that may be 0 (off).
TUNING_MAY_BE_ZERO = ("lease_read_ticks", "busy_poll_us")
#: The node's default election timeout, for checking a lease against it.
_ELECTION_TIMEOUT_TICKS_DEFAULT = 30


def parse_tuning(doc: dict, path: str) -> dict:
    table = doc.get("tuning", {})
    if not isinstance(table, dict):
        raise InvalidArgument(f"{path}: [tuning] must be a table")
    out = {}
    for k, v in table.items():
        if k not in TUNING:
            raise InvalidArgument(f"{path}: [tuning] has no setting {k!r} "
                                  f"(known: {', '.join(TUNING)})")
        least = 0 if k in TUNING_MAY_BE_ZERO else 1  # 0: lease reads, busy polling off
        if isinstance(v, bool) or not isinstance(v, int) or v < least:
            raise InvalidArgument(f"{path}: [tuning] {k} must be an integer >= {least}, got {v!r}")
        out[k] = v
    lease = out.get("lease_read_ticks")
    election = out.get("election_timeout_ticks", _ELECTION_TIMEOUT_TICKS_DEFAULT)
    if lease is not None and lease > election - 2:
        raise InvalidArgument(f"{path}: [tuning] lease_read_ticks must be at most election_timeout_ticks - 2 "
                              f"({election - 2}), less the clock drift between nodes over an election "
                              f"timeout; got {lease}")
    if "tick_ms" in out:
        out["tick_seconds"] = out.pop("tick_ms") / 1000.0
    return out


def parse_watch(doc: dict, path: str) -> dict:
    """``[watch]``: ``history_bytes``, the watch history a node keeps (all shards)."""
    table = doc.get("watch", {})
    if not isinstance(table, dict):
        raise InvalidArgument(f"{path}: [watch] must be a table")
    extra = set(table) - {"history_bytes"}
    if extra:
        raise InvalidArgument(f"{path}: [watch] has unknown setting(s) {', '.join(sorted(extra))} "
                              f"(known: history_bytes)")
    if "history_bytes" not in table:
        return {}
    v = table["history_bytes"]
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_HISTORY_BYTES:
        raise InvalidArgument(f"{path}: [watch] history_bytes must be an integer number of bytes "
                              f"in 0..{MAX_HISTORY_BYTES} (memory each node keeps for watchers; "
                              f"default 67108864 = 64 MiB), got {v!r}")
    return {"watch_history_bytes": v}


#: ``[watch] history_bytes`` at most (64 GiB): beyond is a typo, not a plan.
MAX_HISTORY_BYTES = 1 << 36


def load_node_config(path: str, node_id: str, data: str | None = None, **tuning) -> NodeConfig:
    """The ``NodeConfig`` of node ``node_id`` from the cluster file at ``path``."""
    doc = read_toml(path)
    shards, nodes = parse_cluster(doc, path)
    tuning = {**parse_tuning(doc, path), **parse_watch(doc, path), **tuning}
    tuning.setdefault("curve_keys", parse_security(doc, path))
    if node_id not in nodes:
        raise InvalidArgument(f"{path}: no node {node_id!r} (nodes: {', '.join(nodes)})")
    data_dir = data
    if data_dir is None:
        data_dir = nodes[node_id]["data"]
        if data_dir is not None and not os.path.isabs(data_dir):
            data_dir = os.path.join(os.path.dirname(os.path.abspath(path)), data_dir)
    if not data_dir:
        raise InvalidArgument(f"no data directory for node {node_id}: pass --data DIR or set "
                              f"data in [nodes.{node_id}] of {path}")
    # a node's bootstrap index is its place among the names sorted, as before membership
    # changes existed: a directory written then keeps its index
    names = sorted(nodes)
    return NodeConfig(name=node_id, names=names,
                      addresses={nm: nodes[nm]["address"] for nm in names},
                      peer_addresses={nm: nodes[nm]["peer_address"] for nm in names},
                      shards=shards, data_dir=os.path.abspath(data_dir), **tuning)


def join_settings(path: str) -> tuple | None:
    """A config file for a node that joins a running cluster (``join = "tcp://A,tcp://B"``
    at the top level, no ``[nodes]``: docs/operations.md, "Membership"): ``(addresses,
    settings)``, the settings being its ``[tuning]``, ``[watch]`` and ``[security]`` as
    ``NodeConfig`` fields; None for a file without ``join`` (a cluster.toml)."""
    doc = read_toml(path)
    if "join" not in doc:
        return None
    unknown = set(doc) - {"join", "security", "tuning", "watch"}
    if unknown:
        raise InvalidArgument(f"{path}: a file with join names how to reach the cluster only "
                              f"(join, [tuning], [watch], [security]), not "
                              f"{', '.join(sorted(unknown))}")
    join = doc["join"]
    if isinstance(join, list):
        join = ",".join(a for a in join if isinstance(a, str))
    if not isinstance(join, str) or not join or not all(
            _is_tcp_address(a.strip()) for a in join.split(",")):
        raise InvalidArgument(f"{path}: join must list client addresses like "
                              f"\"tcp://10.0.0.1:7001\", got {doc['join']!r}")
    settings = {**parse_tuning(doc, path), **parse_watch(doc, path),
                "curve_keys": parse_security(doc, path)}
    return join, settings


def node_gateway(path: str, node_id: str) -> str | None:
    """``[nodes.NAME] gateway``: where ``kvstore-server`` serves the HTTP gateway beside
    the node (``kvstore.gateway.serve.spawn``), or None."""
    _shards, nodes = parse_cluster(read_toml(path), path)
    return nodes[node_id]["gateway"] if node_id in nodes else None


def node_metrics(path: str, node_id: str) -> str | None:
    """``[nodes.NAME] metrics``: where ``kvstore-server`` serves its Prometheus metrics and
    health (``kvstore.ops.http``), or None."""
    _shards, nodes = parse_cluster(read_toml(path), path)
    return nodes[node_id]["metrics"] if node_id in nodes else None


def cluster_addresses(path: str) -> list:
    """Every node's client address in a cluster file (for clients and the CLI)."""
    _shards, nodes = parse_cluster(read_toml(path), path)
    return [nodes[nm]["address"] for nm in nodes]
