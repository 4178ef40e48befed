"""The wire format of kvstore: one ZeroMQ frame per message, a version byte, then msgpack.

Every frame that crosses a socket, between peers or between a client and a
node, is ``bytes([WIRE_VERSION]) + msgpack(body)`` where ``body`` is a list
whose first item says what it is. The schema is ours and checked on the way
in; nothing is ever unpickled (DESIGN.md, "Lessons": ``recv_pyobj`` on network
bytes is remote code execution).

| kind          | body                                                                 |
| ------------- | -------------------------------------------------------------------- |
| ``PAXOS``     | ``[PAXOS, from_node, [[shard, paxos_message], ...]]``: every Paxos    |
|               | message one node has for one peer in one loop turn, across shards    |
|               | (``paxos_message`` is ``kvstore.paxos.messages.to_wire``)            |
| ``REQUEST``   | ``[REQUEST, request_id, op, args]`` client -> node (``OPS``)          |
| ``REPLY``     | ``[REPLY, request_id, status, value]`` node -> client (``STATUS_*``)  |
| ``REQUESTS``  | ``[REQUESTS, [[request_id, op, args], ...]]``: a client's requests    |
|               | to one node in one send                                              |
| ``REPLIES``   | ``[REPLIES, [[request_id, status, value], ...]]``: a node's replies   |
|               | to one client in one loop turn                                       |
| ``FORWARD``   | ``[FORWARD, from_node, [[forward_id, op, args], ...]]``: client       |
|               | requests a follower passes to the leader it knows                    |
| ``FORWARDED`` | ``[FORWARDED, from_node, [[forward_id, status, value], ...]]``: the   |
|               | leader's answers to them, relayed to the clients by the follower     |

Decoding never trusts its input: the size is checked before msgpack sees a
byte (``max_frame_bytes``), msgpack's own limits are bounded by that size (it
never allocates more than the frame holds), the shape of each kind is checked
field by field, and every log record a Paxos message carries must pass its
CRC32C before a replica sees it. A Paxos message's every field is range-checked
(``messages.from_wire``), and so is every record it carries: slot and ballot in
range, a known kind, a no-op's payload empty, a batch's payload a command batch
(``paxos.batch.decode_batch``). Anything else raises ``FrameError`` and the caller
drops the frame and counts it. What needs the receiver's own knowledge (its node
count and index; what a command means) is ``check_paxos_message``, which the node
calls on each message before its replica sees it.
"""

from __future__ import annotations

from typing import Callable

import msgpack

from kvstore._native import decode_record
from kvstore.errors import CorruptRecord
from kvstore.paxos.ballot import BALLOT_MAX
from kvstore.paxos.batch import decode_batch
from kvstore.paxos.messages import SLOT_MAX, Message, from_wire, to_wire
from kvstore.paxos.membership import decode_membership
from kvstore.paxos.replica import KIND_BATCH, KIND_CONFIG, KIND_NOOP

WIRE_VERSION = 1

PAXOS = 1
REQUEST = 2
REPLY = 3
REQUESTS = 4
REPLIES = 5
FORWARD = 6
FORWARDED = 7
KINDS = (PAXOS, REQUEST, REPLY, REQUESTS, REPLIES, FORWARD, FORWARDED)

#: A frame between peers: a batch of Accepts can carry many entries of many commands.
MAX_PEER_FRAME_BYTES = 64 * 1024 * 1024
#: A client request: one key (511 B) and one value (4 MiB) or a transaction's sets.
MAX_REQUEST_FRAME_BYTES = 16 * 1024 * 1024

