"""Intake of signed updates: manifest checks, resumable chunked reception, verification and acceptance.

An update is accepted only if every check passes; until then nothing but the partial-upload row and its part
file exist, and a refused update leaves no trace among accepted state (updates, nonces, assignments).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from fedvlm import adapters
from fedvlm.adapters import AdapterError, LimitExceeded
from fedvlm.algorithms import build
from fedvlm.algorithms.base import AUX_PREFIX
from fedvlm.algorithms.lora_exact import rank_flexible_schema
from fedvlm.security import signing
from fedvlm.security.signing import SignatureError, UpdateManifest

from .blobs import BlobStore, file_sha256
from .config import LimitsConfig
from .errors import Refused
from .secagg_phase import check_masked_upload, masked_schema
from .state import AssignmentState, RoundPhase, Run, RunState, State, Upload

log = logging.getLogger(__name__)

# Received bytes are made durable (fsync + offset committed) every CHECKPOINT_BYTES or CHECKPOINT_SECONDS,
# whichever comes first, and when a stream ends however it ends; a resume restarts from the last checkpoint.
CHECKPOINT_BYTES = 32 << 20
CHECKPOINT_SECONDS = 2.0


@dataclass(frozen=True)
class UploadTicket:
    """Where a site (re)starts sending an announced upload: its id, the durable offset and the size."""

    upload_id: str
    offset: int
    size: int


class Intake:
    """Accepts updates for the current run; `on_accepted` wakes the round driver. Time is the state's clock."""

    def __init__(self, state: State, blobs: BlobStore, uploads_dir: Path, federation_id: str,
                 max_update_bytes: int, on_accepted: Callable[[], None], limits: LimitsConfig = LimitsConfig()) -> None:
        self.state = state
        self.limits = limits
        self.blobs = blobs
        self.uploads_dir = uploads_dir
        self.federation_id = federation_id
        self.max_update_bytes = max_update_bytes
        self.on_accepted = on_accepted
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._stream_digests: dict[str, str] = {}  # upload_id -> SHA-256 of its complete part file
        uploads_dir.mkdir(parents=True, exist_ok=True)

    # -- announcing an upload -------------------------------------------------------------------------------
    def start(self, client: str, client_cert: x509.Certificate, manifest_json: str, signature: bytes) -> UploadTicket:
        """Check a signed manifest and return where to (re)start sending its bytes."""
        size = len(manifest_json.encode())
        if size > self.limits.manifest_bytes:
            raise Refused("RESOURCE_EXHAUSTED", f"manifest of {size} bytes exceeds limits.manifest_bytes "
                                                f"({self.limits.manifest_bytes})")
        try:
            manifest = UpdateManifest.from_json(manifest_json)
        except ValueError as exc:
            raise Refused("INVALID_ARGUMENT", f"malformed manifest: {exc}") from exc
        try:
            signing.verify(client_cert, manifest.canonical(), signature)
        except SignatureError as exc:
            raise Refused("UNAUTHENTICATED", "manifest signature does not verify with your certificate") from exc
        if manifest.client != client:
            raise Refused("PERMISSION_DENIED", f"manifest names client {manifest.client!r} but you are {client!r}")
        if manifest.federation_id != self.federation_id:
            raise Refused("FAILED_PRECONDITION", "manifest is for another federation")
        if manifest.size <= 0 or manifest.num_examples <= 0:
            raise Refused("INVALID_ARGUMENT", "manifest size and num_examples must be positive")
        run = self.state.current_run()  # the run's own [run] max_update_mb; the constructor's limit without a run
        limit = run.config.max_update_bytes if run else self.max_update_bytes
        if manifest.size > limit:
            raise Refused("RESOURCE_EXHAUSTED", f"update of {manifest.size} bytes exceeds the limit of {limit} bytes")
        if self.state.nonce_used(manifest.nonce):
            raise Refused("ALREADY_EXISTS", "replayed manifest: this nonce was already used")
        existing = self.state.upload_by_nonce(manifest.nonce)
        if existing is not None:
            if existing.client != client or existing.manifest_json != manifest_json:
                raise Refused("ALREADY_EXISTS", "nonce reuse: another manifest was announced with this nonce")
            return UploadTicket(existing.upload_id, existing.received, existing.size)
        self._check_round(manifest)
        self.reclaim()
        held = [u for u in self.state.uploads(manifest.run_id, manifest.round) if u.client == client]
        if len(held) >= self.limits.uploads_per_site:
            raise Refused("RESOURCE_EXHAUSTED", f"{client!r} already holds {len(held)} unfinished uploads "
                                                f"(limits.uploads_per_site = {self.limits.uploads_per_site})")
        upload_id = hashlib.sha256(f"{client}:{manifest.nonce}".encode()).hexdigest()[:32]
        self.state.announce_upload(upload_id, manifest, manifest_json, signature)
        log.info("upload announced client=%s round=%d size=%d id=%s", client, manifest.round, manifest.size,
                 upload_id)
        return UploadTicket(upload_id, 0, manifest.size)

    def _check_round(self, manifest: UpdateManifest) -> Run:
        """The manifest must target the open round of the current run, from its base global, by a sampled client."""
        run = self.state.current_run()
        if run is None or manifest.run_id != run.run_id:
            raise Refused("FAILED_PRECONDITION", "manifest is for a run that is not the current one")
        if run.state is RunState.INIT:
            if manifest.round != 0 or manifest.client != run.init_client:
                raise Refused("FAILED_PRECONDITION", "the run is waiting for its initial adapter from another site")
            if self.state.initial_update(run.run_id) is not None:
                raise Refused("ALREADY_EXISTS", "the initial adapter was already accepted")
            return run
        if run.state is not RunState.RUNNING:
            raise Refused("FAILED_PRECONDITION", f"the run is {run.state}; no updates are taken")
        if manifest.round != run.round:
            raise Refused("FAILED_PRECONDITION",
                          f"update for round {manifest.round} but the open round is {run.round}")
        rnd = self.state.round(run.run_id, run.round)
        if rnd is None or rnd.phase is not RoundPhase.TRAINING:
            raise Refused("FAILED_PRECONDITION", f"round {run.round} is not collecting updates")
        status = self.state.assignment(run.run_id, run.round, manifest.client)
        if status is AssignmentState.ACCEPTED:
            raise Refused("ALREADY_EXISTS", f"your update for round {run.round} was already accepted")
        if status is AssignmentState.LATE or (status is AssignmentState.ASSIGNED and rnd.deadline is not None
                                              and self.state.now() > rnd.deadline):
            raise Refused("DEADLINE_EXCEEDED", f"late: the deadline of round {run.round} has passed")
        if status is not AssignmentState.ASSIGNED:
            raise Refused("PERMISSION_DENIED", f"you were not sampled for round {run.round}")
        if manifest.base_digest != rnd.base_digest:
            raise Refused("FAILED_PRECONDITION",
                          f"wrong base global: round {run.round} starts from {rnd.base_digest[:12]}")
        if run.task.algorithm.secure_aggregation:
            check_masked_upload(self.state, run, manifest.client)
        return run

    # -- receiving bytes --------------------------------------------------------------------------------------
    def receive(self, client: str, frames: Iterator[tuple[str, int, bytes]]) -> tuple[str, int]:
        """Append frames (upload_id, offset, data) to the part file; accept the update once complete.

        Returns (digest, bytes received): digest is "" while the upload is incomplete. The durable offset is
        committed every CHECKPOINT_BYTES and when the stream ends, however it ends.
        """
        first = next(frames, None)
        if first is None:
            raise Refused("INVALID_ARGUMENT", "empty upload stream")
        announced = self.state.upload(first[0])
        if announced is None or announced.client != client:
            raise Refused("NOT_FOUND", "unknown upload id: call StartUpload first")
        lock = self._lock_for(announced.upload_id)
        if not lock.acquire(blocking=False):
            raise Refused("ABORTED", "another stream is sending this upload now; resume after it ends")
        try:
            upload = self.state.upload(announced.upload_id)  # again, under the lock: that stream may have ended it
            if upload is None:
                if self.state.nonce_used(announced.nonce):
                    raise Refused("ALREADY_EXISTS", "this upload was already accepted")
                raise Refused("NOT_FOUND", "this upload was discarded: call StartUpload again")
            self._check_header_length(upload, first)
            received = self._append(upload, first, frames)
            if received < upload.size:
                return "", received
            return self._finalize(upload), received
        finally:
            lock.release()

    def _check_header_length(self, upload: Upload, first: tuple[str, int, bytes]) -> None:
        """An update whose first 8 bytes announce a header over limits.header_bytes is refused (and discarded: its
        signed bytes can never be accepted) before any more of it is received."""
        _, offset, data = first
        if offset != 0 or len(data) < 8:
            return
        try:
            adapters.header_length(data[:8], upload.size, self.limits.header_bytes)
        except AdapterError as exc:
            self._discard(upload.upload_id)
            raise _refusal(exc) from exc

    def _append(self, upload: Upload, first: tuple[str, int, bytes], frames: Iterator[tuple[str, int, bytes]]) -> int:
        upload_id, size = upload.upload_id, upload.size
        committed = self.state.upload(upload_id).received  # re-read under the lock: another stream may have added
        part = self.part_path(upload_id)
        position = committed
        pending = 0
        last = time.monotonic()
        hasher = hashlib.sha256()
        in_flight: Future | None = None  # at most one checkpoint is made durable in the background
        with open(part, "ab+") as fh, ThreadPoolExecutor(1, thread_name_prefix="intake-fsync") as syncer:
            fh.truncate(committed)  # anything past the committed offset was never acknowledged
            fh.seek(0)
            while block := fh.read(min(4 << 20, committed - fh.tell())):
                hasher.update(block)  # a resumed upload: hash the durable prefix once, then only new bytes
            fh.seek(committed)
            try:
                frame = first
                while frame is not None:
                    frame_id, offset, data = frame
                    if frame_id != upload_id:
                        raise Refused("INVALID_ARGUMENT", "upload id changed within a stream")
                    if offset != position:
                        raise Refused("OUT_OF_RANGE", f"expected offset {position}, got {offset}")
                    if position + len(data) > size:
                        raise Refused("INVALID_ARGUMENT", f"more bytes than the {size} announced")
                    fh.write(data)
                    hasher.update(data)  # releases the GIL for large buffers
                    position += len(data)
                    pending += len(data)
                    if pending >= CHECKPOINT_BYTES or time.monotonic() - last >= CHECKPOINT_SECONDS:
                        if in_flight is not None:
                            committed = in_flight.result()
                        fh.flush()  # the buffer belongs to this thread; only fsync + commit run in the background
                        in_flight = syncer.submit(self._make_durable, fh.fileno(), upload_id, position)
                        pending, last = 0, time.monotonic()
                    frame = next(frames, None)
            finally:
                if in_flight is not None:
                    committed = in_flight.result()
                if position != committed:
                    committed = self._checkpoint(fh, upload_id, position)
        if committed == size:
            self._stream_digests[upload_id] = hasher.hexdigest()
        return committed

    def _checkpoint(self, fh, upload_id: str, position: int) -> int:
        fh.flush()
        return self._make_durable(fh.fileno(), upload_id, position)

    def _make_durable(self, fd: int, upload_id: str, position: int) -> int:
        """fsync the part file, then commit `position`: a committed offset only ever covers durable bytes."""
        os.fsync(fd)
        self.state.checkpoint_upload(upload_id, position)
        return position

    def _finalize(self, upload: Upload) -> str:
        """Verify a complete upload and accept it atomically, or discard it with a clear refusal."""
        part = self.part_path(upload.upload_id)
        manifest = UpdateManifest.from_json(upload.manifest_json)
        try:
            # The digest computed while the bytes arrived (re-read from disk only if this process did not see them).
            digest = self._stream_digests.pop(upload.upload_id, None) or file_sha256(part)
            if digest != manifest.sha256:
                raise Refused("INVALID_ARGUMENT", "digest mismatch: the bytes are not the ones the manifest signed")
            site = self.state.client(upload.client)
            if site is None or site.revoked:  # revoked while the stream was open
                raise Refused("PERMISSION_DENIED", f"client {upload.client!r} has been revoked")
            run = self._check_round(manifest)
            self._check_tensors(part, run)
        except Refused:
            self._discard(upload.upload_id)
            raise
        self.blobs.adopt(part, digest)
        self.state.accept_update(upload.upload_id, digest)
        self._forget(upload.upload_id)
        log.info("update accepted client=%s round=%d digest=%s", manifest.client, manifest.round, digest[:12])
        self.on_accepted()
        return digest

    def _check_tensors(self, part: Path, run: Run) -> None:
        try:
            full = adapters.read_file_schema(part, self.limits.header_bytes, self.limits.tensors_per_update)
            schema = {k: v for k, v in full.items() if not k.startswith(AUX_PREFIX)}
            aux = {k[len(AUX_PREFIX):]: v for k, v in full.items() if k.startswith(AUX_PREFIX)}
            if run.schema_json is None and aux:
                raise AdapterError(f"the initial adapter must not carry {AUX_PREFIX} tensors")
            if run.schema_json is None and not schema:  # global 0 would fix an empty schema for the whole run
                raise AdapterError("the initial adapter holds no tensor")
            if run.schema_json is not None:  # header only: a wrong schema is refused before loading any tensor
                algorithm = run.task.algorithm
                expected_schema = adapters.schema_from_json(run.schema_json)
                if algorithm.heterogeneous_ranks:  # sites may train their own LoRA rank (products are averaged)
                    expected_schema = rank_flexible_schema(schema, expected_schema)
                if algorithm.secure_aggregation:  # masked: the fixed-point encoding plus masks, as uint64
                    expected_schema = masked_schema(expected_schema)
                # An update may carry a subset of the global's tensors (e.g. one stage of F-2stage), but every
                # update of a round must carry the same subset, so that they can be averaged.
                adapters.check_schema(schema, expected_schema, allow_subset=True)
                # Auxiliary tensors (e.g. SCAFFOLD's control-variate deltas) are exactly what the algorithm expects.
                expected = build(algorithm).expected_aux(schema)
                try:
                    adapters.check_schema(aux, {a: schema[src] for a, src in expected.items()})
                except AdapterError as exc:
                    raise AdapterError(f"auxiliary tensors ({AUX_PREFIX}...): {exc}") from exc
                peers = self.state.accepted_updates(run.run_id, run.round)
                if peers:
                    peer_schema = adapters.read_file_schema(self.blobs.path(peers[0].digest))
                    if algorithm.heterogeneous_ranks:  # the same tensor names; LoRA ranks may differ between sites
                        _check_same_names(full, peer_schema)
                    else:
                        adapters.check_schema(full, peer_schema)
            for name, tensor in adapters.iter_file_tensors(part):
                adapters.check_finite({name: tensor})
        except AdapterError as exc:
            raise _refusal(exc) from exc

    def reclaim(self) -> int:
        """Discard the unfinished uploads that can never be accepted (of another run, or a round no longer open)
        or are older than limits.partial_upload_retention; one that a stream is sending now is left to it.
        Returns how many were discarded."""
        run = self.state.current_run()
        oldest = self.state.now() - self.limits.partial_upload_retention
        open_round = (run.run_id, 0 if run.state is RunState.INIT else run.round) if run and run.state.active else None
        reclaimed = 0
        for upload in self.state.all_uploads():
            if (upload.run_id, upload.round) == open_round and upload.created_at >= oldest:
                continue
            lock = self._lock_for(upload.upload_id)
            if not lock.acquire(blocking=False):
                continue
            try:
                self._discard(upload.upload_id)
            finally:
                lock.release()
            reclaimed += 1
        if reclaimed:
            log.info("reclaimed %d unfinished uploads of closed rounds or past their retention", reclaimed)
        return reclaimed

    def _discard(self, upload_id: str) -> None:
        self.part_path(upload_id).unlink(missing_ok=True)
        self.state.discard_upload(upload_id)
        self._forget(upload_id)

    def _forget(self, upload_id: str) -> None:
        """Drop what this process keeps for an upload that is gone (its lock is held by the caller)."""
        self._stream_digests.pop(upload_id, None)
        with self._locks_guard:
            self._locks.pop(upload_id, None)

    def part_path(self, upload_id: str) -> Path:
        """Where the bytes of a partial upload are kept until it is accepted or discarded."""
        return self.uploads_dir / f"{upload_id}.part"

    def _lock_for(self, upload_id: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(upload_id, threading.Lock())


def _refusal(exc: AdapterError) -> Refused:
    """The gRPC refusal of an update whose bytes were refused: a limit (named by its key) or malformed bytes."""
    if isinstance(exc, LimitExceeded):
        return Refused("RESOURCE_EXHAUSTED", f"update refused: {exc} (limits.{exc.limit})")
    return Refused("INVALID_ARGUMENT", f"update refused: {exc}")


def _check_same_names(actual: adapters.Schema, peer: adapters.Schema) -> None:
    """The tensor names of an update must be those of the round's other updates (shapes were checked against the
    global's schema already, with per-site LoRA ranks)."""
    missing, unexpected = sorted(peer.keys() - actual.keys()), sorted(actual.keys() - peer.keys())
    if missing or unexpected:
        raise AdapterError("adapter schema mismatch: the round's updates carry another set of tensors (missing: "
                           f"{', '.join(missing[:5]) or '-'}; unexpected: {', '.join(unexpected[:5]) or '-'})")
