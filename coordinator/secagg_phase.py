"""Secure aggregation on the coordinator: the sub-phases of a training round, the checks on a masked upload, and the
unmasking of the sum (the protocol is fedvlm.security.secagg; the wire is proto/fedvlm/v1/secagg.proto).

A round of a run with ``[task.algorithm] secure_aggregation = true`` goes, within its training phase and per
attempt (the round's `attempt`), through

    keys    the sampled sites advertise signed public keys          (until all did, or heartbeat_timeout)
    shares  the advertised sites send encrypted shares to each other (until all did, or heartbeat_timeout)
    masked  the sharers upload masked updates (Federation.Upload)     (until all did, the round's deadline, or
                                                                       the missing ones are all silent)
    unmask  the survivors (accepted uploads) reveal shares            (until all did, or heartbeat_timeout)

and then the round driver aggregates: the masks come off the sum only (`unmasked_updates`). A sub-phase that times
out goes on with the sites that completed it if they are at least max(threshold, run.quorum); otherwise the attempt
is abandoned cleanly (`State.restart_secagg_round`: its masked updates are dropped, the round samples again).

Every sub-phase and every key, share and reveal is a row of state.db, and every decision is derived from the rows
(`step`), so a coordinator restarted at any moment continues the same attempt; the sites keep their secrets in
memory and carry on once the coordinator answers again.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from fedvlm.algorithms.secure_sum import site_weight, threshold, updates_from_sum
from fedvlm.security import secagg
from fedvlm.security.secagg import Advertisement, RoundContext

from .blobs import BlobStore
from .errors import Refused
from .state import AssignmentState, Round, Run, SecAggPhase, SecAggRound, State, Update

if TYPE_CHECKING:  # status imports this module: read-only commands load no torch
    import torch

    from fedvlm import adapters
    from fedvlm.algorithms.base import ClientUpdate

log = logging.getLogger(__name__)

MASKED_DTYPE = "U64"  # what a masked update's tensors are (secagg.encode's uint64, two's complement)


def check_masked_upload(state: State, run: Run, client: str) -> None:
    """A masked update is taken only while its attempt collects them, from a site that sent its shares."""
    rnd = state.round(run.run_id, run.round)
    sa = state.secagg_round(run.run_id, run.round, rnd.attempt)
    if sa is None or sa.phase is not SecAggPhase.MASKED:
        phase = sa.phase.value if sa else "not open"
        raise Refused("FAILED_PRECONDITION", f"secure aggregation of round {run.round} is not collecting masked "
                                             f"updates (it is in phase {phase})")
    if client not in sa.sharers:
        raise Refused("PERMISSION_DENIED", f"you did not send your shares in round {run.round} (attempt "
                                           f"{sa.attempt}): a masked update from you cannot be unmasked")


def masked_schema(schema: adapters.Schema) -> adapters.Schema:
    """The schema of a masked update of tensors with `schema`: the same names and shapes, uint64."""
    return {name: (shape, MASKED_DTYPE) for name, (shape, _) in schema.items()}


def progress(state: State, run: Run, rnd: Round | None) -> dict:
    """The SecAggProgress of the open round (status): sub-phase, attempt, threshold and sites done / expected."""
    if rnd is None or not run.task.algorithm.secure_aggregation:
        return {}
    sa = state.secagg_round(run.run_id, rnd.round, rnd.attempt)
    if sa is None or sa.phase is SecAggPhase.ABANDONED:
        return {}
    key = (run.run_id, rnd.round, rnd.attempt)
    expected, done = {
        SecAggPhase.KEYS: lambda: (len(state.assignments(run.run_id, rnd.round)), len(state.secagg_keys(*key))),
        SecAggPhase.SHARES: lambda: (len(sa.sites), len(state.secagg_sharers(*key))),
        SecAggPhase.MASKED: lambda: (len(sa.sharers), len(_accepted(state, run, sa))),
        SecAggPhase.UNMASK: lambda: (len(sa.survivors), len(state.secagg_reveals(*key))),
    }[sa.phase]()
    return {"phase": sa.phase.value, "attempt": sa.attempt, "threshold": sa.threshold, "done": done,
            "expected": expected}


def _accepted(state: State, run: Run, sa: SecAggRound) -> list[str]:
    states = state.assignments(run.run_id, run.round)
    return sorted(c for c in sa.sharers if states.get(c) is AssignmentState.ACCEPTED)


class SecureRounds:
    """The secure-aggregation sub-phases of the current round, driven by the round driver's ticks."""

    def __init__(self, state: State, blobs: BlobStore, federation_id: str) -> None:
        self.state = state
        self.blobs = blobs
        self.federation_id = federation_id

    def step(self, run: Run, rnd: Round, aggregate: Callable[[list[str]], None],
             gone: Callable[[Sequence[str]], bool]) -> bool:
        """Make the transition the stored state allows now (`aggregate(survivors)` once the attempt can be
        unmasked; `gone(sites)`: those sites stopped heartbeating, RoundDriver.gone); False when there is nothing
        to do yet."""
        cfg, now = run.config, self.state.now()
        key = (run.run_id, rnd.round, rnd.attempt)
        sampled = sorted(self.state.assignments(run.run_id, rnd.round))
        sa = self.state.secagg_round(*key)
        if sa is None:
            t = threshold(run.task.algorithm, len(sampled))
            self.state.open_secagg(*key, t, now + cfg.heartbeat_timeout)
            log.info("round %d attempt %d: secure aggregation of %s (threshold %d)", rnd.round, rnd.attempt,
                     ", ".join(sampled), t)
            return True
        need = max(sa.threshold, cfg.quorum)
        if sa.phase is SecAggPhase.KEYS:
            keyed = sorted(k.client for k in self.state.secagg_keys(*key))
            return self._close(run, rnd, sa, sampled, keyed, need, SecAggPhase.SHARES, now + cfg.heartbeat_timeout,
                               expired=now > (sa.deadline or 0))
        if sa.phase is SecAggPhase.SHARES:
            sharers = self.state.secagg_sharers(*key)
            return self._close(run, rnd, sa, sa.sites, sharers, need, SecAggPhase.MASKED, None,
                               expired=now > (sa.deadline or 0))
        if sa.phase is SecAggPhase.MASKED:
            accepted = _accepted(self.state, run, sa)
            missing = sorted(set(sa.sharers) - set(accepted))
            return self._close(run, rnd, sa, sa.sharers, accepted, need, SecAggPhase.UNMASK,
                               now + cfg.heartbeat_timeout, expired=now > (rnd.deadline or 0) or gone(missing))
        if sa.phase is SecAggPhase.UNMASK:
            revealed = self.state.secagg_reveals(*key)
            expired = now > (sa.deadline or 0)
            if set(sa.survivors) <= set(revealed) or (expired and len(revealed) >= sa.threshold):
                aggregate(list(sa.survivors))
                return True
            if expired:
                self._restart(run, rnd, sa, f"{len(revealed)} of the survivors revealed their shares, "
                                            f"{sa.threshold} needed to unmask")
                return True
        return False

    def _close(self, run: Run, rnd: Round, sa: SecAggRound, expected: Sequence[str], done: Sequence[str], need: int,
               to: SecAggPhase, deadline: float | None, expired: bool) -> bool:
        """Go on to `to` with `done` once every expected site is done, or at expiry if `need` are; else restart."""
        missing = sorted(set(expected) - set(done))
        if missing and not expired:
            return False
        if len(done) < need:
            self._restart(run, rnd, sa, f"{len(done)} of {len(expected)} sites completed phase {sa.phase} "
                                        f"(missing {', '.join(missing)}), {need} needed")
            return True
        self.state.advance_secagg(run.run_id, rnd.round, rnd.attempt, sa.phase, to, done, deadline, late=missing)
        log.info("round %d attempt %d: secure aggregation %s -> %s with %s%s", rnd.round, rnd.attempt, sa.phase,
                 to, ", ".join(done), f" (dropped: {', '.join(missing)})" if missing else "")
        return True

    def _restart(self, run: Run, rnd: Round, sa: SecAggRound, reason: str) -> None:
        self.state.restart_secagg_round(run.run_id, rnd.round, rnd.attempt, reason)
        log.warning("round %d attempt %d: secure aggregation abandoned: %s; sampling again", rnd.round,
                    rnd.attempt, reason)

    # -- unmasking ---------------------------------------------------------------------------------------------
    def unmasked_updates(self, run: Run, rnd: Round, base: dict[str, torch.Tensor],
                         updates: Sequence[Update]) -> list[ClientUpdate]:
        """The algorithm's input for the round: the survivors' masked updates summed, the masks removed with the
        revealed shares, decoded (secure_sum.updates_from_sum). The sum is all the coordinator ever unmasks."""
        from fedvlm import adapters

        sa = self.state.secagg_round(run.run_id, rnd.round, rnd.attempt)
        if sa is None or sa.phase is not SecAggPhase.UNMASK:
            raise secagg.SecAggError(f"round {rnd.round}: secure aggregation is not unmasking")
        # An upload accepted while its sub-phase closed (the same race as a plain update accepted as the deadline
        # passes) is not among the survivors: its masks cannot come off, so it is left out of the sum.
        late = sorted(u.client for u in updates if u.client not in sa.survivors)
        if late:
            log.warning("round %d: masked updates of %s arrived after the survivors were fixed; left out",
                        rnd.round, ", ".join(late))
        updates = [u for u in updates if u.client in sa.survivors]
        if sorted(u.client for u in updates) != sorted(sa.survivors):
            raise secagg.SecAggError(f"round {rnd.round}: a survivor's masked update is missing")
        peers = {k.client: Advertisement.from_json(k.advertisement_json)
                 for k in self.state.secagg_keys(run.run_id, rnd.round, rnd.attempt)}
        total: dict[str, np.ndarray] | None = None
        for update in updates:  # one masked update in memory at a time
            masked = {n: t.numpy() for n, t in adapters.iter_file_tensors(self.blobs.path(update.digest))}
            if total is None:
                total = {n: np.zeros(v.shape, dtype=np.uint64) for n, v in masked.items()}
            secagg.add(total, masked)
        revealed = [parse_reveal(text) for text in
                    self.state.secagg_reveals(run.run_id, rnd.round, rnd.attempt).values()]
        ctx = RoundContext(self.federation_id, run.run_id, rnd.round)
        summed = secagg.decode(secagg.unmask(total, peers, sa.survivors, sa.dropped, revealed, sa.threshold, ctx))
        algorithm = run.task.algorithm
        return updates_from_sum(base, summed, [site_weight(algorithm, u.num_examples) for u in updates])


def reveal_to_json(revealed: dict[str, tuple[str, int, int]]) -> str:
    """A site's revealed shares as stored: ``{owner: [kind, x, share as hex]}``."""
    return json.dumps({o: [k, x, hex(v)] for o, (k, x, v) in sorted(revealed.items())}, sort_keys=True)


def parse_reveal(text: str) -> dict[str, tuple[str, int, int]]:
    """`reveal_to_json`'s inverse (secagg.unmask's input)."""
    return {o: (k, int(x), int(v, 16)) for o, (k, x, v) in json.loads(text).items()}
