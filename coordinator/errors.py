"""The one error type the coordinator's state layer raises to refuse a request."""

from __future__ import annotations


class Refused(Exception):
    """A request the coordinator turns down; `code` is a grpc.StatusCode name, `message` says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
