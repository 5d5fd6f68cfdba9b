"""The round state machine: the only writer of run and round phases.

    init --(initial adapter accepted)--> running: round r = waiting -> training -> (aggregate) -> round r+1 ...
         --(last round aggregated)--> evaluating (sites score the final global) --> done

Every transition is one SQLite transaction and `tick()` derives what to do from the stored state alone, so a
coordinator killed at any moment resumes where it stood: accepted updates stay accepted, an interrupted
aggregation is simply redone (it is deterministic), and sampled clients are not asked again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection

from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey

from fedvlm import adapters
from fedvlm.algorithms import build
from fedvlm.algorithms.base import Algorithm, ClientUpdate, next_global, sample_clients, split_aux
from fedvlm.algorithms.privacy import Sampling, budget_refusal, round_sampling
from fedvlm.security import signing
from fedvlm.security.signing import GlobalRecord

from .blobs import BlobStore
from .config import FederationConfig
from .runs import new_run
from .secagg_phase import SecureRounds
from .state import AssignmentState, MetricsKind, Next, Round, RoundPhase, Run, RunState, ServerStateRef, State

log = logging.getLogger(__name__)


class RoundDriver:
    """Advances the current run; call `tick()` periodically or after `wake()`. Time is the state's clock."""

    def __init__(self, state: State, blobs: BlobStore, config: FederationConfig, federation_id: str,
                 signer_key: EllipticCurvePrivateKey,
                 on_published: Callable[[float, float], None] | None = None,
                 on_change: Callable[[], None] | None = None) -> None:
        """``on_published(aggregation seconds, round seconds)`` is called after each round's global is published;
        ``on_change()`` after every transition (it wakes the sites' long-polls, see `Changes`)."""
        self.on_published = on_published
        self.on_change = on_change
        self.state = state
        self.blobs = blobs
        self.config = config
        self.federation_id = federation_id
        self.signer_key = signer_key
        self._wakeup = threading.Event()
        self._tick_lock = threading.Lock()
        self.secure = SecureRounds(state, blobs, federation_id)  # rounds of runs with secure_aggregation
        self._started = state.now()  # heartbeats older than this daemon's start say nothing (see `gone`)

    def ensure_run(self) -> Run:
        """The current run, created from the config (federation.toml) on the federation's first start."""
        run = self.state.current_run()
        return run if run is not None else new_run(self.state, self.config)

    def wake(self) -> None:
        """Make the loop tick now rather than at its next period (an update arrived)."""
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
                if self.on_change:
                    self.on_change()

    def gone(self, sites: Collection[str], heartbeat_timeout: float) -> bool:
        """True when every one of `sites` has been silent for `heartbeat_timeout` (dead or cut off: its agent
        heartbeats while it trains and uploads), so a round need not wait for their deadline. Only once this daemon
        has itself been up that long: after a restart the sites have not yet had the time to reach it."""
        if not sites or self.state.now() - self._started < heartbeat_timeout:
            return False
        return not set(sites) & set(self.state.live_clients(heartbeat_timeout))

    # -- transitions -------------------------------------------------------------------------------------------
    def _step(self) -> bool:
        run = self.state.current_run()
        if run is None:
            return False
        if run.state is RunState.INIT:
            return self._step_init(run)
        if run.state is RunState.RUNNING:
            return self._step_round(run)
        if run.state is RunState.EVALUATING:
            return self._step_final_eval(run)
        return False

    def _step_init(self, run: Run) -> bool:
        update = self.state.initial_update(run.run_id)
        if update is None:
            live = self.state.live_clients(run.config.heartbeat_timeout)
            if run.init_client and run.init_client not in live:
                self.state.release_init(run.run_id)  # the chosen site went away: another one may provide it
                return True
            return False
        path = self.blobs.path(update.digest)
        tensors = dict(adapters.iter_file_tensors(path))
        schema = adapters.schema_to_json(adapters.schema_of(tensors))
        adapter_config = adapters.read_metadata(path).get(adapters.ADAPTER_CONFIG_METADATA)
        state_ref = self._put_server_state(run, 0, build(run.task.algorithm).initial_state(tensors))
        record, signature = self._sign_global(run, 0, update.digest, parent="", contributors=[update.digest])
        self.state.publish_initial_global(run.run_id, record, signature, state_ref, schema, adapter_config)
        log.info("run %s: initial adapter from %s adopted as global 0 (%d tensors)", run.run_id,
                 update.client, len(tensors))
        return True

    def _step_round(self, run: Run) -> bool:
        rnd = self.state.round(run.run_id, run.round)
        cfg = run.config
        states = self.state.assignments(run.run_id, run.round)
        accepted = sorted(c for c, s in states.items() if s is AssignmentState.ACCEPTED)
        if rnd.phase is RoundPhase.WAITING:
            live = self.state.live_clients(cfg.heartbeat_timeout)
            candidates = [c for c in live if c not in accepted]
            need = cfg.clients_per_round - len(accepted)
            if len(live) < cfg.min_clients or len(candidates) < need:
                return False
            refusal = self._privacy_refusal(run, rnd)
            if refusal:  # the run ends with the global of the last released round
                self.state.stop_run(run.run_id, refusal)
                log.warning("run %s: %s", run.run_id, refusal)
                return True
            sampled = sample_clients(run.run_id, run.round, rnd.attempt, candidates, need)
            self.state.open_round(run.run_id, run.round, sampled, self.state.now() + cfg.round_deadline)
            log.info("round %d/%d: sampled %s (deadline in %.0fs)", run.round, cfg.rounds, ", ".join(sampled),
                     cfg.round_deadline)
            return True
        if rnd.phase is not RoundPhase.TRAINING:
            return False
        if run.task.algorithm.secure_aggregation:  # its own sub-phases and deadlines (secagg_phase.py)
            return self.secure.step(run, rnd, lambda survivors: self._aggregate(run, rnd, survivors),
                                    lambda sites: self.gone(sites, cfg.heartbeat_timeout))
        pending = [c for c, s in states.items() if s is AssignmentState.ASSIGNED]
        if accepted and not pending:
            self._aggregate(run, rnd, accepted)
            return True
        if self.state.now() < (rnd.deadline or 0):
            if not self.gone(pending, cfg.heartbeat_timeout):
                return False
            why = f"{', '.join(pending)} silent for {cfg.heartbeat_timeout:.0f}s"
        else:
            why = "deadline passed"
        if len(accepted) >= cfg.quorum:
            self.state.mark_late(run.run_id, run.round, pending)
            log.info("round %d: %s with %d/%d updates (quorum %d): aggregating", run.round, why,
                     len(accepted), len(states), cfg.quorum)
            self._aggregate(run, rnd, accepted)
        else:
            self.state.reopen_round(run.run_id, run.round, pending)
            log.warning("round %d: %s with %d updates, quorum is %d: sampling again", run.round, why,
                        len(accepted), cfg.quorum)
        return True

    def _carried_metadata(self, run: Run, base_digest: str) -> dict[str, str] | None:
        """What every global carries from the initial adapter: its PEFT adapter config (for export) and the record
        of its base model (sites check theirs against it), copied from the global the round started from."""
        metadata = {adapters.ADAPTER_CONFIG_METADATA: run.adapter_config} if run.adapter_config else {}
        base_model = adapters.read_metadata(self.blobs.path(base_digest)).get(adapters.BASE_MODEL_METADATA)
        if base_model:
            metadata[adapters.BASE_MODEL_METADATA] = base_model
        return metadata or None

    def _aggregate(self, run: Run, rnd: Round, accepted: list[str]) -> None:
        """Aggregate the round's accepted updates into its global and publish it (see `State.publish_global`)."""
        started = time.monotonic()
        updates = self.state.accepted_updates(run.run_id, run.round)
        algorithm = build(run.task.algorithm)
        base, _ = split_aux(dict(adapters.iter_file_tensors(self.blobs.path(rnd.base_digest))))
        if algorithm.config.secure_aggregation:  # the masked updates' sum, unmasked (never one update)
            loaders = self.secure.unmasked_updates(run, rnd, base, updates)
        else:
            loaders = [ClientUpdate(u.num_examples, self._loader(u.digest)) for u in updates]
        # The state saved with the previous global: a redone (interrupted) aggregation starts from the same state.
        result = algorithm.aggregate(base, loaders, self._server_state(run, algorithm, base), run.round,
                                     self._sampling(run, rnd))
        merged = next_global(base, result)  # tensors no update carries (a frozen stage) keep the base's values
        digest = self.blobs.put_bytes(adapters.to_bytes(merged, self._carried_metadata(run, rnd.base_digest)))
        state_ref = self._put_server_state(run, run.round, result.state)
        record, signature = self._sign_global(run, run.round, digest, parent=rnd.base_digest,
                                              contributors=[u.digest for u in updates])
        cfg = run.config
        if run.round < cfg.rounds:
            self.state.publish_global(run.run_id, run.round, record, signature, state_ref, result.metrics, Next.ROUND)
        elif cfg.final_eval:
            self.state.publish_global(run.run_id, run.round, record, signature, state_ref, result.metrics,
                                      Next.FINAL_EVALUATION, evaluators=self.state.live_clients(cfg.heartbeat_timeout),
                                      eval_deadline=self.state.now() + cfg.round_deadline)
        else:
            self.state.publish_global(run.run_id, run.round, record, signature, state_ref, result.metrics, Next.DONE)
        log.info("round %d/%d aggregated from %s -> global %s", run.round, cfg.rounds, ", ".join(accepted),
                 digest[:12])
        if self.on_published:
            self.on_published(time.monotonic() - started, self.state.now() - rnd.started_at)

    @staticmethod
    def _sampling(run: Run, rnd: Round) -> Sampling:
        return round_sampling(run.config.min_clients, run.config.clients_per_round, rnd.attempt)

    def _privacy_refusal(self, run: Run, rnd: Round) -> str:
        """Why the round's next draw must not start (its DP release would exceed dp_max_epsilon), or ""."""
        if run.task.algorithm.dp_max_epsilon <= 0:
            return ""
        algorithm = build(run.task.algorithm)
        return budget_refusal(algorithm.config, self._server_state(run, algorithm, {}), self._sampling(run, rnd),
                              run.round)

    def _loader(self, digest: str):
        def load():
            return split_aux(dict(adapters.iter_file_tensors(self.blobs.path(digest))))
        return load

    def _server_state(self, run: Run, algorithm: Algorithm, base: dict) -> dict:
        """The server state stored with the latest global (a run created before states existed: a fresh one)."""
        if run.server_state is None:
            return algorithm.initial_state(base)
        return adapters.from_bytes(self.blobs.read(run.server_state.digest)) if run.server_state.digest else {}

    def _put_server_state(self, run: Run, number: int, state: dict) -> ServerStateRef:
        """Write the server state after round `number` as a content-addressed blob; returns the reference that is
        recorded in the same transaction as that round's global."""
        digest = self.blobs.put_bytes(adapters.to_bytes(state, {"fedvlm.run": run.run_id})) if state else ""
        return ServerStateRef(number, digest)

    def _step_final_eval(self, run: Run) -> bool:
        rnd = self.state.round(run.run_id, run.round)
        targets = self.state.assignments(run.run_id, run.round)
        reported = {m.client for m in self.state.metrics(run.run_id, MetricsKind.EVAL, run.round - 1)}
        if set(targets) - reported and self.state.now() < (rnd.deadline or 0):
            return False
        self.state.finish_run(run.run_id, run.round)
        log.info("run %s done", run.run_id)
        return True

    def _sign_global(self, run: Run, number: int, digest: str, parent: str,
                     contributors: list[str]) -> tuple[GlobalRecord, bytes]:
        """The signed record of a global version (published by the caller's state transition)."""
        record = GlobalRecord(
            federation_id=self.federation_id, run_id=run.run_id, round=number, digest=digest,
            size=self.blobs.path(digest).stat().st_size, parent_digest=parent,
            contributors=tuple(sorted(contributors)), created_at=self.state.now(),
        )
        return record, signing.sign(self.signer_key, record.canonical())
