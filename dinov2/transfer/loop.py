"""The fine-tuning loop's parts: data splits, loaders, optimiser and schedule, and one epoch.

`run_epoch` is the loop body for every mode: a full model on images, or (cached features) the
head alone on feature vectors. It trains when given an optimiser, evaluates otherwise, and
returns the loss with the per-sample probabilities so the caller computes any metric.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler
from tqdm import tqdm

from dinov2.transfer.classifier import balanced_class_weights
from dinov2.utils.device import autocast_for


@dataclass
class EpochOutput:
    """Loss and per-sample outputs of one pass over a loader."""

    loss: float
    """Mean per-sample cross-entropy."""
    targets: np.ndarray
    """True class indices [N]."""
    probs: np.ndarray
    """Softmax probabilities [N, K] (float32)."""

    @property
    def preds(self) -> np.ndarray:
        return self.probs.argmax(axis=1)


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed for 0-based ``epoch`` of a run seeded with ``seed`` (distinct per epoch and per seed)."""
    return (seed * 1_000_003 + epoch) % 2**63


def warmup_cosine(total_steps: int, warmup_steps: int):
    """lr multiplier per step: linear from 1/warmup to 1 over ``warmup_steps``, then cosine to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


class _TargetMap:
    """Picklable target_transform mapping a split's own class index to the TRN class index."""

    def __init__(self, mapping: Sequence[int]):
        self.mapping = list(mapping)

    def __call__(self, target: int) -> int:
        return self.mapping[target]


@dataclass
class _Split:
    dataset: Dataset
    paths: list[str]
    targets: list[int]


def load_split(folder: Path, classes: Sequence[str] | None, transform) -> _Split:
    """A labeled `CellImageDataset` for ``folder`` with targets mapped onto ``classes``' order.

    ``classes=None`` takes the folder's own classes (used for TRN, which defines the model's
    classes). A class folder of VAL/TST that TRN lacks is an error.
    """
    from dinov2.data.datasets import CellImageDataset

    if not folder.is_dir():
        raise FileNotFoundError(f"split folder not found: {folder} (run dinov2-split first)")
    probe = CellImageDataset(str(folder), labeled=True)
    if classes is None:
        mapping = list(range(len(probe.classes)))
    else:
        unknown = [c for c in probe.classes if c not in classes]
        if unknown:
            raise ValueError(
                f"{folder} has classes {unknown} that the training split lacks (TRN classes: {classes})"
            )
        mapping = [list(classes).index(c) for c in probe.classes]
    dataset = CellImageDataset(
        str(folder), transform=transform, target_transform=_TargetMap(mapping), labeled=True
    )
    return _Split(dataset, list(dataset.paths), [mapping[t] for t in dataset.targets])


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


def run_epoch(
    model: nn.Module,
    loader: DataLoader,
    criterion: nn.Module,
    device: torch.device,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    desc: str = "",
    progress: bool = True,
) -> EpochOutput:
    """One pass over ``loader``: a training pass when ``optimizer`` is given, else evaluation.

    ``model`` maps a batch of inputs to logits [B, K]; the scheduler (if any) steps per batch.
    The loss is computed in float32 even under autocast.
    """
    training = optimizer is not None
    model.train(training)
    loss_sum, count = 0.0, 0
    all_probs, all_targets = [], []
    bar = tqdm(loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    with torch.set_grad_enabled(training):
        for inputs, targets in bar:
            inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            with autocast_for(device):
                logits = model(inputs)
            loss = criterion(logits.float(), targets)
            if training:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
            loss_sum += loss.item() * len(targets)
            count += len(targets)
            all_probs.append(torch.softmax(logits.detach().float(), dim=1).cpu())
            all_targets.append(targets.cpu())
            bar.set_postfix(loss=f"{loss_sum / count:.4f}")
    if count == 0:
        raise ValueError(f"{desc or 'loader'}: no batches (empty dataset?)")
    return EpochOutput(
        loss_sum / count, torch.cat(all_targets).numpy(), torch.cat(all_probs).numpy().astype(np.float32)
    )


def make_optimizer(params, total_steps: int, warmup_steps: int):
    optimizer = torch.optim.AdamW(params)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, warmup_steps))
    return optimizer, scheduler


def make_train_loader(
    dataset: Dataset,
    targets: Sequence[int],
    num_classes: int,
    batch_size: int,
    balance: str,
    num_workers: int,
    generator: torch.Generator,
    device: torch.device,
) -> DataLoader:
    if balance == "sampler":
        per_class = balanced_class_weights(targets, num_classes)
        weights = per_class[torch.as_tensor(list(targets))].double()
        sampler = WeightedRandomSampler(
            weights, num_samples=len(targets), replacement=True, generator=generator
        )
        kwargs: dict[str, Any] = {"sampler": sampler}
    else:
        kwargs = {"shuffle": True}
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        generator=generator,
        pin_memory=device.type == "cuda",
        drop_last=False,
        **kwargs,
    )


def make_eval_loader(dataset: Dataset, batch_size: int, num_workers: int, device: torch.device) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )


def make_criterion(balance: str, targets: Sequence[int], num_classes: int, device: torch.device) -> nn.Module:
    weight = balanced_class_weights(targets, num_classes).to(device) if balance == "weighted-loss" else None
    return nn.CrossEntropyLoss(weight=weight)
