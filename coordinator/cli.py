"""`fedvlm-coord`: create a federation, enroll sites, run the daemon, watch and export."""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import shlex
import sys
import time
import uuid
from pathlib import Path

import typer
from rich.console import Console
from rich.live import Live

from fedvlm.logs import setup_logging
from fedvlm.security import pki
from fedvlm.security.tokens import TokenError, parse_duration
from fedvlm.spec import SpecError
from fedvlm.status_view import change_key, client_table, render, rounds_table, runs_table, summary_line, view

from .audit import AuditError, verify_audit
from .blobs import BlobStore
from .config import DEFAULT_THREADS, DEFAULT_TOML, FederationConfig
from .dashboard import issue_dashboard_token
from .enrollment import Enroller, check_site_name
from .layout import FederationDir
from .runs import ConfigConflict, config_source, find_run, new_run
from .state import State, StateError, TransitionRefused
from .status import document, local_document

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="The fedvlm coordinator: federation set-up, the daemon, status and export.")
audit_app = typer.Typer(add_completion=False, no_args_is_help=True, help="The hash-chained audit log.")
app.add_typer(audit_app, name="audit")
run_app = typer.Typer(add_completion=False, no_args_is_help=True,
                      help="Runs: each a schedule and task in this federation (docs/operations.md, \"Runs\").")
app.add_typer(run_app, name="run")
console = Console()
err = Console(stderr=True, soft_wrap=True)  # one line per error, whatever the width

DirOpt = typer.Option(Path("fedvlm-federation"), "--dir", "-d", envvar="FEDVLM_DIR", help="Federation state directory.")
JsonOpt = typer.Option(False, "--json", help="Machine-readable output.")
DEFAULT_ENROLL_PORT = 50052


def fail(message: str) -> None:
    err.print(f"[red]error:[/] {message}")
    raise typer.Exit(1)


def _open(dir: Path, readonly: bool = False) -> tuple[FederationDir, State]:
    fed = FederationDir(dir)
    if not fed.exists():
        fail(f"{dir} is not a federation directory (run `fedvlm-coord init --dir {dir}` first)")
    try:
        return fed, State(fed.database, readonly=readonly)
    except StateError as exc:
        fail(str(exc))


@app.command()
def init(dir: Path = DirOpt,
         host: str = typer.Option("localhost", "--host", help="Comma-separated DNS names / IPs clients use to "
                                  "reach the coordinator (certificate SANs)."),
         name: str = typer.Option("fedvlm", "--name", help="Federation name (CA common name).")) -> None:
    """Create a federation: CA, server and admin certificates, state database, a default federation.toml, and the
    dashboard token. Secrets are 0600 in a 0700 directory."""
    fed = FederationDir(dir)
    if fed.database.exists() or fed.ca_cert.exists():
        fail(f"{dir} already holds a federation; refusing to overwrite it")
    hosts = [h.strip() for h in host.split(",") if h.strip()]
    if not hosts:
        fail("--host needs at least one name")
    private_dir(fed.root)
    private_dir(fed.pki)
    ca_key, ca_cert = pki.create_ca(name)
    server_key, server_cert = pki.issue_server_cert(ca_key, ca_cert, hosts)
    admin_key = pki.generate_key()
    admin_cert = pki.issue_cert_for_key(ca_key, ca_cert, admin_key.public_key(), "admin", "admin", 3650 * 86400)
    pki.write_private(fed.ca_key, pki.key_to_pem(ca_key))
    pki.write_public(fed.ca_cert, pki.cert_to_pem(ca_cert))
    pki.write_private(fed.server_key, pki.key_to_pem(server_key))
    pki.write_public(fed.server_cert, pki.cert_to_pem(server_cert))
    pki.write_private(fed.admin_key, pki.key_to_pem(admin_key))
    pki.write_public(fed.admin_cert, pki.cert_to_pem(admin_cert))
    if not fed.config.exists():
        fed.config.write_text(DEFAULT_TOML.format(name=name))
    os.close(os.open(fed.database, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))  # SQLite's -wal/-shm copy its mode
    state = State(fed.database)
    state.init_federation(uuid.uuid4().hex, pki.fingerprint(ca_cert))
    token = issue_dashboard_token(state)
    state.close()
    # Plain lines, never wrapped: the fingerprint, the token and each command can be copied as they are.
    typer.echo(f"federation {name} created in {dir}")
    typer.echo(f"server certificate for: {', '.join(hosts)}")
    typer.echo("CA fingerprint (sha256):")
    typer.echo(f"  {pki.fingerprint(ca_cert)}")
    typer.echo("dashboard token (shown once; `fedvlm-coord dashboard-token` issues a new one):")
    typer.echo(f"  {token}")
    typer.echo("next:")
    typer.echo(f"  {shlex.quote(os.environ.get('EDITOR', 'vi'))} {shlex.quote(str(fed.config))}")
    typer.echo(f"  fedvlm-coord enroll SITE --dir {shlex.quote(str(dir))}")
    typer.echo(f"  fedvlm-coord serve --dir {shlex.quote(str(dir))}")


