"""The HTTP/JSON gateway (kvstore/gateway/, docs/gateway.md), as its users meet it.

A real HTTP client (httpx) against a real gateway process (``python -m kvstore.cli
gateway``) over real ``kvstore-server`` processes (``LocalCluster``): every route, bytes
that are not text, each error's status and JSON body, the body bound, a leader's death
under load, and the gateway run by ``kvstore-server`` itself. Every wait is bounded;
every process is stopped at teardown.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import threading
import time
from urllib.parse import quote

import httpx
import pytest

from kvstore.keys import MAX_KEY_SIZE, MAX_VALUE_SIZE
from kvstore.server.local import LocalCluster, free_port
from conftest import PYTHON, child_env

pytestmark = pytest.mark.timeout(180)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text)


def kv_url(key: bytes) -> str:
    """``/v1/kv/KEY`` with every byte of the key percent-encoded (``/`` included)."""
    return "/v1/kv/" + quote(key, safe="")


class Gateway:
    """``kvstore gateway`` as a child process, its log in a file; ``close`` always ends it."""

    def __init__(self, addresses, log_path, timeout: float = 5.0, extra_args=()) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = str(log_path)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "kvstore.cli", "gateway", "--cluster", ",".join(addresses),
             "--listen", f"127.0.0.1:{self.port}", "--timeout", str(timeout), *extra_args],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log, env=child_env())
        wait_healthy(self.url, self.proc, self.log_path)

    def client(self, timeout: float = 30.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)

    def log(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def close(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode


def wait_healthy(url: str, proc=None, log_path=None, seconds: float = 30.0) -> None:
    """Poll ``/healthz`` until it answers 200 (bounded); fail at once if ``proc`` exited."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            log = open(log_path, "rb").read().decode("utf-8", "replace") if log_path else ""
            pytest.fail(f"the gateway exited with {proc.returncode}:\n{log[-2000:]}")
        try:
            if httpx.get(url + "/healthz", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)  # a poll of a process that has no event to await
    pytest.fail(f"{url}/healthz did not answer within {seconds} s")


