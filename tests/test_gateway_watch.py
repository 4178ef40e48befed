"""Watch, leases and TTLs over the HTTP/JSON gateway (docs/gateway.md), as a user meets them.

A real HTTP client (httpx) against a real gateway process over real ``kvstore-server``
processes, as tests/test_gateway.py: a watch stream sees every write once and in
order, resumes by its position after the connection is cut (NDJSON and SSE), says
410 ``Compacted`` naming the oldest revision; a key put with a ttl vanishes; a
lease's key vanishes when it is revoked or no longer kept alive; bad input is a 4xx
that changes nothing. Every wait is bounded; every process is stopped at teardown.
"""

from __future__ import annotations

import json
import time
from urllib.parse import quote

import httpx
import pytest

from kvstore.server.local import LocalCluster
from conftest import child_env
from test_gateway import Gateway, assert_error, b64, kv_url, unb64

pytestmark = pytest.mark.timeout(180)

#: The nodes' watch history (all shards): small, so that a test can outgrow it.
HISTORY_BYTES = 60_000


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    """A 3-node, 2-shard cluster with a small watch history and one gateway over it."""
    directory = tmp_path_factory.mktemp("gatewatch")
    lc = LocalCluster(str(directory / "cluster"), 3, 2, env=child_env())
    with open(lc.config_path, "a") as f:
        f.write(f"\n[watch]\nhistory_bytes = {HISTORY_BYTES}\n")
    gw = None
    try:
        lc.start_all()
        lc.wait_ready()
        gw = Gateway(lc.address_list, directory / "gateway.log")
        gw.addresses = lc.address_list
        yield gw
    finally:
        if gw is not None:
            gw.close()
        lc.close()


@pytest.fixture
def http(gateway):
    with gateway.client() as c:
        yield c


class Stream:
    """One watch stream's lines (NDJSON), read as they come; ``close`` cuts the connection."""

    def __init__(self, client: httpx.Client, query: str, headers=None) -> None:
        self._cm = client.stream("GET", "/v1/watch?" + query, headers=headers or {})
        self.response = self._cm.__enter__()
        self._lines = self.response.iter_lines()

    def next(self) -> dict:
        return json.loads(next(self._lines))

    def next_event(self) -> dict:
        """The next event line (progress lines skipped)."""
        while True:
            doc = self.next()
            if "type" in doc or "error" in doc:
                return doc

    def close(self) -> None:
        self._cm.__exit__(None, None, None)


def put(http, key: bytes, value: bytes, **query) -> None:
    url = kv_url(key) + ("?" + "&".join(f"{k}={v}" for k, v in query.items()) if query else "")
    r = http.put(url, content=value)
    assert r.status_code == 204, r.text


def txn_put(http, pairs) -> None:
    r = http.post("/v1/txn", json={"success": [{"op": "put", "key": b64(k), "value": b64(v)}
                                               for k, v in pairs]})
    assert r.status_code == 200 and r.json()["succeeded"], r.text


def event(doc: dict) -> tuple:
    return doc["type"], unb64(doc["key"]), doc["value"] and unb64(doc["value"])


# -- watch ---------------------------------------------------------------------------------

def test_watch_streams_every_write_once_in_order_with_prev_values(gateway):
    with gateway.client() as http, gateway.client() as reader:
        s = Stream(reader, "prefix=w1/&prev_value=true")
        try:
            assert s.response.status_code == 200
            assert s.response.headers["content-type"].startswith("application/x-ndjson")
            created = s.next()
            assert created["created"] is True and created["position"]
            put(http, b"w1/a", b"1")
            put(http, b"w1/a", b"2")
            put(http, b"other/x", b"not watched")
            put(http, b"w1/\xff", b"\x00bin")
            assert http.delete(kv_url(b"w1/a")).json() == {"deleted": True}
            txn_put(http, [(b"w1/t1", b"x"), (b"w1/t2", b"y")])  # perhaps one revision
            got = [s.next_event() for _ in range(6)]
        finally:
            s.close()
    assert [event(d) for d in got if d["shard"] == got[0]["shard"]] == [
        e for e in [("put", b"w1/a", b"1"), ("put", b"w1/a", b"2"), ("put", b"w1/\xff", b"\x00bin"),
                    ("delete", b"w1/a", None), ("put", b"w1/t1", b"x"), ("put", b"w1/t2", b"y")]
        if e in [event(d) for d in got if d["shard"] == got[0]["shard"]]]
    assert sorted(event(d) for d in got) == sorted([
        ("put", b"w1/a", b"1"), ("put", b"w1/a", b"2"), ("put", b"w1/\xff", b"\x00bin"),
        ("delete", b"w1/a", None), ("put", b"w1/t1", b"x"), ("put", b"w1/t2", b"y")])
    by_key = {}
    for d in got:
        by_key.setdefault(unb64(d["key"]), []).append(d)
    a = by_key[b"w1/a"]
    assert [x["prev_value"] for x in a] == [None, b64(b"1"), b64(b"2")]
    assert a[0]["revision"] < a[1]["revision"] < a[2]["revision"]
    for shard in {d["shard"] for d in got}:
        revisions = [d["revision"] for d in got if d["shard"] == shard]
        assert revisions == sorted(revisions)


