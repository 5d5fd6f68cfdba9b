"""The coordinator's state: one SQLite database (WAL) and every SQL statement the coordinator runs.

Each public method is one named read or one transition, and each transition is one transaction, so a coordinator
killed at any instant restarts into a consistent state. Blob bytes live in the BlobStore; rows refer to them by
digest and are written only after the blob is durable. Transitions that an operator or an auditor must be able
to retrace (enrollment, revocation, runs, globals) append to the hash-chained audit log in the same transaction.

`State.in_memory()` is the same code on SQLite's `:memory:`: the round driver and intake run against it in unit
tests, without daemons or files.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fedvlm.security.signing import GlobalRecord, UpdateManifest
from fedvlm.spec import TaskSpec
from fedvlm.tables import from_table

from ..config import RunConfig
from .heartbeats import Heartbeat, PendingHeartbeats
from .records import (
    CONFIG_FROM_FEDERATION_TOML,
    GENESIS,
    Activity,
    AssignmentState,
    AuditEntry,
    Client,
    GlobalVersion,
    MetricsKind,
    MetricsReport,
    Next,
    PollView,
    Round,
    RoundPhase,
    Run,
    RunState,
    SecAggKeys,
    SecAggPhase,
    SecAggRound,
    ServerStateRef,
    Token,
    Update,
    Upload,
    audit_hash,
)

# The schema's version, kept in SQLite's `PRAGMA user_version`. 0 is a database from before versions were
# recorded (the same tables as version 1). A change of the tables means a new number and an upgrade step in
# UPGRADES; every database, new or old, is SCHEMA (version 1) plus the upgrades past its own version, in order.
SCHEMA_VERSION = 3

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

# Version -> the statements that upgrade a database of the version before it.
UPGRADES = {
    # Runs as a lifecycle (run new / stop), sites' fatal errors and structured training progress. New enum values
    # too: RunState.STOPPED, Activity.INITIALIZING and Activity.FAILED, which a version-1 fedvlm cannot read.
    2: """
    ALTER TABLE runs ADD COLUMN stop_reason TEXT;
    ALTER TABLE runs ADD COLUMN config_source TEXT;
    ALTER TABLE clients ADD COLUMN run_id TEXT;
    ALTER TABLE clients ADD COLUMN step INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE clients ADD COLUMN steps_total INTEGER NOT NULL DEFAULT 0;
    """,
    # Secure aggregation (coordinator/secagg_phase.py): each attempt's sub-phase and site lists, the sites' signed
    # keys, the encrypted shares the coordinator relays and the shares revealed to unmask.
    3: """
    CREATE TABLE IF NOT EXISTS secagg_rounds (
        run_id TEXT NOT NULL, round INTEGER NOT NULL, attempt INTEGER NOT NULL, phase TEXT NOT NULL,
        threshold INTEGER NOT NULL, sites_json TEXT NOT NULL DEFAULT '[]', sharers_json TEXT NOT NULL DEFAULT '[]',
        survivors_json TEXT NOT NULL DEFAULT '[]', dropped_json TEXT NOT NULL DEFAULT '[]', deadline REAL,
        reason TEXT NOT NULL DEFAULT '', PRIMARY KEY (run_id, round, attempt));
    CREATE TABLE IF NOT EXISTS secagg_keys (
        run_id TEXT NOT NULL, round INTEGER NOT NULL, attempt INTEGER NOT NULL, client TEXT NOT NULL,
        advertisement_json TEXT NOT NULL, signature BLOB NOT NULL, cert_pem BLOB NOT NULL,
        PRIMARY KEY (run_id, round, attempt, client));
    CREATE TABLE IF NOT EXISTS secagg_shares (
        run_id TEXT NOT NULL, round INTEGER NOT NULL, attempt INTEGER NOT NULL, owner TEXT NOT NULL,
        holder TEXT NOT NULL, ciphertext BLOB NOT NULL, PRIMARY KEY (run_id, round, attempt, owner, holder));
    CREATE TABLE IF NOT EXISTS secagg_reveals (
        run_id TEXT NOT NULL, round INTEGER NOT NULL, attempt INTEGER NOT NULL, client TEXT NOT NULL,
        reveal_json TEXT NOT NULL, PRIMARY KEY (run_id, round, attempt, client));
    """,
}

RUN_COLUMNS = "runs.*, (SELECT COUNT(*) FROM runs AS earlier WHERE earlier.rowid <= runs.rowid) AS number"

# State.poll_view: one row whatever exists (the LEFT JOINs from a one-row table), columns prefixed where names clash.
POLL_VIEW = f"""
SELECT c.cert_fingerprint AS c_fingerprint, c.revoked AS c_revoked, run.*,
    rd.run_id AS r_run_id, rd.round AS r_round, rd.phase AS r_phase, rd.attempt AS r_attempt,
    rd.base_digest AS r_base_digest, rd.deadline AS r_deadline,
    rd.started_at AS r_started_at, rd.finished_at AS r_finished_at, rd.global_digest AS r_global_digest,
    a.state AS a_state, g.digest AS g_digest, g.run_id AS g_run_id, g.round AS g_round, g.size AS g_size,
    g.record_json AS g_record_json, g.signature AS g_signature, g.created_at AS g_created_at
FROM (SELECT 1) AS one
LEFT JOIN clients AS c ON c.name = ?
LEFT JOIN (SELECT {RUN_COLUMNS} FROM runs ORDER BY rowid DESC LIMIT 1) AS run ON 1
LEFT JOIN rounds AS rd ON rd.run_id = run.run_id AND rd.round = run.round
LEFT JOIN assignments AS a ON a.run_id = run.run_id AND a.round = run.round AND a.client = ?
LEFT JOIN globals AS g ON g.rowid = (SELECT rowid FROM globals WHERE digest = rd.base_digest
                                     ORDER BY created_at DESC LIMIT 1)
