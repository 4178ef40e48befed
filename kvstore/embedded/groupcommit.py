"""Group commit: concurrent writers share one durable commit.

A writer that finds nobody committing becomes the leader: it takes every
request queued so far, commits them in one transaction (one fsync) and answers
them; then, while requests queued during that commit, it commits them too, up
to ``LEAD_ROUNDS`` batches in all, and hands leadership to the first request
still queued. A lone writer therefore pays no thread hand-off at all, and N
concurrent writers pay about one fsync per batch instead of N.

Measured on the 2-core VM (issue 24), three things set the rate at 16 writers,
all of them the GIL's: waking a thread that sleeps (several microseconds of
system call, an inter-processor interrupt on a VM); the writers' hand-offs of
the GIL as each one returns; and the leader's own Python per batch. Hence:

- the leader wakes its batch's writers with the GIL released
  (``kvstore._native.release_all``): the writers woken first run Python
  meanwhile, where holding the GIL for the wake-ups stopped every thread;
- the leader goes on with the batch that queued during its fsync instead of
  handing it to a sleeping thread, so the next ``pwrite`` and ``fdatasync``
  start without a wake-up and a GIL switch in between, and the answered
  writers come back (one GIL hand-off each) while that fsync runs;
- no leader lingers for writers to come back (an earlier version waited up to
  0.2 ms for as many as its previous batch held): that wait ran while the disk
  stood idle, and the writers' hand-offs then never overlapped an fsync.
  ``LEAD_ROUNDS`` bounds how long a leader's own caller waits for it (and
  keeps one thread from committing for others for ever).

The main thread never commits for others. Python runs signal handlers in the
main thread only, between any two of its bytecodes: a Ctrl-C (or a SIGALRM
handler that raises) landing in a leader's bookkeeping would leave the
others' requests unanswered forever, or hand them the main thread's
``KeyboardInterrupt``. So a request from the main thread goes through one
atomic C call (``SimpleQueue.put``) to a helper thread, which submits it as
any other thread would; the main thread only waits, and an interrupt there
reaches it alone: its write is then applied or not, wholly, as one request.
Nor does the main thread start that helper with ``Thread.start``: its wait
for the new thread (an ``Event``, a ``Condition``: Python code) is not safe
against an exception between two bytecodes (one there left the Event's lock
released twice: a ``RuntimeError`` instead of the ``KeyboardInterrupt``, or
held for ever). It makes one C call, ``_thread.start_new_thread``, and that
new thread starts the named helper.

A batch holds at most ``MAX_BATCH`` requests and ``MAX_BATCH_BYTES`` of
payload (``Request.size``): one large transaction never makes its
neighbours' commit fail or wait on a record too large to write.
"""

from __future__ import annotations

import _thread
import queue
import threading
import weakref
from typing import Callable, Sequence

from kvstore._native import Waiter, release_all
from kvstore.errors import KVError

#: Requests taken into one commit at most; a bound keeps one commit's latency bounded.
MAX_BATCH = 4096
#: Payload bytes taken into one commit at most (a lone larger request still commits alone).
MAX_BATCH_BYTES = 256 * 1024 * 1024
_allocate_lock = threading.Lock
_get_ident = threading.get_ident
_main_thread = threading.main_thread
_start_new_thread = _thread.start_new_thread
_STOP = object()
#: A helper thread with nothing to do for this long ends (a store dropped without
#: close() does not keep a thread, nor itself, alive).
HELPER_IDLE_SECONDS = 2.0
#: Batches a leader commits in a row (its own first) while requests keep queueing.
LEAD_ROUNDS = 4


class Request:
    """One writer's request and, once committed, its outcome."""

    __slots__ = ("payload", "size", "result", "error", "done", "wakeup")

    def __init__(self, payload: object, size: int = 0) -> None:
        self.payload = payload
        self.size = size  # payload bytes, for the batch's byte bound
        self.result: object = None
        self.error: BaseException | None = None
        self.done = False
        # Released once the request is answered or handed leadership (a one-shot
        # wake-up the leader can release without the GIL: ``kvstore._native.Waiter``).
        self.wakeup: Waiter | None = None

    def outcome(self) -> object:
        if self.error is not None:
            raise self.error
        return self.result


