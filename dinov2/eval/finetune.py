"""Train a classifier on a DINOv2 backbone: linear probe or full fine-tune (`dinov2-finetune`).

Input: a split folder ``DATA/TRN``, ``DATA/VAL`` (and optionally ``DATA/TST``) of class folders, as
written by `dinov2-split`, and a backbone (a checkpoint path or hub name, loaded with
`dinov2.models.weights.load_backbone`). Output folder:

- ``best.pth``: the checkpoint with the highest validation balanced accuracy (ties keep the
  earlier epoch), self-contained for `dinov2-infer` (see `dinov2.eval.classifier`).
- ``last.pth``: model, optimiser, scheduler, epoch and history after every epoch; re-running with
  the same output folder resumes from it (``--no-resume`` starts over).
- ``log.jsonl`` (one JSON object per epoch: train/val loss, accuracy, balanced accuracy, the lr
  after the epoch's last step, seconds), ``learning_curves.png``, ``val_predictions.csv``
  (validation predictions of the best epoch), ``config.json``; with ``cache_features``,
  ``feature_cache/`` (reused when the run resumes).
- ``test/``: metrics, per-class report and confusion matrices of the best model on ``DATA/TST``.

Modes: ``linear`` freezes the backbone (no gradients, eval mode) and trains only the head;
``finetune`` trains everything, the backbone at ``lr * backbone_lr_mult`` with layer-wise decay.
Optimiser: AdamW; schedule: linear warm-up then cosine to zero, stepped every iteration.

Reproducibility: the RNGs (torch, numpy, random) and the data-loader generator are re-seeded
from ``(seed, epoch)`` at the start of every epoch, so a resumed run sees the same data order and
augmentations as an uninterrupted one and, on CPU with deterministic kernels, ends with the same
weights. Data-loader worker seeds derive from the loader generator, so this also holds with
``num_workers > 0``.

Unreadable images: `CellImageDataset` replaces an image that fails to decode by the next sample
(and stops past its ``max_failed_fraction``), so metrics stay consistent but that file's row in a
predictions CSV shows its neighbour's output; split with ``dinov2-split --check-corrupted`` to leave
such files out.

Example::

    dinov2-split /data/pbc split --ratios 0.7 0.2 0.1
    dinov2-finetune --data split --backbone dinov2_vits14 --mode linear --output-dir runs/linear
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset, WeightedRandomSampler
from tqdm import tqdm

from dinov2.eval.classifier import (
    POOLINGS,
    BackboneClassifier,
    LinearClassifierHead,
    atomic_torch_save,
    balanced_class_weights,
    classifier_checkpoint,
    classifier_param_groups,
    make_eval_transform,
    make_train_transform,
    preprocessing_for,
)
from dinov2.eval.features import Preprocessing, extract_features
from dinov2.eval.metrics import classification_metrics

MODES = ("linear", "finetune")
BALANCE_OPTIONS = ("none", "weighted-loss", "sampler")
# Config fields that may change between a run and its resumption (they do not change the result).
RESUME_FREE_FIELDS = ("output_dir", "device", "num_workers", "progress", "resume")


@dataclass
class FinetuneConfig:
    """Everything `train_classifier` needs; the CLI flags map 1:1 onto these fields."""

    data: str
    """Split folder holding TRN/ and VAL/ (and optionally TST/) class folders."""
    backbone: str
    """Backbone checkpoint path or hub name (``dinov2_vits14``, optionally ``NAME:WEIGHTS.pth``)."""
    output_dir: str
    """Where checkpoints, logs, curves and the test report go."""
    mode: str = "linear"
    """"linear" (frozen backbone, train the head) or "finetune" (train everything)."""
    head: str = "cls"
    """Head input: "cls" (class token) or "cls+avgpool" (class token + mean patch token)."""
    epochs: int = 10
    """Number of passes over TRN."""
    batch_size: int = 64
    """Images per optimisation step."""
    lr: float = 1e-3
    """Peak learning rate of the head (AdamW)."""
    backbone_lr_mult: float = 0.1
    """Finetune: the top backbone layer's lr is ``lr * backbone_lr_mult``."""
    layer_decay: float = 0.75
    """Finetune: each block further down multiplies the backbone lr by this (1 = no decay)."""
    weight_decay: float = 0.05
    """AdamW decoupled weight decay (not applied to biases, norms, tokens, position embedding)."""
    warmup_epochs: float = 0.5
    """Linear lr warm-up length in epochs (may be fractional), then cosine decay to zero."""
    balance: str = "none"
    """Class imbalance: "none", "weighted-loss" (inverse-frequency CE weights) or "sampler"."""
    image_size: int = 224
    """Side of the square crop fed to the backbone (a multiple of its patch size)."""
    crop_pct: float = 1.0
    """Evaluation: resize the shorter side to ``image_size / crop_pct`` then centre-crop."""
    crop_scale_min: float = 0.8
    """Training: smallest area fraction of RandomResizedCrop (high: cell size is a class cue)."""
    color_jitter: float = 0.1
    """Training: colour-jitter strength (0 disables)."""
    cache_features: bool = False
    """Linear mode: extract features once without augmentation and train the head on them (fast)."""
    device: str = "auto"
    """"auto" (CUDA when available), "cpu", "cuda", "cuda:1", ..."""
    num_workers: int = 4
    """Data-loading worker processes."""
    seed: int = 0
    """Seed of initialisation, data order and augmentations."""
    resume: bool = True
    """Continue from ``output_dir/last.pth`` when it exists."""
    progress: bool = True
    """Show tqdm progress bars."""

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field."""
        checks = [
            (self.mode in MODES, f"mode must be one of {MODES}, got {self.mode!r}"),
            (self.head in POOLINGS, f"head must be one of {POOLINGS}, got {self.head!r}"),
            (
                self.balance in BALANCE_OPTIONS,
                f"balance must be one of {BALANCE_OPTIONS}, got {self.balance!r}",
            ),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.backbone_lr_mult >= 0, f"backbone_lr_mult must be >= 0, got {self.backbone_lr_mult}"),
            (0 < self.layer_decay <= 1, f"layer_decay must be in (0, 1], got {self.layer_decay}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (
                0 <= self.warmup_epochs < self.epochs,
                f"warmup_epochs must be in [0, epochs={self.epochs}), got {self.warmup_epochs}",
            ),
            (self.image_size > 0, f"image_size must be > 0, got {self.image_size}"),
            (0 < self.crop_pct <= 1, f"crop_pct must be in (0, 1], got {self.crop_pct}"),
            (0 < self.crop_scale_min <= 1, f"crop_scale_min must be in (0, 1], got {self.crop_scale_min}"),
            (self.color_jitter >= 0, f"color_jitter must be >= 0, got {self.color_jitter}"),
            (self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}"),
            (
                not (self.cache_features and self.mode != "linear"),
                "cache_features needs mode='linear' (fine-tuning changes the features every step)",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


@dataclass
class FinetuneResult:
    """What `train_classifier` produced."""

    output_dir: Path
    best_checkpoint: Path
    best_epoch: int
    """1-based epoch of ``best.pth``."""
    best_val_balanced_accuracy: float
    start_epoch: int
    """Epochs already done when this call started (0 for a fresh run, k when resumed)."""
    epochs_run: int
    """Epochs trained by this call."""
    history: list[dict[str, float]] = field(default_factory=list)
    test_metrics: dict[str, Any] | None = None
    """Metrics of the best model on DATA/TST (None when there is no TST folder)."""


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


# ----------------------------------------------------------------------------------------------
# Small components
# ----------------------------------------------------------------------------------------------


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when available else CPU; otherwise `torch.device(device)` (validated)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"unknown device {device!r} (expected auto, cpu, cuda or cuda:N)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return dev


def autocast_for(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; full float32 elsewhere (CPU bf16 is slow and changes results)."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and `random`."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


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


def _make_optimizer(params, total_steps: int, warmup_steps: int):
    optimizer = torch.optim.AdamW(params)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, warmup_steps))
    return optimizer, scheduler


def _train_loader(
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


def _eval_loader(dataset: Dataset, batch_size: int, num_workers: int, device: torch.device) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )


def _criterion(balance: str, targets: Sequence[int], num_classes: int, device: torch.device) -> nn.Module:
    weight = balanced_class_weights(targets, num_classes).to(device) if balance == "weighted-loss" else None
    return nn.CrossEntropyLoss(weight=weight)


def train_linear_head(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    epochs: int = 100,
    batch_size: int = 256,
    lr: float = 1e-2,
    weight_decay: float = 0.0,
    warmup_epochs: float = 0.0,
    balance: str = "none",
    seed: int = 0,
    device: str = "cpu",
    progress: bool = False,
) -> LinearClassifierHead:
    """Train a `LinearClassifierHead` on fixed features with the same loop `train_classifier` uses.

    Args:
        features: [N, D] float features. labels: [N] class indices in [0, num_classes).
        Other arguments as in `FinetuneConfig`.

    Returns:
        The trained head (eval mode, on ``device``).
    """
    if features.ndim != 2 or labels.shape != (features.shape[0],):
        raise ValueError(
            f"need features [N, D] and labels [N], got {tuple(features.shape)}, {tuple(labels.shape)}"
        )
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got range [{labels.min()}, {labels.max()}]")
    dev = resolve_device(device)
    seed_everything(seed)
    head = LinearClassifierHead(features.shape[1], num_classes).to(dev)
    generator = torch.Generator()
    dataset = TensorDataset(features.float(), labels.long())
    loader = _train_loader(dataset, labels.tolist(), num_classes, batch_size, balance, 0, generator, dev)
    decay = [p for p in head.parameters() if p.ndim > 1]
    no_decay = [p for p in head.parameters() if p.ndim <= 1]
    params = [
        {"params": decay, "lr": lr, "weight_decay": weight_decay},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0},
    ]
    optimizer, scheduler = _make_optimizer(params, epochs * len(loader), round(warmup_epochs * len(loader)))
    criterion = _criterion(balance, labels.tolist(), num_classes, dev)
    for epoch in range(epochs):
        seed_everything(epoch_seed(seed, epoch))
        generator.manual_seed(epoch_seed(seed, epoch))
        run_epoch(
            head, loader, criterion, dev, optimizer, scheduler, desc=f"head {epoch + 1}", progress=progress
        )
    return head.eval()


# ----------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------


def plot_learning_curves(history: Sequence[dict[str, float]], path: str | os.PathLike) -> None:
    """Loss and accuracy (train and val, plus val balanced accuracy) against epoch, as one PNG.

    Drawn on a bare Agg `Figure` (no pyplot), so it never changes a notebook's backend or state.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    ax_loss, ax_acc = fig.subplots(1, 2)
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], "o-", label="val")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="Loss")
    ax_acc.plot(epochs, [h["train_accuracy"] for h in history], "o-", label="train accuracy")
    ax_acc.plot(epochs, [h["val_accuracy"] for h in history], "o-", label="val accuracy")
    ax_acc.plot(epochs, [h["val_balanced_accuracy"] for h in history], "s--", label="val balanced accuracy")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="Accuracy", ylim=(0, 1.02))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _write_json_atomic(obj: Any, path: Path, lines: bool = False) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    text = "".join(json.dumps(o) + "\n" for o in obj) if lines else json.dumps(obj, indent=2)
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_predictions(path: Path, paths: Sequence[str], out: EpochOutput, classes: Sequence[str]) -> None:
    from dinov2.eval.infer import Prediction, write_predictions_csv

    preds = [Prediction.from_probs(p, probs, classes) for p, probs in zip(paths, out.probs)]
    write_predictions_csv(path, preds, classes, true_classes=[classes[t] for t in out.targets])