def test_watch_of_one_key_and_from_a_revision(gateway, http):
    put(http, b"w2/k", b"old")
    with gateway.client() as reader:
        s = Stream(reader, "key=" + quote(b"w2/k", safe=""))
        try:
            s.next()
            put(http, b"w2/kk", b"a longer key: not this watch's")
            put(http, b"w2/k", b"new")
            first = s.next_event()
            assert event(first) == ("put", b"w2/k", b"new") and "prev_value" not in first
        finally:
            s.close()
        # From a revision: the history replays it (the write before the watch existed).
        s = Stream(reader, f"key=w2/k&start_revision={first['revision']}")
        try:
            assert s.next() == {"created": True,
                                "position": f"{first['shard']}:{first['revision']}"}
            assert event(s.next_event()) == ("put", b"w2/k", b"new")
        finally:
            s.close()


def test_watch_resumes_by_position_after_its_connection_is_cut(gateway, http):
    """Cut after each event in turn, the middle of a two-key revision included: from
    the last line's position every event comes exactly once, in order."""
    with gateway.client() as reader:
        s = Stream(reader, "prefix=w3/")
        position = s.next()["position"]
        s.close()
        expected = []
        for i in range(4):
            put(http, b"w3/k%d" % i, b"v%d" % i)
            expected.append(("put", b"w3/k%d" % i, b"v%d" % i))
        pairs = [(b"w3/t%d" % i, b"t") for i in range(3)]  # a transaction: 1 or 2 shards
        txn_put(http, pairs)
        expected += [("put", k, v) for k, v in pairs]
        seen = []
        while len(seen) < len(expected):  # one event per connection, then cut
            s = Stream(reader, "prefix=w3/&position=" + quote(position))
            try:
                assert s.next()["created"]
                doc = s.next_event()
            finally:
                s.close()
            seen.append(event(doc))
            position = doc["position"]
        assert sorted(seen) == sorted(expected)  # each once
        # Resuming from the end gives nothing old: the next line is a new write.
        s = Stream(reader, "prefix=w3/&position=" + quote(position))
        try:
            s.next()
            put(http, b"w3/last", b"z")
            assert event(s.next_event()) == ("put", b"w3/last", b"z")
        finally:
            s.close()


def test_server_sent_events_resume_by_last_event_id(gateway, http):
    def sse_events(response, n):
        out, fields = [], {}
        for line in response.iter_lines():
            if line == "":
                if fields.get("event") not in (None, "created", "progress"):
                    out.append(fields)
                    if len(out) == n:
                        return out
                fields = {}
            else:
                name, _, value = line.partition(": ")
                fields[name] = value
        return out

    with gateway.client() as reader:
        with reader.stream("GET", "/v1/watch?prefix=w4/",
                           headers={"Accept": "text/event-stream"}) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            put(http, b"w4/a", b"1")
            put(http, b"w4/b", b"2")
            first = sse_events(r, 1)[0]
        assert first["event"] == "put"
        assert unb64(json.loads(first["data"])["key"]) == b"w4/a"
        with reader.stream("GET", "/v1/watch?prefix=w4/", headers={
                "Accept": "text/event-stream", "Last-Event-ID": first["id"]}) as r:
            again = sse_events(r, 1)[0]
        assert unb64(json.loads(again["data"])["key"]) == b"w4/b"


def test_watch_from_a_compacted_revision_is_410_naming_the_oldest(gateway, http):
    for i in range(40):  # about 3 times the history: revision 1 is long gone
        put(http, b"w5/%d" % i, b"x" * 4000)
    r = http.get("/v1/watch?prefix=w5/&start_revision=1")
    assert r.status_code == 410, r.text
    body = r.json()
    assert body["error"] == "Compacted" and "oldest" in body["message"]
    assert set(body["oldest"]) <= {"0", "1"} and all(v > 1 for v in body["oldest"].values())


