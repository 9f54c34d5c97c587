"""torch.hub entry points: torch.hub.load(REPO_DIR, "dinov2_vitl14_reg", source="local",
pretrained_weights=PATH). Weights are read from local files only (see dinov2/hub/backbones.py)."""

dependencies = ["torch"]

from dinov2.hub.backbones import (  # noqa: E402, F401
    dinov2_vitb14,
    dinov2_vitb14_reg,
    dinov2_vitg14,
    dinov2_vitg14_reg,
    dinov2_vitl14,
    dinov2_vitl14_reg,
    dinov2_vits14,
    dinov2_vits14_reg,
)
