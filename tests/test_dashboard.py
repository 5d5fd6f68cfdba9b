"""The dashboard and runs as a lifecycle, against a real daemon: a real headless Chromium loads the page, sees the
sites and follows the rounds as they complete; unauthenticated requests are refused; then the federation starts
and stops further runs through `fedvlm-coord run`, and its first run stays readable."""

from __future__ import annotations

import json
import os
import socket
import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from fedvlm import adapters
from fedvlm.wire.v1 import federation_pb2 as pb

from .browser import chromium
from .harness import Coordinator, RawSite, coord_cli, tensors_bytes, wait_for

pytestmark = pytest.mark.slow

CONFIG = """
name = "dash"
[run]
rounds = 2
min_clients = 2
clients_per_round = 2
quorum = 2
round_deadline = "300s"
poll_interval = 0.2
heartbeat_timeout = "60s"
final_eval = false
"""
ADAPTER_CONFIG = json.dumps({"peft_type": "LORA", "base_model_name_or_path": "/site/cache/models/tiny-llava-x",
                             "revision": None})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def update(value: float) -> bytes:
    return tensors_bytes({"layer.lora_A.weight": torch.full((2, 4), float(value)),
                          "layer.lora_B.weight": torch.full((4, 2), float(value))})


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    root = tmp_path_factory.mktemp("dashboard")
    coord = Coordinator(root / "coord", CONFIG, ("--dashboard-listen", f"127.0.0.1:{free_port()}"))
    coord.start()
    sites = {name: RawSite(coord, name, root) for name in ("a", "b")}
    yield coord, sites, root
    for site in sites.values():
        site.close()
    coord.kill()


def request(coord: Coordinator, path: str = "/", method: str = "GET", cert: tuple[Path, Path] | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict, bytes]:
    """(status, headers, body) of an HTTPS request that verifies the dashboard against the federation CA."""
    context = ssl.create_default_context(cafile=str(coord.fed.ca_cert))
    context.check_hostname = False  # the server certificate names localhost; this dials 127.0.0.1 too
    if cert:
        context.load_cert_chain(*cert)

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=context), NoRedirect)
    req = urllib.request.Request(f"https://{coord.dashboard_address}{path}", method=method, headers=headers or {})
    try:
        with opener.open(req, timeout=10) as reply:
            return reply.status, dict(reply.headers), reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_only_the_admin_certificate_or_the_token_is_admitted_and_nothing_is_written(fed):
    coord, _, root = fed
    token = coord.dashboard_token
    assert token.startswith("fvd1.")
    status, headers, body = request(coord)
    assert status == 401 and b"dashboard token" in body
    assert request(coord, "/api/status", headers={"Authorization": "Bearer fvd1.wrong"})[0] == 401
    assert request(coord, "/api/status", headers={"Cookie": "fedvlm_dashboard=fvd1.wrong"})[0] == 401
    site_cert = (root / "a" / "cert.pem", root / "a" / "key.pem")
    assert all(p.exists() for p in site_cert), sorted(p.name for p in (root / "a").iterdir())
    assert request(coord, "/api/status", cert=site_cert)[0] == 403  # a site is not the operator
    admin = (coord.fed.admin_cert, coord.fed.admin_key)
    status, headers, body = request(coord, "/api/status", cert=admin)
    assert status == 200 and json.loads(body)["status"]["run_number"] == 1
    assert headers["Content-Security-Policy"].startswith("default-src 'self'")
    assert request(coord, "/api/status", headers={"Authorization": f"Bearer {token}"})[0] == 200
    status, headers, _ = request(coord, f"/?token={token}")
    assert status == 303 and headers["Location"] == "/" and "HttpOnly" in headers["Set-Cookie"]
    assert request(coord, "/api/status", method="POST", cert=admin)[0] == 405
    assert request(coord, "/api/status", method="DELETE", headers={"Authorization": f"Bearer {token}"})[0] == 405


