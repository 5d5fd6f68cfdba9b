"""One federated round on every built-in task: two sites train, FedAvg, evaluate -> the task's metrics in range."""

from __future__ import annotations

import math

import pytest

from fedvlm.algorithms.fedavg import fedavg
from fedvlm.data.builtin import build_dataset
from fedvlm.learner import Learner
from fedvlm.spec import TaskSpec, TrainSpec
from fedvlm.tasks import TASKS

EXPECTED = {
    "classification": {"accuracy"},
    "vqa": {"accuracy", "accuracy_closed", "accuracy_open"},
    "captioning": {"bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider"},
    "grounding": {"miou", "acc_iou50", "parse_rate"},
}


def _in_range(name: str, value: float) -> bool:
    upper = 10.0 if name.endswith("cider") else 1.0
    return math.isfinite(value) and 0.0 <= value <= upper


def _round(spec: TaskSpec, site_dirs) -> list[dict[str, float]]:
    sites = [Learner(spec, d) for d in site_dirs]
    results = [site.train_round(0) for site in sites]
    assert all(r.steps > 0 and math.isfinite(r.loss_last) for r in results)
    merged = fedavg((site.num_train_examples, iter(site.adapter_state().items())) for site in sites)
    for site in sites:
        site.load_adapter_state(merged)
    return [site.evaluate() for site in sites]


@pytest.mark.parametrize("name", ["vqa", "captioning", "grounding"])
def test_one_federated_round_reports_the_task_metrics(fedvlm_cache, tmp_path, name):
    layout = build_dataset(name, tmp_path / name, sites=2, train_size=48, test_size=12)
    task = TASKS[layout.task_type]
    spec = TaskSpec(task_type=layout.task_type,
                    train=TrainSpec(max_steps=4, batch_size=8, max_new_tokens=task.max_new_tokens))
    for metrics in _round(spec, layout.site_dirs):
        assert EXPECTED[name] <= set(metrics), metrics
        assert metrics["num_examples"] == 6.0
        assert all(_in_range(k, v) for k, v in metrics.items() if not k.startswith("num_")), metrics


def test_multitask_round_scores_each_site_with_its_own_task(fedvlm_cache, tmp_path):
    layout = build_dataset("multitask", tmp_path / "mt", sites=4, train_size=16, test_size=4)
    assert layout.task_type == "multitask"
    spec = TaskSpec(task_type="multitask", train=TrainSpec(max_steps=2, batch_size=8, max_new_tokens=20))
    all_metrics = _round(spec, layout.site_dirs[:2])  # classification and vqa sites
    assert set(all_metrics[0]) == {"accuracy", "num_examples"}
    assert EXPECTED["vqa"] <= set(all_metrics[1])
