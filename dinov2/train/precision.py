"""The compute precision a training run can use on its device, decided once at start-up.

bf16 (the default) needs tensor cores that have it: NVIDIA compute capability 8.0 (A100) or newer.
Older GPUs (V100 is 7.0, T4 7.5) emulate bf16 matmuls at a fraction of their fp16 speed, so there
the run computes in fp16 with loss scaling (`compute_precision.grad_scaler`) instead, as Meta's
DINOv2 does. fp16 on a device without fp16 kernels (the CPU) is a configuration error.

Usage:
    capability = torch.cuda.get_device_capability(device)        # e.g. (7, 0)
    resolve_compute_dtype("bf16", "cuda", capability)             # -> "fp16"
    apply_device_precision(cfg, device)                           # rewrites cfg.compute_precision
"""

from __future__ import annotations

import logging

import torch
from omegaconf import DictConfig

from dinov2.utils.config import ConfigError

logger = logging.getLogger("dinov2")

# First compute capability with bf16 tensor cores (Ampere).
BF16_MIN_CAPABILITY = (8, 0)
PARTS = ("backbone", "dino_head", "ibot_head")


def resolve_compute_dtype(requested: str, device_type: str, capability: tuple[int, int] | None) -> str:
    """The param/compute dtype ("fp32", "fp16" or "bf16") to use for `requested` on a device.

    Args:
        requested: the configured `mixed_precision.param_dtype`.
        device_type: "cuda", "cpu", ...
        capability: the CUDA compute capability (major, minor); None for other devices.

    Raises:
        ValueError: fp16 requested on a device that is not CUDA.
    """
    if requested == "fp16" and device_type != "cuda":
        raise ValueError(f"fp16 needs a CUDA GPU, this process runs on {device_type}; use bf16 or fp32")
    if requested == "bf16" and device_type == "cuda" and capability is not None:
        if tuple(capability) < BF16_MIN_CAPABILITY:
            return "fp16"
    return requested


def apply_device_precision(
    cfg: DictConfig, device: torch.device, capability: tuple[int, int] | None = None
) -> bool:
    """Rewrite `cfg.compute_precision` for `device`; True when bf16 was replaced by fp16.

    Every part's `mixed_precision.param_dtype` goes through `resolve_compute_dtype`; when bf16 had
    to become fp16 the grad scaler is switched on and one log line says so. `capability` defaults to
    the device's own (CUDA only).

    Raises:
        ConfigError: naming the key, for a dtype the device cannot compute in.
    """
    if capability is None and device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
    switched = []
    for who in ("student", "teacher"):
        for part in PARTS:
            mp = cfg.compute_precision[who][part].mixed_precision
            key = f"compute_precision.{who}.{part}.mixed_precision.param_dtype"
            try:
                dtype = resolve_compute_dtype(str(mp.param_dtype), device.type, capability)
            except ValueError as e:
                raise ConfigError(f"{key}={mp.param_dtype}: {e}") from None
            if dtype != mp.param_dtype:
                switched.append(key)
                mp.param_dtype = dtype
    if switched:
        cfg.compute_precision.grad_scaler = True
        logger.info(
            "GPU %s (compute capability %d.%d) has no bf16 tensor cores: computing in fp16 with the grad "
            "scaler (param_dtype bf16 -> fp16 for %d parts, compute_precision.grad_scaler=true)",
            device,
            *capability,
            len(switched),
        )
    return bool(switched)


def crop_transfer_dtype(precision_cfg: DictConfig, device_type: str) -> torch.dtype:
    """The dtype the data loader collates crops in: what both backbones compute in, on a GPU
    (`precision_cfg` is cfg.compute_precision).

    The backbones' first operation (the patch embedding) casts its input to the compute dtype under
    autocast, and FSDP2 casts forward inputs to its `param_dtype`: collating in that dtype already is
    the same rounding done on the host, so the result is bit-identical while the host-to-device copy
    is half the size (68 MB -> 34 MB per step at batch 32 of ViT-L crops). float32 otherwise: on the
    CPU (no autocast), or when the two backbones compute in different dtypes.
    """
    if device_type != "cuda":
        return torch.float32
    backbones = (precision_cfg[who].backbone for who in ("student", "teacher"))
    dtypes = {str(part.mixed_precision.param_dtype) for part in backbones}
    if dtypes == {"bf16"}:
        return torch.bfloat16
    if dtypes == {"fp16"}:
        return torch.float16
    return torch.float32
