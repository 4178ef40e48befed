"""A client follows the cluster's members as they change (``kvstore member``).

A client learns the members from a node's hello answer when it connects
(``ClientCore._learn``: addresses by node index). A member added later is unknown to it
until a node names it: a redirect or a forwarded answer naming a leader by an index the
client does not know. Then it asks that node for the topology again (``relearn``), at
most every ``RELEARN_SECONDS``. A node's index never changes, and ``kvstore member
add`` gives a new member an index above all in use (while there are any: 64 at most),
so what the client knows of leaders stays true meanwhile; a client that still knows
one member follows any number of changes, one at a time.
"""

from __future__ import annotations

import time

from kvstore.transport import wire

#: A client asks for the topology again at most this often.
RELEARN_SECONDS = 1.0


def relearn(core, address: str, make_call) -> None:
    """On ``core``'s I/O thread: send ``address`` a hello whose answer ``core`` learns
    from (``make_call``: the core's call class)."""
    now = time.monotonic()
    if now < getattr(core, "_relearn_after", 0.0):  # (set here: the I/O thread's own)
        return
    core._relearn_after = now + RELEARN_SECONDS
    with core._lock:
        request_id = next(core._ids)
    call = make_call(request_id, wire.OP_HELLO, None, [], now + RELEARN_SECONDS, address)
    core._admit(call)
    core._send(call, address)
