"""Pre-norm transformer block of DINOv2's ViT, with stochastic depth and a packed multi-crop path.

x <- x + ls1(attn(norm1(x)));  x <- x + ls2(mlp(norm2(x)))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from dinov2.layers.attention import Attention
from dinov2.layers.drop_path import DropPath
from dinov2.layers.layer_scale import LayerScale
from dinov2.layers.mlp import Mlp

ResidualFn = Callable[[torch.Tensor], torch.Tensor]


def drop_add_residual_stochastic_depth(
    x: torch.Tensor, residual_func: ResidualFn, sample_drop_ratio: float = 0.0
) -> torch.Tensor:
    """x + residual with stochastic depth, computing the residual only for the kept samples.

    A random subset of max(int(B * (1 - ratio)), 1) samples gets the residual, scaled by
    B / subset size so its expectation matches; the other samples pass through unchanged. This
    saves the branch's compute for dropped samples (DINOv2 uses it when ratio > 0.1).
    x: [B, N, C]; returns [B, N, C].
    """
    b = x.shape[0]
    subset_size = max(int(b * (1 - sample_drop_ratio)), 1)
    keep = torch.randperm(b, device=x.device)[:subset_size]
    residual = residual_func(x[keep])
    out = torch.index_add(x.flatten(1), 0, keep, residual.flatten(1).to(x.dtype), alpha=b / subset_size)
    return out.view_as(x)


class Block(nn.Module):
    """One transformer block (DINOv2 `Block`; parameter names norm1, attn, ls1, norm2, mlp, ls2).

    Args:
        dim: channels C.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / C.
        qkv_bias, proj_bias, ffn_bias: biases of the q/k/v, attention output and MLP layers.
        drop: dropout in the MLP and after the attention projection.
        attn_drop: dropout on attention probabilities.
        init_values: LayerScale init (None or 0 disables LayerScale).
        drop_path: stochastic-depth probability of each residual branch.
        act_layer: MLP activation class; norm_layer: normalisation class (called with dim).
        attn_class: attention class; ffn_layer: feed-forward class (Mlp, SwiGLUFFNFused, ...).

    Shapes: [B, N, C] -> [B, N, C].
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        init_values: float | None = None,
        drop_path: float = 0.0,
        act_layer: Callable[..., nn.Module] = nn.GELU,
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
        attn_class: Callable[..., nn.Module] = Attention,
        ffn_layer: Callable[..., nn.Module] = Mlp,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = attn_class(
            dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            proj_bias=proj_bias,
            attn_drop=attn_drop,
            proj_drop=drop,
        )
        self.ls1 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = ffn_layer(
            in_features=dim,
            hidden_features=int(dim * mlp_ratio),
            act_layer=act_layer,
            drop=drop,
            bias=ffn_bias,
        )
        self.ls2 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.sample_drop_ratio = drop_path

    def attn_residual(self, x: torch.Tensor) -> torch.Tensor:
        return self.ls1(self.attn(self.norm1(x)))

    def ffn_residual(self, x: torch.Tensor) -> torch.Tensor:
        return self.ls2(self.mlp(self.norm2(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.sample_drop_ratio > 0.1:
            # Skipping dropped samples pays for the gather/scatter only at larger drop rates.
            x = drop_add_residual_stochastic_depth(x, self.attn_residual, self.sample_drop_ratio)
            return drop_add_residual_stochastic_depth(x, self.ffn_residual, self.sample_drop_ratio)
        x = x + self.drop_path1(self.attn_residual(x))
        return x + self.drop_path2(self.ffn_residual(x))


def _pack(xs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """[B_i, N_i, C] tensors -> ([sum B_i N_i, C], [(B_i, N_i)])."""
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]), [(x.shape[0], x.shape[1]) for x in xs]


def _unpack(packed: torch.Tensor, shapes: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
    parts = packed.split([b * n for b, n in shapes])
    return [p.view(b, n, -1) for p, (b, n) in zip(parts, shapes)]


class NestedTensorBlock(Block):
    """`Block` that also takes a list of tensors [B_i, N_i, C] of different token counts (global and
    local crops) and returns the list of results, each equal to `Block.forward` on that tensor.

    The list is packed into one [sum B_i N_i, C] tensor so norms, projections and MLP run as one
    large matmul each; attention runs per tensor (see `Attention.forward_packed`). Stochastic depth
    draws samples independently in each tensor, as separate calls would.
    """

    def _attn_residual_packed(self, packed: torch.Tensor, shapes: Sequence[tuple[int, int]]) -> torch.Tensor:
        return self.ls1(self.attn.forward_packed(self.norm1(packed), shapes))

    def _ffn_residual_packed(self, packed: torch.Tensor, shapes: Sequence[tuple[int, int]]) -> torch.Tensor:
        return self.ls2(self.mlp(self.norm2(packed)))

    def _add_subset_residual(self, xs: list[torch.Tensor], residual_packed) -> list[torch.Tensor]:
        """Packed form of `drop_add_residual_stochastic_depth` over every tensor of `xs`."""
        keeps = []
        for x in xs:
            subset = max(int(x.shape[0] * (1 - self.sample_drop_ratio)), 1)
            keeps.append(torch.randperm(x.shape[0], device=x.device)[:subset])
        packed, shapes = _pack([x[keep] for x, keep in zip(xs, keeps)])
        residuals = _unpack(residual_packed(packed, shapes), shapes)
        out = []
        for x, keep, res in zip(xs, keeps, residuals):
            scale = x.shape[0] / keep.numel()
            out.append(
                torch.index_add(x.flatten(1), 0, keep, res.flatten(1).to(x.dtype), alpha=scale).view_as(x)
            )
        return out

    def _drop_path_packed(self, residual: torch.Tensor, shapes: Sequence[tuple[int, int]]) -> torch.Tensor:
        """Per-sample drop path on a packed residual (each sample's tokens share one coin)."""
        keep_prob = 1.0 - self.sample_drop_ratio
        n_per_sample = torch.tensor([n for b, n in shapes for _ in range(b)], device=residual.device)
        keep = residual.new_empty(n_per_sample.numel()).bernoulli_(keep_prob).div_(keep_prob)
        return residual * keep.repeat_interleave(n_per_sample).unsqueeze(-1)

    def forward_nested(self, x_list: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if self.training and self.sample_drop_ratio > 0.1:
            xs = self._add_subset_residual(list(x_list), self._attn_residual_packed)
            return self._add_subset_residual(xs, self._ffn_residual_packed)
        packed, shapes = _pack(x_list)
        if self.training and self.sample_drop_ratio > 0.0:
            packed = packed + self._drop_path_packed(self._attn_residual_packed(packed, shapes), shapes)
            packed = packed + self._drop_path_packed(self._ffn_residual_packed(packed, shapes), shapes)
        else:
            packed = packed + self._attn_residual_packed(packed, shapes)
            packed = packed + self._ffn_residual_packed(packed, shapes)
        return _unpack(packed, shapes)

    def forward(self, x_or_x_list: torch.Tensor | Sequence[torch.Tensor]):
        if isinstance(x_or_x_list, torch.Tensor):
            return super().forward(x_or_x_list)
        if isinstance(x_or_x_list, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in x_or_x_list):
            return self.forward_nested(x_or_x_list)
        raise ValueError(f"expected a tensor or a list of tensors, got {type(x_or_x_list).__name__}")
