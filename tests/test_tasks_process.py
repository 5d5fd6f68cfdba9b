"""A grounding run through the real programs: coordinator daemon + two fedvlm-client processes over mTLS.

The sites receive ``task_type = "grounding"`` in the task spec, train on built-in scenes, and report mIoU; the
coordinator keeps the example-weighted metrics per round and shows the headline metric in ``status``.
"""

from __future__ import annotations

import json
import signal

import pytest

from fedvlm.data.builtin import build_dataset
from fedvlm.vlm.presets import preset_dir

from .harness import Coordinator, coord_cli, shut_down, start_sites, wait_sites_ok

CONFIG = """
name = "grounding-fed"
[run]
rounds = 1
min_clients = 2
clients_per_round = 2
quorum = 2
round_deadline = "300s"
poll_interval = 0.3
heartbeat_timeout = "60s"
[task]
model = "tiny-llava"
strategy = "F-CL"
task_type = "grounding"
box_format = "xyxy-pixel"
seed = 0
[task.train]
max_steps = 3
batch_size = 8
max_new_tokens = 20
eval_batch_size = 16
"""


@pytest.mark.slow
def test_grounding_run_reports_miou_per_round(tmp_path):
    cache = tmp_path / "cache"
    preset_dir("tiny-llava", cache)
    layout = build_dataset("grounding", tmp_path / "data", sites=2, train_size=32, test_size=8)
    coord = Coordinator(tmp_path / "coord", CONFIG)
    coord.start()
    clients = {}
    try:
        clients = start_sites(coord, layout.site_dirs, tmp_path, cache)
        wait_sites_ok(clients, tmp_path)
        rounds = json.loads(coord_cli("rounds", "--dir", str(coord.fed.root), "--json"))
        assert [r["round"] for r in rounds] == [0, 1]
        for r in rounds:
            metrics = r["eval_metrics"]
            assert {"miou", "acc_iou50", "parse_rate", "num_examples"} <= set(metrics), metrics
            assert metrics["num_examples"] == 8.0
            assert 0.0 <= metrics["miou"] <= 1.0 and 0.0 <= metrics["acc_iou50"] <= 1.0
        status = coord_cli("status", "--dir", str(coord.fed.root))
        assert "miou=" in status
    finally:
        shut_down(coord, clients.values(), signal.SIGTERM)
