"""The coordinator's durable state: one SQLite database in WAL mode.

Every change that matters (an accepted update, a new global, a phase transition) is one transaction, so a
coordinator killed at any instant restarts into a consistent state. Blob bytes live in the BlobStore; rows refer
to them by digest and are written only after the blob is durable.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS clients (
    name TEXT PRIMARY KEY, cert_fingerprint TEXT NOT NULL, enrolled_at REAL NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0, state TEXT NOT NULL DEFAULT 'idle', detail TEXT NOT NULL DEFAULT '',
    bytes_done INTEGER NOT NULL DEFAULT 0, bytes_total INTEGER NOT NULL DEFAULT 0, last_seen REAL,
    last_metrics TEXT NOT NULL DEFAULT '{}');
CREATE TABLE IF NOT EXISTS tokens (
    token_id TEXT PRIMARY KEY, name TEXT NOT NULL, proof_key BLOB NOT NULL, expires_at REAL NOT NULL,
    created_at REAL NOT NULL, used_at REAL);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, config_json TEXT NOT NULL, task_json TEXT NOT NULL, state TEXT NOT NULL,
    round INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL, finished_at REAL, init_client TEXT,
    schema_json TEXT, adapter_config TEXT, server_state TEXT);
CREATE TABLE IF NOT EXISTS rounds (
    run_id TEXT NOT NULL, round INTEGER NOT NULL, phase TEXT NOT NULL, attempt INTEGER NOT NULL DEFAULT 1,
    base_digest TEXT NOT NULL, deadline REAL, started_at REAL NOT NULL, finished_at REAL, global_digest TEXT,
    PRIMARY KEY (run_id, round));
CREATE TABLE IF NOT EXISTS assignments (
    run_id TEXT NOT NULL, round INTEGER NOT NULL, client TEXT NOT NULL, state TEXT NOT NULL,
    PRIMARY KEY (run_id, round, client));
CREATE TABLE IF NOT EXISTS uploads (
    upload_id TEXT PRIMARY KEY, run_id TEXT NOT NULL, round INTEGER NOT NULL, client TEXT NOT NULL,
    nonce TEXT NOT NULL UNIQUE, manifest_json TEXT NOT NULL, signature BLOB NOT NULL, size INTEGER NOT NULL,
    sha256 TEXT NOT NULL, received INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS updates (
    run_id TEXT NOT NULL, round INTEGER NOT NULL, client TEXT NOT NULL, digest TEXT NOT NULL,
    num_examples INTEGER NOT NULL, manifest_json TEXT NOT NULL, signature BLOB NOT NULL, accepted_at REAL NOT NULL,
    PRIMARY KEY (run_id, round, client));
CREATE TABLE IF NOT EXISTS nonces (nonce TEXT PRIMARY KEY, client TEXT NOT NULL, used_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS globals (
    digest TEXT NOT NULL, run_id TEXT NOT NULL, round INTEGER NOT NULL, size INTEGER NOT NULL,
    record_json TEXT NOT NULL, signature BLOB NOT NULL, created_at REAL NOT NULL, PRIMARY KEY (run_id, round));
CREATE TABLE IF NOT EXISTS metrics (
    run_id TEXT NOT NULL, round INTEGER NOT NULL, client TEXT NOT NULL, kind TEXT NOT NULL,
    global_digest TEXT NOT NULL, metrics_json TEXT NOT NULL, reported_at REAL NOT NULL,
    PRIMARY KEY (run_id, round, client, kind));
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY, entry_json TEXT NOT NULL, prev_hash TEXT NOT NULL, hash TEXT NOT NULL);
"""

GENESIS = "0" * 64


def audit_hash(prev_hash: str, entry_json: str) -> str:
    """Link of the audit chain: SHA-256 over the previous link and the entry's canonical JSON."""
    return hashlib.sha256(f"{prev_hash}\n{entry_json}".encode()).hexdigest()