def write_test_report(
    out_dir: Path, paths: Sequence[str], out: EpochOutput, classes: Sequence[str]
) -> dict[str, Any]:
    """Test-set outputs in ``out_dir``: ``metrics.json`` (`dinov2.eval.metrics.METRIC_NAMES`, loss,
    number of images), ``per_class.{txt,csv}``, ``confusion_{counts,normalized}.png`` (via
    `dinov2.eval.reports.write_classification_outputs`) and ``test_predictions.csv``.

    Returns the metrics dict.
    """
    from dinov2.eval.reports import write_classification_outputs, write_json

    out_dir.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, Any] = classification_metrics(out.targets, out.preds, len(classes))
    metrics.update(loss=out.loss, num_images=len(out.targets))
    write_classification_outputs(out.targets, out.preds, classes, out_dir, title="test set")
    _write_predictions(out_dir / "test_predictions.csv", paths, out, classes)
    write_json(metrics, out_dir / "metrics.json")
    return metrics


# ----------------------------------------------------------------------------------------------
# train_classifier
# ----------------------------------------------------------------------------------------------


def _resume_state(path: Path, config: FinetuneConfig, classes: Sequence[str]) -> dict[str, Any] | None:
    if not (config.resume and path.is_file()):
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        saved = state["config"]
    except Exception as e:  # not ours, or from an incompatible version: never guess, never overwrite
        raise ValueError(
            f"cannot resume from {path} ({type(e).__name__}: {e}); "
            "use another --output-dir or --no-resume to start over"
        ) from e
    current = asdict(config)
    changed = [k for k in current if k not in RESUME_FREE_FIELDS and saved.get(k) != current[k]]
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in changed)
        raise ValueError(
            f"{path.parent} holds a run with different settings ({details}); "
            "use another --output-dir, the same settings, or --no-resume to start over"
        )
    if list(state["classes"]) != list(classes):
        raise ValueError(
            f"{path} was trained on classes {state['classes']}, the data now has {list(classes)}"
        )
    return state


