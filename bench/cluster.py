"""A 3-node cluster on 127.0.0.1: durable put and linearizable get throughput and latency.

The servers are ``kvstore-server`` processes (``LocalCluster``); the load
comes from this process through the asyncio client (``kvstore.aio``) with 1,
16, 64 and 256 requests in flight; 16-byte keys, 128-byte values. Each row
reports ops/s, p50/p99 latency, and the CPU share (1.0 = one core) of the
client process and of each server over the row: on a 2-core machine that
says who the bottleneck is. The floor it is measured against, on the
same machine in the same run: one fdatasync of a small write in the data
directory's file system, plus one ZeroMQ round trip over loopback. When
``pysyncobj`` is installed (the ``[bench]`` extra), PySyncObj's 3-node
``ReplDict`` runs the same put load in the same run (it never fsyncs).

Then the same load against an embedded replica: a second 3-node cluster
whose node n1 is ``kvstore.open(dir, node_id="n1", cluster=...)`` inside
this process (n2 and n3 are ``kvstore-server`` processes), made to lead the
shard(s) under test (only keys of the shards it leads are used). The load
runs in the same process as that node, through the asyncio interface
wrapped around the embedded replica's own ``KV`` (``kvstore.aio.AsyncKV``):
one event loop thread, the client engine's I/O thread and the node's loop
thread share the process (requests reach the node over loopback ZeroMQ,
as ``server_embedded`` documents). Its CPU share is that whole process.

    python bench/cluster.py                # full run, writes bench/results/cluster.json
    python bench/cluster.py --quick        # smoke run
    python bench/cluster.py --no-embedded  # skip the embedded replica's rows
    python bench/cluster.py --metrics      # also: puts/s without and with --metrics
    python bench/cluster.py --etcd-only    # only the same-sitting table against etcd
                                           # (bench/results/cluster_etcd.json)

``--metrics`` measures what a node's Prometheus endpoint costs (``kvstore-server
--metrics``): in the same run, alternating rounds (ABBA) on fresh clusters, plain ones
and ones whose nodes serve ``/metrics`` and are scraped every second (a busy Prometheus
scrapes every 15 s), puts at each concurrency; the median ops/s of each side and their
ratio. ``--metrics-only`` runs that alone (bench/results/cluster_metrics.json).

First of all, kvstore beside etcd 3.4 in the same sitting (``versus_etcd``, where
``etcd`` is installed; skipped, said so, where it is not): three members each,
never both at once, the same rows (durable puts and linearizable gets with 256
and 1 in flight through each asyncio client; put and get one after the other
through each blocking client), ``--etcd-rounds`` interleaved rounds, the best of
them per figure, and the ratios kvstore / etcd. etcd is reached over gRPC (the
``grpcio`` of the ``[bench]`` extra; its JSON gateway without it), the clients on
its leader. Three more rows in each sitting: the blocking put and get with one
follower stopped (SIGSTOP; the leader and the other follower are a majority), which
shows what the second follower's share of the two cores costs a lone request here
(``PAUSED_ROWS``), and kvstore's get with lease reads on (a cluster with ``[tuning]
lease_read_ticks = 20``) beside etcd's read-index get (``LEASE_ROW``).

Last, the profiles of one put and one get at a time (``profile_lone_put``,
``profile_lone_get``): where their time goes on the leader, from timing
wrappers on an embedded leader's ``Node`` instance and a client process on
the same clock; and a follower's turn for each of those puts
(``profile_follower_put``: the embedded replica follows).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import bare_pipeline  # noqa: E402  (bench/bare_pipeline.py, beside this script)
import figures  # noqa: E402  (bench/figures.py, beside this script)
from figures import cpu_seconds  # noqa: E402

import kvstore  # noqa: E402
import kvstore.aio  # noqa: E402
from kvstore.server.local import LocalCluster  # noqa: E402

KEY_BYTES = 16
VALUE_BYTES = 128


def percentile(values: list, p: float) -> float:
    """The ``p`` th percentile (0 to 100): ``figures.percentile``'s rank."""
    return figures.percentile(values, p / 100)


def fsync_floor(directory: str, n: int = 200) -> float:
    """Median seconds of one 128-byte write + fdatasync."""
    path = os.path.join(directory, "fsync-probe")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    times = []
    try:
        for i in range(n):
            t = time.perf_counter()
            os.pwrite(fd, b"x" * VALUE_BYTES, (i % 64) * 4096)
            os.fdatasync(fd)
            times.append(time.perf_counter() - t)
    finally:
        os.close(fd)
        os.unlink(path)
    return statistics.median(times)


def loopback_floor(n: int = 2000) -> float:
    """Median seconds of one ZeroMQ DEALER -> ROUTER -> DEALER round trip on 127.0.0.1."""
    import zmq
    from kvstore.server.local import free_port
    ctx = zmq.Context()
    address = f"tcp://127.0.0.1:{free_port()}"
    router = ctx.socket(zmq.ROUTER)
    router.bind(address)
    stop = threading.Event()

    def echo():
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        while not stop.is_set():
            if poller.poll(50):
                router.send_multipart(router.recv_multipart())

    t = threading.Thread(target=echo, daemon=True)
    t.start()
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(address)
    times = []
    try:
        for _ in range(n):
            s = time.perf_counter()
            dealer.send(b"x" * 64)
            dealer.recv()
            times.append(time.perf_counter() - s)
    finally:
        stop.set()
        t.join(2)
        dealer.close(0)
        router.close(0)
        ctx.term()
    return statistics.median(times[n // 10:])


async def load(db, kind: str, in_flight: int, seconds: float, keys: list, value: bytes,
               servers: list = ()) -> dict:
    """``in_flight`` coroutines calling ``db`` for ``seconds``: the row (ops/s, p50/p99,
    the CDF, this process's CPU per call and, with ``servers``, the members')."""
    latencies: list = []
    deadline = time.perf_counter() + seconds
    nkeys = len(keys)

    async def worker(w: int) -> None:
        i = w
        while time.perf_counter() < deadline:
            key = keys[i % nkeys]
            i += in_flight
            t = time.perf_counter()
            if kind == "put":
                await db.put(key, value)
            else:
                await db.get(key)
            latencies.append(time.perf_counter() - t)

    cpu = CpuMeter(servers)
    start = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(in_flight)))
    return load_row(kind, in_flight, latencies, time.perf_counter() - start, cpu)