def private_dir(path: Path) -> None:
    """Create `path` with mode 0700; an existing directory of this user is set to 0700 too (one of another owner,
    e.g. a volume mounted for a group, is left as it is)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.stat().st_uid == os.getuid():
        path.chmod(0o700)


@app.command("dashboard-token")
def dashboard_token(dir: Path = DirOpt) -> None:
    """Issue a new dashboard token (the previous one stops working) and print it."""
    _, state = _open(dir)
    token = issue_dashboard_token(state)
    state.close()
    typer.echo(token)


@app.command()
def enroll(site: str = typer.Argument(..., help="Site name (becomes its certificate's common name)."),
           dir: Path = DirOpt,
           ttl: str = typer.Option("24h", "--ttl", help="Token lifetime, e.g. 15m, 24h, 7d."),
           enroll_port: int = typer.Option(0, "--enroll-port",
                                           help="Enrollment port the site will use (default: the running "
                                                f"daemon's, else {DEFAULT_ENROLL_PORT}).")) -> None:
    """Print a one-time join token for SITE."""
    fed, state = _open(dir)
    try:
        check_site_name(site)
        seconds = parse_duration(ttl)
    except (ValueError, TokenError) as exc:
        fail(str(exc))
    if not enroll_port:
        enroll_port = DEFAULT_ENROLL_PORT
        if fed.address_file.exists():
            enroll_port = int(json.loads(fed.address_file.read_text())["enrollment"].rsplit(":", 1)[1])
    enroller = Enroller(state, None, pki.load_cert_pem(fed.ca_cert.read_bytes()), state.federation_id())
    token = enroller.issue_token(site, seconds, enroll_port)
    state.close()
    typer.echo(token.encode())


@app.command()
def serve(dir: Path = DirOpt,
          listen: str = typer.Option("0.0.0.0:50051", "--listen", help="Federation port (mutual TLS)."),
          enroll_listen: str = typer.Option(f"0.0.0.0:{DEFAULT_ENROLL_PORT}", "--enroll-listen",
                                            help="Enrollment port (token-authenticated, no TLS)."),
          metrics_listen: str = typer.Option("", "--metrics-listen",
                                             help="Serve Prometheus /metrics on HOST:PORT (off by default)."),
          dashboard_listen: str = typer.Option("", "--dashboard-listen",
                                               help="Serve the read-only web dashboard on HOST:PORT (HTTPS; the admin "
                                               "certificate or the dashboard token from `init`). Off by default."),
          exit_when_done: bool = typer.Option(False, "--exit-when-done", help="Exit once the run has finished."),
          threads: int = typer.Option(DEFAULT_THREADS, "--threads", min=4,
                                      help="Threads serving the federation port; sites' long-polls hold at most half "
                                      "of them."),
          log_level: str = typer.Option("INFO", "--log-level")) -> None:
    """Run the coordinator daemon (restart-safe: it resumes the run and round it was in)."""
    setup_logging(log_level)
    fed, state = _open(dir)  # refuses a directory this version cannot read, in one line
    state.close()
    from .server import Coordinator

    try:
        coordinator = Coordinator(fed, listen, enroll_listen, metrics_listen or None, dashboard_listen or None,
                                  threads)
        coordinator.start()
    except (SpecError, StateError, OSError, ConfigConflict) as exc:
        fail(str(exc))
    # What is alive once the daemon serves (its modules and torch's: ~190k objects) lives as long as the process:
    # moved out of the cyclic collector's sight, a full collection no longer traverses it, which took 74-85 ms under
    # load with every handler thread stopped (docs/performance.md, section 6).
    gc.freeze()
    coordinator.wait(exit_when_done=exit_when_done)


def _status_dict(dir: Path | None, coordinator: str | None, cert: Path | None, key: Path | None,
                 ca: Path | None, run: str | None = None) -> dict:
    """The status document (coordinator/status.py), from the live daemon's Admin RPC or from state.db."""
    if coordinator:
        from fedvlm.wire.credentials import mtls_channel_from_files
        from fedvlm.wire.v1 import admin_pb2, admin_pb2_grpc

        if dir is not None:
            fed = FederationDir(dir)
            cert, key, ca = cert or fed.admin_cert, key or fed.admin_key, ca or fed.ca_cert
        if not (cert and key and ca):
            fail("--coordinator needs --cert, --key and --ca (or --dir holding the admin certificate)")
        import grpc

        with mtls_channel_from_files(coordinator, key, cert, ca) as channel:
            try:
                reply = admin_pb2_grpc.AdminStub(channel).GetStatus(admin_pb2.StatusRequest(run=run or ""),
                                                                     timeout=10)
            except grpc.RpcError as exc:
                fail(f"{coordinator}: {exc.code().name}: {exc.details()}")
        return document(reply)
    fed, state = _open(dir or Path("fedvlm-federation"), readonly=True)
    try:
        return local_document(state, fed, _run_or_fail(state, run) if run else None)
    finally:
        state.close()


