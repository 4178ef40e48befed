"""``/v1/lease``: leases over HTTP, as etcd's gateway has them.

A lease granted over HTTP has no client object behind it keeping it alive (in
Python, an ``AsyncLease`` does that while it lives): the gateway grants it on every
shard and forgets it, and keeping it alive (``POST /v1/lease/{id}/keepalive``, about
every ttl / 3) is the HTTP client's job, as with etcd. A gateway that restarts or a
client that stops calling changes nothing for the lease but that: once its ttl passes
without a keep-alive, its keys are deleted.

Ids are 63-bit integers, sent as decimal **strings** in JSON (JavaScript's numbers
are exact only to 2**53), taken as a string or a number.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from kvstore.aio import AsyncLease
from kvstore.commands import check_lease_id, check_ttl
from kvstore.errors import InvalidArgument, LeaseExpired
from kvstore.gateway import codec


def lease_id(text: object, what: str = "the lease id") -> int:
    """A lease id from a path, a query or JSON: decimal digits (a string or a number)."""
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    if isinstance(text, str):
        if not text.isdigit() or len(text) > 19:
            raise InvalidArgument(f"{what} is a decimal integer (as POST /v1/lease answers "
                                  f"it), got {text[:40]!r}")
        text = int(text)
    return check_lease_id(text)


def ttl_seconds(value: object, what: str = "ttl") -> float:
    """A ttl in seconds (a JSON number or a query's decimal), checked as ``put(ttl=)``."""
    if isinstance(value, bytes):
        try:
            value = float(value.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            raise InvalidArgument(f"{what} is a number of seconds, got {value[:40]!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgument(f"{what} is a number of seconds")
    check_ttl(value)
    return value


async def grant(request: Request) -> Response:
    """``{"ttl": SECONDS}`` -> ``{"id": "ID", "ttl": SECONDS}``, granted on every shard."""
    doc = codec.json_object(await codec.read_json(request), "the body", {"ttl": True})
    ttl = ttl_seconds(doc["ttl"])
    lease = await _db(request).lease(ttl)
    # Dropped here, which stops its keep-alive task: the HTTP client keeps it alive.
    return JSONResponse({"id": str(lease.id), "ttl": lease.ttl})


async def keepalive(request: Request) -> Response:
    """Refresh the lease on every shard: 200, or 404 ``LeaseExpired`` if it is gone."""
    lease = _handle(request)
    try:
        await lease.keepalive()
    except LeaseExpired:
        raise LeaseExpired(f"lease {lease.id} is gone (revoked, or its ttl passed without a "
                           f"keep-alive; its keys were deleted): grant a new one") from None
    return JSONResponse({"id": str(lease.id), "alive": True})


async def revoke(request: Request) -> Response:
    """End the lease now, deleting its keys: ``{"deleted": N}`` (0 for an unknown id)."""
    return JSONResponse({"deleted": await _handle(request).revoke()})


def _handle(request: Request) -> AsyncLease:
    """The lease the path names, with no keep-alive of its own (ttl is only shown)."""
    return AsyncLease(_db(request), lease_id(request.path_params["id"]), 0.0, keep_alive=False)


def _db(request: Request):
    return request.app.state.link.client()
