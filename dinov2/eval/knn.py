"""k-nearest-neighbour classification on cosine similarity, in chunks with ``torch.topk``.

Features are L2-normalised, so the dot product is the cosine similarity. Queries are processed in
chunks: each chunk's similarity block ``[chunk, N_train]`` is reduced to its top ``max(k)``
neighbours before the next chunk is computed, so memory stays ``O(chunk * N_train)`` and the full
``N_test x N_train`` matrix is never materialised. One top-k pass serves every requested k.

Votes:

- ``"majority"``: each of the k neighbours votes 1 for its class. Ties between classes are broken
  in favour of the tied class whose best-ranked neighbour is nearest to the query (equivalently:
  the class that reached the winning count first when walking the neighbours from the nearest),
  which is deterministic and keeps 1-NN behaviour as the last resort.
- ``"weighted"``: DINO's temperature-weighted vote: neighbour ``j`` votes ``exp(sim_j / T)`` for
  its class (T = 0.07) and the class with the largest summed weight wins.

Example::

    preds = knn_predict(train_x, train_y, test_x, ks=(1, 20))        # {1: [N], 20: [N]}
    preds = knn_predict(train_x, train_y, test_x, ks=(20,), vote="weighted")
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

from dinov2.utils.device import resolve_device

VOTES = ("majority", "weighted")


def _to_tensor(x, name: str, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if t.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [N, D], got shape {tuple(t.shape)}")
    return t.to(device=device, dtype=torch.float32)


def _l2_normalise(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=1, eps=1e-12)


def _check_ks(ks: Iterable[int], n_train: int) -> list[int]:
    ks = sorted({int(k) for k in ks})
    if not ks:
        raise ValueError("ks must list at least one number of neighbours")
    if ks[0] < 1:
        raise ValueError(f"every k must be >= 1, got {ks}")
    if ks[-1] > n_train:
        raise ValueError(f"k={ks[-1]} exceeds the number of training samples ({n_train})")
    return ks


def topk_neighbours(
    train_features,
    test_features,
    k: int,
    *,
    chunk_size: int = 1024,
    device: str | torch.device | None = None,
    exclude_self: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities and indices of the ``k`` nearest training samples of each query.

    Args:
        train_features: [N_train, D]; test_features: [N_test, D] (numpy or torch, any float dtype).
        k: number of neighbours (sorted by decreasing similarity).
        chunk_size: queries per similarity block.
        device: where to compute (default CUDA when available, else CPU).
        exclude_self: the queries are the training set itself (same order); a sample is not its
            own neighbour (leave-one-out).

    Returns:
        ``(similarities [N_test, k] float32, indices [N_test, k] int64)`` on the CPU.
    """
    dev = resolve_device(device)
    train = _l2_normalise(_to_tensor(train_features, "train_features", dev))
    test = _l2_normalise(_to_tensor(test_features, "test_features", dev))
    if train.shape[1] != test.shape[1]:
        raise ValueError(f"feature dimensions differ: train {train.shape[1]} vs test {test.shape[1]}")
    if exclude_self and train.shape[0] != test.shape[0]:
        raise ValueError("exclude_self=True needs the queries to be the training set")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    n_avail = train.shape[0] - (1 if exclude_self else 0)
    if not 1 <= k <= n_avail:
        raise ValueError(f"k={k} must be between 1 and the number of candidate neighbours ({n_avail})")
    # The transposed copy is contiguous once so every chunk's matmul reads it linearly.
    train_t = train.T.contiguous()
    sims, idxs = [], []
    for start in range(0, test.shape[0], chunk_size):
        block = test[start : start + chunk_size] @ train_t
        if exclude_self:
            rows = torch.arange(block.shape[0], device=dev)
            block[rows, rows + start] = -float("inf")
        s, i = torch.topk(block, k, dim=1, largest=True, sorted=True)
        sims.append(s.cpu())
        idxs.append(i.cpu())
    return torch.cat(sims), torch.cat(idxs)


def vote(
    neighbour_labels: torch.Tensor,
    neighbour_sims: torch.Tensor,
    num_classes: int,
    *,
    method: str = "majority",
    temperature: float = 0.07,
) -> torch.Tensor:
    """Class scores [N, C] from the labels [N, k] and similarities [N, k] of ranked neighbours.

    ``argmax`` of the returned scores is the prediction; for ``"majority"`` the scores are vote
    counts plus a tie-break bonus < 1 favouring the class whose first neighbour is nearest.
    """
    if method not in VOTES:
        raise ValueError(f"vote must be one of {VOTES}, got {method!r}")
    n, k = neighbour_labels.shape
    labels = neighbour_labels.long()
    if method == "weighted":
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        weights = (neighbour_sims.double() / temperature).exp()
        scores = torch.zeros(n, num_classes, dtype=torch.float64)
        return scores.scatter_add_(1, labels, weights)
    counts = torch.zeros(n, num_classes, dtype=torch.float64)
    counts.scatter_add_(1, labels, torch.ones(n, k, dtype=torch.float64))
    # Rank of each class's nearest neighbour (k when absent); bonus in (0, 1) decreasing with rank.
    ranks = torch.arange(k).expand(n, k)
    first = torch.full((n, num_classes), k, dtype=torch.long)
    first.scatter_reduce_(1, labels, ranks, reduce="amin", include_self=True)
    return counts + (k - first).double() / (k + 1)


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
        vote_method: ``"majority"`` or ``"weighted"`` (see module doc).
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
