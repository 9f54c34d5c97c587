"""A classifier's prediction for one file (`Prediction`) and the predictions CSV.

One CSV layout for every tool that writes predictions: `dinov2-infer --csv`, the validation and
test predictions of `dinov2-finetune`, and the web app's ``/api/predict.csv``. Columns: ``path``,
(``true_class``,) ``predicted_class``, ``probability`` (of the predicted class), ``prob_<class>``
for every class, and ``error`` (why a file could not be read; the prediction cells stay empty).
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TextIO

import numpy as np

from dinov2.utils.files import atomic_write


@dataclass
class Prediction:
    """The classifier's output for one file (``error`` set and the rest None when unreadable)."""

    path: str
    predicted_class: str | None
    probability: float | None
    """Probability of ``predicted_class``."""
    probabilities: dict[str, float] | None
    """Class name -> softmax probability, in the model's class order."""
    error: str | None = None

    @classmethod
    def from_probs(cls, path: str, probs: Sequence[float] | np.ndarray, classes: Sequence[str]) -> Prediction:
        """Prediction from one row of softmax probabilities (argmax; ties go to the first class)."""
        probs = np.asarray(probs, dtype=np.float64)
        best = int(probs.argmax())
        return cls(path, classes[best], float(probs[best]), {c: float(p) for c, p in zip(classes, probs)})

    def topk(self, k: int) -> list[tuple[str, float]]:
        """The ``k`` most probable (class, probability) pairs, most probable first."""
        if self.probabilities is None:
            return []
        return sorted(self.probabilities.items(), key=lambda kv: -kv[1])[:k]


def write_predictions_csv(
    path: str | os.PathLike,
    predictions: Sequence[Prediction],
    classes: Sequence[str],
    true_classes: Sequence[str] | None = None,
) -> None:
    """CSV with columns path, [true_class,] predicted_class, probability, prob_<class>..., error."""
    buf = io.StringIO()
    write_predictions_rows(buf, predictions, classes, true_classes)
    atomic_write(path, buf.getvalue())


def write_predictions_rows(
    f: TextIO,
    predictions: Sequence[Prediction],
    classes: Sequence[str],
    true_classes: Sequence[str] | None = None,
) -> None:
    """`write_predictions_csv`'s header and rows into an open text stream (opened with
    ``newline=""``, or a `io.StringIO`), so other tools (the web app) write the same CSV."""
    header = ["path"] + (["true_class"] if true_classes is not None else [])
    header += ["predicted_class", "probability"] + [f"prob_{c}" for c in classes] + ["error"]
    writer = csv.writer(f)
    writer.writerow(header)
    for k, p in enumerate(predictions):
        row: list[object] = [p.path] + ([true_classes[k]] if true_classes is not None else [])
        if p.probabilities is None:
            row += ["", ""] + [""] * len(classes) + [p.error or ""]
        else:
            row += [p.predicted_class, f"{p.probability:.6f}"]
            row += [f"{p.probabilities[c]:.6f}" for c in classes] + [""]
        writer.writerow(row)
