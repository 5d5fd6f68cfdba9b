"""F-2stage through the real coordinator and two fedvlm-client processes, on the encoder-free preset loaded as
``hf:<dir>`` (fedvlm's registered ``fedvlm_llava`` type): round 1 updates hold only the patch embedding, rounds 2-3
only LoRA tensors; the final global has the stage-1 connector and trained LoRA; the export loads with PEFT."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from .harness import Coordinator, coord_cli, shut_down, start_sites, wait_for

# Real processes (a coordinator daemon, sites): the slow half of `make test`.
pytestmark = pytest.mark.slow

CONFIG = """
name = "it-2stage"
[run]
rounds = 3
min_clients = 2
clients_per_round = 2
quorum = 2
round_deadline = "300s"
poll_interval = 0.3
heartbeat_timeout = "60s"
[task]
model = "hf:{model}"
strategy = "F-2stage"
switch_round = 2
seed = 0
[task.train]
batch_size = 4
max_steps = 4
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from fedvlm.vlm.presets import preset_dir

    root = tmp_path_factory.mktemp("fed-2stage")
    model = root / "model"
    shutil.copytree(preset_dir("tiny-encoder-free", root / "cache"), model)
    sites = []
    for i in range(2):  # tiny sites: this test is about what travels, not about accuracy
        site = root / f"data-{i}"
        (site / "images").mkdir(parents=True)
        from fedvlm.data.digits import build_digits

        if not (root / "digits" / "test.json").exists():
            build_digits(root / "digits", sites=2, seed=0)
        source = root / "digits" / f"site_{i}"
        for split, count in (("train", 16), ("test", 4)):
            records = json.loads((source / f"{split}.json").read_text())[:count]
            for record in records:
                shutil.copy(source / record["image"], site / record["image"])
            (site / f"{split}.json").write_text(json.dumps(records))
        sites.append(site)
    coord = Coordinator(root / "coord", CONFIG.format(model=model))
    coord.start()
    clients = {}
    try:
        clients = start_sites(coord, sites, root, root / "cache")
        wait_for(lambda: all(p.poll() is not None for p in clients.values()), 300, "both sites to finish")
        yield {"coord": coord, "clients": clients, "root": root, "sites": sites, "model": model}
    finally:
        shut_down(coord, clients.values())


def test_two_stage_updates_and_globals_through_the_coordinator(run, tmp_path):
    coord = run["coord"]
    for name, proc in run["clients"].items():
        assert proc.returncode == 0, (run["root"] / f"{name}.log").read_text()[-3000:]
    globals_ = {r["round"]: coord.blob(r["digest"]) for r in coord.query("SELECT round, digest FROM globals")}
    assert sorted(globals_) == [0, 1, 2, 3]
    initial = globals_[0]
    connector = {k for k in initial if ".lora_" not in k}
    lora = set(initial) - connector
    assert connector and lora and all("multi_modal_projector" in k for k in connector)
    for rnd, expected in ((1, connector), (2, lora), (3, lora)):
        rows = coord.query("SELECT digest FROM updates WHERE round=?", (rnd,))
        assert len(rows) == 2
        for row in rows:
            assert set(coord.blob(row["digest"])) == expected, f"round {rnd}"
    assert set(globals_[3]) == set(initial)
    assert all(not torch.equal(globals_[1][k], initial[k]) for k in connector)
    assert all(torch.equal(globals_[3][k], globals_[1][k]) for k in connector), "stage 2 moved the connector"
    assert all(torch.equal(globals_[1][k], initial[k]) for k in lora), "stage 1 moved the LoRA"
    assert any(not torch.equal(globals_[3][k], initial[k]) for k in lora if "lora_B" in k)

    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForImageTextToText

    out = tmp_path / "adapter"
    coord_cli("export", "--dir", str(coord.fed.root), "--round", "3", "--out", str(out))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(run["model"])
    base = AutoModelForImageTextToText.from_pretrained(config["base_model_name_or_path"])
    loaded = get_peft_model_state_dict(PeftModel.from_pretrained(base, out))
    assert loaded.keys() == globals_[3].keys()
    assert all(torch.equal(loaded[k], globals_[3][k]) for k in loaded)
