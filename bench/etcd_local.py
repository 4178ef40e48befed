"""etcd beside kvstore in the benchmarks: three local etcd members, and a small client.

``EtcdCluster(directory)`` starts three ``etcd`` members (Debian's etcd 3.4 is
``/usr/bin/etcd``) on free loopback ports in ``directory``, waits until they
answer, and stops them (SIGTERM, then SIGKILL) on exit. ``find_etcd()`` says where
the binary is, or None: the benchmarks then skip etcd with a message.

``EtcdClient`` speaks etcd's v3 JSON gateway (grpc-gateway, served on the client
port) over ``http.client``: no gRPC stubs, nothing to install. Keys and values are base64
in the JSON; a watch is ``POST /v3/watch`` whose response streams one JSON object
per line. The gateway transcodes JSON to gRPC inside each member, so etcd's figures
here include that cost (a Go client over gRPC would do better): the tables say so.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.parse


#: What the benchmarks print (stderr) when they run without etcd.
MISSING = "etcd: not installed (no executable $ETCD, no etcd on PATH): skipped, kvstore alone"


def find_etcd() -> str | None:
    """The etcd binary: ``$ETCD`` (if executable), else ``etcd`` on PATH, else None."""
    named = os.environ.get("ETCD")
    if named:
        return shutil.which(named)
    return shutil.which("etcd")


def etcd_version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
    return out.stdout.splitlines()[0].split()[-1] if out.stdout else "?"


def _free_ports(count: int) -> list:
    """``count`` distinct ports free on 127.0.0.1 now (bound together, then released)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


def _once(url: str, path: str, body: dict | None) -> dict:
    """One call on a connection of its own, closed after (2 s timeout)."""
    conn = EtcdConnection(url, timeout=2.0)
    try:
        return conn.call(path, body)
    finally:
        conn.close()