def _run_or_fail(state: State, ref: str):
    found = find_run(state, ref)
    if found is None:
        fail(f"no run {ref!r} (see `fedvlm-coord run list`)")
    return found


RemoteOpt = typer.Option(None, "--coordinator", help="HOST:PORT of a live coordinator (uses the Admin RPC).")
CertOpt = typer.Option(None, "--cert", help="Admin certificate (PEM).")
KeyOpt = typer.Option(None, "--key", help="Admin key (PEM).")
CaOpt = typer.Option(None, "--ca", help="Federation CA certificate (PEM).")
LocalDirOpt = typer.Option(None, "--dir", "-d", envvar="FEDVLM_DIR", help="Federation state directory (read directly).")
RunOpt = typer.Option(None, "--run", help="A run number (see `fedvlm-coord run list`) or id; default: the current run.")


@app.command()
def status(dir: Path = LocalDirOpt, coordinator: str = RemoteOpt, cert: Path = CertOpt, key: Path = KeyOpt,
           ca: Path = CaOpt, as_json: bool = JsonOpt,
           watch: float = typer.Option(0.0, "--watch", help="Refresh every N seconds until interrupted (to a pipe "
                                       "or file: one line per change; with --json one JSON document per line).")
           ) -> None:
    """Run, round, phase, deadline, quorum and every client with its state, transfer, heartbeat and metrics."""
    def fetch() -> dict:
        return _status_dict(dir, coordinator, cert, key, ca)

    if watch <= 0:
        if as_json:
            typer.echo(_json(fetch()))
        else:
            render(fetch(), console)
        return
    try:
        if as_json or not console.is_terminal:
            _watch_lines(fetch, watch, as_json)
        else:
            with Live(console=console, refresh_per_second=4) as live:
                while True:
                    live.update(view(fetch()))
                    time.sleep(watch)
    except KeyboardInterrupt:
        pass


def _watch_lines(fetch, every: float, as_json: bool) -> None:
    """One line each time the status changes (a JSON document with --json), flushed at once, for pipes and logs."""
    last = None
    while True:
        status = fetch()
        key = change_key(status)
        if key != last:
            line = _json(status, indent=None) if as_json else summary_line(status)
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
            last = key
        time.sleep(every)


@app.command()
def clients(dir: Path = LocalDirOpt, coordinator: str = RemoteOpt, cert: Path = CertOpt, key: Path = KeyOpt,
            ca: Path = CaOpt, as_json: bool = JsonOpt) -> None:
    """Enrolled sites with their state."""
    s = _status_dict(dir, coordinator, cert, key, ca)
    if as_json:
        typer.echo(_json(s["clients"]))
    else:
        console.print(client_table(s))


@app.command()
def rounds(dir: Path = LocalDirOpt, coordinator: str = RemoteOpt, cert: Path = CertOpt, key: Path = KeyOpt,
           ca: Path = CaOpt, as_json: bool = JsonOpt, run: str = RunOpt) -> None:
    """Global versions of a run (default: the current one) with their number of updates and evaluation metrics."""
    s = _status_dict(dir, coordinator, cert, key, ca, run)
    if as_json:
        typer.echo(_json(s["rounds"]))
    else:
        console.print(rounds_table(s))