def _cached_features(
    model: BackboneClassifier,
    folder: Path,
    classes: Sequence[str],
    prep: Preprocessing,
    config: FinetuneConfig,
    device: torch.device,
) -> TensorDataset:
    """(features, TRN-ordered labels) of ``folder`` from the frozen backbone, cached on disk under
    ``output_dir/feature_cache`` (keyed on weights, data and preprocessing) so a resumed run skips
    the extraction."""
    fs = extract_features(
        model.backbone,
        folder,
        pooling=model.pooling,
        image_size=prep.image_size,
        resize_size=prep.resize_size,
        mean=prep.mean,
        std=prep.std,
        interpolation=prep.interpolation,
        batch_size=config.batch_size,
        num_workers=config.num_workers,
        device=device,
        cache_dir=Path(config.output_dir) / "feature_cache",
        labeled=True,
        progress=config.progress,
    )
    unknown = [c for c in fs.class_names if c not in classes]
    if unknown:
        raise ValueError(
            f"{folder} has classes {unknown} that the training split lacks (TRN classes: {classes})"
        )
    to_trn = np.array([list(classes).index(c) for c in fs.class_names], dtype=np.int64)
    return TensorDataset(torch.from_numpy(fs.features), torch.from_numpy(to_trn[fs.labels]))


