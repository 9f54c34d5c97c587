"""The k-NN primitive: chunked cosine top-k neighbour search and the class vote over the neighbours.

Two stages classify by k nearest neighbours: the online monitor during training
(`dinov2.train.online_knn`) and the evaluation suite (`dinov2.eval.knn`). Both call the two
functions here, so they search and vote the same way. It lives in `dinov2/utils` because `train`
comes before `eval` in the stage order (a train module must not import eval) and the search needs
nothing from any stage: `utils` is the one place both may import.

Search (`topk_neighbours`): features are L2-normalised, so the dot product is the cosine
similarity. Queries are processed in chunks: each chunk's similarity block ``[chunk, N_train]`` is
reduced to its top ``k`` neighbours before the next chunk is computed, so memory stays
``O(chunk * N_train)`` and the full ``N_test x N_train`` matrix is never built. Neighbours come
sorted by decreasing similarity, so one pass with the largest k serves every smaller k.

Vote (`vote`), from the ranked neighbours' labels and similarities:

- ``"majority"``: each of the k neighbours votes 1 for its class. Ties between classes are broken
  in favour of the tied class whose best-ranked neighbour is nearest to the query (equivalently:
  the class that reached the winning count first when walking the neighbours from the nearest),
  which is deterministic and keeps 1-NN behaviour as the last resort.
- ``"weighted"``: DINO's temperature-weighted vote: neighbour ``j`` votes ``exp(sim_j / T)`` for
  its class and the class with the largest summed weight wins.

Example::

    sims, idx = topk_neighbours(bank, queries, k=20, device="cpu")     # [Q, 20] each, on the CPU
    scores = vote(bank_labels[idx], sims, num_classes, method="weighted", temperature=0.07)
    predictions = scores.argmax(dim=1)
"""

from __future__ import annotations

import numpy as np
import torch

from dinov2.utils.device import resolve_device

VOTES = ("majority", "weighted")


def _to_tensor(x, name: str, device: torch.device) -> torch.Tensor:
    """``x`` (numpy, torch or nested lists) as a float32 [N, D] tensor on ``device``."""
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if t.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [N, D], got shape {tuple(t.shape)}")
    return t.to(device=device, dtype=torch.float32)


def _l2_normalise(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=1, eps=1e-12)


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
        device: where to compute (`dinov2.utils.device.resolve_device`: default the accelerator
            when there is one, else the CPU).
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
    # Empty heads, so that a query set with no rows gives [0, k] results instead of an error.
    sims, idxs = [torch.empty(0, k, dtype=torch.float32)], [torch.empty(0, k, dtype=torch.int64)]
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
    """Class scores [N, C] float64 from the labels [N, k] and similarities [N, k] of ranked neighbours.

    ``argmax`` of the returned scores is the prediction; for ``"majority"`` the scores are vote
    counts plus a tie-break bonus < 1 favouring the class whose first neighbour is nearest; for
    ``"weighted"`` they are the summed ``exp(sim / temperature)`` of each class's neighbours.
    """
    if method not in VOTES:
        raise ValueError(f"vote must be one of {VOTES}, got {method!r}")
    if neighbour_labels.shape != neighbour_sims.shape or neighbour_labels.ndim != 2:
        raise ValueError(
            f"neighbour labels {tuple(neighbour_labels.shape)} and similarities "
            f"{tuple(neighbour_sims.shape)} must both be [N, k]"
        )
    n, k = neighbour_labels.shape
    labels = neighbour_labels.long().cpu()
    if method == "weighted":
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        weights = (neighbour_sims.double().cpu() / temperature).exp()
        scores = torch.zeros(n, num_classes, dtype=torch.float64)
        return scores.scatter_add_(1, labels, weights)
    counts = torch.zeros(n, num_classes, dtype=torch.float64)
    counts.scatter_add_(1, labels, torch.ones(n, k, dtype=torch.float64))
    # Rank of each class's nearest neighbour (k when absent); bonus in (0, 1) decreasing with rank.
    ranks = torch.arange(k).expand(n, k)
    first = torch.full((n, num_classes), k, dtype=torch.long)
    first.scatter_reduce_(1, labels, ranks, reduce="amin", include_self=True)
    return counts + (k - first).double() / (k + 1)
