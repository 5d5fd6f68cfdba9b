"""Prometheus metrics of a running coordinator (names follow the Prometheus conventions: base units, `_total` only
on counters, `_timestamp_seconds` for Unix times; docs/operations.md lists them).

- Gauges are read from the status document at scrape time (`StatusCollector`): the run, the round, every site's
  state as one series per possible state (0 or 1, so a state a site left goes to 0 instead of vanishing).
- Counters and histograms count what this process saw since it started: updates accepted and refused (by the gRPC
  status code they were refused with), bytes received and sent, enrollments, and the durations of uploads,
  aggregations and rounds. The RPC side is measured by a gRPC server interceptor, so the servicers stay unaware.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

from .state import Activity, RunState, State
from .status import local_document

# Every state `status` can show for a site (coordinator/status.py): what sites report plus what the coordinator judges.
SITE_STATES = [a.value for a in Activity] + ["late", "offline", "revoked"]
UPLOAD = "/fedvlm.v1.Federation/Upload"
START_UPLOAD = "/fedvlm.v1.Federation/StartUpload"
FETCH_GLOBAL = "/fedvlm.v1.Federation/FetchGlobal"
ENROLL = "/fedvlm.v1.Enrollment/Enroll"
# Seconds: from a loopback upload of a small adapter to a multi-GB one over a WAN; rounds up to a day.
TRANSFER_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
ROUND_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)


class StatusCollector:
    """Gauges from the status document, computed at each scrape."""

    def __init__(self, state: State) -> None:
        self.state = state

    def collect(self):
        status = local_document(self.state, live=True)
        yield GaugeMetricFamily("fedvlm_run_number", "Number of the current run (1, 2, ...)",
                                value=status["run_number"])
        run_state = GaugeMetricFamily("fedvlm_run_state", "1 for the state the current run is in", labels=["state"])
        for value in RunState:
            run_state.add_metric([value.value], float(status["run_state"] == value.value))
        yield run_state
        yield GaugeMetricFamily("fedvlm_round", "Round being trained (the last one during the final evaluation)",
                                value=status["round"])
        yield GaugeMetricFamily("fedvlm_run_rounds", "Rounds in the current run", value=status["total_rounds"])
        yield GaugeMetricFamily("fedvlm_round_updates_accepted", "Accepted updates in the open round",
                                value=status["accepted"])
        yield GaugeMetricFamily("fedvlm_round_sites_sampled", "Sites sampled in the open round",
                                value=status["sampled"])
        yield GaugeMetricFamily("fedvlm_round_deadline_timestamp_seconds", "Unix time of the open round's deadline "
                                "(0 when none)", value=status["deadline_unix"])
        states = GaugeMetricFamily("fedvlm_client_state", "1 for the state each site is in, 0 for the others",
                                   labels=["client", "state"])
        seen = GaugeMetricFamily("fedvlm_client_last_heartbeat_timestamp_seconds", "Unix time of the site's last "
                                 "heartbeat (0: never)", labels=["client"])
        moving = GaugeMetricFamily("fedvlm_client_transfer_bytes", "Bytes of the site's download or upload in flight "
                                   "so far", labels=["client"])
        for c in status["clients"]:
            for value in SITE_STATES:
                states.add_metric([c["name"], value], float(c["state"] == value))
            seen.add_metric([c["name"]], c["last_heartbeat_unix"])
            moving.add_metric([c["name"]], c["bytes_done"] if c["bytes_total"] else 0)
        yield states
        yield seen
        yield moving
        scored = [r for r in status["rounds"] if r["eval_metrics"]]
        if scored:
            metrics = scored[-1]["eval_metrics"]
            latest = GaugeMetricFamily("fedvlm_global_eval", "Example-weighted evaluation metric of the newest scored "
                                       "global", labels=["metric"])
            for key, value in metrics.items():
                if not key.endswith("num_examples"):
                    latest.add_metric([key], value)
            yield latest
            yield GaugeMetricFamily("fedvlm_global_eval_examples", "Examples behind fedvlm_global_eval",
                                    value=metrics.get("num_examples", 0))


class Telemetry:
    """This coordinator's metrics registry: the status gauges plus the counters and histograms it updates."""

    def __init__(self, state: State) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(StatusCollector(state))
        r = self.registry
        self.updates_accepted = Counter("fedvlm_updates_accepted", "Updates accepted (initial adapters included)",
                                        registry=r)
        self.updates_refused = Counter("fedvlm_updates_refused", "Update announcements and uploads refused, by the "
                                       "gRPC status code they were refused with", ["reason"], registry=r)
        self.received = Counter("fedvlm_update_received_bytes", "Update bytes received", registry=r)
        self.sent = Counter("fedvlm_global_sent_bytes", "Global bytes sent to sites", registry=r)
        self.enrollments = Counter("fedvlm_enrollments", "Enrollment requests, by result", ["result"], registry=r)
        self.upload_seconds = Histogram("fedvlm_upload_duration_seconds", "Duration of one upload stream",
                                        buckets=TRANSFER_BUCKETS, registry=r)
        self.aggregation_seconds = Histogram("fedvlm_aggregation_duration_seconds", "Duration of one aggregation "
                                             "(load, combine, write and sign the global)", buckets=TRANSFER_BUCKETS,
                                             registry=r)
        self.round_seconds = Histogram("fedvlm_round_duration_seconds", "Duration of one round, from waiting for "
                                       "sites to its global", buckets=ROUND_BUCKETS, registry=r)

    def round_published(self, aggregation_seconds: float, round_seconds: float) -> None:
        """The round driver published a round's global (see RoundDriver's `on_published`)."""
        self.aggregation_seconds.observe(aggregation_seconds)
        self.round_seconds.observe(round_seconds)

    def interceptor(self) -> grpc.ServerInterceptor:
        """The gRPC interceptor that feeds the counters and the upload histogram."""
        return _Interceptor(self)

    def serve(self, listen: str) -> None:
        """Serve /metrics on `listen` (HOST:PORT) from a background thread."""
        prometheus_client.disable_created_metrics()  # no `_created` gauge beside every counter and histogram
        host, port = listen.rsplit(":", 1)
        start_http_server(int(port), addr=host, registry=self.registry)


