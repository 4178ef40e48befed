"""``GET /v1/watch``: a ``kvstore.aio`` watch streamed over HTTP, one event per line.

The stream is newline-delimited JSON (``application/x-ndjson``, what curl and most
HTTP libraries read line by line) or, when the request's Accept names
``text/event-stream``, Server-Sent Events: a browser's ``EventSource`` then resumes
by itself after a dropped connection, because every event's ``id`` is the position
to resume from and it sends it back as ``Last-Event-ID``.

Exactly once across reconnects: every line carries the watch's ``position`` after
it, ``"SHARD:REV[.SKIP],..."``; a client that passes the last one it read back as
``?position=`` gets exactly the events after that line. ``.SKIP`` counts the events
of revision ``REV`` already delivered (one transaction writes several keys at one
revision, and a connection may drop between them): the watch asks for ``REV`` again
and the gateway drops its first ``SKIP`` events of that shard, which are the same
events in the same order on every node (the log's order).

Bounded per connection: the events come from the watch only as the response is
written (``send`` waits while the socket's buffer is full), and the watch polls the
cluster again only once its consumer took the previous reply: a slow reader holds at
most one poll's reply per shard plus the socket buffer. An idle watch is a parked
poll on a node and a task here, nothing more. A watch ends when the client closes
the connection (the watch is closed, its polls dropped).
"""

from __future__ import annotations

import asyncio
import json
import logging

from starlette.requests import Request
from starlette.responses import Response

from kvstore.errors import Compacted, InvalidArgument, KVError, Unavailable
from kvstore.gateway import codec
from kvstore.gateway.errors import describe_error

log = logging.getLogger("kvstore.gateway")

#: Seconds without an event after which a ``progress`` line says where the watch is
#: (a position to resume from, and proof to the client and to proxies that it lives).
PROGRESS_SECONDS = 5.0
#: With a start revision or position, how long the answer's headers wait for the first
#: event: a ``Compacted`` found by then is a 410; later, it ends the stream (an error line).
FIRST_ANSWER_SECONDS = 2.0
#: Bytes of events one poll of a stream's watch asks for: what a stream buffers per shard
#: beyond the socket's buffer and the line being written (a revision bigger than this
#: comes whole). The client's default (1 MiB) times thousands of slow readers is too much.
POLL_BYTES = 64 * 1024
#: Watch streams open at once in one gateway process; over it a new one is a 503. They
#: do not take the request slots (``app.MAX_REQUESTS_IN_FLIGHT``): they last.
MAX_WATCHES = 4096

NDJSON_TYPE = "application/x-ndjson"
SSE_TYPE = "text/event-stream"
PARAMETERS = ("key", "prefix", "start_revision", "position", "prev_value")


class Position:
    """Where a stream stands per shard: the revision of the last event written and how
    many of that revision's events were written (``delivered``), plus, after a resume,
    how many of the first revision's events are still to drop (``skips``). Its text form
    is ``"0:15,1:9.2"`` (module docstring), from ``after``."""

    def __init__(self, revisions: dict, skips: dict) -> None:
        self.revisions = dict(revisions)
        self.skips = {s: k for s, k in skips.items() if k}
        self.delivered = dict(self.skips)  # a resumed revision's events the client has

    @classmethod
    def parse(cls, text: str) -> "Position":
        revisions, skips = {}, {}
        for part in text.split(","):
            shard, sep, rest = part.partition(":")
            revision, dot, skip = rest.partition(".")
            if not (sep and _digits(shard) and _digits(revision) and (not dot or _digits(skip))):
                raise InvalidArgument(f"position {text[:200]!r} is not SHARD:REVISION[.SKIP],... "
                                      f"(pass back a line's position as it is)")
            s = int(shard)
            if s in revisions or int(revision) < 1:
                raise InvalidArgument(f"position {text[:200]!r} names shard {s} twice or a "
                                      f"revision below 1")
            revisions[s] = int(revision)
            skips[s] = int(skip) if dot else 0
        return cls(revisions, skips)

    def take(self, event) -> bool:
        """Account for ``event``; False when it is one to drop (written before a resume)."""
        s, r = event.shard, event.revision
        if self.skips.get(s) and r == self.revisions.get(s):
            self.skips[s] -= 1
            return False
        self.skips.pop(s, None)
        if self.revisions.get(s) == r:
            self.delivered[s] = self.delivered.get(s, 0) + 1
        else:
            self.revisions[s] = r
            self.delivered[s] = 1
        return True

    def after(self, watched: dict) -> str:
        """The position to resume from now: ``watched`` is the watch's own (the next
        revision per shard, whole revisions); where it still stands on the revision of
        the last event written, the events of it already written are counted in."""
        out = []
        for s, r in sorted(watched.items()):
            done = self.delivered.get(s) if r == self.revisions.get(s) else 0
            out.append(f"{s}:{r}.{done}" if done else f"{s}:{r}")
        return ",".join(out)


