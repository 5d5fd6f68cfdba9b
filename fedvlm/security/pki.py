"""The federation's PKI: one CA, the coordinator's server certificate, client and admin certificates.

ECDSA P-256 keys and SHA-256 signatures everywhere. Every certificate issued here carries its holder's name as
the subject CN and its role as the OU ("server", "client" or "admin"); after a mutual-TLS handshake the
coordinator takes the caller's identity from the verified certificate (see :func:`peer_name`,
:func:`peer_cert`), never from a field in the request.

Enrollment (:func:`sign_csr`) takes only the public key from a CSR: the subject the CSR asks for is ignored
and replaced by the name the caller vouches for (the one bound to the join token).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedvlm.atomic import write_bytes_atomic

__all__ = [
    "CLIENT_ROLE",
    "ADMIN_ROLE",
    "SERVER_ROLE",
    "SERVER_NAME",
    "PkiError",
    "generate_key",
    "create_ca",
    "issue_server_cert",
    "issue_cert_for_key",
    "make_csr",
    "sign_csr",
    "fingerprint",
    "cert_name",
    "cert_role",
    "check_name",
    "verify_issued_by",
    "cert_matches_key",
    "cert_to_pem",
    "key_to_pem",
    "load_cert_pem",
    "load_key_pem",
    "write_private",
    "write_public",
    "peer_name",
    "peer_cert",
]

CLIENT_ROLE = "client"
ADMIN_ROLE = "admin"
SERVER_ROLE = "server"
SERVER_NAME = "coordinator"
_ISSUABLE_ROLES = (CLIENT_ROLE, ADMIN_ROLE)

# Certificates start a few minutes in the past so that a peer whose clock is slightly behind accepts them.
_BACKDATE = dt.timedelta(minutes=5)
_MAX_TTL_SECONDS = 3650 * 86400
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HASH = hashes.SHA256()


class PkiError(ValueError):
    """A certificate, key or CSR is malformed, not issued by the expected CA, out of its validity window,
    or a request to issue one is invalid."""


# ----------------------------------------------------------------------------------------------- keys, names


def generate_key() -> ec.EllipticCurvePrivateKey:
    """Return a fresh ECDSA P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid site/admin name, else raise :class:`PkiError`.

    A valid name is 1-64 characters of ``[A-Za-z0-9._-]`` starting with a letter or digit, so it is safe as a
    certificate CN, a log field and a file-name component.
    """
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise PkiError(
            f"invalid name {name!r}: use 1-64 characters of letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def _require_p256_private(key: object) -> ec.EllipticCurvePrivateKey:
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise PkiError("expected an ECDSA P-256 private key")
    return key


def _require_p256_public(key: object) -> ec.EllipticCurvePublicKey:
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise PkiError("expected an ECDSA P-256 public key")
    return key


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _as_utc(when: dt.datetime | float | int | None) -> dt.datetime:
    if when is None:
        return _now()
    if isinstance(when, dt.datetime):
        return when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)
    return dt.datetime.fromtimestamp(float(when), dt.UTC)


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, lifetime: dt.timedelta
) -> x509.CertificateBuilder:
    now = _now()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + lifetime)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _leaf_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def _aki(ca_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key())  # type: ignore[arg-type]


def _check_ca_pair(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate) -> None:
    _require_p256_private(ca_key)
    if ca_key.public_key() != ca_cert.public_key():
        raise PkiError("the CA key does not belong to the CA certificate")


# ----------------------------------------------------------------------------------------------- issuing


def create_ca(federation_name: str, days: int = 3650) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Create a self-signed federation CA: ``(key, cert)``.

    The certificate is a CA (basicConstraints CA:TRUE, pathlen 0 so it can only sign leaf certificates),
    with key usage keyCertSign + cRLSign, a subject key identifier, CN ``"<federation_name> CA"`` and
    O ``federation_name``, valid for ``days`` days.
    """
    if not isinstance(federation_name, str) or not federation_name.strip():
        raise PkiError("federation name must be a non-empty string")
    if not isinstance(days, int) or isinstance(days, bool) or not 1 <= days <= 36500:
        raise PkiError(f"CA lifetime must be 1..36500 days, got {days!r}")
    key = generate_key()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, f"{federation_name} CA"[:64]),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, federation_name[:64]),
        ]
    )
    cert = (
        _builder(name, name, key.public_key(), dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, _HASH)
    )
    return key, cert


def _san_entries(hosts: Sequence[str]) -> list[x509.GeneralName]:
    entries: list[x509.GeneralName] = []
    seen: set[str] = set()
    for raw in [*hosts, "localhost", "127.0.0.1"]:
        host = raw.strip() if isinstance(raw, str) else ""
        if not host:
            raise PkiError(f"invalid host {raw!r} for the server certificate")
        try:
            ip = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            key = "dns:" + host.lower()
            if key not in seen:
                try:
                    entries.append(x509.DNSName(host.lower()))
                except ValueError as exc:
                    raise PkiError(f"invalid host name {host!r}: {exc}") from exc
        else:
            key = "ip:" + str(ip)
            if key not in seen:
                entries.append(x509.IPAddress(ip))
        seen.add(key)
    return entries


