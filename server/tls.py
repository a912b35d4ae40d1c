"""TLS for the gRPC port: a server certificate, and client certificates for mutual TLS."""

from __future__ import annotations

from pathlib import Path

import grpc


class TLSConfigError(ValueError):
    """A certificate or key file that cannot be used; the message names the file."""


def server_credentials(cert: str, key: str, client_ca: str | None = None) -> grpc.ServerCredentials:
    """With ``client_ca`` the server asks every client for a certificate signed by it (mutual TLS)."""
    chain = _read_pem(cert, "--tls-cert", "CERTIFICATE")
    private_key = _read_pem(key, "--tls-key", "PRIVATE KEY")
    roots = _read_pem(client_ca, "--tls-client-ca", "CERTIFICATE") if client_ca else None
    return grpc.ssl_server_credentials(
        [(private_key, chain)], root_certificates=roots, require_client_auth=roots is not None
    )


def _read_pem(path: str, flag: str, kind: str) -> bytes:
    # grpc only finds a bad file at the first handshake, with a log line far from the cause:
    # check the shape here so start-up fails with the flag's name instead.
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise TLSConfigError(f"{flag} {path}: {exc.strerror}") from None
    if b"-----BEGIN" not in data or kind.encode() not in data:
        raise TLSConfigError(f"{flag} {path}: not a PEM file holding a {kind}")
    return data
