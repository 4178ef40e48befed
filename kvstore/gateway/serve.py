"""Running the gateway: ``kvstore gateway`` (``run``) and ``kvstore-server``'s option (``spawn``).

``run`` serves the app on uvicorn in this process until SIGINT or SIGTERM (uvicorn
finishes the requests in flight, then the lifespan closes the client). ``spawn`` starts
that same command as a child process of a ``kvstore-server`` node: the gateway gets
its own interpreter and event loop, so HTTP work never takes the node's GIL or delays a
turn of its loop, and it reaches the node as any client would, through the node's client
address. The child's stdin is a pipe from the node; it exits when that pipe closes,
so a node that dies, even by SIGKILL, never leaves its gateway behind.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading

from kvstore.errors import InvalidArgument

_LISTEN = re.compile(r"^(?:\[([0-9a-fA-F:.]+)\]|([^:\[\]\s/]+)):(\d{1,5})$")

#: Seconds uvicorn gives the requests in flight at shutdown before closing them.
GRACEFUL_SHUTDOWN_SECONDS = 5


def parse_listen(listen: str) -> tuple[str, int]:
    """``"127.0.0.1:8080"`` (or ``"[::1]:8080"``) as ``(host, port)``, or InvalidArgument."""
    m = _LISTEN.match(listen) if isinstance(listen, str) else None
    if not m or not 0 < int(m.group(3)) < 65536:
        raise InvalidArgument(f"a gateway listen address looks like 127.0.0.1:8080, "
                              f"got {listen!r}")
    return m.group(1) or m.group(2), int(m.group(3))


def check_can_listen(listen: str) -> None:
    """InvalidArgument naming the address when it cannot be bound now (taken, not this
    host's), so a node or ``kvstore gateway`` refuses at once instead of failing later."""
    host, port = parse_listen(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            s.bind((host, port))
    except OSError as e:
        raise InvalidArgument(f"cannot listen on {listen}: {e.strerror or e}") from None


def check_installed() -> None:
    """InvalidArgument naming the extra to install when Starlette or uvicorn is missing."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise InvalidArgument(f"the gateway needs {e.name}: pip install 'kvstore[gateway]'") \
            from None


def run(cluster: str, listen: str, timeout: float = 5.0, keys: str | None = None, *,
        access_log: bool = False, exit_with_stdin: bool = False,
        max_watches: int | None = None) -> int:
    """Serve the gateway on ``listen`` until a signal; the exit code (0, or 2 when it could
    not listen there)."""
    host, port = parse_listen(listen)
    check_installed()
    check_can_listen(listen)
    import uvicorn
    from kvstore.gateway.app import create_app, stop_watches
    app = create_app(cluster, timeout, keys, max_watches)

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            stop_watches(app)  # streams last: they would hold the graceful shutdown
            await super().shutdown(sockets)

    config = uvicorn.Config(app, host=host, port=port, lifespan="on", access_log=access_log,
                            log_level="info", server_header=False,
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS)
    _log_to_stderr()
    server = Server(config)
    if exit_with_stdin:
        threading.Thread(target=_exit_at_eof, args=(server,), daemon=True,
                         name="gateway-stdin").start()
    try:
        server.run()
    except SystemExit:  # uvicorn's own exit when it cannot bind (it logged why)
        print(f"kvstore gateway: cannot listen on {listen}", file=sys.stderr)
        return 2
    return 0 if server.started else 2


def _log_to_stderr() -> None:
    """The gateway's own lines (reaching the cluster) beside uvicorn's, on stderr."""
    import logging
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
    logger = logging.getLogger("kvstore.gateway")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _exit_at_eof(server) -> None:
    """Stop ``server`` when stdin reaches its end: the parent closed it, or died."""
    try:
        while sys.stdin.buffer.read(4096):
            pass
    except (OSError, ValueError):
        pass
    server.should_exit = True


def spawn(cluster: str, listen: str, timeout: float = 5.0) -> subprocess.Popen:
    """``kvstore gateway`` as a child that exits when this process does (its stdin closes).
    Its logs go to this process's stderr."""
    parse_listen(listen)
    return subprocess.Popen(
        [sys.executable, "-m", "kvstore.cli", "gateway", "--cluster", cluster,
         "--listen", listen, "--timeout", str(timeout), "--exit-with-stdin"],
        stdin=subprocess.PIPE, stdout=sys.stderr.fileno(), stderr=sys.stderr.fileno())


def stop(child: subprocess.Popen, wait_seconds: float = GRACEFUL_SHUTDOWN_SECONDS + 5) -> int:
    """Close the child's stdin (it shuts down gracefully), wait for it (bounded), kill it
    if it did not exit; its exit code."""
    try:
        child.stdin.close()
    except OSError:
        pass
    try:
        return child.wait(wait_seconds)
    except subprocess.TimeoutExpired:
        child.kill()
        return child.wait(5)
