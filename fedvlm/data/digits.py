"""The built-in offline dataset: scikit-learn's handwritten digits as a LLaVA-style VQA task.

``load_digits()`` ships 1,797 real 8x8 grey images of the digits 0-9 inside scikit-learn, so it works without
network. Each image is upscaled (nearest neighbour) to the preset's image size, saved as RGB PNG and asked
"What digit is shown?" with the digit as the answer.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

QUESTION = "What digit is shown?"


@dataclass(frozen=True)
class DigitsLayout:
    """Where ``build_digits`` put things and how many examples each part holds."""

    root: Path
    site_dirs: tuple[Path, ...]  # each holds train.json, test.json and images/
    test_json: Path  # the global held-out set (union of the sites' test slices)
    train_sizes: tuple[int, ...]
    test_sizes: tuple[int, ...]
    image_size: int


def build_digits(
    out: Path, sites: int = 3, seed: int = 0, test_fraction: float = 0.22, image_size: int = 32
) -> DigitsLayout:
    """Write the digits dataset for ``sites`` sites under ``out`` and return its layout.

    Layout: ``out/site_<i>/{train.json,test.json,images/*.png}`` for i in 0..sites-1 and ``out/{test.json,images/}``.
    Guarantees: deterministic in ``seed``; IID split (one seeded shuffle, then round-robin slices, so site sizes
    differ by at most one); the held-out set is disjoint from every train set, each site's test slice is disjoint
    from the others' and their union is exactly ``out/test.json``.
    """
    from sklearn.datasets import load_digits

    if sites < 1:
        raise ValueError(f"sites must be >= 1, got {sites}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    out = Path(out)
    digits = load_digits()
    images, labels = digits.images, digits.target
    order = np.random.default_rng(seed).permutation(len(labels))
    n_test = round(len(labels) * test_fraction)
    test_idx, train_idx = order[:n_test], order[n_test:]

    site_dirs = []
    train_sizes, test_sizes = [], []
    for site in range(sites):
        site_dir = out / f"site_{site}"
        site_train, site_test = train_idx[site::sites], test_idx[site::sites]
        _write_split(site_dir, "train.json", site_train, images, labels, image_size)
        _write_split(site_dir, "test.json", site_test, images, labels, image_size)
        site_dirs.append(site_dir)
        train_sizes.append(len(site_train))
        test_sizes.append(len(site_test))
    global_test = _write_split(out, "test.json", test_idx, images, labels, image_size)
    logger.info("digits: %d sites, train %s, test %s, under %s", sites, train_sizes, test_sizes, out)
    return DigitsLayout(
        root=out,
        site_dirs=tuple(site_dirs),
        test_json=global_test,
        train_sizes=tuple(train_sizes),
        test_sizes=tuple(test_sizes),
        image_size=image_size,
    )


def digit_image(pixels: np.ndarray, image_size: int):
    """An 8x8 array in [0, 16] as an RGB ``PIL.Image`` of ``image_size`` px (white digit on black)."""
    from PIL import Image

    grey = np.clip(pixels * (255.0 / 16.0), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L").resize((image_size, image_size), Image.Resampling.NEAREST).convert("RGB")


def _write_split(folder: Path, name: str, indices: np.ndarray, images, labels, image_size: int) -> Path:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for index in indices:
        index = int(index)
        relative = f"images/digit_{index:04d}.png"
        digit_image(images[index], image_size).save(folder / relative)
        records.append({
            "id": f"digits-{index:04d}",
            "image": relative,
            "conversations": [
                {"from": "human", "value": f"<image>\n{QUESTION}"},
                {"from": "gpt", "value": str(int(labels[index]))},
            ],
        })
    path = folder / name
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)  # readers never see a half-written file
    return path
