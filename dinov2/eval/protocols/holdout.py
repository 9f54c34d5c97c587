"""Protocol (b): train / validation / test.

Hyper-parameters (the linear probe's regularisation or lr/weight decay) are chosen on the
validation set, the chosen model is refitted on train + validation, and the test set is scored
once, optionally with percentile-bootstrap 95 % intervals (protocol (c)). The k-NN reference set
is train + validation. Without a validation set, a stratified fraction of the training set is
held out for the search. Class names of the three sets are matched by name.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dinov2.eval.folds import stratified_split
from dinov2.eval.protocols.bootstrap import add_bootstrap
from dinov2.eval.protocols.classifiers import ClassifierConfig, fit_predict, labeled_arrays
from dinov2.eval.protocols.cross_dataset import relabel
from dinov2.eval.protocols.result import EvalResult


def _to_train_space(y: np.ndarray, names: list[str], train_names: list[str], what: str):
    """Labels of a set re-indexed into the training classes (by name) and the kept sample indices.

    Classes of the set without samples are ignored; a class with samples unknown to the training
    set is an error (no classifier could ever predict it).
    """
    unknown = [n for i, n in enumerate(names) if n not in train_names and (y == i).any()]
    if unknown:
        raise ValueError(
            f"the {what} set has classes missing from the training set: {unknown} "
            f"(training classes: {train_names})"
        )
    new, keep = relabel(y, names, train_names, {n: n for n in names})
    idx = np.flatnonzero(keep)
    return new[idx], idx


def train_val_test(
    train,
    test,
    val=None,
    *,
    classifiers: ClassifierConfig | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    n_boot: int = 1000,
    confidence: float = 0.95,
) -> EvalResult:
    """Select on validation, refit on train + validation, score on test.

    Args:
        train, test, val: labeled feature sets (``features``, ``labels``, ``class_names``); ``val``
            None holds out ``val_fraction`` of ``train`` (stratified, seeded) for the search.
        classifiers: rows to evaluate (default 1-NN, 20-NN, Linear Probing).
        val_fraction: used only without ``val``.
        seed: seed of the held-out split and of the bootstrap.
        n_boot: bootstrap resamples for the test-set intervals (0: none).
        confidence: interval coverage.

    Returns:
        :class:`EvalResult` with one split (the test set) and, with n_boot, confidence intervals.
    """
    cfg = classifiers or ClassifierConfig()
    x_tr, y_tr, names = labeled_arrays(train)
    x_te_all, y_te_all, te_names = labeled_arrays(test)
    if val is None:
        kept, held = stratified_split(y_tr, val_fraction, seed=seed)
        x_va, y_va = x_tr[held], y_tr[held]
        x_tr, y_tr = x_tr[kept], y_tr[kept]
        val_desc: dict[str, Any] = {"source": "held out of train", "fraction": val_fraction}
    else:
        xv, yv, v_names = labeled_arrays(val)
        y_va, va_idx = _to_train_space(yv, v_names, names, "validation")
        x_va = xv[va_idx]
        val_desc = {"source": "given"}
    y_te, test_idx = _to_train_space(y_te_all, te_names, names, "test")
    x_te = x_te_all[test_idx]
    preds, params = fit_predict(x_tr, y_tr, x_te, cfg, num_classes=len(names), x_val=x_va, y_val=y_va)
    rows = cfg.names()
    result = EvalResult.single_split(
        "train_val_test",
        names,
        rows,
        y_te,
        preds,
        test_idx,
        params,
        info={
            "n_train": int(len(y_tr)),
            "n_val": int(len(y_va)),
            "n_test": int(len(y_te)),
            "validation": val_desc,
            "seed": seed,
        },
    )
    if n_boot:
        add_bootstrap(result, n_boot=n_boot, confidence=confidence, seed=seed)
    return result
