"""Regenerate docs/img/data_*.png (the figures of docs/data.md): python docs/make_data_figures.py"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402

from fedvlm.data import partition  # noqa: E402
from fedvlm.data.builtin import build_dataset  # noqa: E402

IMG = Path(__file__).parent / "img"


def samples(root: Path) -> None:
    """Four records of each built-in task with their first question and answer."""
    fig, axes = plt.subplots(4, 4, figsize=(10, 11))
    for row, name in enumerate(("classification", "vqa", "captioning", "grounding")):
        records = json.loads((root / "multitask" / "test.json").read_text())
        records = [r for r in records if r["task"] == name][:4]
        for col, record in enumerate(records):
            ax = axes[row][col]
            image = Image.open(root / "multitask" / record["image"]).convert("RGB")
            ax.imshow(image, interpolation="nearest")
            question = record["conversations"][0]["value"].replace("<image>\n", "")
            answer = record["conversations"][1]["value"]
            if name == "grounding":
                x0, y0, x1, y1 = json.loads(answer)
                ax.add_patch(plt.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, color="red", lw=2))
            ax.set_title(f"[{name}]\nQ: {question}\nA: {answer}", fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(IMG / "data_samples.png", dpi=90)
    plt.close(fig)


def heatmaps(root: Path) -> None:
    train = root / "multitask" / "train.json"
    digits_only = [r for r in json.loads(train.read_text()) if r["task"] == "classification"]
    (root / "multitask" / "cls.json").write_text(json.dumps(digits_only))
    for name, method, alpha in (("iid", "iid", 0.5), ("dirichlet_0.1", "dirichlet", 0.1),
                                ("dirichlet_10", "dirichlet", 10.0), ("quantity_0.5", "quantity", 0.5)):
        out = root / f"part_{name}"
        partition.write_partition(root / "multitask" / "cls.json", out, method, 5, seed=0, alpha=alpha, key="label")
        report = json.loads((out / "partition.json").read_text())
        partition.plot_heatmap(report, IMG / f"data_partition_{name}.png")
    report = json.loads((root / "multitask" / "partition.json").read_text())
    partition.plot_heatmap(report, IMG / "data_partition_task.png")
    labels = [r["label"] for r in digits_only]
    sweep = partition.dirichlet_sweep(labels, 5, [0.05, 0.1, 0.3, 1, 3, 10, 100], seeds=range(5))
    iid_js = partition.heterogeneity(partition.label_histograms(labels, partition.iid(len(labels), 5, 0))[1])[1]
    partition.plot_sweep(sweep, IMG / "data_heterogeneity.png", iid_value=iid_js)
    print("sweep", [(a, round(v, 3)) for a, v in sweep], "iid", round(iid_js, 3))


def main() -> None:
    IMG.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_dataset("multitask", root / "multitask", sites=4, seed=0, train_size=480, test_size=120)
        samples(root)
        heatmaps(root)


if __name__ == "__main__":
    main()
