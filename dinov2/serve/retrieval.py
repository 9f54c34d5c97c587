"""Nearest reference cells by cosine similarity of backbone embeddings.

A reference set is a labeled class-folder tree (for example a training split). Its embeddings are
the classifier's own head input (`BackboneClassifier.features`: the normalised CLS token, or CLS
concatenated with the mean patch token), computed once with `dinov2.eval.features.extract_features`
and cached on disk, so a restart of the server reads them back instead of running the backbone.

Example::

    index = ReferenceIndex.from_folder(model, prep, "split/TRN", cache_dir="runs/linear/feature_cache")
    hits = index.search(query_embeddings, k=8)  # per query: [Neighbour(index, path, class, similarity)]
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dinov2.eval.features import FeatureSet, Preprocessing
from dinov2.transfer.classifier import classifier_features


@dataclass(frozen=True)
class Neighbour:
    """One reference cell close to a query."""

    index: int
    """Row of the reference set (used by the thumbnail URL)."""
    path: str
    class_name: str
    similarity: float
    """Cosine similarity to the query, in [-1, 1]."""

    def to_json(self) -> dict[str, object]:
        return {
            "index": self.index,
            "path": self.path,
            "class": self.class_name,
            "similarity": self.similarity,
            "thumbnail": f"/api/reference/{self.index}/thumbnail",
        }


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` [N, D] scaled to unit length (an all-zero row stays zero)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


class ReferenceIndex:
    """Exact cosine-similarity search over a `FeatureSet` (brute force: reference sets here hold
    thousands of cells, a [B, N] matrix product is milliseconds).

    Args:
        features: the reference embeddings, labeled (every label >= 0).
        expected_dim: the query embedding size; a mismatch is a ValueError naming both sizes.
    """

    def __init__(self, features: FeatureSet, expected_dim: int | None = None):
        if len(features) == 0:
            raise ValueError("the reference set is empty")
        if not features.is_labeled:
            raise ValueError("the reference set must be labeled (one sub-folder of images per class)")
        dim = features.features.shape[1]
        if expected_dim is not None and dim != expected_dim:
            raise ValueError(
                f"reference embeddings have {dim} dimensions but the classifier's embeddings have "
                f"{expected_dim}: they were made with another backbone or pooling"
            )
        self.features = features
        self._unit = torch.from_numpy(l2_normalise(features.features))

    def __len__(self) -> int:
        return len(self.features)

    @property
    def paths(self) -> list[str]:
        return self.features.paths

    def search(self, queries: torch.Tensor | np.ndarray, k: int = 8) -> list[list[Neighbour]]:
        """The ``k`` most similar reference cells of each query row [B, D], most similar first
        (equal similarities keep reference order)."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = torch.from_numpy(l2_normalise(torch.as_tensor(queries).detach().float().cpu().numpy()))
        if q.ndim != 2 or q.shape[1] != self._unit.shape[1]:
            raise ValueError(f"queries must be [B, {self._unit.shape[1]}], got {tuple(q.shape)}")
        sims = q @ self._unit.T
        k = min(k, len(self))
        # A stable descending sort keeps the earlier reference first among ties.
        order = torch.sort(sims, dim=1, descending=True, stable=True).indices[:, :k]
        fs = self.features
        return [
            [
                Neighbour(int(j), fs.paths[j], fs.class_names[fs.labels[j]], float(sims[b, j]))
                for j in order[b].tolist()
            ]
            for b in range(len(q))
        ]

    @classmethod
    def from_folder(
        cls,
        model,
        prep: Preprocessing,
        folder: str | os.PathLike,
        *,
        cache_dir: str | os.PathLike | None = None,
        max_per_class: int | None = None,
        batch_size: int = 64,
        device: torch.device | str = "cpu",
        progress: bool = True,
    ) -> ReferenceIndex:
        """Embeddings of the labeled tree ``folder`` from ``model`` (a `BackboneClassifier`), with
        the classifier's own preprocessing and pooling, cached under ``cache_dir``.

        Read through `classifier_features`, as `dinov2-finetune --cache-features` reads them, so
        serving a linear probe with its training split as the reference reads the features that
        training already computed.
        """
        fs = classifier_features(
            model,
            prep,
            folder,
            cache_dir=cache_dir,
            max_images_per_class=max_per_class,
            batch_size=batch_size,
            device=device,
            progress=progress,
        )
        return cls(fs, expected_dim=model.head.linear.in_features)

    @classmethod
    def from_file(cls, path: str | os.PathLike, model) -> ReferenceIndex:
        """A `FeatureSet` ``.npz`` (as `extract_features` caches it or `FeatureSet.save` writes it).

        Its pooling, when recorded, must be the classifier's: the dimensions could agree by chance
        (``avgpool`` and ``cls`` are both D wide) while the similarities would mean nothing.
        """
        fs = FeatureSet.load(path)
        pooling = fs.meta.get("pooling")
        if pooling is not None and pooling != model.pooling:
            raise ValueError(
                f"{Path(path).name} holds {pooling!r} features but the classifier pools {model.pooling!r}"
            )
        return cls(fs, expected_dim=model.head.linear.in_features)
