"""The coordinator daemon: state, round driver and two gRPC servers.

- the federation port (mutual TLS required at the handshake): Federation, Admin, health, reflection;
- the enrollment port (no TLS; token HMAC + CA pin, see enrollment.proto): Enrollment, health, reflection.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from fedvlm.atomic import write_bytes_atomic
from fedvlm.security import pki
from fedvlm.wire.credentials import SERVER_OPTIONS, mtls_server_credentials
from fedvlm.wire.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    enrollment_pb2,
    enrollment_pb2_grpc,
    federation_pb2,
    federation_pb2_grpc,
    secagg_pb2,
    secagg_pb2_grpc,
)

from .blobs import BlobStore
from .changes import Changes
from .config import DEFAULT_THREADS, FederationConfig
from .dashboard import Dashboard
from .enrollment import Enroller
from .intake import Intake
from .layout import FederationDir
from .rounds import RoundDriver
from .runs import ConfigWatch, check_serve_config
from .secagg_service import SecureAggregationService
from .service import AdminService, EnrollmentService, FederationService
from .state import State
from .telemetry import Telemetry

log = logging.getLogger(__name__)

HEARTBEAT_FLUSH_SECONDS = 0.25  # the sites' accepted heartbeats are written to state.db this often (State)


@dataclass(frozen=True)
class Bound:
    federation: str
    enrollment: str


class Coordinator:
    """Everything a running coordinator holds; `start()` binds the ports, `stop()` shuts down cleanly."""

    def __init__(self, fed: FederationDir, listen: str, enroll_listen: str, metrics_listen: str | None = None,
                 dashboard_listen: str | None = None, threads: int = DEFAULT_THREADS):
        self.fed = fed
        self.threads = threads
        self.changes = Changes()
        self.config = FederationConfig.load(fed.config)
        self.state = State(fed.database)
        self.federation_id = self.state.federation_id()
        self.blobs = BlobStore(fed.blobs)
        self.ca_cert = pki.load_cert_pem(fed.ca_cert.read_bytes())
        self.server_key = pki.load_key_pem(fed.server_key.read_bytes())
        self.telemetry = Telemetry(self.state)
        self.driver = RoundDriver(self.state, self.blobs, self.config, self.federation_id, self.server_key,
                                  on_published=self._round_published, on_change=self.changes.notify)
        self.intake = Intake(self.state, self.blobs, fed.uploads, self.federation_id,
                             self.config.run.max_update_bytes, self.driver.wake, self.config.limits)
        self.enroller = Enroller(self.state, pki.load_key_pem(fed.ca_key.read_bytes()), self.ca_cert,
                                 self.federation_id)
        self.listen, self.enroll_listen, self.metrics_listen = listen, enroll_listen, metrics_listen
        self.dashboard = Dashboard(fed, self.state, dashboard_listen) if dashboard_listen else None
        self._stop = threading.Event()
        self._servers: list[grpc.Server] = []
        self._driver_thread: threading.Thread | None = None
        self._heartbeat_thread: threading.Thread | None = None

    def _round_published(self, aggregation_seconds: float, round_seconds: float) -> None:
        self.telemetry.round_published(aggregation_seconds, round_seconds)
        self.intake.reclaim()  # the closed round's unfinished uploads can never be accepted now

    def start(self) -> Bound:
        check_serve_config(self.fed, self.state)  # an edited federation.toml is never silently ignored
        self.driver.ensure_run()
        self.driver.tick()
        self.intake.reclaim()
        interceptors = [self.telemetry.interceptor()]
        main = grpc.server(futures.ThreadPoolExecutor(max_workers=self.threads), options=SERVER_OPTIONS,
                           interceptors=interceptors)
        federation = FederationService(self.state, self.blobs, self.intake, self.config, self.federation_id,
                                       self.fed.server_cert.read_bytes(), self.changes, max_waiting=self.threads // 2)
        federation_pb2_grpc.add_FederationServicer_to_server(federation, main)
        secagg_pb2_grpc.add_SecureAggregationServicer_to_server(
            SecureAggregationService(self.state, self.federation_id, federation._client), main)
        admin_pb2_grpc.add_AdminServicer_to_server(AdminService(self.state, self.config, self.fed), main)
        creds = mtls_server_credentials(self.fed.server_key.read_bytes(), self.fed.server_cert.read_bytes(),
                                        self.fed.ca_cert.read_bytes())
        main_port = main.add_secure_port(self.listen, creds)
        enroll = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=SERVER_OPTIONS,
                             interceptors=interceptors)
        enrollment_pb2_grpc.add_EnrollmentServicer_to_server(EnrollmentService(self.enroller), enroll)
        enroll_port = enroll.add_insecure_port(self.enroll_listen)
        if not main_port or not enroll_port:
            raise OSError(f"could not bind {self.listen} / {self.enroll_listen}")
        for server, services in ((main, [federation_pb2.DESCRIPTOR.services_by_name["Federation"].full_name,
                                         admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name,
                                         secagg_pb2.DESCRIPTOR.services_by_name["SecureAggregation"].full_name]),
                                 (enroll, [enrollment_pb2.DESCRIPTOR.services_by_name["Enrollment"].full_name])):
            health_servicer = health.HealthServicer()
            for name in ["", *services]:
                health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
            health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
            reflection.enable_server_reflection([*services, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
            server.start()
            self._servers.append(server)
        if self.metrics_listen:
            self.telemetry.serve(self.metrics_listen)
        self._driver_thread = threading.Thread(target=self.driver.loop, args=(self._stop,), daemon=True,
                                               name="round-driver")
        self._driver_thread.start()
        self._heartbeat_thread = threading.Thread(target=self._write_heartbeats, daemon=True, name="heartbeats")
        self._heartbeat_thread.start()
        bound = Bound(_with_port(self.listen, main_port), _with_port(self.enroll_listen, enroll_port))
        addresses = {"federation": bound.federation, "enrollment": bound.enrollment, "pid": os.getpid()}
        if self.dashboard:
            addresses["dashboard"] = self.dashboard.start()
        write_bytes_atomic(self.fed.address_file, json.dumps(addresses).encode())
        log.info("serving federation on %s (mTLS), enrollment on %s", bound.federation, bound.enrollment)
        return bound

    def _write_heartbeats(self) -> None:
        while not self._stop.wait(HEARTBEAT_FLUSH_SECONDS):
            try:
                self.state.flush_heartbeats()
            except Exception:  # noqa: BLE001 - e.g. the disk is full: logged, retried, the daemon goes on
                log.exception("writing heartbeats failed; retrying")

    def run_finished(self) -> bool:
        run = self.state.current_run()
        return run is not None and not run.state.active

    def wait(self, exit_when_done: bool = False) -> None:
        """Block until SIGINT/SIGTERM (or, with exit_when_done, until the run is over and sites were told). Every
        few seconds, federation.toml is compared with the current run (a difference is logged once)."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self._stop.set())
        watch = ConfigWatch(self.fed, self.state)
        ticks = 0
        while not self._stop.wait(0.5):
            if ticks % 10 == 0:
                watch.check()
            ticks += 1
            if exit_when_done and self.run_finished():
                self._stop.wait(3 * self.state.current_run().config.poll_interval)  # let polling sites hear it
                break
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        if self.dashboard:
            self.dashboard.stop()
        for server in self._servers:
            server.stop(grace=2).wait()
        for thread in (self._driver_thread, self._heartbeat_thread):
            if thread:
                thread.join(timeout=5)
        self.state.close()


def _with_port(listen: str, port: int) -> str:
    host = listen.rsplit(":", 1)[0]
    return f"{host}:{port}"
