"""Join tokens and enrollment: a one-time token plus a CSR become a client certificate for one named site."""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass

from cryptography import x509

from fedvlm.security import pki, tokens

from .errors import Refused
from .store import Store

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
RESERVED_NAMES = {"admin", "coordinator"}
CLIENT_CERT_TTL = 365 * 24 * 3600


def check_site_name(name: str) -> None:
    """Site names become certificate CNs and table keys: lowercase letters, digits, . _ -; not reserved."""
    if not NAME_RE.match(name):
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

    def __init__(self, store: Store, ca_key, ca_cert: x509.Certificate, federation_id: str) -> None:
        self.store = store
        self.ca_key = ca_key
        self.ca_cert = ca_cert
        self.federation_id = federation_id

    def issue_token(self, name: str, ttl_seconds: int, enroll_port: int) -> tokens.JoinToken:
        """A new one-time token for site `name`; only its proof key is stored."""
        check_site_name(name)
        token = tokens.new_token(ttl_seconds, pki.fingerprint(self.ca_cert), enroll_port)
        with self.store.tx() as db:
            db.execute("INSERT INTO tokens(token_id, name, proof_key, expires_at, created_at) VALUES (?,?,?,?,?)",
                       (token.token_id, name, tokens.proof_key(token.secret), token.expires_at, time.time()))
            self.store.append_audit(db, {"kind": "token", "name": name, "token_id": token.token_id,
                                         "expires_at": token.expires_at})
        return token

    def enroll(self, token_id: str, csr_der: bytes, proof: bytes) -> Enrolled:
        """Redeem a token: checks expiry, single use and the HMAC proof, then signs the CSR for the token's site.

        A refused enrollment changes nothing; an accepted one marks the token used and records the certificate
        fingerprint as the only one this site may connect with.
        """
        row = self.store.one("SELECT * FROM tokens WHERE token_id=?", (token_id,))
        if row is None:
            raise Refused("PERMISSION_DENIED", "unknown join token")
        if not tokens.check_proof(row["proof_key"], csr_der, proof):
            raise Refused("PERMISSION_DENIED", "join token proof does not match")
        if row["used_at"] is not None:
            raise Refused("PERMISSION_DENIED", "join token already used")
        if row["expires_at"] < time.time():
            raise Refused("PERMISSION_DENIED", "join token expired")
        name = row["name"]
        existing = self.store.client(name)
        if existing is not None and existing["revoked"]:
            raise Refused("PERMISSION_DENIED", f"site {name!r} is revoked")
        try:
            cert = pki.sign_csr(self.ca_key, self.ca_cert, csr_der, name, CLIENT_CERT_TTL)
        except pki.PkiError as exc:
            raise Refused("INVALID_ARGUMENT", f"bad CSR: {exc}") from exc
        now = time.time()
        with self.store.tx() as db:
            claimed = db.execute("UPDATE tokens SET used_at=? WHERE token_id=? AND used_at IS NULL",
                                 (now, token_id)).rowcount
            if claimed != 1:
                raise Refused("PERMISSION_DENIED", "join token already used")
            db.execute(
                "INSERT INTO clients(name, cert_fingerprint, enrolled_at) VALUES (?,?,?) "
                "ON CONFLICT(name) DO UPDATE SET cert_fingerprint=excluded.cert_fingerprint, "
                "enrolled_at=excluded.enrolled_at",
                (name, pki.fingerprint(cert), now))
            self.store.append_audit(db, {"kind": "enroll", "name": name, "cert": pki.fingerprint(cert)})
        log.info("enrolled site %s", name)
        return Enrolled(name, pki.cert_to_pem(cert), pki.cert_to_pem(self.ca_cert), self.federation_id)
