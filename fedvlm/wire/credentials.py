"""TLS credentials and channel options shared by the coordinator, the client and the admin CLI."""

from __future__ import annotations

from pathlib import Path

import grpc

# Frames are ~1 MiB; leave headroom for the envelope without allowing unbounded messages.
MAX_MESSAGE_BYTES = 8 << 20

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]

SERVER_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.so_reuseport", 0),
]


def mtls_server_credentials(key_pem: bytes, cert_pem: bytes, ca_pem: bytes) -> grpc.ServerCredentials:
    """Server credentials that refuse, at the TLS handshake, any peer without a certificate chaining to `ca_pem`."""
    return grpc.ssl_server_credentials([(key_pem, cert_pem)], root_certificates=ca_pem, require_client_auth=True)


def mtls_channel(target: str, key_pem: bytes, cert_pem: bytes, ca_pem: bytes,
                 server_name: str | None = None) -> grpc.Channel:
    """A channel that verifies the coordinator against `ca_pem` and presents this site's certificate."""
    creds = grpc.ssl_channel_credentials(root_certificates=ca_pem, private_key=key_pem, certificate_chain=cert_pem)
    options = list(CHANNEL_OPTIONS)
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return grpc.secure_channel(target, creds, options=options)


def mtls_channel_from_files(target: str, key: Path, cert: Path, ca: Path) -> grpc.Channel:
    """`mtls_channel` with the PEM material read from files."""
    return mtls_channel(target, key.read_bytes(), cert.read_bytes(), ca.read_bytes())


def bootstrap_channel(target: str) -> grpc.Channel:
    """The enrollment channel: no TLS; the join-token HMAC and the CA pin authenticate the exchange instead."""
    return grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
