"""Runs as a lifecycle inside one federation: `run new`, `run stop`, and what an edited federation.toml means.

federation.toml is the config of the federation's first run and the default of `fedvlm-coord run new`. A run keeps
the config it was created with (in state.db). When federation.toml no longer says what the current run uses, that
is never silently ignored: `serve` refuses to start while such a run is active, a running daemon logs it, and
`status` shows it, with the two ways out (restore the file, or stop the run and start a new one from it).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import uuid
from pathlib import Path
from typing import Any

from fedvlm.spec import SpecError

from .config import FederationConfig
from .layout import FederationDir
from .state import CONFIG_FROM_FEDERATION_TOML, Run, State

log = logging.getLogger(__name__)


class ConfigConflict(Exception):
    """federation.toml disagrees with the active run that was created from it; the message lists the keys."""


def new_run(state: State, config: FederationConfig, source: str = CONFIG_FROM_FEDERATION_TOML) -> Run:
    """Create a run from `config` (it becomes the current run, in state init: the next site to poll builds its
    initial adapter). `source` records the file it came from. TransitionRefused while a run is active."""
    run = state.create_run(uuid.uuid4().hex[:12], config.run, config.task, config_source=source)
    log.info("run %d (%s) created from %s: %d rounds, model %s, strategy %s", run.number, run.run_id, source,
             config.run.rounds, config.task.model, config.task.strategy)
    return run


def config_source(fed: FederationDir, path: Path) -> str:
    """How a run records the file its config came from: "federation.toml" for the federation's own file (which
    `serve` and `status` then compare with the run), else the path as given."""
    if path.resolve() == fed.config.resolve():
        return CONFIG_FROM_FEDERATION_TOML
    return str(path)


def _flat(table: Any, prefix: str) -> dict[str, Any]:
    if not isinstance(table, dict):
        return {prefix: table}
    out: dict[str, Any] = {}
    for key, value in table.items():
        out.update(_flat(value, f"{prefix}.{key}"))
    return out


def config_changes(run: Run, config: FederationConfig) -> list[str]:
    """The keys on which `config` differs from what `run` uses, as "key: run's value -> file's value", sorted."""
    used = {**_flat(dataclasses.asdict(run.config), "run"), **_flat(json.loads(run.task.to_json()), "task")}
    wanted = {**_flat(dataclasses.asdict(config.run), "run"), **_flat(json.loads(config.task.to_json()), "task")}
    return [f"{key}: {used.get(key, '-')} -> {wanted.get(key, '-')}" for key in sorted(used.keys() | wanted.keys())
            if used.get(key) != wanted.get(key)]


def config_notice(fed: FederationDir, run: Run | None) -> str:
    """One line when federation.toml does not say what the current run (created from it) uses, else ""."""
    if run is None or run.config_source != CONFIG_FROM_FEDERATION_TOML:
        return ""
    try:
        changes = config_changes(run, FederationConfig.load(fed.config))
    except SpecError as exc:
        changes = [f"it does not load ({exc})"]
    if not changes:
        return ""
    what = f"federation.toml differs from run {run.number} ({run.run_id}), which is {run.state}: {'; '.join(changes)}"
    if run.state.active:
        return (f"{what}. Not applied: restore the file, or stop the run (`fedvlm-coord run stop`) and start one "
                "from it (`fedvlm-coord run new`)")
    return f"{what}. `fedvlm-coord run new` starts a run from it"


def check_serve_config(fed: FederationDir, state: State) -> None:
    """Refuse (ConfigConflict) to serve an active run created from federation.toml once the file says otherwise."""
    run = state.current_run()
    if run is not None and run.state.active:
        notice = config_notice(fed, run)
        if notice:
            raise ConfigConflict(notice)


class ConfigWatch:
    """Tells, once per change of federation.toml, that it differs from the current run (a warning in the log)."""

    def __init__(self, fed: FederationDir, state: State) -> None:
        self.fed = fed
        self.state = state
        self._told = ""

    def check(self) -> str:
        """The current notice ("" when none); logged when it is new."""
        notice = config_notice(self.fed, self.state.current_run())
        if notice and notice != self._told:
            log.warning("%s", notice)
        self._told = notice
        return notice


MIN_ID_PREFIX = 4


def find_run(state: State, ref: str) -> Run | None:
    """The run a user names: its number (1, 2, ...), its id, or a unique prefix of at least
    `MIN_ID_PREFIX` characters of its id. A short number is only ever a run number: "3" never names the run
    whose random id happens to start with 3."""
    runs = state.runs()
    if ref.isdigit() and len(ref) < MIN_ID_PREFIX:
        return runs[int(ref) - 1] if 1 <= int(ref) <= len(runs) else None
    if ref.isdigit() and 1 <= int(ref) <= len(runs):
        return runs[int(ref) - 1]
    matches = [r for r in runs if r.run_id.startswith(ref)] if len(ref) >= MIN_ID_PREFIX else []
    return matches[0] if len(matches) == 1 else None
