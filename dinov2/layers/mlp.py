"""Two-layer feed-forward network of a transformer block (DINOv2's `Mlp`)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class Mlp(nn.Module):
    """fc1 -> activation -> dropout -> fc2 -> dropout, applied token-wise.

    Args:
        in_features: input channels D.
        hidden_features: hidden channels (defaults to `in_features`).
        out_features: output channels (defaults to `in_features`).
        act_layer: activation module class (GELU in DINOv2).
        drop: dropout probability after each layer.
        bias: whether fc1 and fc2 have biases.

    Shapes: [..., in_features] -> [..., out_features].
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: Callable[..., nn.Module] = nn.GELU,
        drop: float = 0.0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.act(self.fc1(x)))
        return self.drop(self.fc2(x))