def test_closing_the_connection_ends_the_watch(gateway, tmp_path):
    """With room for two streams, a third is a 503 until one of the two is cut: the cut
    ends that watch (even an idle one, waiting for events) and frees its place."""
    small = Gateway(gateway.addresses, tmp_path / "small.log", extra_args=["--max-watches", "2"])
    try:
        with small.client() as c1, small.client() as c2, small.client() as http:
            s1, s2 = Stream(c1, "prefix=w6/"), Stream(c2, "key=w6/k")
            try:
                assert s1.next()["created"] and s2.next()["created"]
                r = http.get("/v1/watch?prefix=w6/")
                assert_error(r, 503, "Unavailable")
                assert "MAX_WATCHES" in r.json()["message"]
                assert http.get("/v1/status").status_code == 200  # other routes still serve
                s1.close()
                deadline = time.monotonic() + 30
                while True:
                    with http.stream("GET", "/v1/watch?prefix=w6/") as r:
                        if r.status_code == 200:
                            break
                    assert r.status_code == 503 and time.monotonic() < deadline
                    time.sleep(0.05)  # the gateway notices the cut on its own time
                put(http, b"w6/k", b"still")  # the stream left open is still served
                assert event(s2.next_event()) == ("put", b"w6/k", b"still")
                assert http.head("/v1/watch?prefix=w6/").status_code == 200  # ends at once
                # SIGTERM: the open stream ends cleanly (its client resumes by position)
                # rather than holding the graceful shutdown until it is cut.
                small.close()
                assert [json.loads(line) for line in s2._lines if line] == []
            finally:
                s1.close()
                s2.close()
    finally:
        small.close()
    assert "Traceback" not in small.log() and "ERROR" not in small.log(), small.log()
    assert "graceful shutdown exceeded" not in small.log()


# -- leases and ttls -------------------------------------------------------------------------

def await_delete(stream: Stream, key: bytes) -> dict:
    while True:
        doc = stream.next_event()
        if unb64(doc["key"]) == key and doc["type"] == "delete":
            return doc


def test_a_key_put_with_a_ttl_vanishes(gateway, http):
    with gateway.client() as reader:
        s = Stream(reader, "key=l1/ttl")
        try:
            s.next()
            put(http, b"l1/ttl", b"brief", ttl=1)
            assert http.get(kv_url(b"l1/ttl")).content == b"brief"
            await_delete(s, b"l1/ttl")
        finally:
            s.close()
    assert_error(http.get(kv_url(b"l1/ttl")), 404, "NotFound")
    # In the JSON envelope too.
    r = http.put(kv_url(b"l1/json"), json={"value": b64(b"v"), "ttl": 30})
    assert r.status_code == 204, r.text


def test_lease_grant_keepalive_revoke(gateway, http):
    r = http.post("/v1/lease", json={"ttl": 30})
    assert r.status_code == 200, r.text
    lease = r.json()
    assert lease["ttl"] == 30 and isinstance(lease["id"], str) and int(lease["id"]) > 0
    put(http, b"l2/held", b"mine", lease=lease["id"])
    r = http.put(kv_url(b"l2/json"), json={"value": b64(b"also"), "lease": lease["id"]})
    assert r.status_code == 204, r.text
    r = http.post(f"/v1/lease/{lease['id']}/keepalive")
    assert r.json() == {"id": lease["id"], "alive": True}
    assert http.delete(f"/v1/lease/{lease['id']}").json() == {"deleted": 2}
    assert_error(http.get(kv_url(b"l2/held")), 404, "NotFound")
    assert_error(http.get(kv_url(b"l2/json")), 404, "NotFound")
    # Gone for good: a keep-alive or a put with it is a 404 LeaseExpired, writing nothing.
    assert_error(http.post(f"/v1/lease/{lease['id']}/keepalive"), 404, "LeaseExpired")
    r = http.put(kv_url(b"l2/late") + f"?lease={lease['id']}", content=b"x")
    assert_error(r, 404, "LeaseExpired")
    assert_error(http.get(kv_url(b"l2/late")), 404, "NotFound")


def test_a_lease_kept_alive_over_http_outlives_its_ttl(gateway, http):
    """Keep-alives every ttl / 5 for 1.5 ttl: the key is still there; then none: gone."""
    lease = http.post("/v1/lease", json={"ttl": 2}).json()
    put(http, b"l4/held", b"v", lease=lease["id"])
    with gateway.client() as reader:
        s = Stream(reader, "key=l4/held")
        try:
            s.next()
            end = time.monotonic() + 3.0
            while time.monotonic() < end:  # the client's job: a keep-alive timer
                assert http.post(f"/v1/lease/{lease['id']}/keepalive").status_code == 200
                time.sleep(0.4)
            assert http.get(kv_url(b"l4/held")).content == b"v"
            await_delete(s, b"l4/held")  # no more keep-alives
        finally:
            s.close()


