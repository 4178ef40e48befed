"""A cluster of ``kvstore-server`` processes on 127.0.0.1: for ``kvstore local-cluster``,
the process-level tests and the benchmark.

``LocalCluster(dir, nodes=3, shards=1)`` writes ``dir/cluster.toml`` with free
ports (a client and a peer port per node; ``port_base=N``: N+i and N+i+10000 for node
i), starts one ``python -m kvstore.server`` per node (logs in
``dir/NAME.log``, data in ``dir/NAME``), and can kill (any signal), restart
and stop them. Every wait is bounded; ``close()`` always leaves no process
behind.

``kvstore local-cluster`` (``run_local_cluster``) checks every port before it starts a
node, stops on SIGINT, SIGTERM or SIGHUP (its terminal went away) by stopping every
node, and restarts a node that dies, unless it exited with a configuration error.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from kvstore.errors import InvalidArgument, KVError, Unavailable
from kvstore.sharding import shard_of

#: What kvstore-server exits with when it cannot start (bad config, a port it cannot
#: bind, an unusable data directory): restarting it would fail the same way.
EXIT_CONFIG = 2
#: The signals that stop ``kvstore local-cluster`` and the demo cleanly.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


#: Every port ``free_port`` handed out in this process: a cluster's ports are all chosen
#: before any server binds one, so "free now" alone could name one port twice.
_HANDED_OUT: set = set()


def free_port() -> int:
    """A port free on 127.0.0.1 now, chosen below the kernel's ephemeral range
    (32768-60999), so that the many short-lived connections on a busy machine,
    which get their ports from that range, do not take it before our server binds it;
    never one this process was handed before."""
    import random
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(20000, 32000)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            _HANDED_OUT.add(port)
            return port
    with socket.socket() as s:  # a very busy range: fall back on the kernel's choice
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(address: str) -> str | None:
    """Why ``tcp://HOST:PORT`` cannot be listened on now (the OS's words), or None.

    Binds the way ZeroMQ does (SO_REUSEADDR), so a port whose old connections linger in
    TIME_WAIT, as after a restart, counts as free."""
    host, _, port = address[len("tcp://"):].rpartition(":")
    host = host.strip("[]")
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except (socket.gaierror, ValueError) as e:
        return str(e)
    family, kind, proto, _name, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(sockaddr)
        except OSError as e:
            return e.strerror or str(e)
    return None


def _same_kvstore(env: dict | None) -> dict:
    """``env`` (default: ours) with the kvstore this process runs first on PYTHONPATH,
    so the servers run the same code as their parent (not an installed copy)."""
    import kvstore
    env = dict(os.environ if env is None else env)
    root = os.path.dirname(os.path.dirname(os.path.abspath(kvstore.__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


class LocalCluster:
    def __init__(self, directory: str, nodes: int = 3, shards: int = 1, *,
                 log_format: str = "text", env: dict | None = None,
                 python: str = sys.executable, tuning: dict | None = None,
                 keys: str | None = None, port_base: int | None = None,
                 metrics: bool = False) -> None:
        """``metrics=True``: each node also serves ``/metrics``, ``/healthz`` and
        ``/readyz`` on a free port of 127.0.0.1 (``metrics_addresses``: name -> HOST:PORT)."""
        from kvstore.node.config import MAX_SHARDS
        if isinstance(nodes, bool) or not isinstance(nodes, int) or not 1 <= nodes <= 64:
            raise InvalidArgument(f"--nodes must be in 1..64, got {nodes}")
        if isinstance(shards, bool) or not isinstance(shards, int) \
                or not 1 <= shards <= MAX_SHARDS:
            raise InvalidArgument(f"--shards must be in 1..{MAX_SHARDS}, got {shards}")
        if port_base is not None and not 1 <= port_base <= 65535 - 10000 - (nodes - 1):
            raise InvalidArgument(f"--port-base must be in 1..{65535 - 10000 - (nodes - 1)} "
                                  f"for {nodes} node(s) (their peer ports are 10000 above), "
                                  f"got {port_base}")
        self.directory = os.path.abspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        self.names = [f"n{i + 1}" for i in range(nodes)]
        self.shards = shards
        self.log_format = log_format
        self.env = _same_kvstore(env)
        self.python = python
        self.keys = keys  # a `kvstore keygen` directory: [security] curve on, clients use it
        self.config_path = os.path.join(self.directory, "cluster.toml")
        self.procs: dict = {}
        self._logs: dict = {}
        if os.path.exists(self.config_path):  # a restart of a cluster made before: same ports
            from kvstore.node.config import parse_cluster, read_toml
            self.shards, nodes_cfg = parse_cluster(read_toml(self.config_path), self.config_path)
            self.names = sorted(nodes_cfg)
            self.addresses = {n: nodes_cfg[n]["address"] for n in self.names}
            self.peer_addresses = {n: nodes_cfg[n]["peer_address"] for n in self.names}
            self.metrics_addresses = {n: nodes_cfg[n]["metrics"] for n in self.names
                                      if nodes_cfg[n]["metrics"]}
            first = self.addresses[self.names[0]]
            if port_base is not None and first != f"tcp://127.0.0.1:{port_base}":
                raise InvalidArgument(f"{self.config_path} already names the ports of its "
                                      f"cluster ({self.names[0]} at {first}); leave out "
                                      f"--port-base, or choose a new --dir")
        elif port_base is not None:
            self.addresses = {n: f"tcp://127.0.0.1:{port_base + i}"
                              for i, n in enumerate(self.names)}
            self.peer_addresses = {n: f"tcp://127.0.0.1:{port_base + i + 10000}"
                                   for i, n in enumerate(self.names)}
        else:
            # both ports chosen free: a derived peer port (client + 10000) may be taken
            self.addresses = {n: f"tcp://127.0.0.1:{free_port()}" for n in self.names}
            self.peer_addresses = {n: f"tcp://127.0.0.1:{free_port()}" for n in self.names}
        if not os.path.exists(self.config_path):
            self.metrics_addresses = ({n: f"127.0.0.1:{free_port()}" for n in self.names}
                                      if metrics else {})
            lines = [f"shards = {self.shards}", ""]
            if tuning:
                lines += ["[tuning]"] + [f"{k} = {v}" for k, v in tuning.items()] + [""]
            if keys:
                lines += ["[security]", "curve = true", f'keys = "{os.path.abspath(keys)}"', ""]
            for n in self.names:
                lines += [f"[nodes.{n}]", f'address = "{self.addresses[n]}"',
                          f'peer_address = "{self.peer_addresses[n]}"', f'data = "{n}"']
                if n in self.metrics_addresses:
                    lines.append(f'metrics = "{self.metrics_addresses[n]}"')
                lines.append("")
            with open(self.config_path, "w") as f:
                f.write("\n".join(lines))

    @property
    def address_list(self) -> list:
        return [self.addresses[n] for n in self.names]

    def log_path(self, name: str) -> str:
        return os.path.join(self.directory, f"{name}.log")

    def start(self, name: str) -> subprocess.Popen:
        if name in self.procs and self.procs[name].poll() is None:
            raise KVError(f"{name} is already running")
        log = open(self.log_path(name), "ab")
        self._logs[name] = log
        p = subprocess.Popen(
            [self.python, "-m", "kvstore.server", "--config", self.config_path, "--id", name,
             "--log-format", self.log_format],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=self.env,
            cwd=self.directory)
        self.procs[name] = p
        return p

    def start_all(self) -> None:
        for n in self.names:
            self.start(n)

    def check_ports(self) -> None:
        """Before starting: a KVError naming the first port a node could not listen on
        (its node, the port's role and the reason), rather than a node that dies."""
        for n in self.names:
            for role, address in (("clients", self.addresses[n]),
                                  ("peers", self.peer_addresses[n])):
                why = port_in_use(address)
                if why is not None:
                    raise KVError(f"port {address.rsplit(':', 1)[1]} is not free: {n} cannot "
                                  f"listen for {role} on {address} ({why})")

    def kill(self, name: str, sig: int = signal.SIGKILL, wait: float = 10.0) -> int | None:
        """Send ``sig``; for SIGKILL/SIGTERM/SIGINT wait (bounded) for the exit code."""
        p = self.procs[name]
        if p.poll() is not None:
            return p.returncode
        p.send_signal(sig)
        if sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT):
            try:
                return p.wait(wait)
            except subprocess.TimeoutExpired:
                p.kill()
                return p.wait(wait)
        return None

    def running(self) -> list:
        return [n for n, p in self.procs.items() if p.poll() is None]

    def client(self, timeout: float = 5.0, names=None):
        import kvstore
        names = names or self.names
        return kvstore.connect([self.addresses[n] for n in names], timeout=timeout,
                               keys=self.keys)

    def wait_ready(self, timeout: float = 30.0, names=None) -> dict:
        """Wait until every shard has a leader among the running nodes; their status."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            for n, p in self.procs.items():
                if p.poll() is not None and (names is None or n in names):
                    raise KVError(f"{n} exited with {p.returncode}: "
                                  f"{self.tail(n)}")
            try:
                st = self._leaders(names or self.running())
                if st is not None:
                    return st
            except Unavailable as e:
                last = e
            time.sleep(0.05)
        raise Unavailable(f"the local cluster had no leader for every shard within {timeout} s"
                          f" ({last})")

    def _leaders(self, names: list) -> dict | None:
        """``{"shards": [{"shard", "leader"}]}`` if every shard has a leader among ``names``
        and none of them is still recovering (a node that started after the others had
        voted does not vote before it has: README, "A node that lost its disk"), asked
        directly, so a dead node costs no wait; else None."""
        from kvstore.transport import wire
        with self.client(timeout=2.0, names=names) as c:
            core = c._core
            futures = [core.submit(wire.OP_STATUS, None, [], timeout=0.5, target=self.addresses[n])
                       for n in names]
            leaders: dict = {}
            for f in futures:
                try:
                    view = core.wait(f)
                except Unavailable:
                    continue
                for sv in view["shards"]:
                    if sv["role"] == "leader":
                        leaders[sv["shard"]] = view["node"]
                    if sv.get("state") == "recovering":  # not a voter yet: not ready
                        return None
            if len(leaders) == c.nshards:
                return {"shards": [{"shard": s, "leader": leaders[s]} for s in sorted(leaders)]}
        return None

    def tail(self, name: str, lines: int = 20) -> str:
        try:
            with open(self.log_path(name), "rb") as f:
                return b"".join(f.readlines()[-lines:]).decode("utf-8", "replace")
        except OSError:
            return ""

    def stop_all(self, timeout: float = 10.0) -> dict:
        """SIGTERM every node, wait (bounded), SIGKILL what is left; exit codes by name."""
        codes = {}
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for n, p in self.procs.items():
            try:
                codes[n] = p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                codes[n] = p.wait(5)
        return codes

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
        for p in self.procs.values():
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass
        for f in self._logs.values():
            f.close()
        self._logs = {}

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _log_line(lc: LocalCluster, name: str) -> str:
    """The last line a node logged (why it exited), for a one-line message."""
    lines = lc.tail(name, 1).strip()
    return lines or f"no log: {lc.log_path(name)}"


def run_local_cluster(nodes: int = 3, shards: int = 1, directory: str | None = None,
                      out=None, port_base: int | None = None) -> int:
    """``kvstore local-cluster``: start a cluster, print how to reach it, run until
    SIGINT, SIGTERM or SIGHUP, then stop every node. Exit code 0; 2 if a port is taken
    (nothing started) or a node cannot start (exit 2 of kvstore-server: everything
    stopped); 3 if it never became ready."""
    import tempfile
    out = out or sys.stdout
    directory = directory or tempfile.mkdtemp(prefix="kvstore-cluster-")
    stopping = []

    def on_signal(signum, _frame) -> None:
        stopping.append(signum)

    old = {s: signal.signal(s, on_signal) for s in STOP_SIGNALS}
    try:
        lc = LocalCluster(directory, nodes, shards, port_base=port_base)
        lc.check_ports()
    except KVError as e:
        for s, h in old.items():
            signal.signal(s, h)
        print(f"kvstore: the local cluster cannot start: {e}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        lc.start_all()
        try:
            st = lc.wait_ready(timeout=30)
        except (Unavailable, KVError) as e:
            print(f"kvstore: the local cluster did not start: {e}", file=sys.stderr)
            return 3
        addrs = ",".join(lc.address_list)
        print(f"kvstore local cluster: {len(lc.names)} node(s), {lc.shards} shard(s), "
              f"data and logs in {lc.directory}", file=out)
        for n in lc.names:
            print(f"  {n}  {lc.addresses[n]}  (peers: {lc.peer_addresses[n]})  "
                  f"pid {lc.procs[n].pid}", file=out)
        print("leaders: " + ", ".join(f"shard {s['shard']}: {s['leader']}" for s in st["shards"]),
              file=out)
        print(f"\n  export KVSTORE_CLUSTER={addrs}\n  kvstore put hello world && kvstore get hello"
              f"\n\nCtrl-C stops the cluster.", file=out, flush=True)
        failed = None
        while not stopping and failed is None:
            for n, p in lc.procs.items():
                if p.poll() is None or stopping:
                    continue
                if p.returncode == EXIT_CONFIG:  # it would fail the same way again
                    failed = n
                    break
                print(f"kvstore: {n} exited with {p.returncode}; restarting it "
                      f"(log: {lc.log_path(n)})", file=out, flush=True)
                lc.start(n)
            time.sleep(0.2)  # a supervisor poll; signals set `stopping`
        if failed is not None:
            print(f"kvstore: {failed} cannot run ({_log_line(lc, failed)}); stopping the "
                  f"cluster", file=sys.stderr, flush=True)
        else:
            print(f"kvstore: {signal.Signals(stopping[0]).name}: stopping the cluster",
                  file=out, flush=True)
        codes = lc.stop_all()
        print("stopped: " + ", ".join(f"{n} exit {c}" for n, c in codes.items()), file=out)
        return EXIT_CONFIG if failed is not None else 0
    finally:
        lc.close()
        for s, h in old.items():
            signal.signal(s, h)


def _accounts(shards: int) -> list:
    """Two accounts per shard for the demo's transfers (none with one shard)."""
    if shards < 2:
        return []
    by_shard: dict = {}
    i = 0
    while len(by_shard) < shards or any(len(v) < 2 for v in by_shard.values()):
        key = b"account/%d" % i
        i += 1
        by_shard.setdefault(shard_of(key, shards), [])
        if len(by_shard[shard_of(key, shards)]) < 2:
            by_shard[shard_of(key, shards)].append(key)
    # interleaved, so that each transfer (neighbours) crosses shards
    return [k for pair in zip(*(by_shard[s] for s in sorted(by_shard))) for k in pair]