# Client operations (REQUEST ``op``) and their ``args``:
OP_HELLO = "hello"      # []                      -> the node's status (topology, leaders)
OP_STATUS = "status"    # []                      -> the node's status
OP_GET = "get"          # [shard, key, with_revision]          -> value | [value, revision]
OP_SCAN = "scan"        # [shard, lo, hi, limit, with_revision] -> [[key, value(, revision)]...]
#: A write's optional sixth argument ``want_revision`` (True): the reply is then
#: ``[result, revision]``, the revision (``slot + 1``) of the entry the answer came from.
OP_WRITE = "write"      # [shard, client_id, seq, floor, command(, want_revision)] -> result
#: Ask the coordinator shard's leader to record a cross-shard transaction's decision
#: (first recorded wins) and carry it out on every participant: the node writes the
#: TxnDecision and the TxnResolve entries itself; a client never sends those.
OP_DECIDE = "decide"    # [shard, txn_id, outcome, participants] -> the recorded outcome
#: A watch's long poll, answered by any node from its own history (docs/watch.md;
#: ``kvstore.node.watching``): ``args = [shard, lo, hi, from_revision, max_bytes, wait_ms,
#: prev]`` -> ``[events, oldest, through, current]``, ``events`` =
#: ``[[revision, [[type, key, value, prev], ...]], ...]`` (type 0 put, 1 delete) or None
#: when ``from_revision`` is older than this node's history (compacted here).
OP_WATCH = "watch"
#: A backup's read point on the node asked, never forwarded (``kvstore.node.backups``):
#: open it once every shard holds the fence ``fence_id`` and no prepared transaction ->
#: ``[session id, [revision per shard]]`` (RETRY while not yet); then the rows of a
#: shard's table (0 data, 1 leases) after a key, about ``max_bytes`` -> ``[[[key, value],
#: ...], done]``; then close it -> True.
OP_BACKUP_OPEN = "backup_open"    # [fence_id]
OP_BACKUP_PAGE = "backup_page"    # [session id, shard, table, after or None, max_bytes]
OP_BACKUP_CLOSE = "backup_close"  # [session id]

#: ["list"] -> the node's view of every shard's membership (``Node.member_view``);
#: ["change", shard, epoch, voters, learners, info] -> {"epoch": e} once the shard's leader
#: made it (``kvstore.node.membership``; ``kvstore member``)
OP_MEMBER = "member"
OPS = (OP_HELLO, OP_STATUS, OP_GET, OP_SCAN, OP_WRITE, OP_DECIDE, OP_WATCH, OP_BACKUP_OPEN,
       OP_BACKUP_PAGE, OP_BACKUP_CLOSE, OP_MEMBER)

# REPLY ``status`` and ``value``:
STATUS_OK = 0           # value: the result
STATUS_NOT_LEADER = 1   # value: the index of the node believed to lead the shard, or None
STATUS_ERROR = 2        # value: [error class name, message]; the request is wrong, do not retry
STATUS_RETRY = 3        # value: a reason; the node could not do it now (dropped, stopping, full)
STATUS_OK_FORWARDED = 4  # value: [result, leader index]: done by the leader this node forwarded to
STATUSES = (STATUS_OK, STATUS_NOT_LEADER, STATUS_ERROR, STATUS_RETRY, STATUS_OK_FORWARDED)


class FrameError(ValueError):
    """A frame that is not a kvstore message: dropped and counted, never acted on."""


def _pack(body: list) -> bytes:
    return bytes((WIRE_VERSION,)) + msgpack.packb(body, use_bin_type=True)


def _int(v, what: str) -> int:
    if type(v) is not int:
        raise FrameError(f"{what} must be an int")
    return v


# ---------------------------------------------------------------------- encoding

def encode_paxos(from_node: int, items: list) -> bytes:
    """One frame carrying ``[(shard, Message), ...]`` from ``from_node`` to one peer."""
    return _pack([PAXOS, from_node, [[shard, to_wire(m)] for shard, m in items]])


def encode_request(request_id: int, op: str, args: list) -> bytes:
    return _pack([REQUEST, request_id, op, args])


def encode_reply(request_id: int, status: int, value=None) -> bytes:
    return _pack([REPLY, request_id, status, value])


def encode_requests(requests: list) -> bytes:
    """``[(request_id, op, args), ...]`` in one frame."""
    return _pack([REQUESTS, [list(r) for r in requests]])


def encode_replies(replies: list) -> bytes:
    """``[(request_id, status, value), ...]`` in one frame."""
    return _pack([REPLIES, [list(r) for r in replies]])


