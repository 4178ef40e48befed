"""Who the members of a cluster are, as bytes: the ``info`` of a Paxos ``Membership``.

The Paxos core carries a membership's ``info`` without reading it; the node
writes there, for every voter and learner, its name and where it listens:
msgpack of ``{index: [name, client_address, peer_address]}``. Those bytes reach
a node in a peer's log record, a snapshot or a client's ``member`` answer, so
they are input like any frame: ``decode_info`` checks every field (an index in
0..63, a name of the config file's alphabet, ``tcp://HOST:PORT`` addresses, no
address claimed twice) and the total size before anything acts on them, and
raises ``ValueError`` (a message a user can act on) otherwise.

The names and addresses follow cluster.toml's rules (``kvstore.node.config``
checks a config file with the same functions).
"""

from __future__ import annotations

import re
from typing import NamedTuple

import msgpack

from kvstore.msgmap import decode_map

#: Node indexes are 0..MAX_NODES-1 (the quorum kernels' limit).
MAX_NODES = 64
#: An encoded ``info`` is at most this many bytes (64 members of long names and hosts fit).
MAX_INFO_BYTES = 64 * 1024
#: A member's name: what ``[nodes.NAME]`` of cluster.toml allows.
NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_ADDRESS = re.compile(r"^tcp://([^:/\s]+|\[[0-9a-fA-F:.]+\]):(\d{1,5})$")
#: An address is at most this long (it rides in a peer's routing id: 255 bytes at most).
MAX_ADDRESS_CHARS = 230


class Member(NamedTuple):
    """One node of the cluster: its name and its two addresses."""

    name: str
    address: str  # where clients connect
    peer_address: str  # where the other nodes connect


def is_tcp_address(value: object) -> bool:
    """Whether ``value`` is ``tcp://HOST:PORT`` with a port in 1..65535 (one rule for a
    node's client address and its peer address)."""
    if not isinstance(value, str) or len(value) > MAX_ADDRESS_CHARS:
        return False
    match = _ADDRESS.match(value)
    return match is not None and 0 < int(match.group(2)) < 65536


def encode_info(members: dict) -> bytes:
    """``{index: Member}`` as a membership's ``info`` (checked: ``ValueError`` if bad)."""
    raw = msgpack.packb({i: list(m) for i, m in sorted(members.items())}, use_bin_type=True)
    decode_info(raw)  # what this node writes is what every node will accept
    return raw


def decode_info(raw: bytes) -> dict:
    """``{index: Member}`` from a membership's ``info``; ``ValueError`` naming what is wrong.

    Empty bytes are no members (the core's default ``info``)."""
    if type(raw) is not bytes:
        raise ValueError("a membership's info is bytes")
    if not raw:
        return {}
    doc = decode_map(raw, MAX_INFO_BYTES, "a membership's info",
                     shape="a map of index to member", strict_map_key=False)
    out = {}
    claimed: dict = {}
    names: dict = {}
    for index, fields in doc.items():
        if type(index) is not int or not 0 <= index < MAX_NODES:
            raise ValueError(f"a membership names node index {index!r}, not one of "
                             f"0..{MAX_NODES - 1}"[:200])
        if type(fields) is not list or len(fields) != 3:
            raise ValueError(f"member #{index} is not [name, address, peer_address]")
        name, address, peer_address = fields
        if type(name) is not str or not NAME.match(name):
            raise ValueError(f"member #{index}'s name {name!r} is not 1-64 letters, digits, "
                             f"'_', '.' or '-'"[:200])
        if name in names:
            raise ValueError(f"members #{names[name]} and #{index} are both named {name}")
        names[name] = index
        for what, value in (("address", address), ("peer address", peer_address)):
            if not is_tcp_address(value):
                raise ValueError(f"member {name}'s {what} {value!r} does not look like "
                                 f"tcp://HOST:PORT"[:200])
            if value in claimed:
                raise ValueError(f"members {claimed[value]} and {name} share the address {value}")
            claimed[value] = name
        out[index] = Member(name, address, peer_address)
    return out


def describe(members: dict) -> str:
    """``n1 (tcp://A, peers tcp://P), ...``: members for a message, in index order."""
    return ", ".join(f"{m.name} ({m.address}, peers {m.peer_address})"
                     for _i, m in sorted(members.items())) or "none"
