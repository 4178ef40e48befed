"""The deployment files (deploy/) are what they say: the Kubernetes manifests pass the
Kubernetes schemas and agree with their config, the compose file with its config, the
Dockerfile has the shape the docs promise, the systemd unit runs the node, and every
metric the Grafana dashboard queries is served by a real node.

Docker, kubectl and systemd are not on the test machines: the Dockerfile is checked
statically, the manifests by ``kubernetes-validate`` (the API's OpenAPI schemas)."""

from __future__ import annotations

import configparser
import json
import pathlib
import re
import shlex
import sys
import urllib.request

import pytest

yaml = pytest.importorskip("yaml")
from kvstore.node.config import parse_cluster  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
#: The Kubernetes version the manifests are validated against (strict: no unknown field).
KUBERNETES_VERSION = "1.29.0"

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def manifests() -> dict:
    docs = [d for d in yaml.safe_load_all((DEPLOY / "kubernetes" / "kvstore.yaml").read_text())
            if d]
    return {d["kind"]: d for d in docs}


def test_the_kubernetes_manifests_pass_the_schemas():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    found = manifests()
    assert set(found) == {"ConfigMap", "Service", "PodDisruptionBudget", "StatefulSet"}
    for kind, doc in found.items():
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)  # raises if not


def test_a_manifest_with_a_mistake_is_refused_by_the_check():
    """The check above can fail: a misspelt field is caught."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    sts = manifests()["StatefulSet"]
    sts["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(sts, KUBERNETES_VERSION, strict=True)


def test_the_statefulset_its_service_and_its_config_agree():
    m = manifests()
    sts, svc, pdb = m["StatefulSet"], m["Service"], m["PodDisruptionBudget"]
    spec = sts["spec"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    # a headless Service that publishes pods before they are ready (they must find each
    # other to become ready), named as the StatefulSet says
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"]
    assert spec["serviceName"] == svc["metadata"]["name"]
    assert spec["podManagementPolicy"] == "Parallel"  # OrderedReady would wait forever
    # the config names exactly the pods, at their stable DNS names
    config = tomllib.loads(m["ConfigMap"]["data"]["cluster.toml"])
    _shards, nodes = parse_cluster(config, "the ConfigMap's cluster.toml")
    name = sts["metadata"]["name"]
    pods = [f"{name}-{i}" for i in range(spec["replicas"])]
    assert sorted(nodes) == pods
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for pod_name, node in nodes.items():
        assert node["address"] == f"tcp://{pod_name}.{spec['serviceName']}:{ports['client']}"
        assert node["peer_address"].endswith(f":{ports['peer']}")
        assert node["metrics"] == f"0.0.0.0:{ports['metrics']}"
    # the pod's own name is its node id; data on its own volume
    args = container["args"]
    assert args[args.index("--id") + 1] == "$(POD_NAME)"
    assert {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} \
        in container["env"]
    mounts = {v["name"]: v["mountPath"] for v in container["volumeMounts"]}
    assert mounts["data"] == args[args.index("--data") + 1]
    assert [t["metadata"]["name"] for t in spec["volumeClaimTemplates"]] == ["data"]
    # probes on the metrics port: readiness /readyz, liveness /healthz
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["startupProbe"]["httpGet"] == container["livenessProbe"]["httpGet"]
    # not root; one node at a time may be disrupted
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0
    assert pdb["spec"]["maxUnavailable"] == 1
    labels = spec["template"]["metadata"]["labels"]
    for selector in (svc["spec"]["selector"], pdb["spec"]["selector"]["matchLabels"],
                     spec["selector"]["matchLabels"]):
        assert selector.items() <= labels.items()


def test_the_compose_file_runs_three_nodes_of_its_config_each_on_its_own_volume():
    compose = yaml.safe_load((DEPLOY / "compose" / "compose.yaml").read_text())
    _shards, nodes = parse_cluster(tomllib.loads((DEPLOY / "compose" / "cluster.toml")
                                                 .read_text()), "compose/cluster.toml")
    services = compose["services"]
    assert sorted(services) == sorted(nodes) and len(nodes) == 3
    volumes = set()
    for name, service in services.items():
        command = service["command"]
        assert command[command.index("--id") + 1] == name
        assert nodes[name]["address"] == f"tcp://{name}:7001" and service["hostname"] == name
        config_mount, data_mount = service["volumes"]
        assert config_mount == "./cluster.toml:" + command[command.index("--config") + 1] + ":ro"
        volume, path = data_mount.split(":")
        assert path == nodes[name]["data"] and volume in compose["volumes"]
        volumes.add(volume)
        assert "/healthz" in " ".join(service["healthcheck"]["test"])
        assert service["build"]["dockerfile"] == "deploy/Dockerfile"
        assert (DEPLOY / "compose" / service["build"]["context"] / "deploy" / "Dockerfile").is_file()
    assert len(volumes) == 3


def _instructions(dockerfile: str) -> list:
    """``(INSTRUCTION, arguments)`` per instruction: comments dropped, continuations joined."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in dockerfile.splitlines()
                                          if not line.lstrip().startswith("#")))
    return [tuple(line.strip().split(None, 1)) for line in text.splitlines() if line.strip()]


