"""Evaluation protocols on frozen features.

(a) :func:`cross_validate`: stratified k-fold CV, mean +/- std per classifier.
(b) :func:`train_val_test`: hyper-parameters on validation, refit on train + val, score on test.
(c) :func:`bootstrap_ci` / :func:`add_bootstrap`: percentile bootstrap intervals on a test set.
(d) :func:`cross_dataset_eval`: fit on one dataset, test on another through a class mapping.
"""

from dinov2.eval.folds import (
    check_min_class_count,
    fold_assignment,
    stratified_kfold_indices,
    stratified_split,
)
from dinov2.eval.protocols.bootstrap import add_bootstrap, bootstrap_ci
from dinov2.eval.protocols.classifiers import LINEAR_ROW, ClassifierConfig, fit_predict, labeled_arrays
from dinov2.eval.protocols.cross_dataset import cross_dataset_eval, load_class_mapping, relabel
from dinov2.eval.protocols.cv import cross_validate
from dinov2.eval.protocols.holdout import train_val_test
from dinov2.eval.protocols.result import STD_DDOF, EvalResult

__all__ = [
    "ClassifierConfig",
    "EvalResult",
    "LINEAR_ROW",
    "STD_DDOF",
    "add_bootstrap",
    "bootstrap_ci",
    "check_min_class_count",
    "cross_dataset_eval",
    "cross_validate",
    "fit_predict",
    "fold_assignment",
    "labeled_arrays",
    "load_class_mapping",
    "relabel",
    "stratified_kfold_indices",
    "stratified_split",
    "train_val_test",
]