class EtcdCluster:
    """Three etcd members on 127.0.0.1 (``client_urls``), data in ``directory``."""

    def __init__(self, directory: str, binary: str, members: int = 3) -> None:
        self.directory, self.binary, self.members = directory, binary, members
        self.procs: list = []
        self.client_urls: list = []

    def __enter__(self) -> "EtcdCluster":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 30.0) -> None:
        ports = _free_ports(2 * self.members)
        names = [f"e{i}" for i in range(self.members)]
        peers = [f"http://127.0.0.1:{ports[2 * i + 1]}" for i in range(self.members)]
        self.client_urls = [f"http://127.0.0.1:{ports[2 * i]}" for i in range(self.members)]
        initial = ",".join(f"{n}={p}" for n, p in zip(names, peers))
        for name, client, peer in zip(names, self.client_urls, peers):
            data = os.path.join(self.directory, name)
            os.makedirs(data, exist_ok=True)
            log = open(os.path.join(self.directory, f"{name}.log"), "wb")
            self.procs.append(subprocess.Popen(
                [self.binary, "--name", name, "--data-dir", data,
                 "--listen-client-urls", client, "--advertise-client-urls", client,
                 "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                 "--initial-cluster", initial, "--initial-cluster-state", "new",
                 "--initial-cluster-token", "kvstore-bench", "--logger", "zap",
                 "--log-level", "warn"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
            log.close()
        deadline = time.monotonic() + timeout
        for url in self.client_urls:
            while True:
                try:
                    if _once(url, "/health", None).get("health") == "true":
                        break
                except (OSError, ValueError, RuntimeError, http.client.HTTPException):
                    pass
                if any(p.poll() is not None for p in self.procs):
                    raise RuntimeError(f"an etcd member exited; see {self.directory}/e*.log")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"etcd not healthy within {timeout} s")
                time.sleep(0.1)

    def leader_url(self) -> str:
        """The client URL of the member that leads now (kvstore's client also talks to
        its leader): the one whose own id is the leader its status names."""
        for url in self.client_urls:
            status = _once(url, "/v3/maintenance/status", {})
            if status.get("leader") == status.get("header", {}).get("member_id"):
                return url
        return self.client_urls[0]

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 2 s (a member shutting down gracefully can take
        seconds; its data is a temporary directory, nothing to keep)."""
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(2)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        self.procs = []


class EtcdClient:
    """etcd's v3 JSON gateway at ``url`` (one member): put, get, leases, watch."""

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        self.url = url
        self.conn = EtcdConnection(url, timeout)

    def close(self) -> None:
        self.conn.close()

    def _call(self, path: str, body: dict) -> dict:
        return self.conn.call(path, body)

    def put(self, key: bytes, value: bytes, lease: int | None = None) -> int:
        """The revision of the put."""
        body = {"key": b64(key), "value": b64(value)}
        if lease:
            body["lease"] = str(lease)
        return int(self._call("/v3/kv/put", body)["header"]["revision"])

    def get(self, key: bytes) -> bytes | None:
        kvs = self._call("/v3/kv/range", {"key": b64(key)}).get("kvs")
        return unb64(kvs[0].get("value")) if kvs else None

    def lease_grant(self, ttl_s: int) -> int:
        """A lease of ``ttl_s`` whole seconds (etcd raises a ttl below its minimum)."""
        reply = self._call("/v3/lease/grant", {"TTL": str(ttl_s)})
        return int(reply["ID"])

    def lease_keepalive(self, lease: int) -> int:
        """One keep-alive (the gateway ends the stream after one answer): the ttl left."""
        reply = self._call("/v3/lease/keepalive", {"ID": str(lease)})
        return int(reply.get("result", reply).get("TTL", 0))

    def watch(self, prefix: bytes) -> "EtcdWatch":
        return EtcdWatch(self.url, prefix)


class EtcdConnection:
    """One keep-alive ``http.client`` connection to a member's gateway: the cheapest
    call from Python (one per load thread; httpx's asyncio client was the bottleneck,
    near 150 puts/s whatever the concurrency)."""

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        parts = urllib.parse.urlsplit(url)
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)

    def call(self, path: str, body: dict | None = None) -> dict:
        """POST ``body`` as JSON to ``path`` (GET without a body): the JSON answer."""
        if body is None:
            self.conn.request("GET", path)
        else:
            self.conn.request("POST", path, body=json.dumps(body),
                              headers={"Content-Type": "application/json"})
        response = self.conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"etcd {path}: HTTP {response.status}: {data[:200]!r}")
        return json.loads(data)

    def put(self, key: bytes, value: bytes) -> None:
        self.call("/v3/kv/put", {"key": b64(key), "value": b64(value)})

    def close(self) -> None:
        self.conn.close()


def prefix_end(prefix: bytes) -> bytes:
    """etcd's range_end for a prefix: the prefix with its last byte plus one."""
    p = bytearray(prefix)
    while p and p[-1] == 0xFF:
        p.pop()
    if not p:
        return b"\x00"
    p[-1] += 1
    return bytes(p)


class EtcdWatch:
    """A prefix watch on one member from now: a thread reads the stream and queues
    ``(perf_counter at arrival, type, key, value, revision)`` per event. The stream is
    an ``http.client`` connection, so ``close()`` can shut its socket down and the
    reading thread ends at once."""

    def __init__(self, url: str, prefix: bytes) -> None:
        self.events: queue.Queue = queue.Queue()
        self._created = threading.Event()
        parts = urllib.parse.urlsplit(url)
        self._conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        body = {"create_request": {"key": b64(prefix), "range_end": b64(prefix_end(prefix))}}
        self._conn.request("POST", "/v3/watch", body=json.dumps(body),
                           headers={"Content-Type": "application/json"})
        self._response = self._conn.getresponse()
        self._conn.sock.settimeout(None)  # a watch waits as long as it takes
        self._thread = threading.Thread(target=self._run, daemon=True, name="etcd-watch")
        self._thread.start()
        if not self._created.wait(30):
            self.close()
            raise TimeoutError("etcd watch not created within 30 s")

    def _run(self) -> None:
        try:
            while True:
                line = self._response.readline()
                if not line:
                    return
                now = time.perf_counter()
                result = json.loads(line).get("result", {})
                if result.get("created"):
                    self._created.set()
                for e in result.get("events", ()):
                    kv = e["kv"]
                    self.events.put((now, e.get("type", "PUT"), unb64(kv.get("key")),
                                     unb64(kv.get("value")), int(kv.get("mod_revision", 0))))
        except (OSError, ValueError, http.client.HTTPException):
            pass  # closed
        finally:
            self.events.put(None)

    def get(self, timeout: float | None = None):
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        """Shut the stream's socket down: the reading thread wakes up and ends."""
        sock = self._conn.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(5)
        self._conn.close()

    def __enter__(self) -> "EtcdWatch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------- gRPC
