"""What the coordinator's state holds, as typed records and state enums (no SQL here: see `db.py`).

The enum values are the strings stored in state.db and shown by `fedvlm-coord status`, so they never change
meaning; a new state is a new value plus a schema version.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from fedvlm.spec import TaskSpec

from ..config import RunConfig

__all__ = [
    "CONFIG_FROM_FEDERATION_TOML", "GENESIS", "Activity", "AssignmentState", "AuditEntry", "Client", "GlobalVersion",
    "MetricsKind", "MetricsReport",
    "Next", "PollView", "Round", "RoundPhase", "Run", "RunState", "SecAggKeys", "SecAggPhase", "SecAggRound",
    "ServerStateRef", "Token", "Update", "Upload", "audit_hash",
]


class RunState(StrEnum):
    """A run's life: init (waiting for the initial adapter) -> running -> evaluating (optional) -> done; any state
    before done -> stopped (`fedvlm-coord run stop`, with a reason). Done and stopped are final."""

    INIT = "init"
    RUNNING = "running"
    EVALUATING = "evaluating"
    DONE = "done"
    STOPPED = "stopped"

    @property
    def active(self) -> bool:
        """Whether the run still schedules work (a new run may start only once the current one is not active)."""
        return self not in (RunState.DONE, RunState.STOPPED)


class RoundPhase(StrEnum):
    """A round: waiting (for enough live sites) -> training (sampled sites send updates) -> done.

    The final-evaluation round after the last one is `EVALUATING` until the sites reported or its deadline passed.
    """

    WAITING = "waiting"
    TRAINING = "training"
    EVALUATING = "evaluating"
    DONE = "done"


class AssignmentState(StrEnum):
    """A sampled site in a round: assigned -> accepted or late. A site sampled again after a reopen is assigned
    afresh; the final evaluation assigns the live sites too."""

    ASSIGNED = "assigned"  # asked for an update (or an evaluation); refused once the round's deadline has passed
    ACCEPTED = "accepted"  # its update is in and stays in, whatever happens to the round
    LATE = "late"  # the deadline passed first: its update is refused


class SecAggPhase(StrEnum):
    """A secure-aggregation attempt of a training round (coordinator/secagg_phase.py): keys -> shares -> masked
    (the masked uploads) -> unmask; abandoned when it cannot finish (the round then samples again)."""

    KEYS = "keys"
    SHARES = "shares"
    MASKED = "masked"
    UNMASK = "unmask"
    ABANDONED = "abandoned"


class Activity(StrEnum):
    """What a site last said it is doing (its heartbeat)."""

    IDLE = "idle"
    INITIALIZING = "initializing"  # building the model and the run's initial adapter
    DOWNLOADING = "downloading"
    TRAINING = "training"
    UPLOADING = "uploading"
    DONE = "done"
    EVALUATING = "evaluating"
    FAILED = "failed"  # the agent stopped on an error; `detail` holds its one-line reason


class MetricsKind(StrEnum):
    """Who measured a metrics row: a site evaluating a global (eval), a site's training (train), the server step."""

    EVAL = "eval"
    TRAIN = "train"
    SERVER = "server"


class Next(StrEnum):
    """What follows a published global: the next training round, the final evaluation, or the end of the run."""

    ROUND = "round"
    FINAL_EVALUATION = "final_evaluation"
    DONE = "done"


GENESIS = "0" * 64  # the audit chain's link before its first entry
CONFIG_FROM_FEDERATION_TOML = "federation.toml"  # a run whose config is the federation directory's own file


def audit_hash(prev_hash: str, entry_json: str) -> str:
    """Link of the audit chain: SHA-256 over the previous link and the entry's canonical JSON."""
    return hashlib.sha256(f"{prev_hash}\n{entry_json}".encode()).hexdigest()