@app.command()
def health(dir: Path = DirOpt,
           coordinator: str = typer.Option("", "--coordinator", help="HOST:PORT of the federation port (default: "
                                           "127.0.0.1 and the port `serve` recorded, else 50051)."),
           timeout: float = typer.Option(3.0, "--timeout", help="Seconds to wait for the answer.")) -> None:
    """Exit 0 if the daemon's federation port answers gRPC health SERVING over mutual TLS with the admin
    certificate: the container and Kubernetes probe, so the enrollment port can be closed once sites joined."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from fedvlm.wire.credentials import mtls_channel

    fed = FederationDir(dir)
    if not coordinator:
        port = 50051
        if fed.address_file.exists():
            port = int(json.loads(fed.address_file.read_text())["federation"].rsplit(":", 1)[1])
        coordinator = f"127.0.0.1:{port}"
    try:
        server_cert = pki.load_cert_pem(fed.server_cert.read_bytes())
        channel = mtls_channel(coordinator, fed.admin_key.read_bytes(), fed.admin_cert.read_bytes(),
                               fed.ca_cert.read_bytes(), server_name=pki.cert_hosts(server_cert)[0])
    except (OSError, ValueError) as exc:
        fail(f"cannot probe with {dir}'s admin certificate: {exc}")
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError as exc:
            fail(f"{coordinator}: {exc.code().name}: {exc.details()}")
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        fail(f"{coordinator}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}")
    typer.echo(f"{coordinator}: SERVING")


def _json(value, indent: int | None = 2) -> str:
    """`--json` output: always valid JSON (a non-finite number, which JSON cannot hold, is written as null)."""
    def finite(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: finite(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [finite(x) for x in v]
        return v

    return json.dumps(finite(value), indent=indent, sort_keys=True, allow_nan=False)


@app.command()
def revoke(site: str, dir: Path = DirOpt) -> None:
    """Refuse SITE from now on (its certificate stops working at the next RPC)."""
    _, state = _open(dir)
    changed = state.revoke_client(site)
    state.close()
    if not changed:
        fail(f"no enrolled site named {site!r}")
    console.print(f"revoked {site}")


@app.command()
def export(dir: Path = DirOpt,
           round_: int = typer.Option(None, "--round", help="Global round to export (default: the latest)."),
           run: str = RunOpt,
           out: Path = typer.Option(..., "--out", help="New directory for the PEFT adapter.")) -> None:
    """Write a global version as a PEFT adapter directory (loads with PeftModel.from_pretrained)."""
    from .export import ExportError, export_global  # imports torch: only here, so other commands start fast

    fed, state = _open(dir, readonly=True)
    try:
        chosen = _run_or_fail(state, run) if run else state.current_run()
        exported = export_global(state, BlobStore(fed.blobs), pki.load_cert_pem(fed.server_cert.read_bytes()),
                                 chosen, round_, out)
    except ExportError as exc:
        fail(str(exc))
    finally:
        state.close()
    typer.echo(f"exported run {exported.run_number} round {exported.round} to {exported.path}")
    typer.echo(f"base model: {exported.base.describe()}")


@run_app.command("new")
def run_new(dir: Path = DirOpt,
            config: Path = typer.Option(None, "--config", help="A TOML file with [run] and [task] tables, as in "
                                        "federation.toml (default: the federation's federation.toml).")) -> None:
    """Start a new run in this federation: enrolled sites take part without a new token."""
    fed, state = _open(dir)
    path = config or fed.config
    try:
        loaded = FederationConfig.load(path)
        run = new_run(state, loaded, config_source(fed, path))
    except (SpecError, TransitionRefused) as exc:
        fail(str(exc))
    finally:
        state.close()
    typer.echo(f"run {run.number} ({run.run_id}) created from {path}: {run.config.rounds} rounds, model "
               f"{loaded.task.model}, strategy {loaded.task.strategy}; a running coordinator starts it now")


@run_app.command("list")
def run_list(dir: Path = LocalDirOpt, coordinator: str = RemoteOpt, cert: Path = CertOpt, key: Path = KeyOpt,
             ca: Path = CaOpt, as_json: bool = JsonOpt) -> None:
    """Every run of the federation, oldest first."""
    s = _status_dict(dir, coordinator, cert, key, ca)
    if as_json:
        typer.echo(_json(s["runs"]))
    else:
        console.print(runs_table(s))


@run_app.command("stop")
def run_stop(dir: Path = DirOpt, run: str = RunOpt,
             reason: str = typer.Option("stopped by the operator", "--reason", help="Shown by status.")) -> None:
    """Stop the current run (or --run): its open round takes no more updates and the sites are told it is over."""
    _, state = _open(dir)
    try:
        target = _run_or_fail(state, run) if run else state.current_run()
        if target is None:
            fail("no run in this federation yet")
        stopped = state.stop_run(target.run_id, " ".join(reason.split()))
    except TransitionRefused as exc:
        fail(str(exc))
    finally:
        state.close()
    typer.echo(f"run {stopped.number} ({stopped.run_id}) stopped at round {stopped.round}: {stopped.stop_reason}")


@audit_app.command("verify")
def audit_verify(dir: Path = DirOpt) -> None:
    """Re-check the audit hash chain, every global's signature and every global's bytes."""
    fed, state = _open(dir, readonly=True)
    try:
        report = verify_audit(state, BlobStore(fed.blobs), pki.load_cert_pem(fed.server_cert.read_bytes()))
    except AuditError as exc:
        fail(f"audit verification failed: {exc}")
    finally:
        state.close()
    console.print(f"audit log OK: {report.entries} entries, {report.globals_checked} signed global versions verified")


def main() -> None:
    logging.captureWarnings(True)
    app()
