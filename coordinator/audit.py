"""`fedvlm-coord audit verify`: re-check the hash chain, every global's signature and every global's bytes."""

from __future__ import annotations

from dataclasses import dataclass

from fedvlm.security import signing
from fedvlm.security.signing import GlobalRecord, SignatureError

from .blobs import BlobStore, file_sha256
from .state import GENESIS, State, audit_hash


class AuditError(Exception):
    """The audit log or a global version does not check out; the message says which entry and why."""


@dataclass(frozen=True)
class AuditReport:
    entries: int
    globals_checked: int


def verify_audit(state: State, blobs: BlobStore | None, signer_cert) -> AuditReport:
    """Walk the chain from genesis: links, signatures of global records, and (unless `blobs` is None, as for the
    dashboard's cheap live check) the blobs' digests. Raises AuditError."""
    prev = GENESIS
    entries = checked = 0
    for row in state.audit_entries():
        entries += 1
        if row.prev_hash != prev:
            raise AuditError(f"entry {row.seq}: chain broken (prev_hash does not match entry {row.seq - 1})")
        if audit_hash(prev, row.entry_json) != row.hash:
            raise AuditError(f"entry {row.seq}: content was altered (hash mismatch)")
        prev = row.hash
        entry = row.entry
        if entry.get("kind") != "global":
            continue
        record = GlobalRecord.from_json(entry["record"])
        try:
            signing.verify(signer_cert, record.canonical(), bytes.fromhex(entry["signature"]))
        except SignatureError as exc:
            raise AuditError(f"entry {row.seq}: signature of global round {record.round} is invalid") from exc
        checked += 1
        if blobs is None:
            continue
        path = blobs.path(record.digest)
        if not path.exists():
            raise AuditError(f"entry {row.seq}: blob of global round {record.round} is missing ({path})")
        if file_sha256(path) != record.digest:
            raise AuditError(f"entry {row.seq}: blob of global round {record.round} does not match its digest")
    head = state.audit_head()
    if head is not None and head != prev:  # pragma: no cover - same query, defensive
        raise AuditError("chain head moved during verification")
    return AuditReport(entries, checked)
