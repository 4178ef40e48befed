"""What this machine allows a replicated durable put: the hops and flushes of one, no protocol.

A kvstore put one at a time makes four ZeroMQ hops and waits for two flushes: the
client sends to the leader; the leader sends an Accept to each follower, appends
to its log and fdatasyncs; a follower appends, fdatasyncs and answers; the leader
answers the client once its own flush and one follower's answer are in. This
script does exactly that with three bare processes and a client (pyzmq, a
DEALER per link, ROUTERs where answers come back, a 64 MiB preallocated log
per process, the bytes of the request appended as they are), and nothing else:
no decoding, no checks, no Paxos, no apply. Its p50 is the floor for a put on
this machine over ZeroMQ from Python processes; what kvstore's own put takes
above it is kvstore's work. The same with ``fdatasync`` off shows the hops
alone. CPU per put of every process is counted too (user + system, all threads:
the ZeroMQ I/O threads' work is in it).

    python bench/bare_pipeline.py            # 3,000 puts each way, a table
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from figures import cpu_seconds  # bench/figures.py, beside this script

#: The processes' code: ``leader PORT FOLLOWER_PORT... DIR SYNC`` or ``follower PORT DIR SYNC``.
NODE_SCRIPT = r"""
import os, sys, zmq
role, port = sys.argv[1], int(sys.argv[2])
ctx = zmq.Context()
def log_file(d, name):
    fd = os.open(os.path.join(d, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.posix_fallocate(fd, 0, 64 << 20)
    os.fsync(fd)
    return fd
if role == "follower":
    d, sync = sys.argv[3], sys.argv[4] == "1"
    s = ctx.socket(zmq.ROUTER); s.bind("tcp://127.0.0.1:%d" % port)
    fd, off = log_file(d, "follower-%d" % port), 0
    print("ready", flush=True)
    while True:
        ident, msg = s.recv_multipart()
        if msg == b"stop":
            break
        os.pwrite(fd, msg, off % (60 << 20)); off += len(msg)
        if sync:
            os.fdatasync(fd)
        s.send_multipart([ident, b"ok"])
else:
    fports, d, sync = [int(p) for p in sys.argv[3:-2]], sys.argv[-2], sys.argv[-1] == "1"
    c = ctx.socket(zmq.ROUTER); c.bind("tcp://127.0.0.1:%d" % port)
    fs = []
    for p in fports:
        f = ctx.socket(zmq.DEALER); f.connect("tcp://127.0.0.1:%d" % p); fs.append(f)
    poller = zmq.Poller()
    for f in fs:
        poller.register(f, zmq.POLLIN)
    fd, off = log_file(d, "leader"), 0
    owed = 0  # answers still due from followers (the slower one's comes later)
    print("ready", flush=True)
    while True:
        ident, msg = c.recv_multipart()
        if msg == b"stop":
            for f in fs:
                f.send(b"stop")
            break
        for f in fs:
            f.send(msg)
        owed += len(fs)
        os.pwrite(fd, msg, off % (60 << 20)); off += len(msg)
        if sync:
            os.fdatasync(fd)
        fresh = 0  # one answer to this request is enough: a majority of three
        while fresh == 0:
            for f, _ in poller.poll():
                f.recv(); owed -= 1
                if owed < len(fs):
                    fresh += 1
        c.send_multipart([ident, b"done"])
"""


def run(directory: str, n: int = 3000, sync: bool = True, value_bytes: int = 200) -> dict:
    """``n`` puts one after the other through the bare pipeline: p50/p99 ms and the CPU
    per put of the client, the leader and the followers (microseconds)."""
    import zmq
    from kvstore.server.local import free_port
    ports = [free_port() for _ in range(3)]
    flag = "1" if sync else "0"
    procs = [subprocess.Popen([sys.executable, "-c", NODE_SCRIPT, "follower", str(p),
                               directory, flag], stdout=subprocess.PIPE, text=True)
             for p in ports[1:]]
    procs.insert(0, subprocess.Popen([sys.executable, "-c", NODE_SCRIPT, "leader",
                                      str(ports[0]), *map(str, ports[1:]), directory, flag],
                                     stdout=subprocess.PIPE, text=True))
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    try:
        for p in procs:
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError("a process of the bare pipeline did not start")
        s.connect(f"tcp://127.0.0.1:{ports[0]}")
        value = os.urandom(value_bytes)
        for _ in range(200):  # connections made, files warm
            s.send(value)
            s.recv()
        cpu0 = [cpu_seconds(p.pid) for p in procs] + [cpu_seconds()]
        times = []
        for _ in range(n):
            t = time.perf_counter_ns()
            s.send(value)
            s.recv()
            times.append(time.perf_counter_ns() - t)
        cpu1 = [cpu_seconds(p.pid) for p in procs] + [cpu_seconds()]
        s.send(b"stop")
        for p in procs:
            p.wait(30)
    finally:
        s.close(0)
        ctx.term()
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    times.sort()
    us = [round((b - a) / n * 1e6, 1) for a, b in zip(cpu0, cpu1)]
    return {"puts": n, "fdatasync": sync,
            "p50_ms": round(statistics.median(times) / 1e6, 3),
            "p99_ms": round(times[int(len(times) * 0.99)] / 1e6, 3),
            "cpu_us_per_put": {"leader": us[0], "followers": round(us[1] + us[2], 1),
                               "client": us[3]}}


def floor(directory: str, n: int = 3000) -> dict:
    """The pipeline with and without fdatasync (``run``), in a scratch directory under
    ``directory``."""
    where = tempfile.mkdtemp(prefix="bare-pipeline-", dir=directory)
    try:
        return {"with_fdatasync": run(where, n, True), "without_fdatasync": run(where, n, False)}
    finally:
        shutil.rmtree(where, ignore_errors=True)


def print_floor(f: dict) -> None:
    print("the bare pipeline (a put's four ZeroMQ hops and two flushes, no protocol):")
    for k, r in f.items():
        c = r["cpu_us_per_put"]
        print(f"  {k.replace('_', ' '):18} p50 {r['p50_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms"
              f"   CPU per put: leader {c['leader']:.0f} us, followers {c['followers']:.0f} us,"
              f" client {c['client']:.0f} us")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-n", type=int, default=3000, help="puts each way")
    p.add_argument("--dir", default=None, help="where the logs go (default: a temp dir)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = p.parse_args(argv)
    f = floor(args.dir or tempfile.gettempdir(), args.n)
    print(json.dumps(f, indent=1)) if args.json else print_floor(f)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
