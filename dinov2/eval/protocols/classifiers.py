"""The classifiers every protocol runs on one (train, test) split: k-NN rows and a linear probe."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dinov2.eval.knn import knn_predict
from dinov2.eval.linear import LogisticRegressionConfig, TorchLinearConfig, fit_linear_probe

KNN_VOTES = ("majority", "weighted", "both")
LINEAR_KINDS = ("sklearn", "torch", "none")
LINEAR_ROW = "Linear Probing"


@dataclass(frozen=True)
class ClassifierConfig:
    """Which classifiers to run and how."""

    ks: tuple[int, ...] = (1, 20)
    """k of each k-NN row."""
    knn_vote: str = "majority"
    """``"majority"`` (rows ``k-NN``), ``"weighted"`` (rows ``k-NN (weighted)``) or ``"both"``."""
    temperature: float = 0.07
    """Temperature of the weighted vote."""
    linear: str = "sklearn"
    """Linear probe: ``"sklearn"`` logistic regression, ``"torch"`` linear head, or ``"none"``."""
    logreg: LogisticRegressionConfig = field(default_factory=LogisticRegressionConfig)
    """Options of the scikit-learn probe."""
    torch_linear: TorchLinearConfig = field(default_factory=TorchLinearConfig)
    """Options of the torch probe."""
    chunk_size: int = 1024
    """Queries per k-NN similarity block."""
    device: str | None = None
    """k-NN device (default CUDA when available)."""

    def __post_init__(self):
        if self.knn_vote not in KNN_VOTES:
            raise ValueError(f"knn_vote must be one of {KNN_VOTES}, got {self.knn_vote!r}")
        if self.linear not in LINEAR_KINDS:
            raise ValueError(f"linear must be one of {LINEAR_KINDS}, got {self.linear!r}")
        if any(int(k) < 1 for k in self.ks):
            raise ValueError(f"every k must be >= 1, got {self.ks}")
        if not self.ks and self.linear == "none":
            raise ValueError("nothing to evaluate: no k-NN k and no linear probe")

    def votes(self) -> list[str]:
        return ["majority", "weighted"] if self.knn_vote == "both" else [self.knn_vote]

    def names(self) -> list[str]:
        """Row names in report order."""
        rows = []
        for v in self.votes():
            suffix = "" if v == "majority" else " (weighted)"
            rows += [f"{int(k)}-NN{suffix}" for k in self.ks]
        if self.linear != "none":
            rows.append(LINEAR_ROW)
        return rows


def labeled_arrays(feature_set) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``(features float32 [N, D], labels int64 [N], class_names)`` of a labeled feature set."""
    x = np.asarray(feature_set.features, dtype=np.float32)
    y = np.asarray(feature_set.labels).astype(np.int64)
    names = list(feature_set.class_names)
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(f"features must be [N, D] with N labels, got {x.shape} and {y.shape}")
    if len(y) and y.min() < 0:
        raise ValueError(
            "the feature set is unlabeled (labels -1); this protocol needs a class-folder dataset"
        )
    return x, y, names


def fit_predict(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    config: ClassifierConfig,
    *,
    num_classes: int,
    x_val: np.ndarray | None = None,
    y_val: np.ndarray | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, dict[str, Any]]]:
    """Predictions of every classifier of ``config`` on ``x_test``.

    With a validation set, the linear probe picks its hyper-parameters on it and is refitted on
    train + validation, and the k-NN reference set is train + validation.

    Returns:
        (row name -> predictions [N_test], row name -> chosen hyper-parameters)
    """
    preds: dict[str, np.ndarray] = {}
    params: dict[str, dict[str, Any]] = {}
    if x_val is not None:
        x_ref, y_ref = np.concatenate([x_train, x_val]), np.concatenate([y_train, y_val])
    else:
        x_ref, y_ref = x_train, y_train
    for v in config.votes():
        if not config.ks:
            break
        out = knn_predict(
            x_ref,
            y_ref,
            x_test,
            ks=config.ks,
            vote_method=v,
            temperature=config.temperature,
            num_classes=num_classes,
            chunk_size=config.chunk_size,
            device=config.device,
        )
        suffix = "" if v == "majority" else " (weighted)"
        for k in config.ks:
            name = f"{int(k)}-NN{suffix}"
            preds[name] = out[int(k)]
            params[name] = {"k": int(k), "vote": v} | ({"temperature": config.temperature} if suffix else {})
    if config.linear != "none":
        probe = fit_linear_probe(
            x_train,
            y_train,
            kind=config.linear,
            x_val=x_val,
            y_val=y_val,
            sklearn_config=config.logreg,
            torch_config=config.torch_linear,
            num_classes=num_classes,
        )
        preds[LINEAR_ROW] = probe.predict(x_test)
        params[LINEAR_ROW] = {"kind": config.linear, **probe.params, "search": probe.search}
    return preds, params
