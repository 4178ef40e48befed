"""CurveZMQ for a cluster: ``[security] curve = true`` and ``keys = "DIR"`` in cluster.toml.

``kvstore keygen DIR`` writes (``zmq.auth`` certificate files, public ``NAME.key``
and secret ``NAME.key_secret``):

- ``server``: the cluster's server key pair; both ROUTERs of every node are
  Curve servers with it, so a client or peer needs only ``server.key`` to
  reach any node;
- ``node``: the key pair nodes present to each other on their peer links;
- ``client``: a key pair for clients (``kvstore.connect(..., keys=DIR)`` or
  ``KVSTORE_KEYS=DIR``);
- ``nodes/``: the node public keys the **peer** ROUTER lets in (``node.key``);
- ``clients/``: the client public keys the **client** ROUTER lets in
  (``client.key`` to begin with).

Each ROUTER has its own ZAP domain (libzmq's authentication protocol, run by
``zmq.auth``'s thread) with its own allow-list, so a client key does not
complete the handshake on the peer port, and a node key is no client.

Clients: ``kvstore keygen --client NAME DIR`` writes ``NAME.key`` and
``NAME.key_secret`` and allows ``NAME.key`` (a copy in ``clients/``); the
client uses ``keys="DIR/NAME.key_secret"`` (``server.key`` is read beside it).
To revoke one, remove its file from ``clients/``: every node rereads the
directory when it changes (looked at every ``kvstore.node.loop.RELOAD_KEYS_SECONDS``, 2 s), refuses the
key's new handshakes, and drops the requests of its open connections.

A refused client learns it from its socket monitor (a failed handshake) and
its error says authentication failed.
"""

from __future__ import annotations

import os
import shutil

from kvstore.errors import InvalidArgument

SERVER = "server"
NODE = "node"
CLIENT = "client"
NODES = "nodes"
CLIENTS = "clients"
OLD_ALLOWED = "allowed"
#: ZAP domains of the two ROUTERs (``zmq.Socket.zap_domain``).
PEER_DOMAIN = "kvstore-peers"
CLIENT_DOMAIN = "kvstore-clients"


def _create(directory: str, name: str) -> list:
    import zmq.auth
    if os.path.exists(os.path.join(directory, f"{name}.key_secret")) \
            or os.path.exists(os.path.join(directory, f"{name}.key")):
        raise InvalidArgument(f"{directory} already holds keys ({name}.key); "
                              f"use another directory or name, or remove them first")
    public, secret = zmq.auth.create_certificates(directory, name)
    os.chmod(secret, 0o600)
    return [public, secret]


def keygen(directory: str, client: str | None = None) -> list:
    """Write the cluster's key pairs and allow-lists into ``directory``, or with
    ``client``, one more client key pair (allowed in ``clients/``); the files written."""
    if client is not None:
        return add_client(directory, client)
    if os.path.isdir(os.path.join(directory, OLD_ALLOWED)):
        raise InvalidArgument(f"{directory} holds keys in the old layout (allowed/); write a new "
                              f"key directory with `kvstore keygen NEWDIR`")
    os.makedirs(directory, exist_ok=True)
    written = []
    for name in (SERVER, NODE, CLIENT):
        if os.path.exists(os.path.join(directory, f"{name}.key_secret")):
            raise InvalidArgument(f"{directory} already holds keys ({name}.key_secret); "
                                  f"use another directory or remove them first")
    for name in (SERVER, NODE, CLIENT):
        written += _create(directory, name)
    for sub, name in ((NODES, NODE), (CLIENTS, CLIENT)):
        os.makedirs(os.path.join(directory, sub), exist_ok=True)
        dst = os.path.join(directory, sub, f"{name}.key")
        shutil.copyfile(os.path.join(directory, f"{name}.key"), dst)
        written.append(dst)
    return written


def add_client(directory: str, name: str) -> list:
    """``kvstore keygen --client NAME DIR``: a client key pair, allowed in ``clients/``."""
    import re
    if not re.match(r"^[A-Za-z0-9_.-]{1,64}$", name) or name in (SERVER, NODE) or name[0] == ".":
        raise InvalidArgument(f"client name {name!r} must be 1-64 letters, digits, '_', '.' "
                              f"or '-', and not {SERVER!r} or {NODE!r}")
    _check_layout(os.path.abspath(directory))
    written = _create(directory, name)
    dst = os.path.join(directory, CLIENTS, f"{name}.key")
    shutil.copyfile(os.path.join(directory, f"{name}.key"), dst)
    return written + [dst]


