"""Which device a tool runs on, and the matching autocast: one answer for every command.

``None`` and ``"auto"`` mean "the accelerator this process should use": ``cuda:<LOCAL_RANK>`` (so
each torchrun process takes its own GPU; ``cuda:0`` in a plain process) when CUDA is available,
otherwise the CPU. Anything else is parsed by `torch.device` and checked, so a typo or a CUDA
request on a machine without CUDA fails at once with the value named instead of deep in a kernel.

Example::

    dev = resolve_device(args.device)        # "auto", "cpu", "cuda", "cuda:1", None
    with autocast_for(dev):
        logits = model(images.to(dev))
"""

from __future__ import annotations

import contextlib

import torch

from dinov2.utils.distributed import get_local_rank


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The `torch.device` meant by ``device`` (see the module docstring).

    Raises:
        ValueError: an unknown device string, or a CUDA device when CUDA is not available.
    """
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", get_local_rank() % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r} (expected auto, cpu, cuda or cuda:N)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return dev


def autocast_for(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; full float32 elsewhere (CPU bf16 is slow and changes results)."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
