"""Frozen-backbone feature extraction over labeled image folders, with an on-disk cache.

:func:`extract_features` resizes, centre-crops and normalises every image of a class-folder
dataset (:class:`dinov2.data.datasets.CellImageDataset`), runs the backbone in batches (bf16
autocast on CUDA, float32 on CPU) and pools its tokens:

- ``"cls"``: the class token of each of the last ``n_last_blocks`` blocks, concatenated;
- ``"avgpool"``: the mean of the patch tokens (registers excluded) of each of those blocks;
- ``"cls+avgpool"``: both, concatenated (DINOv2's linear-probe features).

Baselines (``"pixels:S"``, ``"colorstats"``, see :mod:`dinov2.eval.baselines`) and any other
``nn.Module`` without ``get_intermediate_layers`` are called directly and must return ``[B, D]``.

When ``torch.distributed`` is initialised, rank r extracts samples ``r, r + W, r + 2W, ...`` and
the shards are all-gathered back into dataset order on every rank.

With ``cache_dir``, the result is stored as ``features-<key>.npz``; the key hashes the backbone
(checkpoint path, size and mtime; or the weights themselves for an in-memory model), the data
(every file's path, size and mtime), the preprocessing, the pooling and the subsampling, so a
second call with the same inputs loads the file and never runs the model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from dinov2.data.transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from dinov2.eval.backbones import POOLINGS, backbone_signature, load_eval_backbone, pool_tokens
from dinov2.eval.baselines import is_baseline_spec
from dinov2.utils.device import resolve_device
from dinov2.utils.files import atomic_path
from dinov2.utils.signals import ignore_stop_signals

logger = logging.getLogger("dinov2")

#: Bump when the stored layout or the extraction semantics change (invalidates old caches).
CACHE_VERSION = 1
_INTERPOLATIONS = ("bicubic", "bilinear", "nearest")


# --------------------------------------------------------------------------------------------
# Data containers
# --------------------------------------------------------------------------------------------


@dataclass
class FeatureSet:
    """Features of a dataset.

    Attributes:
        features: float32 [N, D].
        labels: int64 [N] class indices (-1 for unlabeled images).
        class_names: names of the label indices.
        paths: [N] image paths.
        meta: how the features were made (backbone, preprocessing, pooling, timing).
    """

    features: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    paths: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.features = np.asarray(self.features, dtype=np.float32)
        self.labels = np.asarray(self.labels).astype(np.int64)
        self.class_names = [str(c) for c in self.class_names]
        self.paths = [str(p) for p in self.paths]
        # Plain JSON types (tuples -> lists), so a saved and reloaded set compares equal.
        self.meta = json.loads(json.dumps(self.meta, default=str))
        n = len(self.features)
        if self.features.ndim != 2 or len(self.labels) != n or len(self.paths) != n:
            raise ValueError(
                f"inconsistent FeatureSet: features {self.features.shape}, {len(self.labels)} labels, "
                f"{len(self.paths)} paths"
            )

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def is_labeled(self) -> bool:
        return bool(len(self.labels)) and bool((self.labels >= 0).all())

    def subset(self, index) -> FeatureSet:
        """The samples at ``index`` (indices or boolean mask), same classes."""
        idx = np.arange(len(self))[index]
        return FeatureSet(
            self.features[idx],
            self.labels[idx],
            self.class_names,
            [self.paths[i] for i in idx],
            dict(self.meta),
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write an ``.npz`` (no pickles) atomically; :meth:`load` reads it back."""
        path = Path(path)
        with atomic_path(path) as tmp:
            np.savez(
                tmp,
                features=self.features,
                labels=self.labels,
                class_names=np.array(self.class_names, dtype=str),
                paths=np.array(self.paths, dtype=str),
                meta=np.array(json.dumps(self.meta, default=str)),
            )
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureSet:
        """Read a file written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"feature file not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as z:
                return cls(
                    features=z["features"],
                    labels=z["labels"],
                    class_names=z["class_names"].tolist(),
                    paths=z["paths"].tolist(),
                    meta=json.loads(str(z["meta"])),
                )
        except (KeyError, ValueError, OSError) as e:
            raise ValueError(f"{path} is not a feature file written by FeatureSet.save: {e}") from e


@dataclass(frozen=True)
class Preprocessing:
    """Evaluation preprocessing: resize the short side, centre crop, ImageNet normalisation."""

    image_size: int = 224
    """Side of the centre crop fed to the model (a multiple of the patch size)."""
    resize_size: int | None = None
    """Short side after resizing; None = image_size (whole image, no border cut; DINOv2's
    ImageNet protocol uses 256 for 224)."""
    mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN
    """Per-channel normalisation mean."""
    std: tuple[float, float, float] = IMAGENET_DEFAULT_STD
    """Per-channel normalisation std."""
    interpolation: str = "bicubic"
    """Resize interpolation: bicubic, bilinear or nearest."""

    def __post_init__(self):
        if self.image_size < 1:
            raise ValueError(f"image_size must be positive, got {self.image_size}")
        if self.resize_size is not None and self.resize_size < self.image_size:
            raise ValueError(f"resize_size ({self.resize_size}) must be >= image_size ({self.image_size})")
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {_INTERPOLATIONS}, got {self.interpolation!r}")

    def transform(self):
        """The torchvision transform (PIL RGB -> normalised float tensor [3, S, S])."""
        from torchvision.transforms import InterpolationMode

        from dinov2.data.transforms import make_classification_eval_transform

        return make_classification_eval_transform(
            resize_size=self.resize_size or self.image_size,
            crop_size=self.image_size,
            interpolation=InterpolationMode(self.interpolation),
            mean=self.mean,
            std=self.std,
        )

    def crop(self):
        """The geometric part only: PIL RGB -> resized, centre-cropped PIL image [S, S]."""
        from torchvision import transforms

        return transforms.Compose(
            [
                transforms.Resize(
                    self.resize_size or self.image_size,
                    interpolation=transforms.InterpolationMode(self.interpolation),
                ),
                transforms.CenterCrop(self.image_size),
            ]
        )

    def normalize_batch(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 batch [B, S, S, 3] (channels last) -> normalised float [B, 3, S, S].

        Same arithmetic as ``transform()`` (x / 255, then (x - mean) / std), done once per batch
        on the model's device instead of once per image on the loading thread.
        """
        x = images.permute(0, 3, 1, 2).float().div_(255.0)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return x.sub_(mean).div_(std)


