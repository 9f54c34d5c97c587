"""Backbone + linear head classifier, its preprocessing, optimiser groups and checkpoint format.

Used by `dinov2-finetune` (training, `dinov2/transfer/finetune.py`) and `dinov2-infer` (prediction,
`dinov2/transfer/infer.py`). A classifier checkpoint (``best.pth``) is self-contained: it holds the
full state dict (backbone and head), the backbone's constructor arguments, the head layout, the
class names and the preprocessing, so `load_classifier` rebuilds the model without the original
backbone file.

Example::

    backbone = load_backbone("teacher_checkpoint.pth")
    model = BackboneClassifier(backbone, num_classes=8, pooling="cls+avgpool")
    logits = model(images)                       # images: [B, 3, H, W] normalised
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision import transforms

from dinov2.data.transforms import MaybeToTensor, make_normalize_transform
from dinov2.eval.backbones import pool_tokens
from dinov2.eval.features import FeatureSet, Preprocessing, extract_features
from dinov2.models.block_layout import convert_block_layout
from dinov2.models.vision_transformer import DinoVisionTransformer
from dinov2.models.weights import backbone_config

POOLINGS = ("cls", "cls+avgpool")
CHECKPOINT_FORMAT = "dinov2-cells-classifier"
CHECKPOINT_VERSION = 1


# ----------------------------------------------------------------------------------------------
# Preprocessing
# ----------------------------------------------------------------------------------------------


class RandomRot90:
    """Rotate a tensor image [..., H, W] by k * 90 degrees with k uniform in {0, 1, 2, 3}.

    Cells on a slide have no preferred orientation, so all four right-angle rotations are valid
    training views (and, unlike arbitrary angles, need no interpolation or padding). Uses the global
    torch RNG so seeding torch makes it reproducible.
    """

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        k = int(torch.randint(0, 4, ()).item())
        return torch.rot90(img, k, dims=(-2, -1)) if k else img

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}()"


def make_train_transform(
    prep: Preprocessing, crop_scale: tuple[float, float] = (0.8, 1.0), color_jitter: float = 0.1
) -> transforms.Compose:
    """Training augmentation at ``prep``'s size and normalisation: random resized crop, horizontal
    and vertical flips, 90-degree rotations, mild colour jitter, then normalisation.

    ``crop_scale`` is much narrower than ImageNet's (0.08, 1). Cell images are taken at a fixed
    magnification, so a cell's apparent size is itself a class cue (platelets and lymphocytes are
    small, monocytes large) that strong zooming destroys: on PBC (64 px, 3 fine-tuning epochs from
    a random init) test balanced accuracy was 0.45 with (0.8, 1) against 0.31 with (0.35, 1).
    ``color_jitter`` is the brightness/contrast/saturation strength (hue gets a fifth of it),
    applied with probability 0.8; 0 disables it.
    """
    steps: list[Any] = [
        transforms.RandomResizedCrop(
            prep.image_size, scale=crop_scale, interpolation=transforms.InterpolationMode.BICUBIC
        ),
        transforms.RandomHorizontalFlip(),
        transforms.RandomVerticalFlip(),
    ]
    if color_jitter > 0:
        jitter = transforms.ColorJitter(color_jitter, color_jitter, color_jitter, color_jitter / 5)
        steps.append(transforms.RandomApply([jitter], p=0.8))
    steps += [MaybeToTensor(), RandomRot90(), make_normalize_transform(prep.mean, prep.std)]
    return transforms.Compose(steps)


def make_eval_transform(prep: Preprocessing) -> transforms.Compose:
    """Deterministic evaluation preprocessing: resize shorter side, centre crop, normalise."""
    return prep.transform()


def preprocessing_for(image_size: int, crop_pct: float = 1.0) -> Preprocessing:
    """Evaluation `Preprocessing` whose centre crop keeps ``crop_pct`` of the resized image side
    (1.0: resize straight to ``image_size``; 0.875: DINOv2's ImageNet 256 -> 224 protocol)."""
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    return Preprocessing(image_size=image_size, resize_size=int(math.floor(image_size / crop_pct + 1e-6)))


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


def head_input_dim(embed_dim: int, pooling: str) -> int:
    """Feature size the head receives for a backbone of width ``embed_dim``.

    ``"cls"``: the normalised class token [B, D]; ``"cls+avgpool"``: class token concatenated with
    the mean normalised patch token [B, 2D] (DINOv2's linear-evaluation features), computed by
    `dinov2.eval.backbones.pool_tokens` so the fine-tune and embedding-evaluation tools agree.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    return embed_dim * (2 if pooling == "cls+avgpool" else 1)


class LinearClassifierHead(nn.Module):
    """One linear layer mapping pooled features [B, in_dim] to class logits [B, num_classes].

    Weights start from N(0, 0.01^2) and biases from zero, as in DINOv2's linear evaluation, so the
    initial predictions are near-uniform whatever the feature scale.
    """

    def __init__(self, in_dim: int, num_classes: int):
        super().__init__()
        if in_dim <= 0 or num_classes < 2:
            raise ValueError(f"need in_dim > 0 and num_classes >= 2, got {in_dim}, {num_classes}")
        self.linear = nn.Linear(in_dim, num_classes)
        nn.init.normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features)


class BackboneClassifier(nn.Module):
    """A DINOv2 backbone followed by a `LinearClassifierHead` on pooled tokens.

    Args:
        backbone: a `DinoVisionTransformer` (anything with ``get_intermediate_layers``, ``embed_dim``).
        num_classes: number of output logits.
        pooling: "cls" or "cls+avgpool" (see `pool_features`).
        freeze_backbone: linear-probe mode: backbone parameters get ``requires_grad=False``, the
            backbone stays in eval mode even under ``model.train()`` (no drop-path), and its
            forward runs without autograd.
    """

    def __init__(
        self, backbone: nn.Module, num_classes: int, pooling: str = "cls", freeze_backbone: bool = False
    ):
        super().__init__()
        self.backbone = backbone
        self.pooling = pooling
        self.head = LinearClassifierHead(head_input_dim(backbone.embed_dim, pooling), num_classes)
        self.freeze_backbone = freeze_backbone
        if freeze_backbone:
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    def train(self, mode: bool = True) -> BackboneClassifier:
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()
        return self

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features [B, head.in_dim] of normalised images [B, 3, H, W]."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_backbone):
            return pool_tokens(self.backbone, images, self.pooling)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def classifier_features(
    model: BackboneClassifier,
    prep: Preprocessing,
    folder: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    max_images_per_class: int | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> FeatureSet:
    """What ``model``'s head receives for every image of the labeled tree ``folder``: its frozen
    backbone's features with the classifier's own preprocessing and pooling, through
    `extract_features` and its cache.

    `dinov2-finetune --cache-features` and the web app's reference set both read features here, so
    they share cache files (the key covers backbone weights, files, preprocessing and pooling).
    """
    return extract_features(
        model.backbone,
        os.fspath(folder),
        pooling=model.pooling,
        image_size=prep.image_size,
        resize_size=prep.resize_size,
        mean=prep.mean,
        std=prep.std,
        interpolation=prep.interpolation,
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        cache_dir=cache_dir,
        max_images_per_class=max_images_per_class,
        labeled=True,
        progress=progress,
    )


# ----------------------------------------------------------------------------------------------
# Optimiser parameter groups
# ----------------------------------------------------------------------------------------------


def vit_layer_id(name: str, n_blocks: int) -> int:
    """Depth index of a backbone parameter for layer-wise lr decay.

    Embeddings (patch embedding, position embedding, class/register/mask tokens) are layer 0,
    ``blocks.i`` (or chunked ``blocks.c.i``) is layer ``i + 1``, everything after the blocks (the
    final norm) is ``n_blocks + 1``.
    """
    parts = name.split(".")
    if parts[0] in ("patch_embed", "pos_embed", "cls_token", "register_tokens", "mask_token"):
        return 0
    if parts[0] == "blocks":
        # Chunked layout (FSDP wrapping): blocks.<chunk>.<global index>.*; the deepest number wins.
        indices = [int(p) for p in parts[1:3] if p.isdigit()]
        return indices[-1] + 1
    return n_blocks + 1


def _no_weight_decay(name: str, param: torch.Tensor) -> bool:
    # Biases, norm scales, LayerScale gammas and the learned tokens/embeddings are not decayed.
    return param.ndim <= 1 or name.endswith(("pos_embed", "cls_token", "register_tokens", "mask_token"))


def classifier_param_groups(
    model: BackboneClassifier,
    lr: float,
    weight_decay: float,
    backbone_lr_mult: float = 0.1,
    layer_decay: float = 1.0,
) -> list[dict[str, Any]]:
    """AdamW parameter groups with a lower backbone lr and layer-wise lr decay.

    Head parameters get ``lr``; a backbone parameter at depth ``l`` (see `vit_layer_id`) gets
    ``lr * backbone_lr_mult * layer_decay ** (n_blocks + 1 - l)``, so the final norm trains at
    ``lr * backbone_lr_mult`` and the patch embedding slowest. Parameters with
    ``requires_grad=False`` are left out. Each group records ``"lr"`` and the ``"name"`` of its
    first parameter for logging.
    """
    if not (lr > 0 and weight_decay >= 0 and backbone_lr_mult >= 0 and 0 < layer_decay <= 1):
        raise ValueError(
            f"need lr > 0, weight_decay >= 0, backbone_lr_mult >= 0, 0 < layer_decay <= 1; got lr={lr}, "
            f"weight_decay={weight_decay}, backbone_lr_mult={backbone_lr_mult}, layer_decay={layer_decay}"
        )
    n_blocks = int(model.backbone.n_blocks)
    groups: dict[tuple[float, float], dict[str, Any]] = {}

    def add(name: str, param: torch.Tensor, group_lr: float) -> None:
        wd = 0.0 if _no_weight_decay(name, param) else weight_decay
        group = groups.setdefault(
            (group_lr, wd), {"params": [], "lr": group_lr, "weight_decay": wd, "name": name}
        )
        group["params"].append(param)

    for name, param in model.backbone.named_parameters():
        if param.requires_grad:
            depth = vit_layer_id(name, n_blocks)
            add(f"backbone.{name}", param, lr * backbone_lr_mult * layer_decay ** (n_blocks + 1 - depth))
    for name, param in model.head.named_parameters():
        if param.requires_grad:
            add(f"head.{name}", param, lr)
    return list(groups.values())


def balanced_class_weights(targets: Sequence[int] | np.ndarray, num_classes: int) -> torch.Tensor:
    """Inverse-frequency class weights ``n_samples / (n_present * count_c)``, float32 [num_classes].

    This is scikit-learn's ``class_weight="balanced"`` over the ``n_present`` classes that occur in
    ``targets`` (each present class then carries the same total weight, and the weights of an
    already balanced set are 1); a class absent from ``targets`` gets weight 0.
    """
    counts = np.bincount(np.asarray(targets, dtype=np.int64), minlength=num_classes).astype(np.float64)
    if counts.sum() == 0:
        raise ValueError("cannot compute class weights of an empty target list")
    if len(counts) > num_classes:
        raise ValueError(f"targets go up to {len(counts) - 1} but num_classes={num_classes}")
    present = np.count_nonzero(counts)
    weights = np.where(counts > 0, counts.sum() / (present * np.maximum(counts, 1)), 0.0)
    return torch.as_tensor(weights, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------


def classifier_checkpoint(
    model: BackboneClassifier,
    classes: Sequence[str],
    preprocessing: Preprocessing,
    **extra: Any,
) -> dict[str, Any]:
    """The self-contained checkpoint dict that `load_classifier` reads.

    Keys: ``format``/``version``, ``model`` (full state dict: ``backbone.*`` in the flat block layout
    and ``head.*``), ``backbone_arch`` (`DinoVisionTransformer` constructor arguments from
    `dinov2.models.weights.backbone_config`), ``head`` (pooling, in_dim, num_classes), ``classes``,
    ``preprocessing`` (image_size, resize_size, mean, std, interpolation) and ``extra`` items. Only
    tensors and plain types, so it loads with ``torch.load(weights_only=True)``.
    """
    if len(classes) != model.head.linear.out_features:
        raise ValueError(
            f"{len(classes)} class names for a head with {model.head.linear.out_features} outputs"
        )
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "model": {k: v.detach().cpu() for k, v in convert_block_layout(model.state_dict(), 0).items()},
        "backbone_arch": backbone_config(model.backbone),
        "head": {
            "pooling": model.pooling,
            "in_dim": model.head.linear.in_features,
            "num_classes": len(classes),
        },
        "classes": list(classes),
        "preprocessing": {
            k: list(v) if isinstance(v, tuple) else v for k, v in asdict(preprocessing).items()
        },
        **extra,
    }


def read_classifier_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load and validate a classifier checkpoint dict (raises FileNotFoundError / ValueError)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"classifier checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which and why
        raise ValueError(f"cannot read classifier checkpoint {path}: {e}") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{path} is not a classifier checkpoint (expected a best.pth written by dinov2-finetune)"
        )
    missing = [k for k in ("model", "backbone_arch", "head", "classes", "preprocessing") if k not in ckpt]
    if missing:
        raise ValueError(f"classifier checkpoint {path} lacks keys {missing}")
    return ckpt


def load_classifier(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[BackboneClassifier, list[str], Preprocessing]:
    """Rebuild a trained classifier from its checkpoint.

    Returns:
        (model in eval mode on ``device``, class names, preprocessing).
    """
    ckpt = read_classifier_checkpoint(path)
    try:
        backbone = DinoVisionTransformer(**ckpt["backbone_arch"])
        head = ckpt["head"]
        model = BackboneClassifier(
            backbone, head["num_classes"], pooling=head["pooling"], freeze_backbone=True
        )
        model.load_state_dict(ckpt["model"], strict=True)
        prep = dict(ckpt["preprocessing"])
        preprocessing = Preprocessing(**{**prep, "mean": tuple(prep["mean"]), "std": tuple(prep["std"])})
    except (TypeError, KeyError, RuntimeError) as e:  # inconsistent or hand-edited checkpoint
        raise ValueError(f"classifier checkpoint {path} is inconsistent: {e}") from e
    return model.to(device).eval(), list(ckpt["classes"]), preprocessing