def run_cluster_demo(nodes: int = 3, shards: int = 2, directory: str | None = None,
                     out=None, port_base: int | None = None) -> int:
    """``kvstore local-cluster --demo``: the cluster at work and failing over, then stopped.

    Starts ``nodes`` servers, writes and reads through every node, SIGKILLs the
    leader in the middle of a stream of writes and of transfers between
    accounts of different shards, shows the new leader, that every
    acknowledged write is still there and the accounts' total unchanged,
    restarts the killed node and shows it catch up. Returns 0, or 1 if
    something did not hold. A port that is not free stops it before it starts anything
    (KVError naming the port); SIGINT, SIGTERM or SIGHUP stop it with every node.
    """
    import shutil
    import tempfile
    import threading
    out = out or sys.stdout
    own_dir = directory is None
    directory = directory or tempfile.mkdtemp(prefix="kvstore-demo-")

    def say(text: str) -> None:
        print(text, file=out, flush=True)

    def on_signal(signum, _frame) -> None:
        print(f"kvstore: {signal.Signals(signum).name}: stopping the demo", file=sys.stderr,
              flush=True)
        raise KeyboardInterrupt  # unwinds to the finally below, which stops every node

    stop = threading.Event()  # ends the demo's writer threads, however the demo ends
    lc = None
    old = {s: signal.signal(s, on_signal) for s in STOP_SIGNALS if s != signal.SIGINT}
    try:
        lc = LocalCluster(directory, nodes, shards, port_base=port_base)
        lc.check_ports()
        t = time.monotonic()
        lc.start_all()
        st = lc.wait_ready(timeout=30)
        say(f"1. started {nodes} kvstore-server processes on 127.0.0.1 in "
            f"{time.monotonic() - t:.1f} s ({lc.directory}):")
        for n in lc.names:
            say(f"     {n}  {lc.addresses[n]}  pid {lc.procs[n].pid}")
        leader = st["shards"][0]["leader"]
        say(f"   shard 0 is led by {leader}")
        for n in lc.names:  # each node alone as the entry point
            with lc.client(names=[n]) as c:
                c.put(f"greeting/{n}", f"hello through {n}")
        with lc.client() as c:
            got = [c.get(f"greeting/{n}").decode() for n in lc.names]
        say(f"2. wrote one key through each node, read them back: {got}")
        accounts = _accounts(lc.shards)
        if accounts:
            with lc.client() as c:
                for a in accounts:
                    c.put(a, b"100")
            say(f"   {len(accounts)} accounts of 100 over {lc.shards} shards: a second thread "
                f"moves money between accounts of different shards (two-phase commit)")

        acked: list = []
        transfers: list = []

        def transferrer() -> None:
            with lc.client(timeout=10) as c:
                i = 0
                while accounts and not stop.is_set():
                    a, b = accounts[i % len(accounts)], accounts[(i + 1) % len(accounts)]
                    i += 1

                    def move(t):
                        t.put(a, b"%d" % (int(t.get(a)) - 1))
                        t.put(b, b"%d" % (int(t.get(b)) + 1))

                    try:
                        c.run_transaction(move, retries=50)
                    except (Unavailable, KVError):
                        continue  # a conflict or an unknown outcome: the audit still holds
                    transfers.append(i)

        def writer() -> None:
            with lc.client(timeout=10) as c:
                i = 0
                while not stop.is_set():
                    key = b"stream/%06d" % i
                    i += 1
                    if lc.shards > 1 and shard_of(key, lc.shards) != 0:
                        continue  # the stream goes to shard 0, whose leader is killed
                    try:
                        c.put(key, b"x")
                    except Unavailable:
                        continue
                    acked.append(key)

        w = threading.Thread(target=writer, daemon=True)
        w.start()
        tr = threading.Thread(target=transferrer, daemon=True)
        tr.start()
        deadline = time.monotonic() + 10
        while len(acked) < 300 and time.monotonic() < deadline:
            time.sleep(0.01)
        before = len(acked)
        t = time.monotonic()
        lc.kill(leader, signal.SIGKILL)
        say(f"3. a writer thread streams puts; after {before} acknowledged, SIGKILL the leader "
            f"{leader} (pid {lc.procs[leader].pid})")
        survivors = [n for n in lc.names if n != leader]
        while len(acked) == before and time.monotonic() - t < 30:
            time.sleep(0.001)
        failover = time.monotonic() - t
        st = lc.wait_ready(timeout=30, names=survivors)
        new_leader = st["shards"][0]["leader"]
        say(f"   {new_leader} now leads shard 0; the first write after the kill was acknowledged "
            f"{failover:.2f} s after it")
        deadline = time.monotonic() + 20
        while len(acked) < before + 300 and time.monotonic() < deadline:
            time.sleep(0.01)
        stop.set()
        w.join(30)
        tr.join(30)
        with lc.client(names=survivors) as c:
            missing = [k for k in acked if c.get(k) != b"x"]
            total = c.run_transaction(lambda t: sum(int(t.get(a)) for a in accounts), retries=50)
        say(f"4. {len(acked)} writes acknowledged in all ({len(acked) - before} after the kill); "
            f"read back from the survivors: {len(acked) - len(missing)} present, "
            f"{len(missing)} missing")
        if accounts:
            say(f"   {len(transfers)} cross-shard transfers committed meanwhile; the accounts "
                f"still hold {total} in all (a transaction reading all of them)")
        t = time.monotonic()
        lc.start(leader)
        caught_up = False
        while time.monotonic() - t < 30:
            with lc.client(names=[leader]) as c:
                st = c.status()
            replicas = st["shards"][0]["replicas"]
            if leader in replicas and replicas[leader] >= max(replicas.values()):
                caught_up = True
                break
            time.sleep(0.05)
        say(f"5. restarted {leader}: {'caught up' if caught_up else 'NOT caught up'} with the "
            f"others (applied slot {replicas.get(leader)}) in {time.monotonic() - t:.2f} s")
        codes = lc.stop_all()
        say("6. SIGTERM to every node: " + ", ".join(f"{n} exit {c}" for n, c in codes.items()))
        ok = (not missing and caught_up and all(c == 0 for c in codes.values())
              and total == 100 * len(accounts))
        say("every acknowledged write survived the leader's death" if ok
            else "SOMETHING DID NOT HOLD: see the node logs in " + lc.directory)
        return 0 if ok else 1
    finally:
        stop.set()
        if lc is not None:
            lc.close()
        for s, h in old.items():
            signal.signal(s, h)
        if own_dir:
            shutil.rmtree(directory, ignore_errors=True)