def encode_replies_frames(replies: list, target_bytes: int):
    """``[(request_id, status, value), ...]`` as REPLIES frames of about ``target_bytes``
    at most (one reply bigger than that goes alone), each reply encoded once."""
    head = bytes((WIRE_VERSION,)) + msgpack.packb(REPLIES)
    parts: list = []
    size = 0
    for r in replies:
        item = msgpack.packb(list(r), use_bin_type=True)
        if parts and size + len(item) > target_bytes:
            yield _frame_of(head, parts)
            parts, size = [], 0
        parts.append(item)
        size += len(item)
    if parts:
        yield _frame_of(head, parts)


def _frame_of(head: bytes, items: list) -> bytes:
    packer = msgpack.Packer()
    return b"".join([head[:1], packer.pack_array_header(2), head[1:],
                     packer.pack_array_header(len(items)), *items])


def encode_forward(from_node: int, requests: list) -> bytes:
    """``[(forward_id, op, args), ...]`` from a follower to the leader."""
    return _pack([FORWARD, from_node, [list(r) for r in requests]])


def encode_forwarded(from_node: int, replies: list) -> bytes:
    """``[(forward_id, status, value), ...]`` from the leader back to a follower."""
    return _pack([FORWARDED, from_node, [list(r) for r in replies]])


def paxos_message_bytes(m: Message) -> int:
    """A cheap upper-bound guess of a message's encoded size, for cutting batches."""
    return 96 + sum(len(r) + 8 for r in m.records) + len(m.data)


def encode_paxos_frames(from_node: int, messages: list, target_bytes: int):
    """``[(shard, Message), ...]`` for one peer as PAXOS frames of about ``target_bytes``
    at most by ``paxos_message_bytes`` (one message bigger than that goes alone)."""
    batch, size = [], 0
    for shard, m in messages:
        n = paxos_message_bytes(m)
        if batch and size + n > target_bytes:
            yield encode_paxos(from_node, batch)
            batch, size = [], 0
        batch.append((shard, m))
        size += n
    if batch:
        yield encode_paxos(from_node, batch)


# ---------------------------------------------------------------------- decoding

