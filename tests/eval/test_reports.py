"""Reports: the fork's Markdown table byte for byte, CSV/LaTeX/JSON content, confusion PNGs."""

import csv
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from dinov2.eval.protocols import ClassifierConfig, cross_validate
from dinov2.eval.reports import (
    latex_table,
    markdown_table,
    plot_confusion_matrix,
    write_classification_outputs,
    write_report,
)

# The DINOv2 cell fork's README table (seeds/001), verbatim.
FORK_TABLE = """\
|                | f1_score       | recall         | precision      | balanced_accuracy   |
|:---------------|:---------------|:---------------|:---------------|:--------------------|
| 1-NN           | 86.6 (+/- 0.7) | 86.7 (+/- 0.7) | 86.6 (+/- 0.7) | 85.2 (+/- 0.5)      |
| 20-NN          | 89.1 (+/- 0.7) | 89.2 (+/- 0.7) | 89.2 (+/- 0.6) | 88.1 (+/- 0.8)      |
| Linear Probing | 91.6 (+/- 0.2) | 91.6 (+/- 0.2) | 91.6 (+/- 0.2) | 90.4 (+/- 0.3)      |
"""


def _summary(values):
    keys = ("f1_weighted", "recall_weighted", "precision_weighted", "balanced_accuracy")
    return {
        row: {k: {"mean": m, "std": s} for k, (m, s) in zip(keys, cells)} for row, cells in values.items()
    }


def test_markdown_table_reproduces_fork_layout():
    summary = _summary(
        {
            "1-NN": [(0.866, 0.007), (0.867, 0.007), (0.866, 0.007), (0.852, 0.005)],
            "20-NN": [(0.891, 0.007), (0.892, 0.007), (0.892, 0.006), (0.881, 0.008)],
            "Linear Probing": [(0.916, 0.002), (0.916, 0.002), (0.916, 0.002), (0.904, 0.003)],
        }
    )
    assert markdown_table(summary) == FORK_TABLE


def test_single_split_cells_and_latex():
    summary = _summary({"1-NN": [(0.5, None), (0.25, None), (0.125, None), (0.75, None)]})
    summary["1-NN"]["balanced_accuracy"].update(low=0.7, high=0.8)
    md = markdown_table(summary)
    assert "| 50.0 " in md and "| 75.0 [70.0, 80.0] " in md
    two = _summary({"Linear Probing": [(0.916, 0.002)] * 4})
    tex = latex_table(two, caption="PBC 5-fold")
    assert "Linear Probing & 91.6 $\\pm$ 0.2 & 91.6 $\\pm$ 0.2" in tex
    assert "balanced\\_accuracy" in tex and "\\caption{PBC 5-fold}" in tex


def test_confusion_png_depends_on_input(tmp_path):
    names = ["a", "b", "c"]
    a = plot_confusion_matrix(np.array([[5, 0, 0], [0, 5, 0], [0, 0, 5]]), names, tmp_path / "a.png", dpi=50)
    b = plot_confusion_matrix(np.array([[0, 5, 0], [0, 0, 5], [5, 0, 0]]), names, tmp_path / "b.png", dpi=50)
    ia, ib = np.asarray(Image.open(a).convert("RGB")), np.asarray(Image.open(b).convert("RGB"))
    assert ia.shape == ib.shape and ia.shape[0] >= 200 and ia.shape[2] == 3
    assert (ia != ib).any()
    with pytest.raises(ValueError, match="class names"):
        plot_confusion_matrix(np.eye(3), ["a", "b"], tmp_path / "c.png")


def test_write_report_writes_every_output(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 90)
    x = (np.eye(3)[y] * 3 + rng.normal(size=(90, 3))).astype(np.float32)
    fs = SimpleNamespace(features=x, labels=y, class_names=["x", "y", "z"])
    res = cross_validate(
        fs, n_folds=3, classifiers=ClassifierConfig(ks=(1, 20), linear="none"), progress=False
    )
    paths = [f"/img/{i}.png" for i in range(90)]
    written = write_report(res, tmp_path / "run", paths=paths, extra={"backbone": "test"})
    out = tmp_path / "run"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["classifiers"] == ["1-NN", "20-NN"] and metrics["extra"] == {"backbone": "test"}
    assert metrics["summary"]["1-NN"]["accuracy"]["mean"] == pytest.approx(
        np.mean([s["accuracy"] for s in res.per_split["1-NN"]])
    )
    md = (out / "results.md").read_text()
    assert md.splitlines()[0].split("|")[2].strip() == "f1_score" and "| 20-NN " in md
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["classifier"] for r in rows] == ["1-NN", "20-NN"]
    assert float(rows[0]["balanced_accuracy_mean"]) == pytest.approx(
        metrics["summary"]["1-NN"]["balanced_accuracy"]["mean"]
    )
    assert (out / "results.tex").read_text().startswith("\\begin{table}")
    for row in ("1-NN", "20-NN"):
        for f in ("per_class.txt", "per_class.csv", "confusion_counts.png", "confusion_normalized.png"):
            assert (out / row / f).is_file(), (row, f)
    per_class = list(csv.DictReader((out / "1-NN" / "per_class.csv").open()))
    assert [r["class"] for r in per_class] == ["x", "y", "z"]
    assert sum(int(r["support"]) for r in per_class) == 90
    preds = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(preds) == 90
    first = preds[0]
    assert first["path"] == paths[int(first["index"])] and first["true"] == "xyz"[y[int(first["index"])]]
    assert all(p.exists() for p in written.values())
    # Written files follow the umask (not mkstemp's 0600), so teammates can read the results.
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "metrics.json").stat().st_mode & 0o777 == 0o666 & ~umask
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary left over


def test_write_classification_outputs_prefix(tmp_path):
    files = write_classification_outputs(
        [0, 1, 1, 2], [0, 1, 2, 2], ["a", "b", "c"], tmp_path, prefix="test_"
    )
    assert sorted(p.name for p in files.values()) == [
        "test_confusion_counts.png",
        "test_confusion_normalized.png",
        "test_per_class.csv",
        "test_per_class.txt",
    ]
    text = (tmp_path / "test_per_class.txt").read_text()
    assert text.splitlines()[2].split()[:3] == ["b", "1.0000", "0.5000"]
