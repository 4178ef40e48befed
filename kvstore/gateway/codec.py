"""Bytes in and out of HTTP: keys from the raw path, values as raw bodies or base64 JSON.

Keys and values are bytes (shared/API.md section 1), so nothing here decodes them as
text: a key is the percent-decoded *raw* path after the route's prefix (any byte can be
sent as ``%XX``), a scan bound likewise from the raw query string, and a value in JSON
is base64. Every malformed input is an ``InvalidArgument`` (400); every body is read
against a bound (``read_body``), refused with 413 before it is read when its
Content-Length is over it.
"""

from __future__ import annotations

import base64
import binascii
import json
from urllib.parse import unquote_to_bytes

from starlette.requests import ClientDisconnect, Request

from kvstore.errors import InvalidArgument
from kvstore.gateway.errors import PayloadTooLarge
from kvstore.keys import MAX_KEY_SIZE, MAX_VALUE_SIZE

#: A raw value's body: exactly the largest value the store takes.
RAW_BODY_MAX_BYTES = MAX_VALUE_SIZE
#: A JSON body: the largest value in base64 (4 bytes per 3), its key in base64, and room
#: for the envelope. A transaction's JSON is bounded by the same (its values in all).
JSON_BODY_MAX_BYTES = 4 * ((MAX_VALUE_SIZE + 2) // 3) + 4 * ((MAX_KEY_SIZE + 2) // 3) + 64 * 1024

JSON_TYPE = "application/json"
RAW_TYPE = "application/octet-stream"


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64decode(text: object, what: str) -> bytes:
    """Standard base64 (with padding) to bytes, or ``InvalidArgument`` naming the field."""
    if not isinstance(text, str):
        raise InvalidArgument(f"{what} must be a base64 string, not {_json_type(text)}")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise InvalidArgument(f"{what} is not valid base64 (standard alphabet, padded)") from None


def optional_b64decode(text: object, what: str) -> bytes | None:
    """``null`` (absent, in cas and compares) or base64 bytes."""
    return None if text is None else b64decode(text, what)


def _json_type(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            type(None): "null", int: "a number", float: "a number"}.get(type(value), "?")


def path_key(request: Request, prefix: str) -> bytes:
    """The key of a ``/v1/.../{key:path}`` route: the raw path after ``prefix``,
    percent-decoded to bytes (a key that is not UTF-8 survives as ``%XX``)."""
    raw = request.scope.get("raw_path") or request.url.path.encode("utf-8")
    raw = raw.split(b"?", 1)[0]
    head = prefix.encode("ascii")
    if not raw.startswith(head):  # a proxy rewrote the path: fall back on the decoded one
        return request.path_params["key"].encode("utf-8", "surrogateescape")
    return unquote_to_bytes(raw[len(head):])


def query_bytes(request: Request) -> dict[str, bytes]:
    """The query string's parameters as raw bytes (percent-decoded, ``+`` is a space);
    a name given twice is refused, so a typo cannot silently pick one of two values."""
    out: dict[str, bytes] = {}
    for part in request.scope.get("query_string", b"").split(b"&"):
        if not part:
            continue
        name, _, value = part.partition(b"=")
        key = unquote_to_bytes(name.replace(b"+", b" ")).decode("utf-8", "replace")
        if key in out:
            raise InvalidArgument(f"query parameter {key!r} is given twice")
        out[key] = unquote_to_bytes(value.replace(b"+", b" "))
    return out


def query_int(params: dict[str, bytes], name: str, default: int | None) -> int | None:
    if name not in params:
        return default
    text = params[name].decode("ascii", "replace")
    if not text.lstrip("-").isdigit() or len(text) > 19:
        raise InvalidArgument(f"query parameter {name} must be an integer, got {text!r}")
    return int(text)


def wants_json(request: Request) -> bool:
    """Content negotiation for a value's answer: JSON (base64) when the Accept header names
    ``application/json`` with a quality above that of ``application/octet-stream`` and
    no lower than any wildcard's (``application/json, text/plain, */*``, what many
    JavaScript clients send, is JSON); raw bytes otherwise (no Accept, ``*/*``: curl)."""
    quality: dict[str, float] = {}
    for media_range in request.headers.get("accept", "").split(","):
        kind, *params = [p.strip() for p in media_range.split(";")]
        q = 1.0
        for p in params:
            if p.startswith("q="):
                try:
                    q = float(p[2:])
                except ValueError:
                    q = 0.0
        kind = kind.lower()
        quality[kind] = max(q, quality.get(kind, 0.0))
    json_q = quality.get(JSON_TYPE, 0.0)
    wildcard_q = max(quality.get("*/*", 0.0), quality.get("application/*", 0.0))
    return json_q > 0 and json_q > quality.get(RAW_TYPE, 0.0) and json_q >= wildcard_q


def accepts(request: Request, media_type: str) -> bool:
    """The request's Accept names ``media_type`` itself with a quality above zero
    (a wildcard does not count: ``text/event-stream`` is asked for by name)."""
    for media_range in request.headers.get("accept", "").split(","):
        kind, *params = [p.strip() for p in media_range.split(";")]
        if kind.lower() == media_type:
            return all(_quality(p) > 0 for p in params if p.startswith("q="))
    return False


def _quality(param: str) -> float:
    try:
        return float(param[2:])
    except ValueError:
        return 0.0


def is_json_body(request: Request) -> bool:
    """A PUT's body is a JSON envelope ``{"value": base64}`` when its Content-Type is
    ``application/json``; any other type (or none) is the value itself, as bytes."""
    return request.headers.get("content-type", "").split(";")[0].strip().lower() == JSON_TYPE


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, at most ``limit`` bytes: over it, ``PayloadTooLarge`` (413) from
    the Content-Length alone, or as soon as a streamed (chunked) body passes it."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise InvalidArgument(f"Content-Length must be a number of bytes, got {declared!r}")
        if int(declared) > limit:
            raise PayloadTooLarge(f"the body is {declared} bytes; this route takes at most "
                                  f"{limit} (MAX_VALUE_SIZE = {MAX_VALUE_SIZE} for a value)")
    parts = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"the body is over {limit} bytes, the most this route "
                                      f"takes (MAX_VALUE_SIZE = {MAX_VALUE_SIZE} for a value)")
            parts.append(chunk)
    except ClientDisconnect:  # nobody reads the answer; nothing was done
        raise InvalidArgument("the client closed the connection before its body was "
                              "whole") from None
    return b"".join(parts)


async def read_json(request: Request, empty: object = None) -> object:
    """The body parsed as JSON (whatever its Content-Type says: these routes take only
    JSON), bounded by ``JSON_BODY_MAX_BYTES``; ``empty`` for an empty body."""
    body = await read_body(request, JSON_BODY_MAX_BYTES)
    if not body.strip():
        if empty is None:
            raise InvalidArgument("this route needs a JSON body")
        return empty
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as e:
        raise InvalidArgument(f"the body is not valid JSON: {e}") from None


def json_object(doc: object, what: str, fields: dict[str, bool]) -> dict:
    """``doc`` checked as an object with only ``fields`` (name -> required)."""
    if not isinstance(doc, dict):
        raise InvalidArgument(f"{what} must be a JSON object, not {_json_type(doc)}")
    unknown = sorted(set(doc) - set(fields))
    if unknown:
        raise InvalidArgument(f"{what} has unknown field(s) {', '.join(unknown)} "
                              f"(known: {', '.join(fields)})")
    missing = [name for name, required in fields.items() if required and name not in doc]
    if missing:
        raise InvalidArgument(f"{what} needs the field(s) {', '.join(missing)}")
    return doc


def json_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{what} must be an integer, not {_json_type(value)}")
    return value
