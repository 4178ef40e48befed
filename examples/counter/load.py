"""The counter service's load generator: T threads x N requests, each thread on its own
keep-alive HTTP connection (``http.client``: nothing to install), started together.

    python examples/counter/load.py http://127.0.0.1:8000 --threads 8 --requests 500

prints requests/s, the statuses and the errors, and, with ``--json``, one JSON line.
Every POST goes to the same counter, so every request contends for one key. A
connection that fails (refused, reset, timed out) is an error, counted; the thread
reconnects and goes on.

With ``--watch tcp://h:p,...`` (the service's cluster) a watcher attached to the
cluster (``CounterWatcher``: ``kvstore.connect(...).watch(key=...)``) checks every
event of the counter's key during the run: the values delivered go up by exactly one
each (every applied increment, once, in order), every count a POST was answered with
is among them, and the last is the count read at the end. Its verdict is printed, and
a failed check is exit status 1.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import sys
import threading
import time
import urllib.parse


class Load:
    """``threads`` x ``requests`` requests of ``method`` to ``url``/counters/``counter``.
    ``run()`` returns the summary; meanwhile ``done`` counts answered or failed
    requests (``milestone(n)`` is an event set once ``n`` are), and ``answers`` holds, per
    thread, ``(status, count)`` for each request: status None for a connection error,
    count None where the body had none."""

    def __init__(self, url: str, threads: int = 8, requests: int = 100, *,
                 method: str = "POST", counter: str = "load", timeout: float = 30.0) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"an http:// URL, not {url!r}")
        if threads < 1 or requests < 0:
            raise ValueError("threads >= 1 and requests >= 0")
        self.host, self.port = parts.hostname, parts.port or 80
        self.path = parts.path.rstrip("/") + "/counters/" + urllib.parse.quote(counter)
        self.method, self.threads, self.requests, self.timeout = method, threads, requests, timeout
        self.answers: list = [[] for _ in range(threads)]
        self.error_messages: list = []
        self.done = 0
        self._milestones: list = []  # (count, event)
        self._lock = threading.Lock()

    def milestone(self, count: int) -> threading.Event:
        """An event set once ``count`` requests are answered or failed (call before ``run``)."""
        event = threading.Event()
        self._milestones.append((count, event))
        return event

    def _one(self, conn: http.client.HTTPConnection) -> tuple:
        conn.request(self.method, self.path, body=b"" if self.method == "POST" else None)
        response = conn.getresponse()
        body = response.read()
        try:
            count = json.loads(body).get("count")
        except (ValueError, AttributeError):
            count = None
        return response.status, count

    def _thread(self, index: int, start: threading.Barrier) -> None:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        start.wait()
        try:
            for _ in range(self.requests):
                try:
                    answer = self._one(conn)
                except (OSError, http.client.HTTPException) as e:
                    conn.close()  # reconnects on the next request
                    answer = (None, None)
                    with self._lock:
                        self.error_messages.append(f"{type(e).__name__}: {e}")
                self.answers[index].append(answer)
                with self._lock:
                    self.done += 1
                    for count, event in self._milestones:
                        if self.done >= count:
                            event.set()
        finally:
            conn.close()

    def run(self) -> dict:
        start = threading.Barrier(self.threads + 1)
        pool = [threading.Thread(target=self._thread, args=(i, start), daemon=True)
                for i in range(self.threads)]
        for t in pool:
            t.start()
        start.wait()
        began = time.perf_counter()
        for t in pool:
            t.join()
        return self.summary(time.perf_counter() - began)

    def summary(self, seconds: float) -> dict:
        statuses = collections.Counter(status for answers in self.answers for status, _ in answers)
        total = sum(statuses.values())
        return {"requests": total, "seconds": round(seconds, 3),
                "requests_per_second": round(total / seconds, 1) if seconds > 0 else None,
                "statuses": {str(k): v for k, v in sorted(statuses.items(), key=str)},
                "errors": total - statuses.get(200, 0),
                "error_examples": self.error_messages[:3]}


class CounterWatcher:
    """A watch of the counter ``counter`` (its key ``counter/<name>``) on ``db`` (a
    ``kvstore.connect`` client), opened before a load starts; ``finish(acked, final)``
    takes the events up to the final count and says what is wrong (empty: nothing)."""

    def __init__(self, db, counter: str = "load", timeout: float = 30.0) -> None:
        self.key = b"counter/" + counter.encode()
        self.timeout = timeout
        self.values: list = []  # the count each event carried, in delivery order
        self.wrong: list = []  # events that are no count (a delete, a foreign value)
        self.watch = db.watch(key=self.key)
        # "From now" is resolved by the watch's first exchange with the cluster: the
        # count is read after it, so no increment falls between the read and the watch.
        deadline = time.monotonic() + timeout
        while not self.watch.position and time.monotonic() < deadline:
            event = self.watch.get(timeout=0.05)
            if event is not None:
                self._take(event)
        if not self.watch.position:
            raise TimeoutError(f"the watch did not start within {timeout} s")
        value = db.get(self.key)
        self.initial = 0 if value is None else int(value)

    def _take(self, event) -> None:
        try:
            self.values.append(int(event.value))
        except (TypeError, ValueError):
            self.wrong.append(event)

    def finish(self, acked: list, final: int) -> list:
        """Take events until the one carrying ``final`` (bounded), close the watch, and
        list every way the stream differs from the acknowledged increments."""
        deadline = time.monotonic() + self.timeout
        while (not self.values or self.values[-1] < final) and time.monotonic() < deadline:
            event = self.watch.get(timeout=max(0.0, deadline - time.monotonic()))
            if event is None:
                break
            self._take(event)
        self.watch.close()
        return self.problems(acked, final)

    def problems(self, acked: list, final: int) -> list:
        wrong = [f"event {e.type} {e.key!r} {e.value!r} is no count" for e in self.wrong]
        previous = self.initial
        for value in self.values:
            if value != previous + 1:
                wrong.append(f"{value} delivered after {previous} (each increment is one)")
            previous = value
        delivered = set(self.values)
        missing = sorted(set(acked) - delivered)
        if missing:
            wrong.append(f"{len(missing)} acknowledged counts never delivered, "
                         f"e.g. {missing[:5]}")
        if previous != final:
            wrong.append(f"the last count delivered is {previous}, the final read {final}")
        return wrong


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="the service, e.g. http://127.0.0.1:8000")
    parser.add_argument("--threads", "-t", type=int, default=8)
    parser.add_argument("--requests", "-n", type=int, default=500, help="per thread")
    parser.add_argument("--method", choices=("POST", "GET"), default="POST")
    parser.add_argument("--counter", default="load")
    parser.add_argument("--json", action="store_true", help="one JSON line")
    parser.add_argument("--watch", metavar="ADDRESSES",
                        help="the service's cluster (tcp://h:p,...): check every event")
    args = parser.parse_args(argv)
    load = Load(args.url, args.threads, args.requests, method=args.method,
                counter=args.counter)
    watcher = db = None
    if args.watch:
        import kvstore  # only this option needs it

        db = kvstore.connect(args.watch.split(","), timeout=10)
        watcher = CounterWatcher(db, args.counter)
    result = load.run()
    if watcher is not None:
        final = Load(args.url, 1, 1, method="GET", counter=args.counter)
        final.run()
        [[(_, count)]] = final.answers
        acked = [c for answers in load.answers for status, c in answers if status == 200]
        wrong = watcher.finish(acked, count) if count is not None else ["no final count read"]
        db.close()
        result["watch"] = {"events": len(watcher.values), "problems": wrong[:10]}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['requests']} {args.method}s from {args.threads} threads in "
              f"{result['seconds']} s: {result['requests_per_second']} requests/s; "
              f"statuses {result['statuses']}; errors {result['errors']}")
        if "watch" in result:
            verdict = "; ".join(result["watch"]["problems"]) or "every event checked, all right"
            print(f"watcher: {result['watch']['events']} events: {verdict}")
    return 0 if result["errors"] == 0 and not result.get("watch", {}).get("problems") else 1


if __name__ == "__main__":
    sys.exit(main())