def image_to_uint8_hwc(image) -> torch.Tensor:
    """PIL RGB image -> uint8 tensor [H, W, 3] (no float work per image)."""
    return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True))


# --------------------------------------------------------------------------------------------
# Distributed sharding
# --------------------------------------------------------------------------------------------


def shard_indices(n: int, rank: int, world_size: int) -> np.ndarray:
    """Positions ``rank, rank + W, ...`` of ``n`` items handled by ``rank`` of ``world_size``."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world size {world_size}")
    return np.arange(rank, n, world_size)


def merge_shards(shards: Sequence[torch.Tensor], n: int) -> torch.Tensor:
    """Inverse of :func:`shard_indices`: rank r's rows go to positions r, r + W, ... of the result.

    ``shards`` may be padded at the end (all-gather needs equal sizes); padding is dropped.
    """
    world = len(shards)
    out = shards[0].new_empty((n,) + tuple(shards[0].shape[1:]))
    for r, s in enumerate(shards):
        m = len(range(r, n, world))
        out[r::world] = s[:m]
    return out


def _all_gather_rows(local: torch.Tensor, n: int, world: int) -> torch.Tensor:
    import torch.distributed as dist

    per_rank = -(-n // world)
    padded = local.new_zeros((per_rank,) + tuple(local.shape[1:]))
    padded[: len(local)] = local
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return merge_shards(gathered, n)


# --------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------


class _EvalImages(torch.utils.data.Dataset):
    """``(uint8 [S, S, 3], 1)`` for each listed sample, or ``(zeros, 0)`` when it cannot be decoded.

    CellImageDataset's ``__getitem__`` replaces a broken file by the next sample (right for
    training); for evaluation that would attach another image's features to this label, so
    broken files are flagged here and dropped from the result instead.
    """

    def __init__(self, dataset, indices: Sequence[int], transform, image_size: int):
        self.dataset, self.indices, self.transform, self.size = dataset, list(indices), transform, image_size

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> tuple[torch.Tensor, int]:
        from dinov2.data.image_io import ImageDecodeError

        try:
            return image_to_uint8_hwc(self.transform(self.dataset.load_image(self.indices[j]))), 1
        except ImageDecodeError as e:
            logger.warning("feature extraction skips an undecodable image: %s", e)
            return torch.zeros(self.size, self.size, 3, dtype=torch.uint8), 0


def _open_dataset(roots: Sequence[str], labeled: bool | None):
    """The CellImageDataset of ``roots``; with ``labeled=True`` an unlabeled layout is an error."""
    from dinov2.data.datasets import CellImageDataset

    for r in roots:
        if not Path(r).exists():
            raise FileNotFoundError(f"data folder not found: {r}")
        if not Path(r).is_dir():
            raise ValueError(f"data folder expected, got a file: {r}")
    # Auto-detect, then check here, so the message says why labels are needed.
    dataset = CellImageDataset(
        list(roots) if len(roots) > 1 else roots[0], labeled=False if labeled is False else None
    )
    if labeled and (not dataset.classes or any(t < 0 for t in dataset.targets)):
        raise ValueError(
            f"{', '.join(roots)} is not a labeled dataset, and this evaluation needs labels: give a folder "
            "holding one sub-folder of images per class (e.g. data/neutrophil/*.jpg, data/platelet/*.jpg)"
        )
    return dataset


def subsample_per_class(targets: Sequence[int], max_per_class: int | None, seed: int = 0) -> np.ndarray:
    """Sorted indices keeping at most ``max_per_class`` seeded random samples of each class."""
    y = np.asarray(targets)
    if max_per_class is None:
        return np.arange(len(y))
    if max_per_class < 1:
        raise ValueError(f"max_images_per_class must be >= 1, got {max_per_class}")
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        if len(idx) > max_per_class:
            idx = np.sort(rng.choice(idx, size=max_per_class, replace=False))
        keep.append(idx)
    return np.sort(np.concatenate(keep))


def _data_signature(paths: Sequence[str]) -> str:
    h = hashlib.sha256()
    for p in paths:
        st = os.stat(p)
        h.update(f"{os.path.abspath(p)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def cache_key(parts: dict[str, Any]) -> str:
    """Short hex digest of a JSON-serialisable description."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def extract_features(
    backbone: str | os.PathLike | nn.Module,
    data_root: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    pooling: str = "cls",
    n_last_blocks: int = 1,
    image_size: int = 224,
    resize_size: int | None = None,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    interpolation: str = "bicubic",
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    cache_dir: str | os.PathLike | None = None,
    max_images_per_class: int | None = None,
    seed: int = 0,
    labeled: bool | None = True,
    progress: bool = True,
) -> FeatureSet:
    """Features of every image under ``data_root`` from a frozen backbone.

    Args:
        backbone: checkpoint path (Meta's release, our teacher export or training checkpoint;
            architecture inferred), hub name (``"dinov2_vits14_reg"``: random init seeded by
            ``seed``; ``"dinov2_vits14_reg:WEIGHTS.pth"``), baseline (``"pixels:32"``,
            ``"colorstats"``) or an ``nn.Module``.
        data_root: one folder or several (class sub-folders of images when labeled).
        pooling: ``"cls"``, ``"avgpool"`` or ``"cls+avgpool"`` (ignored by baselines).
        n_last_blocks: pool each of the last n blocks and concatenate.
        image_size: centre-crop side (a multiple of the patch size).
        resize_size: short side before the crop (None: image_size).
        mean, std, interpolation: normalisation and resize settings.
        batch_size, num_workers: data loading.
        device: default ``cuda:<LOCAL_RANK>`` when available, else CPU.
        cache_dir: store / reuse ``features-<key>.npz`` there.
        max_images_per_class: seeded subsample of each class (None: all images).
        seed: subsampling seed and random-initialisation seed of a hub name without weights.
        labeled: True requires class folders (clear error otherwise); None auto-detects; False
            treats everything as unlabeled (labels -1).
        progress: tqdm bar over batches.

    Returns:
        :class:`FeatureSet` in dataset order (sorted class folders, sorted files).
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if n_last_blocks < 1:
        raise ValueError(f"n_last_blocks must be >= 1, got {n_last_blocks}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    prep = Preprocessing(image_size, resize_size, tuple(mean), tuple(std), interpolation)
    roots = [os.fspath(r) for r in ([data_root] if isinstance(data_root, str | os.PathLike) else data_root)]
    if not roots:
        raise ValueError("no data folder given")
    dev = resolve_device(device)
    model_sig = backbone_signature(backbone, seed)
    dataset = _open_dataset(roots, labeled)
    targets = list(dataset.targets)
    keep = subsample_per_class(targets, max_images_per_class, seed) if max_images_per_class else None
    order = np.arange(len(targets)) if keep is None else keep
    if len(order) == 0:
        raise ValueError(f"no images found under {roots}")
    all_paths = dataset.paths  # a property that builds the list: read it once
    paths = [all_paths[i] for i in order]
    is_baseline = isinstance(backbone, str) and is_baseline_spec(backbone)
    key_parts = {
        "version": CACHE_VERSION,
        "backbone": model_sig,
        "data": _data_signature(paths),
        "classes": list(dataset.classes),
        "preprocessing": asdict(prep),
        "pooling": None if is_baseline else pooling,
        "n_last_blocks": None if is_baseline else n_last_blocks,
        "autocast_bf16": dev.type == "cuda",
    }
    cache_path = Path(cache_dir) / f"features-{cache_key(key_parts)}.npz" if cache_dir is not None else None
    if cache_path is not None and cache_path.is_file():
        logger.info("feature cache hit: %s", cache_path)
        fs = FeatureSet.load(cache_path)
        fs.meta["cache"] = {"path": str(cache_path), "hit": True}
        return fs

    model = load_eval_backbone(backbone, dev, seed)
    patch = int(getattr(model, "patch_size", 1))
    if image_size % patch:
        raise ValueError(f"image_size {image_size} must be a multiple of the patch size {patch}")
    from dinov2.utils.distributed import get_global_rank, get_global_size

    rank, world = get_global_rank(), get_global_size()
    # Fewer images than ranks: every rank extracts them all (tiny), no gather needed.
    sharded = world > 1 and len(order) >= world
    local = order[shard_indices(len(order), rank, world)] if sharded else order
    loader = torch.utils.data.DataLoader(
        _EvalImages(dataset, local.tolist(), prep.crop(), image_size),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        worker_init_fn=ignore_stop_signals,
        pin_memory=dev.type == "cuda",
    )
    start = time.perf_counter()
    chunks, flags = [], []
    with torch.inference_mode():
        for images, ok in tqdm(loader, desc="features", disable=not progress or rank != 0, unit="batch"):
            images = prep.normalize_batch(images.to(dev, non_blocking=True))
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                feats = pool_tokens(model, images, pooling, n_last_blocks)
            chunks.append(feats.float())
            flags.append(ok.to(dev))
    local_feats, local_ok = torch.cat(chunks), torch.cat(flags).float()
    if sharded:
        local_feats = _all_gather_rows(local_feats, len(order), world)
        local_ok = _all_gather_rows(local_ok[:, None], len(order), world)[:, 0]
    features = local_feats.cpu().numpy()
    decoded = local_ok.cpu().numpy() > 0.5
    seconds = time.perf_counter() - start
    labels = np.asarray(targets, dtype=np.int64)[order]
    if labeled is False:
        labels = np.full(len(order), -1, dtype=np.int64)
    skipped = [p for p, ok in zip(paths, decoded) if not ok]
    if len(skipped) == len(paths):
        raise ValueError(f"none of the {len(paths)} images under {roots} could be decoded")
    fs = FeatureSet(
        features=features[decoded],
        labels=labels[decoded],
        class_names=list(dataset.classes),
        paths=[p for p, ok in zip(paths, decoded) if ok],
        meta={
            "backbone": model_sig,
            "backbone_spec": os.fspath(backbone) if not isinstance(backbone, nn.Module) else None,
            "data_roots": [str(Path(r).resolve()) for r in roots],
            "preprocessing": asdict(prep),
            "pooling": key_parts["pooling"],
            "n_last_blocks": key_parts["n_last_blocks"],
            "max_images_per_class": max_images_per_class,
            "seed": seed,
            "device": str(dev),
            "world_size": world,
            "seconds": round(seconds, 3),
            "images_per_second": round(len(order) / seconds, 2) if seconds > 0 else None,
            "skipped_undecodable": skipped,
        },
    )
    if cache_path is not None and rank == 0:
        fs.save(cache_path)
        logger.info("features cached: %s", cache_path)
    if cache_path is not None:
        fs.meta["cache"] = {"path": str(cache_path), "hit": False}
    return fs
