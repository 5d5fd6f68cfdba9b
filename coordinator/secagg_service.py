"""The SecureAggregation gRPC service (proto/fedvlm/v1/secagg.proto): it relays keys and encrypted shares between the
sampled sites of a round and collects the revealed shares; coordinator/secagg_phase.py decides the sub-phases.

The caller is the verified certificate (`authenticate`, the Federation service's check of the enrolled site).
Every message is bounded before it is stored (MAX_* below; docs/operations.md lists them).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import grpc
from cryptography import x509

from fedvlm.security import pki, signing
from fedvlm.security.secagg import Advertisement, RoundContext, SecAggError
from fedvlm.security.signing import SignatureError
from fedvlm.wire.v1 import secagg_pb2, secagg_pb2_grpc

from .errors import Refused
from .secagg_phase import reveal_to_json
from .service import _guarded
from .state import AssignmentState, RoundPhase, RunState, SecAggPhase, SecAggRound, State, TransitionRefused

log = logging.getLogger(__name__)

MAX_ADVERTISEMENT_BYTES = 1024  # an advertisement's JSON (two hex keys and a name)
MAX_SIGNATURE_BYTES = 256
MAX_SHARE_BYTES = 2048  # one encrypted share (its plaintext: two shares of GF(2**521 - 1) as hex, ~0.4 KiB)
MAX_REVEALED_BYTES = 80  # one revealed share (an element of GF(2**521 - 1): 66 bytes)
AFTER_KEYS = (SecAggPhase.SHARES, SecAggPhase.MASKED, SecAggPhase.UNMASK)

Pb = secagg_pb2


class SecureAggregationService(secagg_pb2_grpc.SecureAggregationServicer):
    """The site-facing secure-aggregation RPCs of the current run's open round."""

    def __init__(self, state: State, federation_id: str,
                 authenticate: Callable[[grpc.ServicerContext], tuple[str, x509.Certificate]]) -> None:
        self.state = state
        self.federation_id = federation_id
        self.authenticate = authenticate

    def _attempt(self, ref: secagg_pb2.SecAggRoundRef, phases: tuple[SecAggPhase, ...]) -> SecAggRound:
        """The attempt `ref` names, which must be the open round's current one and in one of `phases`."""
        run = self.state.current_run()
        if run is None or run.run_id != ref.run_id or run.state is not RunState.RUNNING:
            raise Refused("FAILED_PRECONDITION", "secure aggregation for a run that is not the current one")
        if not run.task.algorithm.secure_aggregation:
            raise Refused("FAILED_PRECONDITION", "the current run does not use secure aggregation")
        rnd = self.state.round(run.run_id, run.round)
        if ref.round != run.round or rnd.phase is not RoundPhase.TRAINING or ref.attempt != rnd.attempt:
            raise Refused("FAILED_PRECONDITION", f"round {ref.round} attempt {ref.attempt} is not the open one "
                                                 f"(round {run.round} attempt {rnd.attempt}, {rnd.phase})")
        sa = self.state.secagg_round(run.run_id, run.round, rnd.attempt)
        if sa is None or sa.phase not in phases:
            raise Refused("FAILED_PRECONDITION", f"round {run.round} attempt {rnd.attempt} is in secure-aggregation "
                                                 f"phase {sa.phase if sa else 'not open'}, not "
                                                 f"{' or '.join(p.value for p in phases)}")
        return sa

    @_guarded
    def GetPhase(self, request, context):
        self.authenticate(context)
        run = self.state.current_run()
        if run is None or run.run_id != request.run_id:
            raise Refused("FAILED_PRECONDITION", "secure aggregation for a run that is not the current one")
        rnd = self.state.round(run.run_id, request.round)
        if rnd is None or run.round != request.round or rnd.phase not in (RoundPhase.TRAINING, RoundPhase.WAITING):
            return Pb.SecAggPhase(attempt=request.attempt, phase="done", message=f"round {request.round} is over")
        attempt = request.attempt or (rnd.attempt if rnd.phase is RoundPhase.TRAINING else 0)
        sa = self.state.secagg_round(run.run_id, rnd.round, attempt) if attempt else None
        if sa is None:  # not open yet (or the round is sampling again)
            return Pb.SecAggPhase(attempt=attempt)
        deadline = sa.deadline if sa.deadline is not None else rnd.deadline
        return Pb.SecAggPhase(attempt=sa.attempt, phase=sa.phase.value, threshold=sa.threshold, sites=sa.sites,
                              sharers=sa.sharers, survivors=sa.survivors, dropped=sa.dropped,
                              deadline_unix=deadline or 0.0, message=sa.reason)

    @_guarded
    def AdvertiseKeys(self, request, context):
        name, cert = self.authenticate(context)
        sa = self._attempt(request.ref, (SecAggPhase.KEYS,))
        if self.state.assignment(sa.run_id, sa.round, name) is not AssignmentState.ASSIGNED:
            raise Refused("PERMISSION_DENIED", f"you were not sampled for round {sa.round}")
        if len(request.advertisement_json) > MAX_ADVERTISEMENT_BYTES or len(request.signature) > MAX_SIGNATURE_BYTES:
            raise Refused("INVALID_ARGUMENT", f"advertisement over {MAX_ADVERTISEMENT_BYTES} bytes or signature over "
                                              f"{MAX_SIGNATURE_BYTES} bytes")
        try:
            advertisement = Advertisement.from_json(request.advertisement_json)
        except SecAggError as exc:
            raise Refused("INVALID_ARGUMENT", str(exc)) from None
        if advertisement.site != name:
            raise Refused("PERMISSION_DENIED", f"keys advertised for {advertisement.site!r} but you are {name!r}")
        ctx = RoundContext(self.federation_id, sa.run_id, sa.round)
        try:
            signing.verify(cert, advertisement.canonical(ctx), request.signature)
        except SignatureError:
            raise Refused("UNAUTHENTICATED", "the keys' signature does not verify with your certificate") from None
        self._record(self.state.record_secagg_keys, sa, name, request.advertisement_json, request.signature,
                     pki.cert_to_pem(cert))
        return Pb.SecAggAck()

    @_guarded
    def FetchKeys(self, request, context):
        name, _ = self.authenticate(context)
        sa = self._attempt(request, AFTER_KEYS)
        if name not in sa.sites:
            raise Refused("PERMISSION_DENIED", f"you did not advertise keys in round {sa.round} attempt {sa.attempt}")
        keys = [k for k in self.state.secagg_keys(sa.run_id, sa.round, sa.attempt) if k.client in sa.sites]
        return Pb.KeySet(threshold=sa.threshold, keys=[
            Pb.SignedKeys(advertisement_json=k.advertisement_json, signature=k.signature, cert_pem=k.cert_pem)
            for k in keys])

    @_guarded
    def SendShares(self, request, context):
        name, _ = self.authenticate(context)
        sa = self._attempt(request.ref, (SecAggPhase.SHARES,))
        if name not in sa.sites:
            raise Refused("PERMISSION_DENIED", f"you did not advertise keys in round {sa.round} attempt {sa.attempt}")
        shares = {s.site: s.ciphertext for s in request.shares}
        if len(shares) != len(request.shares) or set(shares) != set(sa.sites):
            raise Refused("INVALID_ARGUMENT", f"one share for each of {', '.join(sa.sites)} is needed")
        if any(len(blob) > MAX_SHARE_BYTES for blob in shares.values()):
            raise Refused("INVALID_ARGUMENT", f"an encrypted share is over {MAX_SHARE_BYTES} bytes")
        self._record(self.state.record_secagg_shares, sa, name, shares)
        return Pb.SecAggAck()

    @_guarded
    def FetchShares(self, request, context):
        name, _ = self.authenticate(context)
        sa = self._attempt(request, (SecAggPhase.MASKED, SecAggPhase.UNMASK))
        if name not in sa.sharers:
            raise Refused("PERMISSION_DENIED", f"you did not send shares in round {sa.round} attempt {sa.attempt}")
        shares = self.state.secagg_shares_for(sa.run_id, sa.round, sa.attempt, name, sa.sharers)
        return Pb.ShareBundle(shares=[Pb.EncryptedShare(site=o, ciphertext=c) for o, c in sorted(shares.items())])

    @_guarded
    def SendReveal(self, request, context):
        name, _ = self.authenticate(context)
        sa = self._attempt(request.ref, (SecAggPhase.UNMASK,))
        if name not in sa.survivors:
            raise Refused("PERMISSION_DENIED", f"you are not a survivor of round {sa.round} attempt {sa.attempt}")
        expected = {**{s: "b" for s in sa.survivors}, **{d: "s" for d in sa.dropped}}
        revealed = {s.owner: (s.kind, s.x, int.from_bytes(s.value, "big")) for s in request.shares}
        if len(revealed) != len(request.shares) or {o: k for o, (k, _, _) in revealed.items()} != expected:
            raise Refused("INVALID_ARGUMENT", "reveal the self-mask share of each survivor and the mask-key share of "
                                              "each dropped site, once each")
        if any(len(s.value) > MAX_REVEALED_BYTES or not 1 <= s.x <= len(sa.sites) for s in request.shares):
            raise Refused("INVALID_ARGUMENT", "a revealed share is out of range")
        self._record(self.state.record_secagg_reveal, sa, name, reveal_to_json(revealed))
        return Pb.SecAggAck()

    @staticmethod
    def _record(transition, sa: SecAggRound, *args) -> None:
        try:
            transition(sa.run_id, sa.round, sa.attempt, *args)
        except TransitionRefused as exc:  # the sub-phase moved on between the check and the write
            raise Refused("FAILED_PRECONDITION", str(exc)) from None
