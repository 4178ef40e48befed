"""The ASGI application: routes, the one shared client, and the one error translation.

``create_app(cluster, timeout)`` returns a Starlette app any ASGI server can run
(``kvstore gateway`` runs it on uvicorn). Its lifespan connects one
``kvstore.aio`` client when the server starts and closes it when it stops: the client
multiplexes any number of requests in flight over one connection per node, so one per
process is both enough and cheapest (a client per request would pay a connection and a
HELLO each time).

A cluster that does not answer at start does not stop the gateway: it serves
``/healthz`` at once, answers everything else 503 (``Unavailable``, naming the last
error), and keeps connecting in the background until a node answers. A process
supervisor or an orchestrator's liveness probe therefore does not restart it in a loop
while the cluster is starting; ``/readyz`` tells when it can serve.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response

import kvstore.aio
from kvstore.client.kv import parse_addresses
from kvstore.errors import KVError, Unavailable
from kvstore.gateway.errors import error_response
from kvstore.gateway.routes import ROUTES
from kvstore.gateway.watch import MAX_WATCHES, WatchCount

log = logging.getLogger("kvstore.gateway")

#: Seconds between two attempts to reach a cluster that did not answer (each attempt
#: itself waits up to the client's timeout).
RECONNECT_SECONDS = 1.0


class ClusterLink:
    """The process's one ``AsyncKV``, or why there is none yet."""

    def __init__(self, addresses: list, timeout: float, keys: str | None) -> None:
        self.addresses = addresses
        self.timeout = timeout
        self.keys = keys
        self.db = None
        self.last_error: KVError | None = None

    def client(self):
        """The client, or ``Unavailable`` while the cluster has not answered yet."""
        if self.db is None:
            raise Unavailable(f"the gateway has not reached the cluster at "
                              f"{','.join(self.addresses)} yet: {self.last_error}")
        return self.db

    async def connect(self) -> bool:
        """One attempt; False (and the error kept and logged) if no node answered."""
        try:
            self.db = await kvstore.aio.connect(self.addresses, timeout=self.timeout,
                                                keys=self.keys)
        except Unavailable as e:
            self.last_error = e
            log.warning("cannot reach the cluster at %s: %s (retrying)",
                        ",".join(self.addresses), e)
            return False
        log.info("connected to the cluster at %s", ",".join(self.addresses))
        return True

    async def keep_connecting(self) -> None:
        while not await self.connect():
            await asyncio.sleep(RECONNECT_SECONDS)

    async def close(self) -> None:
        if self.db is not None:
            await self.db.close()
            self.db = None


#: Requests inside the application at once; more wait for a slot (holding only their
#: headers: a body is read inside). With every body bounded (``codec``), this bounds the
#: memory request bodies take: 128 x ~5.6 MB at the very worst.
MAX_REQUESTS_IN_FLIGHT = 128


#: Paths that never wait for a slot: the liveness probe, and watch streams (they last
#: as long as their client wants; ``watch.MAX_WATCHES`` bounds them instead).
UNLIMITED_PATHS = ("/healthz", "/v1/watch")


class InFlightLimit:
    """ASGI middleware: at most ``limit`` requests past it at once, the others queued in
    arrival order (backpressure, not a refusal). ``/healthz`` never waits, so a busy
    gateway is not taken for a dead one; nor does a watch stream, which would hold its
    slot for as long as it lasts."""

    def __init__(self, app, limit: int = MAX_REQUESTS_IN_FLIGHT) -> None:
        self.app = app
        self.limit = limit
        self._slots: asyncio.Semaphore | None = None  # made on the server's event loop

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in UNLIMITED_PATHS:
            await self.app(scope, receive, send)
            return
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.limit)
        async with self._slots:
            await self.app(scope, receive, send)


async def _on_error(request: Request, exc: Exception) -> Response:
    return error_response(exc)


def create_app(cluster: str | list, timeout: float = 5.0, keys: str | None = None,
               max_watches: int | None = None) -> Starlette:
    """The gateway over the cluster at ``cluster`` (addresses as ``kvstore.connect`` takes
    them, checked now: ``InvalidArgument``); each call waits at most ``timeout`` seconds
    for the cluster (then 504); at most ``max_watches`` watch streams at once (default
    ``watch.MAX_WATCHES``)."""
    link = ClusterLink(parse_addresses(cluster), timeout, keys)
    watches = WatchCount(MAX_WATCHES if max_watches is None else max_watches)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.link = link
        retrying = None
        if not await link.connect():
            retrying = asyncio.create_task(link.keep_connecting())
        try:
            yield
        finally:
            if retrying is not None:
                retrying.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await retrying
            await link.close()

    # KVError and HTTPException go through Starlette's ExceptionMiddleware; any other
    # exception (a bug) through its ServerErrorMiddleware, which answers with the same
    # JSON and re-raises it so the server logs the traceback.
    handlers = {KVError: _on_error, HTTPException: _on_error, Exception: _on_error}
    app = Starlette(routes=ROUTES, lifespan=lifespan, exception_handlers=handlers,
                    middleware=[Middleware(InFlightLimit)])
    app.state.watches = watches
    return app


def stop_watches(app: Starlette) -> None:
    """End every watch stream now (the server is stopping: ``serve``)."""
    app.state.watches.stop()
