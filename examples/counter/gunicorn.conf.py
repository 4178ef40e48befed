"""gunicorn's configuration for the counter service: ``gunicorn -c gunicorn.conf.py``
(from any directory: the app is found next to this file).

    COUNTER_BIND     host:port to listen on         (default: 127.0.0.1:8000)
    COUNTER_WORKERS  worker processes               (default: 2; always 1 for embedded)
    COUNTER_THREADS  threads per worker             (default: 4)

and the app's own variables (app.py: COUNTER_STORE, COUNTER_CLUSTER, COUNTER_METHOD...).

Where the kvstore client is made: after the fork, in each worker, lazily on its first
request (app.py, ``KvstoreCounter.store``), never in the master, and ``preload_app``
stays off so that even the app object is built in the worker. Why, now that a
cluster client made before ``fork()`` also works in the child (it reconnects on its
first call there):

- the embedded store cannot be shared by processes at all: its directory is held by
  one process, and a store opened before a fork refuses to be used in the child.
  So an embedded service runs ONE worker (with threads) and opens the store in it;
- a cluster client made in the master would only be thrown away in every worker
  (its sockets and its I/O thread do not survive the fork: the child starts its own)
  while the master kept its connections to the cluster open for nothing;
- each worker then holds one client shared by its threads, which is what the client
  is built for (thread-safe, one connection per node, calls pipelined).
"""

import os

_here = os.path.dirname(os.path.abspath(__file__))

wsgi_app = "app:app"
pythonpath = _here
bind = os.environ.get("COUNTER_BIND", "127.0.0.1:8000")
worker_class = "gthread"
threads = int(os.environ.get("COUNTER_THREADS", "4"))
# embedded: one process may hold the store's directory, so one worker
workers = (1 if os.environ.get("COUNTER_STORE", "embedded") == "embedded"
           else int(os.environ.get("COUNTER_WORKERS", "2")))
preload_app = False  # the app, and with it the store, made in each worker
# a request waits at most the client's deadline (COUNTER_TIMEOUT, 5 s) per call; a
# worker is restarted only if it stops answering gunicorn's heartbeat this long
timeout = 30
graceful_timeout = 10
accesslog = None
# Recent gunicorn's (27 here) runtime control socket is one path per user (~/.gunicorn/gunicorn.ctl):
# two services on one machine (or the tests, run side by side) would share it. This
# service does not use it. (Older gunicorn ignores the name.)
control_socket_disable = True


def worker_exit(server, worker) -> None:
    """Close this worker's store as the worker exits (an embedded store releases its
    directory; a cluster client its sockets and thread)."""
    app = getattr(worker, "wsgi", None)
    counter = getattr(app, "extensions", {}).get("counter")
    if counter is not None:
        counter.close()