"""

COORDINATOR = "@coordinator"  # the `client` of metrics rows written by the server step (e.g. DP epsilon)


class StateError(Exception):
    """state.db cannot be used by this version of fedvlm; the message says why, in one line."""


class TransitionRefused(Exception):
    """The stored state does not allow this transition now (nothing was changed); the message says why."""


def _canonical(entry: dict[str, Any]) -> str:
    return json.dumps(entry, sort_keys=True, separators=(",", ":"))


class State:
    """Thread-safe access to state.db (WAL, synchronous=FULL): transitions run on one writer connection guarded by
    a lock; reads outside a transition run on a connection of the reading thread's own, so that a site's Poll
    does not queue behind another thread's write (WAL readers see every committed transition and never block on
    the writer). On `:memory:` and read-only opens, everything runs on the one connection.

    `clock` is the time every row is stamped with and every deadline and heartbeat is judged by (tests pass a
    fake one). A database whose schema version is newer than `SCHEMA_VERSION` is refused with `StateError`.
    """

    def __init__(self, path: Path | str, readonly: bool = False, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.now = clock
        self._readonly = readonly
        if readonly:
            self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        else:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        self._local = threading.local()  # .in_tx: this thread is inside _tx; .reader: its read connection
        self._readers: list[sqlite3.Connection] | None = None if readonly or path == ":memory:" else []
        self._readers_lock = threading.Lock()  # not self._lock: a reader must not wait for a transition
        self._heartbeats = PendingHeartbeats()
        self._after_commit: list[Callable[[], None]] = []  # run once the current transaction commits (under _lock)
        try:
            self._open(readonly)
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise StateError(f"{path} is not a readable fedvlm state database ({exc})") from exc
        except BaseException:
            self._db.close()
            raise

    @classmethod
    def in_memory(cls, clock: Callable[[], float] = time.time) -> State:
        """A fresh, empty state that lives in this process only."""
        return cls(":memory:", clock=clock)

    def _open(self, readonly: bool) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StateError(f"{self.path}: state schema version {version} is newer than this fedvlm's "
                             f"({SCHEMA_VERSION}); use the fedvlm version that wrote it")
        self._db.execute("PRAGMA busy_timeout=10000")
        if not readonly:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            _upgrade(self._db)
        elif version < SCHEMA_VERSION:
            # A read-only command (status, rounds) on a directory an older fedvlm wrote: the upgrade is one
            # transaction on a connection of its own, then this one reads the upgraded tables.
            try:
                writer = sqlite3.connect(self.path, isolation_level=None)
                try:
                    writer.execute("PRAGMA busy_timeout=10000")
                    _upgrade(writer)
                finally:
                    writer.close()
            except sqlite3.OperationalError as exc:
                raise StateError(f"{self.path}: state schema version {version} needs an upgrade to "
                                 f"{SCHEMA_VERSION}, which failed ({exc}); open it once writable "
                                 "(e.g. `fedvlm-coord serve`)") from exc

    def schema_version(self) -> int:
        """The schema version recorded in the database (0: written before versions were recorded)."""
        return self._one("PRAGMA user_version")[0]

    def close(self) -> None:
        """Write the pending heartbeats and close the connection; the state is unusable afterwards."""
        if not self._readonly:
            self.flush_heartbeats()
        with self._lock, self._readers_lock:
            self._db.close()
            for reader in self._readers or ():
                reader.close()

    # -- plumbing ------------------------------------------------------------------------------------------------
    @contextmanager
    def _tx(self, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One atomic transaction; rolled back on any exception. Fsync'd at commit unless not `durable` (then it
        is as atomic, and durable from the next durable commit on: the WAL is synced as a whole)."""
        with self._lock:
            if not durable:
                self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("BEGIN IMMEDIATE")
            self._local.in_tx = True
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            else:
                self._db.execute("COMMIT")
                for done in self._after_commit:
                    done()
            finally:
                self._after_commit.clear()
                self._local.in_tx = False
                if not durable:
                    self._db.execute("PRAGMA synchronous=FULL")

    def _all(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        if self._readers is None or getattr(self._local, "in_tx", False):  # a read inside a transition sees its writes
            with self._lock:
                return self._db.execute(sql, args).fetchall()
        return self._reader().execute(sql, args).fetchall()

    def _reader(self) -> sqlite3.Connection:
        """This thread's read connection (opened on first use, closed by `close`)."""
        reader = getattr(self._local, "reader", None)
        if reader is None:
            reader = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            reader.row_factory = sqlite3.Row
            reader.execute("PRAGMA busy_timeout=10000")
            reader.execute("PRAGMA query_only=1")
            with self._readers_lock:
                self._readers.append(reader)
            self._local.reader = reader
        return reader

    def _one(self, sql: str, args: tuple = ()) -> sqlite3.Row | None:
        rows = self._all(sql, args)
        return rows[0] if rows else None

    def _audit(self, db: sqlite3.Connection, entry: dict[str, Any]) -> str:
        """Append to the hash chain inside the caller's transaction; returns the new link."""
        row = db.execute("SELECT hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        prev = row["hash"] if row else GENESIS
        text = _canonical({"at": round(self.now(), 3), **entry})
        link = audit_hash(prev, text)
        db.execute("INSERT INTO audit(entry_json, prev_hash, hash) VALUES (?, ?, ?)", (text, prev, link))
        return link

    # -- the federation --------------------------------------------------------------------------------------------
    def init_federation(self, federation_id: str, ca_fingerprint: str) -> None:
        """Record a new federation's id and open its audit chain with the CA's fingerprint."""
        with self._tx() as db:
            db.execute("INSERT INTO meta(key, value) VALUES ('federation_id', ?)", (federation_id,))
            self._audit(db, {"kind": "init", "federation_id": federation_id, "ca": ca_fingerprint})

    def federation_id(self) -> str | None:
        """The id `init_federation` recorded (None in a database that has none)."""
        row = self._one("SELECT value FROM meta WHERE key='federation_id'")
        return row["value"] if row else None

    def set_dashboard_token(self, token_sha256: str) -> None:
        """The web dashboard accepts, from now on, only the token with this SHA-256 (the token is never stored)."""
        with self._tx() as db:
            db.execute("INSERT INTO meta(key, value) VALUES ('dashboard_token_sha256', ?) "
                       "ON CONFLICT(key) DO UPDATE SET value=excluded.value", (token_sha256,))
            self._audit(db, {"kind": "dashboard_token"})

    def dashboard_token_sha256(self) -> str | None:
        """The SHA-256 of the dashboard token (None: no token was ever issued)."""
        row = self._one("SELECT value FROM meta WHERE key='dashboard_token_sha256'")
        return row["value"] if row else None

    # -- enrollment and sites ------------------------------------------------------------------------------------
    def issue_token(self, token_id: str, name: str, proof_key: bytes, expires_at: float) -> None:
        """Store a new join token for site `name` (only its proof key, never the secret)."""
        with self._tx() as db:
            db.execute("INSERT INTO tokens(token_id, name, proof_key, expires_at, created_at) VALUES (?,?,?,?,?)",
                       (token_id, name, proof_key, expires_at, self.now()))
            self._audit(db, {"kind": "token", "name": name, "token_id": token_id, "expires_at": expires_at})

    def token(self, token_id: str) -> Token | None:
        """The join token with this id, used or not."""
        row = self._one("SELECT * FROM tokens WHERE token_id=?", (token_id,))
        return Token(row["token_id"], row["name"], row["proof_key"], row["expires_at"], row["created_at"],
                     row["used_at"]) if row else None

    def enroll_client(self, token_id: str, name: str, cert_fingerprint: str) -> bool:
        """Mark the token used and record `cert_fingerprint` as the only certificate site `name` may use (a
        re-enrolled site's old certificate stops working). False, and nothing changed, if the token was used."""
        now = self.now()
        with self._tx() as db:
            claimed = db.execute("UPDATE tokens SET used_at=? WHERE token_id=? AND used_at IS NULL",
                                 (now, token_id)).rowcount
            if claimed != 1:
                return False
            self._write_heartbeats(db)  # the old certificate's last heartbeats, then the new certificate
            db.execute("INSERT INTO clients(name, cert_fingerprint, enrolled_at) VALUES (?,?,?) "
                       "ON CONFLICT(name) DO UPDATE SET cert_fingerprint=excluded.cert_fingerprint, "
                       "enrolled_at=excluded.enrolled_at", (name, cert_fingerprint, now))
            self._audit(db, {"kind": "enroll", "name": name, "cert": cert_fingerprint})
        return True

    def revoke_client(self, name: str) -> bool:
        """Refuse site `name` from now on; False if no such site is enrolled."""
        with self._tx() as db:
            self._write_heartbeats(db)  # those accepted before the revocation are kept
            changed = db.execute("UPDATE clients SET revoked=1 WHERE name=?", (name,)).rowcount
            if changed:
                self._audit(db, {"kind": "revoke", "name": name})
        return bool(changed)

    def client(self, name: str) -> Client | None:
        """The enrolled site `name`, revoked or not (with its last accepted heartbeat, written or pending)."""
        row = self._one("SELECT * FROM clients WHERE name=?", (name,))
        return self._heartbeats.overlay(_client(row)) if row else None

    def clients(self) -> list[Client]:
        """Every enrolled site, by name (with its last accepted heartbeat, written or pending)."""
        return [self._heartbeats.overlay(_client(row)) for row in self._all("SELECT * FROM clients ORDER BY name")]

    def record_heartbeat(self, name: str, activity: Activity, detail: str, bytes_done: int, bytes_total: int,
                         run_id: str | None = None, step: int = 0, steps_total: int = 0) -> bool:
        """Site `name` reported what it is doing (for run `run_id`; training step k of n), now, whatever certificate
        it uses (a site's Poll goes through `poll`, which checks it). True if such a site is enrolled."""
        if self._one("SELECT 1 FROM clients WHERE name=?", (name,)) is None:
            return False
        self._queue_heartbeat(name, activity, detail, bytes_done, bytes_total, run_id, step, steps_total, None)
        return True

    def poll(self, name: str, fingerprint: str, activity: Activity, detail: str, bytes_done: int, bytes_total: int,
             run_id: str | None = None, step: int = 0, steps_total: int = 0) -> PollView:
        """A site's Poll: its `poll_view`, and its heartbeat (as `record_heartbeat`) if the view says `name` is
        enrolled with certificate `fingerprint` and not revoked; otherwise nothing is recorded."""
        view = self.poll_view(name)
        if view.cert_fingerprint == fingerprint and not view.revoked:
            self._queue_heartbeat(name, activity, detail, bytes_done, bytes_total, run_id, step, steps_total,
                                  fingerprint)
        return view

    def _queue_heartbeat(self, name: str, activity: Activity, detail: str, bytes_done: int, bytes_total: int,
                         run_id: str | None, step: int, steps_total: int, fingerprint: str | None) -> None:
        """Accepted heartbeats are kept in memory, the newest per site, and written in one batch by
        `flush_heartbeats` (the daemon calls it every server.HEARTBEAT_FLUSH_SECONDS; `live_clients`, `close`,
        enrollment and revocation call it too): a Poll neither takes the writer's lock nor waits behind a durable
        transition. This process's reads (`client`, `clients`) include the pending ones. A killed coordinator
        loses the heartbeats of its last flush period (sites poll again within a second); the batch is not
        fsync'd on its own (the next durable transition's fsync covers it), so a power loss may lose last-seen
        times a few seconds old."""
        self._heartbeats.put(name, Heartbeat(activity, detail, bytes_done, bytes_total, self.now(), run_id or None,
                                             step, steps_total, fingerprint))

    def poll_view(self, name: str) -> PollView:
        """Site `name`'s PollView, in one statement: under load every SQLite call costs a wait for the GIL (it is
        released around each step), so a Poll's five reads cost five such waits (docs/performance.md, section 6)."""
        row = self._one(POLL_VIEW, (name, name))
        run = _run(row) if row["run_id"] is not None else None
        return PollView(row["c_fingerprint"], bool(row["c_revoked"]), run,
                        _round(row, "r_") if row["r_phase"] is not None else None,
                        AssignmentState(row["a_state"]) if row["a_state"] is not None else None,
                        _global(row, "g_") if row["g_digest"] is not None else None)

    def flush_heartbeats(self) -> int:
        """Write the pending heartbeats in one (non-fsync'd) transaction; returns how many there were."""
        if not self._heartbeats:
            return 0
        with self._tx(durable=False) as db:
            return self._write_heartbeats(db)

    def _write_heartbeats(self, db: sqlite3.Connection) -> int:
        """The pending heartbeats, written inside the caller's transaction (none for a revoked site, each only for
        the certificate it came with); they stop being pending when it commits."""
        batch = self._heartbeats.batch()
        rows = [(b.activity.value, b.detail, b.bytes_done, b.bytes_total, b.last_seen, b.run_id, b.step,
                 b.steps_total, name, b.fingerprint, b.fingerprint) for name, b in batch.items()]
        db.executemany("UPDATE clients SET state=?, detail=?, bytes_done=?, bytes_total=?, last_seen=?, run_id=?, "
                       "step=?, steps_total=? WHERE name=? AND revoked=0 AND (? IS NULL OR cert_fingerprint=?)",
                       rows)
        self._after_commit.append(lambda: self._heartbeats.written(batch))
        return len(rows)

    def record_failure(self, name: str, reason: str, run_id: str | None) -> None:
        """Site `name`'s agent stopped on an error: it is failed, with its one-line `reason`, until it polls again.
        Written at once."""
        if self.record_heartbeat(name, Activity.FAILED, reason, 0, 0, run_id):
            self.flush_heartbeats()

    def live_clients(self, heartbeat_timeout: float) -> list[str]:
        """Sites not revoked that polled within `heartbeat_timeout` seconds, by name."""
        self.flush_heartbeats()
        rows = self._all("SELECT name FROM clients WHERE revoked=0 AND last_seen IS NOT NULL AND last_seen>=? "
                         "ORDER BY name", (self.now() - heartbeat_timeout,))
        return [r["name"] for r in rows]

    # -- runs ------------------------------------------------------------------------------------------------------
    def current_run(self) -> Run | None:
        """The newest run (whatever its state)."""
        row = self._one(f"SELECT {RUN_COLUMNS} FROM runs ORDER BY rowid DESC LIMIT 1")
        return _run(row) if row else None

    def run(self, run_id: str) -> Run | None:
        """The run with this id."""
        row = self._one(f"SELECT {RUN_COLUMNS} FROM runs WHERE run_id=?", (run_id,))
        return _run(row) if row else None

    def runs(self) -> list[Run]:
        """Every run of the federation, oldest first (their `number`s are 1, 2, ...)."""
        return [_run(row) for row in self._all(f"SELECT {RUN_COLUMNS} FROM runs ORDER BY rowid")]

    def create_run(self, run_id: str, config: RunConfig, task: TaskSpec,
                   config_source: str = CONFIG_FROM_FEDERATION_TOML) -> Run:
        """A new run in state init: it waits for a site to provide the initial adapter, and becomes the current run.
        Refused (TransitionRefused, nothing written) while the current run is still active."""
        task_json = task.to_json()
        with self._tx() as db:
            row = db.execute(f"SELECT {RUN_COLUMNS} FROM runs ORDER BY rowid DESC LIMIT 1").fetchone()
            if row is not None and RunState(row["state"]).active:
                raise TransitionRefused(f"run {row['number']} ({row['run_id']}) is {row['state']}: stop it first "
                                        "(`fedvlm-coord run stop`) or wait until it is done")
            db.execute("INSERT INTO runs(run_id, config_json, task_json, state, round, created_at, config_source)"
                       " VALUES (?,?,?,?,?,?,?)", (run_id, json.dumps(asdict(config), sort_keys=True), task_json,
                                                   RunState.INIT.value, 0, self.now(), config_source))
            self._audit(db, {"kind": "run", "run_id": run_id, "task": task_json,
                             "config": json.dumps(asdict(config), sort_keys=True), "source": config_source})
        return self.run(run_id)

    def stop_run(self, run_id: str, reason: str) -> Run:
        """An active run stops for good (its open round takes no more updates; sites are told it is over), with the
        operator's `reason`. Refused (TransitionRefused) if the run is unknown or already done or stopped."""
        now = self.now()
        with self._tx() as db:
            row = db.execute("SELECT state FROM runs WHERE run_id=?", (run_id,)).fetchone()
            if row is None:
                raise TransitionRefused(f"no run {run_id}")
            if not RunState(row["state"]).active:
                raise TransitionRefused(f"run {run_id} is already {row['state']}")
            db.execute("UPDATE runs SET state=?, finished_at=?, stop_reason=? WHERE run_id=?",
                       (RunState.STOPPED.value, now, reason, run_id))
            db.execute("UPDATE rounds SET finished_at=? WHERE run_id=? AND finished_at IS NULL", (now, run_id))
            self._audit(db, {"kind": "run_stopped", "run_id": run_id, "reason": reason})
        return self.run(run_id)

    def claim_init(self, run_id: str, client: str) -> Run:
        """Site `client` becomes the provider of the initial adapter unless another one already is; returns the
        run as it is afterwards."""
        with self._tx() as db:
            db.execute("UPDATE runs SET init_client=? WHERE run_id=? AND init_client IS NULL", (client, run_id))
        return self.run(run_id)

    def release_init(self, run_id: str) -> None:
        """The site chosen for the initial adapter went away: the next site to poll may claim it."""
        with self._tx() as db:
            db.execute("UPDATE runs SET init_client=NULL WHERE run_id=?", (run_id,))

    def publish_initial_global(self, run_id: str, record: GlobalRecord, signature: bytes, server_state: ServerStateRef,
                               schema_json: str, adapter_config: str | None) -> None:
        """The initial adapter becomes global 0, fixing the run's schema: the run is running and round 1 waits."""
        with self._tx() as db:
            self._insert_global(db, record, signature)
            db.execute("UPDATE runs SET state=?, round=1, schema_json=?, adapter_config=?, server_state=? "
                       "WHERE run_id=?", (RunState.RUNNING.value, schema_json, adapter_config,
                                          server_state.to_json(), run_id))
            self._insert_round(db, run_id, 1, RoundPhase.WAITING, record.digest)

    def finish_run(self, run_id: str, evaluation_round: int) -> None:
        """The final evaluation is over (every site reported, or its deadline passed): the run is done."""
        now = self.now()
        with self._tx() as db:
            db.execute("UPDATE rounds SET phase=?, finished_at=? WHERE run_id=? AND round=?",
                       (RoundPhase.DONE.value, now, run_id, evaluation_round))
            db.execute("UPDATE runs SET state=?, round=?, finished_at=? WHERE run_id=?",
                       (RunState.DONE.value, evaluation_round - 1, now, run_id))
            self._audit(db, {"kind": "run_done", "run_id": run_id})

    # -- rounds ----------------------------------------------------------------------------------------------------
    def round(self, run_id: str, number: int) -> Round | None:
        """Round `number` of the run (the final evaluation is the round after the last)."""
        row = self._one("SELECT * FROM rounds WHERE run_id=? AND round=?", (run_id, number))
        return _round(row) if row else None

    def assignments(self, run_id: str, number: int) -> dict[str, AssignmentState]:
        """Site -> its state, for every site sampled in the round (every attempt)."""
        rows = self._all("SELECT client, state FROM assignments WHERE run_id=? AND round=?", (run_id, number))
        return {r["client"]: AssignmentState(r["state"]) for r in rows}

    def assignment(self, run_id: str, number: int, client: str) -> AssignmentState | None:
        """The site's state in the round; None if it was never sampled."""
        row = self._one("SELECT state FROM assignments WHERE run_id=? AND round=? AND client=?",
                        (run_id, number, client))
        return AssignmentState(row["state"]) if row else None

    def open_round(self, run_id: str, number: int, sampled: Sequence[str], deadline: float) -> None:
        """The sampled sites are assigned and the round collects their updates until `deadline` (waiting ->
        training). A site sampled again (after a reopen) is assigned afresh."""
        with self._tx() as db:
            for name in sampled:
                db.execute("INSERT OR REPLACE INTO assignments(run_id, round, client, state) VALUES (?,?,?,?)",
                           (run_id, number, name, AssignmentState.ASSIGNED.value))
            db.execute("UPDATE rounds SET phase=?, deadline=? WHERE run_id=? AND round=?",
                       (RoundPhase.TRAINING.value, deadline, run_id, number))

    def mark_late(self, run_id: str, number: int, clients: Sequence[str]) -> None:
        """The deadline passed before these assigned sites' updates arrived: their updates are refused from now."""
        with self._tx() as db:
            self._mark_late(db, run_id, number, clients)

    def reopen_round(self, run_id: str, number: int, late: Sequence[str]) -> None:
        """The deadline passed without a quorum: `late` are marked late and the round goes back to waiting for a
        new sample (attempt + 1); accepted updates are kept."""
        with self._tx() as db:
            self._mark_late(db, run_id, number, late)
            db.execute("UPDATE rounds SET phase=?, attempt=attempt+1, deadline=NULL WHERE run_id=? AND round=?",
                       (RoundPhase.WAITING.value, run_id, number))

    def publish_global(self, run_id: str, number: int, record: GlobalRecord, signature: bytes,
                       server_state: ServerStateRef, server_metrics: dict[str, float], then: Next,
                       evaluators: Sequence[str] = (), eval_deadline: float | None = None) -> None:
        """Round `number` is aggregated: its signed global and the server state after it are recorded (with the
        server step's metrics) and the round is done; then, in the same transaction, the next round waits
        (`Next.ROUND`), or the final evaluation asks `evaluators` until `eval_deadline`, or the run is done."""
        now = self.now()
        with self._tx() as db:
            self._insert_global(db, record, signature)
            db.execute("UPDATE runs SET server_state=? WHERE run_id=?", (server_state.to_json(), run_id))
            if server_metrics:
                self._insert_metrics(db, run_id, number, COORDINATOR, MetricsKind.SERVER, record.digest,
                                     server_metrics)
            db.execute("UPDATE rounds SET phase=?, finished_at=?, global_digest=? WHERE run_id=? AND round=?",
                       (RoundPhase.DONE.value, now, record.digest, run_id, number))
            if then is Next.ROUND:
                db.execute("UPDATE runs SET round=? WHERE run_id=?", (number + 1, run_id))
                self._insert_round(db, run_id, number + 1, RoundPhase.WAITING, record.digest)
            elif then is Next.FINAL_EVALUATION:
                db.execute("UPDATE runs SET state=?, round=? WHERE run_id=?",
                           (RunState.EVALUATING.value, number + 1, run_id))
                self._insert_round(db, run_id, number + 1, RoundPhase.EVALUATING, record.digest, eval_deadline)
                for name in evaluators:
                    db.execute("INSERT INTO assignments(run_id, round, client, state) VALUES (?,?,?,?)",
                               (run_id, number + 1, name, AssignmentState.ASSIGNED.value))
            else:
                db.execute("UPDATE runs SET state=?, finished_at=? WHERE run_id=?", (RunState.DONE.value, now, run_id))

    def _insert_round(self, db: sqlite3.Connection, run_id: str, number: int, phase: RoundPhase, base_digest: str,
                      deadline: float | None = None) -> None:
        db.execute("INSERT INTO rounds(run_id, round, phase, base_digest, deadline, started_at) VALUES (?,?,?,?,?,?)",
                   (run_id, number, phase.value, base_digest, deadline, self.now()))

    def _mark_late(self, db: sqlite3.Connection, run_id: str, number: int, clients: Sequence[str]) -> None:
        for name in clients:
            db.execute("UPDATE assignments SET state=? WHERE run_id=? AND round=? AND client=?",
                       (AssignmentState.LATE.value, run_id, number, name))

    def _insert_global(self, db: sqlite3.Connection, record: GlobalRecord, signature: bytes) -> None:
        """A signed global version and its audit entry."""
        db.execute("INSERT OR REPLACE INTO globals(digest, run_id, round, size, record_json, signature, created_at)"
                   " VALUES (?,?,?,?,?,?,?)", (record.digest, record.run_id, record.round, record.size,
                                               record.to_json(), signature, record.created_at))
        self._audit(db, {"kind": "global", "record": record.to_json(), "signature": signature.hex()})

    # -- uploads and updates ---------------------------------------------------------------------------------------
    def nonce_used(self, nonce: str) -> bool:
        """Whether an accepted update already carried this manifest nonce."""
        return self._one("SELECT 1 FROM nonces WHERE nonce=?", (nonce,)) is not None

    def upload(self, upload_id: str) -> Upload | None:
        """The partial upload with this id (None once accepted or discarded)."""
        row = self._one("SELECT * FROM uploads WHERE upload_id=?", (upload_id,))
        return _upload(row) if row else None

    def upload_by_nonce(self, nonce: str) -> Upload | None:
        """The partial upload announced with this manifest nonce."""
        row = self._one("SELECT * FROM uploads WHERE nonce=?", (nonce,))
        return _upload(row) if row else None

    def uploads(self, run_id: str, number: int) -> list[Upload]:
        """The partial uploads of a round."""
        return [_upload(r) for r in self._all("SELECT * FROM uploads WHERE run_id=? AND round=?", (run_id, number))]

    def all_uploads(self) -> list[Upload]:
        """Every partial upload, oldest first."""
        return [_upload(r) for r in self._all("SELECT * FROM uploads ORDER BY created_at")]

    def announce_upload(self, upload_id: str, manifest: UpdateManifest, manifest_json: str,
                        signature: bytes) -> Upload:
        """A partial upload for a checked, signed manifest, with nothing received yet."""
        with self._tx() as db:
            db.execute("INSERT INTO uploads(upload_id, run_id, round, client, nonce, manifest_json, signature, size,"
                       " sha256, received, created_at) VALUES (?,?,?,?,?,?,?,?,?,0,?)",
                       (upload_id, manifest.run_id, manifest.round, manifest.client, manifest.nonce, manifest_json,
                        signature, manifest.size, manifest.sha256, self.now()))
        return self.upload(upload_id)

    def checkpoint_upload(self, upload_id: str, received: int) -> None:
        """The first `received` bytes of the upload's part file are durable (a resume starts there)."""
        with self._tx() as db:
            db.execute("UPDATE uploads SET received=? WHERE upload_id=?", (received, upload_id))

    def discard_upload(self, upload_id: str) -> None:
        """Forget a partial upload (its part file is the caller's to delete)."""
        with self._tx() as db:
            db.execute("DELETE FROM uploads WHERE upload_id=?", (upload_id,))

    def accept_update(self, upload_id: str, digest: str) -> Update:
        """The complete, verified upload becomes an accepted update (its blob `digest` is durable): its nonce is
        spent, its site's assignment is accepted and the partial upload is gone, all at once."""
        now = self.now()
        with self._tx() as db:
            upload = _upload(db.execute("SELECT * FROM uploads WHERE upload_id=?", (upload_id,)).fetchone())
            manifest = UpdateManifest.from_json(upload.manifest_json)
            db.execute("INSERT INTO updates(run_id, round, client, digest, num_examples, manifest_json, signature,"
                       " accepted_at) VALUES (?,?,?,?,?,?,?,?)",
                       (upload.run_id, upload.round, upload.client, digest, manifest.num_examples,
                        upload.manifest_json, upload.signature, now))
            db.execute("INSERT INTO nonces(nonce, client, used_at) VALUES (?,?,?)", (upload.nonce, upload.client, now))
            db.execute("UPDATE assignments SET state=? WHERE run_id=? AND round=? AND client=?",
                       (AssignmentState.ACCEPTED.value, upload.run_id, upload.round, upload.client))
            db.execute("DELETE FROM uploads WHERE upload_id=?", (upload_id,))
        return Update(upload.run_id, upload.round, upload.client, digest, manifest.num_examples,
                      upload.manifest_json, upload.signature, now)

    def accepted_updates(self, run_id: str, number: int) -> list[Update]:
        """Accepted updates of a round, in client-name order (so aggregation is deterministic)."""
        rows = self._all("SELECT * FROM updates WHERE run_id=? AND round=? ORDER BY client", (run_id, number))
        return [Update(r["run_id"], r["round"], r["client"], r["digest"], r["num_examples"], r["manifest_json"],
                       r["signature"], r["accepted_at"]) for r in rows]

    def initial_update(self, run_id: str) -> Update | None:
        """The accepted initial adapter of a run (round 0), if any."""
        updates = self.accepted_updates(run_id, 0)
        return updates[0] if updates else None

    def update_counts(self, run_id: str) -> dict[int, int]:
        """Round -> number of accepted updates."""
        rows = self._all("SELECT round, COUNT(*) AS n FROM updates WHERE run_id=? GROUP BY round", (run_id,))
        return {r["round"]: r["n"] for r in rows}

    # -- globals ---------------------------------------------------------------------------------------------------
    def global_version(self, run_id: str, number: int) -> GlobalVersion | None:
        """The global published for round `number` of the run (0: the initial adapter)."""
        row = self._one("SELECT * FROM globals WHERE run_id=? AND round=?", (run_id, number))
        return _global(row) if row else None

    def global_by_digest(self, digest: str) -> GlobalVersion | None:
        """The newest global version with these bytes."""
        row = self._one("SELECT * FROM globals WHERE digest=? ORDER BY created_at DESC LIMIT 1", (digest,))
        return _global(row) if row else None

    def latest_global(self, run_id: str) -> GlobalVersion | None:
        """The run's global of the highest round."""
        row = self._one("SELECT * FROM globals WHERE run_id=? ORDER BY round DESC LIMIT 1", (run_id,))
        return _global(row) if row else None

    def globals(self, run_id: str) -> list[GlobalVersion]:
        """Every global version of a run, by round."""
        return [_global(r) for r in self._all("SELECT * FROM globals WHERE run_id=? ORDER BY round", (run_id,))]

    # -- metrics ---------------------------------------------------------------------------------------------------
    def record_metrics(self, run_id: str, number: int, client: str, kind: MetricsKind, global_digest: str,
                       metrics: dict[str, float]) -> None:
        """A site's metrics for a round (a report for the same round and kind replaces the earlier one); they
        also become the site's last metrics."""
        with self._tx() as db:
            self._insert_metrics(db, run_id, number, client, kind, global_digest, metrics)
            db.execute("UPDATE clients SET last_metrics=? WHERE name=?", (json.dumps(metrics, sort_keys=True), client))

    def metrics(self, run_id: str, kind: MetricsKind, number: int | None = None) -> list[MetricsReport]:
        """The metrics rows of a run of one kind (of one round if `number` is given)."""
        sql, args = "SELECT * FROM metrics WHERE run_id=? AND kind=?", (run_id, kind.value)
        if number is not None:
            sql, args = sql + " AND round=?", (*args, number)
        return [MetricsReport(r["run_id"], r["round"], r["client"], MetricsKind(r["kind"]), r["global_digest"],
                              json.loads(r["metrics_json"]), r["reported_at"]) for r in self._all(sql, args)]

    def _insert_metrics(self, db: sqlite3.Connection, run_id: str, number: int, client: str, kind: MetricsKind,
                        global_digest: str, metrics: dict[str, float]) -> None:
        db.execute("INSERT OR REPLACE INTO metrics(run_id, round, client, kind, global_digest, metrics_json,"
                   " reported_at) VALUES (?,?,?,?,?,?,?)",
                   (run_id, number, client, kind.value, global_digest, json.dumps(metrics, sort_keys=True),
                    self.now()))

    # -- secure aggregation (coordinator/secagg_phase.py) ----------------------------------------------------------
    def secagg_round(self, run_id: str, number: int, attempt: int) -> SecAggRound | None:
        """The secure-aggregation attempt `attempt` of round `number`."""
        row = self._one("SELECT * FROM secagg_rounds WHERE run_id=? AND round=? AND attempt=?",
                        (run_id, number, attempt))
        return _secagg_round(row) if row else None

    def open_secagg(self, run_id: str, number: int, attempt: int, threshold: int, deadline: float) -> SecAggRound:
        """Attempt `attempt` of the round collects its sampled sites' keys until `deadline` (no-op if it exists)."""
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO secagg_rounds(run_id, round, attempt, phase, threshold, deadline) "
                       "VALUES (?,?,?,?,?,?)", (run_id, number, attempt, SecAggPhase.KEYS.value, threshold, deadline))
        return self.secagg_round(run_id, number, attempt)

    def record_secagg_keys(self, run_id: str, number: int, attempt: int, client: str, advertisement_json: str,
                           signature: bytes, cert_pem: bytes) -> None:
        """A sampled site's signed keys (refused unless the attempt collects keys; a site advertises once)."""
        with self._tx() as db:
            self._secagg_in(db, run_id, number, attempt, SecAggPhase.KEYS)
            row = db.execute("SELECT advertisement_json FROM secagg_keys WHERE run_id=? AND round=? AND attempt=? "
                             "AND client=?", (run_id, number, attempt, client)).fetchone()
            if row is not None:
                if row["advertisement_json"] != advertisement_json:
                    raise TransitionRefused(f"{client} already advertised other keys in this attempt")
                return
            db.execute("INSERT INTO secagg_keys(run_id, round, attempt, client, advertisement_json, signature, "
                       "cert_pem) VALUES (?,?,?,?,?,?,?)",
                       (run_id, number, attempt, client, advertisement_json, signature, cert_pem))

    def secagg_keys(self, run_id: str, number: int, attempt: int) -> list[SecAggKeys]:
        """The keys advertised in the attempt, by site name."""
        rows = self._all("SELECT * FROM secagg_keys WHERE run_id=? AND round=? AND attempt=? ORDER BY client",
                         (run_id, number, attempt))
        return [SecAggKeys(r["client"], r["advertisement_json"], r["signature"], r["cert_pem"]) for r in rows]

    def record_secagg_shares(self, run_id: str, number: int, attempt: int, owner: str,
                             shares: dict[str, bytes]) -> None:
        """Site `owner`'s encrypted shares, holder -> ciphertext (refused unless the attempt collects shares)."""
        with self._tx() as db:
            self._secagg_in(db, run_id, number, attempt, SecAggPhase.SHARES)
            db.execute("DELETE FROM secagg_shares WHERE run_id=? AND round=? AND attempt=? AND owner=?",
                       (run_id, number, attempt, owner))
            for holder, blob in sorted(shares.items()):
                db.execute("INSERT INTO secagg_shares(run_id, round, attempt, owner, holder, ciphertext) "
                           "VALUES (?,?,?,?,?,?)", (run_id, number, attempt, owner, holder, blob))

    def secagg_sharers(self, run_id: str, number: int, attempt: int) -> list[str]:
        """The sites that sent their shares in the attempt, by name."""
        rows = self._all("SELECT DISTINCT owner FROM secagg_shares WHERE run_id=? AND round=? AND attempt=? "
                         "ORDER BY owner", (run_id, number, attempt))
        return [r["owner"] for r in rows]

    def secagg_shares_for(self, run_id: str, number: int, attempt: int, holder: str,
                          owners: Sequence[str]) -> dict[str, bytes]:
        """Owner -> the ciphertext it encrypted to `holder`, for the given owners."""
        rows = self._all("SELECT owner, ciphertext FROM secagg_shares WHERE run_id=? AND round=? AND attempt=? "
                         "AND holder=?", (run_id, number, attempt, holder))
        return {r["owner"]: r["ciphertext"] for r in rows if r["owner"] in set(owners)}

    def record_secagg_reveal(self, run_id: str, number: int, attempt: int, client: str, reveal_json: str) -> None:
        """A survivor's revealed shares (refused unless the attempt unmasks; a site reveals once)."""
        with self._tx() as db:
            self._secagg_in(db, run_id, number, attempt, SecAggPhase.UNMASK)
            db.execute("INSERT OR IGNORE INTO secagg_reveals(run_id, round, attempt, client, reveal_json) "
                       "VALUES (?,?,?,?,?)", (run_id, number, attempt, client, reveal_json))

    def secagg_reveals(self, run_id: str, number: int, attempt: int) -> dict[str, str]:
        """Site -> its revealed shares (JSON) in the attempt."""
        rows = self._all("SELECT client, reveal_json FROM secagg_reveals WHERE run_id=? AND round=? AND attempt=?",
                         (run_id, number, attempt))
        return {r["client"]: r["reveal_json"] for r in rows}

    def advance_secagg(self, run_id: str, number: int, attempt: int, phase: SecAggPhase, to: SecAggPhase,
                       sites: Sequence[str], deadline: float | None, late: Sequence[str] = ()) -> None:
        """`phase` -> `to`, fixing the site list `to` works on (shares: the key set; masked: the sharers;
        unmask: the survivors, the other sharers being the dropped), setting the sub-phase's `deadline` (None: the
        round's) and marking `late` sites late, at once."""
        column = {SecAggPhase.SHARES: "sites_json", SecAggPhase.MASKED: "sharers_json",
                  SecAggPhase.UNMASK: "survivors_json"}[to]
        with self._tx() as db:
            current = self._secagg_in(db, run_id, number, attempt, phase)
            db.execute(f"UPDATE secagg_rounds SET phase=?, {column}=?, deadline=? WHERE run_id=? AND round=? "
                       "AND attempt=?", (to.value, json.dumps(sorted(sites)), deadline, run_id, number, attempt))
            if to is SecAggPhase.UNMASK:
                dropped = sorted(set(current.sharers) - set(sites))
                db.execute("UPDATE secagg_rounds SET dropped_json=? WHERE run_id=? AND round=? AND attempt=?",
                           (json.dumps(dropped), run_id, number, attempt))
            self._mark_late(db, run_id, number, late)

    def restart_secagg_round(self, run_id: str, number: int, attempt: int, reason: str) -> None:
        """The attempt cannot finish: it is abandoned with `reason`, its masked updates (useless without its
        unmasking) and partial uploads are dropped, and the round samples again (attempt + 1), all at once."""
        with self._tx() as db:
            db.execute("UPDATE secagg_rounds SET phase=?, reason=? WHERE run_id=? AND round=? AND attempt=?",
                       (SecAggPhase.ABANDONED.value, reason, run_id, number, attempt))
            for table in ("updates", "uploads", "assignments"):
                db.execute(f"DELETE FROM {table} WHERE run_id=? AND round=?", (run_id, number))
            db.execute("UPDATE rounds SET phase=?, attempt=attempt+1, deadline=NULL WHERE run_id=? AND round=?",
                       (RoundPhase.WAITING.value, run_id, number))

    def _secagg_in(self, db: sqlite3.Connection, run_id: str, number: int, attempt: int,
                   phase: SecAggPhase) -> SecAggRound:
        row = db.execute("SELECT * FROM secagg_rounds WHERE run_id=? AND round=? AND attempt=?",
                         (run_id, number, attempt)).fetchone()
        if row is None or row["phase"] != phase.value:
            raise TransitionRefused(f"round {number} attempt {attempt} is not in secure-aggregation phase {phase}"
                                    f" (it is {row['phase'] if row else 'not open'})")
        return _secagg_round(row)

    # -- audit -----------------------------------------------------------------------------------------------------
    def audit_entries(self) -> list[AuditEntry]:
        """The whole audit chain, oldest first."""
        return [AuditEntry(r["seq"], r["entry_json"], r["prev_hash"], r["hash"])
                for r in self._all("SELECT * FROM audit ORDER BY seq")]

    def audit_head(self) -> str | None:
        """The newest link of the audit chain (None while it is empty)."""
        row = self._one("SELECT hash FROM audit ORDER BY seq DESC LIMIT 1")
        return row["hash"] if row else None


def _upgrade(db: sqlite3.Connection) -> None:
    """Bring a database of any known version (0 = an empty file, too) to SCHEMA_VERSION, in one transaction."""
    if db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]  # again, under the lock: another process may have
        script = SCHEMA + "".join(UPGRADES[v] for v in range(max(version, 1) + 1, SCHEMA_VERSION + 1))
        for statement in filter(str.strip, script.split(";")):  # no statement holds a ";" of its own
            db.execute(statement)
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _run(row: sqlite3.Row) -> Run:
    server_state = ServerStateRef.from_json(row["server_state"]) if row["server_state"] else None
    return Run(row["run_id"], RunState(row["state"]), row["round"], row["init_client"], row["schema_json"],
               row["adapter_config"], from_table(RunConfig, json.loads(row["config_json"]), "run"), row["task_json"],
               server_state, row["number"], row["created_at"], row["finished_at"], row["stop_reason"],
               row["config_source"] or CONFIG_FROM_FEDERATION_TOML)


