"""Resumable uploads: a site process SIGKILLed mid-upload restarts and sends only what the coordinator lacks."""

from __future__ import annotations

import re
import signal
import subprocess

import pytest

from fedvlm.data.digits import build_digits
from fedvlm.vlm.presets import preset_dir

from .harness import Coordinator, start_site, wait_for

# Real processes (a coordinator daemon, sites): the slow half of `make test`.
pytestmark = pytest.mark.slow

CONFIG = """
name = "resume-fed"
[run]
rounds = 1
min_clients = 1
clients_per_round = 1
quorum = 1
round_deadline = "300s"
poll_interval = 0.2
heartbeat_timeout = "60s"
final_eval = false
[task]
model = "tiny-llava"
[task.train]
local_epochs = 0.2
"""


def test_site_killed_mid_upload_resumes_from_the_stored_offset(tmp_path):
    cache = tmp_path / "cache"
    preset_dir("tiny-llava", cache)
    layout = build_digits(tmp_path / "data", sites=1, seed=1)
    coord = Coordinator(tmp_path / "coord", CONFIG)
    coord.start()
    token = coord.token("site-1")
    log_path = tmp_path / "site-1.log"

    def start() -> subprocess.Popen:
        return start_site(coord, "site-1", layout.site_dirs[0], tmp_path, cache, "--max-upload-rate", "0.03",
                          token=token)

    site = start()
    try:
        def uploading_round_one():
            if site.poll() is not None:
                raise AssertionError(f"site exited early: {log_path.read_text()[-2000:]}")
            # The detail names the round being uploaded: the initial adapter's upload (round 0) can still be the
            # recorded activity for a moment after round 1 opens.
            rows = coord.query("SELECT bytes_done, bytes_total FROM clients WHERE state='uploading' "
                               "AND detail='round 1'")
            return rows and rows[0]["bytes_done"] > 0.3 * rows[0]["bytes_total"]

        wait_for(uploading_round_one, 240, "the round-1 upload to be well under way", interval=0.05)
        site.send_signal(signal.SIGKILL)
        site.wait(timeout=30)
        stored = wait_for(lambda: coord.query("SELECT received, size FROM uploads WHERE round=1 AND received>0"),
                          60, "the coordinator to checkpoint the cut upload")[0]
        assert 0 < stored["received"] < stored["size"]
        assert coord.query("SELECT COUNT(*) AS n FROM updates WHERE round=1") == [{"n": 0}]

        site = start()  # same --state: the identity and the signed update in the outbox are reused
        assert site.wait(timeout=240) == 0, log_path.read_text()[-3000:]
    finally:
        if site.poll() is None:
            site.kill()
        coord.kill(signal.SIGTERM)

    log = log_path.read_text()
    assert "resuming the upload of the update already trained" in log
    match = re.search(r"round 1: update \w+ accepted \(sent (\d+) of (\d+) bytes, resumed from (\d+)\)", log)
    assert match, log[-2000:]
    sent, size, resumed_from = map(int, match.groups())
    assert resumed_from >= stored["received"] > 0
    assert sent == size - resumed_from < size
    assert log.count("round 1: trained") == 1  # the update was not retrained
    assert coord.query("SELECT COUNT(*) AS n FROM updates WHERE round=1") == [{"n": 1}]
