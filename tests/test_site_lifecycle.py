"""Real site agents across runs: a `fedvlm-client --keep-running` finishes one run, takes part in the next one the
operator starts (no new token, the same process), and a site whose agent stops on an error is shown as failed with
its reason instead of going quietly offline."""

from __future__ import annotations

import json
import signal

import pytest

from .harness import Coordinator, coord_cli, shut_down, small_sites, start_site, wait_for

pytestmark = pytest.mark.slow

CONFIG = """
name = "lifecycle"
[run]
rounds = 1
min_clients = 1
clients_per_round = 1
quorum = 1
round_deadline = "300s"
poll_interval = 0.2
heartbeat_timeout = "2s"
final_eval = false
[task]
model = "tiny-llava"
[task.train]
local_epochs = 1.0
batch_size = 4
"""


def status(coord: Coordinator) -> dict:
    return json.loads(coord_cli("status", "--dir", str(coord.fed.root), "--json"))


def site_state(coord: Coordinator, name: str) -> dict:
    return next(c for c in status(coord)["clients"] if c["name"] == name)


def test_a_kept_running_site_joins_the_next_run_and_a_crashed_one_is_reported(tmp_path, digits, fedvlm_cache):
    data = small_sites(digits, tmp_path, 2, train=8, test=4)
    coord = Coordinator(tmp_path / "coord", CONFIG)
    coord.start()
    d = str(coord.fed.root)
    keeper = start_site(coord, "site-1", data[0], tmp_path, fedvlm_cache, "--keep-running")
    crasher = None
    try:
        wait_for(lambda: status(coord)["run_state"] == "done", 240, "run 1 to finish")
        log = tmp_path / "site-1.log"
        wait_for(lambda: "waiting for the next run" in log.read_text(), 30, "site-1 to wait for the next run")
        wait_for(lambda: site_state(coord, "site-1")["state"] == "done", 30, "site-1 reported done")
        assert keeper.poll() is None, "a --keep-running site exited at the end of the run"
        (tmp_path / "run.toml").write_text(CONFIG.replace('model = "tiny-llava"', 'model = "tiny-llava"\n'
                                                                                  'strategy = "F-L"'))
        coord_cli("run", "new", "--dir", d, "--config", str(tmp_path / "run.toml"))
        wait_for(lambda: status(coord)["run_number"] == 2 and status(coord)["run_state"] == "done", 240,
                 "run 2 to finish with the same site process")
        rounds = json.loads(coord_cli("rounds", "--dir", d, "--json"))
        assert [r["num_updates"] for r in rounds] == [0, 1]
        assert log.read_text().count("joining") == 1 and "Traceback" not in log.read_text()
        keeper.send_signal(signal.SIGTERM)
        keeper.wait(timeout=30)
        # A site whose agent cannot train this run: it says so to the coordinator before it exits.
        coord_cli("run", "new", "--dir", d)
        crasher = start_site(coord, "site-2", data[1], tmp_path, fedvlm_cache, "--lora-rank", "4")
        assert wait_for(lambda: crasher.poll() is not None, 240, "site-2 to stop") == 1
        failed = site_state(coord, "site-2")
        assert failed["state"] == "failed", failed
        assert "--lora-rank 4" in failed["detail"] and "lora_exact" in failed["detail"]
        site_log = (tmp_path / "site-2.log").read_text()
        assert "error: --lora-rank 4" in site_log and "Traceback" not in site_log
        assert "site site-2 stopped on an error: --lora-rank 4" in coord.log.read_text()
        assert "failed" in coord_cli("status", "--dir", d)  # the reason is in the table's note column too
    finally:
        shut_down(coord, (keeper, crasher), signal.SIGTERM)
