"""Percentile bootstrap confidence intervals of classification metrics on a fixed test set.

The test samples are resampled with replacement ``n_boot`` times (seeded); each metric is
recomputed on every resample from its confusion matrix and the interval is the
``[(1 - c) / 2, (1 + c) / 2]`` percentile range of the resampled values (c = confidence).
Macro averages use the classes present in the full test set on every resample, so a resample
that happens to miss a rare class scores it 0 instead of silently averaging over fewer classes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dinov2.eval.metrics import METRIC_NAMES, confusion_matrix, metrics_from_confusion
from dinov2.eval.protocols.result import EvalResult


def bootstrap_ci(
    y_true,
    y_pred,
    *,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    num_classes: int | None = None,
    metrics: Sequence[str] = METRIC_NAMES,
    batch: int = 100,
) -> dict[str, dict[str, float]]:
    """Point estimate and percentile bootstrap interval of each metric.

    Args:
        y_true, y_pred: class indices [N].
        n_boot: number of resamples (>= 10).
        confidence: interval coverage in (0, 1), e.g. 0.95.
        seed: resampling seed.
        num_classes: default ``max(label) + 1``.
        metrics: subset of METRIC_NAMES.
        batch: resamples drawn at once (memory ~ batch * N integers).

    Returns:
        metric -> ``{"point", "low", "high", "confidence", "n_boot"}``.
    """
    cm_full = confusion_matrix(y_true, y_pred, num_classes)
    t = np.asarray(y_true).astype(np.int64)
    p = np.asarray(y_pred).astype(np.int64)
    if n_boot < 10:
        raise ValueError(f"n_boot must be >= 10 for a meaningful interval, got {n_boot}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    unknown = [m for m in metrics if m not in METRIC_NAMES]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; choose from {METRIC_NAMES}")
    c = cm_full.shape[0]
    labels = np.flatnonzero((cm_full.sum(0) > 0) | (cm_full.sum(1) > 0))
    point = metrics_from_confusion(cm_full, labels)
    n = len(t)
    codes = t * c + p
    rng = np.random.default_rng(seed)
    values = {m: np.empty(n_boot) for m in metrics}
    for start in range(0, n_boot, batch):
        b = min(batch, n_boot - start)
        idx = rng.integers(0, n, size=(b, n))
        # One bincount for the whole batch: resample r's codes are shifted by r * C * C.
        flat = np.bincount((codes[idx] + (np.arange(b) * c * c)[:, None]).ravel(), minlength=b * c * c)
        for r, cm in enumerate(flat.reshape(b, c, c)):
            m = metrics_from_confusion(cm, labels)
            for name in metrics:
                values[name][start + r] = m[name]
    lo_q, hi_q = 100 * (1 - confidence) / 2, 100 * (1 + confidence) / 2
    return {
        name: {
            "point": float(point[name]),
            "low": float(np.percentile(values[name], lo_q)),
            "high": float(np.percentile(values[name], hi_q)),
            "confidence": float(confidence),
            "n_boot": int(n_boot),
        }
        for name in metrics
    }


def add_bootstrap(
    result: EvalResult, *, n_boot: int = 1000, confidence: float = 0.95, seed: int = 0
) -> EvalResult:
    """Fill ``result.confidence_intervals`` from its pooled predictions (in place; returned)."""
    for name in result.classifiers:
        result.confidence_intervals[name] = bootstrap_ci(
            result.y_true,
            result.predictions[name],
            n_boot=n_boot,
            confidence=confidence,
            seed=seed,
            num_classes=len(result.class_names),
        )
    result.info["bootstrap"] = {
        "n_boot": n_boot,
        "confidence": confidence,
        "seed": seed,
        "method": "percentile",
    }
    return result
