"""What a fine-tuning run writes besides its checkpoints: the epoch log, learning curves,
predictions CSVs and the test-set report."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dinov2.eval.metrics import classification_metrics
from dinov2.eval.reports import write_classification_outputs, write_json
from dinov2.transfer.loop import EpochOutput
from dinov2.transfer.predictions import Prediction, write_predictions_csv
from dinov2.utils.files import atomic_path, atomic_write


def plot_learning_curves(history: Sequence[dict[str, float]], path: str | os.PathLike) -> None:
    """Loss and accuracy (train and val, plus val balanced accuracy) against epoch, as one PNG.

    Drawn on a bare Agg `Figure` (no pyplot), so it never changes a notebook's backend or state.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    ax_loss, ax_acc = fig.subplots(1, 2)
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], "o-", label="val")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="Loss")
    ax_acc.plot(epochs, [h["train_accuracy"] for h in history], "o-", label="train accuracy")
    ax_acc.plot(epochs, [h["val_accuracy"] for h in history], "o-", label="val accuracy")
    ax_acc.plot(epochs, [h["val_balanced_accuracy"] for h in history], "s--", label="val balanced accuracy")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="Accuracy", ylim=(0, 1.02))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)


def write_json_lines(records: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
    """One JSON object per line (``log.jsonl``), replacing the file atomically."""
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in records))


def write_predictions(path: Path, paths: Sequence[str], out: EpochOutput, classes: Sequence[str]) -> None:
    """The predictions CSV (with ``true_class``) of one evaluated pass over ``paths``."""
    preds = [Prediction.from_probs(p, probs, classes) for p, probs in zip(paths, out.probs)]
    write_predictions_csv(path, preds, classes, true_classes=[classes[t] for t in out.targets])


def write_test_report(
    out_dir: Path, paths: Sequence[str], out: EpochOutput, classes: Sequence[str]
) -> dict[str, Any]:
    """Test-set outputs in ``out_dir``: ``metrics.json`` (`dinov2.eval.metrics.METRIC_NAMES`, loss,
    number of images), ``per_class.{txt,csv}``, ``confusion_{counts,normalized}.png`` (via
    `dinov2.eval.reports.write_classification_outputs`) and ``test_predictions.csv``.

    Returns the metrics dict.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, Any] = classification_metrics(out.targets, out.preds, len(classes))
    metrics.update(loss=out.loss, num_images=len(out.targets))
    write_classification_outputs(out.targets, out.preds, classes, out_dir, title="test set")
    write_predictions(out_dir / "test_predictions.csv", paths, out, classes)
    write_json(metrics, out_dir / "metrics.json")
    return metrics