def assert_error(response: httpx.Response, status: int, name: str) -> dict:
    """The documented shape of every error: the status, JSON, the class name, a message."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error", "message"} and body["error"] == name, body
    assert body["message"] and "Traceback" not in body["message"]
    return body


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    """A 3-node, 2-shard cluster and one gateway over it, shared by the route tests
    (each test uses its own keys)."""
    directory = tmp_path_factory.mktemp("gateway")
    lc = LocalCluster(str(directory / "cluster"), 3, 2, env=child_env())
    gw = None
    try:
        lc.start_all()
        lc.wait_ready()
        gw = Gateway(lc.address_list, directory / "gateway.log")
        yield gw
    finally:
        if gw is not None:
            gw.close()
        lc.close()


@pytest.fixture
def http(gateway):
    with gateway.client() as c:
        yield c


# -- routes -------------------------------------------------------------------------------

def test_put_get_delete_round_trip_any_bytes_raw_and_as_json(http):
    value = bytes(range(256)) * 3 + b"\x00\xff"
    keys = [b"rt/plain", b"rt/a/b/c", b"rt/\xff\x00\xfe not utf-8", "rt/ключ".encode()]
    for key in keys:
        r = http.put(kv_url(key), content=value)
        assert r.status_code == 204, r.text
        r = http.get(kv_url(key))
        assert r.status_code == 200 and r.content == value
        assert r.headers["content-type"] == "application/octet-stream"
        r = http.get(kv_url(key), headers={"Accept": "application/json"})
        assert r.json() == {"key": b64(key), "value": b64(value)}
    # Accept chooses: JSON when it ranks application/json first (wildcards do not outrank it).
    for accept, wanted in (("application/json, text/plain, */*", "json"),
                           ("application/json;q=0.5, */*", "raw"),
                           ("application/octet-stream, application/json;q=0.9", "raw"),
                           ("*/*", "raw"), ("text/html", "raw")):
        r = http.get(kv_url(keys[0]), headers={"Accept": accept})
        assert (r.json()["value"] == b64(value)) if wanted == "json" else (r.content == value)
    # A key's slashes may be sent as they are: the path after /v1/kv/ is the key.
    assert http.get("/v1/kv/rt/a/b/c").content == value
    # A JSON envelope: Content-Type application/json, the value in base64.
    r = http.put(kv_url(b"rt/json"), json={"value": b64(b"\x00json\xff")})
    assert r.status_code == 204, r.text
    assert http.get(kv_url(b"rt/json")).content == b"\x00json\xff"
    # A JSON document stored as it is: any other Content-Type is the value itself.
    doc = b'{"value": "not an envelope"}'
    http.put(kv_url(b"rt/doc"), content=doc, headers={"Content-Type": "text/plain"})
    assert http.get(kv_url(b"rt/doc")).content == doc
    assert http.put(kv_url(b"rt/empty"), content=b"").status_code == 204
    assert http.get(kv_url(b"rt/empty")).content == b""
    # Delete: whether it existed, then absent (404 NotFound, in JSON whatever Accept says).
    assert http.delete(kv_url(b"rt/plain")).json() == {"deleted": True}
    assert http.delete(kv_url(b"rt/plain")).json() == {"deleted": False}
    assert_error(http.get(kv_url(b"rt/plain")), 404, "NotFound")


def test_cas_sets_compares_and_deletes(http):
    url = "/v1/cas/" + quote(b"cas/\xffk", safe="")
    assert http.post(url, json={"expected": None, "new": b64(b"1")}).json() == {"succeeded": True}
    assert http.post(url, json={"expected": None, "new": b64(b"2")}).json() == {"succeeded": False}
    assert http.post(url, json={"expected": b64(b"9"), "new": b64(b"2")}).json() == \
        {"succeeded": False}
    assert http.post(url, json={"expected": b64(b"1"), "new": b64(b"2")}).json() == \
        {"succeeded": True}
    assert http.get(kv_url(b"cas/\xffk")).content == b"2"
    assert http.post(url, json={"expected": b64(b"2"), "new": None}).json() == {"succeeded": True}
    assert_error(http.get(kv_url(b"cas/\xffk")), 404, "NotFound")
    # Both fields are required: a missing one is a 400, not a silent "absent".
    assert_error(http.post(url, json={"new": b64(b"x")}), 400, "InvalidArgument")


def test_incr_is_exact_under_concurrent_callers(gateway, http):
    url = "/v1/incr/" + quote(b"incr/\xffhits", safe="")
    assert http.post(url).json() == {"value": 1}  # absent counts as 0; delta 1 by default
    assert http.post(url, json={"delta": 10}).json() == {"value": 11}
    assert http.post(url, json={"delta": -2}).json() == {"value": 9}

    def incrementer() -> None:
        with gateway.client() as c:
            for _ in range(25):
                assert c.post(url).status_code == 200
    threads = [threading.Thread(target=incrementer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert http.get("/v1/kv/" + quote(b"incr/\xffhits", safe="")).content == b"109"
    # Refusals change nothing: a delta that is no integer, a value that is no number.
    assert_error(http.post(url, json={"delta": "1"}), 400, "InvalidArgument")
    assert_error(http.post(url, json={"delta": 1.5}), 400, "InvalidArgument")
    assert_error(http.post(url, json={"delta": 2 ** 64}), 400, "InvalidArgument")
    http.put(kv_url(b"incr/text"), content=b"ten")
    body = assert_error(http.post("/v1/incr/incr/text"), 400, "InvalidArgument")
    assert "not a decimal integer" in body["message"]
    assert http.get(kv_url(b"incr/text")).content == b"ten"
    assert http.get("/v1/kv/" + quote(b"incr/\xffhits", safe="")).content == b"109"


def test_scan_in_byte_order_with_bounds_and_pages(http):
    keys = [b"scan/\x00", b"scan/a", b"scan/b", b"scan/c\xff", b"scan/d", b"scanx"]
    for k in keys:
        http.put(kv_url(k), content=b"v:" + k)
    r = http.get("/v1/scan", params={"prefix": "scan/"})
    body = r.json()
    assert [unb64(i["key"]) for i in body["items"]] == keys[:5]
    assert [unb64(i["value"]) for i in body["items"]] == [b"v:" + k for k in keys[:5]]
    assert body["count"] == 5 and body["more"] is False
    # Bounds are bytes, percent-encoded like keys; start inclusive, end exclusive.
    r = http.get("/v1/scan?prefix=scan/&start=scan/b&end=scan/d")
    assert [unb64(i["key"]) for i in r.json()["items"]] == [b"scan/b", b"scan/c\xff"]
    r = http.get("/v1/scan?prefix=scan/&start=scan/c%FF")
    assert [unb64(i["key"]) for i in r.json()["items"]] == [b"scan/c\xff", b"scan/d"]
    # Pages: limit cuts the answer and names where the next page starts.
    seen = []
    start = None
    for _ in range(10):
        params = {"prefix": "scan/", "limit": 2}
        url = "/v1/scan?" + "&".join(f"{k}={v}" for k, v in params.items())
        if start is not None:
            url += "&start=" + quote(start, safe="")
        page = http.get(url).json()
        seen += [unb64(i["key"]) for i in page["items"]]
        if not page["more"]:
            break
        start = unb64(page["next"])
    assert seen == keys[:5]


def test_transaction_runs_the_branch_its_compares_choose_atomically(http):
    # Keys on both shards (the cluster has 2), so the commit is two-phase.
    from kvstore.sharding import shard_of
    a = next(b"tx/a%d" % i for i in range(100) if shard_of(b"tx/a%d" % i, 2) == 0)
    b = next(b"tx/b%d" % i for i in range(100) if shard_of(b"tx/b%d" % i, 2) == 1)
    http.put(kv_url(a), content=b"100")
    move = {"compare": [{"key": b64(a), "value": b64(b"100")}, {"key": b64(b), "value": None}],
            "success": [{"op": "put", "key": b64(a), "value": b64(b"60")},
                        {"op": "put", "key": b64(b), "value": b64(b"40")},
                        {"op": "get", "key": b64(b)}],
            "failure": [{"op": "get", "key": b64(a)}, {"op": "delete", "key": b64(b)}]}
    body = http.post("/v1/txn", json=move).json()
    assert body["succeeded"] is True
    assert body["results"] == [{}, {}, {"value": b64(b"40")}]  # a get sees the writes before it
    assert http.get(kv_url(a)).content == b"60" and http.get(kv_url(b)).content == b"40"
    # The compares no longer hold: the failure branch runs, and only it.
    body = http.post("/v1/txn", json=move).json()
    assert body == {"succeeded": False, "results": [{"value": b64(b"60")}, {"deleted": True}]}
    assert http.get(kv_url(a)).content == b"60"
    assert_error(http.get(kv_url(b)), 404, "NotFound")
    # A bad operation anywhere refuses the whole request before anything runs.
    bad = {"success": [{"op": "put", "key": b64(a), "value": b64(b"0")},
                       {"op": "put", "key": b64(b)}]}
    assert_error(http.post("/v1/txn", json=bad), 400, "InvalidArgument")
    assert http.get(kv_url(a)).content == b"60"


def test_status_healthz_and_readyz(http):
    assert http.get("/healthz").json() == {"ok": True}
    ready = http.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ok"] is True
    assert [s["shard"] for s in ready.json()["shards"]] == [0, 1]
    status = http.get("/v1/status").json()
    assert len(status["nodes"]) == 3 and all(n["state"] == "up" for n in status["nodes"])
    assert all(s["leader"] for s in status["shards"])


# -- errors -------------------------------------------------------------------------------

def test_bad_input_is_400_with_the_contract_class_and_changes_nothing(http):
    assert_error(http.get("/v1/kv/"), 400, "InvalidArgument")  # an empty key
    too_long = b"k" * (MAX_KEY_SIZE + 1)
    body = assert_error(http.put(kv_url(too_long), content=b"v"), 400, "InvalidArgument")
    assert "MAX_KEY_SIZE" in body["message"]
    url = kv_url(b"bad/k")
    assert_error(http.put(url, content=b"{not json", headers={"Content-Type": "application/json"}),
                 400, "InvalidArgument")
    assert_error(http.put(url, json={"value": "not base64!"}), 400, "InvalidArgument")
    assert_error(http.put(url, json={"value": b64(b"v"), "colour": 3}), 400, "InvalidArgument")
    assert_error(http.put(url, json=["a list"]), 400, "InvalidArgument")
    assert_error(http.post("/v1/txn", content=b"[1, 2"), 400, "InvalidArgument")
    assert_error(http.post("/v1/txn", json={"success": [{"op": "drop", "key": b64(b"k")}]}),
                 400, "InvalidArgument")
    assert_error(http.get("/v1/scan?limit=ten"), 400, "InvalidArgument")
    assert_error(http.get("/v1/scan?limit=1000000"), 400, "InvalidArgument")
    assert_error(http.get("/v1/scan?limit=0"), 400, "InvalidArgument")
    assert_error(http.get("/v1/scan?prefix=a&prefix=b"), 400, "InvalidArgument")
    assert_error(http.get("/v1/scan?prfix=a"), 400, "InvalidArgument")
    assert_error(http.get(url), 404, "NotFound")  # none of the above wrote anything


def test_unknown_routes_and_methods(http):
    assert_error(http.get("/v2/kv/x"), 404, "NotFound")
    assert_error(http.get("/"), 404, "NotFound")
    r = http.request("PATCH", "/v1/kv/x")
    assert_error(r, 405, "MethodNotAllowed")
    assert "PUT" in r.headers["allow"]
    assert_error(http.get("/v1/txn"), 405, "MethodNotAllowed")


def test_a_body_over_the_bound_is_refused_with_413_before_it_is_read(gateway, http):
    # The largest value is taken, raw and in base64 JSON.
    big = os.urandom(MAX_VALUE_SIZE)
    assert http.put(kv_url(b"big/raw"), content=big).status_code == 204
    assert http.get(kv_url(b"big/raw")).content == big
    assert http.put(kv_url(b"big/json"), json={"value": b64(big)}).status_code == 204
    assert http.get(kv_url(b"big/json")).content == big
    # One byte more is 413, with the contract's class for an oversized value.
    body = assert_error(http.put(kv_url(b"big/over"), content=big + b"x"), 413, "InvalidArgument")
    assert "MAX_VALUE_SIZE" in body["message"]
    # Announced at 100 MB and never sent: the answer comes from the headers alone.
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as s:
        s.sendall(b"PUT /v1/kv/big/huge HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n"
                  b"Content-Type: application/octet-stream\r\n\r\n")
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = s.recv(4096)
            assert chunk, answer
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]

    # Streamed without a length (chunked): refused once past the bound.
    def chunks():
        for _ in range(8):
            yield b"x" * (1 << 20)
    try:
        r = http.put(kv_url(b"big/chunked"), content=chunks())
        assert_error(r, 413, "InvalidArgument")
    except httpx.TransportError:
        pass  # the gateway answered and closed while the client was still sending
    assert_error(http.get(kv_url(b"big/chunked")), 404, "NotFound")
    assert_error(http.get(kv_url(b"big/over")), 404, "NotFound")


def test_requests_in_flight_are_bounded_and_healthz_never_waits(gateway, http):
    """MAX_REQUESTS_IN_FLIGHT requests whose bodies never come hold every slot: the next
    request waits (it is not refused, and takes no memory for a body), /healthz still
    answers, and once those clients go the waiting request is served."""
    from kvstore.gateway.app import MAX_REQUESTS_IN_FLIGHT
    http.put(kv_url(b"inflight/k"), content=b"v")
    stalled = []
    try:
        for i in range(MAX_REQUESTS_IN_FLIGHT):
            s = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
            s.sendall(b"PUT /v1/kv/stalled/%d HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n"
                      b"\r\n" % i)
            stalled.append(s)
        with pytest.raises(httpx.ReadTimeout):
            httpx.get(gateway.url + kv_url(b"inflight/k"), timeout=1.0)
        assert httpx.get(gateway.url + "/healthz", timeout=5.0).status_code == 200
    finally:
        for s in stalled:
            s.close()
    assert http.get(kv_url(b"inflight/k"), timeout=30).content == b"v"
    assert_error(http.get(kv_url(b"stalled/0")), 404, "NotFound")
    assert "Traceback" not in gateway.log()


def test_each_error_class_has_its_status():
    """The one translation function, for every class of the contract (the classes a
    healthy test cluster cannot be made to raise on demand are here, 409 and 507)."""
    from starlette.exceptions import HTTPException

    from kvstore.errors import (CorruptRecord, InvalidArgument, KVError, StorageError,
                                Timeout, TransactionConflict, Unavailable)
    from kvstore.gateway.errors import NotFound, PayloadTooLarge, error_response
    cases = [(InvalidArgument("x"), 400, "InvalidArgument"),
             (PayloadTooLarge("x"), 413, "InvalidArgument"),
             (NotFound("x"), 404, "NotFound"),
             (TransactionConflict("x"), 409, "TransactionConflict"),
             (Unavailable("x"), 503, "Unavailable"),
             (Timeout("x"), 504, "Timeout"),
             (StorageError("disk full", "/d"), 507, "StorageError"),
             (CorruptRecord("bad"), 507, "StorageError"),
             (KVError("closed"), 500, "KVError"),
             (HTTPException(404), 404, "NotFound"),
             (HTTPException(405, headers={"Allow": "GET"}), 405, "MethodNotAllowed"),
             (ZeroDivisionError("a bug"), 500, "InternalError")]
    for exc, status, name in cases:
        r = error_response(exc)
        body = json.loads(r.body)
        assert (r.status_code, body["error"]) == (status, name), exc
        assert body["message"]
    assert error_response(Unavailable("x")).headers["retry-after"] == "1"
    assert "a bug" not in json.loads(error_response(ZeroDivisionError("a bug")).body)["message"]


def test_unreachable_cluster_then_quorum_lost_503_504_and_readiness(tmp_path):
    """A gateway whose cluster is not up yet lives (/healthz) and answers 503 until the
    cluster answers, then serves; with both followers stopped, a write the leader took but
    could not replicate is 504 (Timeout: outcome unknown; 503 if a node said it cannot
    serve), never another 5xx, and /readyz says the shard has no quorum."""
    lc = LocalCluster(str(tmp_path / "cluster"), 3, 1, env=child_env())
    gw = Gateway(lc.address_list, tmp_path / "gateway.log", timeout=1.0)
    try:
        with gw.client() as http:
            assert http.get("/healthz").status_code == 200
            r = http.put(kv_url(b"k"), content=b"v")
            body = assert_error(r, 503, "Unavailable")
            assert r.headers["retry-after"] == "1" and "not reached the cluster" in body["message"]
            assert_error(http.get("/readyz"), 503, "Unavailable")
            lc.start_all()
            leader = lc.wait_ready()["shards"][0]["leader"]
            deadline = time.monotonic() + 30
            while http.get("/readyz").status_code != 200:  # it keeps connecting
                assert time.monotonic() < deadline, gw.log()[-2000:]
                time.sleep(0.1)
            assert http.put(kv_url(b"k"), content=b"v").status_code == 204
            followers = [n for n in lc.names if n != leader]
            for name in followers:  # stopped, not dead: the leader takes the write and
                lc.kill(name, signal.SIGSTOP)  # waits for a quorum until the deadline
            statuses = set()
            for _ in range(3):
                r = http.put(kv_url(b"k"), content=b"w")
                assert r.status_code in (503, 504), (r.status_code, r.text)
                assert_error(r, r.status_code, {503: "Unavailable", 504: "Timeout"}[r.status_code])
                statuses.add(r.status_code)
            assert 504 in statuses, statuses
            body = assert_error(http.get("/readyz"), 503, "Unavailable")
            assert "shard 0" in body["message"]
            for name in followers:
                lc.kill(name, signal.SIGCONT)
    finally:
        gw.close()
        lc.close()
    assert "Traceback" not in gw.log()


# -- a leader's death under load ------------------------------------------------------------

def test_sigkill_of_the_leader_under_puts_through_the_gateway(tmp_path):
    """Four threads PUT through the gateway while the shard's leader is SIGKILLed: every
    answer is 204 or a documented 503/504 (the outcome of those unknown), and every
    acknowledged put is read back, through the gateway, after the election."""
    lc = LocalCluster(str(tmp_path / "cluster"), 3, 1, env=child_env())
    gw = None
    try:
        lc.start_all()
        leader = lc.wait_ready()["shards"][0]["leader"]
        gw = Gateway(lc.address_list, tmp_path / "gateway.log", timeout=5.0)
        acked: list = []
        after_kill: list = []
        unexpected: list = []
        unknown: list = []
        stop = threading.Event()
        killed = threading.Event()

        def writer(w: int) -> None:
            with gw.client() as http:
                i = 0
                while not stop.is_set():
                    key = b"load/%d/%d" % (w, i)
                    i += 1
                    try:
                        r = http.put(kv_url(key), content=key)
                    except httpx.TransportError as e:
                        unexpected.append(f"{key!r}: {e!r}")
                        continue
                    if r.status_code == 204:
                        acked.append(key)
                        if killed.is_set():
                            after_kill.append(key)
                    elif r.status_code in (503, 504) and r.json()["error"] in (
                            "Unavailable", "Timeout"):
                        unknown.append(key)
                    else:
                        unexpected.append(f"{key!r}: {r.status_code} {r.text[:200]}")

        threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        try:
            deadline = time.monotonic() + 30
            while len(acked) < 100 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert len(acked) >= 100, f"puts did not flow before the kill: {unexpected[:3]}"
            lc.kill(leader, signal.SIGKILL)
            killed.set()
            deadline = time.monotonic() + 30
            while len(after_kill) < 100 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert len(after_kill) >= 100, "puts did not resume after the leader's death"
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        assert not unexpected, unexpected[:5]
        with gw.client() as http:
            missing = [k for k in acked if http.get(kv_url(k)).content != k]
        assert not missing, f"{len(missing)} acknowledged puts lost, e.g. {missing[:3]}"
    finally:
        if gw is not None:
            gw.close()
        lc.close()
    assert "Traceback" not in gw.log()


# -- the gateway run by kvstore-server ----------------------------------------------------------

def test_kvstore_server_runs_the_gateway_of_its_config_and_it_ends_with_the_node(tmp_path):
    """``[nodes.NAME] gateway`` in cluster.toml: the node serves HTTP there; SIGTERM stops
    both (exit 0); after a SIGKILL of the node its gateway exits by itself."""
    lc = LocalCluster(str(tmp_path / "cluster"), 1, 1, env=child_env())
    port = free_port()
    with open(lc.config_path) as f:
        config = f.read()
    with open(lc.config_path, "w") as f:
        f.write(config.replace("[nodes.n1]\n", f'[nodes.n1]\ngateway = "127.0.0.1:{port}"\n'))
    url = f"http://127.0.0.1:{port}"
    try:
        lc.start("n1")
        wait_healthy(url, lc.procs["n1"], lc.log_path("n1"))
        assert httpx.put(url + "/v1/kv/served", content=b"by the node").status_code == 204
        assert httpx.get(url + "/v1/kv/served").content == b"by the node"
        assert lc.stop_all() == {"n1": 0}
        assert_gone(url)
        lc.start("n1")
        wait_healthy(url, lc.procs["n1"], lc.log_path("n1"))
        assert httpx.get(url + "/v1/kv/served").content == b"by the node"
        lc.kill("n1", signal.SIGKILL)
        assert_gone(url)
    finally:
        lc.close()
    assert "Traceback" not in lc.tail("n1", 200)


def test_a_bad_or_taken_gateway_address_is_refused_at_once_in_one_line(tmp_path):
    """By kvstore-server (before the node starts) and by kvstore gateway: exit 2, one
    line naming the address, no traceback."""
    lc = LocalCluster(str(tmp_path / "cluster"), 1, 1, env=child_env())
    env = child_env()
    env.pop("KVSTORE_CLUSTER", None)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = "127.0.0.1:%d" % taken.getsockname()[1]
        server = [PYTHON, "-m", "kvstore.server", "--config", lc.config_path, "--id", "n1"]
        gateway = [PYTHON, "-m", "kvstore.cli", "gateway", "--cluster", lc.address_list[0]]
        for argv, expected in ((server + ["--gateway", "localhost"], "127.0.0.1:8080"),
                               (server + ["--gateway", busy], busy),
                               (gateway + ["--listen", "localhost"], "127.0.0.1:8080"),
                               (gateway + ["--listen", busy], busy),
                               (gateway[:4] + ["--listen", "127.0.0.1:1"], "--cluster")):
            r = subprocess.run(argv, capture_output=True, env=env, timeout=60)
            err = r.stderr.decode()
            assert r.returncode == 2 and expected in err, (argv, err)
            assert len(err.strip().splitlines()) == 1, err
    assert not os.path.exists(os.path.join(lc.directory, "n1")), "the node started"


def test_the_gateway_setting_of_a_node_is_checked_with_its_config(tmp_path):
    from kvstore.errors import InvalidArgument
    from kvstore.node.config import node_gateway
    config = tmp_path / "cluster.toml"
    config.write_text('[nodes.n1]\naddress = "tcp://127.0.0.1:7001"\ngateway = "127.0.0.1:8080"\n'
                      '[nodes.n2]\naddress = "tcp://127.0.0.1:7002"\n')
    assert node_gateway(str(config), "n1") == "127.0.0.1:8080"
    assert node_gateway(str(config), "n2") is None
    config.write_text('[nodes.n1]\naddress = "tcp://127.0.0.1:7001"\ngateway = 8080\n')
    with pytest.raises(InvalidArgument, match=r"\[nodes.n1\] gateway"):
        node_gateway(str(config), "n1")
    r = subprocess.run([PYTHON, "-m", "kvstore.server", "--config", str(config), "--id", "n1",
                        "--data", str(tmp_path / "n1")], capture_output=True, env=child_env(),
                       timeout=60)
    assert r.returncode == 2 and "gateway" in r.stderr.decode(), r.stderr


def assert_gone(url: str, seconds: float = 20.0) -> None:
    """The gateway at ``url`` stops answering within ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            httpx.get(url + "/healthz", timeout=1.0)
        except httpx.TransportError:
            return
        time.sleep(0.05)
    pytest.fail(f"the gateway at {url} still answers {seconds} s after its node stopped")
