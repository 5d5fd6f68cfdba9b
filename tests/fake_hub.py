"""A loopback stand-in for the Hugging Face hub (the real one cannot be reached from tests): the four HTTP endpoints
huggingface_hub's ``model_info`` and ``snapshot_download`` use, serving repositories held as {commit: {file: bytes}}
with named refs (branches/tags). Every request path is recorded, so a test sees which revision was asked for."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


class FakeHub:
    """``repos[repo_id] = {"refs": {"main": commit, ...}, "commits": {commit: {filename: bytes}}}``."""

    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
                hub._serve(self, body=False)

            def do_GET(self) -> None:  # noqa: N802
                hub._serve(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def add_commit(self, repo_id: str, files: dict[str, bytes], refs: tuple[str, ...] = ()) -> str:
        """Store a commit of ``files``; point ``refs`` at it; return its 40-hex id."""
        commit = hashlib.sha1(json.dumps({k: hashlib.sha256(v).hexdigest() for k, v in sorted(files.items())})
                              .encode() + repo_id.encode()).hexdigest()
        repo = self.repos.setdefault(repo_id, {"refs": {}, "commits": {}})
        repo["commits"][commit] = files
        for ref in refs:
            repo["refs"][ref] = commit
        return commit

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- the endpoints ---------------------------------------------------------------------------------------------
    def _commit(self, repo_id: str, revision: str) -> tuple[str, dict] | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            return None
        commit = repo["refs"].get(revision, revision)
        return (commit, repo["commits"][commit]) if commit in repo["commits"] else None

    def _serve(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlparse(handler.path).path)
        self.requests.append(f"{handler.command} {path}")
        info = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/(.+))?", path)
        tree = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)", path)
        resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if tree:
            found = self._commit(tree[1], tree[2])
            if found is None:
                return self._send(handler, 404, b"{}", body)
            entries = [{"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                       for name, data in sorted(found[1].items())]
            return self._send(handler, 200, json.dumps(entries).encode(), body)
        if info:
            found = self._commit(info[1], info[2] or "main")
            if found is None:
                return self._send(handler, 404, b'{"error": "Repository not found"}', body,
                                  {"X-Error-Code": "RepoNotFound"})
            siblings = [{"rfilename": name} for name in sorted(found[1])]
            return self._send(handler, 200, json.dumps({"id": info[1], "sha": found[0], "siblings": siblings})
                              .encode(), body)
        if resolve:
            found = self._commit(resolve[1], resolve[2])
            if found is None or resolve[3] not in found[1]:
                return self._send(handler, 404, b"", body, {"X-Error-Code": "EntryNotFound"})
            data = found[1][resolve[3]]
            return self._send(handler, 200, data, body, {"X-Repo-Commit": found[0],
                                                        "ETag": f'"{hashlib.sha256(data).hexdigest()}"'})
        return self._send(handler, 404, b"", body)

    @staticmethod
    def _send(handler, status: int, data: bytes, body: bool, headers: dict[str, str] | None = None) -> None:
        handler.send_response(status)
        for key, value in {"Content-Length": str(len(data)), **(headers or {})}.items():
            handler.send_header(key, value)
        handler.end_headers()
        if body:
            handler.wfile.write(data)
