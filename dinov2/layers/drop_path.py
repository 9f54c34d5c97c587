"""Stochastic depth (Huang et al. 2016): drop a sample's whole residual branch during training."""

from __future__ import annotations

import torch
from torch import nn


def drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False) -> torch.Tensor:
    """Zero each sample of `x` (dim 0) with probability `drop_prob`, rescale survivors by 1/keep.

    Identity when not training or `drop_prob` is 0. Shape: [B, ...] -> [B, ...].
    """
    if drop_prob == 0.0 or not training:
        return x
    if not 0.0 <= drop_prob < 1.0:
        raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}")
    keep_prob = 1.0 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    keep = x.new_empty(shape).bernoulli_(keep_prob)
    return x * keep.div_(keep_prob)


class DropPath(nn.Module):
    """Module form of `drop_path` with a fixed probability."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"