def test_a_lease_not_kept_alive_expires_with_its_keys(gateway, http):
    """The gateway does not keep a lease alive: the HTTP client's job."""
    lease = http.post("/v1/lease", json={"ttl": 1}).json()
    with gateway.client() as reader:
        s = Stream(reader, "key=l3/held")
        try:
            s.next()
            put(http, b"l3/held", b"v", lease=lease["id"])
            assert http.get(kv_url(b"l3/held")).content == b"v"
            await_delete(s, b"l3/held")
        finally:
            s.close()
    assert_error(http.post(f"/v1/lease/{lease['id']}/keepalive"), 404, "LeaseExpired")


# -- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("query", [
    "key=a&prefix=b", "position=0:1&start_revision=3", "start_revision=0",
    "start_revision=x", "position=nonsense", "position=0:1,0:2", "position=0:0",
    "prev_value=maybe", "colour=blue", "key=",
])
def test_bad_watch_requests_are_400(http, query):
    assert_error(http.get("/v1/watch?" + query), 400, "InvalidArgument")


@pytest.mark.parametrize("query,body", [
    ("ttl=-1", None), ("ttl=abc", None), ("ttl=0", None), ("lease=0", None),
    ("lease=12abc", None), ("lease=1&ttl=5", None), ("colour=blue", None),
    ("", {"value": "dg==", "ttl": "5"}), ("", {"value": "dg==", "lease": -3}),
    ("ttl=5", {"value": "dg==", "ttl": 5}),
])
def test_bad_puts_are_400_and_write_nothing(http, query, body):
    url = kv_url(b"bad/put") + ("?" + query if query else "")
    r = http.put(url, json=body) if body is not None else http.put(url, content=b"v")
    assert_error(r, 400, "InvalidArgument")
    assert_error(http.get(kv_url(b"bad/put")), 404, "NotFound")


def test_bad_lease_requests_are_4xx(http):
    for body in ({}, {"ttl": -1}, {"ttl": "10"}, {"ttl": 10, "id": 5}, {"ttl": True}):
        assert_error(http.post("/v1/lease", json=body), 400, "InvalidArgument")
    assert_error(http.post("/v1/lease/abc/keepalive"), 400, "InvalidArgument")
    assert_error(http.delete("/v1/lease/0"), 400, "InvalidArgument")
    assert_error(http.post("/v1/lease/12345/keepalive"), 404, "LeaseExpired")


# -- the stream itself, over a scripted watch (no cluster) ---------------------------------------

class ScriptedWatch:
    """A ``kvstore.aio`` watch that yields ``script`` (events, then an error to raise)."""

    def __init__(self, script, position) -> None:
        self.script, self.position, self.closed = list(script), position, False

    async def get(self, timeout=None):
        item = self.script.pop(0)
        if isinstance(item, BaseException):
            raise item
        self.position = {item.shard: item.revision + 1}
        return item

    def close(self) -> None:
        self.closed = True


def test_a_stream_that_falls_behind_the_history_ends_with_a_failure_line():
    """Compacted after the headers (a reader slower than the history window): the
    stream's last line is the 410 error naming the oldest revision, then a clean end."""
    import asyncio
    from types import SimpleNamespace
    import kvstore
    from kvstore.gateway.watch import Position, WatchCount, WatchStream

    w = ScriptedWatch([kvstore.Event("put", b"k", b"v", 5, None, 0),
                       kvstore.Compacted("gone", oldest={0: 40})], {0: 5})
    count = WatchCount(10)
    sent = []

    async def run() -> None:
        count.open = 1
        spec = SimpleNamespace(sse=False, prev_value=False)
        stream = WatchStream(w, Position({}, {}), "0:5", None, spec, count)

        async def receive():
            await asyncio.Event().wait()  # the client stays

        async def send(message):
            sent.append(message)
        await asyncio.wait_for(stream({"type": "http", "method": "GET"}, receive, send), 10)

    asyncio.run(run())
    body = b"".join(m.get("body", b"") for m in sent[1:])
    lines = [json.loads(line) for line in body.splitlines()]
    assert lines[0] == {"created": True, "position": "0:5"}
    assert lines[1]["type"] == "put" and lines[1]["position"] == "0:6"
    assert lines[2]["error"] == "Compacted" and lines[2]["status"] == 410
    assert lines[2]["oldest"] == {"0": 40} and lines[2]["position"] == "0:6"
    assert sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
    assert w.closed and count.open == 0
