"""SwiGLU feed-forward network (used by DINOv2's ViT-g), with fused input projection `w12`."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLUFFN(nn.Module):
    """w3(silu(x W1) * (x W2)), with W1 and W2 stored as one matrix `w12` (first half W1).

    Args:
        in_features: input channels D.
        hidden_features: hidden channels H of the gated product (defaults to `in_features`).
        out_features: output channels (defaults to `in_features`).
        act_layer, drop: accepted for signature compatibility with `Mlp`; SwiGLU's gate is SiLU and
            it applies no dropout (as in DINOv2).
        bias: whether `w12` and `w3` have biases.

    Shapes: [..., D] -> [..., out_features]. Parameters: `w12` [2H, D], `w3` [out, H].
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: Callable[..., nn.Module] | None = None,
        drop: float = 0.0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.hidden_features = hidden_features
        self.w12 = nn.Linear(in_features, 2 * hidden_features, bias=bias)
        self.w3 = nn.Linear(hidden_features, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


def swiglu_hidden_features(hidden_features: int) -> int:
    """DINOv2's SwiGLU width: 2/3 of the MLP width (keeps the parameter count), rounded up to 8."""
    return (int(hidden_features * 2 / 3) + 7) // 8 * 8


class SwiGLUFFNFused(SwiGLUFFN):
    """`SwiGLUFFN` whose hidden width is `swiglu_hidden_features(hidden_features)` (DINOv2's
    "swiglufused" ffn_layer; the released ViT-g uses it: 4 * 1536 -> 4096).

    xformers' fused kernel is not used: its parameters have the same names and layout, and on
    CPU and with torch.compile the unfused form is what runs anyway.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: Callable[..., nn.Module] | None = None,
        drop: float = 0.0,
        bias: bool = True,
    ) -> None:
        out_features = out_features or in_features
        hidden_features = swiglu_hidden_features(hidden_features or in_features)
        super().__init__(in_features, hidden_features, out_features, act_layer, drop, bias)
