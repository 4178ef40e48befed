"""Every failure the gateway answers, translated to HTTP in one place (``error_response``).

A client of the gateway switches on the status and on the JSON body's ``error``, which
is the name of the contract's class (``kvstore.errors``, shared/API.md section 2) the
Python client would have raised, so the HTTP and the Python APIs fail alike:

    {"error": "Unavailable", "message": "no server answered within 5.0 s"}

Two names are the gateway's own: ``NotFound`` (a key that is absent, a route that
does not exist) and ``MethodNotAllowed``; ``InternalError`` is a bug in the gateway,
whose traceback the ASGI server logs (Starlette re-raises it after this answer) and
never sends to the client.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

from kvstore.errors import (Compacted, InvalidArgument, KVError, LeaseExpired, StorageError,
                            Timeout, TransactionConflict, Unavailable)


class NotFound(KVError):
    """The key is absent (GET), or no route answers the path."""


class PayloadTooLarge(InvalidArgument):
    """A request body over the route's bound: refused by its Content-Length, or as soon
    as the streamed body passes the bound, so the gateway never holds more than that."""


#: (class, HTTP status, the ``error`` name), the first match wins: subclasses first.
#: StorageError is 507 (Insufficient Storage), not 500, so a client can tell "the store's
#: disk refused" (full, read-only, corrupt: an operator's problem) from a gateway bug.
#: Unavailable (503) and Timeout (504) leave a write's outcome unknown, as in Python.
#: Compacted is 410 (Gone): the revisions asked for are gone for good, the body's
#: ``oldest`` says from where a watch can start. LeaseExpired is 404: no such lease.
STATUSES = (
    (NotFound, 404, "NotFound"),
    (LeaseExpired, 404, "LeaseExpired"),
    (Compacted, 410, "Compacted"),
    (PayloadTooLarge, 413, "InvalidArgument"),
    (InvalidArgument, 400, "InvalidArgument"),
    (TransactionConflict, 409, "TransactionConflict"),
    (Timeout, 504, "Timeout"),
    (Unavailable, 503, "Unavailable"),
    (StorageError, 507, "StorageError"),
)

#: Seconds a client should wait before retrying a 503 (an election takes about this long).
RETRY_AFTER_SECONDS = 1


def error_response(exc: BaseException) -> JSONResponse:
    """The one translation of an exception into an HTTP answer with a JSON body."""
    status, body = describe_error(exc)
    headers = dict(getattr(exc, "headers", None) or {})  # a 405's Allow, from the router
    if status == 503:
        headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
    return JSONResponse(body, status_code=status, headers=headers)


def describe_error(exc: BaseException) -> tuple[int, dict]:
    """The status and the JSON body of ``exc`` (also a watch stream's error line):
    ``{"error", "message"}``, and ``oldest`` (``{"SHARD": REVISION}``) for Compacted."""
    status, name, message = _classify(exc)
    body = {"error": name, "message": message}
    if isinstance(exc, Compacted) and exc.oldest is not None:
        oldest = exc.oldest
        body["oldest"] = ({str(s): r for s, r in oldest.items()} if isinstance(oldest, dict)
                          else oldest)
    return status, body


def _classify(exc: BaseException) -> tuple[int, str, str]:
    for cls, status, name in STATUSES:
        if isinstance(exc, cls):
            return status, name, str(exc) or name
    if isinstance(exc, KVError):  # another contract class (Compacted, a closed client...)
        return 500, type(exc).__name__, str(exc) or type(exc).__name__
    if isinstance(exc, HTTPException):  # raised by the router itself
        if exc.status_code == 404:
            return 404, "NotFound", "no such route (the routes are under /v1/; see docs/gateway.md)"
        if exc.status_code == 405:
            return 405, "MethodNotAllowed", "this route does not take that method (see Allow)"
        if exc.status_code < 500:
            return exc.status_code, "InvalidArgument", str(exc.detail)
    return 500, "InternalError", (f"unexpected error in the gateway ({type(exc).__name__}); "
                                  f"its traceback is in the gateway's log")