def text_of(driver, element_id: str) -> str:
    return driver.find_element("id", element_id).text


def wait_page(driver, element_id: str, wanted: str, what: str, timeout: float = 30) -> str:
    return wait_for(lambda: wanted in text_of(driver, element_id) and text_of(driver, element_id), timeout, what)


def test_the_page_shows_the_sites_and_follows_the_rounds_live(fed, tmp_path):
    coord, sites, _ = fed
    driver = chromium(coord.fed.server_cert)
    try:
        driver.get(f"https://{coord.dashboard_address}/?token={coord.dashboard_token}")
        wait_page(driver, "round", "init", "the page to show run 1 in init")
        wait_page(driver, "connection", "live", "the event stream to connect")
        table = text_of(driver, "sites")
        assert "a" in table.split() and "b" in table.split()
        assert "verified" in text_of(driver, "audit")
        first = sites["a"].poll()
        assert first.action == pb.ACTION_INIT
        metadata = {adapters.ADAPTER_CONFIG_METADATA: ADAPTER_CONFIG}
        init = tensors_bytes({"layer.lora_A.weight": torch.zeros(2, 4), "layer.lora_B.weight": torch.zeros(4, 2)},
                             metadata)
        sites["a"].send(sites["a"].manifest(first, init), init)
        for number in (1, 2):
            def both_train():
                polled = {n: s.poll() for n, s in sites.items()}  # every site heartbeats on each try
                return all(t.action == pb.ACTION_TRAIN for t in polled.values()) and polled

            tasks = wait_for(both_train, 30, f"round {number} to open")
            wait_page(driver, "round", f"{number} of 2", f"the page to show round {number}")
            site = sites["a"]
            site.stub.Poll(pb.PollRequest(state=pb.CLIENT_STATE_TRAINING, run_id=tasks["a"].run_id, round=number,
                                          step=3, steps_total=8), timeout=10)
            wait_page(driver, "sites", "step 3/8", "the page to show a's training step")
            for offset, (name, task) in enumerate(sorted(tasks.items())):
                sites[name].stub.ReportMetrics(pb.MetricsReport(
                    run_id=task.run_id, round=number - 1, kind="eval", global_digest=task.global_version.digest,
                    metrics={"accuracy": 0.2 * number + 0.1 * offset, "num_examples": 10}), timeout=10)
                sites[name].stub.ReportMetrics(pb.MetricsReport(
                    run_id=task.run_id, round=number, kind="train",
                    metrics={"seconds": 4.5 + offset, "steps": 8, "num_examples": 10}), timeout=10)
                data = update(number + offset)
                sites[name].send(sites[name].manifest(task, data), data)
        wait_page(driver, "round", "2 of 2", "the last round")
        wait_page(driver, "phase", "done", "the page to show the run done")
        assert "4.5s, 8 steps (round 2)" in text_of(driver, "sites")
        assert len(driver.find_elements("css selector", "#scores circle")) == 2  # globals 0 and 1 were scored
        assert len(driver.find_elements("css selector", "#durations rect")) == 2
        assert "3 signed globals" in wait_page(driver, "audit-detail", "3 signed globals", "the audit chain")
        shot = Path(os.environ.get("FEDVLM_DASHBOARD_SCREENSHOT") or tmp_path / "dashboard.png")
        driver.save_screenshot(str(shot))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        driver.delete_all_cookies()  # a visitor without the token
        driver.get(f"https://{coord.dashboard_address}/")
        assert "401 Unauthorized" in driver.find_element("tag name", "body").text
    finally:
        driver.quit()


