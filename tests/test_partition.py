"""Partitioners: every record assigned exactly once, determinism, skew statistics, report files, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon
from typer.testing import CliRunner

from fedvlm.cli import app
from fedvlm.data.partition import (
    by_attribute,
    dirichlet_label_skew,
    heterogeneity,
    iid,
    js_divergence,
    label_histograms,
    partition_records,
    quantity_skew,
)

LABELS = [i % 10 for i in range(1000)]


def _exactly_once(parts, n):
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(n))


def _mean_js(labels, parts):
    return heterogeneity(label_histograms(labels, parts)[1])[1]


def test_iid_is_balanced_deterministic_and_close_to_global():
    parts = iid(1000, 7, seed=3)
    _exactly_once(parts, 1000)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert parts == iid(1000, 7, seed=3) and parts != iid(1000, 7, seed=4)
    assert _mean_js(LABELS, parts) < 0.02


def test_dirichlet_small_alpha_is_skewed_and_large_alpha_is_close_to_iid():
    skewed = dirichlet_label_skew(LABELS, 5, alpha=0.1, seed=0)
    near_iid = dirichlet_label_skew(LABELS, 5, alpha=1000.0, seed=0)
    for parts in (skewed, near_iid):
        _exactly_once(parts, len(LABELS))
        assert min(map(len, parts)) >= 1
    assert skewed == dirichlet_label_skew(LABELS, 5, alpha=0.1, seed=0)
    assert _mean_js(LABELS, skewed) > 0.3
    assert _mean_js(LABELS, near_iid) < 0.01
    # Monotone on average: more concentration, less heterogeneity.
    values = [np.mean([_mean_js(LABELS, dirichlet_label_skew(LABELS, 5, a, s)) for s in range(3)])
              for a in (0.05, 0.5, 5.0, 50.0)]
    assert values == sorted(values, reverse=True)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        dirichlet_label_skew(LABELS, 5, alpha=0, seed=0)


def test_quantity_skew_sizes():
    parts = quantity_skew(1000, 6, alpha=0.3, seed=1)
    _exactly_once(parts, 1000)
    sizes = sorted(map(len, parts))
    assert sizes[0] >= 1 and sizes[-1] > 3 * sizes[0]
    even = quantity_skew(1000, 6, alpha=1e4, seed=1)
    assert max(map(len, even)) - min(map(len, even)) < 30
    assert parts == quantity_skew(1000, 6, alpha=0.3, seed=1)


def test_split_by_attribute_and_task():
    values = ["a", "b", "c", "a", "b", "c", "c"]
    parts, held = by_attribute(values)
    assert parts == [[0, 3], [1, 4], [2, 5, 6]] and held == [["a"], ["b"], ["c"]]
    parts, held = by_attribute(values, sites=2)
    _exactly_once(parts, 7)
    assert held == [["a", "c"], ["b"]]
    with pytest.raises(ValueError, match="4 sites but only 3 distinct values"):
        by_attribute(values, sites=4)
    records = [{"id": str(i), "task": t} for i, t in enumerate(["vqa", "grounding", "vqa"])]
    result = partition_records(records, "task", sites=2)
    assert result.parts == [[1], [0, 2]] and result.held == [["grounding"], ["vqa"]]
    with pytest.raises(ValueError, match=r"record 0 \(id '0'\): no field 'label'"):
        partition_records(records, "dirichlet", sites=2, key="label")


def test_js_divergence_matches_scipy_and_histograms():
    rng = np.random.default_rng(0)
    for _ in range(20):
        p, q = rng.integers(0, 10, size=6) + 0.0, rng.integers(1, 10, size=6) + 0.0
        p[0] += 1
        assert js_divergence(p, q) == pytest.approx(jensenshannon(p, q, base=2) ** 2, abs=1e-12)
    assert js_divergence([1, 0], [0, 1]) == pytest.approx(1.0)
    classes, counts = label_histograms(["10", "2", "2", "x"], [[0, 1], [2, 3]])
    assert classes == ["2", "10", "x"] and counts.tolist() == [[1, 1, 0], [1, 0, 1]]


def test_cli_partition_writes_sites_report_and_figures(tmp_path):
    from PIL import Image

    (tmp_path / "images").mkdir()
    records = []
    for i in range(60):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / "images" / f"{i}.png")
        records.append({"id": f"r{i}", "image": f"images/{i}.png", "label": i % 4, "conversations": [
            {"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": str(i % 4)}]})
    (tmp_path / "train.json").write_text(json.dumps(records))
    (tmp_path / "test.json").write_text(json.dumps(records[:20]))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["data", "partition", str(tmp_path / "train.json"), "--out", str(out),
                                      "--sites", "3", "--method", "dirichlet", "--alpha", "0.3", "--key", "label",
                                      "--test", str(tmp_path / "test.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "partition.json").read_text())
    assert sum(report["sizes"]) == 60 and len(report["counts"]) == 3 and report["classes"] == ["0", "1", "2", "3"]
    assert (out / "label_heatmap.png").stat().st_size > 1000 and (out / "heterogeneity.png").is_file()
    assert "| site_0 |" in (out / "partition.md").read_text()
    from fedvlm.data.llava_json import load_llava_json

    seen = []
    for s in range(3):
        seen += [e.id for e in load_llava_json(out / f"site_{s}" / "train.json")]
    assert sorted(seen) == sorted(r["id"] for r in records)
    assert sum(len(json.loads((out / f"site_{s}" / "test.json").read_text())) for s in range(3)) == 20
    bad = CliRunner().invoke(app, ["data", "partition", str(tmp_path / "train.json"), "--out", str(out),
                                   "--method", "zipf"])
    assert bad.exit_code == 2 and "unknown partition method 'zipf'" in bad.output
