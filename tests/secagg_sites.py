"""Sites that take part in secure rounds with the real client-side code (fedvlm.client.secagg.SecureRound), each in a
thread, against either the in-process coordinator (tests.inprocess, the service called without gRPC) or a real
daemon (over mTLS). A site can be told to stop after a step: that is a site lost at that point of the protocol."""

from __future__ import annotations

import threading
import traceback
from collections.abc import Callable

import torch

from fedvlm.algorithms.config import AlgorithmConfig
from fedvlm.client.secagg import SecureRound
from fedvlm.coordinator.secagg_service import SecureAggregationService

STEPS = ("join", "upload", "reveal")


class Aborted(Exception):
    """What the in-process service's `context.abort` raises (a refused RPC)."""

    def __init__(self, code, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code, self.details = code, details


class _Context:
    def __init__(self, name: str, cert) -> None:
        self.name, self.cert = name, cert

    def abort(self, code, details: str) -> None:
        raise Aborted(code, details)


class LocalStub:
    """The SecureAggregation stub of site `name`, calling `service` in this process as that site."""

    def __init__(self, service: SecureAggregationService, name: str, cert) -> None:
        self.service, self.name, self.cert = service, name, cert

    def __getattr__(self, method: str):
        handler = getattr(self.service, method)
        return lambda request, timeout=None: handler(request, _Context(self.name, self.cert))


def local_service(state, federation_id: str) -> SecureAggregationService:
    """The real service over `state`, authenticating the in-process caller by its context."""
    return SecureAggregationService(state, federation_id, lambda context: (context.name, context.cert))


class SiteThread(threading.Thread):
    """One site's secure round: join, masked upload (`send(masked tensors)`), reveal; stops after `stop_after`."""

    def __init__(self, secure: SecureRound, config: AlgorithmConfig, base: dict[str, torch.Tensor],
                 update: dict[str, torch.Tensor], num_examples: int, send: Callable[[dict], None],
                 stop_after: str = "") -> None:
        super().__init__(daemon=True, name=f"site-{secure.site}")
        self.secure, self.config, self.base, self.update = secure, config, base, update
        self.num_examples, self.send, self.stop_after = num_examples, send, stop_after
        self.error: BaseException | None = None
        self.masked: dict[str, torch.Tensor] | None = None
        self.done: list[str] = []

    def run(self) -> None:
        try:
            self.secure.join()
            self.done.append("join")
            if self.stop_after == "join":
                return
            self.masked = self.secure.masked_update(self.config, self.base, self.update, self.num_examples)
            self.send(self.masked)
            self.done.append("upload")
            if self.stop_after == "upload":
                return
            self.secure.reveal()
            self.done.append("reveal")
        except BaseException as exc:  # noqa: BLE001 - the test reads it
            self.error = exc
            self.trace = traceback.format_exc()
