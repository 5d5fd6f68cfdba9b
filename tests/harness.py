"""Real processes for integration tests: a coordinator daemon, raw protocol sites, fedvlm-client processes."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import grpc
import torch
from typer.testing import CliRunner

from fedvlm import adapters
from fedvlm.client.identity import Identity, StateDir
from fedvlm.coordinator.cli import app as coord_app
from fedvlm.coordinator.layout import FederationDir
from fedvlm.security import signing
from fedvlm.security.signing import UpdateManifest
from fedvlm.security.tokens import TOKEN_PREFIX
from fedvlm.wire.v1 import federation_pb2 as pb
from fedvlm.wire.v1 import federation_pb2_grpc

BIN = Path(sys.executable).parent


def coord_cli(*args: str) -> str:
    """Run a fedvlm-coord command in-process; raises with its output if it fails."""
    result = CliRunner().invoke(coord_app, list(args))
    if result.exit_code != 0:
        raise RuntimeError(f"fedvlm-coord {' '.join(args)} failed ({result.exit_code}): {result.output}")
    return result.output


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


class Coordinator:
    """`fedvlm-coord serve` as a subprocess on ephemeral loopback ports."""

    def __init__(self, root: Path, config_toml: str, extra_args: tuple[str, ...] = ()) -> None:
        self.fed = FederationDir(root)
        self.init_output = coord_cli("init", "--dir", str(root), "--host", "localhost,127.0.0.1", "--name", "test-fed")
        self.fed.config.write_text(config_toml)
        self.proc: subprocess.Popen | None = None
        self.extra_args = extra_args
        self.log = root / "coordinator.log"
        self.address = ""
        self.enroll_address = ""
        self.dashboard_address = ""
        self.env: dict[str, str] = {}  # extra environment of the daemon process

    def start(self) -> None:
        """Start the daemon; a restart binds the same ports again, as a real restarted daemon would."""
        self.fed.address_file.unlink(missing_ok=True)
        listen = self.address or "127.0.0.1:0"
        enroll_listen = self.enroll_address or "127.0.0.1:0"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [str(BIN / "fedvlm-coord"), "serve", "--dir", str(self.fed.root), "--listen", listen,
                 "--enroll-listen", enroll_listen, "--log-level", "DEBUG", *self.extra_args],
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env})
        info = wait_for(self._bound, 60, "the coordinator to bind its ports")
        self.address, self.enroll_address = info["federation"], info["enrollment"]
        self.dashboard_address = info.get("dashboard", "")

    def _bound(self):
        if self.proc.poll() is not None:
            raise RuntimeError(f"coordinator exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
        if not self.fed.address_file.exists():
            return None
        return json.loads(self.fed.address_file.read_text())

    @property
    def dashboard_token(self) -> str:
        """The dashboard token `init` printed (the line after its heading)."""
        lines = self.init_output.splitlines()
        return next(lines[i + 1].strip() for i, line in enumerate(lines) if line.startswith("dashboard token"))

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)

    def token(self, name: str, ttl: str = "1h") -> str:
        port = self.enroll_address.rsplit(":", 1)[1] if self.enroll_address else "1"
        output = coord_cli("enroll", name, "--dir", str(self.fed.root), "--ttl", ttl, "--enroll-port", port)
        # the token's own line: the in-process run's output also holds whatever the daemon's threads logged meanwhile
        return next(line for line in reversed(output.splitlines()) if line.startswith(TOKEN_PREFIX))

    def query(self, sql: str, args: tuple = ()) -> list:
        """Rows of a read-only query on the daemon's state.db (tests look at the stored rows themselves)."""
        db = sqlite3.connect(f"file:{self.fed.database}?mode=ro", uri=True)
        db.row_factory = sqlite3.Row
        try:
            db.execute("PRAGMA busy_timeout=10000")
            return [dict(r) for r in db.execute(sql, args).fetchall()]
        finally:
            db.close()

    def count(self, table: str) -> int:
        return self.query(f"SELECT COUNT(*) AS n FROM {table}")[0]["n"]

    def blob(self, digest: str) -> dict[str, torch.Tensor]:
        """The tensors of a stored update or global, read from the daemon's blob store."""
        return adapters.from_bytes(self.fed.blobs.joinpath(digest[:2], digest).read_bytes())


