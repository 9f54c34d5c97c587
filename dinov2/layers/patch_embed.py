"""Image -> sequence of patch embeddings (a strided convolution), as in DINOv2."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def make_2tuple(x: int | tuple[int, int]) -> tuple[int, int]:
    """Return `x` as an (int, int) pair; a single int is used for both sides."""
    if isinstance(x, tuple):
        if len(x) != 2:
            raise ValueError(f"expected an int or a pair of ints, got {x!r}")
        return x
    if not isinstance(x, int):
        raise ValueError(f"expected an int or a pair of ints, got {x!r}")
    return (x, x)


class PatchEmbed(nn.Module):
    """Split an image into non-overlapping patches and project each one to `embed_dim`.

    Args:
        img_size: training image size (sets `num_patches`, the length of the learned position grid).
        patch_size: side of one square (or (h, w)) patch in pixels.
        in_chans: image channels.
        embed_dim: output channels per patch.
        norm_layer: optional normalisation applied to the patch tokens (identity by default).
        flatten_embedding: return [B, N, D] (True) or [B, H/p, W/p, D] (False).

    Shapes: input [B, C, H, W] with H, W multiples of the patch size; output [B, H/p * W/p, D]
    with patches in row-major order.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        norm_layer: Callable[[int], nn.Module] | None = None,
        flatten_embedding: bool = True,
    ) -> None:
        super().__init__()
        image_hw = make_2tuple(img_size)
        patch_hw = make_2tuple(patch_size)
        if image_hw[0] % patch_hw[0] or image_hw[1] % patch_hw[1]:
            raise ValueError(f"img_size {image_hw} must be a multiple of patch_size {patch_hw}")
        self.img_size = image_hw
        self.patch_size = patch_hw
        self.patches_resolution = (image_hw[0] // patch_hw[0], image_hw[1] // patch_hw[1])
        self.num_patches = self.patches_resolution[0] * self.patches_resolution[1]
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.flatten_embedding = flatten_embedding
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_hw, stride=patch_hw)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected images of shape [B, {self.in_chans}, H, W], got {tuple(x.shape)}")
        _, _, h, w = x.shape
        ph, pw = self.patch_size
        if h % ph or w % pw:
            raise ValueError(
                f"image size {h}x{w} is not a multiple of the patch size {ph}x{pw}; "
                "crop or resize the input to a multiple of the patch size"
            )
        x = self.proj(x)  # [B, D, H/p, W/p]
        gh, gw = x.shape[-2:]
        x = self.norm(x.flatten(2).transpose(1, 2))  # [B, N, D], row-major patches
        if not self.flatten_embedding:
            x = x.reshape(-1, gh, gw, self.embed_dim)
        return x