def decode(frame: bytes, max_frame_bytes: int = MAX_PEER_FRAME_BYTES) -> list:
    """The checked body of one frame; raises ``FrameError`` for anything else.

    Shapes checked here: the kind and its fields' types. Paxos messages come
    back as ``[PAXOS, from_node, [(shard, Message), ...]]`` with every record
    already checksummed. Request ``args`` are only checked to be a list: the
    node checks each op's arguments where it acts on them.
    """
    n = len(frame)
    if n < 2:
        raise FrameError("frame too short")
    if n > max_frame_bytes:
        raise FrameError(f"frame of {n} bytes is over the limit of {max_frame_bytes}")
    if frame[0] != WIRE_VERSION:
        raise FrameError(f"unknown wire version {frame[0]}")
    try:
        # msgpack (>= 1.0) bounds each container and string by the buffer's own
        # size, so a lying length header cannot make it allocate beyond ``n`` bytes.
        body = msgpack.unpackb(memoryview(frame)[1:], raw=False, use_list=True,
                               strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated classes
        raise FrameError(f"undecodable frame: {type(e).__name__}") from None
    if type(body) is not list or not body:
        raise FrameError("frame body is not a list")
    kind = body[0]
    if kind == PAXOS:
        return _decode_paxos(body)
    if kind == REQUEST:
        if len(body) != 4:
            raise FrameError("malformed request")
        _check_request(body[1:])
        return body
    if kind == REPLY:
        if len(body) != 4:
            raise FrameError("malformed reply")
        _check_reply(body[1:])
        return body
    if kind == FORWARD or kind == FORWARDED:
        if len(body) != 3 or type(body[2]) is not list:
            raise FrameError("malformed forward batch")
        _int(body[1], "sender")
        _check_items(body[2], _check_request if kind == FORWARD else _check_reply,
                     "forward item")
        return body
    if kind == REQUESTS or kind == REPLIES:
        if len(body) != 2 or type(body[1]) is not list:
            raise FrameError("malformed batch")
        _check_items(body[1], _check_request if kind == REQUESTS else _check_reply,
                     "batch item")
        return body
    raise FrameError(f"unknown frame kind {kind!r}"[:80])


def _check_items(items: list, check: Callable[[list], None], what: str) -> None:
    """Each item of a batch is a ``[request id, op or status, args or value]`` list that
    ``check`` accepts: a batched or forwarded request (reply) is checked as a lone one is."""
    for item in items:
        if type(item) is not list or len(item) != 3:
            raise FrameError(f"malformed {what}")
        check(item)


def _check_request(item: list) -> None:
    _int(item[0], "request id")
    if item[1] not in OPS:
        raise FrameError(f"unknown op {item[1]!r}"[:80])
    if type(item[2]) is not list:
        raise FrameError("request args must be a list")


def _check_reply(item: list) -> None:
    _int(item[0], "request id")
    if item[1] not in STATUSES:
        raise FrameError("unknown reply status")


def _decode_paxos(body: list) -> list:
    if len(body) != 3:
        raise FrameError("malformed paxos batch")
    frm = _int(body[1], "sender")
    items = body[2]
    if type(items) is not list:
        raise FrameError("paxos batch items must be a list")
    out = []
    for item in items:
        if type(item) is not list or len(item) != 2:
            raise FrameError("malformed paxos batch item")
        shard = _int(item[0], "shard")
        try:
            m = from_wire(item[1])
        except (ValueError, TypeError) as e:
            raise FrameError(f"bad paxos message: {e}") from None
        if m.frm != frm:
            raise FrameError("paxos message sender differs from the batch's")
        for rec in m.records:
            _check_record(rec)
        out.append((shard, m))
    return [PAXOS, frm, out]


def _check_record(rec: bytes) -> None:
    """A log record from a peer: checksummed, its fields in range, its payload what its
    kind says (a batch must decode: a value that does not would be chosen, then fail
    every replica that applies it)."""
    try:
        slot, ballot, kind, payload = decode_record(rec)
    except (CorruptRecord, ValueError) as e:
        raise FrameError(f"corrupt record in a paxos message: {e}") from None
    if slot > SLOT_MAX or ballot > BALLOT_MAX:
        raise FrameError(f"record's slot {slot} or ballot {ballot} out of range"[:120])
    if kind == KIND_NOOP:
        if payload:
            raise FrameError(f"a no-op record at slot {slot} with a payload")
    elif kind == KIND_BATCH:
        try:
            decode_batch(payload)
        except ValueError as e:
            raise FrameError(f"record at slot {slot}: {e}") from None
    elif kind == KIND_CONFIG:
        try:
            decode_membership(payload, slot)
        except ValueError as e:
            raise FrameError(f"record at slot {slot}: {e}") from None
    else:
        raise FrameError(f"record at slot {slot} of unknown kind {kind}")


def check_paxos_message(m: Message, me: int, num_nodes: int, check_command) -> str | None:
    """Why the node ``me`` of ``num_nodes`` must not hand ``m`` (decoded by ``decode``)
    to its replica, or None. ``check_command(bytes)`` raises ``ValueError`` for a
    command the application cannot apply; every command of every record is checked
    (an Accept's are about to be accepted; a Promise's may be re-proposed)."""
    if not (m.frm < num_nodes and m.to < num_nodes):
        return f"from node {m.frm} to node {m.to}: this cluster has {num_nodes} nodes"
    if m.to != me or m.frm == me:
        return f"from node {m.frm} to node {m.to}, received by node {me}"
    for rec in m.records:
        slot, _ballot, kind, payload = decode_record(rec)
        if kind != KIND_BATCH:
            continue
        for command in decode_batch(payload):
            try:
                check_command(command)
            except (ValueError, TypeError) as e:
                return f"a command at slot {slot} is not one this node applies: {e}"[:200]
    return None