def _digits(text: str) -> bool:
    return text.isdigit() and len(text) <= 19


class WatchRequest:
    """``GET /v1/watch``'s query, checked whole before anything is asked of the cluster."""

    def __init__(self, request: Request) -> None:
        params = codec.query_bytes(request)
        unknown = sorted(set(params) - set(PARAMETERS))
        if unknown:
            raise InvalidArgument(f"watch has no parameter {', '.join(unknown)} "
                                  f"(known: {', '.join(PARAMETERS)})")
        self.key = params.get("key")
        self.prefix = params.get("prefix")
        if self.key is not None and self.prefix is not None:
            raise InvalidArgument("watch takes key= or prefix=, not both")
        if self.key is None and self.prefix == b"":
            self.prefix = None  # an empty prefix: every key
        self.prev_value = _flag(params, "prev_value")
        self.sse = codec.accepts(request, SSE_TYPE)
        position = params.get("position")
        if position is None and self.sse and request.headers.get("last-event-id"):
            position = request.headers["last-event-id"].encode("ascii", "replace")
        start = codec.query_int(params, "start_revision", None)
        if start is not None and position is not None:
            raise InvalidArgument("watch takes start_revision= or position=, not both")
        if start is not None and start < 1:
            raise InvalidArgument(f"start_revision must be >= 1 (revisions start at 1), got {start}")
        self.start_revision = start
        self.position = None
        if position is not None:
            self.position = Position.parse(position.decode("ascii", "replace"))


def _flag(params: dict, name: str) -> bool:
    text = params.get(name)
    if text is None:
        return False
    if text in (b"", b"true", b"1"):
        return True
    if text in (b"false", b"0"):
        return False
    raise InvalidArgument(f"query parameter {name} is true or false, got {text[:40]!r}")


class WatchCount:
    """The watch streams open in this process, bounded by ``MAX_WATCHES``."""

    def __init__(self, limit: int = MAX_WATCHES) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise InvalidArgument(f"--max-watches must be a positive integer, got {limit!r}")
        self.limit = limit
        self.open = 0
        self._stop: asyncio.Event | None = None  # made on the server's event loop

    def stopping(self) -> asyncio.Event:
        """Set when the server stops: every stream ends (its clients resume by position)
        instead of holding the graceful shutdown for its whole timeout."""
        if self._stop is None:
            self._stop = asyncio.Event()
        return self._stop

    def stop(self) -> None:
        self.stopping().set()

    def enter(self) -> None:
        if self.stopping().is_set():
            raise Unavailable("this gateway is stopping; try another one")
        if self.open >= self.limit:
            raise Unavailable(f"this gateway already streams {self.open} watches (its "
                              f"limit, MAX_WATCHES); try another gateway or later")
        self.open += 1

    def leave(self) -> None:
        self.open -= 1


