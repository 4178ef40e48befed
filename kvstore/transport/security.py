"""CurveZMQ for a cluster: ``[security] curve = true`` and ``keys = "DIR"`` in cluster.toml.

``kvstore keygen DIR`` writes (``zmq.auth`` certificate files, public ``NAME.key``
and secret ``NAME.key_secret``):

- ``server``: the cluster's server key pair; every node's ROUTER is a Curve
  server with it, so a client or peer needs only ``server.key`` to reach any node;
- ``node``: the key pair nodes present to each other on their peer links;
- ``client``: a key pair for clients (``kvstore.connect(..., keys=DIR)`` or
  ``KVSTORE_KEYS=DIR``);
- ``allowed/``: the public keys a node lets in (``node.key`` and ``client.key``
  to begin with; add a file per further client).

All traffic is encrypted and authenticated; a node's ZAP handler (libzmq's
authentication protocol, run by ``zmq.auth``'s thread) refuses any key not in
``allowed/``. A refused client learns it from its socket monitor (a failed
handshake) and its error says authentication failed.
"""

from __future__ import annotations

import os
import shutil

from kvstore.errors import InvalidArgument

SERVER = "server"
NODE = "node"
CLIENT = "client"
ALLOWED = "allowed"


def keygen(directory: str) -> list:
    """Write the key pairs and ``allowed/`` into ``directory``; the files written."""
    import zmq.auth
    os.makedirs(directory, exist_ok=True)
    allowed = os.path.join(directory, ALLOWED)
    os.makedirs(allowed, exist_ok=True)
    written = []
    for name in (SERVER, NODE, CLIENT):
        if os.path.exists(os.path.join(directory, f"{name}.key_secret")):
            raise InvalidArgument(f"{directory} already holds keys ({name}.key_secret); "
                                  f"use another directory or remove them first")
        public, secret = zmq.auth.create_certificates(directory, name)
        os.chmod(secret, 0o600)
        written += [public, secret]
    for name in (NODE, CLIENT):
        dst = os.path.join(allowed, f"{name}.key")
        shutil.copyfile(os.path.join(directory, f"{name}.key"), dst)
        written.append(dst)
    return written


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
    """The keys one process uses, loaded from a ``keygen`` directory."""

    def __init__(self, directory: str, role: str) -> None:
        self.directory = os.path.abspath(directory)
        if not os.path.isdir(self.directory):
            raise InvalidArgument(f"the Curve key directory {self.directory} does not exist; "
                                  f"`kvstore keygen {directory}` writes one")
        self.server_public, _ = _load(self.directory, SERVER, secret=False)
        if role == "node":
            _, self.server_secret = _load(self.directory, SERVER, secret=True)
            self.public, self.secret = _load(self.directory, NODE, secret=True)
            self.allowed = os.path.join(self.directory, ALLOWED)
            if not os.path.isdir(self.allowed):
                raise InvalidArgument(f"{self.allowed} (the allowed public keys) does not exist")
        else:
            self.public, self.secret = _load(self.directory, CLIENT, secret=True)

    def make_server(self, socket) -> None:
        socket.curve_secretkey = self.server_secret
        socket.curve_publickey = self.server_public
        socket.curve_server = True

    def make_client(self, socket) -> None:
        socket.curve_secretkey = self.secret
        socket.curve_publickey = self.public
        socket.curve_serverkey = self.server_public


def start_authenticator(context, keys: CurveKeys):
    """The ZAP handler of ``context``: only the public keys in ``keys.allowed`` get in."""
    from zmq.auth.thread import ThreadAuthenticator
    auth = ThreadAuthenticator(context)
    auth.start()
    auth.configure_curve(domain="*", location=keys.allowed)
    return auth
