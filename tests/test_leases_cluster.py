"""Leases and TTLs on real ``kvstore-server`` processes (3 nodes, 2 shards, 10 ms ticks, an
election timeout of 300 ms): a lease-held key vanishes after its holder process is
SIGKILLed, never before the ttl from its last keep-alive and within ttl + one election
timeout (+ slack for a loaded machine), also when the shard's leader is killed meanwhile;
a keep-alive keeps it; ttl puts; the asyncio lease; the CLI; forged lease commands.

Every wait is bounded; every process is killed at teardown."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time

import pytest

import kvstore
import kvstore.aio
from kvstore import commands
from kvstore.server.local import LocalCluster
from kvstore.sharding import shard_of
from kvstore.transport import wire
from conftest import child_env

pytestmark = pytest.mark.timeout(120)

SHARDS = 2
TUNING = {"tick_ms": 10, "election_timeout_ticks": 30}
ELECTION_TIMEOUT = 0.3
TTL = 1.0
#: Beyond ttl + one election timeout: a tick, a commit, the reader's own failover, on a
#: 2-core machine shared with other test runs.
SLACK = 1.0

HOLDER = r"""
import sys, time, kvstore
db = kvstore.connect(sys.argv[1].split(","), timeout=5.0)
lease = db.lease(float(sys.argv[2]))
for key in sys.argv[3:]:
    db.put(key.encode(), b"held", lease=lease)
print("ready", lease.id, flush=True)
while True:
    sent = time.monotonic()
    lease.keepalive()
    print("kept", sent, flush=True)
    time.sleep(0.05)
