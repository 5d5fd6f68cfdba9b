"""One-time join tokens for enrollment (kubeadm-style bootstrap).

The enrollment port is not TLS. Instead:

* the token carries a 32-byte secret; the client proves it holds the secret by sending
  ``make_proof(secret, csr_der)``, an HMAC that also binds the proof to that exact CSR, so an on-path
  attacker can neither reuse the proof for another key nor alter the CSR;
* the token carries the SHA-256 fingerprint of the federation CA, so the client pins the CA certificate the
  coordinator sends back and can then verify the certificate it was issued.

The coordinator stores only ``proof_key(secret)`` (never the secret) plus the token id, the site name and the
expiry, and must mark a token used atomically with issuing the certificate (one-time). Note that the stored
proof key is enough to forge proofs for that token, so the token table deserves the same care as the CA key
until the tokens are used or expired.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets
import time
from dataclasses import dataclass, field

__all__ = [
    "TOKEN_PREFIX",
    "TokenError",
    "JoinToken",
    "new_token",
    "proof_key",
    "make_proof",
    "check_proof",
    "parse_duration",
]

TOKEN_PREFIX = "fvt1."
_PROOF_DOMAIN = b"fedvlm-enroll-v1"
_SECRET_BYTES = 32
_MAX_TOKEN_CHARS = 1024
_MAX_DURATION_SECONDS = 3650 * 86400
_HEX16 = re.compile(r"[0-9a-f]{16}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_B64URL = re.compile(r"[A-Za-z0-9_-]+")
_FIELDS = {"id", "s", "exp", "ca", "port"}


class TokenError(ValueError):
    """A join token or duration is malformed or out of range; the message says what is wrong."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64d(text: str, what: str) -> bytes:
    if not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise TokenError(f"join token {what} is not base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise TokenError(f"join token {what} is not base64url") from exc


@dataclass(frozen=True)
class JoinToken:
    """A one-time join token. ``secret`` is kept out of ``repr`` so a token never lands in a log by accident.

    Construction validates every field (:class:`TokenError`): ``token_id`` 16 lowercase hex, ``secret``
    32 bytes, ``expires_at`` positive unix seconds, ``ca_fingerprint`` 64 lowercase hex, ``enroll_port``
    1..65535.
    """

    token_id: str
    secret: bytes = field(repr=False)
    expires_at: int
    ca_fingerprint: str
    enroll_port: int

    def __post_init__(self) -> None:
        if not isinstance(self.token_id, str) or not _HEX16.fullmatch(self.token_id):
            raise TokenError("join token id must be 16 lowercase hex characters")
        if not isinstance(self.secret, bytes) or len(self.secret) != _SECRET_BYTES:
            raise TokenError(f"join token secret must be {_SECRET_BYTES} bytes")
        if not _is_int(self.expires_at) or self.expires_at <= 0:
            raise TokenError("join token expiry must be a positive unix time in seconds")
        if not isinstance(self.ca_fingerprint, str) or not _HEX64.fullmatch(self.ca_fingerprint):
            raise TokenError("join token CA fingerprint must be 64 lowercase hex characters (SHA-256)")
        if not _is_int(self.enroll_port) or not 1 <= self.enroll_port <= 65535:
            raise TokenError("join token enrollment port must be 1..65535")

    def is_expired(self, now: float | None = None) -> bool:
        """True iff ``now`` (default: the current time) is at or past ``expires_at``."""
        return (time.time() if now is None else now) >= self.expires_at

    def encode(self) -> str:
        """``"fvt1."`` + unpadded base64url of compact JSON: one copy-pastable word, no spaces or padding."""
        body = {
            "id": self.token_id,
            "s": _b64e(self.secret),
            "exp": self.expires_at,
            "ca": self.ca_fingerprint,
            "port": self.enroll_port,
        }
        raw = json.dumps(body, sort_keys=True, separators=(",", ":")).encode("ascii")
        return TOKEN_PREFIX + _b64e(raw)

    @classmethod
    def decode(cls, text: str) -> JoinToken:
        """Parse a token made by :meth:`encode` (surrounding whitespace is ignored).

        Raises :class:`TokenError` naming what is wrong for anything else: wrong prefix, bad base64, bad JSON,
        missing or unexpected fields, wrong types or values. Does not check expiry (see :meth:`is_expired`).
        """
        if not isinstance(text, str):
            raise TokenError("join token must be a string")
        text = text.strip()
        if len(text) > _MAX_TOKEN_CHARS:
            raise TokenError("join token is too long")
        if not text.startswith(TOKEN_PREFIX):
            raise TokenError(f"not a fedvlm join token (expected it to start with {TOKEN_PREFIX!r})")
        raw = _b64d(text[len(TOKEN_PREFIX) :], "body")
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise TokenError("join token is truncated or corrupted (its body is not JSON)") from exc
        if not isinstance(body, dict):
            raise TokenError("join token body must be a JSON object")
        missing = sorted(_FIELDS - body.keys())
        unexpected = sorted(body.keys() - _FIELDS)
        if missing:
            raise TokenError(f"join token is missing field(s): {', '.join(missing)}")
        if unexpected:
            raise TokenError(f"join token has unexpected field(s): {', '.join(unexpected)}")
        if not isinstance(body["s"], str):
            raise TokenError("join token secret must be a base64url string")
        return cls(
            token_id=body["id"],
            secret=_b64d(body["s"], "secret"),
            expires_at=body["exp"],
            ca_fingerprint=body["ca"],
            enroll_port=body["port"],
        )


def new_token(ttl_seconds: int, ca_fingerprint: str, enroll_port: int) -> JoinToken:
    """A fresh token: random 16-hex id, 32 random secret bytes, expiring ``ttl_seconds`` from now."""
    if not _is_int(ttl_seconds) or not 1 <= ttl_seconds <= _MAX_DURATION_SECONDS:
        raise TokenError(f"token lifetime must be 1..{_MAX_DURATION_SECONDS} seconds, got {ttl_seconds!r}")
    return JoinToken(
        token_id=secrets.token_hex(8),
        secret=secrets.token_bytes(_SECRET_BYTES),
        expires_at=int(time.time()) + ttl_seconds,
        ca_fingerprint=ca_fingerprint,
        enroll_port=enroll_port,
    )


def proof_key(secret: bytes) -> bytes:
    """SHA-256 of the token secret: the HMAC key, and what the coordinator stores instead of the secret."""
    return hashlib.sha256(secret).digest()


def _proof_with_key(key: bytes, csr_der: bytes) -> bytes:
    return hmac.new(key, _PROOF_DOMAIN + bytes(csr_der), hashlib.sha256).digest()


def make_proof(secret: bytes, csr_der: bytes) -> bytes:
    """HMAC-SHA256(proof_key(secret), b"fedvlm-enroll-v1" + csr_der): 32 bytes binding secret and CSR."""
    return _proof_with_key(proof_key(secret), csr_der)


def check_proof(stored_proof_key: bytes, csr_der: bytes, proof: bytes) -> bool:
    """True iff ``proof`` is the proof for ``csr_der`` under ``stored_proof_key``; constant-time comparison.

    Never raises on a malformed proof: anything that is not the right 32 bytes is simply False.
    """
    if not isinstance(proof, bytes | bytearray) or not isinstance(stored_proof_key, bytes | bytearray):
        return False
    return hmac.compare_digest(_proof_with_key(bytes(stored_proof_key), csr_der), bytes(proof))


_DURATION = re.compile(r"(\d{1,12})\s*([smhd]?)", re.IGNORECASE)
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int:
    """Seconds in ``"90s"``, ``"15m"``, ``"24h"``, ``"7d"`` or a bare number of seconds.

    Raises :class:`TokenError` for anything else, for zero, and for more than 3650 days.
    """
    match = _DURATION.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise TokenError(f"invalid duration {text!r}: use e.g. 90s, 15m, 24h, 7d or a number of seconds")
    seconds = int(match.group(1)) * _UNIT_SECONDS[match.group(2).lower()]
    if seconds <= 0:
        raise TokenError(f"duration must be positive, got {text!r}")
    if seconds > _MAX_DURATION_SECONDS:
        raise TokenError(f"duration {text!r} is longer than 3650 days")
    return seconds
