"""Export a global version as a PEFT adapter directory (adapter_config.json + adapter_model.safetensors)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from fedvlm import adapters
from fedvlm.algorithms.base import split_aux
from fedvlm.security import signing
from fedvlm.security.signing import GlobalRecord

from .blobs import BlobStore, file_sha256
from .state import State


class ExportError(Exception):
    """Nothing was written; the message says why."""


def export_global(state: State, blobs: BlobStore, signer_cert, number: int | None, out: Path) -> Path:
    """Write global round `number` (latest if None) of the current run to `out`, after re-checking its signature
    and digest. `out` must not exist or be an empty directory; it appears complete or not at all."""
    run = state.current_run()
    if run is None:
        raise ExportError("no run in this federation yet")
    version = state.latest_global(run.run_id) if number is None else state.global_version(run.run_id, number)
    if version is None:
        raise ExportError(f"no global version for round {number} (see `fedvlm-coord rounds`)")
    record = GlobalRecord.from_json(version.record_json)
    signing.verify(signer_cert, record.canonical(), version.signature)
    path = blobs.path(record.digest)
    if file_sha256(path) != record.digest:
        raise ExportError(f"blob {record.digest[:12]} does not match its digest; run `fedvlm-coord audit verify`")
    if run.adapter_config is None:
        raise ExportError("the run has no adapter config (its initial adapter carried none)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} exists and is not an empty directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tensors, _ = split_aux(dict(adapters.iter_file_tensors(path)))  # aux tensors (e.g. SCAFFOLD's c) stay here
        adapters.save_file_atomic(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
        config = json.loads(run.adapter_config)
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        (tmp / "fedvlm_global.json").write_text(json.dumps(
            {"record": json.loads(version.record_json), "signature": version.signature.hex()}, indent=2))
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
