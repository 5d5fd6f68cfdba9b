"""federation.toml: the run the coordinator schedules, validated once at load with errors naming the key."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedvlm.adapter_limits import MAX_HEADER_BYTES
from fedvlm.spec import SpecError, TaskSpec
from fedvlm.tables import Duration, from_table, require


@dataclass(frozen=True)
class RunConfig:
    """How rounds are scheduled. Durations are seconds."""

    rounds: int = 5
    min_clients: int = 3  # live clients needed before a round starts
    clients_per_round: int = 3  # n sampled per round
    quorum: int = 3  # k of n accepted updates needed to aggregate at the deadline
    round_deadline: Duration = 600.0
    poll_interval: Duration = 1.0
    heartbeat_timeout: Duration = 60.0  # a client silent for longer is offline: not sampled, no round waits for it
    max_update_mb: float = 1024.0
    final_eval: bool = True  # after the last round, ask the sites to evaluate the final global

    def __post_init__(self) -> None:
        checks = [
            (self.rounds >= 1, "run.rounds", "must be >= 1"),
            (self.min_clients >= 1, "run.min_clients", "must be >= 1"),
            (self.clients_per_round >= 1, "run.clients_per_round", "must be >= 1"),
            (self.clients_per_round <= self.min_clients, "run.clients_per_round", "must be <= run.min_clients"),
            (1 <= self.quorum <= self.clients_per_round, "run.quorum", "must be between 1 and run.clients_per_round"),
            (self.round_deadline > 0, "run.round_deadline", "must be > 0"),
            (self.poll_interval > 0, "run.poll_interval", "must be > 0"),
            (self.heartbeat_timeout > self.poll_interval, "run.heartbeat_timeout", "must exceed run.poll_interval"),
            (self.max_update_mb > 0, "run.max_update_mb", "must be > 0"),
        ]
        for ok, key, why in checks:
            require(ok, key, why)

    @property
    def max_update_bytes(self) -> int:
        return int(self.max_update_mb * (1 << 20))


@dataclass(frozen=True)
class LimitsConfig:
    """What one site may send or hold (docs/operations.md, "Limits"). Each is checked before the work it bounds,
    and a refusal names its key. They bound the coordinator, not the run: editing them needs no new run."""

    header_bytes: int = 4 << 20  # the JSON header of an update's safetensors bytes
    tensors_per_update: int = 16384
    manifest_bytes: int = 16384  # the signed manifest's JSON
    metric_keys: int = 64  # keys of one metrics report
    metric_key_bytes: int = 64  # UTF-8 bytes of one metric key
    uploads_per_site: int = 2  # partial (announced, unfinished) uploads one site may hold at once
    streams_per_site: int = 2  # Upload streams one site may have open at once
    stream_idle_timeout: Duration = 60.0  # an Upload stream sending nothing for this long is cancelled
    partial_upload_retention: Duration = 86400.0  # an unfinished upload older than this is reclaimed

    def __post_init__(self) -> None:
        for key in ("header_bytes", "tensors_per_update", "manifest_bytes", "metric_keys", "metric_key_bytes",
                    "uploads_per_site", "streams_per_site"):
            require(getattr(self, key) >= 1, f"limits.{key}", "must be >= 1")
        require(self.header_bytes <= MAX_HEADER_BYTES, "limits.header_bytes", f"must be <= {MAX_HEADER_BYTES}")


@dataclass(frozen=True)
class FederationConfig:
    """The whole federation.toml: a name, the run schedule, the task every site trains and the limits per site."""

    name: str = "fedvlm"
    run: RunConfig = field(default_factory=RunConfig)
    task: TaskSpec = field(default_factory=TaskSpec)
    limits: LimitsConfig = field(default_factory=LimitsConfig)

    def __post_init__(self) -> None:
        require(isinstance(self.name, str) and self.name != "", "name", "must be a non-empty string")
        algorithm = self.task.algorithm
        if algorithm.secure_aggregation:  # the threshold is a number of the sampled sites
            from fedvlm.algorithms.secure_sum import threshold
            from fedvlm.security.secagg import SecAggError, check_threshold

            sampled = self.run.clients_per_round
            try:
                check_threshold(threshold(algorithm, sampled), sampled)
            except SecAggError as exc:
                raise SpecError(f"task.algorithm.secagg_threshold: {exc} (run.clients_per_round = {sampled})") from None
        if algorithm.aggregator == "krum":  # a round aggregates at least run.quorum updates
            f = algorithm.krum_byzantine
            require(self.run.quorum > 2 * f + 2, "task.algorithm.krum_byzantine",
                    f"krum with f = {f} needs more than 2f + 2 = {2 * f + 2} updates per round (Blanchard et al.), "
                    f"but run.quorum = {self.run.quorum} lets a round aggregate {self.run.quorum}")

    @classmethod
    def load(cls, path: Path) -> FederationConfig:
        """Parse and validate; raises SpecError naming the file and key on any bad value."""
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError as exc:
            raise SpecError(f"{path}: not found") from exc
        except tomllib.TOMLDecodeError as exc:
            raise SpecError(f"{path}: invalid TOML: {exc}") from exc
        try:
            return cls.from_dict(raw)
        except SpecError as exc:
            raise SpecError(f"{path}: {exc}") from exc

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> FederationConfig:
        """Parse and validate a federation.toml table; raises SpecError naming the key."""
        return from_table(cls, raw, "")


# Threads serving the federation port (`serve --threads`); sites' long-polls hold at most half of them, so quick
# calls (heartbeats, uploads) always find a free one.
DEFAULT_THREADS = 128

DEFAULT_TOML = """\
# fedvlm federation config. Edit before `fedvlm-coord serve`; the run starts with the values found then.
name = "{name}"

