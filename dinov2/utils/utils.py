"""Small helpers usable by every stage (DINOv2's dinov2.utils.utils path).

``CosineScheduler`` lives in dinov2.train.schedules (it belongs to training); it is re-exported here
lazily, through the module ``__getattr__``, so importing dinov2.utils never imports dinov2.train.
"""

import random
from typing import Any

import numpy as np
import torch

__all__ = ["CosineScheduler", "fix_random_seeds", "seed_host_rngs"]  # noqa: F822 (CosineScheduler comes from __getattr__)


def fix_random_seeds(seed: int = 31) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch (CPU and every CUDA device).

    The one seeding function of the package. ``seed`` may be any integer in [0, 2**64) (torch's
    range; per-epoch seeds derived from a run's seed are that large); NumPy's legacy generator
    takes 32 bits, so it gets ``seed % 2**32``.
    """
    seed_host_rngs(seed)
    torch.cuda.manual_seed_all(seed)


def seed_host_rngs(seed: int) -> None:
    """Seed the host's generators only: Python's ``random``, NumPy's global one and torch's CPU one
    (data workers and scoped seeding, which must leave a GPU's generator alone)."""
    if not 0 <= int(seed) < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def __getattr__(name: str) -> Any:
    if name == "CosineScheduler":
        from dinov2.train.schedules import CosineScheduler

        return CosineScheduler
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