"""


def start_cluster(directory) -> LocalCluster:
    lc = LocalCluster(str(directory), 3, SHARDS, env=child_env(), tuning=TUNING)
    try:
        lc.start_all()
        lc.wait_ready()
    except BaseException:
        lc.close()
        raise
    return lc


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    lc = start_cluster(tmp_path_factory.mktemp("leases"))
    try:
        yield lc
    finally:
        lc.close()


def key_of_shard(shard: int, tag: bytes) -> bytes:
    return next(k for k in (tag + b"%d" % i for i in range(1000)) if shard_of(k, SHARDS) == shard)


class Holder:
    """A process holding a lease on keys of both shards, keeping it alive every 50 ms."""

    def __init__(self, lc: LocalCluster, keys: list) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, ",".join(lc.address_list), str(TTL),
             *[k.decode() for k in keys]], stdout=subprocess.PIPE, text=True, env=child_env())
        self.last_kept = None
        self.ready = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        assert self.ready.wait(30), "the holder did not get its lease"

    def _read(self) -> None:
        for line in self.proc.stdout:
            words = line.split()
            if len(words) != 2 or not line.endswith("\n"):
                continue  # a line cut by the SIGKILL
            if words[0] == "ready":
                self.ready.set()
            else:
                self.last_kept = float(words[1])

    def kill(self) -> float:
        self.proc.kill()
        self.proc.wait(10)
        self.reader.join(10)
        return time.monotonic()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def all_gone(c, keys: list, until: float) -> float:
    """Poll until every key reads as absent: when that read returned. A read that
    still finds one, begun after ``until`` (monotonic), fails: it was not deleted in time.
    (A read takes effect between its start and its return: a read that returns None
    proves the deletion came before its return, one that finds the key that it came
    after its start.)"""
    while True:
        started = time.monotonic()
        if all(c.get(k) is None for k in keys):
            return time.monotonic()
        assert started < until, f"{keys} still there {started - until:.3f} s past the bound"
        time.sleep(0.02)


def holder_dies(lc: LocalCluster, tag: bytes, kill_leader: bool) -> None:
    keys = [key_of_shard(0, tag), key_of_shard(1, tag)]
    holder = Holder(lc, keys)
    try:
        with lc.client() as c:
            kept_until = time.monotonic() + 2 * TTL
            while time.monotonic() < kept_until:  # kept alive well past its ttl
                assert all(c.get(k) == b"held" for k in keys)
                time.sleep(0.05)
            killed = holder.kill()
            last_kept = holder.last_kept
            assert last_kept is not None and last_kept <= killed
            if kill_leader:
                leader = lc.wait_ready()["shards"][0]["leader"]
                lc.kill(leader)
            gone = all_gone(c, keys, killed + TTL + ELECTION_TIMEOUT + SLACK)
            assert gone >= last_kept + TTL, f"expired {last_kept + TTL - gone:.3f} s early"
            print(f"cluster expiry{' (leader killed)' if kill_leader else ''}: keys gone "
                  f"{1000 * (gone - killed - TTL):.0f} ms after kill + ttl")
    finally:
        holder.close()


def test_a_dead_holders_keys_vanish_after_the_ttl(shared):
    holder_dies(shared, b"held", kill_leader=False)


def test_a_dead_holders_keys_vanish_when_the_shard_leader_dies_too(tmp_path):
    lc = start_cluster(tmp_path / "c")
    try:
        holder_dies(lc, b"held", kill_leader=True)
    finally:
        lc.close()


def deleted_in_history(c, address: str, shard: int, key: bytes, timeout: float = 10.0) -> bool:
    """Whether the node at ``address`` reports the deletion of ``key`` in its watch history
    (a raw OP_WATCH poll: the expiry is a delete event like any other)."""
    deadline = time.monotonic() + timeout
    position = 1
    while time.monotonic() < deadline:
        events, _oldest, through, _current = c._core.call(
            wire.OP_WATCH, shard, [shard, key, key + b"\x00", position, 1 << 20, 500, True],
            target=address)
        for _revision, changes in events or ():
            if any(kind == 1 and k == key for kind, k, _value, _prev in changes):
                return True
        position = through + 1
    return False


def test_ttl_put_and_revoke_over_the_cluster(shared):
    with shared.client() as c:
        before = time.monotonic()
        c.put(b"ttl", b"v", ttl=0.5)
        after = time.monotonic()
        gone = all_gone(c, [b"ttl"], after + 0.5 + ELECTION_TIMEOUT + SLACK)
        assert gone >= before + 0.5
        print(f"cluster ttl expiry: {1000 * (gone - after - 0.5):.0f} ms after the ttl")
        shard = shard_of(b"ttl", SHARDS)
        for address in shared.address_list:  # every node's watch history has the delete
            assert deleted_in_history(c, address, shard, b"ttl"), address
        lease = c.lease(30)
        keys = [key_of_shard(0, b"r"), key_of_shard(1, b"r")]
        for k in keys:
            c.put(k, b"v", lease=lease)
        c.put(keys[1], b"mine")  # detached: lives on
        assert lease.revoke() == 1
        assert [c.get(k) for k in keys] == [None, b"mine"]
        with pytest.raises(kvstore.LeaseExpired):
            c.put(keys[0], b"v", lease=lease)
        with pytest.raises(kvstore.LeaseExpired):
            lease.keepalive()


def test_forged_lease_commands_are_refused_and_change_nothing(shared):
    with shared.client() as c:
        lease = c.lease(30)
        c.put(b"forged", b"v", lease=lease)
        for bad in ([commands.OP_LEASE_EXPIRE, lease.id, 0],  # only a leader writes these
                    [commands.OP_LEASE_GRANT, 0, 1000], [commands.OP_LEASE_GRANT, 1, 0],
                    [commands.OP_LEASE_GRANT, 1, commands.TTL_MS_MAX + 1],
                    [commands.OP_LEASE_REVOKE, 1 << 63], [commands.OP_PUT_LEASE, b"k", b"v", -1],
                    [commands.OP_PUT_TTL, b"k", b"v", 1.5]):
            with pytest.raises(kvstore.InvalidArgument):
                c._core.call(wire.OP_WRITE, shard_of(b"forged", SHARDS), bad)
        assert c.get(b"forged") == b"v"
        lease.keepalive()
        lease.revoke()


def test_asyncio_lease_kept_alive_by_a_task_then_revoked(shared):
    async def main():
        async with await kvstore.aio.connect(shared.address_list) as db:
            async with await db.lease(0.5) as lease:
                await db.put(b"aio", b"v", lease=lease)
                await asyncio.sleep(1.5)  # three ttls: its task keeps it alive
                assert await db.get(b"aio") == b"v" and lease.active
            assert await db.get(b"aio") is None  # revoked on leaving the block
            with pytest.raises(kvstore.LeaseExpired):
                await db.put(b"aio", b"v", lease=lease)
            await db.put(b"aio-ttl", b"v", ttl=30)
            assert await db.get(b"aio-ttl") == b"v"
    asyncio.run(main())


def test_cli_lease_grant_put_and_revoke(shared):
    env = child_env()
    cli = [sys.executable, "-m", "kvstore.cli", "--cluster", ",".join(shared.address_list)]

    def run(*args):
        return subprocess.run(cli + list(args), capture_output=True, text=True, env=env,
                              timeout=30)
    granted = run("lease", "grant", "30")
    assert granted.returncode == 0, granted.stderr
    lease_id = granted.stdout.strip()
    assert run("put", "cli-a", "1", "--lease", lease_id).returncode == 0
    assert run("put", "cli-b", "2", "--ttl", "30").returncode == 0
    assert run("get", "cli-a").stdout == "1\n"
    revoked = run("lease", "revoke", lease_id)
    assert (revoked.returncode, revoked.stdout) == (0, "1\n")
    assert run("get", "cli-a").returncode == 1
    assert run("put", "cli-a", "1", "--lease", lease_id).returncode == 2
    assert run("lease", "keepalive", lease_id).returncode == 1  # gone: exits at once