@dataclass(frozen=True)
class ServerStateRef:
    """Where the algorithm's server state after round `round` lives: a blob digest ("" = an empty state)."""

    round: int
    digest: str

    def to_json(self) -> str:
        """The reference as stored in runs.server_state."""
        return json.dumps({"round": self.round, "digest": self.digest}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ServerStateRef:
        """Parse `to_json` output."""
        raw = json.loads(text)
        return cls(round=raw["round"], digest=raw["digest"])


@dataclass(frozen=True)
class Run:
    """A run: its state, the round it is in, what its initial adapter fixed, and its schedule and task."""

    run_id: str
    state: RunState
    round: int  # the round being trained (1-based); the latest global is round - 1
    init_client: str | None  # the site asked for the initial adapter
    schema_json: str | None  # the global's tensor schema, fixed by the initial adapter
    adapter_config: str | None  # the PEFT adapter_config.json the initial adapter carried
    config: RunConfig  # the schedule the run was created with
    task_json: str = field(repr=False)  # the task spec's canonical JSON, exactly as sites receive it
    server_state: ServerStateRef | None = None  # None: a run created before server states existed
    number: int = 1  # 1 for the federation's first run, 2 for the next...
    created_at: float = 0.0
    finished_at: float | None = None  # when it became done or stopped
    stop_reason: str | None = None  # why it was stopped (None unless stopped)
    config_source: str = CONFIG_FROM_FEDERATION_TOML  # the file its config came from

    @property
    def task(self) -> TaskSpec:
        """The run's task spec, parsed on first use: read-only commands (status) never load the algorithms."""
        return _task_spec(self.task_json)


@functools.lru_cache(maxsize=16)
def _task_spec(task_json: str) -> TaskSpec:
    """Each distinct task text is parsed once per process. A Run is read afresh from state.db for every check the
    daemon makes (each upload's announcement and acceptance, each round-driver tick), and parsing and validating a
    task costs 0.5-2 ms; a TaskSpec is immutable, so one parse can serve every Run that carries the same text."""
    return TaskSpec.from_json(task_json)


@dataclass(frozen=True)
class Round:
    """One round of a run: its phase, the global it starts from, its deadline and the global it produced."""

    run_id: str
    round: int
    phase: RoundPhase
    attempt: int  # 1 + how often the round went back to sampling for want of a quorum
    base_digest: str  # the global the round's updates start from
    deadline: float | None
    started_at: float
    finished_at: float | None
    global_digest: str | None  # the global it produced


@dataclass(frozen=True)
class Client:
    """An enrolled site and what its last heartbeat said."""

    name: str
    cert_fingerprint: str  # the only certificate this site may connect with
    enrolled_at: float
    revoked: bool
    activity: Activity
    detail: str
    bytes_done: int
    bytes_total: int
    last_seen: float | None
    last_metrics: dict[str, float]
    run_id: str | None = None  # the run its last heartbeat was about (None: before it said, or an older agent)
    step: int = 0  # training progress of its last heartbeat: optimizer step k of steps_total (0 of 0: not training)
    steps_total: int = 0


@dataclass(frozen=True)
class Token:
    """A join token (only the HMAC key derived from its secret is kept)."""

    token_id: str
    name: str  # the site it enrolls
    proof_key: bytes = field(repr=False)
    expires_at: float
    created_at: float
    used_at: float | None


@dataclass(frozen=True)
class Upload:
    """A partial upload: announced with a signed manifest, `received` bytes durable so far."""

    upload_id: str
    run_id: str
    round: int
    client: str
    nonce: str
    manifest_json: str
    signature: bytes
    size: int
    sha256: str
    received: int
    created_at: float


@dataclass(frozen=True)
class Update:
    """An accepted update: its blob digest and the signed manifest it came with."""

    run_id: str
    round: int
    client: str
    digest: str
    num_examples: int
    manifest_json: str
    signature: bytes
    accepted_at: float


@dataclass(frozen=True)
class GlobalVersion:
    """A published, signed global version of a run."""

    digest: str
    run_id: str
    round: int
    size: int
    record_json: str  # the signed fedvlm.security.signing.GlobalRecord
    signature: bytes
    created_at: float


@dataclass(frozen=True)
class PollView:
    """What a site's Poll needs, read at one instant: its enrolled certificate, the current run, the run's current
    round, the site's assignment in it and the global that round starts from (each None where there is none)."""

    cert_fingerprint: str | None  # None: no site of that name is enrolled
    revoked: bool
    run: Run | None
    round: Round | None
    assignment: AssignmentState | None
    base_global: GlobalVersion | None


@dataclass(frozen=True)
class MetricsReport:
    """Metrics measured on the global `global_digest` in a round, by a site or the server step."""

    run_id: str
    round: int
    client: str
    kind: MetricsKind
    global_digest: str
    metrics: dict[str, float]
    reported_at: float


@dataclass(frozen=True)
class AuditEntry:
    """One link of the hash-chained audit log."""

    seq: int
    entry_json: str
    prev_hash: str
    hash: str

    @property
    def entry(self) -> dict[str, Any]:
        """The entry's content (its canonical JSON, parsed)."""
        return json.loads(self.entry_json)


@dataclass(frozen=True)
class SecAggRound:
    """One secure-aggregation attempt of a round and the site lists each sub-phase fixed."""

    run_id: str
    round: int
    attempt: int  # the round's attempt (Round.attempt) it belongs to
    phase: SecAggPhase
    threshold: int
    sites: tuple[str, ...]  # whose keys were collected (fixed from "shares" on)
    sharers: tuple[str, ...]  # who sent their shares (fixed from "masked" on)
    survivors: tuple[str, ...]  # whose masked update was accepted (fixed from "unmask" on)
    dropped: tuple[str, ...]  # sharers without an accepted masked update
    deadline: float | None  # of the current sub-phase (None: the round's deadline)
    reason: str  # why it was abandoned


@dataclass(frozen=True)
class SecAggKeys:
    """A site's signed key advertisement of one attempt, with the certificate it connected with."""

    client: str
    advertisement_json: str
    signature: bytes
    cert_pem: bytes
