"""Hugging Face families through the real coordinator and two ``fedvlm-client`` processes (mTLS on loopback): tiny
checkpoints of llava_next, qwen2_5_vl, smolvlm and paligemma (fedvlm.vlm.zoo) loaded as ``hf:<dir>``; one round of
FedAvg; both sites evaluate both globals; the exported adapter of the last round loads with PEFT and holds the
global's tensors."""

from __future__ import annotations

import json

import pytest
import torch

from fedvlm.vlm import zoo

from .harness import Coordinator, coord_cli, shut_down, small_sites, start_sites, wait_sites_ok

CONFIG = """
name = "it-families"
[run]
rounds = 1
min_clients = 2
clients_per_round = 2
quorum = 2
round_deadline = "300s"
poll_interval = 0.3
heartbeat_timeout = "60s"
[task]
model = "hf:{model}"
strategy = "F-CL"
seed = 0
[task.train]
batch_size = 4
max_steps = 3
max_new_tokens = 3
"""


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llava_next", "qwen2_5_vl", "smolvlm", "paligemma"])
def test_family_trains_in_a_real_federation(family, digits, tmp_path):
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForImageTextToText

    model = zoo.build(family, tmp_path / "model")
    sites = small_sites(digits, tmp_path, 2, 12, 4)
    coord = Coordinator(tmp_path / "coord", CONFIG.format(model=model))
    coord.start()
    clients = {}
    try:
        clients = start_sites(coord, sites, tmp_path, tmp_path / "cache")
        wait_sites_ok(clients, tmp_path, timeout=300)
    finally:
        shut_down(coord, clients.values())
    assert [r["round"] for r in coord.query("SELECT round FROM globals ORDER BY round")] == [0, 1]
    assert len(coord.query("SELECT digest FROM updates WHERE round=1")) == 2
    evaluated = coord.query("SELECT round, client FROM metrics WHERE kind='eval' ORDER BY round, client")
    assert [(r["round"], r["client"]) for r in evaluated] == [(0, "site-1"), (0, "site-2"), (1, "site-1"),
                                                               (1, "site-2")]

    out = tmp_path / "adapter"
    coord_cli("export", "--dir", str(coord.fed.root), "--round", "1", "--out", str(out))
    digest = coord.query("SELECT digest FROM globals WHERE round=1")[0]["digest"]
    final = coord.blob(digest)
    base = AutoModelForImageTextToText.from_pretrained(json.loads((out / "adapter_config.json").read_text())
                                                       ["base_model_name_or_path"])
    loaded = get_peft_model_state_dict(PeftModel.from_pretrained(base, out))
    assert loaded.keys() == final.keys() and all(torch.equal(loaded[k], final[k]) for k in final)
