"""Captioning: BLEU-1..4, ROUGE-L and CIDEr-D with the COCO caption scorers (``pycocoevalcap``, pure Python).

METEOR and SPICE need Java and are not computed. Captions are tokenised by ``tokenize_caption`` (lower case,
punctuation removed, split on whitespace) instead of the Java PTB tokenizer. ``pycocoevalcap``'s ``Cider`` is the
CIDEr-D variant (Gaussian length penalty, clipped n-gram counts, sigma 6, x10); its document frequencies come from
the references of the scored set, so CIDEr of a single caption is not meaningful (it is 0 for one image).
All scores are in [0, 1] except CIDEr-D, in [0, 10].
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_NON_WORD = re.compile(r"[^\w\s]")


def tokenize_caption(text: str) -> str:
    """Lower case, punctuation removed, single spaces; the first non-empty line only."""
    for line in text.splitlines():
        words = _NON_WORD.sub(" ", line.lower()).split()
        if words:
            return " ".join(words)
    return ""


def caption_scores(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> dict[str, float]:
    """``bleu_1``..``bleu_4`` (corpus BLEU), ``rouge_l``, ``cider`` (CIDEr-D, corpus mean) and ``num_examples``.

    ``references[i]`` is one reference caption or a list of them. An empty prediction scores as the token
    ``<empty>`` (the scorers reject empty strings).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    n = len(predictions)
    if n == 0:
        return {"bleu_1": 0.0, "bleu_2": 0.0, "bleu_3": 0.0, "bleu_4": 0.0, "rouge_l": 0.0, "cider": 0.0,
                "num_examples": 0.0}
    res = {i: [tokenize_caption(p) or "<empty>"] for i, p in enumerate(predictions)}
    gts = {}
    for i, ref in enumerate(references):
        refs = [ref] if isinstance(ref, str) else list(ref)
        gts[i] = [tokenize_caption(r) or "<empty>" for r in refs]
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    out = {f"bleu_{k + 1}": float(bleu[k]) for k in range(4)}
    out.update(rouge_l=float(rouge), cider=float(cider), num_examples=float(n))
    return out
