"""PKI, join tokens, enrollment proofs and manifest signatures, with real crypto and real mutual TLS."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import ipaddress
import json
import stat
import time
from concurrent import futures

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID

from fedvlm.security import pki, signing, tokens
from fedvlm.security.pki import PkiError
from fedvlm.security.signing import GlobalRecord, SignatureError, UpdateManifest
from fedvlm.security.tokens import JoinToken, TokenError

DAY = 86400
DER = Encoding.DER


@pytest.fixture(scope="module")
def ca():
    return pki.create_ca("test-fed")


@pytest.fixture(scope="module")
def other_ca():
    return pki.create_ca("other-fed")


@pytest.fixture(scope="module")
def server(ca):
    return pki.issue_server_cert(*ca, ["coord.example.org", "10.1.2.3", "localhost"])


def _client(ca, name="site-a", role="client", ttl=DAY):
    key = pki.generate_key()
    return key, pki.issue_cert_for_key(*ca, key.public_key(), name, role, ttl)


# ----------------------------------------------------------------------------------------------- PKI


def test_ca_is_a_constrained_ca(ca):
    _, cert = ca
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca and bc.path_length == 0
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign
    cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    pki.verify_issued_by(cert, cert)  # self-signed


def test_chain_verifies_and_names_roles(ca, server):
    _, server_cert = server
    pki.verify_issued_by(server_cert, ca[1])
    assert pki.cert_name(server_cert) == "coordinator"
    assert pki.cert_role(server_cert) == "server"
    san = server_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(san.get_values_for_type(x509.DNSName)) == ["coord.example.org", "localhost"]
    assert sorted(map(str, san.get_values_for_type(x509.IPAddress))) == ["10.1.2.3", "127.0.0.1"]
    assert ipaddress.ip_address("10.1.2.3") in san.get_values_for_type(x509.IPAddress)
    eku = server_cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}

    for role in ("client", "admin"):
        key, cert = _client(ca, name=f"{role}-1", role=role)
        pki.verify_issued_by(cert, ca[1])
        assert (pki.cert_name(cert), pki.cert_role(cert)) == (f"{role}-1", role)
        assert pki.cert_matches_key(cert, key)
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
        cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)


def test_cert_from_another_ca_fails(ca, other_ca):
    _, foreign = _client(other_ca)
    with pytest.raises(PkiError, match="not issued by this CA"):
        pki.verify_issued_by(foreign, ca[1])
    # Same subject name as our CA but a different key: the signature check must catch it.
    imposter = pki.create_ca("test-fed")
    _, forged = _client(imposter)
    with pytest.raises(PkiError):
        pki.verify_issued_by(forged, ca[1])


def test_expired_and_not_yet_valid(ca):
    _, cert = _client(ca, ttl=60)
    pki.verify_issued_by(cert, ca[1])
    with pytest.raises(PkiError, match="expired"):
        pki.verify_issued_by(cert, ca[1], now=time.time() + 120)
    with pytest.raises(PkiError, match="not yet valid"):
        pki.verify_issued_by(cert, ca[1], now=dt.datetime.now(dt.UTC) - dt.timedelta(hours=1))


def test_issue_rejects_bad_requests(ca, other_ca):
    key = pki.generate_key()
    with pytest.raises(PkiError, match="role"):
        pki.issue_cert_for_key(*ca, key.public_key(), "site-a", "server", DAY)
    for bad in ("", "a b", "../x", "x" * 65, "-lead"):
        with pytest.raises(PkiError, match="invalid name"):
            pki.issue_cert_for_key(*ca, key.public_key(), bad, "client", DAY)
    with pytest.raises(PkiError, match="reserved"):
        pki.issue_cert_for_key(*ca, key.public_key(), "coordinator", "client", DAY)
    with pytest.raises(PkiError, match="lifetime"):
        pki.issue_cert_for_key(*ca, key.public_key(), "site-a", "client", 0)
    with pytest.raises(PkiError, match="does not belong"):
        pki.issue_cert_for_key(other_ca[0], ca[1], key.public_key(), "site-a", "client", DAY)


def test_sign_csr_ignores_requested_name(ca):
    key = pki.generate_key()
    csr = pki.make_csr(key, "admin")
    cert = pki.sign_csr(*ca, csr.public_bytes(DER), "site-b", DAY)
    assert pki.cert_name(cert) == "site-b"
    assert pki.cert_role(cert) == "client"
    assert pki.cert_matches_key(cert, key)
    pki.verify_issued_by(cert, ca[1])


def test_sign_csr_rejects_tampered_and_garbage(ca):
    key = pki.generate_key()
    der = bytearray(pki.make_csr(key, "site-a").public_bytes(DER))
    # Flip a byte inside the CN value: the CSR still parses but its self-signature no longer matches.
    i = der.index(b"site-a")
    der[i] ^= 0x01
    with pytest.raises(PkiError, match="signature"):
        pki.sign_csr(*ca, bytes(der), "site-a", DAY)
    with pytest.raises(PkiError, match="malformed CSR"):
        pki.sign_csr(*ca, b"\x30\x03garbage", "site-a", DAY)


def test_pem_round_trip_and_files(ca, tmp_path):
    key, cert = ca
    assert pki.load_cert_pem(pki.cert_to_pem(cert)) == cert
    loaded = pki.load_key_pem(pki.key_to_pem(key))
    assert loaded.public_key() == key.public_key()
    assert b"BEGIN PRIVATE KEY" in pki.key_to_pem(key)  # PKCS#8
    with pytest.raises(PkiError):
        pki.load_cert_pem(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(PkiError):
        pki.load_key_pem(b"nope")

    pki.write_private(tmp_path / "ca.key", pki.key_to_pem(key))
    pki.write_public(tmp_path / "ca.pem", pki.cert_to_pem(cert))
    pki.write_private(tmp_path / "ca.key", pki.key_to_pem(key))  # overwrite in place
    assert stat.S_IMODE((tmp_path / "ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "ca.pem").stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca.key", "ca.pem"]  # no temp files left
    assert pki.load_cert_pem((tmp_path / "ca.pem").read_bytes()) == cert


def test_fingerprint(ca, other_ca):
    fp = pki.fingerprint(ca[1])
    assert len(fp) == 64 and fp == fp.lower() and fp != pki.fingerprint(other_ca[1])
    assert fp == pki.fingerprint(pki.load_cert_pem(pki.cert_to_pem(ca[1])))


# ----------------------------------------------------------------------------------------------- tokens


def test_token_round_trip(ca):
    tok = tokens.new_token(3600, pki.fingerprint(ca[1]), 50052)
    text = tok.encode()
    assert text.startswith("fvt1.") and " " not in text and "=" not in text
    assert JoinToken.decode(text) == tok
    assert JoinToken.decode(f"  {text}\n") == tok
    assert len(tok.token_id) == 16 and len(tok.secret) == 32
    assert not tok.is_expired() and tok.is_expired(now=tok.expires_at)
    assert tok.secret.hex() not in repr(tok)


def _encode_body(body) -> str:
    raw = json.dumps(body).encode()
    return "fvt1." + base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: {k: v for k, v in b.items() if k != "ca"}, "missing field"),
        (lambda b: {**b, "extra": 1}, "unexpected field"),
        (lambda b: {**b, "port": "50052"}, "port"),
        (lambda b: {**b, "port": 70000}, "port"),
        (lambda b: {**b, "exp": True}, "expiry"),
        (lambda b: {**b, "id": "XYZ"}, "id"),
        (lambda b: {**b, "ca": "ab" * 16}, "fingerprint"),
        (lambda b: {**b, "s": "AAAA"}, "secret"),
        (lambda b: {**b, "s": "!!!!"}, "secret"),
        (lambda b: [b], "object"),
    ],
)
def test_token_malformed_fields(ca, mutate, message):
    tok = tokens.new_token(3600, pki.fingerprint(ca[1]), 50052)
    body = json.loads(base64.urlsafe_b64decode(tok.encode()[5:] + "=="))
    with pytest.raises(TokenError, match=message):
        JoinToken.decode(_encode_body(mutate(body)))


def test_token_malformed_text(ca):
    text = tokens.new_token(3600, pki.fingerprint(ca[1]), 50052).encode()
    for bad in ["", "fvt1.", "fvt2." + text[5:], "hello", text + "!", "fvt1.a", "x" * 5000]:
        with pytest.raises(TokenError):
            JoinToken.decode(bad)
    for cut in range(6, len(text) - 1, 7):  # every truncation is refused with TokenError, never another error
        with pytest.raises(TokenError):
            JoinToken.decode(text[:cut])
    with pytest.raises(TokenError):
        JoinToken.decode(None)  # type: ignore[arg-type]


def test_new_token_validates(ca):
    with pytest.raises(TokenError):
        tokens.new_token(0, pki.fingerprint(ca[1]), 50052)
    with pytest.raises(TokenError):
        tokens.new_token(60, "not-a-fingerprint", 50052)


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("90s", 90),
        ("15m", 900),
        ("24h", 86400),
        ("7d", 604800),
        ("3600", 3600),
        (" 2H ", 7200),
        ("1 d", 86400),
    ],
)
def test_parse_duration(text, seconds):
    assert tokens.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "0s", "-5m", "1.5h", "10w", "h", "5 m s", "99999d", "1e3", "abc"])
def test_parse_duration_rejects(text):
    with pytest.raises(TokenError):
        tokens.parse_duration(text)


def test_enrollment_proof(ca):
    tok = tokens.new_token(600, pki.fingerprint(ca[1]), 50052)
    stored = tokens.proof_key(tok.secret)
    assert stored != tok.secret and len(stored) == 32
    csr = pki.make_csr(pki.generate_key(), "site-a").public_bytes(DER)
    other_csr = pki.make_csr(pki.generate_key(), "site-a").public_bytes(DER)
    proof = tokens.make_proof(tok.secret, csr)
    assert tokens.check_proof(stored, csr, proof)
    assert not tokens.check_proof(stored, other_csr, proof)
    assert not tokens.check_proof(stored, csr, tokens.make_proof(b"\x00" * 32, csr))
    assert not tokens.check_proof(tokens.proof_key(b"\x01" * 32), csr, proof)
    assert not tokens.check_proof(stored, csr, proof[:-1])
    assert not tokens.check_proof(stored, csr, b"")


# ----------------------------------------------------------------------------------------------- signing


def _manifest(**overrides) -> UpdateManifest:
    fields = dict(
        federation_id="fed-1",
        run_id="run-1",
        round=3,
        client="site-a",
        base_digest="a" * 64,
        sha256="b" * 64,
        size=1234,
        num_examples=50,
        nonce="c" * 32,
        created_at=1700000000.25,
    )
    fields.update(overrides)
    return UpdateManifest(**fields)


def test_manifest_canonical_is_stable():
    m = _manifest()
    expected = (
        b'fedvlm-update-v1\n{"base_digest":"' + b"a" * 64 + b'","client":"site-a","created_at":1700000000.25,'
        b'"federation_id":"fed-1","nonce":"' + b"c" * 32 + b'","num_examples":50,"round":3,"run_id":"run-1",'
        b'"sha256":"' + b"b" * 64 + b'","size":1234}'
    )
    assert m.canonical() == expected
    assert UpdateManifest.from_json(m.to_json()) == m
    assert UpdateManifest.from_json(m.to_json()).canonical() == expected
    assert _manifest(created_at=5).canonical() == _manifest(created_at=5.0).canonical()


def test_manifest_signature_breaks_on_any_field_change(ca):
    key, cert = _client(ca)
    m = _manifest()
    sig = signing.sign(key, m.canonical())
    signing.verify(cert, m.canonical(), sig)
    changes = dict(
        federation_id="fed-2",
        run_id="run-2",
        round=4,
        client="site-b",
        base_digest="d" * 64,
        sha256="e" * 64,
        size=1235,
        num_examples=51,
        nonce="f" * 32,
        created_at=1700000000.5,
    )
    assert set(changes) == {f.name for f in dataclasses.fields(UpdateManifest)}
    for name, value in changes.items():
        with pytest.raises(SignatureError):
            signing.verify(cert, dataclasses.replace(m, **{name: value}).canonical(), sig)
    _, other_cert = _client(ca, name="site-b")
    with pytest.raises(SignatureError):
        signing.verify(other_cert, m.canonical(), sig)
    with pytest.raises(SignatureError):
        signing.verify(cert, m.canonical(), b"\x30\x00")
    # The domain tag separates record kinds: the same JSON under another tag does not verify.
    with pytest.raises(SignatureError):
        signing.verify(cert, b"fedvlm-global-v1\n" + m.canonical().split(b"\n", 1)[1], sig)


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda d: d.pop("nonce"), "nonce"),
        (lambda d: d.update(round="3"), "round"),
        (lambda d: d.update(round=True), "round"),
        (lambda d: d.update(size=-1), "size"),
        (lambda d: d.update(sha256="B" * 64), "sha256"),
        (lambda d: d.update(base_digest="a" * 63), "base_digest"),
        (lambda d: d.update(client=7), "client"),
        (lambda d: d.update(created_at="now"), "created_at"),
        (lambda d: d.update(extra=1), "extra"),
    ],
)
def test_manifest_from_json_names_bad_field(edit, field):
    d = json.loads(_manifest().to_json())
    edit(d)
    with pytest.raises(ValueError, match=field):
        UpdateManifest.from_json(json.dumps(d))


def test_manifest_from_json_rejects_non_objects():
    for bad in ["", "[]", "{", '{"created_at": NaN}', b"\xff"]:
        with pytest.raises(ValueError):
            UpdateManifest.from_json(bad)


def test_global_record(ca):
    key, cert = ca
    d1, d2 = "1" * 64, "2" * 64
    rec = GlobalRecord("fed-1", "run-1", 2, "9" * 64, 100, "8" * 64, (d2, d1), 1700000000.0)
    assert rec.contributors == (d1, d2)
    assert rec.canonical().startswith(b"fedvlm-global-v1\n{")
    assert GlobalRecord.from_json(rec.to_json()) == rec
    sig = signing.sign(key, rec.canonical())
    signing.verify(cert, rec.canonical(), sig)
    with pytest.raises(SignatureError):
        signing.verify(cert, dataclasses.replace(rec, contributors=(d1,)).canonical(), sig)
    first = GlobalRecord("fed-1", "run-1", 0, "9" * 64, 100, "", (), 1700000000.0)
    assert GlobalRecord.from_json(first.to_json()) == first
    with pytest.raises(ValueError, match="duplicate"):
        GlobalRecord("fed-1", "run-1", 2, "9" * 64, 100, "", (d1, d1), 1.0)
    with pytest.raises(ValueError, match="contributors"):
        GlobalRecord("fed-1", "run-1", 2, "9" * 64, 100, "", d1, 1.0)  # type: ignore[arg-type]


def test_new_nonce():
    a, b = signing.new_nonce(), signing.new_nonce()
    assert a != b and len(a) == 32 and int(a, 16) >= 0


# ----------------------------------------------------------------------------------------------- mutual TLS


def _start_server(ca, server):
    seen: list[tuple[str | None, str | None]] = []

    def ping(request: bytes, context: grpc.ServicerContext) -> bytes:
        name = pki.peer_name(context)
        peer = pki.peer_cert(context)
        seen.append((name, pki.cert_role(peer) if peer is not None else None))
        return b"pong:" + (name or "?").encode()

    handler = grpc.method_handlers_generic_handler(
        "fedvlm.test.Echo", {"Ping": grpc.unary_unary_rpc_method_handler(ping)}
    )
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    srv.add_generic_rpc_handlers((handler,))
    creds = grpc.ssl_server_credentials(
        [(pki.key_to_pem(server[0]), pki.cert_to_pem(server[1]))],
        root_certificates=pki.cert_to_pem(ca[1]),
        require_client_auth=True,
    )
    port = srv.add_secure_port("127.0.0.1:0", creds)
    srv.start()
    return srv, port, seen


def _call(port: int, ca_cert, key, cert) -> bytes:
    creds = grpc.ssl_channel_credentials(
        root_certificates=pki.cert_to_pem(ca_cert),
        private_key=pki.key_to_pem(key) if key is not None else None,
        certificate_chain=pki.cert_to_pem(cert) if cert is not None else None,
    )
    with grpc.secure_channel(f"127.0.0.1:{port}", creds) as channel:
        return channel.unary_unary("/fedvlm.test.Echo/Ping")(b"ping", timeout=10)


def test_mutual_tls_with_grpc(ca, other_ca, server):
    srv, port, seen = _start_server(ca, server)
    try:
        key, cert = _client(ca, name="site-a")
        assert _call(port, ca[1], key, cert) == b"pong:site-a"
        admin_key, admin_cert = _client(ca, name="ops", role="admin")
        assert _call(port, ca[1], admin_key, admin_cert) == b"pong:ops"
        assert seen == [("site-a", "client"), ("ops", "admin")]

        foreign_key, foreign_cert = _client(other_ca, name="site-a")
        with pytest.raises(grpc.RpcError) as err:
            _call(port, ca[1], foreign_key, foreign_cert)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE

        with pytest.raises(grpc.RpcError) as err:  # no client certificate at all
            _call(port, ca[1], None, None)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert len(seen) == 2  # the handler never ran for the rejected callers
    finally:
        srv.stop(None)


def test_peer_helpers_without_client_cert():
    class Ctx:
        def __init__(self, auth):
            self._auth = auth

        def auth_context(self):
            return self._auth

    assert pki.peer_name(Ctx({})) is None
    assert pki.peer_cert(Ctx({})) is None
    assert pki.peer_name(Ctx({"x509_common_name": [b"a", b"b"]})) is None
    assert pki.peer_name(Ctx({"x509_common_name": [b"site-a"]})) == "site-a"
