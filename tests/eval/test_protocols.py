"""Protocols: stratified folds, k-fold CV, train/val/test, bootstrap intervals, cross-dataset."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score
from sklearn.neighbors import KNeighborsClassifier

from dinov2.eval.linear import LogisticRegressionConfig
from dinov2.eval.protocols import (
    ClassifierConfig,
    bootstrap_ci,
    cross_dataset_eval,
    cross_validate,
    load_class_mapping,
    stratified_kfold_indices,
    stratified_split,
    train_val_test,
)


def _fs(n=240, d=12, c=4, seed=0, noise=1.2, names=None):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(c, d)) * 1.5
    y = rng.integers(0, c, n)
    x = (centers[y] + noise * rng.normal(size=(n, d))).astype(np.float32)
    return SimpleNamespace(features=x, labels=y, class_names=names or [f"c{i}" for i in range(c)])


FAST = ClassifierConfig(ks=(1, 5), logreg=LogisticRegressionConfig(Cs=(1.0,)))


# ------------------------------------------------------------------ folds
def test_folds_stratified_disjoint_covering_deterministic():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(5), [7, 23, 50, 11, 9])[rng.permutation(100)]
    folds = stratified_kfold_indices(y, n_folds=5, seed=3)
    tests = [te for _, te in folds]
    allidx = np.concatenate(tests)
    assert sorted(allidx.tolist()) == list(range(100))  # covering and disjoint
    for tr, te in folds:
        assert len(np.intersect1d(tr, te)) == 0 and len(tr) + len(te) == 100
    sizes = [len(t) for t in tests]
    assert max(sizes) - min(sizes) <= 1
    for c in range(5):  # each class spread as evenly as possible over folds
        per_fold = [int((y[t] == c).sum()) for t in tests]
        assert max(per_fold) - min(per_fold) <= 1
    again = stratified_kfold_indices(y, n_folds=5, seed=3)
    for (a, b), (c, d) in zip(folds, again):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, d)
    other = stratified_kfold_indices(y, n_folds=5, seed=4)
    assert any(not np.array_equal(a[1], b[1]) for a, b in zip(folds, other))


def test_folds_error_names_small_class():
    y = np.array([0] * 10 + [1] * 3)
    with pytest.raises(ValueError, match=r"rare \(3\)"):
        stratified_kfold_indices(y, n_folds=5, class_names=["common", "rare"])
    with pytest.raises(ValueError, match="n_folds"):
        stratified_kfold_indices(y, n_folds=1)


def test_stratified_split_fraction_per_class():
    y = np.repeat(np.arange(3), [10, 40, 50])
    kept, held = stratified_split(y, 0.2, seed=0)
    assert len(np.intersect1d(kept, held)) == 0 and len(kept) + len(held) == 100
    assert [int((y[held] == c).sum()) for c in range(3)] == [2, 8, 10]


# ------------------------------------------------------------------ CV
def test_cross_validate_matches_independent_per_fold_computation():
    fs = _fs()
    res = cross_validate(fs, n_folds=4, seed=1, classifiers=FAST, progress=False)
    assert res.classifiers == ["1-NN", "5-NN", "Linear Probing"]
    folds = stratified_kfold_indices(fs.labels, n_folds=4, seed=1)
    bal = []
    for i, (tr, te) in enumerate(folds):
        knn = KNeighborsClassifier(n_neighbors=1, metric="cosine", algorithm="brute")
        pred = knn.fit(fs.features[tr], fs.labels[tr]).predict(fs.features[te])
        bal.append(balanced_accuracy_score(fs.labels[te], pred))
        assert res.per_split["1-NN"][i]["f1_weighted"] == pytest.approx(
            f1_score(fs.labels[te], pred, average="weighted")
        )
    summ = res.summary()["1-NN"]["balanced_accuracy"]
    assert summ["mean"] == pytest.approx(np.mean(bal))
    assert summ["std"] == pytest.approx(np.std(bal))  # ddof=0, recorded in metrics.json
    # Out-of-fold predictions cover every sample exactly once.
    assert sorted(res.sample_index.tolist()) == list(range(len(fs.labels)))
    np.testing.assert_array_equal(res.y_true, fs.labels[res.sample_index])
    assert res.summary()["Linear Probing"]["accuracy"]["mean"] > 0.8
    json.dumps(res.to_dict())  # serialisable


def test_cross_validate_weighted_rows_and_errors():
    fs = _fs(n=120)
    cfg = ClassifierConfig(ks=(3,), knn_vote="both", linear="none")
    res = cross_validate(fs, n_folds=3, classifiers=cfg, progress=False)
    assert res.classifiers == ["3-NN", "3-NN (weighted)"]
    small = SimpleNamespace(
        features=fs.features[:12], labels=np.array([0] * 9 + [1] * 3), class_names=["a", "b"]
    )
    with pytest.raises(ValueError, match=r"b \(3\)"):
        cross_validate(small, n_folds=5, classifiers=FAST, progress=False)
    unl = SimpleNamespace(features=fs.features, labels=-np.ones(120, int), class_names=[])
    with pytest.raises(ValueError, match="unlabeled"):
        cross_validate(unl, classifiers=FAST, progress=False)


# ------------------------------------------------------------------ bootstrap
def test_bootstrap_contains_point_and_narrows_with_n():
    rng = np.random.default_rng(0)
    widths = []
    for n in (100, 1000, 10000):
        t = rng.integers(0, 4, n)
        p = np.where(rng.random(n) < 0.75, t, rng.integers(0, 4, n))
        ci = bootstrap_ci(t, p, n_boot=300, seed=0)
        for m, e in ci.items():
            assert e["low"] <= e["point"] <= e["high"], m
        assert ci["accuracy"]["point"] == pytest.approx((t == p).mean())
        widths.append(ci["accuracy"]["high"] - ci["accuracy"]["low"])
    assert widths[0] > widths[1] > widths[2]
    # Width of a 95% interval of a proportion ~ 2 * 1.96 * sqrt(p(1-p)/n).
    p_hat = 0.8125
    assert widths[1] == pytest.approx(2 * 1.96 * np.sqrt(p_hat * (1 - p_hat) / 1000), rel=0.25)
    a = bootstrap_ci(t[:500], p[:500], n_boot=50, seed=7)
    b = bootstrap_ci(t[:500], p[:500], n_boot=50, seed=7)
    assert a == b  # seeded
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci(t, p, confidence=95)


# ------------------------------------------------------------------ train / val / test
def test_train_val_test_selects_on_val_and_scores_test():
    fs = _fs(n=400, seed=2)
    idx = np.random.default_rng(0).permutation(400)
    part = lambda sl: SimpleNamespace(  # noqa: E731
        features=fs.features[idx[sl]], labels=fs.labels[idx[sl]], class_names=fs.class_names
    )
    train, val, test = part(slice(0, 200)), part(slice(200, 300)), part(slice(300, 400))
    cfg = ClassifierConfig(ks=(1,), logreg=LogisticRegressionConfig(Cs=(1e-4, 1.0)))
    res = train_val_test(train, test, val, classifiers=cfg, n_boot=200)
    assert res.info["n_test"] == 100 and res.info["n_val"] == 100
    assert res.params["Linear Probing"][0]["C"] == 1.0
    # k-NN reference set is train + val: compare to sklearn on the concatenation.
    ref = KNeighborsClassifier(n_neighbors=1, metric="cosine", algorithm="brute")
    ref.fit(np.concatenate([train.features, val.features]), np.concatenate([train.labels, val.labels]))
    np.testing.assert_array_equal(res.predictions["1-NN"], ref.predict(test.features))
    s = res.summary()["1-NN"]["accuracy"]
    assert s["std"] is None and s["low"] <= s["mean"] <= s["high"]


def test_train_val_test_matches_classes_by_name():
    fs = _fs(n=200, c=3, names=["a", "b", "c"])
    # Test set with its own class order and a class missing.
    keep = fs.labels != 1
    remap = np.array([1, -1, 0])  # a -> index 1, c -> index 0 in ["c", "a"]
    test = SimpleNamespace(features=fs.features[keep], labels=remap[fs.labels[keep]], class_names=["c", "a"])
    res = train_val_test(fs, test, classifiers=ClassifierConfig(ks=(1,), linear="none"), n_boot=0)
    assert res.class_names == ["a", "b", "c"]
    np.testing.assert_array_equal(res.y_true, fs.labels[keep])
    bad = SimpleNamespace(features=fs.features[:5], labels=np.zeros(5, int), class_names=["zzz"])
    with pytest.raises(ValueError, match="zzz"):
        train_val_test(fs, bad, classifiers=ClassifierConfig(ks=(1,), linear="none"), n_boot=0)


# ------------------------------------------------------------------ cross-dataset
def test_cross_dataset_with_mapping(tmp_path):
    src = _fs(n=300, c=4, names=["neutrophil", "ig", "lymphocyte", "platelet"], seed=5)
    rng = np.random.default_rng(1)
    # Target: same feature distribution, 2 classes ("NEU" <- neutrophil + ig, "LYM" <- lymphocyte)
    # and one class ("other") that nothing maps to.
    sel = rng.permutation(300)[:150]
    lut = np.array([0, 0, 1, 2])
    tgt = SimpleNamespace(
        features=src.features[sel], labels=lut[src.labels[sel]], class_names=["NEU", "LYM", "other"]
    )
    mfile = tmp_path / "map.csv"
    mfile.write_text("# source,target\nneutrophil,NEU\nig -> NEU\nlymphocyte\tLYM\n")
    mapping = load_class_mapping(mfile)
    assert mapping == {"neutrophil": "NEU", "ig": "NEU", "lymphocyte": "LYM"}
    res = cross_dataset_eval(src, tgt, mapping=mapping, classifiers=ClassifierConfig(ks=(1,), linear="none"))
    assert res.class_names == ["NEU", "LYM"]
    assert res.info["source_classes_dropped"] == ["platelet"]
    assert res.info["target_classes_dropped"] == ["other"]
    scored = tgt.labels != 2
    assert res.info["n_test"] == int(scored.sum())
    # Target samples are copies of source samples: 1-NN finds themselves, recall is 1 per class.
    assert res.info["per_class_recall"]["1-NN"] == {"NEU": 1.0, "LYM": 1.0}
    jfile = tmp_path / "map.json"
    jfile.write_text(json.dumps(mapping))
    assert load_class_mapping(jfile) == mapping
    with pytest.raises(ValueError, match="did you mean 'neutrophil'"):
        cross_dataset_eval(src, tgt, mapping={"neutrofil": "NEU"}, classifiers=FAST)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_class_mapping(tmp_path / "nope.json")
