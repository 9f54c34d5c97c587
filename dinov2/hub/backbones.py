"""torch.hub constructors for DINOv2's released backbones, loading weights from a local file.

Same names as Meta's hub (`dinov2_vits14`, ..., `dinov2_vitg14_reg`) and the released models'
hyper-parameters (518 px position grid, patch 14, LayerScale, SwiGLU for ViT-g, 4 registers and
antialiased offset-free interpolation for `_reg`). Nothing is downloaded: pass
`pretrained_weights=PATH` (Meta's `.pth`, our export or training checkpoint); without it the model
is randomly initialised and a warning is logged.

Example:
    model = torch.hub.load(REPO_DIR, "dinov2_vitl14_reg", source="local",
                           pretrained_weights="dinov2_vitl14_reg4_pretrain.pth")
"""

from __future__ import annotations

from typing import Any

from dinov2.models.vision_transformer import DinoVisionTransformer
from dinov2.models.weights import PathLike, load_backbone


def _make_dinov2_model(
    name: str, pretrained_weights: PathLike | None = None, pretrained: bool | None = None, **kwargs: Any
) -> DinoVisionTransformer:
    """Build released model `name`; `pretrained=True` without a path is an error (offline), and
    `pretrained=False` ignores no weights but skips the random-init warning."""
    if pretrained and pretrained_weights is None:
        raise ValueError(
            f"{name}: pretrained=True needs pretrained_weights=PATH (weights are never downloaded); "
            "download Meta's file once and pass its path"
        )
    if pretrained is False and pretrained_weights is None:
        from dinov2.models.vision_transformer import make_released_backbone

        return make_released_backbone(name, **kwargs).eval()
    return load_backbone(name, device=None, pretrained_weights=pretrained_weights, **kwargs)


def dinov2_vits14(*, pretrained_weights: PathLike | None = None, **kwargs: Any) -> DinoVisionTransformer:
    """DINOv2 ViT-S/14 (21M parameters)."""
    return _make_dinov2_model("dinov2_vits14", pretrained_weights, **kwargs)


def dinov2_vitb14(*, pretrained_weights: PathLike | None = None, **kwargs: Any) -> DinoVisionTransformer:
    """DINOv2 ViT-B/14 (86M parameters)."""
    return _make_dinov2_model("dinov2_vitb14", pretrained_weights, **kwargs)


def dinov2_vitl14(*, pretrained_weights: PathLike | None = None, **kwargs: Any) -> DinoVisionTransformer:
    """DINOv2 ViT-L/14 (300M parameters)."""
    return _make_dinov2_model("dinov2_vitl14", pretrained_weights, **kwargs)


def dinov2_vitg14(*, pretrained_weights: PathLike | None = None, **kwargs: Any) -> DinoVisionTransformer:
    """DINOv2 ViT-g/14 (1.1B parameters, SwiGLU feed-forward)."""
    return _make_dinov2_model("dinov2_vitg14", pretrained_weights, **kwargs)


def dinov2_vits14_reg(*, pretrained_weights: PathLike | None = None, **kwargs: Any) -> DinoVisionTransformer:
    """DINOv2 ViT-S/14 with 4 register tokens."""
    return _make_dinov2_model("dinov2_vits14_reg", pretrained_weights, **kwargs)


def dinov2_vitb14_reg(*, pretrained_weights: PathLike | None = None, **kwargs: Any) -> DinoVisionTransformer:
    """DINOv2 ViT-B/14 with 4 register tokens."""
    return _make_dinov2_model("dinov2_vitb14_reg", pretrained_weights, **kwargs)


def dinov2_vitl14_reg(*, pretrained_weights: PathLike | None = None, **kwargs: Any) -> DinoVisionTransformer:
    """DINOv2 ViT-L/14 with 4 register tokens."""
    return _make_dinov2_model("dinov2_vitl14_reg", pretrained_weights, **kwargs)


def dinov2_vitg14_reg(*, pretrained_weights: PathLike | None = None, **kwargs: Any) -> DinoVisionTransformer:
    """DINOv2 ViT-g/14 with 4 register tokens."""
    return _make_dinov2_model("dinov2_vitg14_reg", pretrained_weights, **kwargs)


__all__ = [
    "dinov2_vitb14",
    "dinov2_vitb14_reg",
    "dinov2_vitg14",
    "dinov2_vitg14_reg",
    "dinov2_vitl14",
    "dinov2_vitl14_reg",
    "dinov2_vits14",
    "dinov2_vits14_reg",
]