def issue_server_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, hosts: list[str], days: int = 825
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Issue the coordinator's TLS certificate with a fresh key: ``(key, cert)``.

    CN ``"coordinator"``, OU ``"server"``; one SAN per host (IPAddress if it parses as an IP, else DNSName,
    de-duplicated), always including ``localhost`` and ``127.0.0.1``; EKU serverAuth + clientAuth (so the
    coordinator can also be a client of another of its own services); key usage digitalSignature.
    """
    _check_ca_pair(ca_key, ca_cert)
    if not isinstance(days, int) or isinstance(days, bool) or not 1 <= days <= 3650:
        raise PkiError(f"server certificate lifetime must be 1..3650 days, got {days!r}")
    key = generate_key()
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, SERVER_NAME),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, SERVER_ROLE),
        ]
    )
    cert = (
        _builder(subject, ca_cert.subject, key.public_key(), dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_leaf_key_usage(), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(_san_entries(list(hosts))), critical=False)
        .add_extension(_aki(ca_cert), critical=False)
        .sign(ca_key, _HASH)
    )
    return key, cert


def issue_cert_for_key(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    public_key: ec.EllipticCurvePublicKey,
    name: str,
    role: str,
    ttl_seconds: int,
) -> x509.Certificate:
    """Issue a client-auth certificate for ``public_key``: CN ``name``, OU ``role``.

    ``role`` must be ``"client"`` or ``"admin"``; ``name`` must pass :func:`check_name` and must not be the
    reserved server name ``"coordinator"``; ``ttl_seconds`` must be 1 s .. 10 years. The certificate has EKU
    clientAuth only, is not a CA, and carries SKI and AKI (pointing at the CA's SKI).
    Raises :class:`PkiError`.
    """
    _check_ca_pair(ca_key, ca_cert)
    _require_p256_public(public_key)
    check_name(name)
    if name == SERVER_NAME:
        raise PkiError(f"the name {SERVER_NAME!r} is reserved for the coordinator")
    if role not in _ISSUABLE_ROLES:
        raise PkiError(f"role must be one of {_ISSUABLE_ROLES}, got {role!r}")
    if (
        not isinstance(ttl_seconds, int)
        or isinstance(ttl_seconds, bool)
        or not 1 <= ttl_seconds <= _MAX_TTL_SECONDS
    ):
        raise PkiError(f"certificate lifetime must be 1..{_MAX_TTL_SECONDS} seconds, got {ttl_seconds!r}")
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, name),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
        ]
    )
    return (
        _builder(subject, ca_cert.subject, public_key, dt.timedelta(seconds=ttl_seconds))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_leaf_key_usage(), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(_aki(ca_cert), critical=False)
        .sign(ca_key, _HASH)
    )


def make_csr(key: ec.EllipticCurvePrivateKey, name: str) -> x509.CertificateSigningRequest:
    """Build a CSR for ``key`` asking for CN ``name``, signed with ``key`` (proof of possession).

    The CA ignores the requested name (see :func:`sign_csr`); it is there for humans reading the CSR.
    """
    _require_p256_private(key)
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, check_name(name))]))
        .sign(key, _HASH)
    )


def sign_csr(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    csr_der: bytes,
    name: str,
    ttl_seconds: int,
) -> x509.Certificate:
    """Issue a ``"client"`` certificate for the key in a DER CSR, named ``name``.

    Guarantees: the CSR parses, its self-signature verifies (so the requester holds the private key) and its
    key is ECDSA P-256, else :class:`PkiError`. Everything else in the CSR (subject, requested extensions) is
    ignored: the CN is ``name``, supplied by the caller from the join token, and the role is ``"client"``.
    """
    if not isinstance(csr_der, bytes | bytearray | memoryview) or len(csr_der) > 16384:
        raise PkiError("CSR must be DER bytes of at most 16 KiB")
    try:
        csr = x509.load_der_x509_csr(bytes(csr_der))
        valid = csr.is_signature_valid
        public_key = csr.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise PkiError(f"malformed CSR: {exc}") from exc
    if not valid:
        raise PkiError("CSR signature does not verify")
    return issue_cert_for_key(
        ca_key, ca_cert, _require_p256_public(public_key), name, CLIENT_ROLE, ttl_seconds
    )


# ----------------------------------------------------------------------------------------------- inspecting


def fingerprint(cert: x509.Certificate) -> str:
    """Lowercase hex SHA-256 of the certificate's DER encoding (64 characters)."""
    return cert.fingerprint(hashes.SHA256()).hex()


def _single_attribute(cert: x509.Certificate, oid: x509.ObjectIdentifier, label: str) -> str:
    values = cert.subject.get_attributes_for_oid(oid)
    if len(values) != 1 or not isinstance(values[0].value, str):
        raise PkiError(f"certificate subject must have exactly one {label}, has {len(values)}")
    return values[0].value


def cert_name(cert: x509.Certificate) -> str:
    """The subject CN (the holder's name). :class:`PkiError` unless there is exactly one."""
    return _single_attribute(cert, NameOID.COMMON_NAME, "CN")


def cert_hosts(cert: x509.Certificate) -> list[str]:
    """The DNS names, then the IP addresses, a (server) certificate is valid for (its subject alternative names)."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound as exc:
        raise ValueError("the certificate names no host (no subject alternative name)") from exc
    return [*sans.get_values_for_type(x509.DNSName), *(str(ip) for ip in sans.get_values_for_type(x509.IPAddress))]


def cert_role(cert: x509.Certificate) -> str:
    """The subject OU (``"client"``, ``"admin"`` or ``"server"`` for certs issued here).

    :class:`PkiError` unless there is exactly one OU.
    """
    return _single_attribute(cert, NameOID.ORGANIZATIONAL_UNIT_NAME, "OU")


def verify_issued_by(
    cert: x509.Certificate, ca_cert: x509.Certificate, now: dt.datetime | float | None = None
) -> None:
    """Check that ``cert`` was signed by ``ca_cert``'s key and that both are valid at ``now``.

    ``now`` is a datetime (naive means UTC) or a unix timestamp; default the current time. Checks: issuer
    name equals the CA subject, ECDSA-SHA256 signature by the CA's key, ``cert`` and ``ca_cert`` inside their
    validity windows. Raises :class:`PkiError` with the reason otherwise; returns None on success.
    """
    when = _as_utc(now)
    if cert.signature_hash_algorithm is None or cert.signature_hash_algorithm.name != "sha256":
        raise PkiError("certificate is not signed with SHA-256")
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm) as exc:
        raise PkiError(f"certificate is not issued by this CA ({type(exc).__name__}: {exc})") from exc
    for which, c in (("certificate", cert), ("CA certificate", ca_cert)):
        if when < c.not_valid_before_utc:
            raise PkiError(f"{which} is not yet valid (valid from {c.not_valid_before_utc.isoformat()})")
        if when > c.not_valid_after_utc:
            raise PkiError(f"{which} has expired (valid until {c.not_valid_after_utc.isoformat()})")


def cert_matches_key(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> bool:
    """True iff ``cert`` certifies the public half of ``key`` (check what an enrollment returned)."""
    return cert.public_key() == key.public_key()


# ----------------------------------------------------------------------------------------------- encoding


def cert_to_pem(cert: x509.Certificate) -> bytes:
    """PEM encoding of a certificate."""
    return cert.public_bytes(serialization.Encoding.PEM)


def key_to_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Unencrypted PKCS#8 PEM of a private key (store it with :func:`write_private`)."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_cert_pem(data: bytes) -> x509.Certificate:
    """Parse one PEM certificate; :class:`PkiError` if malformed."""
    try:
        return x509.load_pem_x509_certificate(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise PkiError(f"malformed PEM certificate: {exc}") from exc


def load_key_pem(data: bytes) -> ec.EllipticCurvePrivateKey:
    """Parse an unencrypted PEM private key; :class:`PkiError` if malformed or not ECDSA P-256."""
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise PkiError(f"malformed PEM private key: {exc}") from exc
    return _require_p256_private(key)


# ----------------------------------------------------------------------------------------------- files


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically with mode 0600.

    The bytes land in a 0600 temp file in the same directory (never readable by others, not even briefly),
    are fsynced, then renamed over ``path``; the directory is fsynced too. Readers see the old or the new
    content, never a mix.
    """
    write_bytes_atomic(path, data, 0o600)


def write_public(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename) with mode 0644."""
    write_bytes_atomic(path, data, 0o644)


# ----------------------------------------------------------------------------------------------- gRPC peers
# These read ``grpc.ServicerContext.auth_context()`` (a dict of property name -> list of bytes) and need no
# gRPC import. gRPC only fills the x509 properties after it has verified the client certificate against the
# server's root certificates, so on a server with require_client_auth=True they are the verified identity.


def _auth_values(context: object, prop: str) -> list[bytes]:
    auth: Mapping[str, Sequence[bytes]] = context.auth_context()  # type: ignore[attr-defined]
    return list(auth.get(prop, ()))


def peer_name(context: object) -> str | None:
    """The verified CN of the calling client's certificate, or None.

    None if the call carries no client certificate, or the certificate has no CN or more than one. Note that
    the CN alone does not say the role: check :func:`peer_cert` + :func:`cert_role` (or the fingerprint
    against a revocation list) where it matters.
    """
    values = _auth_values(context, "x509_common_name")
    if len(values) != 1:
        return None
    try:
        return bytes(values[0]).decode("utf-8")
    except UnicodeDecodeError:
        return None


def peer_cert(context: object) -> x509.Certificate | None:
    """The calling client's verified certificate (from the ``x509_pem_cert`` auth property), or None."""
    values = _auth_values(context, "x509_pem_cert")
    if len(values) != 1:
        return None
    try:
        return x509.load_pem_x509_certificate(bytes(values[0]))
    except ValueError:
        return None