class CpuMeter:
    """CPU seconds spent since it was made: this process's (every thread: the client's
    I/O thread, grpc's) and, summed, the ``servers``' (the members' pids)."""

    def __init__(self, servers: list = ()) -> None:
        self.servers = servers
        self.start = (cpu_seconds(), sum(cpu_seconds(pid) for pid in servers))

    def per_call(self, calls: int) -> dict:
        """The microseconds of each per call since: ``client_cpu_us_per_op`` and, with
        servers, ``servers_cpu_us_per_op``."""
        client = cpu_seconds() - self.start[0]
        out = {"client_cpu_us_per_op": round(client / max(1, calls) * 1e6, 1)}
        if self.servers:
            servers = sum(cpu_seconds(pid) for pid in self.servers) - self.start[1]
            out["servers_cpu_us_per_op"] = round(servers / max(1, calls) * 1e6, 1)
        return out


def load_row(kind: str, in_flight: int, latencies: list, elapsed: float, cpu: CpuMeter) -> dict:
    """A row of ``load`` or ``sequential``: ops/s, the CPU per call, p50/p99 and the CDF."""
    latencies.sort()
    return {"op": kind, "in_flight": in_flight, "ops": len(latencies),
            "ops_per_s": round(len(latencies) / elapsed, 1),
            **cpu.per_call(len(latencies)),
            "p50_ms": round(percentile(latencies, 50) * 1e3, 3),
            "p99_ms": round(percentile(latencies, 99) * 1e3, 3),
            # the latency CDF, for a plot: percentile -> ms
            "cdf_ms": {str(q): round(percentile(latencies, q) * 1e3, 3)
                       for q in (1, 5, 10, 25, 50, 75, 90, 95, 99, 99.9)}}


def bench_keys(nshards: int = 1, shards=None) -> list:
    """10,000 16-byte keys, only of ``shards`` (all when None)."""
    from kvstore.sharding import shard_of
    keys, i = [], 0
    while len(keys) < 10_000:
        k = b"%016d" % i
        i += 1
        if shards is None or nshards == 1 or shard_of(k, nshards) in shards:
            keys.append(k)
    return keys


async def run_rows(db, keys: list, concurrency: list, seconds: float, server_pids: dict,
                   self_label: str = "client") -> list:
    """Puts then gets at each concurrency on ``db`` (an ``AsyncKV``); CPU shares of this
    process (``self_label``) and of each server pid over each row."""
    value = os.urandom(VALUE_BYTES)
    rows = []
    for kind in ("put", "get"):
        for c in concurrency:
            before = {n: cpu_seconds(p) for n, p in server_pids.items()}
            client_before, t = cpu_seconds(), time.perf_counter()
            row = await load(db, kind, c, seconds, keys, value)
            elapsed = time.perf_counter() - t
            row["cpu_share"] = {self_label: round((cpu_seconds() - client_before) / elapsed, 2)}
            for n, p in server_pids.items():
                row["cpu_share"][n] = round((cpu_seconds(p) - before[n]) / elapsed, 2)
            rows.append(row)
            cpu = " ".join(f"{k} {v:.0%}" for k, v in row["cpu_share"].items())
            print(f"{kind:4} in flight {c:4}: {row['ops_per_s']:>10,.0f} ops/s   "
                  f"p50 {row['p50_ms']:7.3f} ms   p99 {row['p99_ms']:7.3f} ms   cpu: {cpu}",
                  flush=True)
    return rows


async def run_load(addresses: list, concurrency: list, seconds: float, server_pids: dict) -> list:
    async with await kvstore.aio.connect(addresses, timeout=30) as db:
        return await run_rows(db, bench_keys(), concurrency, seconds, server_pids)


def _scrape_every(addresses: list, every: float, stop: threading.Event) -> None:
    """Fetch every node's /metrics each ``every`` seconds until ``stop`` (a scraper)."""
    import urllib.request
    while not stop.wait(every):
        for a in addresses:
            with urllib.request.urlopen(f"http://{a}/metrics", timeout=5) as r:
                r.read()


def _started_cluster(directory: str, shards: int, metrics: bool, attempts: int = 3,
                     tuning: dict | None = None):
    """A started, ready 3-node LocalCluster; on a shared machine another process may take
    one of its free ports before a node binds it: then again on fresh ports (bounded)."""
    for attempt in range(attempts):
        lc = LocalCluster(f"{directory}-{attempt}", 3, shards, metrics=metrics, tuning=tuning)
        try:
            lc.start_all()
            lc.wait_ready(timeout=60)
            return lc
        except kvstore.KVError as e:
            lc.close()
            if attempt == attempts - 1 or "already in use" not in str(e):
                raise
            print(f"  (a port was taken meanwhile, again on others: {str(e)[-80:]})")
    raise AssertionError("unreachable")


def compare_metrics(base: str, shards: int, concurrency: list, seconds: float,
                    rounds: int) -> dict:
    """Put ops/s on a plain cluster and on one serving --metrics (scraped every second),
    ``rounds`` alternating rounds each, same run: the medians and their ratio."""
    results: dict = {"plain": {c: [] for c in concurrency}, "metrics": {c: [] for c in concurrency}}
    print("\nputs without and with --metrics (scraped every 1 s), alternating rounds:")
    for round_ in range(rounds):
        # ABBA: each side goes first in every other round (the disk and the neighbours'
        # load drift over a run)
        for side in ("plain", "metrics") if round_ % 2 == 0 else ("metrics", "plain"):
            lc = _started_cluster(os.path.join(base, f"{side}-{round_}"), shards,
                                  metrics=side == "metrics")
            stop = threading.Event()
            scraper = None
            try:
                if side == "metrics":
                    scraper = threading.Thread(target=_scrape_every, daemon=True, args=(
                        list(lc.metrics_addresses.values()), 1.0, stop))
                    scraper.start()

                async def puts() -> list:
                    async with await kvstore.aio.connect(lc.address_list, timeout=30) as db:
                        value = os.urandom(VALUE_BYTES)
                        return [await load(db, "put", c, seconds, bench_keys(), value)
                                for c in concurrency]
                for row in asyncio.run(puts()):
                    results[side][row["in_flight"]].append(row["ops_per_s"])
            finally:
                stop.set()
                if scraper is not None:
                    scraper.join(10)
                lc.stop_all()
                lc.close()
    summary = []
    for c in concurrency:
        plain = statistics.median(results["plain"][c])
        with_metrics = statistics.median(results["metrics"][c])
        summary.append({"in_flight": c, "plain_ops_per_s": plain,
                        "metrics_ops_per_s": with_metrics,
                        "ratio": round(with_metrics / plain, 3) if plain else None,
                        "rounds": {k: results[k][c] for k in results}})
        print(f"put  in flight {c:4}: {plain:>10,.0f} ops/s plain   {with_metrics:>10,.0f} "
              f"ops/s with --metrics   ratio {with_metrics / plain:.3f}", flush=True)
    return {"rounds": rounds, "scrape_every_s": 1.0, "rows": summary}


