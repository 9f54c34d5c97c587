"""Online k-NN monitor: cosine 20-NN accuracy of the teacher's CLS features on a small labeled folder.

A training-time health check, not the evaluation suite (dinov2/eval is a later stage): the labeled
folder is split once, stratified by class, into a memory bank (half) and queries (half); every
check embeds both with the current teacher backbone and votes with DINO's weighting
exp(cosine / T) over the k nearest bank images. The neighbour search and the vote are the k-NN
primitive `dinov2.utils.knn`, shared with `dinov2.eval.knn`.

Usage:
    knn = OnlineKNN("/data/pbc_small", image_size=224, max_images=2000, seed=0)
    knn.evaluate(teacher_backbone, device)   # {"knn_accuracy": ..., "knn_balanced_accuracy": ...}
"""

import logging
from pathlib import Path

import numpy as np
import torch

from dinov2.data.datasets import CellImageDataset
from dinov2.data.transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from dinov2.utils.knn import topk_neighbours, vote

logger = logging.getLogger("dinov2")


def stratified_split(targets: np.ndarray, max_images: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(bank indices, query indices): up to `max_images` indices, half of each class on each side.

    Each class keeps its share of the subsample (at least 2 images when it has them).
    """
    rng = np.random.default_rng(seed)
    classes = np.unique(targets)
    fraction = min(1.0, max_images / len(targets))
    bank, query = [], []
    for c in classes:
        idx = rng.permutation(np.flatnonzero(targets == c))
        take = max(min(2, len(idx)), int(round(fraction * len(idx))))
        idx = idx[:take]
        half = (len(idx) + 1) // 2
        bank.append(idx[:half])
        query.append(idx[half:])
    return np.sort(np.concatenate(bank)), np.sort(np.concatenate(query))


def knn_predict(
    query: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    num_classes: int,
    k: int,
    temperature: float,
) -> torch.Tensor:
    """Class predictions [Q] (int64, CPU) by cosine k-NN with exp(sim / temperature) vote weights.

    Args:
        query: [Q, D] features; bank: [N, D] features; bank_labels: [N] int64 in [0, num_classes).
        k: neighbours, capped at N (a small bank still gives an answer).
    """
    # Computed where the features are: the monitor's features are already on the CPU.
    sims, idx = topk_neighbours(bank, query, min(k, bank.shape[0]), device=query.device)
    scores = vote(bank_labels.cpu()[idx], sims, num_classes, method="weighted", temperature=temperature)
    return scores.argmax(dim=-1)


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean over the classes present in y_true of per-class recall."""
    recalls = [float(np.mean(y_pred[y_true == c] == c)) for c in np.unique(y_true)]
    return float(np.mean(recalls))


class OnlineKNN:
    """Periodic k-NN accuracy of a backbone's CLS features on a labeled class-folder dataset.

    Args:
        root: class-folder dataset (one sub-folder per class).
        image_size: side the images are resized to (a multiple of the patch size).
        max_images: cap on bank + query images (stratified subsample).
        seed: split seed.
        k: neighbours; temperature: vote temperature.
    """

    def __init__(self, root: str | Path, image_size: int, max_images: int, seed: int = 0, k: int = 20,
                 temperature: float = 0.07):  # fmt: skip
        dataset = CellImageDataset(str(root), labeled=True)
        targets = np.asarray(dataset.targets)
        if len(np.unique(targets)) < 2:
            raise ValueError(f"online kNN needs at least 2 classes in {root}, found {dataset.classes}")
        self.bank_idx, self.query_idx = stratified_split(targets, max_images, seed)
        self.targets = torch.as_tensor(targets, dtype=torch.int64)
        self.num_classes = len(dataset.classes)
        self.k, self.temperature = k, temperature
        # Decoded once and kept as uint8: re-decoding every check would dominate its cost.
        order = np.concatenate([self.bank_idx, self.query_idx])
        self.images = torch.stack([self._to_uint8(dataset.load_image(int(i)), image_size) for i in order])
        self.labels = self.targets[torch.as_tensor(order)]
        self.n_bank = len(self.bank_idx)
        logger.info("online kNN: %d bank / %d query images from %s", self.n_bank, len(self.query_idx), root)

    @staticmethod
    def _to_uint8(image, size: int) -> torch.Tensor:
        image = image.convert("RGB").resize((size, size), resample=3)  # 3 = bicubic
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)

    @torch.no_grad()
    def features(self, backbone: torch.nn.Module, device: torch.device, batch_size: int = 64) -> torch.Tensor:
        """CLS features [N, D] of every cached image (bank first, then queries)."""
        mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_DEFAULT_STD, device=device).view(1, 3, 1, 1)
        was_training = backbone.training
        backbone.eval()
        feats = []
        for start in range(0, len(self.images), batch_size):
            x = self.images[start : start + batch_size].to(device).float().div_(255).sub_(mean).div_(std)
            feats.append(backbone(x).float().cpu())
        backbone.train(was_training)
        return torch.cat(feats)

    def evaluate(
        self, backbone: torch.nn.Module, device: torch.device, batch_size: int = 64
    ) -> dict[str, float]:
        """{"knn_accuracy", "knn_balanced_accuracy"} of `backbone` (forward(x) -> CLS [B, D])."""
        feats = self.features(backbone, device, batch_size)
        bank, query = feats[: self.n_bank], feats[self.n_bank :]
        y_bank, y_query = self.labels[: self.n_bank], self.labels[self.n_bank :]
        pred = knn_predict(query, bank, y_bank, self.num_classes, self.k, self.temperature)
        return {
            "knn_accuracy": float((pred == y_query).double().mean()),
            "knn_balanced_accuracy": balanced_accuracy(y_query.numpy(), pred.numpy()),
        }
