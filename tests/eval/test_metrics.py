"""Every metric equals scikit-learn's on the same predictions."""

import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from dinov2.eval.metrics import (
    METRIC_NAMES,
    classification_metrics,
    confusion_matrix,
    per_class_report,
)


def _sklearn_metrics(t, p):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns on absent classes; we compare values
        out = {
            "accuracy": skm.accuracy_score(t, p),
            "balanced_accuracy": skm.balanced_accuracy_score(t, p),
        }
        for avg in ("macro", "weighted"):
            out[f"f1_{avg}"] = skm.f1_score(t, p, average=avg, zero_division=0)
            out[f"recall_{avg}"] = skm.recall_score(t, p, average=avg, zero_division=0)
            out[f"precision_{avg}"] = skm.precision_score(t, p, average=avg, zero_division=0)
    return out


@pytest.mark.parametrize(
    "case",
    ["random", "never_predicted", "extra_predicted_class", "perfect", "imbalanced"],
)
def test_metrics_equal_sklearn(case):
    rng = np.random.default_rng(0)
    n, c = 300, 5
    t = rng.integers(0, c, n)
    p = np.where(rng.random(n) < 0.6, t, rng.integers(0, c, n))
    if case == "never_predicted":
        p[p == 3] = 0  # class 3 is never predicted: precision 0 by zero_division
    elif case == "extra_predicted_class":
        t[t == 4] = 0  # class 4 only appears in the predictions
    elif case == "perfect":
        p = t.copy()
    elif case == "imbalanced":
        t = np.where(rng.random(n) < 0.8, 0, t)
    ours = classification_metrics(t, p)
    ref = _sklearn_metrics(t, p)
    assert list(ours) == list(METRIC_NAMES)
    for k in METRIC_NAMES:
        assert ours[k] == pytest.approx(ref[k], abs=1e-12), k


def test_weighted_recall_is_accuracy():
    rng = np.random.default_rng(1)
    t, p = rng.integers(0, 4, 200), rng.integers(0, 4, 200)
    m = classification_metrics(t, p)
    assert m["recall_weighted"] == pytest.approx(m["accuracy"])


def test_confusion_matrix_and_per_class_report_match_sklearn():
    rng = np.random.default_rng(2)
    t, p = rng.integers(0, 4, 150), rng.integers(0, 4, 150)
    np.testing.assert_array_equal(confusion_matrix(t, p, 4), skm.confusion_matrix(t, p, labels=range(4)))
    rows = per_class_report(t, p, ["a", "b", "c", "d"])
    pr, rc, f1, sup = skm.precision_recall_fscore_support(t, p, labels=range(4), zero_division=0)
    for i, row in enumerate(rows):
        assert row["class"] == "abcd"[i]
        assert row["precision"] == pytest.approx(pr[i])
        assert row["recall"] == pytest.approx(rc[i])
        assert row["f1"] == pytest.approx(f1[i])
        assert row["support"] == sup[i]
        assert row["predicted"] == int((p == i).sum())


def test_bad_inputs_raise_clearly():
    with pytest.raises(ValueError, match="same length"):
        classification_metrics([0, 1], [0])
    with pytest.raises(ValueError, match="empty"):
        classification_metrics([], [])
    with pytest.raises(ValueError, match="unlabeled"):
        classification_metrics([0, -1], [0, 1])
    with pytest.raises(ValueError, match="num_classes"):
        confusion_matrix([0, 3], [0, 1], num_classes=2)
