"""Online k-NN monitor pieces against hand computations (dinov2/train/online_knn.py)."""

import numpy as np
import pytest
import torch

from dinov2.train.online_knn import balanced_accuracy, knn_predict, stratified_split


def test_stratified_split_keeps_class_shares_and_halves():
    targets = np.array([0] * 40 + [1] * 20 + [2] * 4)
    bank, query = stratified_split(targets, max_images=32, seed=0)
    assert not set(bank) & set(query)
    chosen = np.concatenate([bank, query])
    counts = np.bincount(targets[chosen], minlength=3)
    assert counts.tolist() == [20, 10, 2]  # half of every class (32 / 64), at least 2 per class
    assert np.bincount(targets[bank], minlength=3).tolist() == [10, 5, 1]
    again = stratified_split(targets, max_images=32, seed=0)
    assert np.array_equal(again[0], bank) and np.array_equal(again[1], query)


def test_knn_predict_weighted_vote_by_hand():
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    query = torch.tensor([[0.6, 0.8]])  # cosine: 0.6, 0.6 * 0.9939 + 0.8 * 0.1104 = 0.685, 0.8
    # k=3, T=0.1: class 0 gets exp(6.0) + exp(6.85) = 1347; class 1 gets exp(8.0) = 2981 -> class 1
    assert knn_predict(query, bank, labels, 2, k=3, temperature=0.1).tolist() == [1]
    # T=1: class 0 gets e^0.6 + e^0.685 = 3.81 > e^0.8 = 2.23 -> class 0
    assert knn_predict(query, bank, labels, 2, k=3, temperature=1.0).tolist() == [0]
    # k=1: nearest is the class-1 point
    assert knn_predict(query, bank, labels, 2, k=1, temperature=1.0).tolist() == [1]


def test_balanced_accuracy_by_hand():
    y_true = np.array([0, 0, 0, 0, 1])
    y_pred = np.array([0, 0, 0, 0, 0])
    assert balanced_accuracy(y_true, y_pred) == pytest.approx(0.5)  # recalls 1.0 and 0.0


def test_knn_predict_equals_sklearn_weighted_cosine_and_the_eval_suite():
    from sklearn.neighbors import KNeighborsClassifier

    from dinov2.eval.knn import knn_predict as eval_knn_predict

    rng = np.random.default_rng(5)
    bank, query = rng.normal(size=(150, 12)), rng.normal(size=(61, 12))
    labels = rng.integers(0, 4, 150)
    k, temperature = 20, 0.07
    q, b, y = torch.from_numpy(query), torch.from_numpy(bank), torch.from_numpy(labels)
    ours = knn_predict(q, b, y, 4, k, temperature)
    sk = KNeighborsClassifier(
        n_neighbors=k, metric="cosine", algorithm="brute", weights=lambda d: np.exp((1.0 - d) / temperature)
    ).fit(bank, labels)
    np.testing.assert_array_equal(ours.numpy(), sk.predict(query))
    # The monitor and dinov2.eval share one primitive, so their weighted votes agree exactly.
    evaluated = eval_knn_predict(bank, labels, query, ks=(k,), vote_method="weighted", device="cpu")
    np.testing.assert_array_equal(ours.numpy(), evaluated[k])


def test_knn_predict_caps_k_at_the_bank_size():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.1]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.05], [0.1, 1.0]])
    # k=50 over 3 bank images is k=3; T=10 makes the weights nearly equal, so the 2-image class wins.
    assert knn_predict(query, bank, labels, 2, k=50, temperature=10.0).tolist() == [1, 1]
    assert knn_predict(query, bank, labels, 2, k=1, temperature=10.0).tolist() == [0, 1]