[run]
rounds = 5                 # federated rounds
min_clients = 3            # live clients needed before a round starts
clients_per_round = 3      # sites sampled per round
quorum = 3                 # accepted updates needed to aggregate when the deadline passes (k of n)
round_deadline = "10m"     # a round closes at its deadline; late updates are refused
poll_interval = "1s"
heartbeat_timeout = "60s"  # a site silent this long is offline: not sampled, and no round waits for it
max_update_mb = 1024       # larger updates are refused

[limits]                   # what one site may send or hold (docs/operations.md, "Limits"); these are the defaults
header_bytes = 4194304     # the JSON header of an update
tensors_per_update = 16384
manifest_bytes = 16384
metric_keys = 64           # keys per metrics report
metric_key_bytes = 64
uploads_per_site = 2       # unfinished uploads at once
streams_per_site = 2       # Upload streams at once
stream_idle_timeout = "60s"
partial_upload_retention = "24h"

[task]
model = "tiny-llava"       # a built-in preset, "hf:<local path>" or "hf:<hub id>[@<revision>]"
strategy = "F-CL"          # F-C connector | F-L LLM LoRA | F-CL both | F-2stage
task_type = "classification"
seed = 0
# quantization = "nf4"     # none | nf4 | int8: QLoRA, the base quantized at load (sites need fedvlm[qlora])

[task.lora]
r = 8
alpha = 32
dropout = 0.05

[task.train]
local_epochs = 1.0
batch_size = 8             # examples per forward pass of one process
lr = 0.001
# grad_accum_steps = 1     # an optimizer step takes batch_size * grad_accum_steps examples
# precision = "fp32"       # fp32 | bf16 | fp16 (autocast; fp16 with a loss scaler, CUDA sites only)
# gradient_checkpointing = false
# lr_schedule = "constant" # constant | cosine (over all the run's rounds)
# warmup_steps = 0

[task.algorithm]           # docs/algorithms.md
name = "fedavg"            # docs/algorithms.md: the algorithms and their keys
aggregator = "mean"        # mean | median | trimmed_mean | krum
"""
