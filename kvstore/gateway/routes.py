"""The gateway's routes: one handler per operation of the ``KV`` interface, plus probes.

Every handler takes the process's one shared ``AsyncKV`` (``request.app.state.link``,
made in the app's lifespan), reads its input through ``codec`` (bounded, checked, bytes
kept as bytes) and lets any error rise to ``errors.error_response``. The table of routes
is ``ROUTES``; docs/gateway.md is its reference.
"""

from __future__ import annotations

import json

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from kvstore.ops.health import quorum_problems
from kvstore.errors import InvalidArgument, Unavailable
from kvstore.gateway import codec, leases, txn, watch
from kvstore.gateway.errors import NotFound

#: Rows one scan answers at most; without ``limit`` a scan answers this many and says
#: ``"more": true`` if there are others, so one request never holds a whole store.
SCAN_LIMIT_MAX = 10_000


def _db(request: Request):
    return request.app.state.link.client()


def _shown(key: bytes) -> str:
    """A key in a message: readable when it is text, exact when it is not."""
    return key.decode("utf-8", "backslashreplace")


async def get_key(request: Request) -> Response:
    key = codec.path_key(request, "/v1/kv/")
    value = await _db(request).get(key)
    if value is None:
        raise NotFound(f"key not found: {_shown(key)}")
    if codec.wants_json(request):
        return JSONResponse({"key": codec.b64encode(key), "value": codec.b64encode(value)})
    return Response(value, media_type=codec.RAW_TYPE)


async def put_key(request: Request) -> Response:
    """The value raw or in ``{"value": B64}``; the key held by a lease (``lease=ID``) or
    for ``ttl=SECONDS``, in the query or in the JSON envelope, not both."""
    key = codec.path_key(request, "/v1/kv/")
    params = codec.query_bytes(request)
    unknown = sorted(set(params) - {"lease", "ttl"})
    if unknown:
        raise InvalidArgument(f"PUT has no parameter {', '.join(unknown)} (known: lease, ttl)")
    held = dict(params)
    if codec.is_json_body(request):
        doc = codec.json_object(await codec.read_json(request), "the body",
                                {"value": True, "lease": False, "ttl": False})
        value = codec.b64decode(doc["value"], "value")
        for name in ("lease", "ttl"):
            if name in doc:
                if name in held:
                    raise InvalidArgument(f"{name} is given in the query and in the body")
                held[name] = doc[name]
    else:
        value = await codec.read_body(request, codec.RAW_BODY_MAX_BYTES)
    if "lease" in held and "ttl" in held:
        raise InvalidArgument("put takes lease or ttl, not both")
    lease = leases.lease_id(held["lease"], "lease") if "lease" in held else None
    ttl = leases.ttl_seconds(held["ttl"]) if "ttl" in held else None
    await _db(request).put(key, value, lease=lease, ttl=ttl)
    return Response(status_code=204)


async def delete_key(request: Request) -> Response:
    key = codec.path_key(request, "/v1/kv/")
    return JSONResponse({"deleted": await _db(request).delete(key)})


async def key_route(request: Request) -> Response:
    """One route for the three methods of ``/v1/kv/``, so a 405 lists them all in Allow."""
    handler = {"PUT": put_key, "DELETE": delete_key}.get(request.method, get_key)
    return await handler(request)


async def cas_key(request: Request) -> Response:
    """``{"expected": B64 or null, "new": B64 or null}``: null expected means "must be
    absent", null new means delete (``KV.cas``). A compare that fails is not an error:
    200 with ``"succeeded": false``, as etcd answers a failed Txn."""
    key = codec.path_key(request, "/v1/cas/")
    doc = codec.json_object(await codec.read_json(request), "the body",
                            {"expected": True, "new": True})
    expected = codec.optional_b64decode(doc["expected"], "expected")
    new = codec.optional_b64decode(doc["new"], "new")
    return JSONResponse({"succeeded": await _db(request).cas(key, expected, new)})


async def incr_key(request: Request) -> Response:
    """``{"delta": N}`` (default 1, an empty body allowed): one atomic command, the new
    value as a number."""
    key = codec.path_key(request, "/v1/incr/")
    doc = codec.json_object(await codec.read_json(request, empty={}), "the body",
                            {"delta": False})
    delta = codec.json_int(doc.get("delta", 1), "delta")
    return JSONResponse({"value": await _db(request).incr(key, delta)})


async def scan(request: Request) -> Response:
    """``?prefix=&start=&end=&limit=`` (bounds percent-encoded bytes, like keys): keys in
    byte order, base64 in JSON; ``more`` and ``next`` (the ``start`` of the next page)
    when the limit cut the answer short."""
    params = codec.query_bytes(request)
    unknown = sorted(set(params) - {"prefix", "start", "end", "limit"})
    if unknown:
        raise InvalidArgument(f"scan has no parameter {', '.join(unknown)} "
                              f"(known: prefix, start, end, limit)")
    limit = codec.query_int(params, "limit", SCAN_LIMIT_MAX)
    if not 1 <= limit <= SCAN_LIMIT_MAX:
        raise InvalidArgument(f"limit must be in 1..{SCAN_LIMIT_MAX}; page through more with "
                              f"start (the answer's next)")
    rows = await _db(request).scan(params.get("prefix", b""), start=params.get("start"),
                                   end=params.get("end"), limit=limit + 1)
    more = len(rows) > limit
    rows = rows[:limit]
    out = {"items": [{"key": codec.b64encode(k), "value": codec.b64encode(v)} for k, v in rows],
           "count": len(rows), "more": more}
    if more:  # the smallest key after the last one answered
        out["next"] = codec.b64encode(rows[-1][0] + b"\x00")
    return JSONResponse(out)


async def transaction(request: Request) -> Response:
    spec = txn.parse(await codec.read_json(request))
    return JSONResponse(await txn.run(_db(request), spec))


async def status(request: Request) -> Response:
    return _json(await _db(request).status())


async def healthz(request: Request) -> Response:
    """The process lives and answers: asks the cluster nothing (a liveness probe must not
    fail, and the gateway be restarted, because the cluster is electing a leader)."""
    return JSONResponse({"ok": True})


async def readyz(request: Request) -> Response:
    """Ready when every shard has a leader and a quorum of its replicas answering
    (``status``), by the rule ``kvstore status`` exits 3 on; else 503 naming the shards
    that have not."""
    st = await _db(request).status()
    problems = quorum_problems(st)
    if problems:
        raise Unavailable("not ready: " + "; ".join(problems))
    return JSONResponse({"ok": True, "shards": [
        {"shard": s["shard"], "leader": s["leader"]} for s in st["shards"]]})


def _json(doc: object) -> Response:
    """A JSON answer of a document that may hold what JSON cannot (bytes, sets)."""
    return Response(json.dumps(doc, default=str), media_type=codec.JSON_TYPE)


ROUTES = [
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/v1/kv/{key:path}", key_route, methods=["GET", "PUT", "DELETE"]),
    Route("/v1/cas/{key:path}", cas_key, methods=["POST"]),
    Route("/v1/incr/{key:path}", incr_key, methods=["POST"]),
    Route("/v1/scan", scan, methods=["GET"]),
    Route("/v1/txn", transaction, methods=["POST"]),
    Route("/v1/status", status, methods=["GET"]),
    Route("/v1/watch", watch.watch, methods=["GET"]),
    Route("/v1/lease", leases.grant, methods=["POST"]),
    Route("/v1/lease/{id}", leases.revoke, methods=["DELETE"]),
    Route("/v1/lease/{id}/keepalive", leases.keepalive, methods=["POST"]),
]
