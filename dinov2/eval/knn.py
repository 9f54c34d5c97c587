"""k-nearest-neighbour classification on cosine similarity for the evaluation suite: several k from
one neighbour search, majority or weighted votes, optional class scores.

The search and the vote are the shared primitive `dinov2.utils.knn` (also used by the online
monitor in `dinov2.train.online_knn`); `topk_neighbours` and `vote` are re-exported here. That
module's docstring describes the chunked search and both votes (majority with its tie-break, DINO's
``exp(sim / T)`` weighting).

Example::

    preds = knn_predict(train_x, train_y, test_x, ks=(1, 20))        # {1: [N], 20: [N]}
    preds = knn_predict(train_x, train_y, test_x, ks=(20,), vote_method="weighted")
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

from dinov2.utils.knn import VOTES, topk_neighbours, vote

__all__ = ["VOTES", "knn_predict", "topk_neighbours", "vote"]


def _check_ks(ks: Iterable[int], n_train: int) -> list[int]:
    ks = sorted({int(k) for k in ks})
    if not ks:
        raise ValueError("ks must list at least one number of neighbours")
    if ks[0] < 1:
        raise ValueError(f"every k must be >= 1, got {ks}")
    if ks[-1] > n_train:
        raise ValueError(f"k={ks[-1]} exceeds the number of training samples ({n_train})")
    return ks


def knn_predict(
    train_features,
    train_labels,
    test_features,
    ks: Sequence[int] = (1, 20),
    *,
    vote_method: str = "majority",
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
    device: str | torch.device | None = None,
    return_scores: bool = False,
):
    """Predict test labels by k-NN on cosine similarity, for every k in ``ks``.

    Args:
        train_features: [N_train, D]; train_labels: [N_train] class indices >= 0.
        test_features: [N_test, D].
        ks: numbers of neighbours (each <= N_train).
        vote_method: ``"majority"`` or ``"weighted"`` (see `dinov2.utils.knn`).
        temperature: T of the weighted vote.
        num_classes: default ``max(train_labels) + 1``.
        chunk_size, device: see :func:`topk_neighbours`.
        return_scores: also return the class scores [N_test, C] per k.

    Returns:
        ``{k: predictions int64 [N_test]}``, or ``(predictions, {k: scores})`` with return_scores.
    """
    y = np.asarray(train_labels).astype(np.int64)
    n_train = len(y)
    if y.ndim != 1:
        raise ValueError(f"train_labels must be 1-D, got shape {y.shape}")
    if n_train == 0:
        raise ValueError("the training set is empty")
    if y.min() < 0:
        raise ValueError("train_labels contain negative (unlabeled) entries; kNN needs class indices")
    if np.shape(train_features)[0] != n_train:
        raise ValueError(f"{np.shape(train_features)[0]} training features but {n_train} labels")
    ks_sorted = _check_ks(ks, n_train)
    num_classes = int(y.max()) + 1 if num_classes is None else int(num_classes)
    sims, idx = topk_neighbours(
        train_features, test_features, ks_sorted[-1], chunk_size=chunk_size, device=device
    )
    nb_labels = torch.from_numpy(y)[idx]
    preds, all_scores = {}, {}
    for k in ks_sorted:
        scores = vote(nb_labels[:, :k], sims[:, :k], num_classes, method=vote_method, temperature=temperature)
        preds[k] = scores.argmax(dim=1).numpy()
        all_scores[k] = scores.numpy()
    return (preds, all_scores) if return_scores else preds
