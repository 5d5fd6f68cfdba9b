"""A site's identity in its --state directory: key (generated here, never sent), certificate, pinned CA."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fedvlm.security import pki, tokens
from fedvlm.wire.credentials import bootstrap_channel, mtls_channel
from fedvlm.wire.v1 import enrollment_pb2, enrollment_pb2_grpc


class EnrollmentError(Exception):
    """Enrollment failed; nothing was written to the state directory."""


@dataclass(frozen=True)
class Identity:
    name: str
    federation_id: str
    key_pem: bytes
    cert_pem: bytes
    ca_pem: bytes

    @property
    def key(self):
        return pki.load_key_pem(self.key_pem)

    @property
    def ca_cert(self) -> x509.Certificate:
        return pki.load_cert_pem(self.ca_pem)

    def channel(self, target: str) -> grpc.Channel:
        return mtls_channel(target, self.key_pem, self.cert_pem, self.ca_pem)


class StateDir:
    """Files under --state: key.pem, cert.pem, ca.pem, identity.json, downloads/, outbox/."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.downloads = root / "downloads"
        self.outbox = root / "outbox"
        for d in (root, self.downloads, self.outbox):
            d.mkdir(parents=True, exist_ok=True)

    def load(self) -> Identity | None:
        files = [self.root / n for n in ("key.pem", "cert.pem", "ca.pem", "identity.json")]
        if not all(f.exists() for f in files):
            return None
        meta = json.loads(files[3].read_text())
        return Identity(meta["name"], meta["federation_id"], files[0].read_bytes(), files[1].read_bytes(),
                        files[2].read_bytes())

    def enroll(self, coordinator: str, join_token: str, timeout: float = 30.0) -> Identity:
        """Redeem a join token at the coordinator's enrollment port and store the resulting identity.

        The key is generated here and never leaves the site. The reply is accepted only if its CA matches the
        fingerprint pinned in the token and the certificate is issued by that CA for this key.
        """
        try:
            token = tokens.JoinToken.decode(join_token)
        except tokens.TokenError as exc:
            raise EnrollmentError(f"invalid join token: {exc}") from exc
        key = pki.generate_key()
        csr_der = pki.make_csr(key, "site").public_bytes(serialization.Encoding.DER)
        host = coordinator.rsplit(":", 1)[0]
        request = enrollment_pb2.EnrollRequest(token_id=token.token_id, csr_der=csr_der,
                                               proof=tokens.make_proof(token.secret, csr_der))
        with bootstrap_channel(f"{host}:{token.enroll_port}") as channel:
            try:
                reply = enrollment_pb2_grpc.EnrollmentStub(channel).Enroll(request, timeout=timeout)
            except grpc.RpcError as exc:
                raise EnrollmentError(f"enrollment at {host}:{token.enroll_port} refused: "
                                      f"{exc.code().name}: {exc.details()}") from exc
        ca = pki.load_cert_pem(reply.ca_cert_pem)
        if pki.fingerprint(ca) != token.ca_fingerprint:
            raise EnrollmentError("the coordinator's CA does not match the fingerprint in the join token "
                                  "(wrong coordinator, or someone in the middle)")
        cert = pki.load_cert_pem(reply.client_cert_pem)
        try:
            pki.verify_issued_by(cert, ca)
        except pki.PkiError as exc:
            raise EnrollmentError(f"issued certificate does not chain to the pinned CA: {exc}") from exc
        if not pki.cert_matches_key(cert, key):
            raise EnrollmentError("issued certificate is not for this site's key")
        pki.write_private(self.root / "key.pem", pki.key_to_pem(key))
        pki.write_public(self.root / "cert.pem", reply.client_cert_pem)
        pki.write_public(self.root / "ca.pem", reply.ca_cert_pem)
        pki.write_public(self.root / "identity.json", json.dumps(
            {"name": reply.client_name, "federation_id": reply.federation_id}).encode())
        return self.load()
