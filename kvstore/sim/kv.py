"""The small key-value state machine the simulator replicates.

Commands are msgpack ``[client, seq, kind, key, args]``; a client's retried
command (same ``(client, seq)``) takes effect once: the session table keeps each
client's last seq and result, and a command at or below it is answered from there.
"""

from __future__ import annotations

import msgpack


def encode_command(client: int, seq: int, kind: str, key: bytes, args: tuple) -> bytes:
    return msgpack.packb([client, seq, kind, key, list(args)], use_bin_type=True)


def decode_command(cmd: bytes) -> tuple:
    client, seq, kind, key, args = msgpack.unpackb(cmd, raw=False)
    return client, seq, kind, key, tuple(args)


class KV:
    def __init__(self) -> None:
        self.data: dict = {}
        self.sessions: dict = {}  # client -> (seq, result)
        self.effects = 0  # commands that took effect (not deduplicated)

    def apply(self, cmd: bytes) -> tuple:
        """Apply one command; returns ``((client, seq), result, took_effect)``."""
        client, seq, kind, key, args = decode_command(cmd)
        last = self.sessions.get(client)
        if last is not None and seq <= last[0]:
            return (client, seq), (last[1] if seq == last[0] else None), False
        if kind == "put":
            self.data[key] = args[0]
            result = None
        elif kind == "delete":
            result = self.data.pop(key, None) is not None
        elif kind == "cas":
            expected, new = args
            if self.data.get(key) == expected:
                if new is None:
                    self.data.pop(key, None)
                else:
                    self.data[key] = new
                result = True
            else:
                result = False
        else:
            raise ValueError(f"unknown command kind {kind!r}")
        self.sessions[client] = (seq, result)
        self.effects += 1
        return (client, seq), result, True

    def get(self, key: bytes):
        return self.data.get(key)

    def snapshot(self) -> bytes:
        return msgpack.packb([sorted(self.data.items()),
                              sorted((c, s, r) for c, (s, r) in self.sessions.items())],
                             use_bin_type=True)

    @classmethod
    def restore(cls, data: bytes) -> "KV":
        kv = cls()
        items, sessions = msgpack.unpackb(data, raw=False)
        kv.data = {k: v for k, v in items}
        kv.sessions = {c: (s, r) for c, s, r in sessions}
        return kv
