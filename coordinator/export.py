"""Export a global version as a PEFT adapter directory (adapter_config.json + adapter_model.safetensors).

A FLoRA global (lora_aggregation = "flora") holds its learned weights in the stack merged into the sites' base, not
in its LoRA tensors: it is exported as a LoRA adapter of the stack's rank per module (``rank_pattern``) that loads
on the original, unmerged base (fedvlm.algorithms.lora_aggregation.export_tensors)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fedvlm import adapters
from fedvlm.algorithms.base import split_aux
from fedvlm.algorithms.lora_aggregation import export_tensors
from fedvlm.security import signing
from fedvlm.security.signing import GlobalRecord

from .blobs import BlobStore, file_sha256
from .state import Run, State

HF_PREFIX = "hf:"  # fedvlm.vlm.loading.HF_PREFIX, not imported: the coordinator never loads the model stack


class ExportError(Exception):
    """Nothing was written; the message says why."""


@dataclass(frozen=True)
class BaseModel:
    """What an exported adapter's base is, in terms the operator can act on.

    ``name`` is written as ``base_model_name_or_path``: the hub id for ``hf:<id>`` models (with the commit the sites
    loaded as ``revision``), the preset name for built-in presets (``rebuild`` is the one command that writes the
    identical base: presets are built deterministically), the directory as the task spec names it for
    ``hf:<directory>`` models (a path on the sites)."""

    name: str
    revision: str | None = None
    rebuild: str | None = None
    site_directory: bool = False

    def describe(self) -> str:
        """One line for the operator: where to get the base."""
        if self.rebuild:
            return f"preset {self.name}; rebuild it with: {self.rebuild}"
        if self.site_directory:
            return f"{self.name} (a directory on the sites: copy it from one)"
        return f"hub model {self.name}" + (f" at revision {self.revision}" if self.revision else "")


def base_model(task_model: str, site_config: dict) -> BaseModel:
    """The base of a run whose task spec says ``task_model``, given the adapter config its initial site wrote
    (that site's ``base_model_name_or_path`` is a path in its own cache for presets and hub snapshots)."""
    if not task_model.startswith(HF_PREFIX):
        return BaseModel(task_model, rebuild=f"fedvlm models build {task_model} --out base/")
    revision = site_config.get("revision")
    if revision:  # the site resolved a hub id to this commit (fedvlm.vlm.loading.ModelSource)
        return BaseModel(task_model[len(HF_PREFIX):].rpartition("@")[0] or task_model[len(HF_PREFIX):], revision)
    return BaseModel(task_model[len(HF_PREFIX):], site_directory=True)


@dataclass(frozen=True)
class Exported:
    path: Path
    run_number: int
    round: int
    base: BaseModel


def export_global(state: State, blobs: BlobStore, signer_cert, run: Run | None, number: int | None,
                  out: Path) -> Exported:
    """Write global round `number` (latest if None) of `run` to `out`, after re-checking its signature and digest.
    `out` must not exist or be an empty directory; it appears complete or not at all."""
    if run is None:
        raise ExportError("no run in this federation yet")
    version = state.latest_global(run.run_id) if number is None else state.global_version(run.run_id, number)
    if version is None:
        raise ExportError(f"no global version for round {number} of run {run.number} (see `fedvlm-coord rounds "
                          f"--run {run.number}`)")
    record = GlobalRecord.from_json(version.record_json)
    signing.verify(signer_cert, record.canonical(), version.signature)
    path = blobs.path(record.digest)
    if file_sha256(path) != record.digest:
        raise ExportError(f"blob {record.digest[:12]} does not match its digest; run `fedvlm-coord audit verify`")
    if run.adapter_config is None:
        raise ExportError("the run has no adapter config (its initial adapter carried none)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} exists and is not an empty directory")
    config = json.loads(run.adapter_config)
    base = base_model(run.task.model, config)
    config["base_model_name_or_path"], config["revision"] = base.name, base.revision
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tensors, aux = split_aux(dict(adapters.iter_file_tensors(path)))  # aux tensors (e.g. SCAFFOLD's c) stay here
        if run.task.algorithm.lora_aggregation == "flora":  # the stack as a LoRA of its rank on the unmerged base
            tensors, config = export_tensors(tensors, aux, config)
        adapters.save_file_atomic(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        (tmp / "fedvlm_global.json").write_text(json.dumps(
            {"record": json.loads(version.record_json), "signature": version.signature.hex(),
             "run": {"number": run.number, "run_id": run.run_id, "task_model": run.task.model},
             "base_model": {"name": base.name, "revision": base.revision, "rebuild": base.rebuild,
                            "how": base.describe()}}, indent=2))
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Exported(out, run.number, version.round, base)