def _canonical(entry: dict[str, Any]) -> str:
    return json.dumps(entry, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class Run:
    run_id: str
    state: str  # init | running | evaluating | done
    round: int  # the round being trained (1-based); the latest global is round - 1
    init_client: str | None
    schema_json: str | None
    adapter_config: str | None
    task_json: str
    config_json: str
    server_state: str | None = None  # JSON {"round", "digest"}: the algorithm's state saved with the latest global


@dataclass(frozen=True)
class Round:
    run_id: str
    round: int
    phase: str  # waiting | training | aggregating | done | evaluating
    attempt: int
    base_digest: str
    deadline: float | None
    started_at: float
    finished_at: float | None
    global_digest: str | None


class Store:
    """Thread-safe access to state.db (one connection guarded by a lock; WAL, synchronous=FULL)."""

    def __init__(self, path: Path, readonly: bool = False) -> None:
        self.path = path
        if readonly:
            self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        else:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)
        self._db.execute("PRAGMA busy_timeout=10000")
        self._db.row_factory = sqlite3.Row
        self._lock = threading.RLock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One atomic transaction; rolled back on any exception."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def query(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def one(self, sql: str, args: tuple = ()) -> sqlite3.Row | None:
        rows = self.query(sql, args)
        return rows[0] if rows else None

    # -- meta ------------------------------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        row = self.one("SELECT value FROM meta WHERE key=?", (key,))
        return row["value"] if row else None

    def set_meta(self, key: str, value: str) -> None:
        with self.tx() as db:
            db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    # -- audit -----------------------------------------------------------------------------------------------
    def append_audit(self, db: sqlite3.Connection, entry: dict[str, Any]) -> str:
        """Append to the hash chain inside the caller's transaction; returns the new link."""
        row = db.execute("SELECT hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        prev = row["hash"] if row else GENESIS
        text = _canonical({"at": round(time.time(), 3), **entry})
        link = audit_hash(prev, text)
        db.execute("INSERT INTO audit(entry_json, prev_hash, hash) VALUES (?, ?, ?)", (text, prev, link))
        return link

    # -- clients ---------------------------------------------------------------------------------------------
    def client(self, name: str) -> sqlite3.Row | None:
        return self.one("SELECT * FROM clients WHERE name=?", (name,))

    def touch_client(self, name: str, state: str, detail: str, bytes_done: int, bytes_total: int) -> None:
        with self.tx() as db:
            db.execute(
                "UPDATE clients SET state=?, detail=?, bytes_done=?, bytes_total=?, last_seen=? WHERE name=?",
                (state, detail, bytes_done, bytes_total, time.time(), name),
            )

    def live_clients(self, heartbeat_timeout: float) -> list[str]:
        cutoff = time.time() - heartbeat_timeout
        rows = self.query(
            "SELECT name FROM clients WHERE revoked=0 AND last_seen IS NOT NULL AND last_seen>=? ORDER BY name",
            (cutoff,),
        )
        return [r["name"] for r in rows]

    # -- runs and rounds -------------------------------------------------------------------------------------
    def current_run(self) -> Run | None:
        row = self.one("SELECT * FROM runs ORDER BY created_at DESC LIMIT 1")
        if row is None:
            return None
        return Run(row["run_id"], row["state"], row["round"], row["init_client"], row["schema_json"],
                   row["adapter_config"], row["task_json"], row["config_json"], row["server_state"])

    def round(self, run_id: str, number: int) -> Round | None:
        row = self.one("SELECT * FROM rounds WHERE run_id=? AND round=?", (run_id, number))
        if row is None:
            return None
        return Round(row["run_id"], row["round"], row["phase"], row["attempt"], row["base_digest"], row["deadline"],
                     row["started_at"], row["finished_at"], row["global_digest"])

    def assignment(self, run_id: str, number: int, client: str) -> str | None:
        row = self.one("SELECT state FROM assignments WHERE run_id=? AND round=? AND client=?",
                       (run_id, number, client))
        return row["state"] if row else None

    def assignments(self, run_id: str, number: int) -> dict[str, str]:
        rows = self.query("SELECT client, state FROM assignments WHERE run_id=? AND round=?", (run_id, number))
        return {r["client"]: r["state"] for r in rows}

    def accepted_updates(self, run_id: str, number: int) -> list[sqlite3.Row]:
        """Accepted updates of a round, in client-name order (so aggregation is deterministic)."""
        return self.query("SELECT * FROM updates WHERE run_id=? AND round=? ORDER BY client", (run_id, number))

    def global_row(self, run_id: str, number: int) -> sqlite3.Row | None:
        return self.one("SELECT * FROM globals WHERE run_id=? AND round=?", (run_id, number))

    def global_by_digest(self, digest: str) -> sqlite3.Row | None:
        return self.one("SELECT * FROM globals WHERE digest=? ORDER BY created_at DESC LIMIT 1", (digest,))

    def latest_global(self, run_id: str) -> sqlite3.Row | None:
        return self.one("SELECT * FROM globals WHERE run_id=? ORDER BY round DESC LIMIT 1", (run_id,))
