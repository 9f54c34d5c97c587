"""Per-channel learned residual scaling (LayerScale, Touvron et al. 2021 "Going deeper with image
transformers"), as used by DINOv2 with init 1e-5."""

from __future__ import annotations

import torch
from torch import nn


class LayerScale(nn.Module):
    """x * gamma with `gamma` [dim] initialised to `init_values`.

    Args:
        dim: channels D.
        init_values: initial value of every gamma entry.
        inplace: multiply in place (saves memory; not usable when x is needed for backward).
    """

    def __init__(self, dim: int, init_values: float | torch.Tensor = 1e-5, inplace: bool = False) -> None:
        super().__init__()
        self.inplace = inplace
        self.init_values = init_values
        self.gamma = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if isinstance(self.init_values, torch.Tensor):
                self.gamma.copy_(self.init_values.expand_as(self.gamma))
            else:
                # fill_, unlike a broadcast multiply, also runs cheaply on the meta device
                self.gamma.fill_(float(self.init_values))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mul_(self.gamma) if self.inplace else x * self.gamma
