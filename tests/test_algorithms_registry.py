"""The algorithm registry: one module per algorithm registers its config and implementation by name, the task spec
finds the config by task.algorithm.name, keys of other algorithms are checked then ignored, and the modules import
one way (no cycle; the config side needs no torch)."""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest

import fedvlm.algorithms
from fedvlm.algorithms import build, config_from_table, registered
from fedvlm.algorithms.base import Algorithm
from fedvlm.algorithms.config import AlgorithmConfig
from fedvlm.algorithms.registry import REGISTRY, register
from fedvlm.spec import SpecError, TaskSpec
from fedvlm.tables import require

PACKAGE = Path(fedvlm.algorithms.__file__).parent


def test_every_algorithm_module_registers_a_config_that_names_it():
    algorithms = registered()
    assert {"fedavg", "fedprox", "scaffold", "fedavgm", "fedadagrad", "fedyogi", "fedadam"} <= set(algorithms)
    for name, entry in algorithms.items():
        config = config_from_table({"name": name})
        assert type(config) is entry.config and config.name == name and config.to_dict()["name"] == name
        assert isinstance(build(config), entry.algorithm)
        assert TaskSpec.from_json(TaskSpec(algorithm=config).to_json()).algorithm == config


def test_keys_of_other_algorithms_are_checked_as_they_check_them_then_ignored():
    config = config_from_table({"name": "fedavg", "eta": 0.03, "mu": 0.5, "clip_norm": 1.0})
    assert config == config_from_table({"name": "fedavg", "clip_norm": 1.0})
    assert not hasattr(config, "eta")
    for raw, key in (({"eta": -1.0}, "task.algorithm.eta"), ({"mu": "x"}, "task.algorithm.mu"),
                     ({"server_momentum": 1.5}, "task.algorithm.server_momentum"),
                     ({"nonsense": 1}, "task.algorithm.nonsense"), ({"name": 3}, "task.algorithm.name")):
        with pytest.raises(SpecError, match=key.replace(".", r"\.")):
            config_from_table({"name": "fedavg", **raw})


def test_a_new_algorithm_is_one_config_class_one_implementation_and_one_registration():
    @dataclass(frozen=True)
    class DampedConfig(AlgorithmConfig):
        name: ClassVar[str] = "test-damped"

        damping: float = 0.5  # the server step is x + damping * d

        def __post_init__(self) -> None:
            super().__post_init__()
            require(0 < self.damping <= 1, "task.algorithm.damping", "must be in (0, 1]")

    class Damped(Algorithm):
        def server_update(self, base, delta, state):
            return {n: base[n] + self.config.damping * d.to(base[n].dtype) for n, d in delta.items()}

    registered()
    register(DampedConfig, Damped)
    try:
        spec = TaskSpec.from_dict({"algorithm": {"name": "test-damped", "damping": 0.25, "aggregator": "median"}})
        assert spec.algorithm == DampedConfig(damping=0.25, aggregator="median")
        assert isinstance(build(spec.algorithm), Damped)
        with pytest.raises(SpecError, match=r"task\.algorithm\.damping: must be in"):
            TaskSpec.from_dict({"algorithm": {"name": "test-damped", "damping": 2}})
        with pytest.raises(ValueError, match="registered as 'test-damped'"):
            register(DampedConfig, Algorithm)
    finally:
        del REGISTRY["test-damped"]


def _imports(path: Path) -> set[str]:
    """The modules of fedvlm.algorithms (and fedvlm.spec) that `path` imports at module level."""
    out = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                out |= {node.module} if node.module else {a.name for a in node.names}
            elif node.module in ("fedvlm.spec", "fedvlm.algorithms"):
                out.add(node.module)
            elif node.module and node.module.startswith("fedvlm.algorithms."):
                out.add(node.module.rsplit(".", 1)[1])
    return out


def test_the_algorithm_modules_import_one_way():
    graph = {p.stem: _imports(p) for p in PACKAGE.glob("*.py")}
    assert graph["registry"] <= {"config"} and graph["config"] == set()
    assert graph["__init__"] <= {"config", "registry"}  # the algorithm modules are imported at lookup time only
    for name, imports in graph.items():
        assert "fedvlm.spec" not in imports and "fedvlm.algorithms" not in imports, name
    seen: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, f"import cycle: {' -> '.join((*path, module))}"
        if module not in seen:
            seen.add(module)
            for dep in graph.get(module, ()):
                visit(dep, (*path, module))

    for module in graph:
        visit(module, ())


def test_the_spec_module_and_the_read_only_commands_import_no_torch():
    code = ("import sys, fedvlm.coordinator.cli; from fedvlm.spec import TaskSpec; "
            "assert 'torch' not in sys.modules, 'imported torch'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_algorithm_configs_are_frozen_dataclasses_with_defaults():
    for entry in registered().values():
        assert dataclasses.is_dataclass(entry.config) and entry.config.__dataclass_params__.frozen
        assert all(f.default is not dataclasses.MISSING for f in dataclasses.fields(entry.config))