def _code_name(context: grpc.ServicerContext) -> str:
    code = context.code()
    return code.name.lower() if isinstance(code, grpc.StatusCode) else "unknown"


class _Interceptor(grpc.ServerInterceptor):
    def __init__(self, telemetry: Telemetry) -> None:
        self.t = telemetry

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails):
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method
        if method == UPLOAD and handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(self._upload(handler.stream_unary),
                                                        handler.request_deserializer, handler.response_serializer)
        if method in (START_UPLOAD, ENROLL) and handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(self._unary(method, handler.unary_unary),
                                                       handler.request_deserializer, handler.response_serializer)
        if method == FETCH_GLOBAL and handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(self._fetch(handler.unary_stream),
                                                        handler.request_deserializer, handler.response_serializer)
        return handler

    def _upload(self, behaviour: Callable) -> Callable:
        def counted(frames: Iterator[Any]) -> Iterator[Any]:
            for frame in frames:
                self.t.received.inc(len(frame.data))
                yield frame

        def upload(request_iterator, context):
            started = time.monotonic()
            try:
                result = behaviour(counted(request_iterator), context)
            except Exception:
                self.t.updates_refused.labels(_code_name(context)).inc()
                raise
            finally:
                self.t.upload_seconds.observe(time.monotonic() - started)
            if result.digest:
                self.t.updates_accepted.inc()
            return result

        return upload

    def _unary(self, method: str, behaviour: Callable) -> Callable:
        def call(request, context):
            try:
                reply = behaviour(request, context)
            except Exception:
                if method == ENROLL:
                    self.t.enrollments.labels("refused").inc()
                else:
                    self.t.updates_refused.labels(_code_name(context)).inc()
                raise
            if method == ENROLL:
                self.t.enrollments.labels("accepted").inc()
            return reply

        return call

    def _fetch(self, behaviour: Callable) -> Callable:
        def fetch(request, context):
            for chunk in behaviour(request, context):
                self.t.sent.inc(len(chunk.data))
                yield chunk

        return fetch
