from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StatusRequest(_message.Message):
    __slots__ = ("run",)
    RUN_FIELD_NUMBER: _ClassVar[int]
    run: str
    def __init__(self, run: _Optional[str] = ...) -> None: ...

class ClientStatus(_message.Message):
    __slots__ = ("name", "state", "detail", "bytes_done", "bytes_total", "last_heartbeat_unix", "last_metrics", "sampled", "step", "steps_total", "train_seconds", "train_steps", "train_round")
    class LastMetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    BYTES_DONE_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_UNIX_FIELD_NUMBER: _ClassVar[int]
    LAST_METRICS_FIELD_NUMBER: _ClassVar[int]
    SAMPLED_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    STEPS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    TRAIN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_STEPS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_ROUND_FIELD_NUMBER: _ClassVar[int]
    name: str
    state: str
    detail: str
    bytes_done: int
    bytes_total: int
    last_heartbeat_unix: float
    last_metrics: _containers.ScalarMap[str, float]
    sampled: bool
    step: int
    steps_total: int
    train_seconds: float
    train_steps: int
    train_round: int
    def __init__(self, name: _Optional[str] = ..., state: _Optional[str] = ..., detail: _Optional[str] = ..., bytes_done: _Optional[int] = ..., bytes_total: _Optional[int] = ..., last_heartbeat_unix: _Optional[float] = ..., last_metrics: _Optional[_Mapping[str, float]] = ..., sampled: _Optional[bool] = ..., step: _Optional[int] = ..., steps_total: _Optional[int] = ..., train_seconds: _Optional[float] = ..., train_steps: _Optional[int] = ..., train_round: _Optional[int] = ...) -> None: ...

class RunSummary(_message.Message):
    __slots__ = ("number", "run_id", "state", "rounds_done", "total_rounds", "model", "strategy", "algorithm", "created_unix", "finished_unix", "stop_reason", "config_source")
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_DONE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    FINISHED_UNIX_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    CONFIG_SOURCE_FIELD_NUMBER: _ClassVar[int]
    number: int
    run_id: str
    state: str
    rounds_done: int
    total_rounds: int
    model: str
    strategy: str
    algorithm: str
    created_unix: float
    finished_unix: float
    stop_reason: str
    config_source: str
    def __init__(self, number: _Optional[int] = ..., run_id: _Optional[str] = ..., state: _Optional[str] = ..., rounds_done: _Optional[int] = ..., total_rounds: _Optional[int] = ..., model: _Optional[str] = ..., strategy: _Optional[str] = ..., algorithm: _Optional[str] = ..., created_unix: _Optional[float] = ..., finished_unix: _Optional[float] = ..., stop_reason: _Optional[str] = ..., config_source: _Optional[str] = ...) -> None: ...

class RoundStatus(_message.Message):
    __slots__ = ("round", "phase", "global_digest", "num_updates", "eval_metrics", "started_unix", "finished_unix", "server_metrics", "training", "global_bytes")
    class EvalMetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class ServerMetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_DIGEST_FIELD_NUMBER: _ClassVar[int]
    NUM_UPDATES_FIELD_NUMBER: _ClassVar[int]
    EVAL_METRICS_FIELD_NUMBER: _ClassVar[int]
    STARTED_UNIX_FIELD_NUMBER: _ClassVar[int]
    FINISHED_UNIX_FIELD_NUMBER: _ClassVar[int]
    SERVER_METRICS_FIELD_NUMBER: _ClassVar[int]
    TRAINING_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    round: int
    phase: str
    global_digest: str
    num_updates: int
    eval_metrics: _containers.ScalarMap[str, float]
    started_unix: float
    finished_unix: float
    server_metrics: _containers.ScalarMap[str, float]
    training: _containers.RepeatedCompositeFieldContainer[SiteTraining]
    global_bytes: int
    def __init__(self, round: _Optional[int] = ..., phase: _Optional[str] = ..., global_digest: _Optional[str] = ..., num_updates: _Optional[int] = ..., eval_metrics: _Optional[_Mapping[str, float]] = ..., started_unix: _Optional[float] = ..., finished_unix: _Optional[float] = ..., server_metrics: _Optional[_Mapping[str, float]] = ..., training: _Optional[_Iterable[_Union[SiteTraining, _Mapping]]] = ..., global_bytes: _Optional[int] = ...) -> None: ...

class SiteTraining(_message.Message):
    __slots__ = ("client", "seconds", "steps")
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    client: str
    seconds: float
    steps: int
    def __init__(self, client: _Optional[str] = ..., seconds: _Optional[float] = ..., steps: _Optional[int] = ...) -> None: ...

class FederationStatus(_message.Message):
    __slots__ = ("federation_id", "run_id", "run_state", "round", "total_rounds", "phase", "deadline_unix", "quorum", "sampled", "accepted", "clients", "rounds", "now_unix", "live", "run_number", "stop_reason", "config_notice", "runs", "secure_aggregation")
    FEDERATION_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_STATE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_FIELD_NUMBER: _ClassVar[int]
    QUORUM_FIELD_NUMBER: _ClassVar[int]
    SAMPLED_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    CLIENTS_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    NOW_UNIX_FIELD_NUMBER: _ClassVar[int]
    LIVE_FIELD_NUMBER: _ClassVar[int]
    RUN_NUMBER_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    CONFIG_NOTICE_FIELD_NUMBER: _ClassVar[int]
    RUNS_FIELD_NUMBER: _ClassVar[int]
    SECURE_AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    federation_id: str
    run_id: str
    run_state: str
    round: int
    total_rounds: int
    phase: str
    deadline_unix: float
    quorum: int
    sampled: int
    accepted: int
    clients: _containers.RepeatedCompositeFieldContainer[ClientStatus]
    rounds: _containers.RepeatedCompositeFieldContainer[RoundStatus]
    now_unix: float
    live: bool
    run_number: int
    stop_reason: str
    config_notice: str
    runs: _containers.RepeatedCompositeFieldContainer[RunSummary]
    secure_aggregation: SecAggProgress
    def __init__(self, federation_id: _Optional[str] = ..., run_id: _Optional[str] = ..., run_state: _Optional[str] = ..., round: _Optional[int] = ..., total_rounds: _Optional[int] = ..., phase: _Optional[str] = ..., deadline_unix: _Optional[float] = ..., quorum: _Optional[int] = ..., sampled: _Optional[int] = ..., accepted: _Optional[int] = ..., clients: _Optional[_Iterable[_Union[ClientStatus, _Mapping]]] = ..., rounds: _Optional[_Iterable[_Union[RoundStatus, _Mapping]]] = ..., now_unix: _Optional[float] = ..., live: _Optional[bool] = ..., run_number: _Optional[int] = ..., stop_reason: _Optional[str] = ..., config_notice: _Optional[str] = ..., runs: _Optional[_Iterable[_Union[RunSummary, _Mapping]]] = ..., secure_aggregation: _Optional[_Union[SecAggProgress, _Mapping]] = ...) -> None: ...

class SecAggProgress(_message.Message):
    __slots__ = ("phase", "attempt", "threshold", "done", "expected")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_FIELD_NUMBER: _ClassVar[int]
    phase: str
    attempt: int
    threshold: int
    done: int
    expected: int
    def __init__(self, phase: _Optional[str] = ..., attempt: _Optional[int] = ..., threshold: _Optional[int] = ..., done: _Optional[int] = ..., expected: _Optional[int] = ...) -> None: ...
