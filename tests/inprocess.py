"""The coordinator's state machine in this process: an in-memory `State`, the real `RoundDriver` and `Intake`, real
certificates and signatures, a clock the test moves. No daemon, no gRPC, no site processes."""

from __future__ import annotations

from pathlib import Path

import torch

from fedvlm import adapters
from fedvlm.coordinator.blobs import BlobStore
from fedvlm.coordinator.config import FederationConfig, RunConfig
from fedvlm.coordinator.intake import Intake, UploadTicket
from fedvlm.coordinator.rounds import RoundDriver
from fedvlm.coordinator.state import Activity, Run, State
from fedvlm.security import pki, signing
from fedvlm.security.signing import UpdateManifest
from fedvlm.spec import TaskSpec

FEDERATION_ID = "f" * 32


class Clock:
    """A fake time source: starts at a fixed instant and moves only when told."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def tensors(value: float, shape: tuple[int, ...] = (2, 3)) -> dict[str, torch.Tensor]:
    """A two-tensor adapter with every element `value` (the update's content is easy to check)."""
    return {"layer.lora_A.weight": torch.full(shape, value), "layer.lora_B.weight": torch.full(shape[::-1], value)}


class InProcessCoordinator:
    """Driver + intake on an in-memory state with enrolled sites `names` (each with its own key and certificate)."""

    def __init__(self, tmp_path: Path, run: RunConfig | None = None, task: TaskSpec | None = None,
                 names: tuple[str, ...] = ("a", "b", "c")) -> None:
        self.clock = Clock()
        self.state = State.in_memory(clock=self.clock)
        self.blobs = BlobStore(tmp_path / "blobs")
        self.config = FederationConfig(run=run or RunConfig(), task=task or TaskSpec())
        ca_key, self.ca_cert = pki.create_ca("test-fed")
        self.server_key, self.server_cert = pki.issue_server_cert(ca_key, self.ca_cert, ["localhost"])
        self.state.init_federation(FEDERATION_ID, pki.fingerprint(self.ca_cert))
        self.driver = RoundDriver(self.state, self.blobs, self.config, FEDERATION_ID, self.server_key)
        self.accepted_signals = 0
        self.intake = Intake(self.state, self.blobs, tmp_path / "uploads", FEDERATION_ID,
                             self.config.run.max_update_bytes, self._on_accepted)
        self.keys, self.certs = {}, {}
        for name in names:
            key = pki.generate_key()
            cert = pki.issue_cert_for_key(ca_key, self.ca_cert, key.public_key(), name, "client", 3600)
            self.state.issue_token(f"{len(self.keys):016x}", name, b"proof", self.clock() + 3600)
            self.state.enroll_client(f"{len(self.keys):016x}", name, pki.fingerprint(cert))
            self.keys[name], self.certs[name] = key, cert

    def _on_accepted(self) -> None:
        self.accepted_signals += 1

    @property
    def run(self) -> Run:
        return self.state.current_run()

    def heartbeat(self, *names: str) -> None:
        for name in names or tuple(self.keys):
            self.state.record_heartbeat(name, Activity.IDLE, "", 0, 0)

    def manifest(self, name: str, data: bytes, round_: int | None = None, base: str | None = None,
                 num_examples: int = 10, **overrides) -> UpdateManifest:
        """The manifest site `name` would sign for `data` in the current round (or `round_`, from `base`)."""
        run = self.run
        number = run.round if round_ is None else round_
        if base is None:
            rnd = self.state.round(run.run_id, number)
            base = rnd.base_digest if rnd else signing.INITIAL_BASE
        fields = dict(federation_id=FEDERATION_ID, run_id=run.run_id, round=number, client=name, base_digest=base,
                      sha256=adapters.sha256_hex(data), size=len(data), num_examples=num_examples,
                      nonce=signing.new_nonce(), created_at=self.clock())
        fields.update(overrides)
        return UpdateManifest(**fields)

    def start(self, name: str, manifest: UpdateManifest, key=None) -> UploadTicket:
        signature = signing.sign(key or self.keys[name], manifest.canonical())
        return self.intake.start(name, self.certs[name], manifest.to_json(), signature)

    def send(self, name: str, values: dict[str, torch.Tensor], num_examples: int = 10, **manifest_args) -> str:
        """Announce and upload `values` in one stream as site `name`; returns the accepted update's digest."""
        data = adapters.to_bytes(values)
        ticket = self.start(name, self.manifest(name, data, num_examples=num_examples, **manifest_args))
        digest, received = self.intake.receive(name, iter([(ticket.upload_id, 0, data)]))
        assert received == len(data)
        return digest

    def start_round_one(self, initial: dict[str, torch.Tensor] | None = None) -> str:
        """A run through init (site "a", the only live one, provides `initial`) to round 1 waiting; returns
        global 0's digest."""
        run = self.driver.ensure_run()
        self.heartbeat("a")
        self.state.claim_init(run.run_id, "a")
        self.send("a", initial or tensors(0.0), round_=0)
        self.driver.tick()
        return self.state.global_version(run.run_id, 0).digest

    def open_round_one(self, initial: dict[str, torch.Tensor] | None = None) -> str:
        """`start_round_one`, then every site is live and the driver samples round 1."""
        digest = self.start_round_one(initial)
        self.heartbeat()
        self.driver.tick()
        return digest

    def global_tensors(self, number: int) -> dict[str, torch.Tensor]:
        version = self.state.global_version(self.run.run_id, number)
        return adapters.from_bytes(self.blobs.read(version.digest))
