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


_ARITY = {"put": 1, "delete": 0, "cas": 2}


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


    @staticmethod
    def check_command(cmd: bytes) -> None:
        """``ValueError`` unless ``cmd`` is a command ``apply`` applies (the simulated
        node's check of a peer's records, as the real node's ``check_logged_command``)."""
        try:
            client, seq, kind, key, args = msgpack.unpackb(cmd, raw=False)
        except Exception as e:  # msgpack's classes, or not five items
            raise ValueError(f"not a KV command: {type(e).__name__}") from None
        if type(client) is not int or type(seq) is not int or type(key) is not bytes:
            raise ValueError("a KV command's client, seq or key has the wrong type")
        if kind not in _ARITY or type(args) is not list or len(args) != _ARITY[kind]:
            raise ValueError(f"unknown KV command {kind!r}"[:60])
        if not all(a is None or type(a) is bytes for a in args) or (kind == "put" and args[0] is None):
            raise ValueError("a KV command's arguments have the wrong type")

    @classmethod
    def check_snapshot(cls, data: bytes) -> bool:
        """Whether ``data`` is a state ``restore`` takes (``Config.snapshot_ok``)."""
        try:
            cls.restore(data)
        except Exception:  # noqa: BLE001 - anything that does not restore is refused
            return False
        return True
