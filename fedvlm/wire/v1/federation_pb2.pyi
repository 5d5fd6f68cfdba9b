from fedvlm.wire.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ClientState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CLIENT_STATE_UNSPECIFIED: _ClassVar[ClientState]
    CLIENT_STATE_IDLE: _ClassVar[ClientState]
    CLIENT_STATE_DOWNLOADING: _ClassVar[ClientState]
    CLIENT_STATE_TRAINING: _ClassVar[ClientState]
    CLIENT_STATE_UPLOADING: _ClassVar[ClientState]
    CLIENT_STATE_DONE: _ClassVar[ClientState]
    CLIENT_STATE_EVALUATING: _ClassVar[ClientState]
    CLIENT_STATE_INITIALIZING: _ClassVar[ClientState]

class Action(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACTION_UNSPECIFIED: _ClassVar[Action]
    ACTION_WAIT: _ClassVar[Action]
    ACTION_INIT: _ClassVar[Action]
    ACTION_TRAIN: _ClassVar[Action]
    ACTION_EVALUATE: _ClassVar[Action]
    ACTION_FINISHED: _ClassVar[Action]
CLIENT_STATE_UNSPECIFIED: ClientState
CLIENT_STATE_IDLE: ClientState
CLIENT_STATE_DOWNLOADING: ClientState
CLIENT_STATE_TRAINING: ClientState
CLIENT_STATE_UPLOADING: ClientState
CLIENT_STATE_DONE: ClientState
CLIENT_STATE_EVALUATING: ClientState
CLIENT_STATE_INITIALIZING: ClientState
ACTION_UNSPECIFIED: Action
ACTION_WAIT: Action
ACTION_INIT: Action
ACTION_TRAIN: Action
ACTION_EVALUATE: Action
ACTION_FINISHED: Action

class PollRequest(_message.Message):
    __slots__ = ("state", "detail", "bytes_done", "bytes_total", "run_id", "round", "step", "steps_total", "wait_s")
    STATE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    BYTES_DONE_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    STEPS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    state: ClientState
    detail: str
    bytes_done: int
    bytes_total: int
    run_id: str
    round: int
    step: int
    steps_total: int
    wait_s: float
    def __init__(self, state: _Optional[_Union[ClientState, str]] = ..., detail: _Optional[str] = ..., bytes_done: _Optional[int] = ..., bytes_total: _Optional[int] = ..., run_id: _Optional[str] = ..., round: _Optional[int] = ..., step: _Optional[int] = ..., steps_total: _Optional[int] = ..., wait_s: _Optional[float] = ...) -> None: ...

class GlobalInfo(_message.Message):
    __slots__ = ("digest", "size", "record_json", "signature", "signer_cert_pem")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    RECORD_JSON_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    SIGNER_CERT_PEM_FIELD_NUMBER: _ClassVar[int]
    digest: str
    size: int
    record_json: str
    signature: bytes
    signer_cert_pem: bytes
    def __init__(self, digest: _Optional[str] = ..., size: _Optional[int] = ..., record_json: _Optional[str] = ..., signature: _Optional[bytes] = ..., signer_cert_pem: _Optional[bytes] = ...) -> None: ...

class Assignment(_message.Message):
    __slots__ = ("action", "federation_id", "run_id", "round", "task_spec_json", "global_version", "deadline_unix", "poll_interval_s", "message", "total_rounds", "long_polled")
    ACTION_FIELD_NUMBER: _ClassVar[int]
    FEDERATION_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TASK_SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_FIELD_NUMBER: _ClassVar[int]
    POLL_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    LONG_POLLED_FIELD_NUMBER: _ClassVar[int]
    action: Action
    federation_id: str
    run_id: str
    round: int
    task_spec_json: str
    global_version: GlobalInfo
    deadline_unix: float
    poll_interval_s: float
    message: str
    total_rounds: int
    long_polled: bool
    def __init__(self, action: _Optional[_Union[Action, str]] = ..., federation_id: _Optional[str] = ..., run_id: _Optional[str] = ..., round: _Optional[int] = ..., task_spec_json: _Optional[str] = ..., global_version: _Optional[_Union[GlobalInfo, _Mapping]] = ..., deadline_unix: _Optional[float] = ..., poll_interval_s: _Optional[float] = ..., message: _Optional[str] = ..., total_rounds: _Optional[int] = ..., long_polled: _Optional[bool] = ...) -> None: ...

class FetchGlobalRequest(_message.Message):
    __slots__ = ("digest", "offset")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    digest: str
    offset: int
    def __init__(self, digest: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class StartUploadRequest(_message.Message):
    __slots__ = ("manifest_json", "signature")
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    manifest_json: str
    signature: bytes
    def __init__(self, manifest_json: _Optional[str] = ..., signature: _Optional[bytes] = ...) -> None: ...

class UploadState(_message.Message):
    __slots__ = ("upload_id", "offset", "size")
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    offset: int
    size: int
    def __init__(self, upload_id: _Optional[str] = ..., offset: _Optional[int] = ..., size: _Optional[int] = ...) -> None: ...

class UploadChunk(_message.Message):
    __slots__ = ("upload_id", "offset", "data")
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    offset: int
    data: bytes
    def __init__(self, upload_id: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class UploadResult(_message.Message):
    __slots__ = ("digest", "bytes_received")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    digest: str
    bytes_received: int
    def __init__(self, digest: _Optional[str] = ..., bytes_received: _Optional[int] = ...) -> None: ...

class MetricsReport(_message.Message):
    __slots__ = ("run_id", "round", "global_digest", "kind", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_DIGEST_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    global_digest: str
    kind: str
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ..., global_digest: _Optional[str] = ..., kind: _Optional[str] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class MetricsAck(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FailureReport(_message.Message):
    __slots__ = ("run_id", "round", "reason")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    reason: str
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class FailureAck(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
