"""``kvstore gateway``: kvstore over HTTP/JSON, for services that do not speak Python.

An ASGI app (Starlette) on uvicorn over the asyncio client (``kvstore.aio``): keys in
the path, values as raw bytes or base64 JSON, errors as the contract's classes with
HTTP statuses. The routes and their semantics are in docs/gateway.md.

- ``app``: the application and its lifespan (one shared client per process).
- ``routes``: one handler per operation, and the health and readiness probes.
- ``txn``: ``POST /v1/txn``, compares and branches as one transaction.
- ``codec``: bytes in and out of HTTP, every body bounded.
- ``errors``: the one translation of errors into HTTP answers.
- ``serve``: running it (``kvstore gateway``; ``kvstore-server``'s ``gateway`` option).

Starlette and uvicorn are the ``gateway`` extra (``pip install 'kvstore[gateway]'``);
the rest of kvstore never imports this package.
"""
