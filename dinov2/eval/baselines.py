"""Feature baselines that need no training: downscaled raw pixels and colour statistics.

They are the floors a learned embedding must beat (a random ViT, and even 6 colour statistics,
already separate some blood-cell classes). Both are ``nn.Module``s mapping a preprocessed
(resized, centre-cropped, normalised) batch ``[B, 3, H, W]`` to features ``[B, D]``, so they go
through the same extraction, caching and protocols as a backbone. Backbone specs:

- ``"pixels:S"``: the image average-pooled to ``S x S`` and flattened (D = 3 S^2).
- ``"colorstats"``: per-channel mean and standard deviation over the pixels (D = 6).

Both work on the normalised values the ViT sees (per-channel affine transforms of RGB), which
centres them around 0 so cosine similarity is meaningful.
"""

from __future__ import annotations

import torch
from torch import nn


class PixelBaseline(nn.Module):
    """Raw pixels average-pooled to ``size x size``: ``[B, 3, H, W] -> [B, 3 * size * size]``."""

    patch_size = 1

    def __init__(self, size: int = 32):
        super().__init__()
        if size < 1:
            raise ValueError(f"pixel baseline size must be >= 1, got {size}")
        self.size = int(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.adaptive_avg_pool2d(x.float(), self.size).flatten(1)


class ColorStatsBaseline(nn.Module):
    """Per-channel mean and std over all pixels: ``[B, C, H, W] -> [B, 2C]`` (means first)."""

    patch_size = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.float().flatten(2)
        return torch.cat([flat.mean(2), flat.std(2, unbiased=False)], dim=1)


def is_baseline_spec(spec) -> bool:
    """True for the strings :func:`make_baseline` understands."""
    return isinstance(spec, str) and (spec == "colorstats" or spec.startswith("pixels"))


def make_baseline(spec: str) -> nn.Module:
    """Baseline module for ``"pixels:S"`` (``"pixels"`` = 32) or ``"colorstats"``."""
    if spec == "colorstats":
        return ColorStatsBaseline()
    if spec == "pixels":
        return PixelBaseline(32)
    if spec.startswith("pixels:"):
        value = spec.split(":", 1)[1]
        if not value.isdigit() or int(value) < 1:
            raise ValueError(
                f"baseline {spec!r}: expected 'pixels:S' with S a positive integer, e.g. pixels:32"
            )
        return PixelBaseline(int(value))
    raise ValueError(f"unknown baseline {spec!r}; expected 'pixels:S' or 'colorstats'")