class RawSite:
    """A site speaking the wire protocol directly (real enrollment, real mTLS), for protocol tests."""

    def __init__(self, coordinator: Coordinator, name: str, root: Path) -> None:
        self.state = StateDir(root / name)
        self.identity: Identity = self.state.enroll(coordinator.address, coordinator.token(name))
        self.channel = self.identity.channel(coordinator.address)
        self.stub = federation_pb2_grpc.FederationStub(self.channel)

    def poll(self, state: int = pb.CLIENT_STATE_IDLE) -> pb.Assignment:
        return self.stub.Poll(pb.PollRequest(state=state), timeout=10)

    def manifest(self, task: pb.Assignment, data: bytes, **overrides) -> UpdateManifest:
        fields = dict(federation_id=self.identity.federation_id, run_id=task.run_id, round=task.round,
                      client=self.identity.name,
                      base_digest=task.global_version.digest if task.round else signing.INITIAL_BASE,
                      sha256=adapters.sha256_hex(data), size=len(data), num_examples=10,
                      nonce=signing.new_nonce(), created_at=time.time())
        fields.update(overrides)
        return UpdateManifest(**fields)

    def send(self, manifest: UpdateManifest, data: bytes, key=None) -> pb.UploadResult:
        signature = signing.sign(key or self.identity.key, manifest.canonical())
        state = self.stub.StartUpload(pb.StartUploadRequest(manifest_json=manifest.to_json(), signature=signature),
                                      timeout=10)
        frames = [pb.UploadChunk(upload_id=state.upload_id, offset=state.offset, data=data[state.offset:])]
        return self.stub.Upload(iter(frames), timeout=30)

    def close(self) -> None:
        self.channel.close()


def tensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    return adapters.to_bytes(tensors, metadata)


def rpc_code(fn) -> grpc.StatusCode:
    """Call fn and return the gRPC status code it fails with (AssertionError if it succeeds)."""
    try:
        fn()
    except grpc.RpcError as exc:
        return exc.code()
    raise AssertionError("expected the call to be refused")


def env_for_subprocess(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    env.update(extra)
    return env


def start_site(coord: Coordinator, name: str, data: Path, root: Path, cache: Path, *extra: str,
               token: str | None = None) -> subprocess.Popen:
    """A `fedvlm-client` process for site `name`: state in root/sites/NAME, output appended to root/NAME.log."""
    cmd = [str(BIN / "fedvlm-client"), "--coordinator", coord.address, "--join-token", token or coord.token(name),
           "--data", str(data), "--state", str(root / "sites" / name), "--device", "cpu", "--threads", "1", *extra]
    with open(root / f"{name}.log", "ab") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                env=env_for_subprocess(FEDVLM_CACHE=str(cache)))


def start_sites(coord: Coordinator, site_dirs, root: Path, cache: Path,
                extra=lambda index: ()) -> dict[str, subprocess.Popen]:
    """One `start_site` per data folder, named site-1, site-2, ...; `extra(i)` adds flags for site i."""
    return {f"site-{i + 1}": start_site(coord, f"site-{i + 1}", data, root, cache, *extra(i))
            for i, data in enumerate(site_dirs)}


def wait_sites_ok(clients: dict[str, subprocess.Popen], root: Path, timeout: float = 240) -> None:
    """Wait for every site process to exit; each must exit 0 (the failure shows the end of its log)."""
    wait_for(lambda: all(p.poll() is not None for p in clients.values()), timeout, "the sites to finish")
    for name, proc in clients.items():
        assert proc.returncode == 0, (root / f"{name}.log").read_text()[-3000:]


def shut_down(coord: Coordinator, procs: Iterable[subprocess.Popen | None], sig: int = signal.SIGKILL) -> None:
    """A process test's clean-up: kill every site process still running, then stop the coordinator with `sig`."""
    for proc in procs:
        if proc is not None and proc.poll() is None:
            proc.kill()
    coord.kill(sig)


def small_sites(digits: Path, root: Path, count: int, train: int, test: int) -> list[Path]:
    """``count`` site folders under ``root`` holding the first ``train`` / ``test`` records (and their images) of
    the built-in digits' sites 0..count-1: small federations for tests about what travels, not about accuracy."""
    import shutil

    out = []
    for i in range(count):
        site = root / f"site-data-{i}"
        (site / "images").mkdir(parents=True, exist_ok=True)
        for split, n in (("train", train), ("test", test)):
            records = json.loads((digits / f"site_{i}" / f"{split}.json").read_text())[:n]
            for record in records:
                shutil.copy(digits / f"site_{i}" / record["image"], site / record["image"])
            (site / f"{split}.json").write_text(json.dumps(records))
        out.append(site)
    return out
