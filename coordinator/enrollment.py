"""Join tokens and enrollment: a one-time token plus a CSR become a client certificate for one named site."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from cryptography import x509

from fedvlm.security import pki, tokens

from .errors import Refused
from .state import State

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")  # whole names only (fullmatch): "$" takes a "\n"
RESERVED_NAMES = {"admin", "coordinator"}
CLIENT_CERT_TTL = 365 * 24 * 3600


def check_site_name(name: str) -> None:
    """Site names become certificate CNs and table keys: lowercase letters, digits, . _ -; not reserved."""
    if not NAME_RE.fullmatch(name):
        raise ValueError(f"invalid site name {name!r}: use 1-63 of a-z 0-9 . _ - starting with a letter or digit")
    if name in RESERVED_NAMES:
        raise ValueError(f"site name {name!r} is reserved")


@dataclass(frozen=True)
class Enrolled:
    client_name: str
    client_cert_pem: bytes
    ca_cert_pem: bytes
    federation_id: str


class Enroller:
    """Issues tokens (operator side) and redeems them (enrollment RPC)."""

    def __init__(self, state: State, ca_key, ca_cert: x509.Certificate, federation_id: str) -> None:
        self.state = state
        self.ca_key = ca_key
        self.ca_cert = ca_cert
        self.federation_id = federation_id

    def issue_token(self, name: str, ttl_seconds: int, enroll_port: int) -> tokens.JoinToken:
        """A new one-time token for site `name`; only its proof key is stored."""
        check_site_name(name)
        token = tokens.new_token(ttl_seconds, pki.fingerprint(self.ca_cert), enroll_port)
        self.state.issue_token(token.token_id, name, tokens.proof_key(token.secret), token.expires_at)
        return token

    def enroll(self, token_id: str, csr_der: bytes, proof: bytes) -> Enrolled:
        """Redeem a token: checks expiry, single use and the HMAC proof, then signs the CSR for the token's site.

        A refused enrollment changes nothing; an accepted one marks the token used and records the certificate
        fingerprint as the only one this site may connect with.
        """
        token = self.state.token(token_id)
        if token is None:
            raise Refused("PERMISSION_DENIED", "unknown join token")
        if not tokens.check_proof(token.proof_key, csr_der, proof):
            raise Refused("PERMISSION_DENIED", "join token proof does not match")
        if token.used_at is not None:
            raise Refused("PERMISSION_DENIED", "join token already used")
        if token.expires_at < self.state.now():
            raise Refused("PERMISSION_DENIED", "join token expired")
        name = token.name
        existing = self.state.client(name)
        if existing is not None and existing.revoked:
            raise Refused("PERMISSION_DENIED", f"site {name!r} is revoked")
        try:
            cert = pki.sign_csr(self.ca_key, self.ca_cert, csr_der, name, CLIENT_CERT_TTL)
        except pki.PkiError as exc:
            raise Refused("INVALID_ARGUMENT", f"bad CSR: {exc}") from exc
        if not self.state.enroll_client(token_id, name, pki.fingerprint(cert)):
            raise Refused("PERMISSION_DENIED", "join token already used")
        log.info("enrolled site %s", name)
        return Enrolled(name, pki.cert_to_pem(cert), pki.cert_to_pem(self.ca_cert), self.federation_id)
