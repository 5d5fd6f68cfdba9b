"""The round state machine: the only writer of run and round phases.

    init --(initial adapter accepted)--> running: round r = waiting -> training -> (aggregate) -> round r+1 ...
         --(last round aggregated)--> evaluating (sites score the final global) --> done

Every transition is one SQLite transaction and `tick()` derives what to do from the stored state alone, so a
coordinator killed at any moment resumes where it stood: accepted updates stay accepted, an interrupted
aggregation is simply redone (it is deterministic), and sampled clients are not asked again.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import asdict

from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey

from fedvlm import adapters
from fedvlm.algorithms.base import Algorithm, ClientUpdate, build, next_global, sample_clients, split_aux
from fedvlm.security import signing
from fedvlm.security.signing import GlobalRecord
from fedvlm.spec import TaskSpec

from .blobs import BlobStore
from .config import FederationConfig
from .store import Run, Store

log = logging.getLogger(__name__)

COORDINATOR_METRICS_CLIENT = "@coordinator"  # metrics rows of the server step (e.g. DP epsilon), kind "server"


def algorithm_of(run: Run) -> Algorithm:
    """The run's federated optimisation algorithm, from its task spec."""
    return build(TaskSpec.from_json(run.task_json).algorithm)


class RoundDriver:
    """Advances the current run; call `tick()` periodically or after `wake()`."""

    def __init__(self, store: Store, blobs: BlobStore, config: FederationConfig, federation_id: str,
                 signer_key: EllipticCurvePrivateKey) -> None:
        self.store = store
        self.blobs = blobs
        self.config = config
        self.federation_id = federation_id
        self.signer_key = signer_key
        self._wakeup = threading.Event()
        self._tick_lock = threading.Lock()

    def ensure_run(self) -> Run:
        """The current run, created from the config on first start."""
        run = self.store.current_run()
        if run is not None:
            return run
        run_id = uuid.uuid4().hex[:12]
        with self.store.tx() as db:
            db.execute(
                "INSERT INTO runs(run_id, config_json, task_json, state, round, created_at) VALUES (?,?,?,?,?,?)",
                (run_id, json.dumps(asdict(self.config.run), sort_keys=True), self.config.task.to_json(), "init",
                 0, time.time()),
            )
            self.store.append_audit(db, {"kind": "run", "run_id": run_id, "task": self.config.task.to_json()})
        log.info("run %s created: %d rounds", run_id, self.config.run.rounds)
        return self.store.current_run()

    def wake(self) -> None:
        self._wakeup.set()

    def loop(self, stop: threading.Event, period: float = 0.25) -> None:
        """Tick until `stop` is set; errors are logged and retried, never fatal to the daemon."""
        while not stop.is_set():
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - the daemon must outlive a bad tick; it is logged with its trace
                log.exception("round driver tick failed; retrying")
            self._wakeup.wait(period)
            self._wakeup.clear()

    def tick(self) -> None:
        """Make every transition the stored state allows right now."""
        with self._tick_lock:
            for _ in range(8):  # a tick may chain several transitions (e.g. aggregate then open the next round)
                if not self._step():
                    return

    # -- transitions -------------------------------------------------------------------------------------------
    def _step(self) -> bool:
        run = self.store.current_run()
        if run is None or run.state == "done":
            return False
        if run.state == "init":
            return self._step_init(run)
        if run.state == "running":
            return self._step_round(run)
        if run.state == "evaluating":
            return self._step_final_eval(run)
        return False

    def _step_init(self, run: Run) -> bool:
        update = self.store.one("SELECT * FROM updates WHERE run_id=? AND round=0", (run.run_id,))
        if update is None:
            live = self.store.live_clients(self.config.run.heartbeat_timeout)
            if run.init_client and run.init_client not in live:
                with self.store.tx() as db:  # the chosen site went away: let another one provide the init
                    db.execute("UPDATE runs SET init_client=NULL WHERE run_id=?", (run.run_id,))
                return True
            return False
        path = self.blobs.path(update["digest"])
        tensors = dict(adapters.iter_file_tensors(path))
        schema = adapters.schema_to_json(adapters.schema_of(tensors))
        adapter_config = adapters.read_metadata(path).get(adapters.ADAPTER_CONFIG_METADATA)
        state_ref = self._put_server_state(run, 0, algorithm_of(run).initial_state(tensors))
        with self.store.tx() as db:
            self._publish_global(db, run, 0, update["digest"], parent="", contributors=[update["digest"]])
            db.execute("UPDATE runs SET server_state=? WHERE run_id=?", (state_ref, run.run_id))
            db.execute("UPDATE runs SET state='running', round=1, schema_json=?, adapter_config=? WHERE run_id=?",
                       (schema, adapter_config, run.run_id))
            db.execute("INSERT INTO rounds(run_id, round, phase, base_digest, started_at) VALUES (?,?,?,?,?)",
                       (run.run_id, 1, "waiting", update["digest"], time.time()))
        log.info("run %s: initial adapter from %s adopted as global 0 (%d tensors)", run.run_id,
                 update["client"], len(tensors))
        return True

    def _step_round(self, run: Run) -> bool:
        rnd = self.store.round(run.run_id, run.round)
        cfg = self.config.run
        states = self.store.assignments(run.run_id, run.round)
        accepted = sorted(c for c, s in states.items() if s == "accepted")
        if rnd.phase == "waiting":
            live = self.store.live_clients(cfg.heartbeat_timeout)
            candidates = [c for c in live if c not in accepted]
            need = cfg.clients_per_round - len(accepted)
            if len(live) < cfg.min_clients or len(candidates) < need:
                return False
            sampled = sample_clients(run.run_id, run.round, rnd.attempt, candidates, need)
            deadline = time.time() + cfg.round_deadline
            with self.store.tx() as db:
                for name in sampled:
                    db.execute("INSERT OR REPLACE INTO assignments(run_id, round, client, state) VALUES (?,?,?,?)",
                               (run.run_id, run.round, name, "assigned"))
                db.execute("UPDATE rounds SET phase='training', deadline=? WHERE run_id=? AND round=?",
                           (deadline, run.run_id, run.round))
            log.info("round %d/%d: sampled %s (deadline in %.0fs)", run.round, cfg.rounds, ", ".join(sampled),
                     cfg.round_deadline)
            return True
        if rnd.phase != "training":
            return False
        pending = [c for c, s in states.items() if s == "assigned"]
        past_deadline = time.time() >= (rnd.deadline or 0)
        if accepted and not pending:
            self._aggregate(run, rnd.base_digest, accepted)
            return True
        if not past_deadline:
            return False
        with self.store.tx() as db:
            for name in pending:
                db.execute("UPDATE assignments SET state='late' WHERE run_id=? AND round=? AND client=?",
                           (run.run_id, run.round, name))
            if len(accepted) < cfg.quorum:
                db.execute("UPDATE rounds SET phase='waiting', attempt=attempt+1, deadline=NULL "
                           "WHERE run_id=? AND round=?", (run.run_id, run.round))
        if len(accepted) >= cfg.quorum:
            log.info("round %d: deadline passed with %d/%d updates (quorum %d): aggregating", run.round,
                     len(accepted), len(states), cfg.quorum)
            self._aggregate(run, rnd.base_digest, accepted)
        else:
            log.warning("round %d: deadline passed with %d updates, quorum is %d: sampling again", run.round,
                        len(accepted), cfg.quorum)
        return True

    def _aggregate(self, run: Run, base_digest: str, accepted: list[str]) -> None:
        rows = self.store.accepted_updates(run.run_id, run.round)
        algorithm = algorithm_of(run)
        base, _ = split_aux(dict(adapters.iter_file_tensors(self.blobs.path(base_digest))))
        updates = [ClientUpdate(row["num_examples"], self._loader(row["digest"])) for row in rows]
        # The state saved with the previous global: a redone (interrupted) aggregation starts from the same state.
        result = algorithm.aggregate(base, updates, self._server_state(run, algorithm, base), run.round)
        merged = next_global(base, result)  # tensors no update carries (a frozen stage) keep the base's values
        metadata = {adapters.ADAPTER_CONFIG_METADATA: run.adapter_config} if run.adapter_config else None
        digest = self.blobs.put_bytes(adapters.to_bytes(merged, metadata))
        state_ref = self._put_server_state(run, run.round, result.state)
        last = run.round == self.config.run.rounds
        now = time.time()
        with self.store.tx() as db:
            self._publish_global(db, run, run.round, digest, parent=base_digest,
                                 contributors=[row["digest"] for row in rows])
            db.execute("UPDATE runs SET server_state=? WHERE run_id=?", (state_ref, run.run_id))
            if result.metrics:
                db.execute("INSERT OR REPLACE INTO metrics(run_id, round, client, kind, global_digest, metrics_json,"
                           " reported_at) VALUES (?,?,?,?,?,?,?)",
                           (run.run_id, run.round, COORDINATOR_METRICS_CLIENT, "server", digest,
                            json.dumps(result.metrics, sort_keys=True), now))
            db.execute("UPDATE rounds SET phase='done', finished_at=?, global_digest=? WHERE run_id=? AND round=?",
                       (now, digest, run.run_id, run.round))
            if not last:
                db.execute("UPDATE runs SET round=? WHERE run_id=?", (run.round + 1, run.run_id))
                db.execute("INSERT INTO rounds(run_id, round, phase, base_digest, started_at) VALUES (?,?,?,?,?)",
                           (run.run_id, run.round + 1, "waiting", digest, now))
            elif self.config.run.final_eval:
                targets = self.store.live_clients(self.config.run.heartbeat_timeout)
                db.execute("UPDATE runs SET state='evaluating', round=? WHERE run_id=?", (run.round + 1, run.run_id))
                db.execute("INSERT INTO rounds(run_id, round, phase, base_digest, deadline, started_at)"
                           " VALUES (?,?,?,?,?,?)",
                           (run.run_id, run.round + 1, "evaluating", digest, now + self.config.run.round_deadline,
                            now))
                for name in targets:
                    db.execute("INSERT INTO assignments(run_id, round, client, state) VALUES (?,?,?,?)",
                               (run.run_id, run.round + 1, name, "assigned"))
            else:
                db.execute("UPDATE runs SET state='done', finished_at=? WHERE run_id=?", (now, run.run_id))
        log.info("round %d/%d aggregated from %s -> global %s", run.round, self.config.run.rounds,
                 ", ".join(accepted), digest[:12])

    def _loader(self, digest: str):
        def load():
            return split_aux(dict(adapters.iter_file_tensors(self.blobs.path(digest))))
        return load

    def _server_state(self, run: Run, algorithm: Algorithm, base: dict) -> dict:
        """The server state stored with the latest global (a run created before states existed: a fresh one)."""
        if not run.server_state:
            return algorithm.initial_state(base)
        ref = json.loads(run.server_state)
        return adapters.from_bytes(self.blobs.read(ref["digest"])) if ref["digest"] else {}

    def _put_server_state(self, run: Run, number: int, state: dict) -> str:
        """Write the server state after round `number` as a content-addressed blob; returns the reference the
        caller records in runs.server_state in the same transaction as that round's global."""
        digest = self.blobs.put_bytes(adapters.to_bytes(state, {"fedvlm.run": run.run_id})) if state else ""
        return json.dumps({"round": number, "digest": digest}, sort_keys=True)

    def _step_final_eval(self, run: Run) -> bool:
        rnd = self.store.round(run.run_id, run.round)
        targets = self.store.assignments(run.run_id, run.round)
        reported = {r["client"] for r in self.store.query(
            "SELECT client FROM metrics WHERE run_id=? AND round=? AND kind='eval'", (run.run_id, run.round - 1))}
        if set(targets) - reported and time.time() < (rnd.deadline or 0):
            return False
        with self.store.tx() as db:
            db.execute("UPDATE rounds SET phase='done', finished_at=? WHERE run_id=? AND round=?",
                       (time.time(), run.run_id, run.round))
            db.execute("UPDATE runs SET state='done', round=?, finished_at=? WHERE run_id=?",
                       (run.round - 1, time.time(), run.run_id))
            self.store.append_audit(db, {"kind": "run_done", "run_id": run.run_id})
        log.info("run %s done", run.run_id)
        return True

    def _publish_global(self, db, run: Run, number: int, digest: str, parent: str, contributors: list[str]) -> None:
        """Sign a global version and append it to the audit chain, inside the caller's transaction."""
        record = GlobalRecord(
            federation_id=self.federation_id, run_id=run.run_id, round=number, digest=digest,
            size=self.blobs.path(digest).stat().st_size, parent_digest=parent,
            contributors=tuple(sorted(contributors)), created_at=time.time(),
        )
        signature = signing.sign(self.signer_key, record.canonical())
        db.execute("INSERT OR REPLACE INTO globals(digest, run_id, round, size, record_json, signature, created_at)"
                   " VALUES (?,?,?,?,?,?,?)",
                   (digest, run.run_id, number, record.size, record.to_json(), signature, record.created_at))
        self.store.append_audit(db, {"kind": "global", "record": record.to_json(), "signature": signature.hex()})
