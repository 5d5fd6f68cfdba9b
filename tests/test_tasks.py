"""Answer parsing and metrics of every task type, against known values and reference implementations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedvlm.spec import SpecError, TaskSpec
from fedvlm.tasks import TASKS, get_task, primary_metric, score_mixed
from fedvlm.tasks.captioning import caption_scores, tokenize_caption
from fedvlm.tasks.grounding import box_iou, format_box, grounding_scores, parse_box
from fedvlm.tasks.vqa import normalize_vqa, parse_answer, vqa_accuracy


def test_vqa_normalisation():
    assert normalize_vqa("Yes.") == "yes"
    assert normalize_vqa("  Two  ") == "2"
    assert normalize_vqa("The 7!") == "7"
    assert normalize_vqa("3.5") == "3.5" and normalize_vqa("1,000") == normalize_vqa("1000") == "1000"
    assert normalize_vqa("a red-ish cat") == "red ish cat"
    assert parse_answer("\n  No, it is not\nmore") == "no, it is not".replace(",", "")


def test_vqa_accuracy_known_values():
    metrics = vqa_accuracy(["yes", "No.", "three", "4", ""], ["Yes", "yes", "3", "5", "two"])
    assert metrics["accuracy"] == pytest.approx(2 / 5)
    assert metrics["accuracy_closed"] == pytest.approx(1 / 2) and metrics["num_closed"] == 2
    assert metrics["accuracy_open"] == pytest.approx(1 / 3) and metrics["num_open"] == 3
    assert metrics["num_examples"] == 5
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        vqa_accuracy(["a", "b"], ["a"])


def test_caption_scores_known_values_and_reference_library():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    refs = ["two digits: 4 and 7 from left to right", "one digit: 3", "three digits: 1, 2 and 9 from left to right"]
    perfect = caption_scores(refs, refs)
    for k in ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l"):
        assert perfect[k] == pytest.approx(1.0, abs=1e-6)
    assert perfect["cider"] > 5.0  # identical captions: CIDEr-D near 10 (length penalty 1, idf-weighted cosine 1)
    preds = ["Two digits: 4 and 1.", "one digit: 3", "three digits: 1 and 9"]
    ours = caption_scores(preds, refs)
    gts = {i: [tokenize_caption(r)] for i, r in enumerate(refs)}
    res = {i: [tokenize_caption(p)] for i, p in enumerate(preds)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    assert [ours[f"bleu_{k}"] for k in range(1, 5)] == pytest.approx(bleu)
    assert ours["rouge_l"] == pytest.approx(Rouge().compute_score(gts, res)[0])
    assert ours["cider"] == pytest.approx(Cider().compute_score(gts, res)[0])
    assert 0 < ours["bleu_4"] < ours["bleu_1"] < 1 and ours["num_examples"] == 3
    # ROUGE-L by hand for one pair: LCS("one digit 3", "one digit 3 4") = 3, P = 3/4, R = 1, beta 1.2.
    single = caption_scores(["one digit 3 4"], ["one digit 3"])
    p, r, beta = 3 / 4, 1.0, 1.2
    assert single["rouge_l"] == pytest.approx(((1 + beta**2) * p * r) / (r + beta**2 * p))
    assert caption_scores([""], ["one digit: 3"])["bleu_1"] == pytest.approx(0.0, abs=1e-6)


def test_box_parsing_and_iou_known_values():
    assert parse_box("[8, 16, 16, 24]") == (8, 16, 16, 24)
    assert parse_box("the box is 0 0 8 8.5 ok") == (0, 0, 8, 8.5)
    assert parse_box("[8, 16, 16]") is None and parse_box("[9, 0, 1, 8]") is None and parse_box("") is None
    assert format_box((8.0, 16.2, 16, 24)) == "[8, 16, 16, 24]"
    assert box_iou((0, 0, 8, 8), (0, 0, 8, 8)) == 1.0
    assert box_iou((0, 0, 8, 8), (8, 0, 16, 8)) == 0.0
    assert box_iou((0, 0, 8, 8), (4, 0, 12, 8)) == pytest.approx(32 / 96)
    metrics = grounding_scores(["[0, 0, 8, 8]", "[4, 0, 12, 8]", "nonsense", "[0,0,8,16]"],
                               ["[0, 0, 8, 8]", "[0, 0, 8, 8]", "[0, 0, 8, 8]", "[0, 0, 8, 8]"])
    assert metrics["miou"] == pytest.approx((1 + 1 / 3 + 0 + 0.5) / 4)
    assert metrics["acc_iou50"] == pytest.approx(2 / 4) and metrics["parse_rate"] == pytest.approx(3 / 4)
    with pytest.raises(ValueError, match="reference 0 is not an xyxy box"):
        grounding_scores(["[0,0,1,1]"], ["seven"])


def test_iou_matches_pycocotools():
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 30, size=(50, 2, 2))
    wh = rng.uniform(0.5, 20, size=(50, 2, 2))
    for (a_xy, b_xy), (a_wh, b_wh) in zip(xy, wh, strict=True):
        a = (a_xy[0], a_xy[1], a_xy[0] + a_wh[0], a_xy[1] + a_wh[1])
        b = (b_xy[0], b_xy[1], b_xy[0] + b_wh[0], b_xy[1] + b_wh[1])
        reference = mask_utils.iou([[*a_xy, *a_wh]], [[*b_xy, *b_wh]], [0])[0][0]
        assert box_iou(a, b) == pytest.approx(reference, abs=1e-9)


def test_registry_mixed_scoring_and_primary_metric():
    assert set(TASKS) == {"classification", "vqa", "captioning", "grounding"}
    with pytest.raises(ValueError, match="unknown task type 'nope'"):
        get_task("nope")
    single = score_mixed(["classification"] * 2, ["7", "3"], ["7", "4"])
    assert single == {"accuracy": 0.5, "num_examples": 2.0}
    mixed = score_mixed(["classification", "grounding"], ["7", "[0,0,8,8]"], ["7", "[0, 0, 8, 8]"])
    assert mixed["classification/accuracy"] == 1.0 and mixed["grounding/miou"] == 1.0
    assert mixed["num_examples"] == 2.0 and mixed["grounding/num_examples"] == 1.0
    assert primary_metric(single) == ("accuracy", 0.5)
    assert primary_metric({"cider": 1.5}) == ("cider", 1.5)
    assert primary_metric(mixed) == ("classification/accuracy", 1.0)
    assert all(math.isfinite(v) for v in mixed.values())


def test_task_spec_validates_task_type_and_box_format():
    assert TaskSpec.from_dict({"task_type": "grounding", "box_format": "xyxy-1000"}).box_format == "xyxy-1000"
    with pytest.raises(SpecError, match="task.task_type: must be one of"):
        TaskSpec.from_dict({"task_type": "detection!"})
    with pytest.raises(SpecError, match="task.box_format: must be one of"):
        TaskSpec.from_dict({"box_format": "xywh"})