def train_classifier(config: FinetuneConfig) -> FinetuneResult:
    """Train (or resume training) a classifier as described by ``config``; see the module docstring.

    Raises:
        ValueError / FileNotFoundError for invalid settings, missing split folders or backbone, or
        an output folder holding a run with other settings.
    """
    from dinov2.models.weights import load_backbone

    config.validate()
    device = resolve_device(config.device)
    data, out_dir = Path(config.data), Path(config.output_dir)
    for name in ("TRN", "VAL"):
        if not (data / name).is_dir():
            raise FileNotFoundError(
                f"{data / name} not found: --data must hold TRN/ and VAL/ (see dinov2-split)"
            )

    # Data and settings first: a bad folder or a clashing earlier run fails before any heavy work.
    prep = preprocessing_for(config.image_size, config.crop_pct)
    eval_tf = make_eval_transform(prep)
    train_tf = make_train_transform(prep, (config.crop_scale_min, 1.0), config.color_jitter)
    trn = load_split(data / "TRN", None, train_tf)
    classes = list(trn.dataset.classes)
    val = load_split(data / "VAL", classes, eval_tf)
    num_classes = len(classes)
    if num_classes < 2:
        raise ValueError(f"{data / 'TRN'} has {num_classes} class folder(s); a classifier needs at least 2")
    last_path, best_path = out_dir / "last.pth", out_dir / "best.pth"
    state = _resume_state(last_path, config, classes)

    seed_everything(config.seed)
    backbone = load_backbone(config.backbone, device="cpu")
    if config.image_size % backbone.patch_size:
        raise ValueError(
            f"image_size {config.image_size} is not a multiple of the backbone's patch size "
            f"{backbone.patch_size}"
        )
    model = BackboneClassifier(backbone, num_classes, config.head, freeze_backbone=config.mode == "linear")
    model.to(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(asdict(config), out_dir / "config.json")

    if config.cache_features:
        # The frozen backbone's features never change, so it runs once per image instead of per epoch
        # and the epochs only train the head.
        trn_set: Dataset = _cached_features(model, data / "TRN", classes, prep, config, device)
        val_set: Dataset = _cached_features(model, data / "VAL", classes, prep, config, device)
        step_model: nn.Module = model.head
        workers = 0
    else:
        trn_set, val_set, step_model, workers = trn.dataset, val.dataset, model, config.num_workers
    generator = torch.Generator()
    train_loader = _train_loader(
        trn_set, trn.targets, num_classes, config.batch_size, config.balance, workers, generator, device
    )
    val_loader = _eval_loader(val_set, config.batch_size, workers, device)
    steps_per_epoch = len(train_loader)
    params = classifier_param_groups(
        model,
        config.lr,
        config.weight_decay,
        config.backbone_lr_mult,
        config.layer_decay if config.mode == "finetune" else 1.0,
    )
    optimizer, scheduler = _make_optimizer(
        params, config.epochs * steps_per_epoch, round(config.warmup_epochs * steps_per_epoch)
    )
    criterion = _criterion(config.balance, trn.targets, num_classes, device)
    val_criterion = nn.CrossEntropyLoss()

    history: list[dict[str, float]] = []
    best = {"epoch": 0, "val_balanced_accuracy": -1.0}
    start_epoch = 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, history, best = int(state["epoch"]), list(state["history"]), dict(state["best"])
        print(f"resuming {out_dir} after epoch {start_epoch}/{config.epochs}", file=sys.stderr)
    print(
        f"{config.mode}: {len(trn.targets)} TRN / {len(val.targets)} VAL images, {num_classes} classes, "
        f"{steps_per_epoch} steps per epoch on {device}",
        file=sys.stderr,
    )

    times: list[float] = []
    for epoch in range(start_epoch, config.epochs):
        t0 = time.perf_counter()
        # Re-seeding per epoch makes data order and augmentations independent of where a run resumed.
        seed_everything(epoch_seed(config.seed, epoch))
        generator.manual_seed(epoch_seed(config.seed, epoch))
        tag = f"epoch {epoch + 1}/{config.epochs}"
        train_out = run_epoch(
            step_model, train_loader, criterion, device, optimizer, scheduler, f"{tag} train", config.progress
        )
        val_out = run_epoch(
            step_model, val_loader, val_criterion, device, desc=f"{tag} val", progress=config.progress
        )
        train_scores = classification_metrics(train_out.targets, train_out.preds, num_classes)
        val_scores = classification_metrics(val_out.targets, val_out.preds, num_classes)
        times.append(time.perf_counter() - t0)
        history.append(
            {
                "epoch": epoch + 1,
                "train_loss": train_out.loss,
                "train_accuracy": train_scores["accuracy"],
                "train_balanced_accuracy": train_scores["balanced_accuracy"],
                "val_loss": val_out.loss,
                "val_accuracy": val_scores["accuracy"],
                "val_balanced_accuracy": val_scores["balanced_accuracy"],
                "lr": optimizer.param_groups[-1]["lr"],
                "epoch_time_s": times[-1],
            }
        )
        is_best = val_scores["balanced_accuracy"] > best["val_balanced_accuracy"]
        if is_best:
            best = {"epoch": epoch + 1, "val_balanced_accuracy": val_scores["balanced_accuracy"]}
            checkpoint = classifier_checkpoint(
                model,
                classes,
                prep,
                epoch=epoch + 1,
                val_accuracy=val_scores["accuracy"],
                val_balanced_accuracy=val_scores["balanced_accuracy"],
                config=asdict(config),
            )
            atomic_torch_save(checkpoint, best_path)
            _write_predictions(out_dir / "val_predictions.csv", val.paths, val_out, classes)
        last = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": epoch + 1,
            "history": history,
            "best": best,
            "classes": classes,
            "config": asdict(config),
        }
        atomic_torch_save(last, last_path)
        _write_json_atomic(history, out_dir / "log.jsonl", lines=True)
        plot_learning_curves(history, out_dir / "learning_curves.png")
        eta = (config.epochs - epoch - 1) * sum(times) / len(times)
        print(
            f"{tag}: train loss {train_out.loss:.4f} acc {train_scores['accuracy']:.4f} | "
            f"val loss {val_out.loss:.4f} acc {val_scores['accuracy']:.4f} "
            f"bal-acc {val_scores['balanced_accuracy']:.4f}{' (best)' if is_best else ''} | "
            f"{times[-1]:.1f}s, ETA {eta:.0f}s",
            file=sys.stderr,
        )

    test_metrics = None
    if _holds_files(data / "TST"):
        test_metrics = _evaluate_best_on_test(model, best_path, data / "TST", classes, eval_tf, config)
    return FinetuneResult(
        output_dir=out_dir,
        best_checkpoint=best_path,
        best_epoch=int(best["epoch"]),
        best_val_balanced_accuracy=float(best["val_balanced_accuracy"]),
        start_epoch=start_epoch,
        epochs_run=config.epochs - start_epoch,
        history=history,
        test_metrics=test_metrics,
    )