def _client(row: sqlite3.Row) -> Client:
    return Client(row["name"], row["cert_fingerprint"], row["enrolled_at"], bool(row["revoked"]),
                  Activity(row["state"]), row["detail"], row["bytes_done"], row["bytes_total"], row["last_seen"],
                  json.loads(row["last_metrics"]), row["run_id"], row["step"], row["steps_total"])


def _upload(row: sqlite3.Row) -> Upload:
    return Upload(row["upload_id"], row["run_id"], row["round"], row["client"], row["nonce"], row["manifest_json"],
                  row["signature"], row["size"], row["sha256"], row["received"], row["created_at"])


def _secagg_round(row: sqlite3.Row) -> SecAggRound:
    def names(column: str) -> tuple[str, ...]:
        return tuple(json.loads(row[column]))

    return SecAggRound(row["run_id"], row["round"], row["attempt"], SecAggPhase(row["phase"]), row["threshold"],
                       names("sites_json"), names("sharers_json"), names("survivors_json"), names("dropped_json"),
                       row["deadline"], row["reason"])


def _global(row: sqlite3.Row, prefix: str = "") -> GlobalVersion:
    """`prefix`: of the columns' names in `row` (a joined read such as POLL_VIEW)."""
    return GlobalVersion(row[prefix + "digest"], row[prefix + "run_id"], row[prefix + "round"], row[prefix + "size"],
                         row[prefix + "record_json"], row[prefix + "signature"], row[prefix + "created_at"])


def _round(row: sqlite3.Row, prefix: str = "") -> Round:
    """`prefix`: of the columns' names in `row` (a joined read such as POLL_VIEW)."""
    return Round(row[prefix + "run_id"], row[prefix + "round"], RoundPhase(row[prefix + "phase"]),
                 row[prefix + "attempt"], row[prefix + "base_digest"], row[prefix + "deadline"],
                 row[prefix + "started_at"], row[prefix + "finished_at"], row[prefix + "global_digest"])
