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
  (``client.key`` to begin with);
- ``admins/``: the client public keys that may also change the cluster's
  membership (``kvstore member add/promote/remove``; ``client.key`` to begin
  with). Any allowed client may read and write data, and list the members; only
  these may change them, as only etcd's root may. A key directory written before
  ``admins/`` existed has none: every allowed client is then an admin, as it was,
  and each node says so in its log when it starts.

Each ROUTER has its own ZAP domain (libzmq's authentication protocol, run by
``zmq.auth``'s thread) with its own allow-list, so a client key does not
complete the handshake on the peer port, and a node key is no client.

Clients: ``kvstore keygen --client NAME DIR`` writes ``NAME.key`` and
``NAME.key_secret`` and allows ``NAME.key`` (a copy in ``clients/``); the
client uses ``keys="DIR/NAME.key_secret"`` (``server.key`` is read beside it).
``--admin`` also lists it in ``admins/``. To revoke one, remove its file from
``clients/`` (and ``admins/``): every node rereads both directories when they
change (looked at every ``kvstore.node.loop.RELOAD_KEYS_SECONDS``, 2 s), refuses
the key's new handshakes, and drops the requests of its open connections.

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
ADMINS = "admins"
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


def keygen(directory: str, client: str | None = None, admin: bool = False) -> list:
    """Write the cluster's key pairs and allow-lists into ``directory``, or with
    ``client``, one more client key pair (allowed in ``clients/``, and with ``admin`` in
    ``admins/``); the files written."""
    if client is not None:
        return add_client(directory, client, admin)
    if admin:
        raise InvalidArgument("--admin goes with --client NAME: the cluster's first client "
                              "key is an admin already")
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
    for sub, name in ((NODES, NODE), (CLIENTS, CLIENT), (ADMINS, CLIENT)):
        os.makedirs(os.path.join(directory, sub), exist_ok=True)
        dst = os.path.join(directory, sub, f"{name}.key")
        shutil.copyfile(os.path.join(directory, f"{name}.key"), dst)
        written.append(dst)
    return written


def add_client(directory: str, name: str, admin: bool = False) -> list:
    """``kvstore keygen --client NAME [--admin] DIR``: a client key pair, allowed in
    ``clients/`` (and with ``admin`` in ``admins/``, which is made if missing: from then
    on only the keys it lists are admins)."""
    import re
    if not re.match(r"^[A-Za-z0-9_.-]{1,64}$", name) or name in (SERVER, NODE) or name[0] == ".":
        raise InvalidArgument(f"client name {name!r} must be 1-64 letters, digits, '_', '.' "
                              f"or '-', and not {SERVER!r} or {NODE!r}")
    _check_layout(os.path.abspath(directory))
    written = _create(directory, name)
    for sub in (CLIENTS, ADMINS) if admin else (CLIENTS,):
        os.makedirs(os.path.join(directory, sub), exist_ok=True)
        dst = os.path.join(directory, sub, f"{name}.key")
        shutil.copyfile(os.path.join(directory, f"{name}.key"), dst)
        written.append(dst)
    return written


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
            self.admins = os.path.join(self.directory, ADMINS)
            self._clients_seen = None
            self.allowed_clients: frozenset = frozenset()
            self._admins_seen = None
            #: the Z85 public keys of ``admins/``; None: no ``admins/`` (every client is one)
            self.allowed_admins: frozenset | None = None
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

    @staticmethod
    def _state(directory: str):
        try:
            return [(e.name, e.stat().st_mtime_ns, e.stat().st_size)
                    for e in sorted(os.scandir(directory), key=lambda e: e.name)]
        except OSError:
            return None

    def is_admin(self, user_id: str | None) -> bool:
        """May the client of this Z85 public key (a frame's ``User-Id``) change the
        membership? Every allowed client may while there is no ``admins/``."""
        return self.allowed_admins is None or user_id in self.allowed_admins

    def reload_admins(self, force: bool = False) -> bool:
        """Reread ``admins/`` if it changed (appeared, a key added or removed); True if it
        did. Its keys are ``zmq.auth`` public key files, as ``clients/``'s are, read one by
        one rather than with ``zmq.auth.load_certificates``, which gives up on the whole
        directory at the first file that is not a key: one stray file would then freeze
        the list, and with it every revocation after."""
        if not os.path.isdir(self.admins):
            changed = self.allowed_admins is not None or force
            self._admins_seen, self.allowed_admins = None, None
            return changed
        state = self._state(self.admins)
        if state is None or (state == self._admins_seen and not force):
            return False
        import zmq.auth
        self._admins_seen = state
        admins = set()
        for name, _mtime, _size in state:
            if not name.endswith(".key"):
                continue
            try:
                public, _secret = zmq.auth.load_certificate(os.path.join(self.admins, name))
            except (OSError, ValueError):
                continue  # half written, or not a key: looked at again once it changes
            admins.add(public.decode() if type(public) is bytes else public)
        self.allowed_admins = frozenset(admins)
        return True

    def reload_clients(self, auth, force: bool = False) -> bool:
        """Reread ``clients/`` into ``auth`` if it changed; True if it did."""
        state = self._state(self.clients)
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
