"""The web dashboard (`fedvlm-coord serve --dashboard-listen HOST:PORT`): read-only, admin-only, live.

HTTPS with the coordinator's server certificate. A request is admitted with the admin certificate (TLS client
authentication against the federation CA) or with the dashboard token `init` prints (`?token=` once, which sets an
HttpOnly cookie and redirects, or `Authorization: Bearer`); anything else gets 401, a certificate that is not the
admin's 403, and any method but GET/HEAD 405. State is only read.

The page (dashboard_assets/) gets the status document plus the audit chain's state from /api/status and then
live from /api/events (server-sent events, one event per change; the page falls back to polling /api/status if
the stream breaks). The standard library's threaded HTTP server is enough for a handful of operators and keeps the
coordinator free of a web framework; only the TLS handshake is moved into the request's own thread.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import ssl
import threading
import time
from http import HTTPStatus
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography import x509

from fedvlm.security import pki
from fedvlm.status_view import change_key
from fedvlm.tasks import primary_metric

from .audit import AuditError, verify_audit
from .layout import FederationDir
from .state import State
from .status import local_document

log = logging.getLogger(__name__)

ASSETS = Path(__file__).parent / "dashboard_assets"
STATIC = {"/": ("index.html", "text/html; charset=utf-8"), "/dashboard.js": ("dashboard.js", "text/javascript"),
          "/dashboard.css": ("dashboard.css", "text/css")}
COOKIE = "fedvlm_dashboard"
TOKEN_PREFIX = "fvd1."
EVENT_CHECK_S = 1.0  # how often an open event stream looks for a change
KEEPALIVE_S = 15.0
HEADERS = {  # nothing from elsewhere, never framed, never cached, never sniffed
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def issue_dashboard_token(state: State) -> str:
    """A new dashboard token (the previous one stops working); only its SHA-256 is stored."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    state.set_dashboard_token(_sha256(token))
    return token


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class Dashboard:
    """The dashboard's HTTPS server; `start()` binds and serves from background threads, `stop()` ends both."""

    def __init__(self, fed: FederationDir, state: State, listen: str) -> None:
        self.fed = fed
        self.state = state
        self.listen = listen
        self.signer_cert = pki.load_cert_pem(fed.server_cert.read_bytes())
        self.stopping = threading.Event()
        self._audit: tuple[str | None, dict[str, Any]] = ("", {})
        self._audit_lock = threading.Lock()
        self._server: _Server | None = None

    def start(self) -> str:
        """Bind `listen` and serve; returns HOST:PORT as bound (port 0 picks a free one)."""
        host, port = self.listen.rsplit(":", 1)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.fed.server_cert, self.fed.server_key)
        context.load_verify_locations(self.fed.ca_cert)
        context.verify_mode = ssl.CERT_OPTIONAL  # the admin certificate, or none and a token
        self._server = _Server((host.strip("[]"), int(port)), _Handler, context, self)
        threading.Thread(target=self._server.serve_forever, daemon=True, name="dashboard").start()
        bound = f"{host}:{self._server.server_address[1]}"
        log.info("dashboard on https://%s (admin certificate or dashboard token)", bound)
        return bound

    def stop(self) -> None:
        self.stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def payload(self) -> dict[str, Any]:
        """What the page shows: the status document, each global's headline metric and the audit chain's state."""
        status = local_document(self.state, self.fed, live=True)
        scores = []
        for row in status["rounds"]:
            best = primary_metric(row["eval_metrics"])
            if best:
                scores.append({"round": row["round"], "metric": best[0], "value": best[1]})
        return {"status": status, "scores": scores, "audit": self._audit_state()}

    def _audit_state(self) -> dict[str, Any]:
        """Links and signatures of the whole chain, re-checked whenever its head moves (blob digests are left to
        `fedvlm-coord audit verify`, which reads every global)."""
        with self._audit_lock:
            head = self.state.audit_head()
            if head != self._audit[0]:
                try:
                    report = verify_audit(self.state, None, self.signer_cert)
                    result = {"ok": True, "entries": report.entries, "globals": report.globals_checked, "error": ""}
                except AuditError as exc:
                    result = {"ok": False, "entries": 0, "globals": 0, "error": str(exc)}
                self._audit = (head, {**result, "head": head or ""})
            return self._audit[1]

    def admits(self, token: str) -> bool:
        """Whether `token` is the current dashboard token (compared in constant time)."""
        expected = self.state.dashboard_token_sha256()
        return bool(token and expected) and hmac.compare_digest(_sha256(token), expected)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, handler, context: ssl.SSLContext, dashboard: Dashboard) -> None:
        self.context = context
        self.dashboard = dashboard
        super().__init__(address, handler)

    def get_request(self):
        sock, address = self.socket.accept()
        sock.settimeout(30)
        # The handshake happens in the request's thread (its first read), so a slow client holds up only itself.
        return self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), address

    def handle_error(self, request, client_address) -> None:
        log.debug("dashboard connection from %s failed", client_address[0], exc_info=True)  # e.g. plain HTTP


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "fedvlm-dashboard"
    sys_version = ""

    def setup(self) -> None:
        self.request.do_handshake()
        super().setup()

    def log_message(self, format: str, *args) -> None:
        log.debug("dashboard %s: %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if not self._admitted(url):
            return
        dashboard = self.server.dashboard
        if url.path == "/api/status":
            self._send(HTTPStatus.OK, "application/json", json.dumps(dashboard.payload()).encode())
        elif url.path == "/api/events":
            self._events()
        elif url.path in STATIC:
            name, kind = STATIC[url.path]
            self._send(HTTPStatus.OK, kind, (ASSETS / name).read_bytes())
        else:
            self._send(HTTPStatus.NOT_FOUND, "text/plain", b"not found\n")

    def do_HEAD(self) -> None:
        self.do_GET()

    def _refuse_method(self) -> None:
        self._send(HTTPStatus.METHOD_NOT_ALLOWED, "text/plain", b"the dashboard is read-only\n", {"Allow": "GET, HEAD"})

    do_POST = do_PUT = do_DELETE = do_PATCH = _refuse_method

    def _admitted(self, url) -> bool:
        """Admit the admin certificate or the token; send the refusal (or the cookie-setting redirect) otherwise."""
        der = self.connection.getpeercert(binary_form=True)
        if der:
            if pki.cert_role(x509.load_der_x509_certificate(der)) == "admin":
                return True
            self._send(HTTPStatus.FORBIDDEN, "text/plain", b"this certificate is not the admin certificate\n")
            return False
        dashboard = self.server.dashboard
        query = parse_qs(url.query).get("token", [""])[0]
        if query:
            if dashboard.admits(query):
                cookie = f"{COOKIE}={query}; Secure; HttpOnly; SameSite=Strict; Path=/"
                self._send(HTTPStatus.SEE_OTHER, "text/plain", b"", {"Location": url.path, "Set-Cookie": cookie})
            else:
                self._unauthorized()
            return False
        bearer = self.headers.get("Authorization", "")
        token = bearer[len("Bearer "):] if bearer.startswith("Bearer ") else ""
        if not token:
            cookie = SimpleCookie(self.headers.get("Cookie", ""))
            token = cookie[COOKIE].value if COOKIE in cookie else ""
        if dashboard.admits(token):
            return True
        self._unauthorized()
        return False

    def _unauthorized(self) -> None:
        body = ("401 Unauthorized: the fedvlm dashboard needs the admin certificate or the dashboard token from "
                "`fedvlm-coord init` (open /?token=TOKEN once; `fedvlm-coord dashboard-token` issues a new one).\n")
        self._send(HTTPStatus.UNAUTHORIZED, "text/plain; charset=utf-8", body.encode(),
                   {"WWW-Authenticate": 'Bearer realm="fedvlm"'})

    def _send(self, status: HTTPStatus, kind: str, body: bytes, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in {**HEADERS, "Content-Type": kind, "Content-Length": str(len(body)), **(extra or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _events(self) -> None:
        """Server-sent events: the payload at once and at each change, a comment line as keep-alive."""
        self.send_response(HTTPStatus.OK)
        for key, value in {**HEADERS, "Content-Type": "text/event-stream", "Connection": "close"}.items():
            self.send_header(key, value)
        self.end_headers()
        self.close_connection = True
        dashboard = self.server.dashboard
        last, quiet_since = None, time.monotonic()
        try:
            self.wfile.write(b"retry: 2000\n\n")
            while not dashboard.stopping.is_set():
                payload = dashboard.payload()
                key = change_key(payload["status"]) + json.dumps(payload["audit"], sort_keys=True)
                if key != last:
                    self.wfile.write(b"event: status\ndata: " + json.dumps(payload).encode() + b"\n\n")
                    last, quiet_since = key, time.monotonic()
                elif time.monotonic() - quiet_since > KEEPALIVE_S:
                    self.wfile.write(b": keep-alive\n\n")
                    quiet_since = time.monotonic()
                self.wfile.flush()
                dashboard.stopping.wait(EVENT_CHECK_S)
        except (BrokenPipeError, ConnectionResetError, TimeoutError, ssl.SSLError):
            pass  # the page went away
