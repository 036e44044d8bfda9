"""Who may talk to the bus: loopback/ipc by default, CURVE (zmq.auth) for anything else."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth

from m2m.bus.errors import SecurityError


def is_local(endpoint: str) -> bool:
    """True for ipc://, inproc:// and tcp:// on a loopback address: ``localhost``, an IPv4 address in
    127.0.0.0/8 or ``[::1]``, parsed as an address (``127.evil.com`` is a host name, not a loopback address;
    ``0.0.0.0`` and ``*`` listen on every interface)."""
    scheme, _, rest = endpoint.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        return False
    host, sep, port = rest.rpartition(":")
    if not sep or not port:
        return False
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name or an interface name: not provably loopback
        return False


def require_safe_bind(endpoint: str, curve: bool) -> None:
    """Refuse to listen beyond this machine without CURVE."""
    if not is_local(endpoint) and not curve:
        raise SecurityError(
            f"refusing to listen on {endpoint} without CURVE keys (use ipc:// or 127.0.0.1, or --curve-secret)"
        )


@dataclass(frozen=True)
class ServerKeys:
    """The broker's key pair plus the folder of authorised client public keys (``*.key`` files)."""

    public: bytes
    secret: bytes
    clients_dir: Path


@dataclass(frozen=True)
class ClientKeys:
    """A client's key pair and the broker's public key."""

    public: bytes
    secret: bytes
    server_public: bytes

    @classmethod
    def load(cls, secret_file: str | Path, server_public_file: str | Path) -> ClientKeys:
        pub, sec = load_secret(secret_file)
        server_pub, _ = zmq.auth.load_certificate(str(server_public_file))
        return cls(public=pub, secret=sec, server_public=server_pub)


def load_secret(path: str | Path) -> tuple[bytes, bytes]:

    pub, sec = zmq.auth.load_certificate(str(path))
    if sec is None:
        raise SecurityError(f"{path} holds no secret key (use the .key_secret file)")
    return pub, sec


def generate_keys(name: str, directory: str | Path) -> tuple[Path, Path]:
    """Write ``NAME.key`` (public) and ``NAME.key_secret`` in ``directory``; returns both paths."""

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    pub, sec = zmq.auth.create_certificates(str(d), name)
    Path(sec).chmod(0o600)
    return Path(pub), Path(sec)


def apply_server(sock: zmq.Socket[Any], keys: ServerKeys) -> None:
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_server = True


def apply_client(sock: zmq.Socket[Any], keys: ClientKeys) -> None:
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_serverkey = keys.server_public


def start_authenticator(ctx: zmq.Context[Any], keys: ServerKeys) -> Any:
    """A ZAP handler thread that admits only the public keys in ``keys.clients_dir``."""
    from zmq.auth.thread import ThreadAuthenticator

    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=str(keys.clients_dir))
    return auth