def test_a_new_run_reaches_the_enrolled_sites_and_the_first_stays_readable(fed, tmp_path):
    coord, sites, root = fed
    d = str(coord.fed.root)
    wait_for(lambda: json.loads(coord_cli("status", "--dir", d, "--json"))["run_state"] == "done", 30, "run 1 done")
    first_id = json.loads(coord_cli("status", "--dir", d, "--json"))["run_id"]
    run_toml = tmp_path / "run.toml"
    run_toml.write_text(CONFIG.replace("rounds = 2", "rounds = 1") + '[task]\nstrategy = "F-L"\n')
    out = coord_cli("run", "new", "--dir", d, "--config", str(run_toml))
    assert out.startswith("run 2 (") and "1 rounds" in out and "strategy F-L" in out
    task = wait_for(lambda: (t := sites["b"].poll()).run_id != first_id and t, 30, "b to see run 2")
    assert task.action in (pb.ACTION_INIT, pb.ACTION_WAIT) and json.loads(task.task_spec_json)["strategy"] == "F-L"
    with pytest.raises(RuntimeError, match=r"run 2 \(\w+\) is init: stop it first"):
        coord_cli("run", "new", "--dir", d)
    runs = json.loads(coord_cli("run", "list", "--dir", d, "--json"))
    assert [(r["number"], r["state"], r["rounds_done"], r["config_source"]) for r in runs] == \
        [(1, "done", 2, "federation.toml"), (2, "init", 0, str(run_toml))]
    old = json.loads(coord_cli("rounds", "--dir", d, "--run", "1", "--json"))
    assert [r["round"] for r in old] == [0, 1, 2] and old[1]["eval_metrics"]["accuracy"] == pytest.approx(0.45)
    remote = json.loads(coord_cli("rounds", "--coordinator", coord.address, "--dir", d, "--run", first_id[:5],
                                  "--json"))
    assert remote == old
    out = coord_cli("export", "--dir", d, "--run", "1", "--round", "1", "--out", str(tmp_path / "adapter"))
    assert "exported run 1 round 1" in out and "fedvlm models build tiny-llava --out base/" in out
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny-llava"  # not the initial site's cache path
    stopped = coord_cli("run", "stop", "--dir", d, "--reason", "wrong strategy")
    assert stopped.startswith("run 2 (") and stopped.strip().endswith("wrong strategy")
    finished = wait_for(lambda: (t := sites["a"].poll()).action == pb.ACTION_FINISHED and t, 30, "a to hear it")
    assert finished.message == "run stopped: wrong strategy"
    status = json.loads(coord_cli("status", "--dir", d, "--json"))
    assert (status["run_number"], status["run_state"], status["phase"], status["stop_reason"]) == \
        (2, "stopped", "stopped", "wrong strategy")
    kinds = [json.loads(r["entry_json"])["kind"] for r in coord.query("SELECT entry_json FROM audit ORDER BY seq")]
    assert kinds.count("run") == 2 and kinds[-1] == "run_stopped"
    assert "audit log OK" in coord_cli("audit", "verify", "--dir", d)


def test_an_edited_federation_toml_under_an_active_run_stops_serve_and_shows_in_status(fed):
    coord, _, _ = fed
    d = str(coord.fed.root)
    coord_cli("run", "new", "--dir", d)  # run 3, from federation.toml
    coord.fed.config.write_text(CONFIG.replace("rounds = 2", "rounds = 4"))
    notice = wait_for(lambda: json.loads(coord_cli("status", "--coordinator", coord.address, "--dir", d,
                                                   "--json"))["config_notice"], 30, "the live notice")
    assert "run.rounds: 2 -> 4. Not applied" in notice
    wait_for(lambda: "federation.toml differs from run 3" in coord.log.read_text(), 30, "the daemon's warning")
    coord.kill()
    with pytest.raises(RuntimeError, match="coordinator exited with 1") as refused:
        coord.start()
    assert "run.rounds: 2 -> 4. Not applied: restore the file, or stop the run" in " ".join(str(refused.value).split())
    coord.fed.config.write_text(CONFIG)
    time.sleep(0.2)
    coord.start()  # restored: it serves run 3 again
    assert json.loads(coord_cli("status", "--dir", d, "--json"))["run_number"] == 3
