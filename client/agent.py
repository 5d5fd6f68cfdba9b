"""The site agent: poll the coordinator, do what it asks (init, train, evaluate), until the run ends.

The model stays resident between rounds (no re-import or rebuild per round). Work in progress survives a
restart of either side: downloads resume from the partial file, a signed update waits in the outbox and is
resumed rather than retrained, and a lost connection is retried with exponential backoff.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from fedvlm import adapters
from fedvlm.algorithms.base import split_aux
from fedvlm.recipe import SiteSetupError
from fedvlm.security import signing
from fedvlm.security.signing import UpdateManifest
from fedvlm.spec import TaskSpec
from fedvlm.wire.v1 import federation_pb2 as pb
from fedvlm.wire.v1 import federation_pb2_grpc, secagg_pb2_grpc

from .identity import Identity, StateDir
from .parallel import SiteWorkers, WorkerError
from .secagg import KeysDoNotVerify, RoundOver, SecureRound
from .transfer import Outbox, VerificationError, download_global, upload, verify_global_info

log = logging.getLogger(__name__)

# ABORTED: the coordinator still runs an older stream of this upload (e.g. one cut off by the network that it has
# not noticed yet); the next attempt resumes from where that one ends.
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
             grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.RESOURCE_EXHAUSTED,
             grpc.StatusCode.ABORTED}
MAX_BACKOFF = 30.0
LONG_POLL_S = 30.0  # how long a waiting site asks the coordinator to hold its Poll (the coordinator caps it)


class FatalError(Exception):
    """The coordinator will not work with this site (revoked, wrong federation): stop with this message."""


@dataclass
class Activity:
    """What the site is doing, reported with every poll and heartbeat."""

    state: int = pb.CLIENT_STATE_IDLE
    detail: str = ""
    bytes_done: int = 0
    bytes_total: int = 0
    run_id: str = ""
    round: int = 0
    step: int = 0
    steps_total: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def set(self, state: int, detail: str = "", done: int = 0, total: int = 0, step: int = 0,
            steps_total: int = 0) -> None:
        with self.lock:
            self.state, self.detail, self.bytes_done, self.bytes_total = state, detail, done, total
            self.step, self.steps_total = step, steps_total

    def request(self, wait_s: float = 0.0) -> pb.PollRequest:
        """A heartbeat (``wait_s`` 0) or, waiting for work, a long-poll held up to ``wait_s`` seconds."""
        with self.lock:
            return pb.PollRequest(state=self.state, detail=self.detail, bytes_done=self.bytes_done,
                                  bytes_total=self.bytes_total, run_id=self.run_id, round=self.round,
                                  step=self.step, steps_total=self.steps_total, wait_s=wait_s)


class ProgressLog:
    """Logs a local round's progress at most every `every` seconds, and its last step (0 = every step), so a site's
    log is never silent for a whole round."""

    def __init__(self, what: str, every: float) -> None:
        self.what, self.every = what, every
        self.started = time.monotonic()
        self._last = self.started

    def step(self, step: int, total: int) -> None:
        """Step `step` of `total` is done."""
        now = time.monotonic()
        if now - self._last < self.every and step < total:
            return
        self._last = now
        elapsed = now - self.started
        left = f", about {elapsed / step * (total - step):.0f}s left" if 0 < step < total else ""
        log.info("%s: step %d/%d (%d%%), %.0fs%s", self.what, step, total, 100 * step // max(total, 1), elapsed, left)


def _jittered(backoff: float) -> float:
    """A reconnect delay in [backoff/2, backoff]: sites cut off together do not come back in lockstep."""
    return backoff * random.uniform(0.5, 1.0)


class Agent:
    def __init__(self, coordinator: str, identity: Identity, state: StateDir, data_dir: Path,
                 device: str = "cpu", cache_dir: Path | None = None, max_upload_rate: float = 0.0,
                 lora_rank: int = 0, workers: SiteWorkers | None = None, keep_running: bool = False,
                 progress_every: float = 10.0) -> None:
        """``workers``: the other ranks of this site's data-parallel group (``--nproc``), started by the caller;
        this process is rank 0, the only one that talks to the coordinator. ``keep_running``: after a run ends, wait
        for the federation's next run instead of returning. ``progress_every``: seconds between progress lines of a
        local round in the log."""
        self.keep_running = keep_running
        self.progress_every = progress_every
        self.coordinator = coordinator
        self.workers = workers
        self.lora_rank = lora_rank  # site-local LoRA rank (0 = the task's); needs task.algorithm.lora_exact
        self.identity = identity
        self.state = state
        self.outbox = Outbox(state.outbox)
        self.data_dir = data_dir
        self.device = device
        self.cache_dir = cache_dir
        self.max_upload_rate = max_upload_rate
        self.activity = Activity()
        self._learner = None
        self._learner_key: tuple[str, int] | None = None
        self._learner_lock = threading.Lock()  # the model is built once, by a prebuild or by the first action
        self._prebuilt_for: str | None = None  # the task spec a background build was last started for
        self._poll_interval = 1.0
        self._contacted = False
        self.algorithm_state_dir = state.root / "algorithm"

    # -- main loop -------------------------------------------------------------------------------------------
    def run(self) -> None:
        """Work until the coordinator says the run is finished (with ``keep_running``: until stopped); reconnect with
        backoff on transport errors. Stopping on an error, the agent first tells the coordinator why."""
        try:
            self._run()
        except FatalError as exc:
            self.report_failure(str(exc))
            raise
        except Exception as exc:  # an unexpected error: the site shows as failed instead of silently offline
            self.report_failure(f"{type(exc).__name__}: {exc}")
            raise

    def report_failure(self, reason: str) -> None:
        """Best effort, within a few seconds: the coordinator shows this site as failed with `reason`'s first line."""
        first_line = (reason.strip().splitlines() or ["no reason given"])[0]
        try:
            with self.identity.channel(self.coordinator) as channel:
                federation_pb2_grpc.FederationStub(channel).ReportFailure(pb.FailureReport(
                    run_id=self.activity.run_id, round=self.activity.round, reason=first_line), timeout=5)
        except grpc.RpcError as exc:  # unreachable, revoked, or an older coordinator: the exit stays as it was
            log.debug("could not report the failure to the coordinator: %s", exc.code().name)

    def _run(self) -> None:
        backoff = 1.0
        while True:
            try:
                with self.identity.channel(self.coordinator) as channel:
                    stub = federation_pb2_grpc.FederationStub(channel)
                    if self._serve(stub):
                        return
            except grpc.RpcError as exc:
                if self._contacted:  # the connection worked before this failure: start backing off afresh
                    backoff, self._contacted = 1.0, False
                if exc.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
                    raise FatalError(f"coordinator refused this site: {exc.details()}") from exc
                if exc.code() not in RETRYABLE:
                    raise
                delay = _jittered(backoff)
                log.warning("coordinator unreachable (%s: %s); retrying in %.1fs", exc.code().name,
                            exc.details(), delay)
                time.sleep(delay)
                backoff = min(MAX_BACKOFF, backoff * 2)
            except ConnectionError as exc:
                delay = _jittered(backoff)
                log.warning("%s; retrying in %.1fs", exc, delay)
                time.sleep(delay)
            except VerificationError as exc:
                raise FatalError(f"refusing a global that does not verify: {exc}") from exc

    def _serve(self, stub: federation_pb2_grpc.FederationStub) -> bool:
        """Poll and act until the run finishes (True) or an RpcError escapes."""
        while True:
            assignment = stub.Poll(self.activity.request(wait_s=LONG_POLL_S), timeout=LONG_POLL_S + 30)
            self._contacted = True
            self._poll_interval = assignment.poll_interval_s or 1.0
            self.activity.run_id, self.activity.round = assignment.run_id, assignment.round
            if assignment.federation_id != self.identity.federation_id:
                raise FatalError("coordinator belongs to another federation")
            if assignment.action == pb.ACTION_FINISHED:
                if self.activity.state != pb.CLIENT_STATE_DONE:
                    self.activity.set(pb.CLIENT_STATE_DONE, assignment.message or "run finished")
                    stub.Poll(self.activity.request(), timeout=30)
                    log.info("run %s is over (%s)%s", assignment.run_id, assignment.message or "finished",
                             "; waiting for the next run" if self.keep_running else "")
                if not self.keep_running:
                    return True
                time.sleep(self._poll_interval)
                continue
            if self.activity.state == pb.CLIENT_STATE_DONE:  # the federation's next run: this site takes part
                log.info("run %s: joining", assignment.run_id)
                self.activity.set(pb.CLIENT_STATE_IDLE)
            if assignment.action == pb.ACTION_INIT:
                self._with_heartbeat(stub, self._init, stub, assignment)
            elif assignment.action == pb.ACTION_TRAIN:
                self._with_heartbeat(stub, self._train, stub, assignment)
            elif assignment.action == pb.ACTION_EVALUATE:
                self._with_heartbeat(stub, self._evaluate, stub, assignment)
            else:
                if assignment.task_spec_json:
                    self._prebuild_learner(assignment.task_spec_json)
                if not assignment.long_polled:  # an older coordinator, or too many sites waiting: poll again later
                    time.sleep(self._poll_interval)

    def _prebuild_learner(self, spec_json: str) -> None:
        """Build the run's model in the background while the site waits for its first assignment, so that the
        first TRAIN or EVALUATE finds it built. A failure is only logged here: the action that needs the model
        builds it again and stops on the same error with its message."""
        if spec_json in (self._prebuilt_for, (self._learner_key or ("",))[0]):
            return
        self._prebuilt_for = spec_json

        def build() -> None:
            try:
                self.learner(spec_json)
            except Exception as exc:  # noqa: BLE001 - reported by the action that needs the model
                log.info("building the model ahead of the first round failed (%s); retrying when needed", exc)

        threading.Thread(target=build, daemon=True, name="model-build").start()

    def _with_heartbeat(self, stub, work, *args) -> None:
        """Run `work` while a background thread keeps reporting progress to the coordinator."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self._poll_interval):
                with contextlib.suppress(grpc.RpcError):  # the main thread handles connection problems
                    stub.Poll(self.activity.request(), timeout=10)

        thread = threading.Thread(target=beat, daemon=True, name="heartbeat")
        thread.start()
        try:
            work(*args)
        finally:
            stop.set()
            thread.join(timeout=5)
            self.activity.set(pb.CLIENT_STATE_IDLE)

    # -- actions ---------------------------------------------------------------------------------------------
    def learner(self, spec_json: str, initial: bool = False):
        """The resident model for this task spec (rebuilt only when the spec or the LoRA rank changes).

        ``initial``: for the initial adapter, which defines the global's schema, always at the task's LoRA rank;
        otherwise at this site's ``--lora-rank`` (refused unless the task aggregates LoRA exactly)."""
        spec = TaskSpec.from_json(spec_json)
        rank = 0 if initial or self.lora_rank == spec.lora.r else self.lora_rank
        if rank and not spec.algorithm.heterogeneous_ranks:
            raise FatalError(f"--lora-rank {rank} (the task's rank is {spec.lora.r}) needs a run with "
                             "task.algorithm.lora_exact = true (lora_aggregation \"exact\") or lora_aggregation "
                             "\"flora\": plain averaging of lora_A and lora_B needs equal ranks; restart without "
                             "--lora-rank")
        with self._learner_lock:  # a prebuild of the same model may be under way (_prebuild_learner)
            return self._resident_learner(spec, spec_json, rank)

    def _resident_learner(self, spec: TaskSpec, spec_json: str, rank: int):
        if self._learner is None or self._learner_key != (spec_json, rank):
            from fedvlm.learner import Learner

            self._learner = None  # free the previous model before building the next one
            log.info("building model %s (%s, LoRA rank %d%s) on %s", spec.model, spec.strategy, rank or spec.lora.r,
                     " site-local" if rank else "", self.device)
            try:
                self._learner = Learner(spec, self.data_dir, device=self.device, cache_dir=self.cache_dir,
                                        lora_rank=rank)
            except (SiteSetupError, OSError) as exc:  # the run's recipe or model cannot be had on this site
                raise FatalError(f"cannot train this run here: {exc}") from exc
            self._learner_key = (spec_json, rank)
            log.info("local data: %d train / %d test examples", self._learner.num_train_examples,
                     self._learner.num_test_examples)
        return self._learner

    def _init(self, stub, assignment) -> None:
        self.activity.set(pb.CLIENT_STATE_INITIALIZING, "building the initial adapter")
        learner = self.learner(assignment.task_spec_json, initial=True)  # the task's rank: it defines the schema
        pending = self.outbox.get(assignment.run_id, 0)
        if pending is None:
            metadata = {adapters.ADAPTER_CONFIG_METADATA: json.dumps(learner.adapter_config(), sort_keys=True),
                        adapters.BASE_MODEL_METADATA: learner.base_model_info()}
            data = adapters.to_bytes(learner.adapter_state(), metadata)
            pending = self._sign_and_store(assignment, signing.INITIAL_BASE, data, learner.num_train_examples)
        self._upload(stub, pending)

    def _train(self, stub, assignment) -> None:
        """One training round; with secure aggregation, as this site's part of the round's SecureRound."""
        if not TaskSpec.from_json(assignment.task_spec_json).algorithm.secure_aggregation:
            self._train_round(stub, assignment)
            return
        with self.identity.channel(self.coordinator) as channel:
            identity = self.identity
            secure = SecureRound(secagg_pb2_grpc.SecureAggregationStub(channel), identity.name, identity.key,
                                 identity.ca_cert, identity.federation_id, assignment.run_id, assignment.round,
                                 self._poll_interval)
            try:
                self._train_round(stub, assignment, secure)
            except RoundOver as exc:  # the round goes on (or is sampled again) without this site
                log.warning("round %d: secure aggregation without this site: %s", assignment.round, exc)
                secure.sit_out()
            except KeysDoNotVerify as exc:
                raise FatalError(f"secure aggregation: {exc}") from exc

    def _train_round(self, stub, assignment, secure: SecureRound | None = None) -> None:
        base = assignment.global_version
        pending = self.outbox.get(assignment.run_id, assignment.round)
        if pending is not None and pending.manifest.base_digest == base.digest:
            log.info("round %d: resuming the upload of the update already trained", assignment.round)
            self._upload(stub, pending)  # a secure round's secrets died with the process that masked it
            return
        if secure is not None:
            secure.join()  # keys and shares before training: a site lost while training is a dropout
        learner, global_bytes, global_state = self._load_global(stub, assignment)
        self._report_eval(stub, assignment, learner)  # evaluation leaves the loaded global as it is
        self.activity.set(pb.CLIENT_STATE_TRAINING, f"round {assignment.round}")

        logged = ProgressLog(f"round {assignment.round}", self.progress_every)

        def progress(step: int, total: int) -> None:
            self.activity.set(pb.CLIENT_STATE_TRAINING, f"round {assignment.round}: step {step}/{total}", step=step,
                              steps_total=total)
            logged.step(step, total)

        client_state = self._algorithm_state(assignment.run_id, assignment.round)
        step = self._round_step(learner, assignment, global_bytes, global_state, client_state, progress)
        result = step.result
        log.info("round %d: trained %d steps on %d examples in %.1fs (loss %.3f -> %.3f)", assignment.round,
                 result.steps, result.num_examples, result.seconds, result.loss_first, result.loss_last)
        if step.client_state:  # kept before the update exists, so a signed update in the outbox always has its state
            self._save_algorithm_state(assignment.run_id, assignment.round, step.client_state)
        wire = step.wire_tensors()
        if secure is not None:  # the masked update: the coordinator never sees this site's own
            global_tensors, _ = split_aux(adapters.from_bytes(global_bytes))
            wire = secure.masked_update(learner.spec.algorithm, global_tensors, wire, result.num_examples)
        data = adapters.to_bytes(wire)
        pending = self._sign_and_store(assignment, base.digest, data, result.num_examples)
        stub.ReportMetrics(pb.MetricsReport(
            run_id=assignment.run_id, round=assignment.round, kind="train",
            metrics={"loss_first": result.loss_first, "loss_last": result.loss_last, "steps": result.steps,
                     "seconds": result.seconds, "num_examples": result.num_examples}), timeout=30)
        self._upload(stub, pending)
        if secure is not None:
            secure.reveal()

    def _round_step(self, learner, assignment, global_bytes: bytes, global_state: dict, client_state: dict,
                    progress):
        """The round on this site: ``Learner.federated_round`` in this process, or in every process of the
        site's data-parallel group (``--nproc``), of which this one is rank 0; `global_state` (the parsed
        `global_bytes`) is already loaded into this process's model."""
        if learner.spec.train.lr_schedule == "cosine" and assignment.total_rounds < 1:
            raise FatalError("task.train.lr_schedule = \"cosine\" spans the run's rounds, and this coordinator does "
                             "not send their number (upgrade fedvlm-coord)")
        if self.workers is None:
            rnd, total = assignment.round, assignment.total_rounds
            return learner.federated_round(global_state, rnd, total, client_state, progress, loaded=True)
        try:
            self.workers.start_round(self._learner_key, global_bytes, assignment.round, assignment.total_rounds,
                                     client_state)
        except WorkerError as exc:
            raise FatalError(str(exc)) from exc
        return learner.federated_round(global_state, assignment.round, assignment.total_rounds, client_state, progress,
                                       group=self.workers.group, loaded=True)

    def _evaluate(self, stub, assignment) -> None:
        learner, _, _ = self._load_global(stub, assignment)
        self._report_eval(stub, assignment, learner)

    def _load_global(self, stub, assignment):
        info = assignment.global_version
        verify_global_info(info, self.identity.ca_cert, self.identity.federation_id, assignment.run_id)
        self.activity.set(pb.CLIENT_STATE_DOWNLOADING, f"global {info.digest[:12]}", 0, info.size)

        def progress(done: int, total: int) -> None:
            self.activity.set(pb.CLIENT_STATE_DOWNLOADING, f"global {info.digest[:12]}", done, total)

        data = download_global(stub, info, self.state.downloads, progress)
        learner = self.learner(assignment.task_spec_json)
        from fedvlm.learner import BaseModelMismatch

        try:  # before anything is trained on it
            learner.check_base_model(adapters.metadata_of(data).get(adapters.BASE_MODEL_METADATA))
        except BaseModelMismatch as exc:
            raise FatalError(f"cannot train this run here: {exc}") from exc
        # aux included (FLoRA's stack); re-factorised to a site-local --lora-rank
        global_state = adapters.from_bytes(data)
        learner.load_global_state(global_state, assignment.round)
        return learner, data, global_state

    # -- the algorithm's client state (e.g. SCAFFOLD's c_i) ---------------------------------------------------
    def _algorithm_state(self, run_id: str, round_index: int) -> dict:
        """The state saved by the latest earlier round of this run (empty at first). A round retrained after a
        crash reads the state from before it, not the one it may already have written."""
        earlier = [(n, p) for n, p in self._algorithm_state_files(run_id) if n < round_index]
        return dict(adapters.iter_file_tensors(max(earlier)[1])) if earlier else {}

    def _save_algorithm_state(self, run_id: str, round_index: int, state: dict) -> None:
        """Write atomically; keep only this round's file and the latest earlier one of this run."""
        self.algorithm_state_dir.mkdir(parents=True, exist_ok=True)
        target = self.algorithm_state_dir / f"{run_id}.r{round_index}.safetensors"
        adapters.save_file_atomic(state, target)
        earlier = [(n, p) for n, p in self._algorithm_state_files(run_id) if n < round_index]
        keep = {target.name} | ({max(earlier)[1].name} if earlier else set())
        for path in self.algorithm_state_dir.glob("*.safetensors"):
            if path.name not in keep:
                path.unlink(missing_ok=True)

    def _algorithm_state_files(self, run_id: str) -> list[tuple[int, Path]]:
        prefix = f"{run_id}.r"
        out = []
        for path in self.algorithm_state_dir.glob(f"{prefix}*.safetensors"):
            number = path.name[len(prefix):-len(".safetensors")]
            if number.isdigit():
                out.append((int(number), path))
        return out

    def _report_eval(self, stub, assignment, learner) -> None:
        self.activity.set(pb.CLIENT_STATE_EVALUATING, f"global of round {assignment.round - 1}")
        metrics = learner.evaluate()
        log.info("global of round %d on local test split: %s", assignment.round - 1,
                 ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
        stub.ReportMetrics(pb.MetricsReport(run_id=assignment.run_id, round=assignment.round - 1, kind="eval",
                                            global_digest=assignment.global_version.digest, metrics=metrics),
                           timeout=30)

    def _sign_and_store(self, assignment, base_digest: str, data: bytes, num_examples: int):
        manifest = UpdateManifest(
            federation_id=self.identity.federation_id, run_id=assignment.run_id, round=assignment.round,
            client=self.identity.name, base_digest=base_digest, sha256=adapters.sha256_hex(data), size=len(data),
            num_examples=num_examples, nonce=signing.new_nonce(), created_at=time.time())
        signature = signing.sign(self.identity.key, manifest.canonical())
        self.outbox.clear_except(assignment.run_id, assignment.round)
        return self.outbox.put(manifest, signature, data)

    def _upload(self, stub, pending) -> None:
        size = pending.manifest.size
        self.activity.set(pb.CLIENT_STATE_UPLOADING, f"round {pending.manifest.round}", 0, size)

        def progress(done: int, total: int) -> None:
            self.activity.set(pb.CLIENT_STATE_UPLOADING, f"round {pending.manifest.round}", done, total)

        try:
            outcome = upload(stub, pending, progress, self.max_upload_rate)
        except grpc.RpcError as exc:
            if exc.code() in RETRYABLE:
                raise  # keep it in the outbox: the next attempt resumes
            if exc.code() == grpc.StatusCode.ALREADY_EXISTS:  # this very update was accepted (its answer was lost)
                log.info("round %d: update already accepted (%s)", pending.manifest.round, exc.details())
                self.outbox.remove(pending)
                return
            log.warning("round %d: update refused by the coordinator: %s: %s", pending.manifest.round,
                        exc.code().name, exc.details())
            self.outbox.remove(pending)
            # The server did not count this round: the algorithm state goes back to the previous round's.
            self.algorithm_state_dir.joinpath(
                f"{pending.manifest.run_id}.r{pending.manifest.round}.safetensors").unlink(missing_ok=True)
            return
        self.outbox.remove(pending)
        log.info("round %d: update %s accepted (sent %d of %d bytes, resumed from %d)", pending.manifest.round,
                 outcome.digest[:12], outcome.sent, size, outcome.resumed_from)
