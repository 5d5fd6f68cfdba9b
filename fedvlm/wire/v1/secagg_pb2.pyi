from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SecAggRoundRef(_message.Message):
    __slots__ = ("run_id", "round", "attempt")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    attempt: int
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ..., attempt: _Optional[int] = ...) -> None: ...

class SecAggPhase(_message.Message):
    __slots__ = ("attempt", "phase", "threshold", "sites", "sharers", "survivors", "dropped", "deadline_unix", "message")
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    SITES_FIELD_NUMBER: _ClassVar[int]
    SHARERS_FIELD_NUMBER: _ClassVar[int]
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    attempt: int
    phase: str
    threshold: int
    sites: _containers.RepeatedScalarFieldContainer[str]
    sharers: _containers.RepeatedScalarFieldContainer[str]
    survivors: _containers.RepeatedScalarFieldContainer[str]
    dropped: _containers.RepeatedScalarFieldContainer[str]
    deadline_unix: float
    message: str
    def __init__(self, attempt: _Optional[int] = ..., phase: _Optional[str] = ..., threshold: _Optional[int] = ..., sites: _Optional[_Iterable[str]] = ..., sharers: _Optional[_Iterable[str]] = ..., survivors: _Optional[_Iterable[str]] = ..., dropped: _Optional[_Iterable[str]] = ..., deadline_unix: _Optional[float] = ..., message: _Optional[str] = ...) -> None: ...

class SignedKeys(_message.Message):
    __slots__ = ("ref", "advertisement_json", "signature", "cert_pem")
    REF_FIELD_NUMBER: _ClassVar[int]
    ADVERTISEMENT_JSON_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    CERT_PEM_FIELD_NUMBER: _ClassVar[int]
    ref: SecAggRoundRef
    advertisement_json: str
    signature: bytes
    cert_pem: bytes
    def __init__(self, ref: _Optional[_Union[SecAggRoundRef, _Mapping]] = ..., advertisement_json: _Optional[str] = ..., signature: _Optional[bytes] = ..., cert_pem: _Optional[bytes] = ...) -> None: ...

class KeySet(_message.Message):
    __slots__ = ("threshold", "keys")
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    threshold: int
    keys: _containers.RepeatedCompositeFieldContainer[SignedKeys]
    def __init__(self, threshold: _Optional[int] = ..., keys: _Optional[_Iterable[_Union[SignedKeys, _Mapping]]] = ...) -> None: ...

class EncryptedShare(_message.Message):
    __slots__ = ("site", "ciphertext")
    SITE_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    site: str
    ciphertext: bytes
    def __init__(self, site: _Optional[str] = ..., ciphertext: _Optional[bytes] = ...) -> None: ...

class ShareBundle(_message.Message):
    __slots__ = ("ref", "shares")
    REF_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    ref: SecAggRoundRef
    shares: _containers.RepeatedCompositeFieldContainer[EncryptedShare]
    def __init__(self, ref: _Optional[_Union[SecAggRoundRef, _Mapping]] = ..., shares: _Optional[_Iterable[_Union[EncryptedShare, _Mapping]]] = ...) -> None: ...

class RevealedShare(_message.Message):
    __slots__ = ("owner", "kind", "x", "value")
    OWNER_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    owner: str
    kind: str
    x: int
    value: bytes
    def __init__(self, owner: _Optional[str] = ..., kind: _Optional[str] = ..., x: _Optional[int] = ..., value: _Optional[bytes] = ...) -> None: ...

class Reveal(_message.Message):
    __slots__ = ("ref", "shares")
    REF_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    ref: SecAggRoundRef
    shares: _containers.RepeatedCompositeFieldContainer[RevealedShare]
    def __init__(self, ref: _Optional[_Union[SecAggRoundRef, _Mapping]] = ..., shares: _Optional[_Iterable[_Union[RevealedShare, _Mapping]]] = ...) -> None: ...

class SecAggAck(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