class GroupCommitter:
    """Serialises commits; ``commit_batch(requests)`` sets each request's result or error."""

    def __init__(self, commit_batch: Callable[[Sequence[Request]], None],
                 lead_rounds: int = LEAD_ROUNDS,
                 max_batch_bytes: int = MAX_BATCH_BYTES) -> None:
        self._commit_batch = commit_batch
        self._max_batch_bytes = max_batch_bytes
        # The main thread's requests go through the inbox a helper thread serves (see the
        # module doc); None: no helper runs (or one does that ends unused).
        self._helper_inbox: queue.SimpleQueue | None = None
        self._helper_lock = threading.Lock()
        self._lead_rounds = lead_rounds
        self._lock = threading.Lock()
        self._queue: list[Request] = []
        self._busy = False
        self.commits = 0  # batches committed (or failed), for tests and status

    def submit(self, request: Request) -> object:
        """Commit ``request`` (alone or with others); its result, or raise its error."""
        if _get_ident() == _main_thread().ident:
            return self._submit_through_helper(request)
        lock = self._lock
        with lock:
            if self._busy:
                wakeup = request.wakeup = Waiter()
                self._queue.append(request)
            else:
                self._busy = True
                wakeup = None
        if wakeup is not None:
            wakeup.wait()  # released by the leader that answers us or hands us the lead
            if request.done:
                return request.outcome()
        self._lead(request)
        return request.outcome()

    def _lead(self, request: Request) -> None:
        """Commit ``request``'s batch, then the batches queued meanwhile, up to
        ``lead_rounds`` in all; then hand the lead to the first request still queued."""
        lock = self._lock
        with lock:
            batch = self._take([request])
        rounds = self._lead_rounds
        while True:
            self._commit(batch, request)
            rounds -= 1
            with lock:
                queued = self._queue
                if not queued:
                    self._busy = False
                    return
                if rounds <= 0:
                    queued.pop(0).wakeup.release()  # not done: it leads the next batch
                    return
                head = queued.pop(0)
                try:
                    batch = self._take([head])
                except BaseException:  # (MemoryError) the lead passes on: nobody waits for ever
                    head.wakeup.release()
                    raise

    def _take(self, batch: list) -> list:
        """``batch`` (one request) and what follows it in the queue, within the bounds;
        call it holding the lock."""
        queued = self._queue
        budget = self._max_batch_bytes - batch[0].size
        take = 0
        limit = min(len(queued), MAX_BATCH - 1)
        while take < limit and queued[take].size <= budget:
            budget -= queued[take].size
            take += 1
        if take:
            batch.extend(queued[:take])
            del queued[:take]
        return batch

    def _commit(self, batch: list, own: Request) -> None:
        """Commit ``batch`` and answer its requests (but ``own``, the leader's)."""
        try:
            self._commit_batch(batch)
        except BaseException as e:  # the whole commit failed: every request learns why
            for r in batch:
                if not r.done:
                    r.error = e
        finally:
            self.commits += 1
            woken = []
            for r in batch:
                r.done = True
                if r is not own:
                    woken.append(r.wakeup)
            if woken:
                release_all(woken)  # the GIL released meanwhile (``kvstore._native.wakeup_py``)

    # -- the main thread's requests --------------------------------------------------------

    def _submit_through_helper(self, request: Request) -> object:
        """The main thread's submit: hand ``request`` to the helper thread and wait.

        Every step is safe against an exception from a signal handler between
        any two of them: before the ``put`` nothing was queued; after it the
        helper owns the request and answers it whether anyone waits or not. An
        interrupt between starting a helper and recording its inbox leaves a
        helper nobody feeds: it ends once idle, and the next request starts another.
        """
        answered = _allocate_lock()
        answered.acquire()
        with self._helper_lock:  # so an idle helper cannot leave between check and put
            inbox = self._helper_inbox
            if inbox is None:
                inbox = queue.SimpleQueue()
                _start_new_thread(_start_helper, (weakref.ref(self), inbox))  # one C call
                self._helper_inbox = inbox
            inbox.put((request, answered))
        answered.acquire()  # released by the helper once the request is answered
        return request.outcome()

    def stop(self) -> None:
        """End the helper thread (after the requests already handed to it)."""
        with self._helper_lock:
            inbox, self._helper_inbox = self._helper_inbox, None  # no call: not interruptible
            if inbox is not None:
                inbox.put(_STOP)  # an interrupt before this: the helper ends once idle


def _start_helper(committer_ref, inbox: queue.SimpleQueue) -> None:
    """A bare thread's work (never the main thread's: no signal lands here): start the
    named helper thread that serves ``inbox``, and end. If no thread can be started
    now, serve it here."""
    try:
        threading.Thread(target=_helper_loop, name="kvstore-commit",
                         args=(committer_ref, inbox), daemon=True).start()
    except RuntimeError:  # can't start new thread
        _helper_loop(committer_ref, inbox)


def _helper_loop(committer_ref, inbox: queue.SimpleQueue) -> None:
    """The helper thread: submit the main thread's requests as any thread would.

    It holds its committer weakly between requests, so a store dropped without
    ``close()`` can still be collected (and its directory released).
    """
    while True:
        try:
            item = inbox.get(timeout=HELPER_IDLE_SECONDS)
        except queue.Empty:
            committer = committer_ref()
            if committer is None:
                return
            with committer._helper_lock:  # idle: end, unless a request came meanwhile
                if inbox.empty():
                    if committer._helper_inbox is inbox:
                        committer._helper_inbox = None
                    return
            committer = None
            continue
        if item is _STOP:
            return
        committer = committer_ref()
        outer, answered = item
        if committer is None:
            outer.error = KVError("the store was closed")
        else:
            inner = Request(outer.payload, outer.size)
            try:
                outer.result = committer.submit(inner)
            except BaseException as e:  # the request's own error, handed to its caller
                outer.error = e
            committer = None
        outer.done = True
        answered.release()
