"""Classification metrics computed from a confusion matrix.

Everything here is plain numpy on integer label arrays, so the kNN, linear-probe, fine-tune and
inference tools all score predictions the same way. The definitions follow scikit-learn's:

- ``accuracy``: fraction of correct predictions.
- ``balanced_accuracy``: mean per-class recall over the classes present in ``y_true``.
- ``{precision,recall,f1}_{macro,weighted}``: per-class scores averaged uniformly (macro) or
  weighted by the number of true samples of each class (weighted). Classes that occur in neither
  ``y_true`` nor ``y_pred`` are left out of the macro average unless ``labels`` lists them; a
  class that is never predicted has precision 0 (scikit-learn's ``zero_division=0``).

Weighted recall always equals accuracy; the DINOv2 cell fork's table reports weighted
f1/recall/precision (its recall column equals accuracy and differs from balanced accuracy).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: Keys of the dictionary returned by :func:`classification_metrics`, in report order.
METRIC_NAMES = (
    "accuracy",
    "balanced_accuracy",
    "f1_macro",
    "f1_weighted",
    "recall_macro",
    "recall_weighted",
    "precision_macro",
    "precision_weighted",
)


def _as_label_array(y, name: str) -> np.ndarray:
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of class indices, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.equal(np.mod(arr, 1), 0)):
            raise ValueError(f"{name} must hold integer class indices, got dtype {arr.dtype}")
        arr = arr.astype(np.int64)
    return arr.astype(np.int64, copy=False)


def _check_pair(y_true, y_pred) -> tuple[np.ndarray, np.ndarray]:
    t = _as_label_array(y_true, "y_true")
    p = _as_label_array(y_pred, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred must have the same length, got {t.shape[0]} and {p.shape[0]}")
    if t.size == 0:
        raise ValueError("cannot score an empty set of predictions")
    if t.min() < 0 or p.min() < 0:
        raise ValueError("class indices must be >= 0 (unlabeled samples, target -1, cannot be scored)")
    return t, p


def confusion_matrix(y_true, y_pred, num_classes: int | None = None) -> np.ndarray:
    """Counts ``C[i, j]`` of samples of true class ``i`` predicted as class ``j``.

    Args:
        y_true, y_pred: integer class indices, shape [N].
        num_classes: size of the square matrix; default ``max(label) + 1``.

    Returns:
        int64 array [num_classes, num_classes].
    """
    t, p = _check_pair(y_true, y_pred)
    n = int(max(t.max(), p.max())) + 1
    if num_classes is None:
        num_classes = n
    elif n > num_classes:
        raise ValueError(f"labels go up to {n - 1} but num_classes={num_classes}")
    flat = np.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes).astype(np.int64)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.zeros_like(num, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def per_class_scores(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class precision, recall, F1 and support from a confusion matrix [C, C].

    Undefined values (no predictions or no true samples of a class) are 0.
    """
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    precision = _safe_div(tp, predicted)
    recall = _safe_div(tp, support)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support.astype(np.int64)}


def metrics_from_confusion(cm: np.ndarray, labels: Sequence[int] | None = None) -> dict[str, float]:
    """All :data:`METRIC_NAMES` from a confusion matrix.

    Args:
        cm: counts [C, C] (rows true, columns predicted).
        labels: classes to average over for the macro scores; default the classes that occur in
            the true or the predicted labels (scikit-learn's default).
    """
    cm = np.asarray(cm, dtype=np.float64)
    total = cm.sum()
    if total <= 0:
        raise ValueError("confusion matrix is empty")
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    scores = per_class_scores(cm)
    if labels is None:
        sel = np.flatnonzero((support > 0) | (predicted > 0))
    else:
        sel = np.asarray(list(labels), dtype=np.int64)
    present = support > 0
    weights = support / total
    out = {
        "accuracy": float(np.trace(cm) / total),
        "balanced_accuracy": float(scores["recall"][present].mean()),
    }
    for name in ("f1", "recall", "precision"):
        out[f"{name}_macro"] = float(scores[name][sel].mean())
        out[f"{name}_weighted"] = float((scores[name] * weights).sum())
    return {k: out[k] for k in METRIC_NAMES}


def classification_metrics(
    y_true, y_pred, num_classes: int | None = None, labels: Sequence[int] | None = None
) -> dict[str, float]:
    """Accuracy, balanced accuracy and macro/weighted F1, recall and precision (see module doc).

    Args:
        y_true, y_pred: integer class indices, shape [N].
        num_classes: number of classes (only sizes the internal confusion matrix).
        labels: classes to average over for the macro scores (default: those present).

    Returns:
        dict with the keys :data:`METRIC_NAMES`, values in [0, 1].
    """
    cm = confusion_matrix(y_true, y_pred, num_classes)
    return metrics_from_confusion(cm, labels)


def per_class_report(
    y_true, y_pred, class_names: Sequence[str], num_classes: int | None = None
) -> list[dict[str, float | int | str]]:
    """One row per class: ``class``, ``precision``, ``recall``, ``f1``, ``support``, ``predicted``."""
    num_classes = len(class_names) if num_classes is None else num_classes
    cm = confusion_matrix(y_true, y_pred, num_classes)
    scores = per_class_scores(cm)
    predicted = cm.sum(axis=0)
    return [
        {
            "class": str(class_names[i]),
            "precision": float(scores["precision"][i]),
            "recall": float(scores["recall"][i]),
            "f1": float(scores["f1"][i]),
            "support": int(scores["support"][i]),
            "predicted": int(predicted[i]),
        }
        for i in range(num_classes)
    ]
