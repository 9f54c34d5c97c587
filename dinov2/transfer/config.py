"""The settings of a fine-tuning run (`FinetuneConfig`, the source of `dinov2-finetune`'s flags) and
what the run returns (`FinetuneResult`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dinov2.transfer.classifier import POOLINGS

MODES = ("linear", "finetune")
BALANCE_OPTIONS = ("none", "weighted-loss", "sampler")
# Config fields that may change between a run and its resumption (they do not change the result).
RESUME_FREE_FIELDS = ("output_dir", "device", "num_workers", "progress", "resume")


@dataclass
class FinetuneConfig:
    """Everything `train_classifier` needs.

    The ``dinov2-finetune`` flags are generated from these fields
    (`dinov2.utils.dataclass_cli.add_dataclass_arguments`): ``--field-name``, help from the docstring.
    """

    data: str
    """Split folder holding TRN/ and VAL/ (and optionally TST/) class folders."""
    backbone: str
    """Backbone checkpoint path or hub name (``dinov2_vits14``, optionally ``NAME:WEIGHTS.pth``)."""
    output_dir: str = field(metadata={"cli_default": "finetune_output"})
    """Where checkpoints, logs, curves and the test report go."""
    mode: str = field(default="linear", metadata={"choices": MODES})
    """"linear" (frozen backbone, train the head) or "finetune" (train everything)."""
    head: str = field(default="cls", metadata={"choices": POOLINGS})
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
    balance: str = field(default="none", metadata={"choices": BALANCE_OPTIONS})
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
