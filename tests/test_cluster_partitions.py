"""Real network partitions between real ``kvstore-server`` processes.

Each test runs one scenario of ``tests/partition_driver.py`` inside a private
network namespace (``unshare --net``: its own loopback, nothing outside it
touched), each node as its own uid, nftables dropping what one node's uid sends to
another node's ports. Register and bank clients run throughout (never cut off);
the cut is healed, every node must catch up, then everything is SIGKILLed and
restarted. The history must be linearizable, every audit must see the bank's
total, no acknowledged write or transfer may be lost, a watcher must be given every
acknowledged write exactly once, in order, a lease-held key must outlive neither end
of its lease's bounds, and the cluster must serve
while cut (a majority is up) and after the heal without a healthy leader deposed.

Needs root, ``unshare``, ``nft`` (package nftables), ``setpriv`` and ``ip``; the
tests skip, saying which is missing, where they are not there.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess

import pytest

from conftest import PYTHON, child_env

pytestmark = pytest.mark.timeout(180)

DRIVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "partition_driver.py")
#: The driver ends itself after its own deadline (100 s); this is the guard behind it.
DRIVER_TIMEOUT_SECONDS = 150


def missing_support() -> str | None:
    """Why partitions cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root: a network namespace, nftables rules and a uid per node"
    for tool, package in (("unshare", "util-linux"), ("setpriv", "util-linux"),
                          ("ip", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (package {package})"
    probe = ("ip link set lo up && nft add table inet kvstore_probe && "
             "setpriv --reuid=40001 --regid=40001 --clear-groups --inh-caps=+dac_read_search "
             "--ambient-caps=+dac_read_search -- true")
    try:
        p = subprocess.run(["unshare", "--net", "--", "sh", "-c", probe], capture_output=True,
                           text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "probing a network namespace with nftables timed out"
    if p.returncode != 0:
        return f"cannot make a network namespace with nftables here: {p.stderr.strip()}"
    return None


@pytest.fixture(scope="module")
def partitions_supported() -> None:
    reason = missing_support()
    if reason:
        pytest.skip(reason)


def run_scenario(name: str, directory) -> dict:
    """The driver's JSON result for scenario ``name``; its process group is always killed.

    The seed (of the flapping schedule and the clients' choices) is random, printed and
    in every failure; ``KVSTORE_PARTITION_SEED`` runs one again (the timing of real
    processes is not replayed, the schedule is).
    """
    seed = int(os.environ.get("KVSTORE_PARTITION_SEED", str(random.randrange(1 << 30))))
    print(f"partition scenario {name} seed {seed}")
    p = subprocess.Popen(["unshare", "--net", "--", PYTHON, DRIVER, name, str(directory),
                          "--seed", str(seed)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=child_env(), start_new_session=True)
    try:
        out, err = p.communicate(timeout=DRIVER_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate(timeout=30)
        pytest.fail(f"the {name} driver did not end within {DRIVER_TIMEOUT_SECONDS} s "
                    f"(logs in {directory}):\n{err[-4000:]}")
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # whatever the driver left (it kills its nodes)
        except ProcessLookupError:
            pass
    print(err)
    assert p.returncode == 0 and out.strip(), \
        f"the {name} driver exited {p.returncode} without a result:\n{err[-4000:]}"
    return json.loads(out.strip().splitlines()[-1])


def check(result: dict, rejoined: str | None = None, evidence: dict | None = None) -> None:
    """What every scenario must show, a healthy leader left in place after the heal among
    it (a pre-vote grant the partition held once deposed it: ``rejoined``, the node that
    was cut off, is named in the failure if it campaigned after the heal;
    ``tests/test_paxos_stale_prevote.py``)."""
    logs = "\n".join(f"--- {n} (last lines)\n{t}" for n, t in result.get("node_logs", {}).items())
    events = "\n".join(f"{t:8.3f} {what}" for t, what in result.get("events", []))
    where = (f"(scenario {result['scenario']}, KVSTORE_PARTITION_SEED={result['seed']}, "
             f"node logs in the test's tmp_path)\n{events}\n{logs}")
    assert result["error"] is None, f"{result['error']} {where}\n{result.get('traceback')}"
    assert result["cut_took_effect"], f"the partition did not show in the cluster {where}: {result}"
    if evidence is not None:
        assert result["cut_evidence"] == evidence, f"{result['cut_evidence']} {where}"
    assert not result["register_failures"], result["register_failures"]
    assert result["linearizable"], \
        f"not linearizable on key {result['nonlinearizable_key']} {where}:\n{result['explanation']}"
    assert result["register_ops"]["completed"] > 100, result["register_ops"]
    assert not result["bank_problems"], result["bank_problems"]
    assert result["transfers"]["acknowledged"] > 0 and result["transfers"]["audits"] > 0, \
        result["transfers"]
    assert not result["bank_final_problems"], result["bank_final_problems"]
    # the watcher (exactly once, in order) and the lease holders (never early, not late)
    assert not result["watch_problems"], result["watch_problems"]
    assert result["watch_events"] > 0
    assert not result["lease_problems"], result["lease_problems"]
    assert result["leases_timed"] > 0, result
    changed = result["leaders_changed_after_heal"]
    campaigned = result["campaigns_after_heal"].get(rejoined) if rejoined is not None else None
    assert changed == {}, (f"a leader was deposed after the heal {where}: {changed}; the node "
                           f"cut off campaigned after the heal: {campaigned}")


def test_a_follower_cut_off_both_ways_catches_up_without_deposing_anyone(
        partitions_supported, tmp_path):
    result = run_scenario("both_ways", tmp_path / "both_ways")
    check(result)


def test_one_way_cuts_a_follower_deaf_then_the_leader_deaf(partitions_supported, tmp_path):
    result = run_scenario("one_way", tmp_path / "one_way")
    check(result, rejoined=result.get("deaf_node"),
          evidence={"follower_stood_still_on_shard_0": True, "shard_0_leader_moved": True})


def test_flapping_links_keep_the_history_linearizable(partitions_supported, tmp_path):
    result = run_scenario("flapping", tmp_path / "flapping")
    check(result)
    assert result["flaps"] >= 5


def test_a_leader_cut_off_while_holding_writes_is_replaced_and_rejoins_as_follower(
        partitions_supported, tmp_path):
    result = run_scenario("leader_isolated", tmp_path / "leader_isolated")
    check(result)
    held = result["requests_held_by_cut_leader"]
    assert held["writes to shard 0"] + held["reads"] > 0, held
    assert result["new_leader_of_shard_0"] is not None
