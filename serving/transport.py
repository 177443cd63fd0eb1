"""What the gRPC servers here (the local server, the logging sidecar) and the client share, kept
apart from the server so that the sidecar and the client start without loading TensorFlow."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import grpc

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
"""The message cap, both ways (TF Serving's ``grpc.max_receive_message_length`` set the same)."""
GRACE_SECONDS = 10.0
"""How long calls in flight may finish on SIGTERM."""


def message_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """gRPC options for messages up to ``max_message_bytes`` each way (a server or channel)."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


def server_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """A server's options: ``message_options``, and no port shared with another process."""
    return [*message_options(max_message_bytes), ("grpc.so_reuseport", 0)]


def server_credentials(ssl_config: Any) -> grpc.ServerCredentials:
    """TLS for the gRPC port as TF Serving sets it up from an SSLConfig: the server's key and
    certificate; with ``client_verify``, client certificates signed by ``custom_ca`` required."""
    return grpc.ssl_server_credentials(
        [(ssl_config.server_key.encode(), ssl_config.server_cert.encode())],
        root_certificates=ssl_config.custom_ca.encode() or None,
        require_client_auth=ssl_config.client_verify,
    )


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address, IPv6 with or without brackets) stays on this
    machine: ``localhost``, 127.0.0.0/8 or ::1."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # another name: it may resolve to any interface
        return False


def bind(server: grpc.Server, host: str, port: int, credentials: Any = None) -> tuple[int, str]:
    """Add ``host:port`` to ``server`` (TLS with ``credentials``); the bound port (0 picks a
    free one) and the address."""
    bound = (
        server.add_secure_port(f"{host}:{port}", credentials)
        if credentials is not None
        else server.add_insecure_port(f"{host}:{port}")
    )
    if not bound:
        raise OSError(f"cannot bind {host}:{port}")
    return bound, f"{host}:{bound}"


def write_port_file(path: Path, port: int) -> None:
    """The bound port, written in one rename: a waiting test or script reads it whole."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(str(port))
    tmp.replace(path)
