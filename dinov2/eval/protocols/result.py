"""The result of an evaluation protocol: per-split metrics, pooled predictions, summaries."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dinov2.eval.metrics import METRIC_NAMES, classification_metrics

#: Standard deviations over folds use numpy's default ``ddof=0`` (population std), the value
#: ``np.std(cross_val_scores)`` gives; metrics.json records it.
STD_DDOF = 0


@dataclass
class EvalResult:
    """Everything a report needs from one protocol run.

    Attributes:
        protocol: ``"cv"``, ``"train_val_test"`` or ``"cross_dataset"``.
        class_names: names of the label indices used in ``y_true`` / ``predictions``.
        classifiers: row names in report order (e.g. ``["1-NN", "20-NN", "Linear Probing"]``).
        per_split: classifier -> one metrics dict (keys METRIC_NAMES) per fold / test set.
        y_true: [M] true labels of every scored sample, folds concatenated.
        predictions: classifier -> [M] predicted labels aligned with ``y_true``.
        sample_index: [M] index of each scored sample in the evaluated (test) feature set.
        params: classifier -> chosen hyper-parameters per split.
        confidence_intervals: classifier -> metric -> ``{"low", "high", "confidence", "n_boot"}``.
        info: protocol settings, data description, timings (JSON-serialisable).
    """

    protocol: str
    class_names: list[str]
    classifiers: list[str]
    per_split: dict[str, list[dict[str, float]]]
    y_true: np.ndarray
    predictions: dict[str, np.ndarray]
    sample_index: np.ndarray
    params: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    confidence_intervals: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def single_split(
        cls,
        protocol: str,
        class_names: list[str],
        classifiers: list[str],
        y_true: np.ndarray,
        predictions: dict[str, np.ndarray],
        sample_index: np.ndarray,
        params: dict[str, dict[str, Any]],
        info: dict[str, Any],
    ) -> EvalResult:
        """The result of one (train, test) split: each of ``classifiers`` (row names, report order)
        scored once by its ``predictions`` against ``y_true`` over ``len(class_names)`` classes."""
        rows = list(classifiers)
        k = len(class_names)
        return cls(
            protocol=protocol,
            class_names=class_names,
            classifiers=rows,
            per_split={r: [classification_metrics(y_true, predictions[r], num_classes=k)] for r in rows},
            y_true=y_true,
            predictions=predictions,
            sample_index=sample_index,
            params={r: [params[r]] for r in rows},
            info=info,
        )

    def summary(self) -> dict[str, dict[str, dict[str, float | None]]]:
        """classifier -> metric -> ``{"mean", "std"}`` over splits (std None for a single split),
        plus ``"low"``/``"high"`` where a bootstrap interval exists."""
        out: dict[str, dict[str, dict[str, float | None]]] = {}
        for name in self.classifiers:
            splits = self.per_split[name]
            out[name] = {}
            for metric in METRIC_NAMES:
                values = np.array([s[metric] for s in splits], dtype=np.float64)
                entry: dict[str, float | None] = {
                    "mean": float(values.mean()),
                    "std": float(values.std(ddof=STD_DDOF)) if len(values) > 1 else None,
                }
                ci = self.confidence_intervals.get(name, {}).get(metric)
                if ci is not None:
                    entry["low"], entry["high"] = ci["low"], ci["high"]
                out[name][metric] = entry
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (the content of metrics.json, without per-sample arrays)."""
        return {
            "protocol": self.protocol,
            "class_names": list(self.class_names),
            "classifiers": list(self.classifiers),
            "std_ddof": STD_DDOF,
            "summary": self.summary(),
            "per_split": self.per_split,
            "params": self.params,
            "confidence_intervals": self.confidence_intervals,
            "n_scored": int(len(self.y_true)),
            "info": self.info,
        }
