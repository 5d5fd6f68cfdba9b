"""gRPC servicers: they authenticate the caller from its verified certificate and delegate to the state layer."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator

import grpc
from cryptography import x509

from fedvlm.security import pki
from fedvlm.wire.chunks import iter_file_chunks
from fedvlm.wire.v1 import (
    admin_pb2_grpc,
    common_pb2,
    enrollment_pb2,
    enrollment_pb2_grpc,
    federation_pb2,
    federation_pb2_grpc,
)

from .blobs import BlobStore
from .changes import Changes
from .config import FederationConfig, RunConfig
from .enrollment import Enroller
from .errors import Refused
from .intake import Intake
from .layout import FederationDir
from .runs import find_run
from .state import Activity, AssignmentState, GlobalVersion, MetricsKind, PollView, RoundPhase, RunState, State
from .status import snapshot, status_message
from .streams import UploadStreams

log = logging.getLogger(__name__)

Pb = federation_pb2
ACTIVITIES = {
    Pb.CLIENT_STATE_IDLE: Activity.IDLE, Pb.CLIENT_STATE_DOWNLOADING: Activity.DOWNLOADING,
    Pb.CLIENT_STATE_TRAINING: Activity.TRAINING, Pb.CLIENT_STATE_UPLOADING: Activity.UPLOADING,
    Pb.CLIENT_STATE_DONE: Activity.DONE, Pb.CLIENT_STATE_EVALUATING: Activity.EVALUATING,
    Pb.CLIENT_STATE_INITIALIZING: Activity.INITIALIZING,
}
REPORTED_KINDS = {MetricsKind.EVAL.value: MetricsKind.EVAL, MetricsKind.TRAIN.value: MetricsKind.TRAIN}


def _abort(context: grpc.ServicerContext, refused: Refused) -> None:
    context.abort(getattr(grpc.StatusCode, refused.code), refused.message)


def _peer_certificate(context: grpc.ServicerContext) -> x509.Certificate:
    cert = pki.peer_cert(context)
    if cert is None:
        raise Refused("UNAUTHENTICATED", "a client certificate is required")
    return cert


def _check_enrolled(name: str, fingerprint: str, enrolled: str | None, revoked: bool) -> None:
    """Refuse a site whose certificate (`fingerprint`) is not the one enrolled for `name`, or that is revoked."""
    if enrolled != fingerprint:
        raise Refused("PERMISSION_DENIED", f"certificate for {name!r} is not the one enrolled")
    if revoked:
        raise Refused("PERMISSION_DENIED", f"client {name!r} has been revoked")


def _what_to_do(assignment: federation_pb2.Assignment) -> tuple:
    """What a site acts on in an answer: a long-poll is answered when this changes (a WAIT that only moves to the
    next round's "not sampled", or passes through a transition's intermediate state, keeps it held)."""
    return assignment.action, assignment.run_id, assignment.task_spec_json, assignment.global_version.digest


def _guarded(method: Callable) -> Callable:
    """Turn a Refused raised by a handler into a gRPC status with its message."""

    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except Refused as refused:
            log.info("refused %s: %s %s", method.__name__, refused.code, refused.message)
            _abort(context, refused)

    wrapper.__name__ = method.__name__
    return wrapper


class FederationService(federation_pb2_grpc.FederationServicer):
    """The site-facing service. Identity = the verified certificate's CN, checked against the enrolled one."""

    def __init__(self, state: State, blobs: BlobStore, intake: Intake, config: FederationConfig,
                 federation_id: str, signer_cert_pem: bytes, changes: Changes | None = None,
                 max_waiting: int = 0) -> None:
        """``changes``: what the round driver notifies after each transition; ``max_waiting``: at most this many
        long-polls held at once (each holds a server thread), the others are answered at once."""
        self.changes = changes or Changes()
        self._waiting = threading.BoundedSemaphore(max_waiting) if max_waiting > 0 else None
        self.state = state
        self.blobs = blobs
        self.intake = intake
        self.config = config
        self.streams = UploadStreams(config.limits.streams_per_site, config.limits.stream_idle_timeout)
        self.federation_id = federation_id
        self.signer_cert_pem = signer_cert_pem

    def _client(self, context: grpc.ServicerContext) -> tuple[str, x509.Certificate]:
        name, cert = self._site_certificate(context)
        client = self.state.client(name)
        _check_enrolled(name, pki.fingerprint(cert), client.cert_fingerprint if client else None,
                        client is not None and client.revoked)
        return name, cert

    @staticmethod
    def _site_certificate(context: grpc.ServicerContext) -> tuple[str, x509.Certificate]:
        cert = _peer_certificate(context)
        if pki.cert_role(cert) != "client":
            raise Refused("PERMISSION_DENIED", "this service is for enrolled sites")
        return pki.cert_name(cert), cert

    @_guarded
    def Poll(self, request, context):
        name, cert = self._site_certificate(context)
        fingerprint = pki.fingerprint(cert)
        seen = self.changes.generation()  # before the answer is read: a change after it is not missed
        # One statement reads the enrolled certificate and what the answer needs; the heartbeat is recorded only for
        # the enrolled, unrevoked certificate, so a refused caller changes nothing.
        view = self.state.poll(name, fingerprint, ACTIVITIES.get(request.state, Activity.IDLE), request.detail[:200],
                               request.bytes_done, request.bytes_total, request.run_id[:64], max(0, request.step),
                               max(0, request.steps_total))
        _check_enrolled(name, fingerprint, view.cert_fingerprint, view.revoked)
        assignment = self._assignment_for(name, view)
        if request.wait_s > 0 and assignment.action == Pb.ACTION_WAIT and self._waiting is not None \
                and self._waiting.acquire(blocking=False):
            try:
                run_config = view.run.config if view.run else self.config.run
                return self._wait_for_change(name, fingerprint, run_config, context, assignment, seen, request.wait_s)
            finally:
                self._waiting.release()
        return assignment

    def _wait_for_change(self, name: str, fingerprint: str, run_config: RunConfig, context: grpc.ServicerContext,
                         first: federation_pb2.Assignment, seen: int, wait_s: float) -> federation_pb2.Assignment:
        """The long-poll: hold `first` (a WAIT) until what the site acts on changes (`_what_to_do`), `wait_s` passes
        (capped at a third of the heartbeat timeout: the site's next poll keeps it live) or the caller goes away.
        The driver's transitions wake it at once; changes made by another process (the CLI's `run new`/`stop`,
        `revoke`, in the database) are seen at the next recheck, every poll_interval, as a polling site saw them."""
        end = time.monotonic() + min(wait_s, run_config.heartbeat_timeout / 3)
        current = first
        while _what_to_do(current) == _what_to_do(first) and context.is_active():
            left = end - time.monotonic()
            if left <= 0:
                break
            seen = self.changes.wait(seen, min(left, run_config.poll_interval))
            view = self.state.poll_view(name)
            _check_enrolled(name, fingerprint, view.cert_fingerprint, view.revoked)  # revoked meanwhile: refused now
            current = self._assignment_for(name, view)
        current.long_polled = True
        return current

    def _assignment_for(self, name: str, view: PollView) -> federation_pb2.Assignment:
        run = view.run
        base = dict(federation_id=self.federation_id, poll_interval_s=self.config.run.poll_interval)
        if run is None:
            return Pb.Assignment(action=Pb.ACTION_WAIT, message="no run yet", **base)
        base.update(run_id=run.run_id, task_spec_json=run.task_json, total_rounds=run.config.rounds,
                    poll_interval_s=run.config.poll_interval)
        if run.state is RunState.DONE:
            return Pb.Assignment(action=Pb.ACTION_FINISHED, round=run.round, message="run finished", **base)
        if run.state is RunState.STOPPED:
            return Pb.Assignment(action=Pb.ACTION_FINISHED, round=run.round,
                                 message=f"run stopped: {run.stop_reason}", **base)
        if run.state is RunState.INIT:
            if run.init_client is None:
                run = self.state.claim_init(run.run_id, name)
            if run.init_client == name and self.state.initial_update(run.run_id) is None:
                return Pb.Assignment(action=Pb.ACTION_INIT, round=0, **base)
            return Pb.Assignment(action=Pb.ACTION_WAIT, message="waiting for the initial adapter", **base)
        rnd, status = view.round, view.assignment
        if status is not AssignmentState.ASSIGNED or rnd is None or (rnd.deadline or 0) < self.state.now():
            return Pb.Assignment(action=Pb.ACTION_WAIT, round=run.round, message=f"round {run.round}: not sampled",
                                 **base)
        if run.state is RunState.RUNNING and rnd.phase is RoundPhase.TRAINING:
            action = Pb.ACTION_TRAIN
        elif run.state is RunState.EVALUATING and name not in {
                m.client for m in self.state.metrics(run.run_id, MetricsKind.EVAL, run.round - 1)}:
            action = Pb.ACTION_EVALUATE
        else:
            return Pb.Assignment(action=Pb.ACTION_WAIT, round=run.round, **base)
        return Pb.Assignment(action=action, round=run.round, deadline_unix=rnd.deadline,
                             global_version=self._global_info(view.base_global), **base)

    def _global_info(self, version: GlobalVersion) -> federation_pb2.GlobalInfo:
        return Pb.GlobalInfo(digest=version.digest, size=version.size, record_json=version.record_json,
                             signature=version.signature, signer_cert_pem=self.signer_cert_pem)

    def FetchGlobal(self, request, context) -> Iterator[common_pb2.Chunk]:
        try:
            self._client(context)
            if self.state.global_by_digest(request.digest) is None:
                raise Refused("NOT_FOUND", f"no global version {request.digest[:12]}")
        except Refused as refused:
            _abort(context, refused)
        path = self.blobs.path(request.digest)
        if request.offset < 0 or request.offset > path.stat().st_size:
            context.abort(grpc.StatusCode.OUT_OF_RANGE, "offset past the end of the global")
        for offset, data in iter_file_chunks(path, request.offset):
            yield common_pb2.Chunk(offset=offset, data=data)

    @_guarded
    def StartUpload(self, request, context):
        name, cert = self._client(context)
        ticket = self.intake.start(name, cert, request.manifest_json, request.signature)
        return Pb.UploadState(upload_id=ticket.upload_id, offset=ticket.offset, size=ticket.size)

    def Upload(self, request_iterator, context):
        try:
            name, _ = self._client(context)
            with self.streams.open(name):
                frames = ((f.upload_id, f.offset, f.data) for f in self.streams.frames(request_iterator))
                digest, received = self.intake.receive(name, frames)
        except Refused as refused:
            _abort(context, refused)
        return Pb.UploadResult(digest=digest, bytes_received=received)

    @_guarded
    def ReportMetrics(self, request, context):
        name, _ = self._client(context)
        run = self.state.current_run()
        if run is None or request.run_id != run.run_id:
            raise Refused("FAILED_PRECONDITION", "metrics for a run that is not the current one")
        if request.kind not in REPORTED_KINDS:
            raise Refused("INVALID_ARGUMENT", "metrics kind must be 'eval' or 'train'")
        metrics = self._checked_metrics(request, run)
        self.state.record_metrics(run.run_id, request.round, name, REPORTED_KINDS[request.kind],
                                  request.global_digest, metrics)
        return Pb.MetricsAck()

    def _checked_metrics(self, request, run) -> dict[str, float]:
        """A report's metrics, if it is for a round of the run so far, within limits.metric_keys and
        limits.metric_key_bytes, and every value finite (state.db and `rounds --json` hold JSON numbers only)."""
        limits = self.config.limits
        if not 0 <= request.round <= run.round:
            raise Refused("INVALID_ARGUMENT", f"metrics for round {request.round}, but the run is at round {run.round}")
        if len(request.metrics) > limits.metric_keys:
            raise Refused("RESOURCE_EXHAUSTED", f"{len(request.metrics)} metric keys exceed limits.metric_keys "
                                                f"({limits.metric_keys})")
        metrics = {}
        for key, value in request.metrics.items():
            size = len(key.encode("utf-8"))
            if size > limits.metric_key_bytes:
                raise Refused("RESOURCE_EXHAUSTED", f"a metric key of {size} bytes exceeds limits.metric_key_bytes "
                                                    f"({limits.metric_key_bytes})")
            if not math.isfinite(value):
                raise Refused("INVALID_ARGUMENT", f"metric {key!r} is {value}: only finite values are taken")
            metrics[key] = float(value)
        return metrics

    @_guarded
    def ReportFailure(self, request, context):
        name, _ = self._client(context)
        reason = " ".join(request.reason.split())[:300] or "no reason given"  # one line, bounded
        self.state.record_failure(name, reason, request.run_id[:64])
        log.warning("site %s stopped on an error: %s", name, reason)
        return Pb.FailureAck()


