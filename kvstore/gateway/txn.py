"""``POST /v1/txn``: compares, then one branch of reads and writes, as one kvstore transaction.

The shape is etcd's v3 ``Txn`` (if every compare holds, run ``success``, else
``failure``), over kvstore's serializable transactions::

    {"compare": [{"key": B64, "value": B64 or null}, ...],
     "success": [OP, ...],
     "failure": [OP, ...]}

    OP = {"op": "get",    "key": B64}
       | {"op": "put",    "key": B64, "value": B64}
       | {"op": "delete", "key": B64}

A compare holds when the key's value equals ``value`` byte for byte (``null``: the key
is absent). Compares and the chosen branch run in one transaction (``run_transaction``):
the branch's operations in order, each seeing the writes before it; the whole commits
atomically, across shards, or not at all. A conflict with a concurrent writer retries
the whole request, compares included, as ``run_transaction`` does, so the answer is
the one a run at the commit point gives; past the retries it is 409 and nothing was
applied. The answer: ``{"succeeded": bool, "results": [one per operation of the branch
that ran]}``.

There is no scan inside a transaction: a cluster transaction validates the keys it
read, not ranges, so the client refuses a scan in one that spans shards; scan with
``GET /v1/scan`` outside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from kvstore.errors import InvalidArgument
from kvstore.gateway import codec

#: Operations (compares and both branches together) one request may carry: a bound on
#: the work one request makes, far above what one transaction should hold.
MAX_TXN_OPERATIONS = 1024

Operation = Callable[[Any], Awaitable[dict]]


@dataclass
class TxnRequest:
    compare: list[tuple[bytes, bytes | None]] = field(default_factory=list)
    success: list[Operation] = field(default_factory=list)
    failure: list[Operation] = field(default_factory=list)


def parse(doc: object) -> TxnRequest:
    """The request checked whole before anything runs: a bad operation anywhere is a
    400 that reads and writes nothing."""
    doc = codec.json_object(doc, "the transaction", {"compare": False, "success": False,
                                                     "failure": False})
    lists = {}
    for name in ("compare", "success", "failure"):
        items = doc.get(name, [])
        if not isinstance(items, list):
            raise InvalidArgument(f"{name} must be a list")
        lists[name] = items
    if sum(len(v) for v in lists.values()) > MAX_TXN_OPERATIONS:
        raise InvalidArgument(f"a transaction takes at most {MAX_TXN_OPERATIONS} compares and "
                              f"operations in all")
    out = TxnRequest()
    for i, c in enumerate(lists["compare"]):
        what = f"compare[{i}]"
        c = codec.json_object(c, what, {"key": True, "value": True})
        out.compare.append((codec.b64decode(c["key"], f"{what}.key"),
                            codec.optional_b64decode(c["value"], f"{what}.value")))
    out.success = [_operation(op, f"success[{i}]") for i, op in enumerate(lists["success"])]
    out.failure = [_operation(op, f"failure[{i}]") for i, op in enumerate(lists["failure"])]
    return out


def _operation(doc: object, what: str) -> Operation:
    """One operation of a branch, checked, as a coroutine function of the transaction."""
    if not isinstance(doc, dict) or doc.get("op") not in ("get", "put", "delete"):
        raise InvalidArgument(f'{what} must be an object whose "op" is get, put or delete')
    op = doc["op"]
    fields = {"op": True, "key": True, "value": op == "put"}
    doc = codec.json_object(doc, what, fields)
    key = codec.b64decode(doc["key"], f"{what}.key")
    if op == "get":
        async def get(txn) -> dict:
            value = await txn.get(key)
            return {"value": None if value is None else codec.b64encode(value)}
        return get
    if op == "delete":
        async def delete(txn) -> dict:
            return {"deleted": bool(await txn.delete(key))}
        return delete
    value = codec.b64decode(doc["value"], f"{what}.value")

    async def put(txn) -> dict:
        await txn.put(key, value)
        return {}
    return put


async def run(db, request: TxnRequest) -> dict:
    """Run ``request`` in one transaction of ``db`` (an ``AsyncKV``), retried on conflict."""
    async def attempt(txn) -> dict:
        succeeded = True
        for key, expected in request.compare:
            if await txn.get(key) != expected:
                succeeded = False
                break
        branch = request.success if succeeded else request.failure
        return {"succeeded": succeeded, "results": [await op(txn) for op in branch]}
    return await db.run_transaction(attempt)