async def watch(request: Request) -> Response:
    """Open the watch (a 4xx for bad input, a 410 ``Compacted``, a 503 before any byte
    of the stream), then stream it (``WatchStream``)."""
    spec = WatchRequest(request)
    db = request.app.state.link.client()
    count: WatchCount = request.app.state.watches
    count.enter()
    w = None
    try:
        start = spec.start_revision if spec.position is None else spec.position.revisions
        w = db.watch(key=spec.key, prefix=spec.prefix, start_revision=start,
                     prev_value=spec.prev_value, max_bytes=POLL_BYTES)
        await w.started()
        position = spec.position or Position({}, {})
        created = position.after(w.position)
        first = None
        if start is not None:  # a revision the cluster may no longer keep: know it now
            first = await w.get(timeout=FIRST_ANSWER_SECONDS)
        return WatchStream(w, position, created, first, spec, count)
    except BaseException:
        if w is not None:
            w.close()
        count.leave()
        raise


class WatchStream(Response):
    """The streamed answer: the ``created`` line, then events and ``progress`` lines, and
    an error line if the watch fails; ends (closing the watch) when the client leaves."""

    def __init__(self, w, position: Position, created: str, first, spec: WatchRequest,
                 count: WatchCount) -> None:
        self.w, self.position, self.first, self.count = w, position, first, count
        self.created = created  # the position before ``first``, the event already taken
        self.sse, self.prev_value = spec.sse, spec.prev_value
        self.status_code = 200
        self.background = None
        self.media_type = SSE_TYPE if self.sse else NDJSON_TYPE
        self.init_headers({"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    async def __call__(self, scope, receive, send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200,
                        "headers": self.raw_headers})
            if scope.get("method") == "HEAD":  # the headers GET would have; no stream
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            pump = asyncio.ensure_future(self._pump(send))
            left = asyncio.ensure_future(_until_disconnect(receive))
            stop = asyncio.ensure_future(self.count.stopping().wait())
            try:
                await asyncio.wait({pump, left, stop}, return_when=asyncio.FIRST_COMPLETED)
                client_left = left.done()
            finally:
                for task in (pump, left, stop):
                    task.cancel()
                await asyncio.gather(pump, left, stop, return_exceptions=True)
            if pump.done() and not pump.cancelled() and pump.exception() is not None:
                log.error("a watch stream failed", exc_info=pump.exception())  # a bug
            if not client_left:  # the watch failed, or the server stops: end the answer
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            self.w.close()
            self.count.leave()

    async def _pump(self, send) -> None:
        w, position = self.w, self.position

        async def line(kind: str, doc: dict, pos: str) -> None:
            await send({"type": "http.response.body", "body": self._line(kind, doc, pos),
                        "more_body": True})

        await line("created", {"created": True}, self.created)
        event = self.first
        while True:
            if event is not None and position.take(event):
                await line(event.type, _event_doc(event, self.prev_value),
                           position.after(w.position))
            try:
                event = await w.get(timeout=PROGRESS_SECONDS)
                if event is None:  # that long without one (only this stream closes the watch)
                    await line("progress", {"progress": True}, position.after(w.position))
            except KVError as e:  # Compacted after the headers, the client closed...
                status, doc = describe_error(e)
                await line("failure", dict(doc, status=status), position.after(w.position))
                return

    def _line(self, kind: str, doc: dict, position: str) -> bytes:
        doc["position"] = position
        data = json.dumps(doc, separators=(",", ":"))
        if self.sse:
            return f"id: {position}\nevent: {kind}\ndata: {data}\n\n".encode()
        return data.encode() + b"\n"


def _event_doc(event, prev_value: bool) -> dict:
    doc = {"type": event.type, "key": codec.b64encode(event.key),
           "value": None if event.value is None else codec.b64encode(event.value),
           "revision": event.revision, "shard": event.shard}
    if prev_value:
        doc["prev_value"] = (None if event.prev_value is None
                             else codec.b64encode(event.prev_value))
    return doc


async def _until_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
