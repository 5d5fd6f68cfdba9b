from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class EnrollRequest(_message.Message):
    __slots__ = ("token_id", "csr_der", "proof")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    CSR_DER_FIELD_NUMBER: _ClassVar[int]
    PROOF_FIELD_NUMBER: _ClassVar[int]
    token_id: str
    csr_der: bytes
    proof: bytes
    def __init__(self, token_id: _Optional[str] = ..., csr_der: _Optional[bytes] = ..., proof: _Optional[bytes] = ...) -> None: ...

class EnrollReply(_message.Message):
    __slots__ = ("ca_cert_pem", "client_cert_pem", "federation_id", "client_name")
    CA_CERT_PEM_FIELD_NUMBER: _ClassVar[int]
    CLIENT_CERT_PEM_FIELD_NUMBER: _ClassVar[int]
    FEDERATION_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_NAME_FIELD_NUMBER: _ClassVar[int]
    ca_cert_pem: bytes
    client_cert_pem: bytes
    federation_id: str
    client_name: str
    def __init__(self, ca_cert_pem: _Optional[bytes] = ..., client_cert_pem: _Optional[bytes] = ..., federation_id: _Optional[str] = ..., client_name: _Optional[str] = ...) -> None: ...
