"""Read Jepsen's etcd register histories (the logs porcupine tests with) as ``Operation`` lists.

Lines look like ``INFO  jepsen.util - 3	:ok	:cas	[3 0]``: a process, a type
(``:invoke``, ``:ok``, ``:fail``, ``:info``), an operation (``:read``,
``:write``, ``:cas``) and a value. One register (one key); ``nil`` is absent.
``:ok`` and a ``:fail`` of a compare-and-set are definite answers; an ``:info``
(timed out) or a ``:fail :read :timed-out`` is unknown: the operation may or
may not have taken effect, so it stays without a response. So does an
invocation the log never answers. Times are line numbers.
"""

from __future__ import annotations

import re
from pathlib import Path

from kvstore.sim.linearizability import Operation

KEY = b"register"
_LINE = re.compile(r"^INFO\s+jepsen\.util\s+-\s+(\d+)\s+:(invoke|ok|fail|info)\s+:(read|write|cas)\s+(.*?)\s*$")
_KIND = {"read": "get", "write": "put", "cas": "cas"}


def _value(text: str):
    return None if text == "nil" else text.encode()


def parse_etcd_log(path: str | Path) -> list:
    """The operations of one log, for ``check_history``."""
    ops: list = []
    open_ops: dict = {}  # process -> (index in ops, invocation)
    lines = Path(path).read_text().splitlines()
    for time, line in enumerate(lines, start=1):
        m = _LINE.match(line)
        if m is None:
            continue
        process, kind, what, value = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        if kind == "invoke":
            if what == "cas":
                expected, new = value.strip("[]").split()
                args = (expected.encode(), new.encode())
            elif what == "write":
                args = (value.encode(),)
            else:
                args = ()
            open_ops[process] = (len(ops), time)
            ops.append(Operation(process, KEY, _KIND[what], args, time, None))
            continue
        index, _ = open_ops.pop(process, (None, None))
        if index is None:
            raise ValueError(f"{path}:{time}: a {kind} for process {process} with nothing invoked")
        op = ops[index]
        if kind == "info" or (kind == "fail" and what != "cas"):
            continue  # unknown outcome: no response
        if what == "read":
            result = _value(value)
        else:
            result = kind == "ok" if what == "cas" else None
        ops[index] = Operation(op.client, KEY, op.kind, op.args, op.call, time, result)
    return ops