class AdminService(admin_pb2_grpc.AdminServicer):
    """Operator RPCs: callers need a certificate with role "admin"."""

    def __init__(self, state: State, config: FederationConfig, fed: FederationDir | None = None) -> None:
        self.state = state
        self.config = config
        self.fed = fed  # its federation.toml is compared with the current run (FederationStatus.config_notice)

    @_guarded
    def GetStatus(self, request, context):
        cert = _peer_certificate(context)
        if pki.cert_role(cert) != "admin":
            raise Refused("PERMISSION_DENIED", "the admin service needs an admin certificate")
        run = None
        if request.run:
            run = find_run(self.state, request.run)
            if run is None:
                raise Refused("NOT_FOUND", f"no run {request.run!r} (see `fedvlm-coord run list`)")
        return status_message(snapshot(self.state, True, self.fed, run))


class EnrollmentService(enrollment_pb2_grpc.EnrollmentServicer):
    """Join-token enrollment (served without TLS; see proto/fedvlm/v1/enrollment.proto)."""

    def __init__(self, enroller: Enroller) -> None:
        self.enroller = enroller

    @_guarded
    def Enroll(self, request, context):
        result = self.enroller.enroll(request.token_id, request.csr_der, request.proof)
        return enrollment_pb2.EnrollReply(ca_cert_pem=result.ca_cert_pem, client_cert_pem=result.client_cert_pem,
                                          federation_id=result.federation_id, client_name=result.client_name)