def test_the_dockerfile_is_multi_stage_non_root_with_a_data_volume_and_a_healthcheck():
    """A static check (Docker is not available to the tests): the shape, and that what it
    copies from the build context exists."""
    steps = _instructions((DEPLOY / "Dockerfile").read_text())
    froms = [i for i, (op, _args) in enumerate(steps) if op == "FROM"]
    assert len(froms) == 2 and steps[froms[0]][1].endswith(" AS build")
    final = steps[froms[-1]:]
    assert any(op == "COPY" and args.startswith("--from=build ") for op, args in final)
    (user,) = [args for op, args in final if op == "USER"]
    assert user.split(":")[0] not in ("0", "root")
    assert [args for op, args in final if op == "VOLUME"] == ['["/var/lib/kvstore"]']
    (health,) = [args for op, args in final if op == "HEALTHCHECK"]
    assert "/healthz" in health
    (entry,) = [json.loads(args) for op, args in final if op == "ENTRYPOINT"]
    (cmd,) = [json.loads(args) for op, args in final if op == "CMD"]
    assert entry == ["kvstore-server"] and "--metrics" in cmd and "--data" in cmd
    assert cmd[cmd.index("--data") + 1] == "/var/lib/kvstore"
    for op, args in steps[:froms[1]]:
        if op == "COPY" and not args.startswith("--from"):
            for source in args.split()[:-1]:
                assert (ROOT / source).exists(), source


def test_the_systemd_unit_runs_a_node_as_its_own_user():
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.optionxform = str
    unit.read_string((DEPLOY / "systemd" / "kvstore-server@.service").read_text())
    service = unit["Service"]
    argv = shlex.split(service["ExecStart"])
    assert argv[0].endswith("/kvstore-server") and argv[argv.index("--id") + 1] == "%i"
    assert service["User"] == "kvstore" and service["Restart"] == "on-failure"
    assert service["RestartPreventExitStatus"] == "2"  # a config error: restarting cannot help
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def _dashboard_metrics() -> set:
    dashboard = json.loads((DEPLOY / "grafana" / "kvstore.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"]
              if isinstance(v.get("query"), dict)]
    assert exprs
    return {name for e in exprs for name in re.findall(r"\bkvstore_[a-z0-9_]+", e)}


def test_every_metric_the_dashboard_uses_is_served_by_a_real_node(tmp_path):
    pytest.importorskip("prometheus_client")
    from prometheus_client.parser import text_string_to_metric_families
    from kvstore.server.local import LocalCluster
    used = _dashboard_metrics()
    with LocalCluster(str(tmp_path), 1, 1, metrics=True) as lc:
        lc.start_all()
        lc.wait_ready(60)
        address = lc.metrics_addresses["n1"]
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as r:
            served = {s.name for f in text_string_to_metric_families(r.read().decode())
                      for s in f.samples}
    assert "kvstore_request_duration_seconds_bucket" in used
    assert used <= served, f"the dashboard queries what no node serves: {used - served}"
