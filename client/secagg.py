"""A site's part in a secure round (fedvlm.security.secagg over proto/fedvlm/v1/secagg.proto).

`SecureRound.join` advertises this round's keys (signed with the site's enrolled key) and, once the coordinator has
every sampled site's keys, checks each peer's signature against the peer's certificate (issued by the federation
CA, named for that site) and sends the encrypted shares; `masked_update` turns the trained adapter into the masked
upload; `reveal` sends, once the coordinator names the survivors and the dropped sites, the shares that remove the
masks from their sum and nothing that would remove one site's.

The secrets live in this object only: a site restarted mid-round cannot finish that attempt (the others unmask
without it); `sit_out` waits until the attempt is over.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

import grpc
import torch
from cryptography import x509

from fedvlm.algorithms.config import AlgorithmConfig
from fedvlm.algorithms.secure_sum import site_delta, site_weight
from fedvlm.security import pki, secagg, signing
from fedvlm.security.secagg import Advertisement, RoundContext, SecAggError, SiteSecrets
from fedvlm.security.signing import SignatureError
from fedvlm.wire.v1 import secagg_pb2 as pb
from fedvlm.wire.v1 import secagg_pb2_grpc

log = logging.getLogger(__name__)

# How long a secure round waits for an unreachable coordinator (it keeps its secrets meanwhile): a restarted
# coordinator continues the round from its state, so a site that waits it out still counts.
UNREACHABLE_FOR = 300.0


class RoundOver(SecAggError):
    """The coordinator moved on (the round was aggregated or sampled again) before this site's part was done."""


class KeysDoNotVerify(SecAggError):
    """A peer's keys are not signed by that peer's certificate: the coordinator (or the path) substituted them."""


