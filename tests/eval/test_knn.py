"""k-NN on cosine similarity: against scikit-learn, a dense reference and hand computations."""

import math

import numpy as np
import pytest
import torch
from sklearn.neighbors import KNeighborsClassifier

from dinov2.eval.knn import knn_predict, topk_neighbours, vote


def _blobs(n_train=400, n_test=150, d=16, c=5, seed=0, noise=1.5):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(c, d))
    ytr, yte = rng.integers(0, c, n_train), rng.integers(0, c, n_test)
    xtr = centers[ytr] + noise * rng.normal(size=(n_train, d))
    xte = centers[yte] + noise * rng.normal(size=(n_test, d))
    return xtr.astype(np.float32), ytr, xte.astype(np.float32), yte


def test_1nn_equals_sklearn_cosine():
    xtr, ytr, xte, _ = _blobs()
    ours = knn_predict(xtr, ytr, xte, ks=(1,), chunk_size=32, device="cpu")[1]
    ref = KNeighborsClassifier(n_neighbors=1, metric="cosine", algorithm="brute").fit(xtr, ytr).predict(xte)
    np.testing.assert_array_equal(ours, ref)


def test_20nn_majority_equals_sklearn_where_no_tie():
    xtr, ytr, xte, _ = _blobs(noise=2.5)
    ours = knn_predict(xtr, ytr, xte, ks=(1, 20), chunk_size=64, device="cpu")[20]
    sk = KNeighborsClassifier(n_neighbors=20, metric="cosine", algorithm="brute").fit(xtr, ytr)
    ref = sk.predict(xte)
    nb = sk.kneighbors(xte, return_distance=False)
    counts = np.stack([np.bincount(ytr[row], minlength=5) for row in nb])
    top2 = np.sort(counts, axis=1)[:, -2:]
    no_tie = top2[:, 1] > top2[:, 0]
    assert no_tie.sum() > 100  # the comparison covers most queries
    np.testing.assert_array_equal(ours[no_tie], ref[no_tie])
    # Where sklearn's neighbours tie, our winner is still one of the tied classes.
    for i in np.flatnonzero(~no_tie):
        assert counts[i, ours[i]] == counts[i].max()


def test_majority_tie_goes_to_class_of_nearest_tied_neighbour():
    # Ranked neighbour labels: class 2 and class 0 both get 2 votes; class 2 appears first (rank 0).
    labels = torch.tensor([[2, 0, 0, 2, 1]])
    sims = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5]])
    assert vote(labels, sims, 3, method="majority").argmax(1).item() == 2
    labels = torch.tensor([[1, 0, 2, 0, 2]])  # 0 and 2 tie at 2 votes; 0 is nearer (rank 1 vs 2)
    assert vote(labels, sims, 3, method="majority").argmax(1).item() == 0
    labels = torch.tensor([[1, 0, 0, 2, 2]])
    scores = vote(labels, sims, 3, method="majority")
    assert scores[0].floor().tolist() == [2.0, 1.0, 2.0]  # the bonus never changes the vote counts
    assert scores.argmax(1).item() == 0
    labels = torch.tensor([[1, 2, 0, 0, 0]])  # a clear majority beats nearer neighbours
    assert vote(labels, sims, 3, method="majority").argmax(1).item() == 0


def test_weighted_vote_matches_hand_computation():
    rng = np.random.default_rng(3)
    xtr = rng.normal(size=(30, 8)).astype(np.float32)
    ytr = rng.integers(0, 3, 30)
    xq = rng.normal(size=(4, 8)).astype(np.float32)
    k, temp = 7, 0.07
    preds, scores = knn_predict(
        xtr, ytr, xq, ks=(k,), vote_method="weighted", temperature=temp, return_scores=True, device="cpu"
    )
    for qi in range(4):
        q = xq[qi] / np.linalg.norm(xq[qi])
        sims = [float(q @ (x / np.linalg.norm(x))) for x in xtr]
        order = sorted(range(30), key=lambda j: -sims[j])[:k]
        hand = [0.0, 0.0, 0.0]
        for j in order:
            hand[ytr[j]] += math.exp(sims[j] / temp)
        np.testing.assert_allclose(scores[k][qi], hand, rtol=1e-4)
        assert preds[k][qi] == int(np.argmax(hand))


def test_chunked_equals_dense():
    xtr, ytr, xte, _ = _blobs(n_train=300, n_test=97, d=12)
    a = xte / np.linalg.norm(xte, axis=1, keepdims=True)
    b = xtr / np.linalg.norm(xtr, axis=1, keepdims=True)
    dense = a @ b.T  # the full matrix the chunked version never builds
    ref_idx = np.argsort(-dense, axis=1, kind="stable")[:, :10]
    for chunk in (1, 13, 97, 1000):
        sims, idx = topk_neighbours(xtr, xte, 10, chunk_size=chunk, device="cpu")
        np.testing.assert_array_equal(idx.numpy(), ref_idx)
        np.testing.assert_allclose(sims.numpy(), np.take_along_axis(dense, ref_idx, 1), rtol=1e-5, atol=1e-6)
    p_small = knn_predict(xtr, ytr, xte, ks=(1, 5, 20), chunk_size=7, vote_method="weighted")
    p_big = knn_predict(xtr, ytr, xte, ks=(1, 5, 20), chunk_size=10_000, vote_method="weighted")
    for k in (1, 5, 20):
        np.testing.assert_array_equal(p_small[k], p_big[k])


def test_exclude_self_is_leave_one_out():
    xtr, ytr, _, _ = _blobs(n_train=60, d=6)
    _, idx = topk_neighbours(xtr, xtr, 3, chunk_size=16, exclude_self=True, device="cpu")
    assert not (idx.numpy() == np.arange(60)[:, None]).any()
    _, idx_all = topk_neighbours(xtr, xtr, 1, device="cpu")
    np.testing.assert_array_equal(idx_all[:, 0].numpy(), np.arange(60))  # without it, itself is nearest


def test_scale_invariance_cosine():
    xtr, ytr, xte, _ = _blobs(n_train=100, n_test=20)
    scales = np.random.default_rng(0).uniform(0.1, 10, size=(100, 1)).astype(np.float32)
    a = knn_predict(xtr, ytr, xte, ks=(1, 5))
    b = knn_predict(xtr * scales, ytr, xte * 3.0, ks=(1, 5))
    for k in (1, 5):
        np.testing.assert_array_equal(a[k], b[k])


def test_errors():
    x = np.zeros((5, 3), np.float32)
    with pytest.raises(ValueError, match="exceeds"):
        knn_predict(x, [0, 1, 0, 1, 0], x, ks=(6,))
    with pytest.raises(ValueError, match="unlabeled"):
        knn_predict(x, [0, -1, 0, 1, 0], x, ks=(1,))
    with pytest.raises(ValueError, match="dimensions differ"):
        knn_predict(x, [0, 1, 0, 1, 0], np.zeros((2, 4)), ks=(1,))
    with pytest.raises(ValueError, match="vote"):
        knn_predict(x + 1, [0, 1, 0, 1, 0], x + 1, ks=(1,), vote_method="median")


def test_search_and_vote_are_the_shared_primitive():
    from dinov2.train import online_knn
    from dinov2.utils import knn as primitive

    # One implementation: the evaluation suite and the online monitor call the same functions.
    assert topk_neighbours is primitive.topk_neighbours and vote is primitive.vote
    assert online_knn.topk_neighbours is primitive.topk_neighbours and online_knn.vote is primitive.vote