# etcd's own protocol, as its Go client and the ``etcd3`` Python package speak it:
# gRPC over HTTP/2 (``grpcio``, the ``[bench]`` extra). The two messages the benchmarks
# send are encoded here by hand (protobuf: a tag byte, a varint length, the bytes), so
# nothing is generated and no ``protobuf`` package is needed; a get's answer is read
# just far enough to return the value.

PUT_METHOD = "/etcdserverpb.KV/Put"
RANGE_METHOD = "/etcdserverpb.KV/Range"


def has_grpc() -> bool:
    """Whether ``grpcio`` is installed (etcd is then reached over gRPC, else the gateway)."""
    import importlib.util
    return importlib.util.find_spec("grpc") is not None


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(number: int, data: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return bytes([number << 3 | 2]) + _varint(len(data)) + data


def put_request(key: bytes, value: bytes) -> bytes:
    """``PutRequest{key, value}``."""
    return _field(1, key) + _field(2, value)


def range_request(key: bytes) -> bytes:
    """``RangeRequest{key}``: one key, linearizable (``serializable`` false, the default)."""
    return _field(1, key)


def _read_varint(data: bytes, i: int) -> tuple:
    n = shift = 0
    while True:
        b = data[i]
        i += 1
        n |= (b & 0x7F) << shift
        if b < 0x80:
            return n, i
        shift += 7


def _fields(data: bytes):
    """``(number, value)`` of each field of a protobuf message (varints and bytes)."""
    i = 0
    while i < len(data):
        tag, i = _read_varint(data, i)
        number, kind = tag >> 3, tag & 7
        if kind == 0:
            value, i = _read_varint(data, i)
        elif kind == 2:
            n, i = _read_varint(data, i)
            value, i = data[i:i + n], i + n
        else:
            raise ValueError(f"protobuf wire type {kind} not expected from etcd")
        yield number, value


def range_value(response: bytes) -> bytes | None:
    """The value of the first ``KeyValue`` (field 2, its field 5) of a ``RangeResponse``."""
    for number, kv in _fields(response):
        if number == 2:
            return next((v for n, v in _fields(kv) if n == 5), b"")
    return None


def _identity(data: bytes) -> bytes:
    return data


class EtcdGrpc:
    """Put and linearizable get on one member over gRPC, blocking (``grpc`` channel)."""

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        import grpc
        self.timeout = timeout
        self.channel = grpc.insecure_channel(urllib.parse.urlsplit(url).netloc)
        self._put = self.channel.unary_unary(PUT_METHOD, _identity, _identity)
        self._range = self.channel.unary_unary(RANGE_METHOD, _identity, _identity)

    def put(self, key: bytes, value: bytes) -> None:
        self._put(put_request(key, value), timeout=self.timeout)

    def get(self, key: bytes) -> bytes | None:
        return range_value(self._range(range_request(key), timeout=self.timeout))

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "EtcdGrpc":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncEtcdGrpc:
    """The same calls as coroutines (``grpc.aio``; many in flight on one channel).
    Made inside the event loop that uses it."""

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        import grpc.aio
        self.timeout = timeout
        self.channel = grpc.aio.insecure_channel(urllib.parse.urlsplit(url).netloc)
        self._put = self.channel.unary_unary(PUT_METHOD, _identity, _identity)
        self._range = self.channel.unary_unary(RANGE_METHOD, _identity, _identity)

    async def put(self, key: bytes, value: bytes) -> None:
        await self._put(put_request(key, value), timeout=self.timeout)

    async def get(self, key: bytes) -> bytes | None:
        return range_value(await self._range(range_request(key), timeout=self.timeout))

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "AsyncEtcdGrpc":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