class SecureRound:
    """This site's secrets and view of one attempt of a secure round."""

    def __init__(self, stub: secagg_pb2_grpc.SecureAggregationStub, site: str, key, ca_cert: x509.Certificate,
                 federation_id: str, run_id: str, round_index: int, poll_interval: float = 1.0) -> None:
        self.stub = stub
        self.site, self.key, self.ca_cert = site, key, ca_cert
        self.ctx = RoundContext(federation_id, run_id, round_index)
        self.poll_interval = poll_interval
        self.attempt = 0
        self.secrets: SiteSecrets | None = None
        self.peers: dict[str, Advertisement] = {}
        self.sharers: tuple[str, ...] = ()
        self.opened: dict[str, tuple[int, int, int]] = {}
        self.threshold = 0

    def _call(self, method: str, request):
        """One RPC, retried while the coordinator is unreachable; `RoundOver` when it says the round moved on."""
        waited, delay = 0.0, self.poll_interval
        while True:
            try:
                return getattr(self.stub, method)(request, timeout=30)
            except grpc.RpcError as exc:
                code = exc.code()
                if code is grpc.StatusCode.FAILED_PRECONDITION:
                    raise RoundOver(exc.details()) from None
                if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) \
                        or waited > UNREACHABLE_FOR:
                    raise
                log.warning("secure aggregation: coordinator unreachable (%s); retrying in %.1fs", code.name, delay)
                time.sleep(delay)
                waited, delay = waited + delay, min(5.0, 2 * delay)

    def _ref(self) -> pb.SecAggRoundRef:
        return pb.SecAggRoundRef(run_id=self.ctx.run_id, round=self.ctx.round, attempt=self.attempt)

    def _wait(self, *phases: str) -> pb.SecAggPhase:
        """Poll until this attempt is in one of `phases` ("done" may be one); `RoundOver` if it ends first."""
        while True:
            phase = self._call("GetPhase", self._ref())
            if phase.phase in phases:
                return phase
            if phase.phase in ("done", "abandoned"):
                raise RoundOver(f"round {self.ctx.round} attempt {self.attempt}: {phase.phase} "
                                f"({phase.message or 'the coordinator moved on'})")
            time.sleep(self.poll_interval)

    # -- keys and shares --------------------------------------------------------------------------------------
    def join(self) -> None:
        """Advertise signed keys, check every peer's, send the encrypted shares (`KeysDoNotVerify` on a
        substituted key: nothing is sent then)."""
        while not self.attempt:
            phase = self._call("GetPhase", self._ref())
            if phase.phase == "keys":
                self.attempt = phase.attempt
            elif phase.phase in ("done", "shares", "masked", "unmask"):
                self.attempt = phase.attempt  # the attempt this site cannot join (see `sit_out`)
                raise RoundOver(f"round {self.ctx.round} is {phase.phase} without this site's keys")
            else:
                time.sleep(self.poll_interval)
        self.secrets = SiteSecrets(self.site, self.ctx)
        advertisement = self.secrets.advertisement()
        self._call("AdvertiseKeys", pb.SignedKeys(
            ref=self._ref(), advertisement_json=advertisement.to_json(),
            signature=signing.sign(self.key, advertisement.canonical(self.ctx))))
        phase = self._wait("shares", "masked", "unmask")
        if self.site not in phase.sites:
            raise RoundOver(f"round {self.ctx.round}: the keys were collected without this site's")
        keyset = self._call("FetchKeys", self._ref())
        self.peers = verify_keys(keyset, self.ca_cert, self.ctx, advertisement)
        if set(self.peers) != set(phase.sites):
            raise KeysDoNotVerify(f"round {self.ctx.round}: the key set ({', '.join(sorted(self.peers))}) is not "
                                  f"the sites of the round ({', '.join(phase.sites)})")
        secagg.check_threshold(phase.threshold, len(self.peers))  # a lower one could unmask a single site
        shares = self.secrets.shares_for(self.peers, phase.threshold)
        self._call("SendShares", pb.ShareBundle(ref=self._ref(), shares=[
            pb.EncryptedShare(site=holder, ciphertext=blob) for holder, blob in sorted(shares.items())]))
        self.threshold = phase.threshold
        log.info("round %d: secure aggregation keys of %s verified, shares sent (threshold %d)", self.ctx.round,
                 ", ".join(sorted(self.peers)), phase.threshold)

    # -- the masked update ------------------------------------------------------------------------------------
    def masked_update(self, config: AlgorithmConfig, base: Mapping[str, torch.Tensor],
                      update: Mapping[str, torch.Tensor], num_examples: int) -> dict[str, torch.Tensor]:
        """The upload: this site's weighted (clipped) delta in fixed point plus its self mask and the pairwise
        masks with every other sharer, as uint64 tensors of the update's names and shapes."""
        phase = self._wait("masked")
        if self.site not in phase.sharers:
            raise RoundOver(f"round {self.ctx.round}: the shares were collected without this site's")
        self.sharers = tuple(phase.sharers)
        if not set(self.sharers) <= set(self.peers) or len(self.sharers) < self.threshold:
            raise SecAggError(f"round {self.ctx.round}: refusing to mask for sharers {list(self.sharers)} (keys of "
                              f"{sorted(self.peers)}, threshold {self.threshold})")
        bundle = self._call("FetchShares", self._ref())
        received = {s.site: s.ciphertext for s in bundle.shares}
        if set(received) != set(self.sharers):
            raise SecAggError(f"round {self.ctx.round}: shares from {sorted(received)}, expected {self.sharers}")
        self.opened = self.secrets.open_shares(received, self.peers)
        encoded = secagg.encode(site_delta(config, base, update), site_weight(config, num_examples))
        masked = self.secrets.mask(encoded, self.sharers, self.peers)
        return {name: torch.from_numpy(value) for name, value in masked.items()}

    def sit_out(self) -> None:
        """After `RoundOver`: wait until the attempt this site is not part of ends (the round is over, or samples
        again), so that the site's next poll is about a round it can take part in."""
        while True:
            phase = self._call("GetPhase", pb.SecAggRoundRef(run_id=self.ctx.run_id, round=self.ctx.round))
            if phase.phase in ("", "done") or phase.attempt != self.attempt:
                return
            time.sleep(self.poll_interval)

    # -- unmasking --------------------------------------------------------------------------------------------
    def reveal(self) -> None:
        """Once the coordinator names the survivors, send their self-mask shares and the dropped sites' mask-key
        shares (refused: a site named both ways, a site that never shared, or fewer survivors than the threshold)."""
        phase = self._wait("unmask", "done")
        if phase.phase == "done":  # aggregated without waiting for this site's shares
            return
        survivors, dropped = set(phase.survivors), set(phase.dropped)
        if self.site not in survivors:
            raise RoundOver(f"round {self.ctx.round}: this site's masked update was not counted")
        if (survivors | dropped) != set(self.sharers) or len(survivors) < self.threshold:
            raise SecAggError(f"round {self.ctx.round}: refusing to unmask for survivors {sorted(survivors)} and "
                              f"dropped {sorted(dropped)} of sharers {list(self.sharers)} (threshold "
                              f"{self.threshold})")
        revealed = secagg.reveal(self.opened, survivors, dropped)
        self._call("SendReveal", pb.Reveal(ref=self._ref(), shares=[
            pb.RevealedShare(owner=owner, kind=kind, x=x, value=value.to_bytes(66, "big"))
            for owner, (kind, x, value) in sorted(revealed.items())]))
        log.info("round %d: secure aggregation shares revealed (%d survivors, %d dropped)", self.ctx.round,
                 len(survivors), len(dropped))


def verify_keys(keyset: pb.KeySet, ca_cert: x509.Certificate, ctx: RoundContext,
                own: Advertisement) -> dict[str, Advertisement]:
    """Every peer's advertisement, each checked: signed with the key of a site certificate that the federation CA
    issued to that site name; this site's own exactly as it sent it. `KeysDoNotVerify` otherwise."""
    peers: dict[str, Advertisement] = {}
    for signed in keyset.keys:
        advertisement = Advertisement.from_json(signed.advertisement_json)
        try:
            cert = pki.load_cert_pem(signed.cert_pem)
            pki.verify_issued_by(cert, ca_cert)
            if pki.cert_name(cert) != advertisement.site or pki.cert_role(cert) != "client":
                raise SignatureError(f"certificate of {pki.cert_name(cert)!r} ({pki.cert_role(cert)})")
            signing.verify(cert, advertisement.canonical(ctx), signed.signature)
        except (pki.PkiError, SignatureError, ValueError) as exc:
            raise KeysDoNotVerify(f"round {ctx.round}: the keys of {advertisement.site!r} do not verify ({exc}): "
                                  "the coordinator may have substituted them") from None
        if advertisement.site in peers:
            raise KeysDoNotVerify(f"round {ctx.round}: two key sets for {advertisement.site!r}")
        peers[advertisement.site] = advertisement
    if peers.get(own.site) != own:
        raise KeysDoNotVerify(f"round {ctx.round}: this site's own keys were replaced or left out by the coordinator")
    return peers
