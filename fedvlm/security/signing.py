"""Signatures over update manifests and global-version records.

A site signs an :class:`UpdateManifest` describing the adapter bytes it uploads; the coordinator signs a
:class:`GlobalRecord` for every global version it publishes. Signatures are ECDSA-SHA256 (DER) over the
record's :meth:`canonical` bytes: a domain tag (so a signature over one kind of record can never be passed off
as another) followed by sorted-key, whitespace-free, ASCII-only JSON. Both records validate their fields on
construction, so a record that exists is well-formed and its canonical bytes are unambiguous.

:func:`verify` checks the signature only; whether the certificate itself is trustworthy (issued by the
federation CA, in date, not revoked, the expected name) is the caller's check
(:func:`fedvlm.security.pki.verify_issued_by`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import secrets
from dataclasses import dataclass
from typing import Any, ClassVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

__all__ = [
    "SignatureError",
    "sign",
    "verify",
    "UpdateManifest",
    "GlobalRecord",
    "new_nonce",
]

_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX32 = re.compile(r"[0-9a-f]{32}")
_MAX_JSON_CHARS = 1 << 20
_MAX_SIGNATURE_BYTES = 256
MAX_INT = 2**63 - 1  # integers must fit SQLite's INTEGER and protobuf's int64


class SignatureError(ValueError):
    """A signature does not verify against the given certificate (or cannot be checked with it)."""


def sign(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    """ECDSA-SHA256 signature of ``data`` with ``key``, DER-encoded."""
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TypeError("signing key must be an ECDSA private key")
    return key.sign(bytes(data), ec.ECDSA(hashes.SHA256()))


def verify(cert: x509.Certificate, data: bytes, signature: bytes) -> None:
    """Return None iff ``signature`` is a valid ECDSA-SHA256 signature of ``data`` by ``cert``'s key.

    Raises :class:`SignatureError` otherwise (wrong key, altered data, malformed signature, non-EC cert).
    """
    public_key = cert.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise SignatureError("certificate does not hold an ECDSA key")
    if not isinstance(signature, bytes | bytearray) or not 0 < len(signature) <= _MAX_SIGNATURE_BYTES:
        raise SignatureError("signature must be non-empty DER bytes")
    try:
        public_key.verify(bytes(signature), bytes(data), ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError) as exc:
        raise SignatureError("signature does not verify") from exc


def new_nonce() -> str:
    """32 lowercase hex characters (128 random bits) from :mod:`secrets`."""
    return secrets.token_hex(16)


# ----------------------------------------------------------------------------------------------- records


def _canonical_json(obj: dict[str, Any]) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def _check_str(
    cls: str, name: str, value: object, pattern: re.Pattern[str] | None = None, what: str = ""
) -> None:
    if not isinstance(value, str):
        raise ValueError(f"{cls}.{name} must be a string, got {type(value).__name__}")
    if pattern is not None and not pattern.fullmatch(value):
        raise ValueError(f"{cls}.{name} must be {what}, got {value!r}")
    if pattern is None and not value:
        raise ValueError(f"{cls}.{name} must not be empty")


def _check_int(cls: str, name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{cls}.{name} must be an integer, got {type(value).__name__}")
    if not 0 <= value <= MAX_INT:
        raise ValueError(f"{cls}.{name} must be between 0 and {MAX_INT}, got {value}")


def _normalise_float(record: object, cls: str, name: str) -> None:
    value = getattr(record, name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{cls}.{name} must be a number, got {type(value).__name__}")
    if isinstance(value, int) and abs(value) > MAX_INT or not math.isfinite(value):
        raise ValueError(f"{cls}.{name} must be finite unix seconds")
    # Always a float, so the canonical bytes are the same whether the signer passed 5 or 5.0.
    object.__setattr__(record, name, float(value))


class _Record:
    """Shared JSON plumbing: exact field set, type checks in ``__post_init__`` of each record."""

    DOMAIN: ClassVar[bytes]

    def _as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)  # type: ignore[call-overload]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    def canonical(self) -> bytes:
        """Domain tag + sorted-key, whitespace-free ASCII JSON of every field: the bytes that get signed."""
        return self.DOMAIN + _canonical_json(self._as_dict()).encode("ascii")

    def to_json(self) -> str:
        """Compact sorted-key JSON of every field (no domain tag); :meth:`from_json` reverses it exactly."""
        return _canonical_json(self._as_dict())

    @classmethod
    def _fields_from_json(cls, text: str | bytes) -> dict[str, Any]:
        name = cls.__name__
        if isinstance(text, bytes | bytearray):
            try:
                text = bytes(text).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{name} JSON is not UTF-8") from exc
        if not isinstance(text, str):
            raise ValueError(f"{name} JSON must be str or bytes")
        if len(text) > _MAX_JSON_CHARS:
            raise ValueError(f"{name} JSON is too large")
        try:
            obj = json.loads(text, parse_constant=_reject_constant)
        except ValueError as exc:
            raise ValueError(f"{name} is not valid JSON: {exc}") from exc
        except RecursionError:
            raise ValueError(f"{name} JSON is nested too deeply") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{name} JSON must be an object")
        expected = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        missing = [k for k in expected if k not in obj]
        unexpected = sorted(k for k in obj if k not in expected)
        if missing:
            raise ValueError(f"{name} is missing field(s): {', '.join(missing)}")
        if unexpected:
            raise ValueError(f"{name} has unexpected field(s): {', '.join(unexpected)}")
        return obj


# base_digest of the round-0 update (the initial adapter), which starts from no global.
INITIAL_BASE = "0" * 64


def _reject_constant(token: str) -> None:
    raise ValueError(f"{token} is not allowed")


@dataclass(frozen=True)
class UpdateManifest(_Record):
    """What a site signs for one uploaded update.

    Field rules (ValueError naming the field otherwise): strings non-empty; ``base_digest`` and ``sha256``
    64 lowercase hex (SHA-256 of the global the site started from / of the safetensors bytes); ``nonce``
    32 lowercase hex (:func:`new_nonce`); ``round``, ``size``, ``num_examples`` non-negative ints;
    ``created_at`` finite unix seconds, stored as float.
    """

    DOMAIN: ClassVar[bytes] = b"fedvlm-update-v1\n"

    federation_id: str
    run_id: str
    round: int
    client: str
    base_digest: str
    sha256: str
    size: int
    num_examples: int
    nonce: str
    created_at: float

    def __post_init__(self) -> None:
        c = "UpdateManifest"
        _check_str(c, "federation_id", self.federation_id)
        _check_str(c, "run_id", self.run_id)
        _check_int(c, "round", self.round)
        _check_str(c, "client", self.client)
        _check_str(c, "base_digest", self.base_digest, _HEX64, "64 lowercase hex characters")
        _check_str(c, "sha256", self.sha256, _HEX64, "64 lowercase hex characters")
        _check_int(c, "size", self.size)
        _check_int(c, "num_examples", self.num_examples)
        _check_str(c, "nonce", self.nonce, _HEX32, "32 lowercase hex characters")
        _normalise_float(self, c, "created_at")

    @classmethod
    def from_json(cls, text: str | bytes) -> UpdateManifest:
        """Parse :meth:`to_json` output; ValueError naming the missing, unexpected or ill-typed field."""
        return cls(**cls._fields_from_json(text))


@dataclass(frozen=True)
class GlobalRecord(_Record):
    """What the coordinator signs for every global version (and appends to the audit chain).

    ``digest``: SHA-256 hex of the global adapter bytes; ``parent_digest``: the previous global's digest, or
    ``""`` for the first one; ``contributors``: the SHA-256 digests of the accepted updates aggregated into
    it, stored sorted (any iterable is accepted and sorted; duplicates are an error).
    """

    DOMAIN: ClassVar[bytes] = b"fedvlm-global-v1\n"

    federation_id: str
    run_id: str
    round: int
    digest: str
    size: int
    parent_digest: str
    contributors: tuple[str, ...]
    created_at: float

    def __post_init__(self) -> None:
        c = "GlobalRecord"
        _check_str(c, "federation_id", self.federation_id)
        _check_str(c, "run_id", self.run_id)
        _check_int(c, "round", self.round)
        _check_str(c, "digest", self.digest, _HEX64, "64 lowercase hex characters")
        _check_int(c, "size", self.size)
        if self.parent_digest != "":
            _check_str(c, "parent_digest", self.parent_digest, _HEX64, '64 lowercase hex characters or ""')
        if isinstance(self.contributors, str | bytes) or not isinstance(self.contributors, list | tuple):
            raise ValueError(f"{c}.contributors must be a list of digests")
        for item in self.contributors:
            _check_str(c, "contributors", item, _HEX64, "a list of 64-lowercase-hex digests")
        contributors = tuple(sorted(self.contributors))
        if len(set(contributors)) != len(contributors):
            raise ValueError(f"{c}.contributors has duplicate digests")
        object.__setattr__(self, "contributors", contributors)
        _normalise_float(self, c, "created_at")

    @classmethod
    def from_json(cls, text: str | bytes) -> GlobalRecord:
        """Parse :meth:`to_json` output; ValueError naming the missing, unexpected or ill-typed field."""
        return cls(**cls._fields_from_json(text))
