"""Example weighting of the per-site evaluation metrics shown by `status` and the demo."""

from fedvlm.coordinator.status import weighted_metrics


def test_single_task_metrics_are_weighted_by_example_counts():
    rows = [{"accuracy": 1.0, "num_examples": 10}, {"accuracy": 0.0, "num_examples": 30}]
    assert weighted_metrics(rows) == {"accuracy": 0.25, "num_examples": 40}


def test_multi_task_metrics_are_weighted_per_task_over_the_sites_that_report_it():
    rows = [{"vqa/accuracy": 0.5, "vqa/num_examples": 10, "num_examples": 10},
            {"vqa/accuracy": 1.0, "vqa/num_examples": 30, "num_examples": 30},
            {"captioning/cider": 2.0, "captioning/num_examples": 5, "num_examples": 5}]
    out = weighted_metrics(rows)
    assert out["vqa/accuracy"] == 0.875  # (0.5*10 + 1.0*30) / 40: the captioning site does not dilute it
    assert out["captioning/cider"] == 2.0
    assert out["vqa/num_examples"] == 40 and out["num_examples"] == 45


def test_no_reports_no_metrics():
    assert weighted_metrics([]) == {}
