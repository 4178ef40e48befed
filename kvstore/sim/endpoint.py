"""What every simulated client does with a node's answers (one operation at a time).

``kvstore.client.core``'s rules, as the simulated clients follow them: an answer to
an attempt already retried or given up completes nothing; a forwarded answer is the
leader's; a redirect to another node is followed at once; a refusal of a valid
request is a finding; anything else (retry, a redirect to nowhere) is retried
elsewhere at the client's next retry tick.
"""

from __future__ import annotations

from kvstore.transport import wire


class OneOpAtATime:
    """Mixed into a simulated client that has ``op`` (with its ``request_id``), ``target``,
    ``send()``, ``finish(value)``, ``refused(value)`` (raises) and ``retarget()``."""

    def on_frame(self, frame: bytes) -> None:
        body = wire.decode(frame)
        for request_id, status, value in body[1]:
            op = self.op
            if op is None or request_id != op["request_id"]:
                continue  # an answer to an attempt already retried or given up
            if status == wire.STATUS_OK_FORWARDED:
                status, value = wire.STATUS_OK, value[0]
            if status == wire.STATUS_OK:
                self.finish(value)
            elif status == wire.STATUS_NOT_LEADER and type(value) is int and value != self.target:
                self.target = value
                self.send()
            elif status == wire.STATUS_ERROR:
                self.refused(value)
            else:  # retry elsewhere, at the next retry tick
                self.retarget()