def _check_layout(directory: str) -> None:
    if not os.path.isdir(directory):
        raise InvalidArgument(f"the Curve key directory {directory} does not exist; "
                              f"`kvstore keygen {directory}` writes one")
    if not os.path.isdir(os.path.join(directory, NODES)) \
            or not os.path.isdir(os.path.join(directory, CLIENTS)):
        if os.path.isdir(os.path.join(directory, OLD_ALLOWED)):
            raise InvalidArgument(f"the Curve key directory {directory} is in the old layout "
                                  f"(one allowed/ for nodes and clients): write new keys with "
                                  f"`kvstore keygen NEWDIR` (nodes/ and clients/) and point "
                                  f"[security] keys at it")
        raise InvalidArgument(f"the Curve key directory {directory} has no nodes/ and clients/ "
                              f"allow-lists; `kvstore keygen NEWDIR` writes them")


def _load(directory: str, name: str, secret: bool) -> tuple:
    import zmq.auth
    path = os.path.join(directory, f"{name}.key_secret" if secret else f"{name}.key")
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise InvalidArgument(f"cannot read the Curve key {path} ({e}); "
                              f"`kvstore keygen {directory}` writes the keys") from None
    if secret and not secret_key:
        raise InvalidArgument(f"{path} holds no secret key")
    return public, secret_key


class CurveKeys:
    """The keys one process uses, loaded from a ``keygen`` directory.

    ``role`` "node": the server and node key pairs and both allow-lists.
    ``role`` "client": ``location`` is the directory (its ``client`` pair) or the
    path of one client's ``NAME.key_secret`` (``server.key`` beside it).
    """

    def __init__(self, location: str, role: str) -> None:
        location = os.path.abspath(location)
        name = CLIENT
        if role != "node" and location.endswith(".key_secret") and os.path.isfile(location):
            location, file = os.path.split(location)
            name = file[:-len(".key_secret")]
        self.directory = location
        if not os.path.isdir(self.directory):
            raise InvalidArgument(f"the Curve key directory {self.directory} does not exist; "
                                  f"`kvstore keygen {self.directory}` writes one")
        self.server_public, _ = _load(self.directory, SERVER, secret=False)
        self.name = name
        if role == "node":
            _check_layout(self.directory)
            _, self.server_secret = _load(self.directory, SERVER, secret=True)
            self.public, self.secret = _load(self.directory, NODE, secret=True)
            self.nodes = os.path.join(self.directory, NODES)
            self.clients = os.path.join(self.directory, CLIENTS)
            self._clients_seen = None
            self.allowed_clients: frozenset = frozenset()
        else:
            self.public, self.secret = _load(self.directory, name, secret=True)

    def make_server(self, socket, role: str) -> None:
        """A Curve server in the ZAP domain of ``role`` ("peers" or "clients")."""
        socket.curve_secretkey = self.server_secret
        socket.curve_publickey = self.server_public
        socket.curve_server = True
        socket.zap_domain = (PEER_DOMAIN if role == "peers" else CLIENT_DOMAIN).encode()

    def make_client(self, socket) -> None:
        socket.curve_secretkey = self.secret
        socket.curve_publickey = self.public
        socket.curve_serverkey = self.server_public

    def _clients_state(self):
        try:
            return [(e.name, e.stat().st_mtime_ns, e.stat().st_size)
                    for e in sorted(os.scandir(self.clients), key=lambda e: e.name)]
        except OSError:
            return None

    def reload_clients(self, auth, force: bool = False) -> bool:
        """Reread ``clients/`` into ``auth`` if it changed; True if it did."""
        state = self._clients_state()
        if state is None or (state == self._clients_seen and not force):
            return False
        self._clients_seen = state
        auth.configure_curve(domain=CLIENT_DOMAIN, location=self.clients)
        self.allowed_clients = frozenset(k.decode() if type(k) is bytes else k
                                         for k in auth.certs.get(CLIENT_DOMAIN, {}))
        return True


def start_authenticator(context, keys: CurveKeys, role: str):
    """The ZAP handler of ``context`` for ``role`` ("peers": node keys in the peer
    domain; "clients": client keys in the client domain); any other domain, or a key
    not listed, is refused."""
    from zmq.auth.thread import ThreadAuthenticator
    auth = ThreadAuthenticator(context)
    auth.start()
    if role == "peers":
        auth.configure_curve(domain=PEER_DOMAIN, location=keys.nodes)
    else:
        keys.reload_clients(auth, force=True)
    return auth