def _holds_files(folder: Path) -> bool:
    """Whether ``folder`` exists and holds at least one non-hidden file (a TST split may be empty)."""
    return folder.is_dir() and any(not f.startswith(".") for _, _, files in os.walk(folder) for f in files)


def _evaluate_best_on_test(
    model: BackboneClassifier,
    best_path: Path,
    folder: Path,
    classes: list[str],
    eval_tf,
    config: FinetuneConfig,
) -> dict[str, Any]:
    device = next(model.parameters()).device
    tst = load_split(folder, classes, eval_tf)
    best = torch.load(best_path, map_location="cpu", weights_only=True)
    model.load_state_dict(best["model"])
    loader = _eval_loader(tst.dataset, config.batch_size, config.num_workers, device)
    out = run_epoch(model, loader, nn.CrossEntropyLoss(), device, desc="test", progress=config.progress)
    metrics = write_test_report(Path(config.output_dir) / "test", tst.paths, out, classes)
    print(
        f"test (best epoch {best['epoch']}): accuracy {metrics['accuracy']:.4f}, "
        f"balanced accuracy {metrics['balanced_accuracy']:.4f} -> {Path(config.output_dir) / 'test'}",
        file=sys.stderr,
    )
    return metrics


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    defaults = FinetuneConfig(data="", backbone="", output_dir="")
    p = argparse.ArgumentParser(
        "dinov2-finetune",
        description="Train a classifier (linear probe or fine-tune) on a DINOv2 backbone over a "
        "dinov2-split folder; resumes automatically from OUTPUT_DIR/last.pth.",
        add_help=add_help,
    )
    p.add_argument("--data", required=True, help="split folder with TRN/, VAL/ (and TST/) class folders")
    p.add_argument(
        "--backbone", required=True, help="backbone checkpoint path or hub name (e.g. dinov2_vits14)"
    )
    p.add_argument("--output-dir", default="finetune_output", help="output folder (default: finetune_output)")
    p.add_argument(
        "--mode", choices=MODES, default=defaults.mode, help="linear: frozen backbone; finetune: all"
    )
    p.add_argument("--head", choices=POOLINGS, default=defaults.head, help="head input (default: cls)")
    p.add_argument("--epochs", type=int, default=defaults.epochs)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--lr", type=float, default=defaults.lr, help="peak head learning rate (AdamW)")
    p.add_argument(
        "--backbone-lr-mult",
        type=float,
        default=defaults.backbone_lr_mult,
        help="finetune: backbone lr = lr * this, before layer decay",
    )
    p.add_argument(
        "--layer-decay",
        type=float,
        default=defaults.layer_decay,
        help="finetune: lr factor per block going down the backbone (1 = none)",
    )
    p.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    p.add_argument("--warmup-epochs", type=float, default=defaults.warmup_epochs)
    p.add_argument(
        "--balance",
        choices=BALANCE_OPTIONS,
        default=defaults.balance,
        help="class imbalance: inverse-frequency loss weights or a balanced sampler",
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=defaults.image_size,
        help="input crop side, a multiple of the patch size (default: 224)",
    )
    p.add_argument(
        "--crop-pct",
        type=float,
        default=defaults.crop_pct,
        help="evaluation centre crop share of the resized image (default: 1.0)",
    )
    p.add_argument(
        "--crop-scale-min",
        type=float,
        default=defaults.crop_scale_min,
        help=f"training: smallest area share of the random resized crop (default: {defaults.crop_scale_min})",
    )
    p.add_argument(
        "--color-jitter",
        type=float,
        default=defaults.color_jitter,
        help=f"training: colour-jitter strength, 0 disables (default: {defaults.color_jitter})",
    )
    p.add_argument(
        "--cache-features",
        action="store_true",
        help="linear mode: extract features once (no augmentation) and train the head on them",
    )
    p.add_argument("--device", default=defaults.device, help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--num-workers", type=int, default=defaults.num_workers)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--no-resume", dest="resume", action="store_false", help="ignore OUTPUT_DIR/last.pth")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bars")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: 0 on success, 2 on invalid arguments or inputs."""
    args = get_args_parser().parse_args(argv)
    config = FinetuneConfig(**vars(args))
    try:
        result = train_classifier(config)
    except (ValueError, FileNotFoundError) as e:
        print(f"dinov2-finetune: error: {e}", file=sys.stderr)
        return 2
    print(f"best epoch {result.best_epoch}: val balanced accuracy {result.best_val_balanced_accuracy:.4f}")
    if result.test_metrics is not None:
        print(
            f"test: accuracy {result.test_metrics['accuracy']:.4f}, "
            f"balanced accuracy {result.test_metrics['balanced_accuracy']:.4f}"
        )
    print(f"outputs in {result.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
