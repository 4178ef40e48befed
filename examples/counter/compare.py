"""The counter service measured in one run: embedded kvstore, a 3-node local cluster
(``incr`` and transactions each) and sqlite3, each served by gunicorn with
gunicorn.conf.py and loaded by load.py with the same threads and requests.

    python examples/counter/compare.py --threads 8 --requests 200

prints a table: requests/s, errors, and each row's ratio to sqlite3 with as many
workers. Run it from a checkout (the servers and the workers import the kvstore this
script imports). ``serve()`` is also what the tests use to run the service.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKOUT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
if os.path.isdir(os.path.join(CHECKOUT, "kvstore")):  # this checkout's kvstore, not an installed one
    sys.path.insert(1, CHECKOUT)

from load import Load  # noqa: E402  (this directory, not a package)

from kvstore.server.local import LocalCluster, free_port  # noqa: E402

CONFIG = os.path.join(HERE, "gunicorn.conf.py")


def kvstore_env(env: dict | None = None) -> dict:
    """``env`` (default: ours) with the kvstore this process imports first on PYTHONPATH,
    so gunicorn's workers run the same code."""
    import kvstore
    env = dict(os.environ if env is None else env)
    root = os.path.dirname(os.path.dirname(os.path.abspath(kvstore.__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _healthy(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/healthz")
        return conn.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


@contextlib.contextmanager
def serve(settings: dict, log_path: str, *, env: dict | None = None,
          ready_timeout: float = 60.0):
    """The service under gunicorn (gunicorn.conf.py) on a free port of 127.0.0.1 with the
    COUNTER_* ``settings``; yields its URL once ``/healthz`` answers 200 (polled, for at
    most ``ready_timeout`` seconds). Stopped on exit: SIGTERM, then SIGKILL of its
    process group if it has not exited within the graceful timeout."""
    port = free_port()
    env = kvstore_env(env)
    env.update(settings)
    env["COUNTER_BIND"] = f"127.0.0.1:{port}"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", CONFIG],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + ready_timeout
        while not _healthy(port):
            if proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {proc.returncode}: {_tail(log_path)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the service was not ready within {ready_timeout} s: "
                                   f"{_tail(log_path)}")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # its workers, should any be left
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


def _tail(path: str, lines: int = 20) -> str:
    with open(path, "rb") as f:
        return b"".join(f.readlines()[-lines:]).decode("utf-8", "replace")


def measure(settings: dict, directory: str, name: str, threads: int, requests: int) -> dict:
    with serve(settings, os.path.join(directory, f"{name}.log")) as url:
        Load(url, threads, 5, counter=f"warmup-{name}").run()  # connections, first writes
        return Load(url, threads, requests, counter=name).run()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", "-t", type=int, default=8, help="load threads")
    parser.add_argument("--requests", "-n", type=int, default=200, help="per load thread")
    parser.add_argument("--workers", type=int, default=2,
                        help="gunicorn workers for the cluster and sqlite (embedded: 1)")
    parser.add_argument("--worker-threads", type=int, default=4)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    base = {"COUNTER_THREADS": str(args.worker_threads)}
    rows = []
    with tempfile.TemporaryDirectory(prefix="counter-compare-") as tmp:
        with LocalCluster(os.path.join(tmp, "cluster"), 3, 1, env=kvstore_env()) as cluster:
            cluster.start_all()
            cluster.wait_ready(timeout=60)
            addresses = ",".join(cluster.address_list)
            runs = [
                ("sqlite3", 1, {"COUNTER_STORE": "sqlite",
                                "COUNTER_SQLITE": os.path.join(tmp, "one.sqlite3")}),
                ("sqlite3", args.workers, {"COUNTER_STORE": "sqlite",
                                           "COUNTER_SQLITE": os.path.join(tmp, "c.sqlite3")}),
            ]
            for method in ("incr", "transaction"):
                runs.append((f"embedded, {method}", 1, {
                    "COUNTER_STORE": "embedded", "COUNTER_METHOD": method,
                    "COUNTER_DIR": os.path.join(tmp, f"embedded-{method}")}))
                runs.append((f"3-node cluster, {method}", args.workers, {
                    "COUNTER_STORE": "cluster", "COUNTER_METHOD": method,
                    "COUNTER_CLUSTER": addresses}))
            for i, (label, workers, settings) in enumerate(runs):
                settings = {**base, **settings, "COUNTER_WORKERS": str(workers)}
                result = measure(settings, tmp, f"run{i}", args.threads, args.requests)
                rows.append({"service": label, "workers": workers, **result})
    sqlite = {r["workers"]: r["requests_per_second"] for r in rows if r["service"] == "sqlite3"}
    for r in rows:
        r["vs_sqlite3"] = round(r["requests_per_second"] / sqlite[r["workers"]], 2)
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{args.threads} load threads x {args.requests} POSTs to one counter; gunicorn "
          f"gthread, {args.worker_threads} threads per worker")
    print(f"{'service':28} {'workers':>7} {'requests/s':>10} {'errors':>6} {'vs sqlite3':>10}")
    for r in rows:
        print(f"{r['service']:28} {r['workers']:>7} {r['requests_per_second']:>10} "
              f"{r['errors']:>6} {r['vs_sqlite3']:>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