def lead_from_embedded(lc: LocalCluster, db, want: int = 1, timeout: float = 60.0) -> list:
    """Wait until the embedded node n1 leads ``want`` shard(s) (every shard if fewer);
    while another node leads a shard n1 does not, restart that server so that n1 may
    win the next election. The shards n1 leads."""
    deadline = time.monotonic() + timeout
    want = min(want, lc.shards)
    while True:
        st = db.status()
        leaders = [s["leader"] for s in st["shards"]]
        mine = [s for s, leader in enumerate(leaders) if leader == "n1"]
        if len(mine) >= want and None not in leaders:
            return mine
        if time.monotonic() > deadline:
            raise RuntimeError(f"the embedded node n1 did not come to lead {want} shard(s) "
                               f"within {timeout} s (leaders: {leaders})")
        if None not in leaders:
            other = next(nm for nm in leaders if nm != "n1")
            lc.kill(other, signal.SIGTERM)
            lc.start(other)
        time.sleep(0.2)  # a status poll: leadership is no event this process can await


def run_embedded(base: str, shards: int, concurrency: list, seconds: float) -> dict:
    """The same load inside the process of an embedded replica leading the shard(s) under
    test: n1 here (``kvstore.open(..., node_id="n1", cluster=...)``), n2 and n3 servers."""
    lc = LocalCluster(os.path.join(base, "embedded"), 3, shards)
    db = None
    try:
        # n1 first: it campaigns while the servers are still starting, so it usually leads.
        db = kvstore.open(os.path.join(lc.directory, "n1"), node_id="n1",
                          cluster=lc.config_path)
        lc.start("n2")
        lc.start("n3")
        led = lead_from_embedded(lc, db, want=max(1, shards // 3))
        pids = {n: p.pid for n, p in lc.procs.items()}
        keys = bench_keys(shards, set(led))
        print(f"\nembedded replica n1 in this process, leading shard(s) {led} of {shards}; "
              f"the load through kvstore.aio.AsyncKV over its KV, in this process:")

        async def go() -> list:
            return await run_rows(kvstore.aio.AsyncKV(db), keys, concurrency, seconds, pids,
                                  self_label="n1+load")

        rows = asyncio.run(go())
    finally:
        if db is not None:
            db.close()
        lc.stop_all()
        lc.close()
    return {"node": "n1", "leads_shards": led,
            "load": "kvstore.aio.AsyncKV over the embedded replica's KV, one asyncio event "
                    "loop in the node's own process",
            "rows": rows}


LONE_PUT_CLIENT = r"""
import json, os, sys, time
import kvstore
n = int(sys.argv[2])
value = os.urandom(128)
out = []
with kvstore.connect([sys.argv[1]], timeout=30) as c:
    for i in range(n + 50):
        t = time.monotonic_ns()
        c.put(b"%016d" % (i % 10_000), value)
        if i >= 50:  # a warm-up first
            out.append((t, time.monotonic_ns()))
print(json.dumps(out))
"""


def lone_client(script: str, address: str, n: int) -> list:
    """Run ``script`` (``LONE_PUT_CLIENT``, ``LONE_GET_CLIENT``) in another process against
    ``address`` for ``n`` calls: its ``[(sent ns, answered ns), ...]``."""
    import json
    import subprocess
    r = subprocess.run([sys.executable, "-c", script, address, str(n)], capture_output=True,
                       text=True, timeout=60 + n * 0.05,
                       env=dict(os.environ, PYTHONPATH=os.path.dirname(HERE)))
    if r.returncode != 0:
        raise RuntimeError(f"the lone-call client failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout)


def stamped(events: list, kind: str, fn, when=None):
    """``fn``, noting ``(kind, monotonic ns)`` in ``events`` as each call starts (only the
    calls whose arguments ``when`` accepts, if given): the profiles' timing wrappers."""
    def wrapper(*args):
        if when is None or when(*args):
            events.append((kind, time.monotonic_ns()))
        return fn(*args)
    return wrapper


def timed(events: list, kind: str, fn):
    """``fn``, noting ``(kind, start ns, end ns)`` of each call in ``events``."""
    def wrapper(*args, **kwargs):
        t = time.monotonic_ns()
        try:
            return fn(*args, **kwargs)
        finally:
            events.append((kind, t, time.monotonic_ns()))
    return wrapper


def profile_lone_put(base: str, n: int) -> dict:
    """Where one put at a time spends its time, on the leader and around it.

    The leader is an embedded replica in this process (the same ``Node`` as a
    server's), with timing wrappers put on its instance (no code changed): the
    arrival of a write (``_on_write``), each ``ReplicaStorage.save`` (start;
    the applied hook, which answers a write made durable by an earlier save;
    end, after the log append and its fdatasync), the Accepted messages, every
    send. The client is another process making ``n`` puts one after the other
    and recording when each was sent and answered (both clocks are
    CLOCK_MONOTONIC, so the timelines align). Medians over the puts, in ms.
    One shard: a lone put touches one shard whatever their number.
    """
    from kvstore.paxos import messages as M
    lc = LocalCluster(os.path.join(base, "profile"), 3, 1)
    db = None
    events: list = []  # (kind, monotonic ns)
    try:
        db = kvstore.open(os.path.join(lc.directory, "n1"), node_id="n1",
                          cluster=lc.config_path)
        lc.start("n2")
        lc.start("n3")
        lead_from_embedded(lc, db)
        node = db._node
        now = time.monotonic_ns
        on_write, on_paxos = node._on_write, node._on_paxos
        save = node.storage.save
        send_peer, reply = node.sockets.send_peer, node.sockets.reply

        timed_on_write = stamped(events, "write", on_write)
        timed_on_paxos = stamped(events, "accepted", on_paxos,
                                 lambda _frm, items: any(m.type == M.ACCEPTED for _s, m in items))

        def timed_save(writes, applied=None):
            events.append(("save", now()))

            def hook(results):
                events.append(("hook", now()))
                return applied(results)

            try:
                return save(writes, hook if applied is not None else None)
            finally:
                events.append(("saved", now()))

        timed_send_peer = timed(events, "send_peer", send_peer)
        timed_reply = timed(events, "reply", reply)
        node._on_write, node._on_paxos = timed_on_write, timed_on_paxos
        node.storage.save = timed_save
        node.sockets.send_peer, node.sockets.reply = timed_send_peer, timed_reply
        puts = lone_client(LONE_PUT_CLIENT, lc.addresses["n1"], n)
        node._on_write, node._on_paxos = on_write, on_paxos
        node.storage.save = save
        node.sockets.send_peer, node.sockets.reply = send_peer, reply
    finally:
        if db is not None:
            db.close()
        lc.stop_all()
        lc.close()
    return lone_put_breakdown(puts, list(events))


def lone_put_breakdown(puts: list, events: list) -> dict:
    """Per put (client send .. client answer), the leader's timeline, cut into segments."""
    import bisect
    times = [e[1] for e in events]
    seg: dict = {k: [] for k in (
        "total", "to_leader", "leader_busy_before", "propose_to_save", "save_1",
        "wait_accepted", "save_2_to_answer", "answer_to_client", "save_2_after_answer",
        "sends_per_put_ms", "saves_per_put")}
    prev_saved = None
    for sent, answered in puts:
        lo, hi = bisect.bisect_left(times, sent), bisect.bisect_right(times, answered)
        window = events[lo:hi]
        write = next((e[1] for e in window if e[0] == "write"), None)
        saves = [i for i, e in enumerate(window) if e[0] == "save"]
        if write is None or len(saves) < 2:
            prev_saved = None
            continue
        s1 = next((i for i in saves if window[i][1] > write), None)
        if s1 is None:
            continue
        s1_end = next((e[1] for e in window[s1:] if e[0] == "saved"), None)
        acc = next((e[1] for e in window[s1:] if e[0] == "accepted"), None)
        s2 = next((i for i in saves if i > s1 and window[i][1] >= (acc or 0)), None)
        hook = next((e[1] for e in window[s2:] if e[0] == "hook"), None) if s2 else None
        rep = next((e for e in window[s2:] if e[0] == "reply"), None) if s2 else None
        if None in (s1_end, acc, s2, hook, rep):
            continue
        # the leader still busy with the previous put's save when this one was sent; the
        # "saved" taken for it may be a later save's (it had none of its own before the
        # answer), so it counts only up to this put's arrival at the leader
        busy = max(0, min(prev_saved, write) - sent) if prev_saved is not None else 0
        seg["total"].append(answered - sent)
        seg["leader_busy_before"].append(busy)
        seg["to_leader"].append(write - sent - busy)
        seg["propose_to_save"].append(window[s1][1] - write)
        seg["save_1"].append(s1_end - window[s1][1])
        seg["wait_accepted"].append(max(0, acc - s1_end))
        # cut at the start of the reply's send: the client process may hold its answer
        # before the node's thread, descheduled after the send under load, notes its end
        seg["save_2_to_answer"].append(rep[1] - window[s2][1])
        seg["answer_to_client"].append(answered - rep[1])
        # the rest of save 2 may run after the answer (an LMDB commit did; a log append
        # of commit points only does not happen): the next put arriving meanwhile waits
        # for it (leader_busy_before of the next put)
        later = next((e[1] for e in window[s2:] + events[hi:hi + 50] if e[0] == "saved"), None)
        prev_saved = later
        if later is not None:
            seg["save_2_after_answer"].append(max(0, later - rep[2]))
        seg["sends_per_put_ms"].append(sum(e[2] - e[1] for e in window
                                           if e[0] in ("send_peer", "reply")))
        seg["saves_per_put"].append(len(saves))
    out = {k: round(statistics.median(v) / (1 if k == "saves_per_put" else 1e6), 3)
           for k, v in seg.items() if v}
    out["puts_profiled"] = len(seg["total"])
    out["puts"] = len(puts)
    return out


def print_profile(p: dict) -> None:
    print(f"\nwhere one put at a time spends its time (median over {p['puts_profiled']} of "
          f"{p['puts']} lone puts; the leader is an embedded replica here, timed in-process):")
    rows = [("total, client send to client answer", "total"),
            ("  the leader still in the previous put's save 2", "leader_busy_before"),
            ("  client send to the leader's _on_write (client, ZeroMQ, loop)", "to_leader"),
            ("  _on_write to save 1 (propose, ready; Accepts sent first)", "propose_to_save"),
            ("  save 1: the log append of the entry (one fdatasync)", "save_1"),
            ("  after save 1 until the first Accepted is read", "wait_accepted"),
            ("  save 2 start to the answer sent (apply, from inside save 2)", "save_2_to_answer"),
            ("  answer sent to the client's return", "answer_to_client"),
            ("(the rest of save 2 after the answer)", "save_2_after_answer"),
            ("(of which in ZeroMQ sends: Accepts, answer)", "sends_per_put_ms"),
            ("(saves in the window of one put, count)", "saves_per_put")]
    for label, k in rows:
        if k in p:
            print(f"  {label:68} {p[k]:7.3f}" + ("" if k == "saves_per_put" else " ms"))


LONE_GET_CLIENT = LONE_PUT_CLIENT.replace('c.put(b"%016d" % (i % 10_000), value)',
                                          'c.get(b"%016d" % (i % 10_000))')


def profile_lone_get(base: str, n: int) -> dict:
    """Where one linearizable get at a time spends its time, as ``profile_lone_put``:
    the leader is an embedded replica with timing wrappers (the read's arrival, the
    Heartbeats of its read-index round, the first HeartbeatReply, the read served, the
    answer sent); the client another process making ``n`` gets one after the other."""
    import bisect
    from kvstore.paxos import messages as M
    lc = LocalCluster(os.path.join(base, "profile-get"), 3, 1)
    db = None
    events: list = []
    try:
        db = kvstore.open(os.path.join(lc.directory, "n1"), node_id="n1",
                          cluster=lc.config_path)
        lc.start("n2")
        lc.start("n3")
        lead_from_embedded(lc, db)
        db.put(b"%016d" % 0, b"x")
        node = db._node
        saved = (node._on_read, node._on_paxos, node._serve_reads, node.sockets.send_peer,
                 node.sockets.reply)
        on_read, on_paxos, serve, send_peer, reply = saved

        node._on_read = stamped(events, "read", on_read)
        node._on_paxos = stamped(events, "ack", on_paxos,
                                 lambda _frm, items: any(m.type == M.HEARTBEAT_REPLY for _s, m in items))
        node._serve_reads = stamped(events, "serve", serve)
        node.sockets.send_peer = timed(events, "sent_peer", send_peer)
        node.sockets.reply = timed(events, "reply", reply)
        try:
            gets = lone_client(LONE_GET_CLIENT, lc.addresses["n1"], n)
        finally:
            (node._on_read, node._on_paxos, node._serve_reads, node.sockets.send_peer,
             node.sockets.reply) = saved
    finally:
        if db is not None:
            db.close()
        lc.stop_all()
        lc.close()
    events = list(events)
    times = [e[1] for e in events]
    seg: dict = {k: [] for k in ("total", "to_leader", "read_to_heartbeat_sent", "wait_ack",
                                 "ack_to_answer_send", "answer_to_client")}
    for sent, answered in gets:
        window = events[bisect.bisect_left(times, sent):bisect.bisect_right(times, answered)]
        read = next((e[1] for e in window if e[0] == "read"), None)
        beats = [e for e in window if e[0] == "sent_peer" and read is not None and e[1] > read]
        ack = next((e[1] for e in window if e[0] == "ack" and beats and e[1] > beats[0][1]), None)
        rep = next((e for e in window if e[0] == "reply" and ack is not None and e[1] > ack), None)
        if None in (read, ack, rep) or not beats:
            continue
        first_beat = beats[0][2]  # a follower can answer once the first one is out
        seg["total"].append(answered - sent)
        seg["to_leader"].append(read - sent)
        seg["read_to_heartbeat_sent"].append(first_beat - read)
        seg["wait_ack"].append(max(0, ack - first_beat))
        # cut at the start of the answer's send, as the put's profile (the node's thread
        # may be descheduled after the send, past the client's return)
        seg["ack_to_answer_send"].append(rep[1] - ack)
        seg["answer_to_client"].append(answered - rep[1])
    out = {k: round(statistics.median(v) / 1e6, 3) for k, v in seg.items() if v}
    out["gets_profiled"], out["gets"] = len(seg["total"]), len(gets)
    return out


def print_get_profile(p: dict) -> None:
    print(f"\nwhere one linearizable get at a time spends its time (median over "
          f"{p['gets_profiled']} of {p['gets']} lone gets, the leader timed in-process):")
    for label, k in (("total, client send to client answer", "total"),
                     ("  client send to the leader's _on_read", "to_leader"),
                     ("  _on_read to the first read-index Heartbeat sent", "read_to_heartbeat_sent"),
                     ("  then to the first HeartbeatReply read (the other one sent too)",
                      "wait_ack"),
                     ("  HeartbeatReply to the answer's send (serve, encode)",
                      "ack_to_answer_send"),
                     ("  answer's send to the client's return", "answer_to_client")):
        if k in p:
            print(f"  {label:68} {p[k]:7.3f} ms")


def profile_follower_put(base: str, n: int) -> dict:
    """Where a follower's turn goes while a client makes ``n`` puts one at a time on the
    leader: the turn that takes an Accept in and sends its Accepted out.

    n1 is an embedded replica that joins after n2 and n3 elected a leader, so it
    follows; timing wrappers on its ``Node`` instance (no code changed) note each loop
    turn, its receive, each save, the log append and its fdatasync, and each send.
    Per turn with an append and a send after it: the medians of each segment, in ms.
    """
    import bisect
    lc = LocalCluster(os.path.join(base, "profile-follower"), 3, 1)
    db = None
    events: list = []
    try:
        lc.start("n2")
        lc.start("n3")
        lc.wait_ready(timeout=60, names=["n2", "n3"])
        db = kvstore.open(os.path.join(lc.directory, "n1"), node_id="n1",
                          cluster=lc.config_path)
        leader = _leader_other_than(db, "n1")
        node = db._node
        wal = node.storage.wal
        wrapped = [(node, "turn"), (node, "_receive"), (node.storage, "save"),
                   (wal, "append"), (wal._files, "fdatasync"), (node.sockets, "send_peer")]
        saved = [getattr(obj, name) for obj, name in wrapped]
        for (obj, name), fn in zip(wrapped, saved):
            setattr(obj, name, timed(events, name, fn))
        try:
            lone_client(LONE_PUT_CLIENT, lc.addresses[leader], n)
        finally:
            for (obj, name), fn in zip(wrapped, saved):
                setattr(obj, name, fn)
    finally:
        if db is not None:
            db.close()
        lc.stop_all()
        lc.close()
    events.sort(key=lambda e: e[1])
    starts = [e[1] for e in events]
    seg: dict = {k: [] for k in ("turn_to_send", "receive", "receive_to_save",
                                 "save_to_append", "append_to_fdatasync", "fdatasync",
                                 "after_append_to_send", "send", "after_send")}
    for t in (e for e in events if e[0] == "turn"):
        inside = events[bisect.bisect_left(starts, t[1]):bisect.bisect_right(starts, t[2])]
        rc = next((e for e in inside if e[0] == "_receive"), None)
        sv = next((e for e in inside if e[0] == "save"), None)
        ap = next((e for e in inside if e[0] == "append"), None)
        fs = next((e for e in inside if e[0] == "fdatasync"), None)
        sd = next((e for e in inside if e[0] == "send_peer" and ap and e[1] > ap[2]), None)
        if None in (rc, sv, ap, fs, sd):
            continue
        seg["turn_to_send"].append(sd[2] - t[1])
        seg["receive"].append(rc[2] - rc[1])
        seg["receive_to_save"].append(sv[1] - rc[2])
        seg["save_to_append"].append(ap[1] - sv[1])
        seg["append_to_fdatasync"].append(fs[1] - ap[1])
        seg["fdatasync"].append(fs[2] - fs[1])
        seg["after_append_to_send"].append(sd[1] - fs[2])
        seg["send"].append(sd[2] - sd[1])
        seg["after_send"].append(t[2] - sd[2])
    out = {k: round(statistics.median(v) / 1e6, 3) for k, v in seg.items() if v}
    out["turns_profiled"] = len(seg["receive"])
    return out


def _leader_other_than(db, name: str, timeout: float = 60.0) -> str:
    """The node, not ``name``, that leads shard 0 as ``db`` (an embedded replica) sees it."""
    deadline = time.monotonic() + timeout
    while True:
        leader = db.status()["shards"][0]["leader"]
        if leader is not None and leader != name:
            return leader
        if time.monotonic() > deadline:
            raise RuntimeError(f"no leader but {name} within {timeout} s (leader: {leader})")
        time.sleep(0.2)  # a status poll: leadership is no event this process can await


def print_follower_profile(p: dict) -> None:
    print(f"\na follower's turn for one put at a time (median over {p['turns_profiled']} "
          f"turns that took an Accept in and sent its Accepted; the follower an embedded "
          f"replica, timed in-process):")
    for label, k in (("turn start to the Accepted sent", "turn_to_send"),
                     ("  receive (recv, decode, checks, the replica's step)", "receive"),
                     ("  then to the save (ready, the write built)", "receive_to_save"),
                     ("  save to the log append (hard state, records)", "save_to_append"),
                     ("  append to its fdatasync (encode, pwrite)", "append_to_fdatasync"),
                     ("  fdatasync", "fdatasync"),
                     ("  fdatasync to the send (publish, the frame encoded)",
                      "after_append_to_send"),
                     ("  the send", "send"),
                     ("(after the send: the apply of what the leader committed)",
                      "after_send")):
        if k in p:
            print(f"  {label:68} {p[k]:7.3f} ms")


def run_pysyncobj(concurrency: list, seconds: float) -> list | None:
    """PySyncObj's 3-node ``ReplDict`` on the same machine (``bench/pysyncobj_node.py``):
    rows like ours, or None when ``pysyncobj`` is not installed (``pip install '.[bench]'``)."""
    import importlib.util
    import json
    import subprocess
    if importlib.util.find_spec("pysyncobj") is None:
        return None
    from kvstore.server.local import free_port
    script = os.path.join(HERE, "pysyncobj_node.py")
    addrs = [f"127.0.0.1:{free_port()}" for _ in range(3)]
    procs = []
    try:
        for i in (1, 2):
            procs.append(subprocess.Popen([sys.executable, script, addrs[i]]
                                          + [a for j, a in enumerate(addrs) if j != i],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        load = subprocess.Popen([sys.executable, script, *addrs, "--load",
                                 ",".join(map(str, concurrency)), str(seconds)],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        procs.append(load)
        out, _ = load.communicate(timeout=60 + len(concurrency) * (seconds + 30))
    finally:
        for p in procs:
            p.kill()
            p.wait()
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return [dict(r, op="put") for r in rows if "in_flight" in r]


#: The rows measured on kvstore and on etcd alike (``versus_etcd``): (name, how, op, in flight).
VERSUS_ROWS = (("put, 256 in flight, asyncio", "aio", "put", 256),
               ("get, 256 in flight, asyncio", "aio", "get", 256),
               ("put, 1 in flight, asyncio", "aio", "put", 1),
               ("get, 1 in flight, asyncio", "aio", "get", 1),
               ("put, sequential, sync client", "sync", "put", 1),
               ("get, sequential, sync client", "sync", "get", 1))


def sequential(client, kind: str, seconds: float, keys: list, value: bytes,
               servers: list = ()) -> dict:
    """One request after the other on a blocking client, for ``seconds``: ``load``'s row,
    with the CPU per call of this process (every thread) and, summed, of ``servers``
    (the members' pids): where the machine's two cores go for one request."""
    latencies: list = []
    nkeys = len(keys)
    cpu = CpuMeter(servers)
    start = time.perf_counter()
    deadline = start + seconds
    i = 0
    while time.perf_counter() < deadline:
        key = keys[i % nkeys]
        i += 1
        t = time.perf_counter()
        if kind == "put":
            client.put(key, value)
        else:
            client.get(key)
        latencies.append(time.perf_counter() - t)
    return load_row(kind, 1, latencies, time.perf_counter() - start, cpu)


#: Rows after ``VERSUS_ROWS``, one request at a time with the sync client, while one
#: follower (a member that does not lead) is stopped (SIGSTOP): the leader and one
#: follower are still a majority. Here three members share two cores, so the second
#: follower's work on every request competes with the two that answer it; these rows
#: show what one request costs without that (what members on machines of their own see).
PAUSED_ROWS = (("put, sequential, sync, a follower stopped", "put"),
               ("get, sequential, sync, a follower stopped", "get"))
#: kvstore's lease reads (``[tuning] lease_read_ticks``, off by default: they assume
#: bounded clock drift, README "Lease reads"): the leader answers a get without a quorum
#: round. etcd 3.4 has no such option for linearizable reads: its row is its read-index get.
LEASE_ROW = "get, sequential, sync, kvstore's lease reads"
LEASE_READ_TICKS = 20
#: kvstore only: the sequential rows again with busy polling off (``[tuning] busy_poll_us
#: = 0``; a server polls awake between close messages by default, ``kvstore.node.waiter``),
#: to show in the same sitting what it buys and what it costs in CPU.
BUSY_OFF_ROWS = (("put, sequential, sync, kvstore's busy polling off", "put"),
                 ("get, sequential, sync, kvstore's busy polling off", "get"))


def paused_rows(sync_client, pause, seconds: float, servers: list = ()) -> dict:
    """``PAUSED_ROWS`` on one system: ``pause()`` is a context manager that stops one
    follower for as long as it is open."""
    keys, value = bench_keys(), os.urandom(VALUE_BYTES)
    with pause():
        return {name: sequential(sync_client, kind, seconds, keys[:2000], value, servers)
                for name, kind in PAUSED_ROWS}


class stopped:
    """SIGSTOP ``pid`` for the block, SIGCONT after (whatever happens in it)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def __enter__(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def __exit__(self, *exc) -> None:
        os.kill(self.pid, signal.SIGCONT)


def versus_rows(sync_client, async_connect, seconds: float, servers: list = ()) -> dict:
    """Every ``VERSUS_ROWS`` row on one system: ``sync_client`` has put/get;
    ``async_connect()`` makes, inside the running loop, an async context manager with
    coroutine put/get; ``servers``: the members' pids (their CPU per call is noted).
    The keys are put once first, so that gets find them."""
    keys, value = bench_keys(), os.urandom(VALUE_BYTES)
    rows: dict = {}

    async def aio_rows() -> None:
        async with await async_connect() as db:
            await asyncio.gather(*(db.put(k, value) for k in keys[:2000]))
            for name, how, kind, c in VERSUS_ROWS:
                if how == "aio":
                    rows[name] = await load(db, kind, c, seconds, keys[:2000], value, servers)

    asyncio.run(aio_rows())
    for name, how, kind, _c in VERSUS_ROWS:
        if how == "sync":
            rows[name] = sequential(sync_client, kind, seconds, keys[:2000], value, servers)
    return rows


def kvstore_versus_rows(base: str, shards: int, seconds: float) -> dict:
    lc = _started_cluster(base, shards, metrics=False)
    try:
        async def connect():
            return await kvstore.aio.connect(lc.address_list, timeout=30)
        pids = [p.pid for p in lc.procs.values()]
        with kvstore.connect(lc.address_list, timeout=30) as sync_client:
            rows = versus_rows(sync_client, connect, seconds, pids)
            leader = sync_client.status()["shards"][0]["leader"]
            follower = next(n for n in lc.names if n != leader)
            rows.update(paused_rows(sync_client, lambda: stopped(lc.procs[follower].pid),
                                    seconds, pids))
    finally:
        lc.stop_all()
        lc.close()
    rows.update(tuned_rows(base + "-lease", shards, {"lease_read_ticks": LEASE_READ_TICKS},
                           ((LEASE_ROW, "get"),), seconds))
    rows.update(tuned_rows(base + "-awake", shards, {"busy_poll_us": 0}, BUSY_OFF_ROWS, seconds))
    return rows


def tuned_rows(base: str, shards: int, tuning: dict, rows: tuple, seconds: float) -> dict:
    """``rows`` (``(name, "put" | "get")``), one request after the other, on a cluster of
    its own with ``[tuning]`` ``tuning``; the keys are put once first, so that gets find
    them."""
    lc = _started_cluster(base, shards, metrics=False, tuning=tuning)
    try:
        pids = [p.pid for p in lc.procs.values()]
        with kvstore.connect(lc.address_list, timeout=30) as sync_client:
            keys, value = bench_keys(), os.urandom(VALUE_BYTES)
            for k in keys[:2000]:
                sync_client.put(k, value)
            return {name: sequential(sync_client, kind, seconds, keys[:2000], value, pids)
                    for name, kind in rows}
    finally:
        lc.stop_all()
        lc.close()


def etcd_versus_rows(base: str, binary: str, seconds: float) -> dict:
    """The same rows on three etcd members, the clients on its leader (as kvstore's
    writes go to theirs): over gRPC where ``grpcio`` is installed, else its JSON gateway
    (blocking calls only: the asyncio rows are then left out)."""
    import etcd_local
    with etcd_local.EtcdCluster(base, binary) as ec:
        url = ec.leader_url()
        if etcd_local.has_grpc():
            async def connect():
                return etcd_local.AsyncEtcdGrpc(url)
            pids = [p.pid for p in ec.procs]
            with etcd_local.EtcdGrpc(url) as sync_client:
                rows = versus_rows(sync_client, connect, seconds, pids)
                keys, value = bench_keys(), os.urandom(VALUE_BYTES)
                rows[LEASE_ROW] = sequential(sync_client, "get", seconds, keys[:2000], value,
                                             pids)
                follower = next(p for u, p in zip(ec.client_urls, ec.procs) if u != url)
                rows.update(paused_rows(sync_client, lambda: stopped(follower.pid), seconds,
                                        pids))
                return rows
        client = etcd_local.EtcdClient(url)
        try:
            keys, value = bench_keys(), os.urandom(VALUE_BYTES)
            for k in keys[:2000]:
                client.put(k, value)
            return {name: sequential(client, kind, seconds, keys[:2000], value)
                    for name, how, kind, _c in VERSUS_ROWS if how == "sync"}
        finally:
            client.close()


def versus_etcd(base: str, shards: int, seconds: float, rounds: int) -> dict | None:
    """kvstore and etcd 3.4, three members each on this machine, the same rows in the
    same sitting: ``rounds`` rounds, each side first in every other round (ABAB..
    alternating), never both running at once. Best of the rounds per figure (the
    highest ops/s, the lowest p50 and p99: the neighbours' load only ever slows a
    round down). None, said why, where etcd is not installed."""
    import etcd_local
    binary = etcd_local.find_etcd()
    if binary is None:
        print(etcd_local.MISSING, file=sys.stderr)
        return None
    client = ("gRPC (grpcio, hand-encoded protobuf), sync channel and grpc.aio"
              if etcd_local.has_grpc() else "JSON gateway over http.client (no grpcio)")
    print(f"\nkvstore against etcd {etcd_local.etcd_version(binary)} (3 members, the "
          f"clients on its leader; {client}), {rounds} interleaved rounds:", flush=True)
    runs: dict = {"kvstore": [], "etcd": []}
    for round_ in range(rounds):
        for side in ("kvstore", "etcd") if round_ % 2 == 0 else ("etcd", "kvstore"):
            where = os.path.join(base, f"versus-{side}-{round_}")
            rows = (kvstore_versus_rows(where, shards, seconds) if side == "kvstore"
                    else etcd_versus_rows(where, binary, seconds))
            runs[side].append(rows)
            print(f"  round {round_ + 1} {side:8} " + "  ".join(
                f"{n.split(',')[0]}/{r['in_flight']}: " + (
                    f"{r['ops_per_s']:,.0f}/s" if r["in_flight"] > 1 else f"{r['p50_ms']:.3f} ms")
                for n, r in rows.items()), flush=True)
    table = []
    extra = ([(name, "sync", kind, 1) for name, kind in PAUSED_ROWS]
             + [(LEASE_ROW, "sync", "get", 1)]
             + [(name, "sync", kind, 1) for name, kind in BUSY_OFF_ROWS])
    for name, how, kind, c in list(VERSUS_ROWS) + extra:
        row: dict = {"row": name, "op": kind, "client": how, "in_flight": c}
        for side in runs:
            got = [r[name] for r in runs[side] if name in r]
            if got:
                cpu = [r["client_cpu_us_per_op"] for r in got if "client_cpu_us_per_op" in r]
                servers = [r["servers_cpu_us_per_op"] for r in got
                           if "servers_cpu_us_per_op" in r]
                row[side] = {"ops_per_s": max(r["ops_per_s"] for r in got),
                             "client_cpu_us_per_op": min(cpu) if cpu else None,
                             "servers_cpu_us_per_op": min(servers) if servers else None,
                             "p50_ms": min(r["p50_ms"] for r in got),
                             "p99_ms": min(r["p99_ms"] for r in got),
                             "rounds_p50_ms": [r["p50_ms"] for r in got],
                             "rounds_ops_per_s": [r["ops_per_s"] for r in got],
                             "cdf_ms": min(got, key=lambda r: r["p50_ms"])["cdf_ms"]}
        table.append(row)
    return {"etcd_version": etcd_local.etcd_version(binary), "etcd_client": client,
            "rounds": rounds, "seconds_per_row": seconds, "load": os.getloadavg(),
            "rows": table}


def print_versus(v: dict) -> None:
    """The table: throughput rows as ops/s, one-at-a-time rows as p50/p99, and
    kvstore / etcd (for ops/s above 1 is better; for latency below 1 is)."""
    print(f"\nkvstore / etcd {v['etcd_version']}, same sitting, best of {v['rounds']} "
          f"interleaved rounds (load average {v['load'][0]:.2f} at the end):")
    print(f"  {'row (3 nodes, 1 shard)':44}{'kvstore':>26}{'etcd':>26}{'kvstore/etcd':>14}")
    for r in v["rows"]:
        kv, et = r.get("kvstore"), r.get("etcd")

        def cell(x):
            if x is None:
                return "n/a"
            if r["in_flight"] > 1:
                return f"{x['ops_per_s']:,.0f}/s"
            return f"p50 {x['p50_ms']:.3f} p99 {x['p99_ms']:.2f} ms"
        if kv and et:
            key = "ops_per_s" if r["in_flight"] > 1 else "p50_ms"
            ratio = f"{kv[key] / et[key]:.2f}" if et[key] else "n/a"
        else:
            ratio = "n/a"
        print(f"  {r['row']:44}{cell(kv):>26}{cell(et):>26}{ratio:>14}")
    print("  CPU per call, best round: the client's process (every thread) and the three "
          "members' together:")
    for r in v["rows"]:
        kv, et = r.get("kvstore") or {}, r.get("etcd") or {}
        a, b = kv.get("client_cpu_us_per_op"), et.get("client_cpu_us_per_op")
        sa, sb = kv.get("servers_cpu_us_per_op"), et.get("servers_cpu_us_per_op")
        if a and b:
            line = f"    {r['row']:42} client: kvstore {a:7.1f} us  etcd {b:7.1f} us  {a / b:.2f}"
            if sa and sb:
                line += f"   members: kvstore {sa:7.1f} us  etcd {sb:7.1f} us  {sa / sb:.2f}"
            print(line)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small smoke run")
    p.add_argument("--seconds", type=float, default=5.0, help="per row")
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--in-flight", default="1,16,64,256")
    p.add_argument("--dir", default=None, help="where the cluster's data goes (default: a temp dir)")
    p.add_argument("--json", default=None,
                   help="where the figures go (default: bench/results/cluster.json, "
                        "cluster_metrics.json with --metrics-only)")
    p.add_argument("--no-pysyncobj", action="store_true", help="skip the PySyncObj comparison")
    p.add_argument("--no-etcd", action="store_true",
                   help="skip the same-sitting comparison with etcd")
    p.add_argument("--etcd-only", action="store_true",
                   help="only the comparison with etcd (and the floor)")
    p.add_argument("--etcd-rounds", type=int, default=3,
                   help="interleaved rounds of the etcd comparison (best of them)")
    p.add_argument("--no-profile", action="store_true",
                   help="skip the profile of one put at a time")
    p.add_argument("--no-embedded", action="store_true",
                   help="skip the rows of the embedded replica (load in the leader's process)")
    p.add_argument("--metrics", action="store_true",
                   help="also compare puts/s without and with --metrics on the nodes")
    p.add_argument("--metrics-only", action="store_true",
                   help="only that comparison (implies --metrics)")
    p.add_argument("--rounds", type=int, default=4, help="rounds of each side of --metrics")
    args = p.parse_args(argv)
    concurrency = [int(x) for x in args.in_flight.split(",")]
    seconds = 0.5 if args.quick else args.seconds
    base = tempfile.mkdtemp(prefix="kvstore-bench-cluster-", dir=args.dir)
    if args.metrics_only:
        try:
            compared = compare_metrics(base, args.shards, concurrency, seconds,
                                       1 if args.quick else args.rounds)
        finally:
            shutil.rmtree(base, ignore_errors=True)
        figures.write({"nodes": 3, "shards": args.shards, "metrics_cost": compared},
                      args.json or figures.default_path("cluster_metrics"))
        return 0
    compared = versus = None
    try:
        fsync_s = fsync_floor(base)
        rtt_s = loopback_floor(300 if args.quick else 3000)
        print(f"floor: fdatasync {fsync_s * 1e3:.3f} ms + loopback round trip "
              f"{rtt_s * 1e3:.3f} ms = {(fsync_s + rtt_s) * 1e3:.3f} ms")
        bare = bare_pipeline.floor(base, 300 if args.quick else 3000)
        bare_pipeline.print_floor(bare)
        print()
        versus = None if args.no_etcd else versus_etcd(
            base, args.shards, seconds, 1 if args.quick else args.etcd_rounds)
        if versus:
            print_versus(versus)
        if args.etcd_only:
            figures.write({"nodes": 3, "shards": args.shards, "key_bytes": KEY_BYTES,
                           "value_bytes": VALUE_BYTES,
                           "floor_ms": {"fdatasync": round(fsync_s * 1e3, 3),
                                        "loopback_rtt": round(rtt_s * 1e3, 3)},
                           "bare_pipeline": bare, "versus_etcd": versus},
                          args.json or figures.default_path("cluster_etcd"))
            return 0
        with LocalCluster(os.path.join(base, "cluster"), 3, args.shards) as lc:
            lc.start_all()
            lc.wait_ready(timeout=60)
            pids = {n: p.pid for n, p in lc.procs.items()}
            rows = asyncio.run(run_load(lc.address_list, concurrency, seconds, pids))
            lc.stop_all()
        embedded = None if args.no_embedded else run_embedded(base, args.shards, concurrency,
                                                              seconds)
        profile = None if args.no_profile else profile_lone_put(base, 200 if args.quick else 2000)
        if profile:
            print_profile(profile)
        get_profile = None if args.no_profile else profile_lone_get(base,
                                                                    200 if args.quick else 2000)
        if get_profile:
            print_get_profile(get_profile)
        follower_profile = None if args.no_profile else profile_follower_put(
            base, 200 if args.quick else 2000)
        if follower_profile:
            print_follower_profile(follower_profile)
        pysyncobj = None if args.no_pysyncobj else run_pysyncobj(concurrency, seconds)
        if args.metrics:
            compared = compare_metrics(base, args.shards, concurrency, seconds,
                                       1 if args.quick else args.rounds)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    if pysyncobj:
        print("\nPySyncObj 3-node ReplDict, same machine, same run (it never fsyncs; the load "
              "runs inside one of its nodes, which forwards to its leader):")
        ours = {r["in_flight"]: r for r in rows if r["op"] == "put"}
        for r in pysyncobj:
            mine = ours.get(r["in_flight"])
            ratio = f"   kvstore = {mine['ops_per_s'] / r['ops_per_s']:.1f}x" if mine and r["ops_per_s"] else ""
            print(f"set  in flight {r['in_flight']:4}: {r['ops_per_s']:>10,.0f} ops/s   "
                  f"p50 {r['p50_ms']:7.3f} ms   p99 {r['p99_ms']:7.3f} ms{ratio}")
    results = {"nodes": 3, "shards": args.shards, "key_bytes": KEY_BYTES,
               "value_bytes": VALUE_BYTES, "seconds_per_row": seconds,
               "floor_ms": {"fdatasync": round(fsync_s * 1e3, 3),
                            "loopback_rtt": round(rtt_s * 1e3, 3)},
               "bare_pipeline": bare, "rows": rows, "embedded": embedded,
               "lone_put_profile": profile,
               "lone_get_profile": get_profile, "follower_put_profile": follower_profile,
               "pysyncobj": pysyncobj, "metrics_cost": compared, "versus_etcd": versus}
    floor = (fsync_s + rtt_s) * 1e3
    for label, source in (("", rows), (" (embedded replica)", (embedded or {}).get("rows", []))):
        single = next((r for r in source if r["op"] == "put" and r["in_flight"] == 1), None)
        if single:
            print(f"\none put at a time{label}: p50 {single['p50_ms']:.3f} ms = "
                  f"{single['p50_ms'] / floor:.1f}x the floor ({floor:.3f} ms)")
    if versus:
        print_versus(versus)
    figures.write(results, args.json or figures.default_path("cluster"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
