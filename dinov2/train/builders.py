"""What a training run is built from: the model, its data stream and the gradient scaler.

model = build_model(cfg, device)                       # SSLMetaArch, train mode
dataset, sampler, loader = build_data(cfg, info, start_position)
"""

from functools import partial

import torch
from omegaconf import DictConfig

from dinov2.data.augmentations import DataAugmentationDINO
from dinov2.data.collate import collate_data_and_cast
from dinov2.data.loaders import make_data_loader, make_train_dataset
from dinov2.data.masking import MaskingGenerator
from dinov2.data.samplers import ShardedInfiniteSampler
from dinov2.models import build_model_from_cfg
from dinov2.models.vision_transformer import DinoVisionTransformer
from dinov2.train.precision import crop_transfer_dtype
from dinov2.train.ssl_meta_arch import SSLMetaArch
from dinov2.utils import distributed


def build_data(cfg: DictConfig, info: distributed.DistributedInfo, start_position: int):
    """(dataset, sampler, loader) for this rank, continuing the sample stream at `start_position`."""
    augmentation = DataAugmentationDINO.from_config(cfg.crops)
    dataset = make_train_dataset(cfg.train, augmentation)
    grid = cfg.crops.global_crops_size // cfg.student.patch_size
    collate = partial(
        collate_data_and_cast,
        mask_ratio_tuple=tuple(cfg.ibot.mask_ratio_min_max),
        mask_probability=cfg.ibot.mask_sample_probability,
        dtype=crop_transfer_dtype(cfg.compute_precision, info.device.type),  # what autocast / FSDP2 use
        n_tokens=grid * grid,
        mask_generator=MaskingGenerator(input_size=(grid, grid), max_num_patches=int(0.5 * grid * grid)),
    )
    sampler = ShardedInfiniteSampler(
        len(dataset),
        cfg.train.batch_size_per_gpu,
        world_size=info.world_size,
        rank=info.rank,
        seed=cfg.train.seed,
        start_position=start_position,
    )
    loader = make_data_loader(
        dataset,
        sampler,
        collate,
        cfg.train.num_workers,
        cfg.train.seed,
        pin_memory=info.device.type == "cuda",
    )
    return dataset, sampler, loader


def build_backbones(cfg: DictConfig) -> tuple[DinoVisionTransformer, DinoVisionTransformer]:
    """(student, teacher) backbones of `cfg.student` (with its embed_dim / depth / num_heads
    overrides, if any), built by dinov2.models like every backbone of the package."""
    student, teacher, _ = build_model_from_cfg(cfg)
    return student, teacher


def build_model(cfg: DictConfig, device: torch.device) -> SSLMetaArch:
    """The SSLMetaArch of `cfg` on `device`, in train mode."""
    model = SSLMetaArch(cfg).to(device)
    model.train()
    return model


def model_uses_fp16(cfg: DictConfig) -> bool:
    """True when any student part computes in fp16 (loss scaling is then needed)."""
    return cfg.compute_precision.grad_scaler and any(
        part.mixed_precision.param_dtype == "fp16" for part in cfg.compute_precision.student.values()
    )


def build_grad_scaler(cfg: DictConfig, device: torch.device) -> torch.amp.GradScaler:
    """fp16 loss scaling, enabled only for fp16 compute on a GPU."""
    return torch.amp.GradScaler(device.type, enabled=model_uses_fp16(cfg) and device.type == "cuda")
