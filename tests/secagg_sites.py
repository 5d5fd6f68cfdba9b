"""Sites that take part in secure rounds with the real client-side code (fedvlm.client.secagg.SecureRound), each in a
thread, against either the in-process coordinator (tests.inprocess, the service called without gRPC) or a real
daemon (over mTLS). A site can be told to stop after a step: that is a site lost at that point of the protocol."""

from __future__ import annotations

import threading
import traceback
from collections.abc import Callable

import numpy as np
import torch

from fedvlm.algorithms.config import AlgorithmConfig
from fedvlm.client.secagg import SecureRound
from fedvlm.coordinator.secagg_phase import parse_reveal
from fedvlm.coordinator.secagg_service import SecureAggregationService
from fedvlm.security import secagg

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
                 stop_after: str = "", gate: threading.Event | None = None) -> None:
        super().__init__(daemon=True, name=f"site-{secure.site}")
        self.secure, self.config, self.base, self.update = secure, config, base, update
        self.num_examples, self.send, self.stop_after, self.gate = num_examples, send, stop_after, gate
        self.masked_ready = threading.Event()  # its masked update is computed (it waits at `gate` to send it)
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
            self.masked_ready.set()
            if self.gate is not None:
                self.gate.wait()
            self.send(self.masked)
            self.done.append("upload")
            if self.stop_after == "upload":
                return
            self.secure.reveal()
            self.done.append("reveal")
        except BaseException as exc:  # noqa: BLE001 - the test reads it
            self.error = exc
            self.trace = traceback.format_exc()


def assert_not_recoverable(stored: dict[str, torch.Tensor], plain: dict[str, np.ndarray], name: str,
                           reveals: list[str], threshold: int) -> None:
    """Site `name`'s stored masked update is not its plain encoded update `plain`, and neither is what the
    coordinator can make of it with everything it stored (its self mask removed with the revealed shares)."""
    assert {t.dtype for t in stored.values()} == {torch.uint64}
    revealed = [parse_reveal(text) for text in reveals]
    b_shares = {x: v for r in revealed for owner, (kind, x, v) in r.items() if owner == name and kind == "b"}
    without_self_mask = {n: t.numpy().copy() for n, t in stored.items()}
    secagg._add_prg(without_self_mask, secagg.combine(b_shares, threshold).to_bytes(32, "big"), -1)
    for candidate in ({n: t.numpy() for n, t in stored.items()}, without_self_mask):
        decoded = secagg.decode(candidate)
        for key, value in plain.items():
            target = secagg.decode({key: value})[key]
            assert not np.array_equal(candidate[key], value)
            assert not np.allclose(decoded[key], target, atol=1.0)
            assert abs(np.corrcoef(decoded[key].ravel(), target.ravel())[0, 1]) < 0.9
