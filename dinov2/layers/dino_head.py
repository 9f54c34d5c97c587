"""DINO / iBOT projection head (Caron et al. 2021; Oquab et al. 2023, DINOv2).

MLP (Linear-[BN]-GELU ... -> bottleneck) -> L2 normalisation -> weight-normalised linear layer
to `out_dim` prototypes. Checkpoint keys follow DINOv2: `mlp.{i}.weight|bias`,
`last_layer.weight_g` [out_dim, 1], `last_layer.weight_v` [out_dim, bottleneck_dim].

Example:
    head = DINOHead(in_dim=384, out_dim=65536)
    logits = head(backbone_cls_tokens)   # [B, 384] -> [B, 65536]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight normalisation (Salimans & Kingma 2016):
    W = weight_g * weight_v / ||weight_v||, the norm taken per output row.

    Same parameters and names as `torch.nn.utils.weight_norm(nn.Linear(in, out, bias=False))`
    (deprecated upstream), so DINOv2 head checkpoints load unchanged.
    Shapes: [..., in_features] -> [..., out_features].
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        linear = nn.Linear(in_features, out_features, bias=False)  # torch's default init for v
        self.weight_v = nn.Parameter(linear.weight.detach().clone())
        self.weight_g = nn.Parameter(torch.linalg.vector_norm(self.weight_v.detach(), dim=1, keepdim=True))

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight [out_features, in_features]."""
        v = self.weight_v
        return v * (self.weight_g / torch.linalg.vector_norm(v, dim=1, keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def _build_mlp(
    nlayers: int, in_dim: int, bottleneck_dim: int, hidden_dim: int, use_bn: bool, bias: bool
) -> nn.Module:
    """`nlayers` linear layers in_dim -> hidden_dim ... -> bottleneck_dim with [BN] + GELU between."""
    if nlayers == 1:
        return nn.Linear(in_dim, bottleneck_dim, bias=bias)
    layers: list[nn.Module] = []
    dims = [in_dim] + [hidden_dim] * (nlayers - 1)
    for d_in, d_out in zip(dims[:-1], dims[1:]):
        layers.append(nn.Linear(d_in, d_out, bias=bias))
        if use_bn:
            layers.append(nn.BatchNorm1d(d_out))
        layers.append(nn.GELU())
    layers.append(nn.Linear(hidden_dim, bottleneck_dim, bias=bias))
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """Projection head producing prototype scores.

    Args:
        in_dim: input features (backbone embed_dim).
        out_dim: number of prototypes K.
        use_bn: BatchNorm1d after each hidden linear layer.
        nlayers: linear layers in the MLP (values < 1 are treated as 1, as in DINOv2).
        hidden_dim: MLP hidden width.
        bottleneck_dim: MLP output width (the normalised embedding).
        mlp_bias: biases in the MLP layers.

    Shapes: [B, in_dim] (or [..., in_dim] without BN) -> [..., out_dim].
    Init: MLP linear weights trunc_normal(std=0.02), biases 0; last layer v with torch's default
    linear init and g = 1 (so the effective weight rows have unit norm; g stays trainable, as in
    DINOv2).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        use_bn: bool = False,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        mlp_bias: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (("in_dim", in_dim), ("out_dim", out_dim), ("bottleneck_dim", bottleneck_dim)):
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        nlayers = max(nlayers, 1)
        if nlayers > 1 and hidden_dim <= 0:
            raise ValueError(f"hidden_dim must be positive when nlayers > 1, got {hidden_dim}")
        self.mlp = _build_mlp(nlayers, in_dim, bottleneck_dim, hidden_dim, use_bn=use_bn, bias=mlp_bias)
        self.apply(self._init_weights)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        with torch.no_grad():
            self.last_layer.weight_g.fill_(1.0)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        # fp16 cannot represent 1e-12; use a larger floor there.
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        x = F.normalize(x, dim=-1, p=2, eps=eps)
        return self.last_layer(x)
