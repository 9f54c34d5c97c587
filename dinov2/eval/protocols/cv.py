"""Protocol (a): stratified k-fold cross-validation of k-NN and linear probes on frozen features.

Each fold's classifiers are fitted on the other folds and score the held-out fold; the report
gives mean (+/- std over folds) of every metric, like the DINOv2 cell fork's table. The linear
probe's regularisation is chosen inside each training part (inner CV or a validation split), so
the held-out fold never influences it.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from dinov2.eval.folds import stratified_kfold_indices
from dinov2.eval.metrics import classification_metrics
from dinov2.eval.protocols.classifiers import ClassifierConfig, fit_predict, labeled_arrays
from dinov2.eval.protocols.result import EvalResult


def cross_validate(
    feature_set,
    *,
    n_folds: int = 5,
    seed: int = 0,
    classifiers: ClassifierConfig | None = None,
    progress: bool = True,
) -> EvalResult:
    """Stratified ``n_folds``-fold CV of every classifier in ``classifiers``.

    Args:
        feature_set: object with ``features [N, D]``, ``labels [N]`` and ``class_names``
            (a :class:`dinov2.eval.features.FeatureSet`).
        n_folds: number of folds (>= 2); every class needs at least that many samples.
        seed: seed of the fold assignment (the linear probe's inner CV uses its own config seed).
        classifiers: rows to evaluate (default 1-NN, 20-NN, Linear Probing).
        progress: show a tqdm bar over folds.

    Returns:
        :class:`EvalResult` with one metrics dict per fold and the out-of-fold predictions.
    """
    cfg = classifiers or ClassifierConfig()
    x, y, names = labeled_arrays(feature_set)
    folds = stratified_kfold_indices(y, n_folds=n_folds, seed=seed, class_names=names)
    min_train = min(len(tr) for tr, _ in folds)
    if cfg.ks and max(cfg.ks) > min_train:
        raise ValueError(f"k={max(cfg.ks)} exceeds the smallest training part ({min_train} samples)")
    rows = cfg.names()
    per_split: dict[str, list[dict[str, float]]] = {r: [] for r in rows}
    params: dict[str, list[dict[str, Any]]] = {r: [] for r in rows}
    preds: dict[str, list[np.ndarray]] = {r: [] for r in rows}
    truth, index = [], []
    start = time.perf_counter()
    for tr, te in tqdm(folds, desc=f"{n_folds}-fold CV", disable=not progress):
        fold_preds, fold_params = fit_predict(x[tr], y[tr], x[te], cfg, num_classes=len(names))
        for r in rows:
            per_split[r].append(classification_metrics(y[te], fold_preds[r], num_classes=len(names)))
            params[r].append(fold_params[r])
            preds[r].append(fold_preds[r])
        truth.append(y[te])
        index.append(te)
    return EvalResult(
        protocol="cv",
        class_names=names,
        classifiers=rows,
        per_split=per_split,
        y_true=np.concatenate(truth),
        predictions={r: np.concatenate(p) for r, p in preds.items()},
        sample_index=np.concatenate(index),
        params=params,
        info={
            "n_folds": n_folds,
            "seed": seed,
            "n_samples": int(len(y)),
            "feature_dim": int(x.shape[1]),
            "class_counts": {n: int((y == i).sum()) for i, n in enumerate(names)},
            "fold_sizes": [int(len(te)) for _, te in folds],
            "classifier_config": asdict(cfg),
            "seconds": round(time.perf_counter() - start, 3),
        },
    )
