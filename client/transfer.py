"""Resumable transfers: download and verify a signed global, upload a signed update from where it stopped."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from fedvlm.atomic import write_bytes_atomic
from fedvlm.security import pki, signing
from fedvlm.security.signing import GlobalRecord, SignatureError, UpdateManifest
from fedvlm.wire.chunks import CHUNK_SIZE, iter_file_chunks
from fedvlm.wire.v1 import federation_pb2, federation_pb2_grpc

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


class VerificationError(Exception):
    """A global version failed its signature or digest check; it was not used."""


def verify_global_info(info: federation_pb2.GlobalInfo, ca_cert: x509.Certificate, federation_id: str,
                       run_id: str) -> GlobalRecord:
    """The record must be signed by the federation's coordinator certificate and describe `info.digest`."""
    try:
        signer = pki.load_cert_pem(info.signer_cert_pem)
        pki.verify_issued_by(signer, ca_cert)
        if pki.cert_name(signer) != pki.SERVER_NAME:
            raise VerificationError(f"global signed by {pki.cert_name(signer)!r}, not the coordinator")
        record = GlobalRecord.from_json(info.record_json)
        signing.verify(signer, record.canonical(), info.signature)
    except (pki.PkiError, SignatureError, ValueError) as exc:
        raise VerificationError(f"global {info.digest[:12]}: bad signature: {exc}") from exc
    if (record.digest, record.size, record.federation_id, record.run_id) != (info.digest, info.size, federation_id,
                                                                             run_id):
        raise VerificationError(f"global {info.digest[:12]}: signed record does not describe this version")
    return record


def download_global(stub: federation_pb2_grpc.FederationStub, info: federation_pb2.GlobalInfo, folder: Path,
                    progress: Progress | None = None) -> bytes:
    """Fetch the global's bytes into `folder/<digest>`, resuming a partial file, and check its SHA-256.

    The digest is computed as the frames arrive (and over a resumed file's first part before them), so the check
    adds no pass over the bytes after the last frame. A download finished before a restart is checked again before
    it is used. Returns the verified bytes; a digest mismatch deletes the file and raises VerificationError.
    """
    final = folder / info.digest
    if final.exists():
        data = final.read_bytes()
        if hashlib.sha256(data).hexdigest() == info.digest:
            return data
        log.warning("global %s: the kept download does not match its digest; fetching it again", info.digest[:12])
        final.unlink()
    part = folder / f"{info.digest}.part"
    offset = part.stat().st_size if part.exists() else 0
    if offset > info.size:
        part.unlink()
        offset = 0
    digest = hashlib.sha256()
    if offset:
        log.info("resuming download of global %s at %d/%d bytes", info.digest[:12], offset, info.size)
        for _, block in iter_file_chunks(part):
            digest.update(block)
    with open(part, "ab") as fh:
        for chunk in stub.FetchGlobal(federation_pb2.FetchGlobalRequest(digest=info.digest, offset=offset),
                                      timeout=600):
            if chunk.offset != offset:
                raise VerificationError(f"download out of order: expected offset {offset}, got {chunk.offset}")
            fh.write(chunk.data)
            digest.update(chunk.data)  # hashlib releases the GIL here: gRPC keeps receiving meanwhile
            offset += len(chunk.data)
            if progress:
                progress(offset, info.size)
        fh.flush()
        os.fsync(fh.fileno())
    if digest.hexdigest() != info.digest:
        part.unlink()
        raise VerificationError(f"global {info.digest[:12]}: downloaded bytes do not match the signed digest")
    os.replace(part, final)
    return final.read_bytes()


@dataclass(frozen=True)
class PendingUpload:
    """A signed update saved in the outbox before any byte is sent, so a restarted client resumes it."""

    manifest: UpdateManifest
    signature: bytes
    payload: Path

    @property
    def key(self) -> tuple[str, int, str]:
        return self.manifest.run_id, self.manifest.round, self.manifest.base_digest


class Outbox:
    """`--state/outbox`: one pending upload per (run, round): manifest.json + update.safetensors."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def put(self, manifest: UpdateManifest, signature: bytes, data: bytes) -> PendingUpload:
        slot = self.folder / f"{manifest.run_id}-r{manifest.round}"
        slot.mkdir(parents=True, exist_ok=True)
        payload = slot / "update.safetensors"
        write_bytes_atomic(payload, data)  # the payload first: a manifest.json never points at a torn payload
        write_bytes_atomic(slot / "manifest.json", json.dumps(
            {"manifest": manifest.to_json(), "signature": signature.hex()}).encode())
        return PendingUpload(manifest, signature, payload)

    def get(self, run_id: str, round_: int) -> PendingUpload | None:
        slot = self.folder / f"{run_id}-r{round_}"
        meta = slot / "manifest.json"
        if not meta.exists() or not (slot / "update.safetensors").exists():
            return None
        raw = json.loads(meta.read_text())
        return PendingUpload(UpdateManifest.from_json(raw["manifest"]), bytes.fromhex(raw["signature"]),
                             slot / "update.safetensors")

    def clear_except(self, run_id: str, round_: int) -> None:
        """Drop pending uploads of other rounds or runs: the coordinator will never take them now."""
        keep = f"{run_id}-r{round_}"
        for slot in self.folder.iterdir():
            if slot.is_dir() and slot.name != keep:
                for f in slot.iterdir():
                    f.unlink()
                slot.rmdir()

    def remove(self, pending: PendingUpload) -> None:
        slot = pending.payload.parent
        for f in slot.iterdir():
            f.unlink()
        slot.rmdir()


@dataclass(frozen=True)
class UploadOutcome:
    digest: str
    sent: int  # bytes sent by this call
    resumed_from: int


def upload(stub: federation_pb2_grpc.FederationStub, pending: PendingUpload, progress: Progress | None = None,
           max_rate: float = 0.0) -> UploadOutcome:
    """Announce the signed manifest, then stream the bytes from the offset the coordinator already holds.

    `max_rate` (bytes/s, 0 = unlimited) throttles the stream for sites with little bandwidth. Raises
    grpc.RpcError when the coordinator refuses or the connection drops (a later call resumes).
    """
    state = stub.StartUpload(federation_pb2.StartUploadRequest(manifest_json=pending.manifest.to_json(),
                                                               signature=pending.signature), timeout=60)
    size = pending.manifest.size
    if state.offset:
        log.info("resuming upload at %d/%d bytes", state.offset, size)
    sent = 0

    def frames() -> Iterator[federation_pb2.UploadChunk]:
        nonlocal sent
        started = time.monotonic()
        chunk = CHUNK_SIZE if not max_rate else max(4096, min(CHUNK_SIZE, int(max_rate / 4)))
        if state.offset == size:  # every byte is held (the coordinator stopped before accepting): finalize them
            yield federation_pb2.UploadChunk(upload_id=state.upload_id, offset=size, data=b"")
            return
        for offset, data in iter_file_chunks(pending.payload, state.offset, chunk):
            if max_rate:
                ahead = (sent + len(data)) / max_rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
            yield federation_pb2.UploadChunk(upload_id=state.upload_id, offset=offset, data=data)
            sent += len(data)
            if progress:
                progress(offset + len(data), size)

    result = stub.Upload(frames(), timeout=3600)
    if not result.digest:
        raise ConnectionError(f"upload incomplete: coordinator holds {result.bytes_received}/{size} bytes")
    return UploadOutcome(result.digest, sent, state.offset)
