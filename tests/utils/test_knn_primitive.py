"""The shared k-NN primitive (dinov2/utils/knn.py) against scikit-learn's brute-force cosine k-NN.

scikit-learn computes in float64 from its own cosine distances (1 - cosine similarity); ours runs in
float32. Neighbour orders are compared on the rows whose float64 similarities have no near-tie
among the first k + 1 (there float32 rounding cannot reorder them); similarities on every row.
"""

import numpy as np
import pytest
import torch
from sklearn.neighbors import KNeighborsClassifier

from dinov2.utils.knn import topk_neighbours, vote

N_TRAIN, N_TEST, DIM = 211, 97, 10  # primes: no chunk size below divides either


def _data(n_train=N_TRAIN, n_test=N_TEST, d=DIM, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n_train, d)), rng.integers(0, classes, n_train), rng.normal(size=(n_test, d))


def _clear_rows(xtr: np.ndarray, xte: np.ndarray, k: int, gap: float = 1e-5) -> np.ndarray:
    """Rows whose top k + 1 float64 cosine similarities are all more than `gap` apart."""
    a = xte / np.linalg.norm(xte, axis=1, keepdims=True)
    b = xtr / np.linalg.norm(xtr, axis=1, keepdims=True)
    top = -np.sort(-(a @ b.T), axis=1)[:, : k + 1]
    return np.flatnonzero((-np.diff(top, axis=1)).min(axis=1) > gap)


def _sklearn(xtr, ytr, k, weights="uniform"):
    sk = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute", weights=weights)
    return sk.fit(xtr, ytr)


@pytest.mark.parametrize("chunk_size", [1, 7, 13, 50, 96, 1000])
def test_neighbours_equal_sklearn_for_chunks_that_do_not_divide_n(chunk_size):
    xtr, ytr, xte = _data()
    k = 9
    dist, ref_idx = _sklearn(xtr, ytr, k).kneighbors(xte)
    sims, idx = topk_neighbours(xtr, xte, k, chunk_size=chunk_size, device="cpu")
    assert sims.shape == idx.shape == (N_TEST, k) and sims.dtype == torch.float32 and idx.dtype == torch.int64
    np.testing.assert_allclose(sims.numpy(), 1.0 - dist, rtol=1e-5, atol=1e-6)
    rows = _clear_rows(xtr, xte, k)
    assert len(rows) > 0.8 * N_TEST
    np.testing.assert_array_equal(idx.numpy()[rows], ref_idx[rows])


def test_exclude_self_equals_sklearn_leave_one_out():
    xtr, ytr, _ = _data(n_train=83)
    k = 5
    dist, ref_idx = _sklearn(xtr, ytr, k).kneighbors()  # no X: each training point, itself excluded
    sims, idx = topk_neighbours(xtr, xtr, k, chunk_size=10, device="cpu", exclude_self=True)
    np.testing.assert_allclose(sims.numpy(), 1.0 - dist, rtol=1e-5, atol=1e-6)
    rows = _clear_rows(xtr, xtr, k + 1)  # the query itself is the first of the k + 2
    np.testing.assert_array_equal(idx.numpy()[rows], ref_idx[rows])


def _expected_majority(neighbour_labels: np.ndarray, classes: int) -> np.ndarray:
    """Most votes; among tied classes the one whose first neighbour comes first in the ranking."""
    out = []
    for row in neighbour_labels:
        counts = np.bincount(row, minlength=classes)
        tied = set(np.flatnonzero(counts == counts.max()))
        out.append(next(c for c in row if c in tied))
    return np.array(out)


@pytest.mark.parametrize(("classes", "k"), [(2, 4), (3, 6), (4, 20)])
def test_majority_vote_equals_sklearn_and_breaks_ties_by_nearest_class(classes, k):
    xtr, ytr, xte = _data(classes=classes, seed=classes)
    sk = _sklearn(xtr, ytr, k)
    ref_nb = ytr[sk.kneighbors(xte, return_distance=False)]
    sims, idx = topk_neighbours(xtr, xte, k, chunk_size=17, device="cpu")
    scores = vote(torch.from_numpy(ytr)[idx], sims, classes, method="majority")
    ours = scores.argmax(1).numpy()
    rows = _clear_rows(xtr, xte, k)
    counts = np.stack([np.bincount(r, minlength=classes) for r in ref_nb])
    top2 = np.sort(counts, axis=1)[:, -2:]
    tie = top2[:, 1] == top2[:, 0]
    assert tie[rows].sum() >= 5 and (~tie[rows]).sum() >= 5  # both cases are exercised
    # No tie: scikit-learn's answer. Tie: scikit-learn picks the lowest label, we the nearest class.
    np.testing.assert_array_equal(ours[rows][~tie[rows]], sk.predict(xte)[rows][~tie[rows]])
    np.testing.assert_array_equal(ours[rows], _expected_majority(ref_nb[rows], classes))
    # The integer part of the scores is the vote count itself.
    np.testing.assert_array_equal(np.floor(scores.numpy()[rows]), counts[rows])


@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_weighted_vote_equals_sklearn_with_exp_similarity_weights(temperature):
    xtr, ytr, xte = _data(classes=5, seed=7)
    k = 20
    sk = _sklearn(xtr, ytr, k, weights=lambda dist: np.exp((1.0 - dist) / temperature))
    sims, idx = topk_neighbours(xtr, xte, k, chunk_size=23, device="cpu")
    scores = vote(torch.from_numpy(ytr)[idx], sims, 5, method="weighted", temperature=temperature)
    rows = _clear_rows(xtr, xte, k)
    # scikit-learn normalises the summed weights per query; ours are the raw sums.
    proba = (scores / scores.sum(1, keepdim=True)).numpy()
    np.testing.assert_allclose(proba[rows], sk.predict_proba(xte)[rows], rtol=1e-4, atol=1e-9)
    np.testing.assert_array_equal(scores.argmax(1).numpy()[rows], sk.predict(xte)[rows])


def test_weighted_scores_by_hand():
    labels = torch.tensor([[1, 0, 1]])
    sims = torch.tensor([[0.9, 0.5, -0.2]])
    scores = vote(labels, sims, 3, method="weighted", temperature=0.5)
    np.testing.assert_allclose(scores.numpy(), [[np.exp(1.0), np.exp(1.8) + np.exp(-0.4), 0.0]], rtol=1e-6)


def test_no_queries_gives_empty_results():
    xtr, ytr, _ = _data(n_train=10)
    sims, idx = topk_neighbours(xtr, np.zeros((0, DIM)), 3, device="cpu")
    assert sims.shape == idx.shape == (0, 3)
    assert vote(torch.from_numpy(ytr)[idx], sims, 4).shape == (0, 4)


def test_bad_input_is_named():
    x = np.ones((6, 3))
    with pytest.raises(ValueError, match="between 1 and"):
        topk_neighbours(x, x, 7, device="cpu")
    with pytest.raises(ValueError, match="between 1 and"):
        topk_neighbours(x, x, 6, device="cpu", exclude_self=True)
    with pytest.raises(ValueError, match="chunk_size"):
        topk_neighbours(x, x, 1, chunk_size=0, device="cpu")
    with pytest.raises(ValueError, match="2-D"):
        topk_neighbours(np.ones(6), x, 1, device="cpu")
    with pytest.raises(ValueError, match="temperature"):
        vote(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2), 2, method="weighted", temperature=0.0)
    with pytest.raises(ValueError, match="must both be"):
        vote(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 3), 2)
    with pytest.raises(ValueError, match="vote must be one of"):
        vote(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2), 2, method="median")
